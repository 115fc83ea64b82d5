"""LeNet-5 as the LeNet chapter trains it: sigmoid, average pooling, SGD lr 0.1, batch 128, 10 epochs.

    python -m experiments.lenet --accelerator gpu          # the chapter's run, on Fashion-MNIST
    python -m experiments.lenet --dataset mnist_10k --activation relu --pooling max --optimizer adam --lr 0.003 \
        --schedule cosine
"""

from experiments import runner


def flags(group, defaults):
    group.add_argument(
        "--activation",
        choices=("sigmoid", "relu"),
        default=defaults["activation"],
        help="the chapter's sigmoid, or ReLU (the exercise)",
    )
    group.add_argument(
        "--pooling",
        choices=("avg", "max"),
        default=defaults["pooling"],
        help="the chapter's average pooling, or max pooling (the exercise)",
    )
    group.add_argument(
        "--batch-norm",
        action="store_true",
        help="the batch-normalised LeNet of the batch-norm chapter (model lenet_bn)",
    )


def options(args) -> dict:
    return {"model": "lenet_bn" if args.batch_norm else "lenet", "activation": args.activation, "pooling": args.pooling}


def main(argv=None) -> int:
    return runner.main("lenet", "lenet", flags, options, argv)


if __name__ == "__main__":
    runner.run_command(main)
