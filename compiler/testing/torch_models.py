"""Small PyTorch models used by tests and bench (each returns (module, example_inputs)).

They are also valid ``MODULE:CALLABLE`` frontends for ``kiln compile``:
``kiln compile kiln.compiler.testing.torch_models:cnn_with_batchnorm``.
Importing this module imports torch (the ``torch`` extra).
"""

from __future__ import annotations

import torch
from torch import nn


class ConvBNNet(nn.Module):
    """A small CNN with Conv -> BatchNorm -> ReLU stages and a Linear head."""

    def __init__(self, channels: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1),
                                   nn.BatchNorm2d(2 * channels), nn.ReLU())
        self.head = nn.Linear(2 * channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(self.stem(x))
        return self.head(y.mean(dim=(2, 3)))


def _randomize_batchnorm(model: nn.Module, seed: int) -> None:
    """Give BatchNorm layers non-trivial statistics so folding is really tested."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            module.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
            module.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            module.weight.data.copy_(torch.randn(c, generator=gen))
            module.bias.data.copy_(torch.randn(c, generator=gen))


def cnn_with_batchnorm():
    torch.manual_seed(0)
    model = ConvBNNet().eval()
    _randomize_batchnorm(model, seed=1)
    return model, (torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)),)


class Encoder(nn.Module):
    """A transformer encoder (pre-norm blocks of attention + MLP)."""

    def __init__(self, d_model: int = 256, heads: int = 4, layers: int = 4, ffn: int = 1024) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model, heads, ffn, dropout=0.0, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.layers(x))


def encoder(seq: int = 128, d_model: int = 256, layers: int = 4):
    """The 4-layer d=256 encoder of the bench (seq 128)."""
    torch.manual_seed(0)
    model = Encoder(d_model=d_model, layers=layers).eval()
    return model, (torch.randn(1, seq, d_model, generator=torch.Generator().manual_seed(3)),)


def small_encoder():
    """A 1-layer d=64 encoder, fast enough for every default test run."""
    return encoder(seq=16, d_model=64, layers=1)
