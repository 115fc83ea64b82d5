"""ResNet-50 (torchvision's v1.5 bottlenecks), trained as the chapter trains ResNet-18: 96x96, SGD lr 0.01."""

from experiments import runner


def main(argv=None) -> int:
    return runner.main("resnet50", "resnet50", argv=argv)


if __name__ == "__main__":
    runner.run_command(main)
