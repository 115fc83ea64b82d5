"""ResNeXt-18 (the ResNet chapter's grouped-convolution block), trained as ResNet-18 is: 96x96, SGD lr 0.01."""

from experiments import runner


def main(argv=None) -> int:
    return runner.main("resnext", "resnext18", argv=argv)


if __name__ == "__main__":
    runner.run_command(main)
