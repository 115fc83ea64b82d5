"""VGG-11 as the VGG chapter trains it: a quarter of the width, 224x224 inputs, SGD lr 0.01, batch 128, 10 epochs."""

from experiments import runner


def flags(group, defaults):
    group.add_argument(
        "--width-divisor",
        type=runner._positive_int,
        default=defaults["width_divisor"],
        help="divide every layer's channels by this (the chapter trains at 4, a quarter width)",
    )


def options(args) -> dict:
    return {"width_divisor": args.width_divisor}


def main(argv=None) -> int:
    return runner.main("vgg", "vgg11", flags, options, argv)


if __name__ == "__main__":
    runner.run_command(main)
