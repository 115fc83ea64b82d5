"""What the train-step benchmarks share: their --models specs, and the step and state as a run builds them.

The scripts run as `python benchmarks/x.py`, which puts this directory on sys.path: `from _common import ...`.
"""

from __future__ import annotations

from jaxcnn import models, run


def parse_model(spec: str, prog: str) -> tuple[str, int]:
    """(name, image size) of a `name[@image_size]` spec; the size defaults to the chapter's. `prog` starts errors."""
    name, _, size = spec.partition("@")
    if name not in models.names():
        raise ValueError(f"{prog}: unknown model {name!r} in --models; choose from {models.names()}")
    if not size:
        return name, models.default_image_size(name)
    if not size.isdigit() or int(size) < 1:
        raise ValueError(f"{prog}: image size in --models {spec!r} must be a positive integer")
    return name, int(size)


def setup(
    name: str,
    image_size: int,
    mesh,
    *,
    optimizer="sgd",
    lr=0.01,
    schedule="constant",
    in_channels=1,
    dtype="float32",
    **model_options,
):
    """(train_step, state, totals, tx, model) on `mesh`, built by `jaxcnn.run.create_trainer` as a run builds them.

    Default: the chapters' SGD; 1000 steps for a schedule to span; dtype "bfloat16" for bf16 compute.
    """
    config = run.RunConfig(
        model=name,
        image_size=image_size,
        optimizer=optimizer,
        lr=lr,
        schedule=schedule,
        dtype=dtype,
        epochs=1,
        model_options=model_options,
    )
    trainer = run.create_trainer(config, num_classes=10, in_channels=in_channels, steps_per_epoch=1000, mesh=mesh)
    return trainer.train_step, trainer.state, trainer.totals, trainer.tx, trainer.model
