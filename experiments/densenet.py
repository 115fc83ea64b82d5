"""DenseNet (dense and transition blocks, growth 32) as the chapter trains it: 96x96, SGD lr 0.01."""

from experiments import runner


def main(argv=None) -> int:
    return runner.main("densenet", "densenet", argv=argv)


if __name__ == "__main__":
    runner.run_command(main)
