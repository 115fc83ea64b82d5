"""LeNet-5 as the LeNet chapter trains it: sigmoid, average pooling, SGD lr 0.1, batch 128, 10 epochs.

    python -m experiments.lenet --accelerator gpu          # the chapter's run, on Fashion-MNIST
    python -m experiments.lenet --dataset mnist_10k --activation relu --pooling max --optimizer adam --lr 0.003 --schedule cosine
"""

from experiments import runner

DEFAULTS = dict(entry="lenet", title="LeNet-5", lr=0.1, optimizer="sgd", batch_size=128, epochs=10)


def flags(group):
    group.add_argument("--activation", choices=("sigmoid", "relu"), default="sigmoid",
                       help="the chapter's sigmoid, or ReLU (the exercise)")
    group.add_argument("--pooling", choices=("avg", "max"), default="avg",
                       help="the chapter's average pooling, or max pooling (the exercise)")
    group.add_argument("--batch-norm", action="store_true",
                       help="the batch-normalised LeNet of the batch-norm chapter (model lenet_bn)")


def options(args) -> dict:
    return {"model": "lenet_bn" if args.batch_norm else "lenet",
            "activation": args.activation, "pooling": args.pooling}


if __name__ == "__main__":
    raise SystemExit(runner.main("lenet", DEFAULTS, flags, options))
