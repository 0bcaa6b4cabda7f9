"""The two architectures. Both take pixels scaled to [0, 1] and normalise inside the graph, so the
service only divides by 255 and nothing about dataset statistics leaks into the Rust code."""

from __future__ import annotations

import torch
from torch import nn

# Fashion-MNIST training-set statistics of pixel/255.
MEAN, STD = 0.2860, 0.3530


class Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - MEAN) / STD


class DenseNet(nn.Module):
    """The reference dense net: Flatten 784 -> 256 -> 128 -> 10, with dropout added."""

    def __init__(self, dropout: float = 0.2):
        super().__init__()
        self.body = nn.Sequential(
            Normalize(), nn.Flatten(),
            nn.Linear(784, 256), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(256, 128), nn.ReLU(), nn.Dropout(dropout),
        )
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        return self.head(features), features


def _conv_block(cin: int, cout: int, convs: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*layers, nn.MaxPool2d(2), nn.Dropout(dropout))


class ConvNet(nn.Module):
    """The reference's 3 blocks of conv -> max-pool -> dropout, then dense and softmax. Improved with batch
    norm and a second conv in the first two blocks; 28 -> 14 -> 7 -> 3 spatially."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            Normalize(),
            _conv_block(1, 32, 2, 0.1),
            _conv_block(32, 64, 2, 0.2),
            _conv_block(64, 128, 1, 0.3),
            nn.Flatten(),
            nn.Linear(128 * 3 * 3, 256, bias=False), nn.BatchNorm1d(256), nn.ReLU(), nn.Dropout(0.4),
        )
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        return self.head(features), features


ARCHITECTURES = {"dense": DenseNet, "cnn": ConvNet}


class Exported(nn.Module):
    """What goes into the ONNX file: probabilities, logits (for out-of-distribution scores) and the
    penultimate features (for feature-space OOD scores such as Mahalanobis)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor):
        logits, features = self.model(image)
        return torch.softmax(logits, dim=1), logits, features


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module) -> int:
    """Multiply-accumulates per image of the conv and linear layers (everything else is noise)."""
    macs = 0

    def conv_hook(m: nn.Conv2d, _inp, out):
        nonlocal macs
        kh, kw = m.kernel_size
        macs += out.shape[1] * out.shape[2] * out.shape[3] * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, _inp, _out):
        nonlocal macs
        macs += m.in_features * m.out_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 1, 28, 28))
    model.train(was_training)
    for h in hooks:
        h.remove()
    return macs
