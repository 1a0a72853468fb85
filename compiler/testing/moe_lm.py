"""A small character-level MoE language model on Python's own standard-library sources,
for the MoE passes' fidelity figures (bench/moe_fidelity.py, tests/passes/moe).

The model reads the previous ``context`` bytes, embeds them, mixes them with one Linear,
then a Mixtral-style top-2 MoE block (``moe_models.SparseMoE``) with a residual, and
predicts the next byte. It is trained with Adam (plus a load-balancing loss) for a
wall-clock budget, exported to ONNX (TorchScript exporter, dynamic token count), and
perplexity is measured with ONNX Runtime on held-out text: exp(mean cross-entropy) per
byte (bench/moe_fidelity.py).
"""

from __future__ import annotations

import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kiln.compiler.testing.moe_models import SparseMoE

VOCAB = 256
#: weight of the load-balancing loss (without it the router collapses onto a few experts)
BALANCE_WEIGHT = 0.01


def stdlib_corpus(max_bytes: int = 2_000_000, seed: int = 0) -> bytes:
    """Python sources of the installed standard library (top-level modules, sorted, then
    shuffled by file with ``seed``), joined, up to ``max_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    order = np.random.default_rng(seed).permutation(len(files))
    out = bytearray()
    for i in order:
        out += files[i].read_bytes() + b"\n"
        if len(out) >= max_bytes:
            break
    return bytes(out[:max_bytes])


class CharMoeLM(nn.Module):
    def __init__(self, context: int = 16, embed: int = 16, dim: int = 64, hidden: int = 128,
                 experts: int = 8, k: int = 2) -> None:
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(VOCAB, embed)
        self.mix = nn.Linear(context * embed, dim)
        self.moe = SparseMoE(dim, hidden, experts, k)
        self.head = nn.Linear(dim, VOCAB)

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.mix(self.embed(ids).reshape(ids.shape[0], -1)))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.hidden(ids)
        return self.head(h + self.moe(h))

    def balance_loss(self, ids: torch.Tensor) -> torch.Tensor:
        """Switch-Transformer load balancing: E * sum_e f_e P_e (f: share of top-k
        choices, P: mean router probability); 1 when routing is uniform."""
        probs = torch.softmax(self.moe.gate(self.hidden(ids)), dim=-1)
        chosen = torch.topk(probs, self.moe.k, dim=-1).indices
        f = torch.zeros(probs.shape[1]).index_add(0, chosen.reshape(-1),
                                                  torch.ones(chosen.numel())) / chosen.numel()
        return probs.shape[1] * torch.sum(f * probs.mean(dim=0))


def windows(data: bytes, context: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs [N, context] int64, next bytes [N] int64) for every position."""
    arr = np.frombuffer(data, np.uint8).astype(np.int64)
    idx = np.arange(context)[None, :] + np.arange(len(arr) - context)[:, None]
    return arr[idx], arr[context:]


@dataclass
class Trained:
    model: CharMoeLM
    steps: int
    seconds: float
    train_text: bytes
    test_text: bytes
    threads: int = 1               # torch's intra-op threads while training


def train(seconds: float = 60.0, *, batch: int = 256, seed: int = 0, max_bytes: int = 2_000_000,
          test_bytes: int = 20_000, steps: int | None = None, threads: int = 1,
          **sizes) -> Trained:
    """Train for ``seconds`` of wall clock (at least 10 steps), or exactly ``steps`` steps
    (repeatable on any machine, however busy), on the corpus minus its last ``test_bytes``.

    With ``threads`` torch threads (restored after): the model is small, and with 2 threads
    on a busy 2-core machine each step waited for cores (0.9 vs 31 steps/s with 1 thread,
    load 8), so a minute trained 52 steps instead of about 2000."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _train(seconds, batch, seed, max_bytes, test_bytes, steps, sizes)
    finally:
        torch.set_num_threads(previous)


def _train(seconds: float, batch: int, seed: int, max_bytes: int, test_bytes: int,
           steps: int | None, sizes: dict) -> Trained:
    torch.manual_seed(seed)
    data = stdlib_corpus(max_bytes, seed)
    train_text, test_text = data[:-test_bytes], data[-test_bytes:]
    model = CharMoeLM(**sizes)
    x, y = windows(train_text, model.context)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    budget, steps = steps, 0
    while (steps < budget) if budget is not None else \
            (steps < 10 or time.perf_counter() - start < seconds):
        pick = torch.from_numpy(rng.integers(0, len(xs), batch))
        loss = nn.functional.cross_entropy(model(xs[pick]), ys[pick]) \
            + BALANCE_WEIGHT * model.balance_loss(xs[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    model.eval()
    return Trained(model, steps, time.perf_counter() - start, train_text, test_text,
                   torch.get_num_threads())


def export(trained: Trained, path: str | Path) -> Path:
    model = trained.model
    ids = torch.zeros(8, model.context, dtype=torch.int64)
    torch.onnx.export(model, (ids,), str(path), dynamo=False, input_names=["ids"],
                      output_names=["logits"], dynamic_axes={"ids": {0: "tokens"}},
                      opset_version=17)
    return Path(path)
