"""Image classification data: loading, host-side batching, on-device preprocessing.

Datasets live in host memory as uint8 NHWC arrays (the chapters' sets are
tens of MB). `load` reads one of

* `"mnist_10k"`: 10,000 real MNIST digits bundled with the package (offline);
* a path to a directory of the four MNIST-style IDX files, raw or gzipped;
* a TFDS name (`"fashion_mnist"`, `"mnist"`, `"cifar10"`, ...), read through
  `tfds.data_source` from array_record files, which needs no TensorFlow.
  tensorflow_datasets is imported only here, never at `import jaxcnn`.

Batches are numpy and per process: for a global batch of B examples each of
`process_count` hosts gets its own B / process_count slice, computed from the
same (seed, epoch) permutation, so hosts agree without talking. `prefetch`
assembles the global `jax.Array`s; `preprocess` (scaling, resizing) runs
inside the jitted step, on the device. For a fast accelerator and a small
dataset, `device_split` puts the whole uint8 split on every device once and
`device_batches` gathers the same batches there, with no copy per step.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import gzip
import importlib.resources
import itertools
import json
import os
import re
import struct
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxcnn import _checks

BUNDLED = "mnist_10k"
IDX_FILES = {  # split -> (images, labels), the names MNIST and Fashion-MNIST ship under
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_NUM_CLASSES = 10  # the format's two datasets both have ten classes


@dataclasses.dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int32 (N,)

    def __post_init__(self):
        x, y = self.images, self.labels
        if x.dtype != np.uint8 or x.ndim != 4 or y.dtype != np.int32 or y.shape != x.shape[:1]:
            raise ValueError(
                "Split: want images uint8 (N, H, W, C) and labels int32 (N,), got "
                f"images {x.dtype}{x.shape} and labels {y.dtype}{y.shape}"
            )


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    test: Split
    num_classes: int


# --------------------------------------------------------------------------
# Loading.


def load(name: str, *, data_dir: str | None = None) -> Dataset:
    """`"mnist_10k"`, a directory of IDX files, or a TFDS name (`data_dir`: TFDS's)."""
    name = os.fspath(name)
    if name == BUNDLED:
        return _load_idx(name, importlib.resources.files("jaxcnn") / "datasets" / BUNDLED)
    if os.path.isdir(name):
        return _load_idx(name, Path(name))
    return _load_tfds(name, data_dir)


def _load_idx(name: str, directory) -> Dataset:
    splits = {}
    for split, (images_name, labels_name) in IDX_FILES.items():
        images = _read_idx(_find(directory, images_name), ndim=3)[..., None]  # NHW -> NHWC
        labels_file = _find(directory, labels_name)
        labels = _read_idx(labels_file, ndim=1)
        if len(labels) != len(images):
            raise ValueError(f"load: {labels_file} has {len(labels)} labels for {len(images)} images")
        if labels.max(initial=0) >= IDX_NUM_CLASSES:
            raise ValueError(f"load: {labels_file} has label {labels.max()}, outside 0..{IDX_NUM_CLASSES - 1}")
        splits[split] = Split(images, labels.astype(np.int32))
    return Dataset(name, splits["train"], splits["test"], IDX_NUM_CLASSES)


def _find(directory, stem: str):
    for file in (directory / stem, directory / f"{stem}.gz"):
        if file.is_file():
            return file
    raise ValueError(f"load: {directory} has neither {stem} nor {stem}.gz")


def _read_idx(file, *, ndim: int) -> np.ndarray:
    """An IDX file (big-endian header: 0, 0, dtype 0x08 = uint8, ndim, then ndim int32 sizes)."""
    data = file.read_bytes()
    if file.name.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
            raise ValueError(f"load: {file} is not a valid gzip file ({e})") from None
    header = 4 + 4 * ndim
    if len(data) < header or data[:4] != bytes([0, 0, 0x08, ndim]):
        raise ValueError(
            f"load: {file} is not a uint8 IDX file of rank {ndim}: want magic "
            f"{0x0800 + ndim}, got header bytes {data[:4].hex() or 'none'}"
        )
    shape = struct.unpack(f">{ndim}I", data[4:header])
    size = int(np.prod(shape))
    if len(data) - header != size:
        raise ValueError(
            f"load: {file} header promises shape {shape} ({size} bytes of data) but the file holds {len(data) - header}"
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


# A prepared dataset's features.json (and dataset_info.json) name the Python
# class of each feature, and TFDS imports the module of any name it does not
# know: a data directory would run code. Before TFDS reads one, every class
# named there must be one of TFDS's own that image classification sets use.
TFDS_NAME = re.compile(r"[a-z0-9_]+(/[a-z0-9_-]+)?")  # what TFDS looks up as is: no camel case, ':' or '='
TFDS_FEATURE_TYPES = frozenset(
    f"tensorflow_datasets.core.features.{name}"
    for name in (
        "features_dict.FeaturesDict",
        "image_feature.Image",
        "class_label_feature.ClassLabel",
        "tensor_feature.Tensor",
        "feature.Tensor",  # Tensor's older name, in files written before it moved
        "scalar.Scalar",
        "text_feature.Text",
        "sequence_feature.Sequence",  # of bounding boxes, in some (stanford_dogs)
        "bounding_boxes.BBoxFeature",
    )
)


def _load_tfds(name: str, data_dir: str | None) -> Dataset:
    if not TFDS_NAME.fullmatch(name):
        raise _unknown(name, "a TFDS name here is lowercase name or name/config: no namespace, version or arguments")
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise _unknown(name, "tensorflow_datasets is not installed: pip install 'jaxcnn[tfds]'") from None
    _keep_tensorflow_off_gpus()  # in case TFDS imported it
    data_dir = os.path.expanduser(data_dir or tfds.core.constants.DATA_DIR)  # the one directory checked and read
    if "://" in data_dir:  # its feature classes could not be checked before TFDS imports them
        raise ValueError(f"load: data_dir {data_dir!r} must be a local directory")
    _check_tfds_feature_types(Path(data_dir) / name.split("/")[0])
    try:  # also finds datasets that other code prepared, from their files
        builder = tfds.builder(name, data_dir=data_dir)
    except ValueError:  # DatasetNotFoundError or a malformed name
        raise _unknown(name, "neither a directory nor a name TFDS knows") from None
    image_key, label_key = builder.info.supervised_keys or ("image", "label")
    num_classes = getattr(builder.info.features[label_key], "num_classes", None)
    if num_classes is None:
        raise ValueError(f"load: {name!r} is not image classification: its {label_key!r} is not a ClassLabel")
    try:
        # Never download: offline, TFDS retries for minutes before it fails.
        columns = []
        for source in builder.as_data_source(split=["train", "test"]):
            examples = [source[i] for i in range(len(source))]  # one by one: TFDS's mock lacks __getitems__
            columns.append({k: np.stack([e[k] for e in examples]) for k in (image_key, label_key)})
    except Exception as e:
        if not builder.is_prepared():
            raise ValueError(_not_prepared_message(name, builder)) from None
        if not isinstance(e, NotImplementedError):
            raise ValueError(f"load: cannot read TFDS dataset {name!r} as fixed-size train/test images ({e})") from None
        columns = _read_tfrecord(tfds, builder, name)  # prepared as TFRecord
    splits = []
    for column in columns:
        images, labels = column[image_key], column[label_key]
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(f"load: {name!r} has {images.dtype} images of shape {images.shape[1:]}; want uint8 HWC")
        splits.append(Split(images if images.ndim == 4 else images[..., None], labels.astype(np.int32)))
    return Dataset(name, *splits, num_classes)


def _check_tfds_feature_types(dataset_dir: Path) -> None:
    """Raises ValueError naming the file if a feature type TFDS would load from dataset_dir is not allowed.

    TFDS reads <dataset>/<version>/ or <dataset>/<config>/<version>/: features.json
    names classes under "pythonClassName" (older files: "type"), dataset_info.json
    under "pythonClassName" (its other "type"s are statistics' and schema's, not classes).
    """
    class_keys = {"features.json": ("pythonClassName", "type"), "dataset_info.json": ("pythonClassName",)}
    for file_name, keys in class_keys.items():
        for file in (*dataset_dir.glob(f"*/{file_name}"), *dataset_dir.glob(f"*/*/{file_name}")):
            try:
                content = json.loads(file.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"load: cannot read {file} as JSON ({e})") from None
            stack = [content]
            while stack:
                node = stack.pop()
                if isinstance(node, dict):
                    for key in keys:
                        if key in node and (not isinstance(node[key], str) or node[key] not in TFDS_FEATURE_TYPES):
                            raise ValueError(
                                f"load: {file} names feature type {node[key]!r}, not one of TFDS's image "
                                "classification features; a data directory is read as data, never as code"
                            )
                    stack.extend(node.values())
                elif isinstance(node, list):
                    stack.extend(node)


def _unknown(name: str, why: str) -> ValueError:
    return ValueError(
        f"load: unknown dataset {name!r} ({why}); want {BUNDLED!r} (bundled, offline), a path "
        "to a directory of the four MNIST IDX files, or a TFDS image classification name "
        "such as 'fashion_mnist', 'mnist' or 'cifar10'"
    )


def _not_prepared_message(name: str, builder) -> str:
    return (
        f"load: TFDS dataset {name!r} is not prepared in {builder.data_dir}, and load never "
        "downloads (offline, TFDS retries for minutes). On a machine with a network run\n"
        f"    pip install tensorflow-datasets tensorflow-cpu && tfds build {name} "
        f"--data_dir={builder.data_dir_root} --file_format=array_record\n"
        "and pass that directory as data_dir (copied here if need be). Offline, use "
        f"--dataset {BUNDLED} (bundled) or a path to a directory of the four MNIST IDX files."
    )


def _read_tfrecord(tfds, builder, name) -> list[dict[str, np.ndarray]]:
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        raise ValueError(
            f"load: {name!r} is prepared in {builder.data_dir} as TFRecord, which needs "
            "TensorFlow (pip install 'jaxcnn[tfds-tf]'); or prepare it again with "
            "--file_format=array_record, which does not"
        ) from None
    _keep_tensorflow_off_gpus()
    return tfds.as_numpy(builder.as_dataset(split=["train", "test"], batch_size=-1))


def _keep_tensorflow_off_gpus() -> None:
    """If TensorFlow is imported, hide GPUs from it: it would grab the memory JAX needs."""
    if "tensorflow" in sys.modules:
        try:
            sys.modules["tensorflow"].config.set_visible_devices([], "GPU")
        except RuntimeError:  # TensorFlow already initialised its devices: too late
            pass


# --------------------------------------------------------------------------
# Batching (host side, numpy).


def _local_batch_size(fn, global_batch_size, process_index, process_count) -> int:
    _checks.int_in_range(fn, "global_batch_size", global_batch_size, 1)
    _checks.int_in_range(fn, "process_count", process_count, 1)
    _checks.int_in_range(fn, "process_index", process_index, 0, process_count - 1)
    if global_batch_size % process_count:
        raise ValueError(
            f"{fn}: global_batch_size {global_batch_size} does not divide by process_count {process_count}"
        )
    return global_batch_size // process_count


def num_train_batches(split: Split, global_batch_size: int) -> int:
    """N // B (0 if B > N): training drops the last partial batch, so every step has one shape (one compile)."""
    _checks.int_in_range("num_train_batches", "global_batch_size", global_batch_size, 1)
    return len(split.labels) // global_batch_size


def train_batches(
    split: Split,
    global_batch_size: int,
    *,
    seed: int,
    epoch: int,
    start_batch: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """This process's slice of each shuffled global batch; order is a function of (seed, epoch) only."""
    local = _local_batch_size("train_batches", global_batch_size, process_index, process_count)
    indices = _shuffled_indices("train_batches", split, global_batch_size, seed, epoch, start_batch)

    def batches():  # a generator inside, so bad arguments fail at the call, not at first next()
        for index in indices:
            index = index[process_index * local : (process_index + 1) * local]
            yield split.images[index], split.labels[index]

    return batches()


def _shuffled_indices(fn, split, global_batch_size, seed, epoch, start_batch) -> list[np.ndarray]:
    """The example indices of each global training batch from `start_batch` on, checked arguments."""
    _checks.int_in_range(fn, "global_batch_size", global_batch_size, 1, len(split.labels))
    steps = len(split.labels) // global_batch_size  # num_train_batches(split, B), B being checked already
    _checks.int_in_range(fn, "seed", seed, 0)
    _checks.int_in_range(fn, "epoch", epoch, 0)
    _checks.int_in_range(fn, "start_batch", start_batch, 0, steps)
    # No state carried between epochs: a resumed run regenerates the same order.
    order = np.random.default_rng([seed, epoch]).permutation(len(split.labels))
    return [order[step * global_batch_size : (step + 1) * global_batch_size] for step in range(start_batch, steps)]


def eval_batches(
    split: Split, global_batch_size: int, *, process_index: int = 0, process_count: int = 1
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every example once, in order; the last batch is padded to full size and `mask` marks real ones.

    Every process yields ceil(N / B) batches, so all hosts run the same number of steps.
    """
    local = _local_batch_size("eval_batches", global_batch_size, process_index, process_count)
    n = len(split.labels)

    def batches():
        for step in range(-(-n // global_batch_size)):
            index = step * global_batch_size + process_index * local + np.arange(local)
            mask = index < n
            index = np.where(mask, index, 0)  # padding repeats example 0, masked out
            yield split.images[index], split.labels[index], mask

    return batches()


# --------------------------------------------------------------------------
# Device side.


def preprocess(images, image_size: int | None = None, dtype=jnp.float32) -> jax.Array:
    """uint8 NHWC -> `dtype` in [0, 1], optionally resized to (image_size, image_size).

    The resize is bilinear with antialiasing (`jax.image.resize`), which matches
    PIL's bilinear resize that the chapters' `transforms.Resize` applies (and
    torchvision's default on tensors): half-pixel centres, and at the borders
    taps outside the image are dropped and the weights renormalised, i.e. the
    edge pixels are repeated.
    """
    if np.ndim(images) != 4:
        raise ValueError(f"preprocess: images must be NHWC (rank 4), got shape {np.shape(images)}")
    x = jnp.asarray(images, jnp.float32) / 255  # in float32 even for bfloat16 out: one rounding
    if image_size is not None:
        _checks.int_in_range("preprocess", "image_size", image_size, 1)
        n, h, w, c = x.shape
        if (h, w) != (image_size, image_size):
            x = jax.image.resize(x, (n, image_size, image_size, c), "bilinear")
    return x.astype(dtype)


def prefetch(iterator, sharding: jax.sharding.Sharding, size: int = 2) -> Iterator:
    """Global `jax.Array`s from each batch of this process's slices, `size` batches ahead.

    A deque of transfers rather than a thread (as in the Flax examples):
    `make_array_from_process_local_data` only dispatches the host-to-device
    copies, which then run while the current step computes; the host work
    per batch is a numpy gather, too cheap to need a thread of its own.
    """
    _checks.int_in_range("prefetch", "size", size, 1)
    queue = collections.deque()

    def enqueue(n):
        for batch in itertools.islice(iterator, n):
            queue.append(jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch))

    enqueue(size)
    while queue:
        yield queue.popleft()
        enqueue(1)


def device_split(split: Split, sharding: jax.sharding.NamedSharding) -> Split:
    """The split's uint8 images and labels as `jax.Array`s held whole on every device of `sharding`'s mesh.

    For datasets that fit on each device several times over (MNIST's 47 MB, CIFAR-10's 150 MB): put them
    there once, and `device_batches` gathers each batch on the device, with no host-to-device copy per step.
    Every process passes its full host copy (as `load` gives it).
    """
    replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())

    def put(x):
        return jax.make_array_from_callback(x.shape, replicated, lambda index: x[index])

    return Split(put(split.images), put(split.labels))


def device_batches(
    split: Split,
    global_batch_size: int,
    sharding: jax.sharding.NamedSharding,
    *,
    seed: int,
    epoch: int,
    start_batch: int = 0,
) -> Iterator[tuple[jax.Array, jax.Array]]:
    """`train_batches`' global batches, in its order, gathered on the devices from a `device_split`.

    Only the batch's indices cross from the host (4 bytes an example), each device gathering its own
    `sharding` slice of the batch from its whole copy: the same arrays as `prefetch(train_batches(...),
    sharding)` on a `train.data_mesh`, whose global row r is example order[r] on every process too.
    """
    if not all(isinstance(x, jax.Array) for x in (split.images, split.labels)):
        raise ValueError(
            "device_batches: split must be on the devices already: pass data.device_split(split, sharding)"
        )
    indices = _shuffled_indices("device_batches", split, global_batch_size, seed, epoch, start_batch)
    gather = _gather(sharding)

    def batches():
        for index in indices:
            index = np.asarray(index, np.int32)
            on_devices = jax.make_array_from_callback(index.shape, sharding, lambda i, index=index: index[i])
            yield gather(split.images, split.labels, on_devices)

    return batches()


@functools.cache
def _gather(sharding: jax.sharding.NamedSharding):
    """A jitted gather of a batch from whole replicated arrays, its output sharded as the indices are."""
    return jax.jit(lambda images, labels, index: (images[index], labels[index]), out_shardings=(sharding, sharding))
