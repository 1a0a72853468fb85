"""A small CNN trained in seconds on scikit-learn's 8x8 digits, for accuracy tests.

``trained_cnn()`` is also a ``MODULE:CALLABLE`` frontend (returns module, example inputs).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import nn


@lru_cache(maxsize=1)
def digits_split():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None]          # [N, 1, 8, 8]
    y = data.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    return x[:1400], y[:1400], x[1400:], y[1400:]


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 64), nn.ReLU(),
                                  nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@lru_cache(maxsize=1)
def _train() -> DigitsCNN:
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # tiny batches: threads only contend
    x, y, _, _ = digits_split()
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(10):
        for i in range(0, len(xt), 64):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(xt[i:i + 64]), yt[i:i + 64])
            loss.backward()
            optimizer.step()
    torch.set_num_threads(threads)
    return model.eval()


def trained_cnn():
    x, *_ = digits_split()
    return _train(), (torch.from_numpy(x[:1]),)
