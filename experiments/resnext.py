"""ResNeXt-18 (the ResNet chapter's grouped-convolution block) trained as ResNet-18 is: 96x96, SGD lr 0.01, batch 128, 10 epochs."""

from experiments import runner

DEFAULTS = dict(entry="resnext", title="ResNeXt-18", lr=0.01, optimizer="sgd", batch_size=128, epochs=10)

if __name__ == "__main__":
    raise SystemExit(runner.main("resnext18", DEFAULTS))
