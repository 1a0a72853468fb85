"""low_rank (lossy): a MatMul/Gemm with constant W [m, n] -> two thinner MatMuls.

Truncated SVD keeps the r largest singular values: W ~ P Q with P = U_r diag(sqrt s_r),
Q = diag(sqrt s_r) V_r^T, P [m, r], Q [r, n]; it pays when r (m + n) < m n. The rank is
``rank`` or the smallest r whose singular values keep an ``energy`` fraction of
sum(s^2).

``whiten: activations`` (activation-aware SVD, as in SVD-LLM / CorDA) minimizes the
output error ||X (W - W_r)||_F over the calibration inputs X instead of ||W - W_r||_F:
with C = X^T X / N + delta I (delta = DAMPING * trace(C) / m) and S = C^(1/2),
SVD(S W) = U diag(s) V^T, truncated to r, gives W_r = S^-1 U_r diag(s_r) V_r^T, so
P = S^-1 U_r diag(sqrt s_r). When a few input channels dominate, plain SVD spends its
rank on directions the inputs rarely excite; the whitened one does not.
The note reports the layers, the parameters saved and the mean relative error
(of the weight, or of the whitened weight = the output on the calibration inputs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field, model_validator

from kiln.compiler.core import graph as kir
from kiln.compiler.core.errors import PassError
from kiln.compiler.core.pass_api import (
    Candidate,
    KilnPass,
    PassConfig,
    add_initializer,
    copy_metadata,
    remove_unused_initializers,
    replace_value,
)

#: relative Tikhonov damping of the input covariance (keeps S invertible; rank-deficient
#: calibration sets leave some directions unseen)
DAMPING = 1e-4
DEFAULT_ENERGY = 0.95


class LowRankConfig(PassConfig):
    """Options of ``low_rank``: ``rank`` or ``energy`` (default: energy 0.95)."""

    rank: int | None = Field(default=None, gt=0, description="kept rank r")
    energy: float | None = Field(default=None, gt=0, le=1, description="keep the smallest "
                                 "rank with this fraction of sum(s^2)")
    whiten: Literal["none", "activations"] = Field(
        default="none", description="activations: SVD of C^1/2 W (C: input covariance "
        "from calibration)")

    @model_validator(mode="after")
    def _one_of(self) -> LowRankConfig:
        if self.rank is not None and self.energy is not None:
            raise ValueError("give rank or energy, not both")
        return self


@dataclass
class _Factor:
    node: ir.Node
    m: int
    n: int
    p: np.ndarray                 # [m, r]
    q: np.ndarray                 # [r, n]
    error: float                  # relative (whitened) weight error


def _const(value: ir.Value | None) -> np.ndarray | None:
    tensor = kir.constant_tensor(value)
    return None if tensor is None else tensor.numpy()


def _matrix(node: ir.Node) -> np.ndarray | None:
    """W [m, n] such that the node computes x W (Gemm alpha/beta stay on the node)."""
    weight = _const(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or weight.ndim != 2:
        return None
    if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
        weight = weight.T
    return weight.astype(np.float64)


def choose_rank(singular: np.ndarray, rank: int | None, energy: float | None) -> int:
    """The kept rank: ``rank`` (capped), or the smallest reaching ``energy`` of sum(s^2)."""
    if rank is not None:
        return min(rank, singular.size)
    power = np.cumsum(singular ** 2)
    target = (DEFAULT_ENERGY if energy is None else energy) * power[-1]
    return int(np.searchsorted(power, target * (1 - 1e-12)) + 1)


def covariance_sqrt(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """S = (X^T X / N + delta I)^(1/2) and S^-1 for activations x [N, m]."""
    c = x.T @ x / max(x.shape[0], 1)
    c += np.eye(c.shape[0]) * DAMPING * max(np.trace(c) / c.shape[0], 1e-12)
    values, vectors = np.linalg.eigh(c)
    values = np.clip(values, 1e-30, None)
    root = np.sqrt(values)
    return (vectors * root) @ vectors.T, (vectors / root) @ vectors.T


def factorize(w: np.ndarray, rank: int | None, energy: float | None,
              x: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """(P, Q, relative error) with P Q ~ W; whitened by the activations ``x`` when given."""
    if x is None:
        s_mat = s_inv = None
        target = w
    else:
        s_mat, s_inv = covariance_sqrt(x)
        target = s_mat @ w
    u, s, vt = np.linalg.svd(target, full_matrices=False)
    r = choose_rank(s, rank, energy)
    root = np.sqrt(s[:r])
    p = u[:, :r] * root
    q = root[:, None] * vt[:r]
    error = float(np.sqrt(max(np.sum(s[r:] ** 2), 0.0) / max(np.sum(s ** 2), 1e-300)))
    if s_inv is not None:
        p = s_inv @ p
    return p, q, error


class LowRank(KilnPass):
    """Factor constant MatMul/Gemm weights into two thinner MatMuls (truncated SVD)."""

    name = "low_rank"
    config_class = LowRankConfig
    exact = False
    needs_calibration = True
    portable_candidates = False

    def candidates(self, model: ir.Model) -> list[Candidate]:
        sites: list[tuple[ir.Node, np.ndarray]] = []
        found: list[Candidate] = []
        for node in self.selected_nodes(model):
            if node.op_type not in ("MatMul", "Gemm") or node.domain != "":
                continue
            label = kir.node_label(node)
            w = _matrix(node)
            if w is None:
                if _const(node.inputs[1]) is not None:
                    found.append(Candidate(node, label, reason="weight is not a matrix"))
                continue
            if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
                found.append(Candidate(node, label, reason="Gemm with transA"))
                continue
            if _const(node.inputs[0]) is not None:
                continue
            if any(n is not node for n, _ in node.inputs[1].uses()):
                found.append(Candidate(node, label, reason=f"weight {node.inputs[1].name!r} is "
                                       "shared"))
                continue
            sites.append((node, w))
        inputs = self._inputs(model, [node for node, _ in sites])
        for node, w in sites:
            label = kir.node_label(node)
            m, n = w.shape
            p, q, error = factorize(w, self.config.rank, self.config.energy,
                                    inputs.get(node.inputs[0].name))
            r = p.shape[1]
            if r * (m + n) >= m * n:
                found.append(Candidate(node, label, reason=f"rank {r} saves nothing "
                                       f"(r(m+n) = {r * (m + n)} >= mn = {m * n})"))
                continue
            found.append(Candidate(node, f"{label} [{m}x{n}] -> rank {r}", nodes=(node,),
                                   data=_Factor(node, m, n, p, q, error)))
        return found

    def _inputs(self, model: ir.Model, nodes: list[ir.Node]) -> dict[str, np.ndarray]:
        """The calibration inputs of ``nodes`` as [N, m] float64 (whiten: activations)."""
        if self.config.whiten == "none" or not nodes:
            return {}
        if self.calibration is None:
            raise PassError("whiten: activations needs calibration data (run it through "
                            "the pipeline, or pass a CalibrationContext)", pass_name=self.name)
        names = sorted({node.inputs[0].name for node in nodes})
        graph_inputs = {v.name for v in kir.graph_inputs(model)}
        inner = [name for name in names if name not in graph_inputs]
        values = self.calibration.activations(model, inner) if inner else {}
        out = {}
        for name in names:
            samples = values[name] if name in values else [s[name] for s in
                                                            self.calibration.samples]
            width = np.shape(samples[0])[-1]
            out[name] = np.concatenate([np.asarray(v, np.float64).reshape(-1, width)
                                        for v in samples])
        return out

    def rewrite(self, model: ir.Model, accepted: Sequence[Candidate]) -> int:
        graph = model.graph
        before = after = 0
        errors = []
        for candidate in accepted:
            factor: _Factor = candidate.data
            self._split(graph, factor)
            before += factor.m * factor.n
            after += factor.p.size + factor.q.size
            errors.append(factor.error)
        kind = "output (whitened)" if self.config.whiten == "activations" else "weight"
        self.note = (f"{len(accepted)} layer(s): {before} -> {after} weights "
                     f"({100 * (1 - after / max(before, 1)):.0f}% saved), mean relative "
                     f"{kind} error {np.mean(errors):.3g}")
        return len(accepted)

    def _split(self, graph: ir.Graph, factor: _Factor) -> None:
        node = factor.node
        weight = node.inputs[1]
        dtype = kir.numpy_dtype(weight)
        base = weight.name or node.name or "weight"
        p = add_initializer(graph, f"{base}_lowrank_p", factor.p.astype(dtype))
        q = add_initializer(graph, f"{base}_lowrank_q", factor.q.astype(dtype))
        first = ir.Node("", "MatMul", [node.inputs[0], p], name=f"{node.name or 'lowrank'}_p",
                        num_outputs=1)
        first.outputs[0].type = node.outputs[0].type
        if node.op_type == "MatMul":
            second = ir.Node("", "MatMul", [first.outputs[0], q], name=node.name, num_outputs=1)
        else:
            attributes = [a for a in node.attributes.values() if a.name != "transB"]
            rest = [v for v in node.inputs[2:]]
            second = ir.Node("", "Gemm", [first.outputs[0], q, *rest], attributes=attributes,
                             name=node.name, num_outputs=1)
        for new in (first, second):
            copy_metadata(node, new)
        second.outputs[0].shape = node.outputs[0].shape
        second.outputs[0].type = node.outputs[0].type
        graph.insert_before(node, [first, second])
        replace_value(graph, node.outputs[0], second.outputs[0])
        graph.remove(node, safe=True)
        remove_unused_initializers(graph, [weight.name or ""])
