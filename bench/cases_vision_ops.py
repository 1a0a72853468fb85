"""Detector post-processing and index ops alone (issue 16 item 3): ``python -m bench.cases_vision_ops``.

- ``nms``: NonMaxSuppression over 1000 boxes x 20 classes, at most 100 per class, IoU 0.5,
  score threshold 0.3 (boxes 10-80 wide in a 600x600 image, uniform scores);
- ``topk``: TopK k=100 over 4 rows of 8400 scores (a YOLO head's anchors); ``topk_wide``:
  k=256 of one row of 100K; ``topk_moe``: k=2 of 8 experts for 256 tokens (a MoE router);
- ``scatter_nd``: 100 rows of a [8400, 85] tensor replaced; ``scatter_elements``: 256
  distinct columns per row of [64, 4096] (axis 1), ``_add`` with repeated columns added;
  ``gather_elements``: 256 columns per row of [64, 4096]; ``gather_nd``: 100 rows of
  [8400, 85]. Indices are graph inputs (computed at run time in a real model).

kiln's build and ONNX Runtime, both at ``--threads`` (1 by default), each engine timed in
blocks (``bench.timing.time_in_blocks``, median of ``--runs`` calls) and in process CPU
time (:func:`cpu_times`; meaningful at 1 thread); the outputs of the two are compared
before timing. Prints a table and writes ``--out`` (JSON) if given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bench.case import PreparedCase

SEED = 0


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def nms_case(workdir: Path, boxes: int = 1000, classes: int = 20) -> PreparedCase:
    operands = [("max_out", np.array([100], np.int64)), ("iou", np.array([0.5], np.float32)),
                ("score", np.array([0.3], np.float32))]
    graph = helper.make_graph(
        [helper.make_node("NonMaxSuppression", ["boxes", "scores", "max_out", "iou", "score"],
                          ["selected"])], "nms",
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, boxes, 4]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, classes, boxes])],
        [helper.make_tensor_value_info("selected", TensorProto.INT64, None)],
        [numpy_helper.from_array(v, n) for n, v in operands])
    rng = np.random.default_rng(SEED)
    corner = rng.uniform(0, 600, (1, boxes, 2)).astype(np.float32)
    size = rng.uniform(10, 80, (1, boxes, 2)).astype(np.float32)
    inputs = {"boxes": np.concatenate([corner, corner + size], axis=-1),
              "scores": rng.uniform(0, 1, (1, classes, boxes)).astype(np.float32)}
    return PreparedCase(name="nms", onnx_path=_save(graph, workdir / "nms.onnx"),
                        input_shapes={k: list(v.shape) for k, v in inputs.items()},
                        inputs=inputs)


def _single_op(workdir: Path, name: str, node: onnx.NodeProto,
               inputs: dict[str, np.ndarray], outputs: list[tuple[str, int]],
               constants: dict[str, np.ndarray] | None = None) -> PreparedCase:
    """A one-node model: ``inputs`` as graph inputs, ``outputs`` ``(name, onnx dtype)``."""
    graph = helper.make_graph(
        [node], name,
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype),
                                       list(v.shape)) for k, v in inputs.items()],
        [helper.make_tensor_value_info(k, dtype, None) for k, dtype in outputs],
        [numpy_helper.from_array(v, k) for k, v in (constants or {}).items()])
    return PreparedCase(name=name, onnx_path=_save(graph, workdir / f"{name}.onnx"),
                        input_shapes={k: list(v.shape) for k, v in inputs.items()},
                        inputs=inputs)


def topk_case(workdir: Path, rows: int = 4, width: int = 8400, k: int = 100,
              name: str = "topk") -> PreparedCase:
    x = np.random.default_rng(SEED).standard_normal((rows, width)).astype(np.float32)
    return _single_op(workdir, name, helper.make_node("TopK", ["x", "k"], ["values", "indices"],
                                                      axis=-1), {"x": x},
                      [("values", TensorProto.FLOAT), ("indices", TensorProto.INT64)],
                      {"k": np.array([k], np.int64)})


def _distinct(rng, rows: int, width: int, count: int) -> np.ndarray:
    """``[rows, count]`` int64 indices into ``width``, distinct within each row."""
    return np.stack([rng.choice(width, count, replace=False)
                     for _ in range(rows)]).astype(np.int64)


def scatter_nd_case(workdir: Path, rows: int = 8400, width: int = 85,
                    updates: int = 100) -> PreparedCase:
    rng = np.random.default_rng(SEED)
    inputs = {"data": rng.standard_normal((rows, width)).astype(np.float32),
              "indices": _distinct(rng, 1, rows, updates).reshape(updates, 1),
              "updates": rng.standard_normal((updates, width)).astype(np.float32)}
    return _single_op(workdir, "scatter_nd",
                      helper.make_node("ScatterND", list(inputs), ["out"]), inputs,
                      [("out", TensorProto.FLOAT)])


def scatter_elements_case(workdir: Path, rows: int = 64, width: int = 4096, count: int = 256,
                          reduction: str = "none") -> PreparedCase:
    rng = np.random.default_rng(SEED)
    indices = _distinct(rng, rows, width, count) if reduction == "none" \
        else rng.integers(0, width, (rows, count)).astype(np.int64)  # duplicates: reduced
    inputs = {"data": rng.standard_normal((rows, width)).astype(np.float32),
              "indices": indices,
              "updates": rng.standard_normal((rows, count)).astype(np.float32)}
    name = "scatter_elements" + ("" if reduction == "none" else f"_{reduction}")
    node = helper.make_node("ScatterElements", list(inputs), ["out"], axis=1,
                            reduction=reduction)
    return _single_op(workdir, name, node, inputs, [("out", TensorProto.FLOAT)])


def gather_elements_case(workdir: Path, rows: int = 64, width: int = 4096,
                         count: int = 256) -> PreparedCase:
    rng = np.random.default_rng(SEED)
    inputs = {"data": rng.standard_normal((rows, width)).astype(np.float32),
              "indices": rng.integers(0, width, (rows, count)).astype(np.int64)}
    node = helper.make_node("GatherElements", list(inputs), ["out"], axis=1)
    return _single_op(workdir, "gather_elements", node, inputs, [("out", TensorProto.FLOAT)])


def gather_nd_case(workdir: Path, rows: int = 8400, width: int = 85,
                   count: int = 100) -> PreparedCase:
    rng = np.random.default_rng(SEED)
    inputs = {"data": rng.standard_normal((rows, width)).astype(np.float32),
              "indices": rng.integers(0, rows, (count, 1)).astype(np.int64)}
    return _single_op(workdir, "gather_nd", helper.make_node("GatherND", list(inputs), ["out"]),
                      inputs, [("out", TensorProto.FLOAT)])


CASES = {
    "nms": nms_case,
    "topk": topk_case,
    # a detector's top 256 of 100K scores; a MoE router's top 2 of 8 experts, 256 tokens
    "topk_wide": lambda d: topk_case(d, 1, 100_000, 256, name="topk_wide"),
    "topk_moe": lambda d: topk_case(d, 256, 8, 2, name="topk_moe"),
    "scatter_nd": scatter_nd_case,
    "scatter_elements": scatter_elements_case,
    "scatter_elements_add": lambda d: scatter_elements_case(d, reduction="add"),
    "gather_elements": gather_elements_case,
    "gather_nd": gather_nd_case,
}


def aligned(case: PreparedCase) -> PreparedCase:
    """``case`` with its inputs copied to 64-byte aligned arrays: kiln's runtime passes
    those to TVM as they are and copies any other (numpy's own arrays are 16-byte
    aligned), so this times the kernels without that copy."""
    def copy(a: np.ndarray) -> np.ndarray:
        raw = np.empty(a.nbytes + 64, np.uint8)
        start = -raw.ctypes.data % 64
        out = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
        out[...] = a
        return out

    return dataclasses.replace(case, inputs={k: copy(v) for k, v in case.inputs.items()})


def cpu_times(engines: dict, runs: int, rounds: int = 3) -> dict[str, float]:
    """Per engine, the process CPU time of one call in ms: ``runs`` calls in a row, the
    engines interleaved, the least of ``rounds`` (at 1 thread, what a busy machine's
    preemptions do not inflate as they do wall time)."""
    import time

    best = dict.fromkeys(engines, float("inf"))
    for _ in range(rounds):
        for name, call in engines.items():
            start = time.process_time()
            for _ in range(runs):
                call()
            best[name] = min(best[name], (time.process_time() - start) / runs * 1e3)
    return best


def measure(cases: list[PreparedCase], workdir: Path, threads: int, runs: int) -> list[dict]:
    from bench.build import build_case
    from bench.case import ort_runner
    from bench.timing import time_in_blocks

    rows = []
    for case in cases:
        built = build_case(case, workdir / case.name, threads=threads)
        ort = ort_runner(case, threads)
        ours, theirs = built.run(case.inputs), ort()
        same = all(np.array_equal(np.asarray(a).reshape(np.shape(b)), b)
                   for a, b in zip(ours, theirs, strict=True))
        engines = {"kiln": lambda b=built, c=case: b.run(c.inputs), "ort": ort}
        times = time_in_blocks(engines, runs, warmup=10)
        cpu = cpu_times(engines, runs)
        rows.append({"case": case.name, "kiln_ms": round(times["kiln"], 4),
                     "ort_ms": round(times["ort"], 4),
                     "kiln_over_ort": round(times["kiln"] / times["ort"], 3), "same": same,
                     "kiln_cpu_ms": round(cpu["kiln"], 4), "ort_cpu_ms": round(cpu["ort"], 4)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cases_vision_ops",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--aligned", action="store_true",
                        help="inputs 64-byte aligned (kiln then copies none; see aligned())")
    args = parser.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))  # before TVM starts
    from bench.timing import git_commit
    from kiln.compiler.core.atomic import write_atomic

    with tempfile.TemporaryDirectory(prefix="kiln-bench-vision-") as tmp:
        cases = [CASES[name](Path(tmp)) for name in args.cases.split(",") if name]
        cases = [aligned(c) for c in cases] if args.aligned else cases
        load = os.getloadavg()[0]
        rows = measure(cases, Path(tmp), args.threads, args.runs)
    print(f"| case | kiln ms | ORT ms | kiln/ORT | kiln CPU ms | ORT CPU ms | CPU ratio | "
          f"same outputs |  ({args.threads} thread(s), load {load:.1f})")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        print(f"| {row['case']} | {row['kiln_ms']:.3f} | {row['ort_ms']:.3f} | "
              f"{row['kiln_over_ort']:.2f} | {row['kiln_cpu_ms']:.3f} | {row['ort_cpu_ms']:.3f} | "
              f"{row['kiln_cpu_ms'] / row['ort_cpu_ms']:.2f} | {row['same']} |")
    if args.out:
        payload = {"commit": git_commit(), "threads": args.threads, "runs": args.runs,
                   "aligned_inputs": args.aligned,
                   "load_1min": load, "cpu": platform.processor() or platform.machine(),
                   "cases": rows}
        write_atomic(args.out, (json.dumps(payload, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
