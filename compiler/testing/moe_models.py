"""Small PyTorch MoE layers written the usual ways, for the MoE passes' tests and bench.

- ``SparseMoE``: a Mixtral-style block (router, softmax, top-k, renormalize, a loop over
  experts that gathers the tokens routed to each (``torch.where``) and adds them back with
  ``index_add_``); ``gate="sigmoid"`` for a DeepSeek-style sigmoid gate;
- ``DenseMoE``: a softmax-gated mixture, every expert runs, weighted sum;
- ``StackedMoE``: the same over stacked ``[E, D, H]`` expert weights (batched MatMul);
- ``FeedForward``: a dense FFN block (what ``moe_upcycle`` turns into experts).

``export(module, path, tokens, dim)`` writes ONNX (``dynamo`` selects the exporter).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class Expert(nn.Module):
    def __init__(self, dim: int, hidden: int, activation: str = "relu") -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.ReLU() if activation == "relu" else nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SparseMoE(nn.Module):
    """Mixtral-style sparse block on ``[T, D]`` tokens."""

    def __init__(self, dim: int = 16, hidden: int = 32, experts: int = 4, k: int = 2,
                 activation: str = "relu", gate: str = "softmax") -> None:
        super().__init__()
        self.k = k
        self.gate_fn = torch.sigmoid if gate == "sigmoid" else (lambda t: torch.softmax(t, -1))
        self.gate = nn.Linear(dim, experts, bias=False)
        self.experts = nn.ModuleList(Expert(dim, hidden, activation) for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.gate_fn(self.gate(x))
        weights, chosen = torch.topk(probs, self.k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            y = expert(x[token]) * weights[token, slot, None]
            out = out.index_add(0, token, y)
        return out


class DenseMoE(nn.Module):
    """A softmax-gated mixture: every expert runs on every token."""

    def __init__(self, dim: int = 16, hidden: int = 32, experts: int = 4,
                 activation: str = "relu") -> None:
        super().__init__()
        self.gate = nn.Linear(dim, experts)
        self.experts = nn.ModuleList(Expert(dim, hidden, activation) for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.gate(x), dim=-1)
        out = 0
        for e, expert in enumerate(self.experts):
            out = out + probs[:, e:e + 1] * expert(x)
        return out


class StackedMoE(nn.Module):
    """A dense mixture over stacked expert weights: one batched matmul per layer."""

    def __init__(self, dim: int = 16, hidden: int = 32, experts: int = 4) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, experts)
        self.w1 = nn.Parameter(torch.randn(experts, dim, hidden) / dim ** 0.5)
        self.b1 = nn.Parameter(torch.randn(experts, 1, hidden) * 0.1)
        self.w2 = nn.Parameter(torch.randn(experts, hidden, dim) / hidden ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.gate(x), dim=-1)                  # [T, E]
        h = torch.relu(torch.matmul(x.unsqueeze(0), self.w1) + self.b1)  # [E, T, H]
        y = torch.matmul(h, self.w2)                                 # [E, T, D]
        return (y * probs.t().unsqueeze(-1)).sum(dim=0)


class FeedForward(nn.Module):
    """x + FFN(x): a dense block for ``moe_upcycle``."""

    def __init__(self, dim: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.ffn = Expert(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(x)


def export(module: nn.Module, path: str | Path, *, tokens: int = 8, dim: int = 16,
           dynamo: bool = False, seed: int = 0) -> Path:
    """Export ``module`` (eval mode) on ``[tokens, dim]`` input named ``x`` (dynamic tokens)."""
    torch.manual_seed(seed)
    module.eval()
    x = torch.randn(tokens, dim)
    path = Path(path)
    if dynamo:
        torch.onnx.export(module, (x,), path, dynamo=True, input_names=["x"], external_data=False,
                          dynamic_shapes={"x": {0: torch.export.Dim("tokens", min=2)}})
    else:
        torch.onnx.export(module, (x,), path, dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "tokens"}},
                          opset_version=17)
    return path
