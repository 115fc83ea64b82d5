"""The notes' layer_summary: each top-level layer's output shape and parameter count."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcnn import _checks

Row = tuple[str, tuple[int, ...], int]


def sequential_net(fn: str, model) -> nnx.Sequential:
    """model.net, or model itself if an nnx.Sequential: the chapters' models hold their layers so."""
    net = getattr(model, "net", model)
    if not isinstance(net, nnx.Sequential):
        raise ValueError(f"{fn}: model must be an nnx.Sequential or have one as .net, got {type(model).__name__}")
    return net


def _layers(model) -> Sequence:
    """The model's layers in the chapters' order."""
    return sequential_net("summary", model).layers


def _name(layer) -> str:
    return type(layer).__name__ if isinstance(layer, nnx.Module) else getattr(layer, "__name__", repr(layer))


def _param_count(layer) -> int:
    if not isinstance(layer, nnx.Module):
        return 0  # an activation function
    return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(layer, nnx.Param)))


def summary(model: nnx.Module, input_shape: Sequence[int], *, print_table: bool = True) -> list[Row]:
    """Rows (layer name, output shape, #params) for an input of input_shape (NHWC), and prints them.

    Shapes come from jax.eval_shape in eval mode, so nothing is computed and
    the model (which may itself be abstract, from nnx.eval_shape) is left as is.
    """
    input_shape = _checks.positive_ints("summary", "input_shape", input_shape)
    graphdef, state = nnx.split(model)

    def outputs(state, x):
        copy = nnx.merge(graphdef, state)
        copy.eval()
        copy(x)  # the model's own input checks
        shapes = []
        for layer in _layers(copy):
            x = layer(x)
            shapes.append(x)
        return shapes

    shapes = jax.eval_shape(outputs, state, jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32))
    rows = [(_name(layer), s.shape, _param_count(layer)) for layer, s in zip(_layers(model), shapes)]
    if print_table:
        print(_table(rows))
    return rows


def _table(rows: list[Row]) -> str:
    lines = [("layer", "output shape", "#params")]
    lines += [(name, str(shape), f"{count:,}") for name, shape, count in rows]
    lines.append(("total", "", f"{sum(r[2] for r in rows):,}"))
    widths = [max(len(line[i]) for line in lines) for i in range(3)]
    fmt = lambda line: f"{line[0]:<{widths[0]}}  {line[1]:<{widths[1]}}  {line[2]:>{widths[2]}}"
    return "\n".join(fmt(line) for line in lines)
