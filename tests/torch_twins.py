"""PyTorch twins of the registered models, for tests/test_interop.py (test code; imports torch).

The chapter models are the PyTorch edition of d2l's code (d2l.ai, chapters 7.6 and 8), lazy
layers and module names included, without d2l's Classifier; ResNet-34/50 are torchvision's
layout, written out here because torchvision's wheel may not import beside a CPU-only torch.
Where jaxcnn's registry entry differs from the book's code, the twin says how.
"""

import torch
from torch import nn
from torch.nn import functional as F

# --------------------------------------------------------------------------
# LeNet (7.6) and BNLeNet (8.5)


def lenet(num_classes=10):
    return nn.Sequential(
        nn.LazyConv2d(6, kernel_size=5, padding=2), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.LazyConv2d(16, kernel_size=5), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Flatten(),
        nn.LazyLinear(120), nn.Sigmoid(),
        nn.LazyLinear(84), nn.Sigmoid(),
        nn.LazyLinear(num_classes))  # fmt: skip


def bn_lenet(num_classes=10):
    """d2l's BNLeNet, but with LeNet's padding 2 on the first conv, as jaxcnn's lenet_bn."""
    return nn.Sequential(
        nn.LazyConv2d(6, kernel_size=5, padding=2), nn.LazyBatchNorm2d(),
        nn.Sigmoid(), nn.AvgPool2d(kernel_size=2, stride=2),
        nn.LazyConv2d(16, kernel_size=5), nn.LazyBatchNorm2d(),
        nn.Sigmoid(), nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Flatten(), nn.LazyLinear(120), nn.LazyBatchNorm1d(),
        nn.Sigmoid(), nn.LazyLinear(84), nn.LazyBatchNorm1d(),
        nn.Sigmoid(), nn.LazyLinear(num_classes))  # fmt: skip


# --------------------------------------------------------------------------
# AlexNet (8.1), VGG (8.2), NiN (8.3)


def alexnet(num_classes=10):
    return nn.Sequential(
        nn.LazyConv2d(96, kernel_size=11, stride=4, padding=1),
        nn.ReLU(), nn.MaxPool2d(kernel_size=3, stride=2),
        nn.LazyConv2d(256, kernel_size=5, padding=2), nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.LazyConv2d(384, kernel_size=3, padding=1), nn.ReLU(),
        nn.LazyConv2d(384, kernel_size=3, padding=1), nn.ReLU(),
        nn.LazyConv2d(256, kernel_size=3, padding=1), nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2), nn.Flatten(),
        nn.LazyLinear(4096), nn.ReLU(), nn.Dropout(p=0.5),
        nn.LazyLinear(4096), nn.ReLU(), nn.Dropout(p=0.5),
        nn.LazyLinear(num_classes))  # fmt: skip


def vgg_block(num_convs, out_channels):
    layers = []
    for _ in range(num_convs):
        layers.append(nn.LazyConv2d(out_channels, kernel_size=3, padding=1))
        layers.append(nn.ReLU())
    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers)


def vgg(arch=((1, 16), (1, 32), (2, 64), (2, 128), (2, 128)), num_classes=10):
    """The arch d2l trains: VGG-11 at a quarter width (jaxcnn's vgg11 default)."""
    return nn.Sequential(
        *(vgg_block(*b) for b in arch), nn.Flatten(),
        nn.LazyLinear(4096), nn.ReLU(), nn.Dropout(0.5),
        nn.LazyLinear(4096), nn.ReLU(), nn.Dropout(0.5),
        nn.LazyLinear(num_classes))  # fmt: skip


def nin_block(out_channels, kernel_size, strides, padding):
    return nn.Sequential(
        nn.LazyConv2d(out_channels, kernel_size, strides, padding), nn.ReLU(),
        nn.LazyConv2d(out_channels, kernel_size=1), nn.ReLU(),
        nn.LazyConv2d(out_channels, kernel_size=1), nn.ReLU())  # fmt: skip


def nin(num_classes=10):
    return nn.Sequential(
        nin_block(96, kernel_size=11, strides=4, padding=0),
        nn.MaxPool2d(3, stride=2),
        nin_block(256, kernel_size=5, strides=1, padding=2),
        nn.MaxPool2d(3, stride=2),
        nin_block(384, kernel_size=3, strides=1, padding=1),
        nn.MaxPool2d(3, stride=2),
        nn.Dropout(0.5),
        nin_block(num_classes, kernel_size=3, strides=1, padding=1),
        nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten(),
    )


# --------------------------------------------------------------------------
# GoogLeNet (8.4)


class Inception(nn.Module):
    def __init__(self, c1, c2, c3, c4):
        super().__init__()
        self.b1_1 = nn.LazyConv2d(c1, kernel_size=1)
        self.b2_1 = nn.LazyConv2d(c2[0], kernel_size=1)
        self.b2_2 = nn.LazyConv2d(c2[1], kernel_size=3, padding=1)
        self.b3_1 = nn.LazyConv2d(c3[0], kernel_size=1)
        self.b3_2 = nn.LazyConv2d(c3[1], kernel_size=5, padding=2)
        self.b4_1 = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)
        self.b4_2 = nn.LazyConv2d(c4, kernel_size=1)

    def forward(self, x):
        b1 = F.relu(self.b1_1(x))
        b2 = F.relu(self.b2_2(F.relu(self.b2_1(x))))
        b3 = F.relu(self.b3_2(F.relu(self.b3_1(x))))
        b4 = F.relu(self.b4_2(self.b4_1(x)))
        return torch.cat((b1, b2, b3, b4), dim=1)


def googlenet(num_classes=10):
    b1 = nn.Sequential(
        nn.LazyConv2d(64, kernel_size=7, stride=2, padding=3),
        nn.ReLU(), nn.MaxPool2d(kernel_size=3, stride=2, padding=1))  # fmt: skip
    b2 = nn.Sequential(
        nn.LazyConv2d(64, kernel_size=1), nn.ReLU(),
        nn.LazyConv2d(192, kernel_size=3, padding=1), nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1))  # fmt: skip
    b3 = nn.Sequential(
        Inception(64, (96, 128), (16, 32), 32),
        Inception(128, (128, 192), (32, 96), 64),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    )
    b4 = nn.Sequential(
        Inception(192, (96, 208), (16, 48), 64),
        Inception(160, (112, 224), (24, 64), 64),
        Inception(128, (128, 256), (24, 64), 64),
        Inception(112, (144, 288), (32, 64), 64),
        Inception(256, (160, 320), (32, 128), 128),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    )
    b5 = nn.Sequential(
        Inception(256, (160, 320), (32, 128), 128),
        Inception(384, (192, 384), (48, 128), 128),
        nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten())  # fmt: skip
    return nn.Sequential(b1, b2, b3, b4, b5, nn.LazyLinear(num_classes))


# --------------------------------------------------------------------------
# ResNet and ResNeXt (8.6), DenseNet (8.7), AnyNet / RegNetX-32 (8.8)


class Residual(nn.Module):
    def __init__(self, num_channels, use_1x1conv=False, strides=1):
        super().__init__()
        self.conv1 = nn.LazyConv2d(num_channels, kernel_size=3, padding=1, stride=strides)
        self.conv2 = nn.LazyConv2d(num_channels, kernel_size=3, padding=1)
        self.conv3 = nn.LazyConv2d(num_channels, kernel_size=1, stride=strides) if use_1x1conv else None
        self.bn1 = nn.LazyBatchNorm2d()
        self.bn2 = nn.LazyBatchNorm2d()

    def forward(self, X):
        Y = F.relu(self.bn1(self.conv1(X)))
        Y = self.bn2(self.conv2(Y))
        if self.conv3:
            X = self.conv3(X)
        Y += X
        return F.relu(Y)


class ResNeXtBlock(nn.Module):
    def __init__(self, num_channels, groups, bot_mul, use_1x1conv=False, strides=1):
        super().__init__()
        bot_channels = round(num_channels * bot_mul)
        self.conv1 = nn.LazyConv2d(bot_channels, kernel_size=1, stride=1)
        self.conv2 = nn.LazyConv2d(
            bot_channels, kernel_size=3, stride=strides, padding=1, groups=bot_channels // groups
        )
        self.conv3 = nn.LazyConv2d(num_channels, kernel_size=1, stride=1)
        self.bn1 = nn.LazyBatchNorm2d()
        self.bn2 = nn.LazyBatchNorm2d()
        self.bn3 = nn.LazyBatchNorm2d()
        if use_1x1conv:
            self.conv4 = nn.LazyConv2d(num_channels, kernel_size=1, stride=strides)
            self.bn4 = nn.LazyBatchNorm2d()
        else:
            self.conv4 = None

    def forward(self, X):
        Y = F.relu(self.bn1(self.conv1(X)))
        Y = F.relu(self.bn2(self.conv2(Y)))
        Y = self.bn3(self.conv3(Y))
        if self.conv4:
            X = self.bn4(self.conv4(X))
        return F.relu(Y + X)


class ResNet(nn.Module):
    """d2l's ResNet; `residual(num_channels, use_1x1conv, strides)` builds a block (ResNeXt-18 passes
    ResNeXtBlocks: d2l builds the block but trains no ResNeXt, and jaxcnn's resnext18 puts it in ResNet-18)."""

    def __init__(self, arch=((2, 64), (2, 128), (2, 256), (2, 512)), num_classes=10, residual=Residual):
        super().__init__()
        self.net = nn.Sequential(
            nn.Sequential(
                nn.LazyConv2d(64, kernel_size=7, stride=2, padding=3),
                nn.LazyBatchNorm2d(),
                nn.ReLU(),
                nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            )
        )
        for i, (num_residuals, num_channels) in enumerate(arch):
            blk = []
            for j in range(num_residuals):
                if j == 0 and i > 0:
                    blk.append(residual(num_channels, use_1x1conv=True, strides=2))
                else:
                    blk.append(residual(num_channels))
            self.net.add_module(f"b{i + 2}", nn.Sequential(*blk))
        self.net.add_module(
            "last", nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.LazyLinear(num_classes))
        )

    def forward(self, X):
        return self.net(X)


def resnext18(num_classes=10):
    return ResNet(num_classes=num_classes, residual=lambda c, **kw: ResNeXtBlock(c, 16, 1, **kw))


def conv_block(num_channels):
    return nn.Sequential(nn.LazyBatchNorm2d(), nn.ReLU(), nn.LazyConv2d(num_channels, kernel_size=3, padding=1))


class DenseBlock(nn.Module):
    def __init__(self, num_convs, num_channels):
        super().__init__()
        self.net = nn.Sequential(*(conv_block(num_channels) for _ in range(num_convs)))

    def forward(self, X):
        for blk in self.net:
            Y = blk(X)
            X = torch.cat((X, Y), dim=1)
        return X


def transition_block(num_channels):
    return nn.Sequential(
        nn.LazyBatchNorm2d(), nn.ReLU(),
        nn.LazyConv2d(num_channels, kernel_size=1),
        nn.AvgPool2d(kernel_size=2, stride=2))  # fmt: skip


class DenseNet(nn.Module):
    def __init__(self, num_channels=64, growth_rate=32, arch=(4, 4, 4, 4), num_classes=10):
        super().__init__()
        self.net = nn.Sequential(
            nn.Sequential(
                nn.LazyConv2d(64, kernel_size=7, stride=2, padding=3),
                nn.LazyBatchNorm2d(),
                nn.ReLU(),
                nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            )
        )
        for i, num_convs in enumerate(arch):
            self.net.add_module(f"dense_blk{i + 1}", DenseBlock(num_convs, growth_rate))
            num_channels += num_convs * growth_rate
            if i != len(arch) - 1:
                num_channels //= 2
                self.net.add_module(f"tran_blk{i + 1}", transition_block(num_channels))
        self.net.add_module(
            "last",
            nn.Sequential(
                nn.LazyBatchNorm2d(), nn.ReLU(), nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.LazyLinear(num_classes)
            ),
        )

    def forward(self, X):
        return self.net(X)


class AnyNet(nn.Module):
    def __init__(self, arch, stem_channels, num_classes=10):
        super().__init__()
        self.net = nn.Sequential(
            nn.Sequential(
                nn.LazyConv2d(stem_channels, kernel_size=3, stride=2, padding=1), nn.LazyBatchNorm2d(), nn.ReLU()
            )
        )
        for i, (depth, num_channels, groups, bot_mul) in enumerate(arch):
            blk = [
                ResNeXtBlock(num_channels, groups, bot_mul, use_1x1conv=True, strides=2)
                if j == 0
                else ResNeXtBlock(num_channels, groups, bot_mul)
                for j in range(depth)
            ]
            self.net.add_module(f"stage{i + 1}", nn.Sequential(*blk))
        self.net.add_module(
            "head", nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.LazyLinear(num_classes))
        )

    def forward(self, X):
        return self.net(X)


def regnetx32(num_classes=10):
    return AnyNet(((4, 32, 16, 1), (6, 80, 16, 1)), 32, num_classes)


# --------------------------------------------------------------------------
# torchvision's ResNet (torchvision/models/resnet.py, v1.5), names and all


def conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class TorchvisionResNet(nn.Module):
    def __init__(self, block, layers, num_classes=1000, in_channels=3):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride), nn.BatchNorm2d(planes * block.expansion)
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet34(num_classes=10, in_channels=1):
    return TorchvisionResNet(BasicBlock, [3, 4, 6, 3], num_classes, in_channels)


def resnet50(num_classes=10, in_channels=1):
    return TorchvisionResNet(Bottleneck, [3, 4, 6, 3], num_classes, in_channels)


class Classifier(nn.Module):
    """What d2l.Classifier keeps of a model: its layers as .net, hence the keys net.0.weight, ..."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, X):
        return self.net(X)


def classifier(make):
    return lambda **kwargs: Classifier(make(**kwargs))


# registry name -> its twin's constructor (num_classes keyword).
TWINS = {
    "lenet": classifier(lenet),
    "lenet_bn": classifier(bn_lenet),
    "vgg11": classifier(vgg),
    "resnet18": ResNet,
    "resnext18": resnext18,
    "alexnet": classifier(alexnet),
    "nin": classifier(nin),
    "googlenet": classifier(googlenet),
    "densenet": DenseNet,
    "regnetx32": regnetx32,
    "resnet34": resnet34,
    "resnet50": resnet50,
}


def build(name: str, image_size: int, *, in_channels: int = 1, num_classes: int = 10, seed: int = 0) -> nn.Module:
    """The twin in eval mode, its lazy layers materialised at image_size, every parameter and
    BatchNorm statistic drawn at random (statistics too, so that loading them is tested)."""
    torch.manual_seed(seed)
    kwargs = {"in_channels": in_channels} if name in ("resnet34", "resnet50") else {}
    model = TWINS[name](num_classes=num_classes, **kwargs).eval()  # eval: BatchNorm1d takes a batch of 1
    with torch.no_grad():
        model(torch.zeros(1, in_channels, image_size, image_size))  # materialise the lazy layers
        for key, t in model.state_dict().items():
            if key.endswith("num_batches_tracked"):
                continue
            if key.endswith("running_var"):
                t.uniform_(0.5, 2.0)
            elif t.ndim > 1:  # conv and dense weights: fan-in scaled, so the logits stay O(1)
                t.normal_(0.0, (2.0 / t[0].numel()) ** 0.5)
            else:  # biases, BatchNorm scales, shifts and running means
                t.normal_(0.0, 0.5)
    return model
