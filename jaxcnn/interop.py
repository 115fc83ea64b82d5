"""PyTorch weights in and out: `load_torch_state_dict(model, state_dict)` and `to_torch_state_dict(model)`.

Keys are those of the PyTorch model each registered model is the twin of:
d2l's module names for the chapters' models (`net.0.weight`, `net.b2.0.conv1.weight`,
`net.dense_blk1.net.0.0.running_mean`, ... as the PyTorch edition's nn.Sequential
and add_module name them), torchvision's for resnet34 and resnet50 (`conv1.weight`,
`layer1.0.bn1.running_mean`, `layer2.0.downsample.0.weight`, `fc.weight`).

The conversion: conv kernels OIHW <-> HWIO; dense weights (out, in) <-> (in, out),
and for a dense layer fed by a Flatten of a (C, H, W) map its rows permuted, as
PyTorch flattens NCHW in (c, h, w) order and jaxcnn NHWC in (h, w, c); BatchNorm's
weight, bias, running_mean and running_var <-> scale, bias, mean, var (PyTorch's
num_batches_tracked is ignored on load, and written as 0 on export). The runtime
never imports torch: tensors are read through their .detach().cpu().numpy(), and
the export is NumPy arrays (`{k: torch.from_numpy(v) for k, v in ...}` for torch).
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcnn import layers
from jaxcnn.analysis import _name, _trace_layers
from jaxcnn.models import AnyNet, BasicBlock, Bottleneck, DenseBlock, DenseNet, ResNet
from jaxcnn.summary import sequential_net

__all__ = ["load_torch_state_dict", "to_torch_state_dict"]

_BATCH_NORM = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


class _Slot(NamedTuple):
    """One PyTorch tensor: its key, the jaxcnn variable it fills, and how the two lay out."""

    key: str
    variable: nnx.Variable
    where: str  # the jaxcnn layer's name and attribute, for error messages
    kind: str  # "conv" (OIHW / HWIO), "dense" ((out, in) / (in, out)) or "same"
    flat_hwc: tuple[int, int, int] | None = None  # a dense layer's input, as the Flatten before it saw it

    def torch_shape(self) -> tuple[int, ...]:
        s = tuple(self.variable.shape)
        if self.kind == "conv":
            return (s[3], s[2], s[0], s[1])
        return (s[1], s[0]) if self.kind == "dense" else s

    def to_jax(self, w: np.ndarray) -> np.ndarray:
        if self.kind == "conv":
            return w.transpose(2, 3, 1, 0)
        if self.kind == "dense" and self.flat_hwc:
            h, wd, c = self.flat_hwc
            return w.reshape(-1, c, h, wd).transpose(2, 3, 1, 0).reshape(h * wd * c, -1)
        return w.T if self.kind == "dense" else w

    def to_torch(self, k: np.ndarray) -> np.ndarray:
        if self.kind == "conv":
            return k.transpose(3, 2, 0, 1)
        if self.kind == "dense" and self.flat_hwc:
            h, wd, c = self.flat_hwc
            return k.reshape(h, wd, c, -1).transpose(3, 2, 0, 1).reshape(-1, c * h * wd)
        return k.T if self.kind == "dense" else k


def _is_torchvision(model) -> bool:
    return isinstance(model, ResNet) and isinstance(model.net.layers[1].layers[0], (BasicBlock, Bottleneck))


def _d2l_names(model, net: nnx.Sequential) -> list[str]:
    """The PyTorch names of net's layers: d2l numbers nn.Sequential's, but add_module's are named."""
    n = len(net.layers)
    if isinstance(model, ResNet):
        return ["0", *(f"b{i}" for i in range(2, n)), "last"]
    if isinstance(model, AnyNet):
        return ["0", *(f"stage{i}" for i in range(1, n - 1)), "head"]
    if isinstance(model, DenseNet):
        names, dense = ["0"], 0
        for layer in net.layers[1:-1]:
            dense += isinstance(layer, DenseBlock)
            names.append(f"dense_blk{dense}" if isinstance(layer, DenseBlock) else f"tran_blk{dense}")
        return [*names, "last"]
    return [str(i) for i in range(n)]


def _torch_prefix(path, top_names: list[str] | None, n: int) -> str:
    """The PyTorch name of the module at graph path (net.layers[1].layers[0].conv1 -> net.b2.0.conv1).

    top_names: the d2l names of net's n layers; None for torchvision's ResNet.
    """
    keys = [str(k) for k in path if k != "layers"]
    head, keys = (["net"], keys[1:]) if keys[0] == "net" else ([], keys)  # a model's .net, or a bare Sequential
    top, rest = int(keys[0]), keys[1:]
    if top_names is not None:
        return ".".join([*head, top_names[top], *rest])
    # torchvision: conv1, bn1 (the stem), layer1..layer4 (the stages), fc (the head's dense layer).
    if top == 0:
        return {"0": "conv1", "1": "bn1"}[rest[0]]
    return "fc" if top == n - 1 else ".".join([f"layer{top}", *rest])


def _flattened_inputs(fn: str, model) -> dict[str, tuple[int, int, int]]:
    """{name: (H, W, C)} of each dense layer fed straight by a Flatten of an H x W > 1 map."""
    size = getattr(model, "image_size", None)
    if size is None:  # a model of any size must pool globally before flattening: then H = W = 1
        for _, node in nnx.iter_graph(model):
            if isinstance(node, nnx.Sequential):
                for before, layer in itertools.pairwise(node.layers):
                    if isinstance(layer, layers.Flatten) and not isinstance(before, layers.GlobalAvgPool2D):
                        raise ValueError(f"{fn}: a Flatten after {type(before).__name__} needs model.image_size")
        return {}
    calls = _trace_layers(model, (1, size, size, model.in_channels), (layers.Flatten, nnx.Linear, layers.Conv2D))
    found = {}
    for (_, before, x_shape, _), (name, layer, _, _) in itertools.pairwise(calls):
        spatial = len(x_shape) == 4 and x_shape[1] * x_shape[2] > 1
        if isinstance(before, layers.Flatten) and isinstance(layer, nnx.Linear) and spatial:
            found[name] = tuple(x_shape[1:])
    return found


def _slots(fn: str, model) -> list[_Slot]:
    """Every parameter and running statistic of the model, with its PyTorch key, in graph order."""
    net = sequential_net(fn, model)
    top_names = None if _is_torchvision(model) else _d2l_names(model, net)
    flat = _flattened_inputs(fn, model)
    slots = []
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, (layers.Conv2D, nnx.Linear, layers.BatchNorm, nnx.BatchNorm)):
            continue
        prefix, name = _torch_prefix(path, top_names, len(net.layers)), _name(path)
        if isinstance(node, (layers.BatchNorm, nnx.BatchNorm)):
            attrs = _BATCH_NORM.items()
        else:
            attrs = [("kernel", "weight")] + ([("bias", "bias")] if node.bias is not None else [])
        for attr, torch_attr in attrs:
            if attr == "kernel":
                kind = "conv" if isinstance(node, layers.Conv2D) else "dense"
            else:
                kind = "same"
            where = f"{type(node).__name__} {name}.{attr}"
            slots.append(_Slot(f"{prefix}.{torch_attr}", getattr(node, attr), where, kind, flat.get(name)))
    covered = {id(s.variable) for s in slots}
    for path, variable in nnx.iter_graph(model):
        if isinstance(variable, (nnx.Param, nnx.BatchStat)) and id(variable) not in covered:  # a layer we can't name
            raise ValueError(f"{fn}: no PyTorch name for {'.'.join(map(str, path))} of {type(model).__name__}")
    return slots


def _numpy(value) -> np.ndarray:
    """A torch tensor (read without importing torch) or anything NumPy takes, as a NumPy array."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        value = value.float() if str(value.dtype) == "torch.bfloat16" else value  # NumPy has no bfloat16
        return value.numpy()
    return np.asarray(value)


def load_torch_state_dict(model: nnx.Module, state_dict) -> None:
    """Copies a PyTorch state_dict (torch tensors or NumPy arrays) into model, in place.

    model: a registered model built to match (same num_classes, in_channels,
    image_size where its dense layers depend on it); an abstract one
    (nnx.eval_shape) works too and becomes concrete. Every key must be there
    (num_batches_tracked may be), none other, each with PyTorch's shape for
    its tensor; otherwise ValueError names the first key that does not fit,
    and the model is left as it was. Values are cast to the model's dtypes.
    """
    fn = "load_torch_state_dict"
    if not hasattr(state_dict, "keys"):
        raise ValueError(f"{fn}: state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    slots = _slots(fn, model)
    for slot in slots:
        if slot.key not in state_dict:
            first = next(iter(state_dict), None)
            raise ValueError(
                f"{fn}: missing key {slot.key!r} (the model's {slot.where}); the state_dict's first key is {first!r}"
            )
    expected = {s.key for s in slots}
    batch_norms = {s.key.rsplit(".", 1)[0] for s in slots if s.key.endswith(".running_mean")}
    for key in state_dict:
        tracked = key.endswith(".num_batches_tracked") and key.rsplit(".", 1)[0] in batch_norms
        if key not in expected and not tracked:
            raise ValueError(f"{fn}: unexpected key {key!r}: {type(model).__name__} has no such tensor")
    arrays = {}
    for slot in slots:
        value = _numpy(state_dict[slot.key])
        if value.shape != slot.torch_shape():
            raise ValueError(
                f"{fn}: {slot.key!r} has shape {value.shape}, expected {slot.torch_shape()} "
                f"for the model's {slot.where} of shape {tuple(slot.variable.shape)}"
            )
        arrays[slot.key] = value
    for slot in slots:
        slot.variable.set_value(jnp.asarray(slot.to_jax(arrays[slot.key]), dtype=slot.variable.dtype))


def to_torch_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's parameters and running statistics as a PyTorch state_dict of NumPy arrays.

    Keys and shapes are those `load_torch_state_dict` reads, plus a
    num_batches_tracked of 0 per BatchNorm, as torch's BatchNorm has one.
    """
    fn = "to_torch_state_dict"
    result = {}
    for slot in _slots(fn, model):
        value = slot.variable.get_value()
        if not hasattr(value, "__array__"):
            raise ValueError(f"{fn}: the model is abstract (nnx.eval_shape): {slot.where} has no values")
        result[slot.key] = np.array(slot.to_torch(np.asarray(value)), order="C")  # a writable copy, as torch wants
        if slot.key.endswith(".running_var"):
            result[slot.key.replace(".running_var", ".num_batches_tracked")] = np.array(0, dtype=np.int64)
    return result
