"""AlexNet (the modern-CNN chapter's first network): 224x224 inputs, SGD lr 0.01, batch 128, 10 epochs."""

from experiments import runner


def main(argv=None) -> int:
    return runner.main("alexnet", "alexnet", argv=argv)


if __name__ == "__main__":
    runner.run_command(main)
