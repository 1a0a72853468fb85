"""Language-model cases (docs/llm.md): one decoder step of a random-weight Llama checkpoint
(``kiln.compiler.testing.llm_models``, the ``bench`` config: 12 layers, hidden 768, 12
query heads over 4 key/value heads, vocab 32000), exported by kiln's frontend with
symbolic ``seq`` (1..2048) and ``past`` (1..2047); kiln's build vs ONNX Runtime on the
same ONNX file, 2 threads by default:

llm-decode-fp32     one new token against a cache of :data:`DECODE_PAST` slots: the time
                    of one decode step (tokens/s = 1000 / ms)
llm-decode-int4     the same step after the ``llm-int4`` spec (int4 g32 weights on every
                    projection): kiln's fused int4 kernels vs ORT, which fuses the same
                    DequantizeLinear+MatMul pairs into MatMulNBits itself
llm-decode1-fp32, llm-decode1-int4
                    the same steps built with ``seq`` fixed at 1 (what ``kiln generate``
                    decodes with: static rows, so the fused int4 GEMV applies)
llm-prefill-512-fp32, llm-prefill-512-int4
                    a 512-token prompt on the starting cache (one masked slot)

Since session 10 the step takes the cache's keys transposed (``[1, KV, D, past]``) and
returns only the new token's keys and values (docs/llm.md), so these cases time that
graph; session 9's figures timed the concatenating one.

``python -m bench --cases llm-decode-fp32,llm-decode-int4 --protocol blocks``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.case import SEED, PreparedCase

DECODE_PAST = 256
PREFILL = 512
#: the build's ranges: every prompt and cache length the export serves
RANGES = {"*seq": ["seq=1..2048"], "*past": ["past=1..2047"]}
#: the decode build's shapes: one new token (static rows, so the int4 GEMV rules apply)
DECODE_SHAPES = {"input_ids": [1, 1], "position_ids": [1, 1], "*past": ["past=1..2047"]}


def _checkpoint_onnx(workdir: Path) -> Path:
    """The bench checkpoint's decoder step as ONNX (built once per workdir)."""
    import onnx_ir as ir

    from kiln.compiler.core.llm_export import export_decoder
    from kiln.compiler.testing.llm_models import save_random_llama

    path = workdir / "llm-bench-fp32.onnx"
    if not path.exists():
        folder = workdir / "llm-bench-checkpoint"
        if not (folder / "config.json").exists():
            save_random_llama(folder, "bench", seed=SEED)
        ir.save(export_decoder(folder), path)
    return path


def _int4_onnx(workdir: Path) -> Path:
    from kiln.compiler.driver.compile import compile_model

    out = workdir / "llm-bench-int4"
    if not (out / "model.onnx").exists():
        compile_model(str(_checkpoint_onnx(workdir)), "llm-int4",
                      input_shapes=RANGES).save(out)
    return out / "model.onnx"


def step_inputs(path: Path, seq: int, past: int, seed: int = SEED) -> dict[str, np.ndarray]:
    """Feeds of one step: ``seq`` new tokens after ``past`` cached slots (the first masked,
    as generation starts), random cached keys and values."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {
        "input_ids": rng.integers(0, 1000, (1, seq)).astype(np.int64),
        "position_ids": np.arange(past - 1, past - 1 + seq, dtype=np.int64)[None],
        "past_mask": np.concatenate([np.zeros((1, 1)), np.ones((1, past - 1))], 1).astype(np.int64),
    }
    for value in model.graph.input:
        if value.name.startswith("past_") and value.name != "past_mask":
            dims = [d.dim_value or past for d in value.type.tensor_type.shape.dim]
            feeds[value.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def _case(name: str, which: str, seq: int, past: int, shapes: dict | None = None
          ) -> Callable[[Path], PreparedCase]:
    def prepare(workdir: Path) -> PreparedCase:
        path = _checkpoint_onnx(workdir) if which == "fp32" else _int4_onnx(workdir)
        return PreparedCase(name=name, onnx_path=path, input_shapes=dict(shapes or RANGES),
                            inputs=step_inputs(path, seq, past))

    return prepare


LLM_CASES: dict[str, Callable[[Path], PreparedCase]] = {
    "llm-decode-fp32": _case("llm-decode-fp32", "fp32", 1, DECODE_PAST),
    "llm-decode-int4": _case("llm-decode-int4", "int4", 1, DECODE_PAST),
    "llm-decode1-fp32": _case("llm-decode1-fp32", "fp32", 1, DECODE_PAST, DECODE_SHAPES),
    "llm-decode1-int4": _case("llm-decode1-int4", "int4", 1, DECODE_PAST, DECODE_SHAPES),
    "llm-prefill-512-fp32": _case("llm-prefill-512-fp32", "fp32", PREFILL, 1),
    "llm-prefill-512-int4": _case("llm-prefill-512-int4", "int4", PREFILL, 1),
}
