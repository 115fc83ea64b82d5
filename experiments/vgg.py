"""VGG-11 as the VGG chapter trains it: a quarter of the width, 224x224 inputs, SGD lr 0.01, batch 128, 10 epochs."""

from experiments import runner

DEFAULTS = dict(entry="vgg", title="VGG-11", lr=0.01, optimizer="sgd", batch_size=128, epochs=10)


def flags(group):
    group.add_argument("--width-divisor", type=runner._positive_int, default=4,
                       help="divide every layer's channels by this (the chapter trains at 4, a quarter width)")


def options(args) -> dict:
    return {"width_divisor": args.width_divisor}


if __name__ == "__main__":
    raise SystemExit(runner.main("vgg11", DEFAULTS, flags, options))
