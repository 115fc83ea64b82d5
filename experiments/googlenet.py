"""GoogLeNet (Inception blocks b1..b5) as the chapter trains it: 96x96, SGD lr 0.01, batch 128."""

from experiments import runner


def main(argv=None) -> int:
    return runner.main("googlenet", "googlenet", argv=argv)


if __name__ == "__main__":
    runner.run_command(main)
