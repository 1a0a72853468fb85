"""Models for magnitude pruning and sparse kernels (tests and the sparse-2of4 bench case):
an MLP trained in about a second on scikit-learn's 8x8 digits, and seeded MLPs whose
weights are 2:4 or block sparse."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper

from kiln.compiler.testing.quant_models import build, init


def mlp_from_weights(weights: Sequence[np.ndarray], biases: Sequence[np.ndarray], *,
                     batch: int | str = 1, forms: Sequence[str] | None = None) -> ir.Model:
    """x[batch, K0] -> layer_0 -> Relu -> ... -> layer_n -> y, layer i computing
    ``x @ weights[i] + biases[i]`` (weights[i] [K_i, N_i]) as ``forms[i]``:
    ``gemm`` (Gemm, B stored [N, K], transB=1), ``gemm_nt`` (Gemm, B [K, N]) or
    ``matmul`` (MatMul then Add). Default: every layer ``gemm``. Nodes are fc1, fc2, ..."""
    forms = list(forms or ["gemm"] * len(weights))
    nodes, inits, last = [], [], "x"
    for i, (w, b, form) in enumerate(zip(weights, biases, forms, strict=True), start=1):
        out = "y" if i == len(weights) else f"h{i}"
        pre = out if i == len(weights) else f"z{i}"
        if form == "gemm":
            inits += [init(f"fc{i}.weight", w.T), init(f"fc{i}.bias", b)]
            nodes.append(helper.make_node("Gemm", [last, f"fc{i}.weight", f"fc{i}.bias"], [pre],
                                          name=f"fc{i}", transB=1))
        elif form == "gemm_nt":
            inits += [init(f"fc{i}.weight", w), init(f"fc{i}.bias", b)]
            nodes.append(helper.make_node("Gemm", [last, f"fc{i}.weight", f"fc{i}.bias"], [pre],
                                          name=f"fc{i}"))
        elif form == "matmul":
            inits += [init(f"fc{i}.weight", w), init(f"fc{i}.bias", b)]
            nodes += [helper.make_node("MatMul", [last, f"fc{i}.weight"], [f"m{i}"],
                                       name=f"fc{i}"),
                      helper.make_node("Add", [f"m{i}", f"fc{i}.bias"], [pre],
                                       name=f"fc{i}_bias")]
        else:
            raise ValueError(f"unknown layer form {form!r}")
        if i < len(weights):
            nodes.append(helper.make_node("Relu", [pre], [out], name=f"relu{i}"))
        last = out
    k0, n_last = weights[0].shape[0], weights[-1].shape[1]
    return build(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                              [batch, k0])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, n_last])])


@lru_cache(maxsize=1)
def digits_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): digits flattened to 64 features in [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    return x[:1400], y[:1400], x[1400:], y[1400:]


@lru_cache(maxsize=4)
def digits_mlp_weights(hidden: tuple[int, ...] = (256, 256), seed: int = 0
                       ) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """The weights [K, N] and biases of a ReLU MLP trained on the digits (scikit-learn's
    MLPClassifier, Adam, seeded; ~97% test accuracy in a second or two)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    x, y, _, _ = digits_data()
    clf = MLPClassifier(hidden_layer_sizes=hidden, max_iter=60, random_state=seed,
                        learning_rate_init=2e-3, batch_size=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, y)
    return (tuple(w.astype(np.float32) for w in clf.coefs_),
            tuple(b.astype(np.float32) for b in clf.intercepts_))


def digits_mlp(hidden: tuple[int, ...] = (256, 256), seed: int = 0, batch: int | str = 1
               ) -> ir.Model:
    """The trained digits MLP as ONNX (Gemm layers fc1, fc2, ...; x [batch, 64] -> logits)."""
    weights, biases = digits_mlp_weights(hidden, seed)
    return mlp_from_weights(weights, biases, batch=batch)


def two_of_four(w: np.ndarray) -> np.ndarray:
    """``w`` [K, N] with the 2 largest |w| of every 4 consecutive rows (K) kept per column."""
    k, n = w.shape
    groups = np.abs(w).T.reshape(n, k // 4, 4)
    order = np.argsort(-groups, axis=-1, kind="stable")
    keep = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(keep, order[..., :2], True, axis=-1)
    return w * keep.reshape(n, k).T


def block_sparse(w: np.ndarray, block: tuple[int, int], density: float, seed: int = 0
                 ) -> np.ndarray:
    """``w`` [K, N] with a random ``density`` fraction of its blocks of R = w^T [N, K]
    (``block`` = [output rows, input columns]) kept, the rest zero."""
    br, bc = block
    k, n = w.shape
    rng = np.random.default_rng(seed)
    keep = rng.random((n // br, k // bc)) < density
    mask = np.repeat(np.repeat(keep, br, axis=0), bc, axis=1)
    return w * mask.T


def sparse_mlp(sizes: Sequence[int] = (512, 1024, 1024, 256), *, pattern: str = "2:4",
               block: tuple[int, int] = (4, 4), density: float = 0.25, batch: int = 1,
               seed: int = 0, forms: Sequence[str] | None = None) -> ir.Model:
    """A seeded ReLU MLP (``sizes`` = widths, input first) whose weights are ``pattern``
    sparse: ``2:4`` (magnitude 2 of 4 along K), ``block`` (random blocks at ``density``)
    or ``dense``."""
    rng = np.random.default_rng(seed)
    weights, biases = [], []
    for i, (k, n) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        if pattern == "2:4":
            w = two_of_four(w)
        elif pattern == "block":
            w = block_sparse(w, block, density, seed=seed + i)
        elif pattern != "dense":
            raise ValueError(f"unknown pattern {pattern!r}")
        weights.append(w.astype(np.float32))
        biases.append((rng.standard_normal(n) * 0.1).astype(np.float32))
    return mlp_from_weights(weights, biases, batch=batch, forms=forms)
