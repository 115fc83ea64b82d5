"""The chapters' models by name: `create(name, ...)`, `names()`, `default_image_size(name)`, `run_defaults(name)`.

Every model maps float NHWC (N, H, W, C) to float32 logits (N, num_classes)
as `model(x, rngs=None)`, holds only nnx.Param and nnx.BatchStat state, and
is created in train mode (use model.eval() / model.train()). Its layers, in
the chapters' order, are `model.net.layers`. A block whose output adds or
concatenates several paths (Residual, Inception, DenseBlock, ...) names them
in a class attribute `branches`: per path, the attribute names along it (an
empty path, or an attribute that is None, is the identity); jaxcnn.analysis
walks them.
"""

from __future__ import annotations

import dataclasses
import inspect
from functools import partial

import jax.numpy as jnp
from flax import nnx

from jaxcnn import _checks
from jaxcnn.models.alexnet import AlexNet
from jaxcnn.models.densenet import DENSENET_ARCH, GROWTH_RATE, DenseBlock, DenseNet, transition_block
from jaxcnn.models.googlenet import GoogLeNet, Inception
from jaxcnn.models.lenet import LeNet
from jaxcnn.models.nin import NiN, nin_block
from jaxcnn.models.regnet import REGNETX32_ARCH, REGNETX32_STEM_CHANNELS, AnyNet
from jaxcnn.models.resnet import (
    RESNET18_ARCH,
    RESNET34_ARCH,
    RESNET50_ARCH,
    BasicBlock,
    Bottleneck,
    Residual,
    ResNet,
)
from jaxcnn.models.resnext import RESNEXT18_ARCH, RESNEXT18_BOT_MUL, RESNEXT18_GROUPS, ResNeXtBlock
from jaxcnn.models.vgg import VGG, VGG11_ARCH, vgg_block

__all__ = [
    "create",
    "options",
    "names",
    "default_image_size",
    "run_defaults",
    "RunDefaults",
    "LeNet",
    "AlexNet",
    "VGG",
    "vgg_block",
    "NiN",
    "nin_block",
    "GoogLeNet",
    "Inception",
    "ResNet",
    "Residual",
    "BasicBlock",
    "Bottleneck",
    "ResNeXtBlock",
    "DenseNet",
    "DenseBlock",
    "transition_block",
    "AnyNet",
]


@dataclasses.dataclass(frozen=True)
class RunDefaults:
    """How the chapter trains the model (d2l's SGD, on Fashion-MNIST at default_image_size)."""

    title: str
    lr: float
    optimizer: str = "sgd"
    batch_size: int = 128
    epochs: int = 10


@dataclasses.dataclass(frozen=True)
class _Entry:
    build: partial  # of a model class: what the name means (architecture, block)
    image_size: int  # the chapter's
    run: RunDefaults
    defaults: dict = dataclasses.field(default_factory=dict)  # option defaults that differ from the class's


_MODELS = {
    "lenet": _Entry(partial(LeNet), 28, RunDefaults("LeNet-5", 0.1)),
    "lenet_bn": _Entry(partial(LeNet, batch_norm=True), 28, RunDefaults("LeNet-5 with batch norm", 0.1)),
    "alexnet": _Entry(partial(AlexNet), 224, RunDefaults("AlexNet", 0.01)),
    # The notes train VGG-11 at a quarter width (width_divisor=4); width_divisor=1 is the full VGG-11.
    "vgg11": _Entry(partial(VGG, VGG11_ARCH), 224, RunDefaults("VGG-11", 0.01), {"width_divisor": 4}),
    "nin": _Entry(partial(NiN), 224, RunDefaults("NiN", 0.05)),
    "googlenet": _Entry(partial(GoogLeNet), 96, RunDefaults("GoogLeNet", 0.01)),
    "resnet18": _Entry(partial(ResNet, RESNET18_ARCH), 96, RunDefaults("ResNet-18", 0.01)),
    "resnext18": _Entry(
        partial(
            ResNet, RESNEXT18_ARCH, block=partial(ResNeXtBlock, groups=RESNEXT18_GROUPS, bot_mul=RESNEXT18_BOT_MUL)
        ),
        96,
        RunDefaults("ResNeXt-18", 0.01),
    ),
    "densenet": _Entry(partial(DenseNet, DENSENET_ARCH, growth_rate=GROWTH_RATE), 96, RunDefaults("DenseNet", 0.01)),
    "regnetx32": _Entry(
        partial(AnyNet, REGNETX32_ARCH, stem_channels=REGNETX32_STEM_CHANNELS), 96, RunDefaults("RegNetX-32", 0.05)
    ),
    # Not in the chapter: torchvision's layout, run as the chapter runs ResNet-18.
    "resnet34": _Entry(
        partial(ResNet, RESNET34_ARCH, block=BasicBlock, stem_bias=False), 96, RunDefaults("ResNet-34", 0.01)
    ),
    "resnet50": _Entry(
        partial(ResNet, RESNET50_ARCH, block=Bottleneck, stem_bias=False), 96, RunDefaults("ResNet-50", 0.01)
    ),
}
_COMMON = ("num_classes", "in_channels", "image_size", "rngs")


def names() -> list[str]:
    return list(_MODELS)


def _entry(fn: str, name: str) -> _Entry:
    if name not in _MODELS:
        raise ValueError(f"{fn}: unknown model {name!r}; choose one of {names()}")
    return _MODELS[name]


def default_image_size(name: str) -> int:
    """The chapter's input height and width: 28 (LeNet), 224 (AlexNet, VGG, NiN), 96 (the rest)."""
    return _entry("default_image_size", name).image_size


def run_defaults(name: str) -> RunDefaults:
    """The chapter's run of the model: title, learning rate, optimizer, batch size, epochs."""
    return _entry("run_defaults", name).run


def options(name: str) -> dict:
    """The keyword options `create(name, ...)` accepts, with their defaults."""
    entry = _entry("options", name)
    fixed = set(entry.build.keywords)  # what the name means is not an option
    params = inspect.signature(entry.build.func.__init__).parameters.values()
    found = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.name not in (*_COMMON, *fixed)}
    return found | dict(entry.defaults)


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
    entry = _entry(fn, name)
    allowed = options(name)
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise ValueError(f"{fn}: unknown option(s) {unknown} for {name!r}; allowed: {sorted(allowed)}")
    if opts.get("dtype") is not None and not jnp.issubdtype(opts["dtype"], jnp.floating):
        raise ValueError(f"{fn}: dtype must be None or a floating dtype such as jnp.bfloat16, got {opts['dtype']!r}")
    image_size = entry.image_size if image_size is None else image_size
    num_classes = _checks.positive_int(fn, "num_classes", num_classes)
    in_channels = _checks.positive_int(fn, "in_channels", in_channels)
    image_size = _checks.positive_int(fn, "image_size", image_size)
    return entry.build(
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        rngs=nnx.Rngs(seed),
        **(dict(entry.defaults) | opts),
    )
