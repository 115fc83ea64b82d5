"""ResNet-18 as the ResNet chapter trains it: 96x96 inputs, SGD lr 0.01, batch 128, 10 epochs."""

from experiments import runner


def main(argv=None) -> int:
    return runner.main("resnet", "resnet18", argv=argv)


if __name__ == "__main__":
    runner.run_command(main)
