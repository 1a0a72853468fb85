"""int8 vs fp32: kiln's integer kernels against kiln fp32 and ONNX Runtime int8 (QDQ).

``python -m bench.cases_int8 [--cases encoder,mlp] [--targets host,x86-64-v3]`` builds,
per model, kiln fp32 (the float ONNX) and kiln int8 (the same model through kiln's
``int8`` spec: W8A8 QDQ, which the TVM backend lowers to integer kernels,
``backends/tvm/importer/int8_chains.py``) for each target, and times them with ONNX
Runtime on the int8 QDQ model (optimizations on: its own int8 kernels) and on the fp32
model. Each engine is timed alone in blocks (``bench.timing.time_in_blocks``) on
``--threads`` threads; ``--rounds`` repeats the whole set and keeps each engine's minimum
median (the machine is shared). ``x86-64-v3`` is kiln's AVX2 build run on this CPU;
ONNX Runtime picks its kernels at run time and cannot be forced onto AVX2, so its
numbers are the same in both rows.

Models: ``encoder`` (``kiln.compiler.testing.torch_models.encoder``: 4 layers, d=256,
seq 128), ``mlp`` (3 Linear+ReLU layers 1024 wide on 256 rows: int8 end to end), and the
real CNNs of :data:`REAL` (``--cases det,rec,yolox``): PP-OCRv4 det and rec, ddddocr's
YOLOX, BatchNorm folded, calibrated on rendered text as ``bench.quant_fidelity`` does.
"integer kernels" counts kiln's distinct integer kernels (dense, implicit-GEMM conv,
depthwise) in the int8 build.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from bench.timing import git_commit, time_in_blocks
from kiln.compiler.core.metrics import sqnr_db

log = logging.getLogger("bench.int8")
HERE = Path(__file__).resolve().parent


def _mlp():
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                          nn.Linear(1024, 1024)).eval()
    return model, (torch.randn(256, 1024, generator=torch.Generator().manual_seed(3)),)


def _encoder():
    from kiln.compiler.testing.torch_models import encoder

    return encoder()


MODELS = {"encoder": _encoder, "mlp": _mlp}
#: Real CNNs (``bench.quant_fidelity``'s setup): name -> (quant_fidelity's model, input
#: shape). Calibrated on rendered text (``percentile``, W8A8: int8 per-channel weights,
#: uint8 activations), timed on a held-out sample.
REAL = {"det": ("det", [1, 3, 480, 480]), "rec": ("rec", [1, 3, 48, 320]),
        "yolox": ("yolox", [1, 3, 416, 416])}
CALIBRATION_SAMPLES = 4


def real_pair(name: str, workdir: Path, reduce_range: bool = False):
    """(fp32 ONNX path, int8 QDQ ONNX path, feeds) of a real CNN (see :data:`REAL`);
    ``reduce_range``: 7-bit weights (quantize's option)."""
    import onnx

    from bench import quant_fidelity as qf
    from kiln.compiler.core import graph as kir

    which, shape = REAL[name]
    sample = {"rec": lambda seed: qf.rec_samples(1, seed=seed)[0],
              "det": lambda seed: qf.text_page(seed, shape[-1]),
              "yolox": lambda seed: qf.yolo_page(seed, shape[-1])}[which]
    fp32 = workdir / f"{name}-fp32.onnx"
    int8 = workdir / f"{name}-int8{'-rr' if reduce_range else ''}.onnx"
    if not int8.exists():
        model = qf.float_graph(which, shape)
        if not fp32.exists():
            onnx.save(kir.to_proto(model), fp32)
        calibration = [sample(11 + i) for i in range(CALIBRATION_SAMPLES)]
        onnx.save(kir.to_proto(qf.kiln_quantized(model, calibration, "percentile",
                                                       reduce_range)), int8)
    return fp32, int8, {qf.INPUT[which]: sample(99)}


def _onnx_pair(name: str, workdir: Path):
    """(fp32 ONNX path, int8 QDQ ONNX path, feeds) of model ``name``."""
    if name in REAL:
        return real_pair(name, workdir)
    import torch

    from kiln.compiler.driver.compile import compile_model

    model, example = MODELS[name]()
    fp32 = workdir / f"{name}-fp32.onnx"
    if not fp32.exists():
        torch.onnx.export(model, example, dynamo=True, input_names=["x"]).save(str(fp32))
    out = workdir / f"{name}-int8"
    if not (out / "model.onnx").exists():
        compile_model(str(fp32), "int8").save(out)
    return fp32, out / "model.onnx", {"x": example[0].numpy()}


def kiln_build(onnx_path: Path, feeds, target: str, outdir: Path):
    """kiln's build of ``onnx_path`` for ``target``: (VM call on device tensors, rules)."""
    import tvm
    from tvm import relax

    from kiln.backends.tvm import build_artifact
    from kiln.backends.tvm.load_time import INIT_FUNCTION, MANIFEST_KEY
    from kiln.compiler.core.frontend import load_model

    model = load_model(str(onnx_path), input_shapes={k: list(v.shape) for k, v in feeds.items()})
    result = build_artifact(model, target, outdir, model_hash=f"bench-{target}")
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(outdir / "model.so")), tvm.cpu())
    args = [tvm.runtime.tensor(v) for v in feeds.values()]
    # weights the library computes once when loaded, passed to main after the inputs
    if json.loads((outdir / "manifest.json").read_text()).get("extra", {}).get(MANIFEST_KEY):
        args += list(vm[INIT_FUNCTION]())
    main = vm["main"]

    def run():
        return main(*args)

    return run, result.rules


def first_output(out) -> np.ndarray:
    """The first output of a VM call (one tensor, or a tuple of them) as numpy."""
    return out.numpy() if hasattr(out, "numpy") else out[0].numpy()


def run_model(name: str, targets: list[str], workdir: Path, threads: int, runs: int,
              rounds: int) -> list[dict]:
    from bench.case import ort_session

    fp32, int8, feeds = _onnx_pair(name, workdir)
    ort_int8 = ort_session(int8, threads)
    ort_fp32 = ort_session(fp32, threads)
    reference = ort_fp32.run(None, feeds)[0]
    rows = []
    for target in targets:
        k32, _ = kiln_build(fp32, feeds, target, workdir / f"{name}-{target}-fp32-so")
        k8, rules = kiln_build(int8, feeds, target, workdir / f"{name}-{target}-int8-so")
        integer = sum(1 for r in rules.values() if r in ("int8_dense", "int8_window"))
        fns = {"kiln_int8": k8, "kiln_fp32": k32, "ort_int8": lambda: ort_int8.run(None, feeds),
               "ort_fp32": lambda: ort_fp32.run(None, feeds)}
        best: dict[str, float] = {}
        for _ in range(rounds):
            for engine, ms in time_in_blocks(fns, runs, warmup=5).items():
                best[engine] = min(ms, best.get(engine, float("inf")))
        row = {"model": name, "target": target, "integer_kernels": integer,
               **{f"{k}_ms": round(v, 3) for k, v in best.items()},
               "kiln_int8_over_kiln_fp32": round(best["kiln_int8"] / best["kiln_fp32"], 3),
               "kiln_int8_over_ort_int8": round(best["kiln_int8"] / best["ort_int8"], 3),
               "sqnr_db_kiln_int8_vs_fp32": round(sqnr_db(reference, first_output(k8())), 1),
               "sqnr_db_ort_int8_vs_fp32": round(sqnr_db(reference,
                                                         ort_int8.run(None, feeds)[0]), 1),
               "load_average": round(os.getloadavg()[0], 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def format_markdown(payload: dict) -> str:
    lines = ["| model | kiln target | integer kernels | kiln int8 ms | kiln fp32 ms | ORT int8 "
             "(QDQ) ms | ORT fp32 ms | kiln int8 / kiln fp32 | kiln int8 / ORT int8 "
             "| SQNR vs fp32 dB kiln / ORT | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        lines.append(
            f"| {r['model']} | {r['target']} | {r['integer_kernels']} | {r['kiln_int8_ms']:.3f} "
            f"| {r['kiln_fp32_ms']:.3f} | {r['ort_int8_ms']:.3f} | {r['ort_fp32_ms']:.3f} "
            f"| {r['kiln_int8_over_kiln_fp32']:.2f} | {r['kiln_int8_over_ort_int8']:.2f} "
            f"| {r['sqnr_db_kiln_int8_vs_fp32']} / {r['sqnr_db_ort_int8_vs_fp32']} "
            f"| {r['load_average']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cases_int8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", default="encoder,mlp")
    parser.add_argument("--targets", default="host,x86-64-v3")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=str(HERE / "results_int8.json"))
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    import tempfile

    payload = {"commit": (git_commit() or "unknown")[:12], "threads": args.threads,
               "runs": args.runs, "rounds": args.rounds, "rows": [],
               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="kiln-bench-int8-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for name in [n for n in args.cases.split(",") if n]:
            payload["rows"] += run_model(name, args.targets.split(","), workdir, args.threads,
                                         args.runs, args.rounds)
    Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    print(format_markdown(payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
