"""RegNetX-32 (the AnyNet design space's chapter model) as the chapter trains it: 96x96, SGD lr 0.05."""

from experiments import runner


def main(argv=None) -> int:
    return runner.main("regnet", "regnetx32", argv=argv)


if __name__ == "__main__":
    runner.run_command(main)
