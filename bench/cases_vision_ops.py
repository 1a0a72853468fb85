"""Detector post-processing ops alone (issue 16 item 3): ``python -m bench.cases_vision_ops``.

- ``nms``: NonMaxSuppression over 1000 boxes x 20 classes, at most 100 per class, IoU 0.5,
  score threshold 0.3 (boxes 10-80 wide in a 600x600 image, uniform scores);
- ``topk``: TopK k=100 over 4 rows of 8400 scores (a YOLO head's anchors).

kiln's build and ONNX Runtime, both at ``--threads`` (1 by default), each engine timed in
blocks (``bench.timing.time_in_blocks``, median of ``--runs`` calls); the outputs of the
two are compared before timing. Prints a table and writes ``--out`` (JSON) if given.
"""

from __future__ import annotations

import argparse
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


def topk_case(workdir: Path, rows: int = 4, width: int = 8400, k: int = 100) -> PreparedCase:
    graph = helper.make_graph(
        [helper.make_node("TopK", ["x", "k"], ["values", "indices"], axis=-1)], "topk",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, width])],
        [helper.make_tensor_value_info("values", TensorProto.FLOAT, [rows, k]),
         helper.make_tensor_value_info("indices", TensorProto.INT64, [rows, k])],
        [numpy_helper.from_array(np.array([k], np.int64), "k")])
    x = np.random.default_rng(SEED).standard_normal((rows, width)).astype(np.float32)
    return PreparedCase(name="topk", onnx_path=_save(graph, workdir / "topk.onnx"),
                        input_shapes={"x": [rows, width]}, inputs={"x": x})


CASES = {"nms": nms_case, "topk": topk_case}


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
        times = time_in_blocks({"kiln": lambda b=built, c=case: b.run(c.inputs), "ort": ort},
                               runs, warmup=10)
        rows.append({"case": case.name, "kiln_ms": round(times["kiln"], 4),
                     "ort_ms": round(times["ort"], 4),
                     "kiln_over_ort": round(times["kiln"] / times["ort"], 3), "same": same})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cases_vision_ops",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))  # before TVM starts
    from bench.timing import git_commit
    from kiln.compiler.core.atomic import write_atomic

    with tempfile.TemporaryDirectory(prefix="kiln-bench-vision-") as tmp:
        cases = [CASES[name](Path(tmp)) for name in args.cases.split(",") if name]
        load = os.getloadavg()[0]
        rows = measure(cases, Path(tmp), args.threads, args.runs)
    print(f"| case | kiln ms | ORT ms | kiln/ORT | same outputs |  ({args.threads} thread(s), "
          f"load {load:.1f})")
    print("|---|---:|---:|---:|---|")
    for row in rows:
        print(f"| {row['case']} | {row['kiln_ms']:.3f} | {row['ort_ms']:.3f} | "
              f"{row['kiln_over_ort']:.2f} | {row['same']} |")
    if args.out:
        payload = {"commit": git_commit(), "threads": args.threads, "runs": args.runs,
                   "load_1min": load, "cpu": platform.processor() or platform.machine(),
                   "cases": rows}
        write_atomic(args.out, (json.dumps(payload, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
