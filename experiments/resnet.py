"""ResNet-18 as the ResNet chapter trains it: 96x96 inputs, SGD lr 0.01, batch 128, 10 epochs."""

from experiments import runner

DEFAULTS = dict(entry="resnet", title="ResNet-18", lr=0.01, optimizer="sgd", batch_size=128, epochs=10)

if __name__ == "__main__":
    raise SystemExit(runner.main("resnet18", DEFAULTS))
