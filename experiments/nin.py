"""NiN (network in network: nin_blocks and a global average pool): 224x224, SGD lr 0.05, batch 128."""

from experiments import runner


def main(argv=None) -> int:
    return runner.main("nin", "nin", argv=argv)


if __name__ == "__main__":
    runner.run_command(main)
