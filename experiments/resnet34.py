"""ResNet-34 in torchvision's layout, trained as the chapter trains ResNet-18: 96x96, SGD lr 0.01."""

from experiments import runner


def main(argv=None) -> int:
    return runner.main("resnet34", "resnet34", argv=argv)


if __name__ == "__main__":
    runner.run_command(main)
