"""The chapters' models by name: `create(name, ...)`, `names()`, `default_image_size(name)`.

Every model maps float NHWC (N, H, W, C) to float32 logits (N, num_classes)
as `model(x, rngs=None)`, holds only nnx.Param and nnx.BatchStat state, and
is created in train mode (use model.eval() / model.train()). Its layers, in
the chapters' order, are `model.net.layers`.
"""

from __future__ import annotations

import inspect

import jax.numpy as jnp
from flax import nnx

from jaxcnn.models.lenet import LeNet
from jaxcnn.models.resnet import RESNET18_ARCH, Residual, ResNet
from jaxcnn.models.resnext import RESNEXT18_ARCH, RESNEXT18_BOT_MUL, RESNEXT18_GROUPS, ResNeXt, ResNeXtBlock
from jaxcnn.models.vgg import VGG, VGG11_ARCH, vgg_block

__all__ = [
    "create",
    "options",
    "names",
    "default_image_size",
    "LeNet",
    "VGG",
    "vgg_block",
    "ResNet",
    "Residual",
    "ResNeXt",
    "ResNeXtBlock",
]

# name: (class, its positional arguments (what the name means), chapter image
# size, option defaults). vgg11 defaults to the quarter width the notes train
# (width_divisor=4); width_divisor=1 is the full VGG-11.
_MODELS = {
    "lenet": (LeNet, (False,), 28, {}),
    "lenet_bn": (LeNet, (True,), 28, {}),
    "vgg11": (VGG, (VGG11_ARCH,), 224, {"width_divisor": 4}),
    "resnet18": (ResNet, (RESNET18_ARCH,), 96, {}),
    "resnext18": (ResNeXt, (RESNEXT18_ARCH, RESNEXT18_GROUPS, RESNEXT18_BOT_MUL), 96, {}),
}
_COMMON = ("num_classes", "in_channels", "image_size", "rngs")


def names() -> list[str]:
    return list(_MODELS)


def _entry(fn: str, name: str):
    if name not in _MODELS:
        raise ValueError(f"{fn}: unknown model {name!r}; choose one of {names()}")
    return _MODELS[name]


def default_image_size(name: str) -> int:
    """The chapter's input height and width: 28 (LeNet), 224 (VGG), 96 (ResNet, ResNeXt)."""
    return _entry("default_image_size", name)[2]


def options(name: str) -> dict:
    """The keyword options `create(name, ...)` accepts, with their defaults."""
    cls, _, _, defaults = _entry("options", name)
    params = inspect.signature(cls.__init__).parameters.values()
    found = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.name not in _COMMON}
    return found | defaults


def create(
    name: str,
    *,
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int | None = None,
    seed: int = 0,
    **opts,
) -> nnx.Module:
    """A freshly initialised model in train mode. image_size None: the chapter's."""
    fn = "create"
    cls, args, chapter_size, defaults = _entry(fn, name)
    allowed = options(name)
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise ValueError(f"{fn}: unknown option(s) {unknown} for {name!r}; allowed: {sorted(allowed)}")
    if opts.get("dtype") is not None and not jnp.issubdtype(opts["dtype"], jnp.floating):
        raise ValueError(f"{fn}: dtype must be None or a floating dtype such as jnp.bfloat16, got {opts['dtype']!r}")
    image_size = chapter_size if image_size is None else image_size
    for arg, value in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{fn}: {arg} must be a positive int, got {value!r}")
    return cls(
        *args,
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        rngs=nnx.Rngs(seed),
        **(defaults | opts),
    )
