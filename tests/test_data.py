"""Tests for jaxcnn.data: loaders, IDX parsing, host batching, preprocess, prefetch, device-resident batches, TFDS."""

import gzip
import hashlib
import importlib.resources
import importlib.util
import json
import re
import struct
import subprocess
import sys
import time
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn import data, train


def raw_idx(array):
    """The IDX format as MNIST ships it: 0, 0, 0x08 (uint8), rank, big-endian sizes, bytes."""
    return struct.pack(f">BBBB{array.ndim}I", 0, 0, 0x08, array.ndim, *array.shape) + array.tobytes()


def write_idx(path, array):
    raw = raw_idx(array)
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)


def write_idx_dir(directory, splits, gz):
    for split, (images, labels) in splits.items():
        stems = data.IDX_FILES[split]
        for stem, array in zip(stems, (images, labels)):
            write_idx(directory / (stem + (".gz" if gz else "")), array)


def random_idx_splits(seed=0):
    rng = np.random.default_rng(seed)
    return {
        split: (rng.integers(0, 256, (n, 6, 4), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8))
        for split, n in (("train", 5), ("test", 3))
    }


def index_split(n):
    """Image i is filled with i and has label i, so batches can be traced back to examples."""
    return data.Split(
        np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 2, 2, 1)).copy(),
        np.arange(n, dtype=np.int32),
    )


# --------------------------------------------------------------------------
# Loading.


def test_mnist_10k_matches_its_readme():
    ds = data.load("mnist_10k")
    bundled = importlib.resources.files("jaxcnn") / "datasets" / "mnist_10k"
    readme = (bundled / "README.md").read_text()
    checksums = re.findall(r"([0-9a-f]{64})  (\S+)", readme)
    assert len(checksums) == 4
    for digest, file in checksums:
        assert hashlib.sha256((bundled / file).read_bytes()).hexdigest() == digest, file
    for split, n in ((ds.train, 8000), (ds.test, 2000)):
        chex.assert_shape(split.images, (n, 28, 28, 1))
        chex.assert_shape(split.labels, (n,))
        assert split.images.dtype == np.uint8 and split.labels.dtype == np.int32
    assert ds.num_classes == 10 and ds.name == "mnist_10k"
    for name, split in (("train", ds.train), ("test", ds.test)):
        counts = [int(c) for c in re.search(rf"{name} \[([\d ]+)\]", readme).group(1).split()]
        np.testing.assert_array_equal(np.bincount(split.labels, minlength=10), counts)
    assert 0 < ds.train.images.mean() < 255  # real pixels, not a blank array


@pytest.mark.parametrize("gz", [True, False])
def test_idx_directory_round_trip(tmp_path, gz):
    splits = random_idx_splits()
    write_idx_dir(tmp_path, splits, gz)
    ds = data.load(str(tmp_path))
    for split, (images, labels) in zip((ds.train, ds.test), splits.values()):
        np.testing.assert_array_equal(split.images, images[..., None])
        np.testing.assert_array_equal(split.labels, labels)
        assert split.labels.dtype == np.int32


# Each case: the file to spoil, given the raw IDX bytes it should hold -> the bytes it gets.
MALFORMED = {
    "bad magic": ("train-images-idx3-ubyte", lambda raw: b"\x00\x00\x0d" + raw[3:]),
    "wrong rank": ("train-labels-idx1-ubyte", lambda raw: raw[:3] + b"\x03" + raw[4:]),
    "truncated": ("t10k-images-idx3-ubyte", lambda raw: raw[:-5]),
    "trailing bytes": ("t10k-labels-idx1-ubyte", lambda raw: raw + b"\x00"),
    "short header": ("train-images-idx3-ubyte", lambda raw: raw[:6]),
    "count mismatch": ("train-labels-idx1-ubyte", lambda raw: raw_idx(np.zeros(4, np.uint8))),
    "label out of range": ("t10k-labels-idx1-ubyte", lambda raw: raw_idx(np.array([1, 10, 2], np.uint8))),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_idx_names_the_file(tmp_path, case):
    write_idx_dir(tmp_path, random_idx_splits(), gz=False)
    stem, spoil = MALFORMED[case]
    file = tmp_path / stem
    file.write_bytes(spoil(file.read_bytes()))
    with pytest.raises(ValueError, match=re.escape(stem)):
        data.load(str(tmp_path))


@pytest.mark.parametrize(
    "spoil", [lambda gz: b"not gzip at all", lambda gz: gz[: len(gz) // 2]], ids=["garbage", "cut"]
)
def test_bad_gzip_names_the_file(tmp_path, spoil):
    write_idx_dir(tmp_path, random_idx_splits(), gz=True)
    file = tmp_path / "t10k-images-idx3-ubyte.gz"
    file.write_bytes(spoil(file.read_bytes()))
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz.*gzip"):
        data.load(str(tmp_path))


def test_missing_idx_file_names_it(tmp_path):
    write_idx_dir(tmp_path, random_idx_splits(), gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte"):
        data.load(str(tmp_path))


def test_unknown_name_lists_what_is_allowed():
    with pytest.raises(ValueError, match=r"load: unknown dataset 'no_such_set'.*mnist_10k.*IDX.*fashion_mnist"):
        data.load("no_such_set")


def test_split_checks_its_arrays():
    with pytest.raises(ValueError, match="Split"):
        data.Split(np.zeros((2, 3, 3), np.uint8), np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="Split"):
        data.Split(np.zeros((2, 3, 3, 1), np.uint8), np.zeros(3, np.int32))


# --------------------------------------------------------------------------
# Batching.


def test_train_batches_shuffle_from_seed_and_epoch_only():
    split = index_split(22)  # 22 // 4 = 5 batches; 2 examples dropped
    assert data.num_train_batches(split, 4) == 5 and data.num_train_batches(split, 23) == 0
    epoch0 = list(data.train_batches(split, 4, seed=3, epoch=0))
    again = list(data.train_batches(split, 4, seed=3, epoch=0))
    epoch1 = list(data.train_batches(split, 4, seed=3, epoch=1))
    other_seed = list(data.train_batches(split, 4, seed=4, epoch=0))
    assert len(epoch0) == 5
    for images, labels in epoch0:
        chex.assert_shape(images, (4, 2, 2, 1))
        assert images.dtype == np.uint8 and labels.dtype == np.int32
        np.testing.assert_array_equal(images[:, 0, 0, 0], labels)  # images stay with their labels
    chex.assert_trees_all_equal(epoch0, again)
    seen = np.concatenate([labels for _, labels in epoch0])
    assert len(np.unique(seen)) == len(seen) == 20  # each example at most once
    for different in (epoch1, other_seed):
        assert not np.array_equal(seen, np.concatenate([labels for _, labels in different]))


def test_train_batches_resume_mid_epoch():
    split = index_split(22)
    full = list(data.train_batches(split, 4, seed=1, epoch=2))
    resumed = list(data.train_batches(split, 4, seed=1, epoch=2, start_batch=3))
    chex.assert_trees_all_equal(resumed, full[3:])
    assert list(data.train_batches(split, 4, seed=1, epoch=2, start_batch=5)) == []


def test_process_slices_make_up_the_global_batch():
    split = index_split(22)
    whole = list(data.train_batches(split, 4, seed=0, epoch=0))
    parts = [list(data.train_batches(split, 4, seed=0, epoch=0, process_index=p, process_count=2)) for p in (0, 1)]
    for step, (images, labels) in enumerate(whole):
        chex.assert_shape(parts[0][step][0], (2, 2, 2, 1))
        np.testing.assert_array_equal(np.concatenate([parts[0][step][1], parts[1][step][1]]), labels)
        np.testing.assert_array_equal(np.concatenate([parts[0][step][0], parts[1][step][0]]), images)


def test_eval_batches_cover_every_example_once_and_mask_the_padding():
    split = index_split(10)
    for count in (1, 2):
        per_process = [list(data.eval_batches(split, 4, process_index=p, process_count=count)) for p in range(count)]
        seen = []
        for batches in per_process:
            assert len(batches) == 3  # ceil(10 / 4) on every process
            for images, labels, mask in batches:
                chex.assert_shape((images, labels, mask), ((4 // count, 2, 2, 1), (4 // count,), (4 // count,)))
                assert mask.dtype == np.bool_
                np.testing.assert_array_equal(images[:, 0, 0, 0], labels)
                seen.append(labels[mask])
        np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(10))
    ((_, labels, mask),) = list(data.eval_batches(split, 4))[-1:]
    np.testing.assert_array_equal(mask, [True, True, False, False])
    np.testing.assert_array_equal(labels[mask], [8, 9])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(global_batch_size=5, process_count=2), "does not divide"),
        (dict(global_batch_size=4, process_index=2, process_count=2), "process_index"),
        (dict(global_batch_size=0), "global_batch_size"),
        (dict(global_batch_size=23), "global_batch_size"),  # more than the 22 examples
        (dict(global_batch_size=4, start_batch=6), "start_batch"),
        (dict(global_batch_size=4, epoch=-1), "epoch"),
    ],
)
def test_train_batches_bad_arguments(kwargs, match):
    kwargs = dict(seed=0, epoch=0) | kwargs
    with pytest.raises(ValueError, match=f"train_batches: .*{match}"):
        data.train_batches(index_split(22), **kwargs)


def test_eval_batches_bad_arguments():
    with pytest.raises(ValueError, match="eval_batches: .*does not divide"):
        data.eval_batches(index_split(10), 3, process_count=2)


# --------------------------------------------------------------------------
# Device side.


@pytest.fixture(scope="module")
def uint8_images():
    return np.random.default_rng(0).integers(0, 256, (2, 7, 5, 3), dtype=np.uint8)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_preprocess_scales_to_unit_range(uint8_images, dtype):
    x = jax.jit(data.preprocess, static_argnums=(1, 2))(uint8_images, None, dtype)
    chex.assert_type(x, dtype)
    chex.assert_shape(x, uint8_images.shape)
    np.testing.assert_allclose(
        np.asarray(x, np.float32), uint8_images / 255, rtol=2**-8 if dtype == jnp.bfloat16 else 1e-6
    )


@pytest.mark.parametrize("size", [11, 3])  # up and down
def test_preprocess_resize_matches_pil_bilinear(uint8_images, size):
    image_module = pytest.importorskip("PIL.Image")
    x = np.asarray(jax.jit(data.preprocess, static_argnums=1)(uint8_images, size))
    chex.assert_shape(x, (2, size, size, 3))
    assert 0 <= x.min() and x.max() <= 1
    # Oracle: PIL's bilinear resize (what the chapters' transforms.Resize runs), per channel.
    for n, c in np.ndindex(2, 3):
        plane = image_module.fromarray(uint8_images[n, :, :, c].astype(np.float32) / 255, mode="F")
        want = np.asarray(plane.resize((size, size), image_module.BILINEAR))
        np.testing.assert_allclose(x[n, :, :, c], want, atol=1e-5)


def test_preprocess_bad_input():
    with pytest.raises(ValueError, match="preprocess: images"):
        data.preprocess(np.zeros((7, 5, 3), np.uint8))
    with pytest.raises(ValueError, match="preprocess: image_size"):
        data.preprocess(np.zeros((1, 7, 5, 3), np.uint8), 0)


def test_prefetch_transfers_ahead_lazily():
    sharding = jax.sharding.NamedSharding(train.data_mesh(), jax.sharding.PartitionSpec("data"))
    batches = list(data.eval_batches(index_split(10 * jax.device_count()), 2 * jax.device_count()))
    consumed = []

    def source():
        for batch in batches:
            consumed.append(batch)
            yield batch

    out = data.prefetch(source(), sharding, size=2)
    assert consumed == []  # nothing read before the first request
    got = []
    for step, batch in enumerate(out):
        assert len(consumed) <= step + 1 + 2  # bounded look-ahead
        got.append(batch)
    assert len(got) == len(batches)
    for host, device in zip(batches, got):
        for x, y in zip(host, device):
            assert isinstance(y, jax.Array) and y.sharding == sharding
            np.testing.assert_array_equal(np.asarray(y), x)


def test_device_batches_are_train_batches_gathered_on_the_devices():
    n = jax.device_count()
    split = index_split(11 * n)  # 11 // 2 = 5 batches of 2 per device; one example per device dropped
    sharding = jax.sharding.NamedSharding(train.data_mesh(), jax.sharding.PartitionSpec("data"))
    resident = data.device_split(split, sharding)
    assert all(x.sharding.is_fully_replicated for x in (resident.images, resident.labels))
    for start_batch in (0, 3):
        kwargs = {"seed": 5, "epoch": 1, "start_batch": start_batch}
        host = list(data.prefetch(data.train_batches(split, 2 * n, **kwargs), sharding))
        device = list(data.device_batches(resident, 2 * n, sharding, **kwargs))
        assert len(device) == len(host) == 5 - start_batch
        for want, got in zip(host, device):
            for x, y in zip(want, got):
                assert y.sharding == x.sharding and y.dtype == x.dtype
                np.testing.assert_array_equal(np.asarray(y), np.asarray(x))


def test_device_batches_bad_arguments():
    sharding = jax.sharding.NamedSharding(train.data_mesh(), jax.sharding.PartitionSpec("data"))
    with pytest.raises(ValueError, match="device_batches: split must be on the devices"):
        data.device_batches(index_split(10), 2, sharding, seed=0, epoch=0)
    with pytest.raises(ValueError, match="device_batches: start_batch"):
        data.device_batches(data.device_split(index_split(10), sharding), 2, sharding, seed=0, epoch=0, start_batch=6)


# --------------------------------------------------------------------------
# TFDS (through tfds.data_source: no TensorFlow needed).


def test_import_jaxcnn_does_not_import_tfds():
    code = (
        "import sys, jaxcnn, jaxcnn.data; jaxcnn.data.load('mnist_10k'); "
        "assert 'tensorflow_datasets' not in sys.modules and 'tensorflow' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_tfds_mock_fashion_mnist(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6):
        ds = data.load("fashion_mnist", data_dir=str(tmp_path))
    assert ds.num_classes == 10
    for split in (ds.train, ds.test):
        chex.assert_shape(split.images, (6, 28, 28, 1))
        assert split.images.dtype == np.uint8 and split.labels.dtype == np.int32
        assert 0 <= split.labels.min() and split.labels.max() < 10


@pytest.fixture
def tiny_tfds_dir(tmp_path):
    """A TFDS dataset 'jaxcnn_tiny_set' prepared as array_record in tmp_path: image i is filled with i."""
    tfds = pytest.importorskip("tensorflow_datasets")

    with tfds.core.registered.skip_registration():  # found from its files, as a user's would be

        class JaxcnnTinySet(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                features = {
                    "image": tfds.features.Tensor(shape=(4, 3, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=3),
                }
                return tfds.core.DatasetInfo(
                    builder=self, features=tfds.features.FeaturesDict(features), supervised_keys=("image", "label")
                )

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples(range(5)), "test": self._generate_examples(range(5, 8))}

            def _generate_examples(self, indices):
                for i in indices:
                    yield i, {"image": np.full((4, 3, 1), i, np.uint8), "label": i % 3}

    # Tensor features need no TensorFlow to write (Image features do: PNG encoding).
    JaxcnnTinySet(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    return tmp_path


def test_tfds_reads_prepared_array_record_files(tiny_tfds_dir):
    ds = data.load("jaxcnn_tiny_set", data_dir=str(tiny_tfds_dir))
    assert ds.num_classes == 3
    for split, indices in ((ds.train, range(5)), (ds.test, range(5, 8))):
        chex.assert_shape(split.images, (len(indices), 4, 3, 1))
        first_pixel = split.images[:, 0, 0, 0]
        np.testing.assert_array_equal(np.sort(first_pixel), list(indices))  # TFDS shuffles on write
        np.testing.assert_array_equal(split.labels, first_pixel % 3)


EVIL_FEATURE = "jaxcnn_evil_feature.Evil"  # a module that, imported, writes a marker file
EVIL_FILES = {
    "features.json": {"pythonClassName": EVIL_FEATURE},
    "nested features.json": {
        "pythonClassName": "tensorflow_datasets.core.features.features_dict.FeaturesDict",
        "featuresDict": {"features": {"label": {"pythonClassName": EVIL_FEATURE, "classLabel": {"numClasses": "3"}}}},
    },
    "legacy features.json": {"type": EVIL_FEATURE, "content": {}},
    "dataset_info.json": {"name": "evil_set", "version": "1.0.0", "features": {"pythonClassName": EVIL_FEATURE}},
}


@pytest.mark.parametrize("case", EVIL_FILES)
def test_tfds_data_dir_naming_a_module_is_refused_unimported(tmp_path, monkeypatch, case):
    """TFDS imports the module of any feature class a prepared dataset's JSON names: load refuses first."""
    pytest.importorskip("tensorflow_datasets")
    code, marker = tmp_path / "code", tmp_path / "imported"
    code.mkdir()
    (code / "jaxcnn_evil_feature.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(code))
    version_dir = tmp_path / "data" / "evil_set" / "1.0.0"
    version_dir.mkdir(parents=True)
    file = version_dir / case.split()[-1]
    file.write_text(json.dumps(EVIL_FILES[case]))
    if file.name != "dataset_info.json":
        (version_dir / "dataset_info.json").write_text(json.dumps({"name": "evil_set", "version": "1.0.0"}))
    with pytest.raises(ValueError, match=rf"^load: {re.escape(str(file))} names feature type '{EVIL_FEATURE}'"):
        data.load("evil_set", data_dir=str(tmp_path / "data"))
    assert not marker.exists() and "jaxcnn_evil_feature" not in sys.modules


@pytest.mark.parametrize("name", ["evil_set:1.0.0", "EvilSet", "huggingface:mnist", "mnist/a=1", "../evil_set"])
def test_tfds_names_are_plain(name):
    """A version, namespace or arguments in the name, or camel case, would have TFDS read other files."""
    with pytest.raises(ValueError, match=r"unknown dataset .*no namespace, version or arguments"):
        data.load(name, data_dir="unused")


def test_tfds_tfrecord_without_tensorflow_says_what_to_do(tiny_tfds_dir):
    if importlib.util.find_spec("tensorflow"):
        pytest.skip("TensorFlow is installed: load would read TFRecord with it")
    info = tiny_tfds_dir / "jaxcnn_tiny_set" / "1.0.0" / "dataset_info.json"
    info.write_text(info.read_text().replace('"fileFormat": "array_record"', '"fileFormat": "tfrecord"'))
    with pytest.raises(ValueError, match=r"as TFRecord, which needs TensorFlow.*file_format=array_record"):
        data.load("jaxcnn_tiny_set", data_dir=str(tiny_tfds_dir))


def test_tfds_unprepared_fails_fast_with_instructions(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")

    def no_download(*args, **kwargs):
        raise AssertionError("load must not download (offline, TFDS retries for minutes)")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_download)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"(?s)not prepared.*tfds build fashion_mnist.*array_record.*mnist_10k"):
        data.load("fashion_mnist", data_dir=str(tmp_path))
    assert time.perf_counter() - start < 10


def test_tfds_hides_gpus_from_an_imported_tensorflow(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    calls = []
    fake_config = types.SimpleNamespace(set_visible_devices=lambda devices, kind: calls.append((devices, kind)))
    monkeypatch.setitem(sys.modules, "tensorflow", types.SimpleNamespace(config=fake_config))
    with tfds.testing.mock_data(num_examples=2):
        data.load("fashion_mnist", data_dir=str(tmp_path))
    assert ([], "GPU") in calls
