"""Small PyTorch models for the reparameterization passes (each returns (module, inputs)).

A RepVGG block (3x3 + 1x1 + identity branches, each with BatchNorm), a Linear wrapped
with a LoRA adapter (optionally gated per rank, SoRA-style) and weight-normalized
layers. They are ``MODULE:CALLABLE`` frontends for ``kiln compile`` too. Importing this
module imports torch.
"""

from __future__ import annotations

import torch
from torch import nn


def _randomize_batchnorm(model: nn.Module, seed: int) -> None:
    """Train-mode statistics that are not the identity (random running mean/var, affine)."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            module.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
            module.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            module.weight.data.copy_(torch.randn(c, generator=gen))
            module.bias.data.copy_(torch.randn(c, generator=gen))


class RepVGGBlock(nn.Module):
    """RepVGG training-time block: BN(conv3x3 x) + BN(conv1x1 x) [+ BN(x)], then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1,
                 identity: bool = True) -> None:
        super().__init__()
        self.dense = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False),
                                   nn.BatchNorm2d(cout))
        self.one = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, 0, groups=groups, bias=False),
                                 nn.BatchNorm2d(cout))
        self.identity = nn.BatchNorm2d(cin) if identity and cin == cout and stride == 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dense(x) + self.one(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return torch.relu(y)


def repvgg_blocks(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Three RepVGG blocks: 8->8 with identity, 8->8 grouped (4 groups), 8->16 stride 2."""
    torch.manual_seed(seed)
    model = nn.Sequential(RepVGGBlock(8, 8), RepVGGBlock(8, 8, groups=4),
                          RepVGGBlock(8, 16, stride=2))
    _randomize_batchnorm(model, seed + 1)
    return model.eval(), (torch.randn(1, 8, 12, 12),)


class LoRALinear(nn.Module):
    """``base(x) + scaling * B(gate * A(x))`` (peft's LoRA layer; gate: SoRA's rank gate)."""

    def __init__(self, cin: int, cout: int, rank: int, alpha: float, *,
                 gate: torch.Tensor | None = None) -> None:
        super().__init__()
        self.base_layer = nn.Linear(cin, cout)
        self.lora_A = nn.Linear(cin, rank, bias=False)
        self.lora_B = nn.Linear(rank, cout, bias=False)
        nn.init.normal_(self.lora_B.weight, std=0.2)  # a trained adapter is not zero
        self.scaling = alpha / rank
        self.gate = None if gate is None else nn.Parameter(gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lora_A(x)
        if self.gate is not None:
            h = h * self.gate
        return self.base_layer(x) + self.lora_B(h) * self.scaling


class LoRAMLP(nn.Module):
    def __init__(self, gated: bool) -> None:
        super().__init__()
        gate = torch.tensor([1.0, 0.0, 0.5, 0.0]) if gated else None
        self.fc1 = LoRALinear(16, 32, rank=4, alpha=8.0, gate=gate)
        self.fc2 = LoRALinear(32, 8, rank=4, alpha=4.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def lora_mlp(seed: int = 0, gated: bool = False) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Two LoRA-wrapped Linear layers on a [2, 5, 16] input (fc1 gated when ``gated``)."""
    torch.manual_seed(seed)
    return LoRAMLP(gated).eval(), (torch.randn(2, 5, 16),)


class LoRAConv(nn.Module):
    """peft's Conv LoRA: ``base(x) + scaling * B(A(x))``, A a 3x3 Conv to r channels, B 1x1."""

    def __init__(self, cin: int, cout: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.base_layer = nn.Conv2d(cin, cout, 3, padding=1)
        self.lora_A = nn.Conv2d(cin, rank, 3, padding=1, bias=False)
        self.lora_B = nn.Conv2d(rank, cout, 1, bias=False)
        nn.init.normal_(self.lora_B.weight, std=0.2)
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling


def lora_conv(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """One Conv LoRA layer (4 -> 8 channels, rank 2) on a [1, 4, 8, 8] input."""
    torch.manual_seed(seed)
    return LoRAConv(4, 8, rank=2, alpha=4.0).eval(), (torch.randn(1, 4, 8, 8),)


def plain_mlp(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """``fc2(relu(fc1 x))`` with fc1 16->32, fc2 32->8: the base of a safetensors adapter."""
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(16, 32))
    model.add_module("act", nn.ReLU())
    model.add_module("fc2", nn.Linear(32, 8))
    return model.eval(), (torch.randn(2, 5, 16),)


def weight_norm_net(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A Conv and a Linear under ``parametrizations.weight_norm`` (W = g v / ||v||)."""
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = weight_norm(nn.Conv2d(3, 8, 3, padding=1))
            self.fc = weight_norm(nn.Linear(8, 4))
            with torch.no_grad():  # g no longer ||v||: the parametrization matters
                self.conv.parametrizations.weight.original0.mul_(1.7)
                self.fc.parametrizations.weight.original0.mul_(0.6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))

    return Net().eval(), (torch.randn(1, 3, 8, 8),)
