"""What the train-step benchmarks share: their --models specs, and the step and state as the runner builds them.

The scripts run as `python benchmarks/x.py`, which puts this directory on sys.path: `from _common import ...`.
"""

from __future__ import annotations

from jaxcnn import models, train


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


def setup(name: str, image_size: int, mesh, *, optimizer="sgd", lr=0.01, schedule="constant", **model_options):
    """(train_step, state, totals, tx, model) on `mesh`, as the runner builds them (default: the chapters' SGD)."""
    model = models.create(name, image_size=image_size, **model_options)
    train_def, _, params, batch_stats = train.split_model(model)
    tx = train.make_optimizer(optimizer, lr, total_steps=1000, schedule=schedule)
    # Replicated as the runner places them; a copy, so the step's donation leaves the model's own arrays alive.
    replicate = train.replicator(mesh)
    state = replicate(train.create_train_state(params, batch_stats, tx, seed=0))
    totals = replicate(train.zero_totals())
    return train.make_train_step(train_def, tx, mesh, image_size=image_size), state, totals, tx, model
