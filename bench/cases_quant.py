"""Quantized benchmark cases: compressed-weight kernels against ONNX Runtime and the floor.

``python -m bench.cases_quant`` runs the three quantized comparisons and writes
``bench/results_quant.json`` (and prints the table for ``bench/RESULTS_QUANT.md``):

gemv-int4     1x4096x4096, int4 weights in groups of 32 and 128: kiln's fused
              decode-GEMV vs ONNX Runtime's ``com.microsoft.MatMulNBits`` on the same
              weights, and the bandwidth floor (the bytes it must read / the measured
              read bandwidth of a buffer of the same size, 2 threads).
decoder-int4  an LLM-style decoder block at batch 1 (one new token against a KV cache
              of 128): attention projections + SwiGLU MLP, weight-only int4 through
              kiln's ``int4-weights`` spec; vs ONNX Runtime running the same weights as
              MatMulNBits, and PyTorch fp32 eager.
encoder-int8  ``kiln.compiler.testing.torch_models.encoder()`` through the ``int8``
              spec (W8A8 QDQ) vs ONNX Runtime running the QDQ model with its
              optimizations (its int8 kernels), and PyTorch fp32 eager.

``QUANT_CASES`` also registers the same models with ``python -m bench`` (the generic
runner: kiln vs ONNX Runtime on the very same ONNX file, optimized; for int4 weights
ORT then fuses DequantizeLinear+MatMul into MatMulNBits itself).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.case import SEED, PreparedCase, ort_session
from bench.timing import git_commit, time_interleaved
from kiln.compiler.core.metrics import relative_error, sqnr_db

log = logging.getLogger("bench.quant")

GEMV_SHAPE = (1, 4096, 4096)
GEMV_GROUPS = (32, 128)
DECODER = {"d_model": 2048, "heads": 16, "ffn": 5632, "past": 128}
HERE = Path(__file__).resolve().parent
#: Buffer for the DRAM read bandwidth: well past the last-level cache.
DRAM_BYTES = 512 << 20


# -- models ---------------------------------------------------------------------------------

def gemv_int4_model(m: int, k: int, n: int, group: int, seed: int = SEED):
    """``Y = X @ DequantizeLinear(W int4 [K, N], s [K/g, N]){axis 0, block g}`` (opset 21)."""
    import ml_dtypes
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    q = rng.integers(-8, 8, size=(k, n)).astype(ml_dtypes.int4)
    s = (rng.random((k // group, n)) * 0.02 + 0.005).astype(np.float32)
    nodes = [helper.make_node("DequantizeLinear", ["w", "s"], ["wf"], axis=0, block_size=group),
             helper.make_node("MatMul", ["x", "wf"], ["y"])]
    graph = helper.make_graph(
        nodes, "gemv_int4", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array(q, "w"), numpy_helper.from_array(s, "s")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def to_matmulnbits(model, accuracy_level: int = 0):
    """The same model with every DequantizeLinear(int4, block, axis 0) -> MatMul as one
    ``com.microsoft.MatMulNBits`` (weights as uint4 = int4 + 8, ORT's default zero point 8).

    ``accuracy_level`` 0 computes in fp32 like the graph; 4 lets ORT quantize the
    activations to int8 per block (its VNNI kernel: faster, not the same numbers). ORT's
    own DequantizeLinear+MatMul fusion picks 4 by default on CPU."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    drop, new_inits, replaced = set(), [], 0
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        dq = producers.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or readers.get(dq.output[0], 0) != 1:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
        w = inits.get(dq.input[0])
        if w is None or w.data_type != TensorProto.INT4 or attrs.get("axis", 1) != 0 \
                or not attrs.get("block_size") or len(dq.input) > 2 and dq.input[2]:
            continue
        block = int(attrs["block_size"])
        q = numpy_helper.to_array(w).astype(np.int8).astype(np.int16)  # [K, N]
        scale = numpy_helper.to_array(inits[dq.input[1]])  # [K/B, N]
        k, n = q.shape
        if k % block:
            continue
        codes = (q + 8).astype(np.uint8).T.reshape(n, k // block, block)
        packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
        prefix = f"{node.name or node.output[0]}__nbits"
        new_inits += [numpy_helper.from_array(packed, prefix + "_w"),
                      numpy_helper.from_array(np.ascontiguousarray(scale.T).reshape(-1),
                                              prefix + "_s")]
        fused = helper.make_node("MatMulNBits", [node.input[0], prefix + "_w", prefix + "_s"],
                                 list(node.output), name=prefix, domain="com.microsoft",
                                 K=k, N=n, bits=4, block_size=block,
                                 accuracy_level=accuracy_level)
        node.CopyFrom(fused)
        drop.add(id(dq))
        replaced += 1
    keep = [node for node in graph.node if id(node) not in drop]
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(new_inits)
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    log.info("MatMulNBits form: %d MatMul(s) replaced", replaced)
    return model, replaced


def decoder_block(d_model: int, heads: int, ffn: int, past: int, seed: int = SEED):
    """(module, (x [1,1,d], past_k, past_v [1,h,past,d/h])): one decode step of a
    pre-norm LLM block (q/k/v/o projections, SwiGLU MLP), no biases."""
    import torch
    from torch import nn

    class DecoderBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.heads, self.hd = heads, d_model // heads
            self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
            self.q, self.k, self.v, self.o = (nn.Linear(d_model, d_model, bias=False)
                                              for _ in range(4))
            self.gate = nn.Linear(d_model, ffn, bias=False)
            self.up = nn.Linear(d_model, ffn, bias=False)
            self.down = nn.Linear(ffn, d_model, bias=False)

        def forward(self, x, past_k, past_v):
            h = self.norm1(x)
            split = (1, 1, self.heads, self.hd)
            q = self.q(h).reshape(split).transpose(1, 2)
            k = torch.cat([past_k, self.k(h).reshape(split).transpose(1, 2)], dim=2)
            v = torch.cat([past_v, self.v(h).reshape(split).transpose(1, 2)], dim=2)
            att = torch.softmax(q @ k.transpose(-1, -2) / self.hd ** 0.5, dim=-1) @ v
            x = x + self.o(att.transpose(1, 2).reshape(1, 1, -1))
            h = self.norm2(x)
            return x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))

    torch.manual_seed(seed)
    model = DecoderBlock().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    hd = d_model // heads
    example = (torch.randn(1, 1, d_model, generator=gen),
               torch.randn(1, heads, past, hd, generator=gen),
               torch.randn(1, heads, past, hd, generator=gen))
    return model, example


def _export(model, example, path: Path, names: list[str]) -> Path:
    import torch

    if not path.exists():
        program = torch.onnx.export(model, example, dynamo=True, input_names=names)
        program.save(str(path))
    return path


def _torch_fn(model, example) -> Callable[[], object]:
    import torch

    def run():
        with torch.inference_mode():
            return model(*example)

    return run


# -- cases for the generic runner (python -m bench) -----------------------------------------

def _gemv_case(group: int) -> Callable[[Path], PreparedCase]:
    def prepare(workdir: Path) -> PreparedCase:
        import onnx

        m, k, n = GEMV_SHAPE
        path = workdir / f"gemv-int4-g{group}.onnx"
        if not path.exists():
            onnx.save(gemv_int4_model(m, k, n, group), path)
        x = np.random.default_rng(SEED + 1).standard_normal((m, k)).astype(np.float32)
        return PreparedCase(name=f"gemv-int4-g{group}", onnx_path=path,
                            input_shapes={"x": [m, k]}, inputs={"x": x}, flops=2.0 * m * k * n)

    return prepare


def _spec_case(name: str, spec: str, make) -> Callable[[Path], PreparedCase]:
    """A torch model exported to ONNX, then quantized by kiln's ``spec`` (the QDQ/DQ ONNX)."""

    def prepare(workdir: Path) -> PreparedCase:
        from kiln.compiler.driver.compile import compile_model

        model, example, names = make()
        source = _export(model, example, workdir / f"{name}-fp32.onnx", names)
        out = workdir / f"{name}-kiln"
        if not (out / "model.onnx").exists():
            compile_model(str(source), spec).save(out)
        inputs = {n: t.numpy() for n, t in zip(names, example, strict=True)}
        return PreparedCase(name=name, onnx_path=out / "model.onnx",
                            input_shapes={n: list(v.shape) for n, v in inputs.items()},
                            inputs=inputs, torch_fn=_torch_fn(model, example))

    return prepare


def _decoder():
    model, example = decoder_block(**DECODER)
    return model, example, ["x", "past_k", "past_v"]


def _encoder():
    from kiln.compiler.testing.torch_models import encoder

    model, example = encoder()
    return model, example, ["x"]


def _mlp():
    from bench.cases_int8 import MODELS

    model, example = MODELS["mlp"]()
    return model, example, ["x"]


QUANT_CASES: dict[str, Callable[[Path], PreparedCase]] = {
    "gemv-int4-g32": _gemv_case(32),
    "gemv-int4-g128": _gemv_case(128),
    "decoder-int4": _spec_case("decoder-int4", "int4-weights", _decoder),
    "encoder-int8": _spec_case("encoder-int8", "int8", _encoder),
    # three Linear+ReLU layers 1024 wide on 256 rows: integer kernels end to end
    # (python -m bench.cases_int8 compares it with kiln fp32 and ORT int8)
    "mlp-int8": _spec_case("mlp-int8", "int8", _mlp),
}


# -- the quantized comparison (python -m bench.cases_quant) ---------------------------------

def read_bandwidth_gbs(nbytes: int, runs: int = 50) -> float:
    """Read bandwidth (GB/s) of a parallel, vectorized TVM reduction over ``nbytes``.

    Sums a float32 buffer of that size into per-chunk vector partials (one pass, no
    writes to speak of): the fastest the machine reads a weight of that footprint
    on the threads TVM uses (``TVM_NUM_THREADS``).
    """
    import tvm
    from tvm import te

    chunks, lanes, accs = 64, 16, 4
    per_chunk = max(1, nbytes // 4 // (chunks * lanes * accs))
    a = te.placeholder((chunks, per_chunk, accs, lanes), "float32", name="a")
    j = te.reduce_axis((0, per_chunk), name="j")
    out = te.compute((chunks, accs, lanes), lambda c, u, v: te.sum(a[c, j, u, v], axis=j),
                     name="out")
    func = te.create_prim_func([a, out])
    sch = tvm.s_tir.Schedule(func)
    block = sch.get_sblock("out")
    c, u, v, jj = sch.get_loops(block)
    sch.reorder(c, jj, u, v)
    sch.parallel(c)
    sch.unroll(u)
    sch.vectorize(v)
    sch.decompose_reduction(block, jj)
    target = tvm.target.Target({"kind": "llvm",
                                "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    lib = tvm.compile(sch.mod, target=target)
    dev = tvm.cpu()
    data = tvm.runtime.tensor(np.random.default_rng(0).random(
        (chunks, per_chunk, accs, lanes), dtype=np.float32), dev)
    result = tvm.runtime.tensor(np.zeros((chunks, accs, lanes), np.float32), dev)
    timer = lib.mod.time_evaluator("main", dev,
                               number=10, repeat=max(1, runs // 10))
    seconds = min(timer(data, result).results)
    return chunks * per_chunk * accs * lanes * 4 / seconds / 1e9


def _build(onnx_path: Path, input_shapes, outdir: Path):
    """kiln's host build of an ONNX file -> (callable over feeds, compile seconds, bytes)."""
    import hashlib

    from kiln.backends.tvm import build_artifact, load
    from kiln.compiler.core.frontend import load_model

    start = time.perf_counter()
    model = load_model(str(onnx_path), input_shapes=input_shapes)
    build_artifact(model, "host", outdir, model_hash=hashlib.sha256(
        onnx_path.read_bytes()).hexdigest()[:16])
    seconds = time.perf_counter() - start
    compiled = load(outdir)
    size = (outdir / "model.so").stat().st_size
    return compiled, seconds, size


def _vm_call(outdir: Path, arrays: list[np.ndarray]) -> Callable[[], object]:
    """The artifact's ``main`` on device tensors made once: the kernel time without the
    numpy wrapper's conversions (``kiln.backends.tvm.load``), as ORT reuses its buffers."""
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(outdir / "model.so")), tvm.cpu())
    args = [tvm.runtime.tensor(a) for a in arrays]
    main = vm["main"]
    return lambda: main(*args)


def _time(fns: dict[str, Callable[[], object]], runs: int, warmup: int = 5) -> dict[str, float]:
    return time_interleaved(fns, runs, warmup, gap_s=0.002)


def run_gemv(workdir: Path, threads: int, runs: int) -> list[dict]:
    import onnx

    m, k, n = GEMV_SHAPE
    rows = []
    for group in GEMV_GROUPS:
        case = _gemv_case(group)(workdir)
        model = onnx.load(case.onnx_path)
        compiled, compile_s, size = _build(case.onnx_path, case.input_shapes,
                                           workdir / f"gemv-g{group}")
        nbits, _ = to_matmulnbits(model)
        session = ort_session(nbits, threads)
        session_int8 = ort_session(to_matmulnbits(model, accuracy_level=4)[0], threads)
        exact = ort_session(model, threads, optimize=False)
        feeds = case.inputs
        x = feeds["x"]
        want = exact.run(None, feeds)[0]
        got = compiled(x)[0]
        weight_bytes = k * n // 2 + (k // group) * n * 4
        moved = weight_bytes + (m * k + m * n) * 4
        # the floor streams the weights from DRAM (an LLM's weights far exceed the caches);
        # a buffer of the GEMV's own size stays cache-resident when called back to back
        bandwidth = read_bandwidth_gbs(DRAM_BYTES)
        cached = read_bandwidth_gbs(moved)
        times = _time({"kiln": _vm_call(workdir / f"gemv-g{group}", [x]),
                       "kiln_numpy": lambda compiled=compiled, x=x: compiled(x),
                       "ort": lambda session=session, feeds=feeds: session.run(None, feeds),
                       "ort_int8": lambda s=session_int8, feeds=feeds: s.run(None, feeds)}, runs)
        floor_ms = moved / (bandwidth * 1e9) * 1e3
        rows.append({
            "case": f"gemv-int4-g{group}", "shape": [m, k, n], "group": group,
            "kiln_ms": round(times["kiln"], 4),
            "kiln_numpy_call_ms": round(times["kiln_numpy"], 4),
            "ort_matmulnbits_ms": round(times["ort"], 4),
            "ort_matmulnbits_int8_act_ms": round(times["ort_int8"], 4),
            "max_rel_err_ort_int8_act_vs_exact": float(
                f"{relative_error(session_int8.run(None, feeds)[0], want):.3g}"),
            "floor_ms": round(floor_ms, 4), "bandwidth_gbs": round(bandwidth, 1),
            "cache_resident_floor_ms": round(moved / (cached * 1e9) * 1e3, 4),
            "cache_resident_bandwidth_gbs": round(cached, 1),
            "bytes_moved": moved, "kiln_over_floor": round(times["kiln"] / floor_ms, 2),
            "kiln_over_ort": round(times["kiln"] / times["ort"], 3),
            "max_rel_err_vs_ort_exact": float(f"{relative_error(got, want):.3g}"),
            "max_rel_err_ort_nbits_vs_exact": float(
                f"{relative_error(session.run(None, feeds)[0], want):.3g}"),
            "so_bytes": size, "compile_s": round(compile_s, 2)})
        log.info("%s", rows[-1])
    return rows


def run_spec_case(name: str, workdir: Path, threads: int, runs: int) -> dict:
    """decoder-int4 / encoder-int8: kiln's artifact vs ORT (MatMulNBits / QDQ) vs torch."""
    import onnx
    import torch

    torch.set_num_threads(threads)
    case = QUANT_CASES[name](workdir)
    compiled, compile_s, size = _build(case.onnx_path, case.input_shapes, workdir / f"{name}-so")
    model = onnx.load(case.onnx_path)
    replaced = 0
    if name == "decoder-int4":
        ort_model, replaced = to_matmulnbits(model)
        ort_form = f"MatMulNBits ({replaced} MatMuls)"
    else:
        ort_model, ort_form = model, "QDQ int8, ORT optimizations on"
    session = ort_session(ort_model, threads)
    exact = ort_session(model, threads, optimize=False)
    feeds = case.inputs
    args = [feeds[k] for k in case.inputs]
    want = exact.run(None, feeds)[0]
    got = compiled(*args)[0]
    reference = case.torch_fn()
    reference = reference.numpy() if hasattr(reference, "numpy") else np.asarray(reference)
    fns = {"kiln": _vm_call(workdir / f"{name}-so", args),
           "kiln_numpy": lambda: compiled(*args), "ort": lambda: session.run(None, feeds),
           "torch": case.torch_fn}
    times = _time(fns, runs)
    kernels = kernel_profile(case.onnx_path, case.input_shapes, feeds)
    return {
        "case": name, "ort_form": ort_form,
        "kiln_ms": round(times["kiln"], 4), "kiln_numpy_call_ms": round(times["kiln_numpy"], 4),
        "ort_ms": round(times["ort"], 4),
        "torch_fp32_ms": round(times["torch"], 4),
        "kiln_over_ort": round(times["kiln"] / times["ort"], 3),
        "max_rel_err_vs_ort_exact": float(f"{relative_error(got, want):.3g}"),
        "sqnr_db_vs_fp32": round(sqnr_db(reference, got), 1),
        "so_bytes": size, "compile_s": round(compile_s, 2),
        "kiln_kernel_ms": kernels}


#: Kernels that read compressed weights (grouped GEMV, fused decode + matmul).
_QUANT_KERNEL = ("kiln_gemv", "decode", "dequantize")


def kernel_profile(onnx_path: Path, input_shapes, feeds, repeats: int = 5) -> dict[str, float]:
    """Per-kernel time (ms, mean of ``repeats`` runs) of kiln's host build, split into
    kernels that read compressed weights and the rest, plus the three slowest."""
    import tvm
    from tvm import relax

    from kiln.backends.tvm.importer import lower_to_relax
    from kiln.backends.tvm.pipeline import relax_pipeline
    from kiln.backends.tvm.targets import resolve_target
    from kiln.compiler.core.frontend import load_model

    target = resolve_target("host")
    mod = lower_to_relax(load_model(str(onnx_path), input_shapes=input_shapes))
    vm = relax.VirtualMachine(tvm.compile(mod, target=target.tvm_target(),
                                          relax_pipeline=relax_pipeline(target)), tvm.cpu())
    inputs = [tvm.runtime.tensor(feeds[name]) for name in input_shapes]
    vm["main"](*inputs)
    spent: dict[str, float] = {}
    started: dict[str, float] = {}

    def instrument(func, symbol, before_run, ret_value, *call_args):
        if before_run:
            started[symbol] = time.perf_counter()
        elif not symbol.startswith("vm.builtin"):
            spent[symbol] = spent.get(symbol, 0.0) + time.perf_counter() - started[symbol]
        return 0

    vm.set_instrument(instrument)
    for _ in range(repeats):
        vm["main"](*inputs)
    ms = {k: v * 1e3 / repeats for k, v in spent.items()}
    quant = sum(v for k, v in ms.items() if any(t in k for t in _QUANT_KERNEL))
    top = sorted(ms.items(), key=lambda kv: -kv[1])[:3]
    return {"compressed_weight_kernels": round(quant, 3),
            "other_kernels": round(sum(ms.values()) - quant, 3),
            **{f"top:{k}": round(v, 3) for k, v in top}}


def format_markdown(payload: dict) -> str:
    lines = [f"# Quantized kernels (commit {payload['commit']}, {payload['threads']} threads, "
             f"median of {payload['runs']} interleaved runs; shared noisy machine)", "",
             "kiln ms: the artifact's VM entry on device tensors (numpy call: through "
             "`kiln.backends.tvm.load`'s wrapper, which converts arrays each call).", "",
             "| case | kiln ms | kiln numpy call ms | ORT MatMulNBits ms | DRAM floor ms "
             "| kiln/floor | kiln/ORT | cache-resident floor ms "
             "| ORT MatMulNBits int8-activation ms (rel err) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in payload["gemv"]:
        lines.append(f"| {r['case']} | {r['kiln_ms']:.3f} | {r['kiln_numpy_call_ms']:.3f} | "
                     f"{r['ort_matmulnbits_ms']:.3f} | "
                     f"{r['floor_ms']:.3f} ({r['bandwidth_gbs']} GB/s) | "
                     f"{r['kiln_over_floor']:.2f} | {r['kiln_over_ort']:.2f} | "
                     f"{r['cache_resident_floor_ms']:.3f} "
                     f"({r['cache_resident_bandwidth_gbs']} GB/s) | "
                     f"{r['ort_matmulnbits_int8_act_ms']:.3f} "
                     f"({r['max_rel_err_ort_int8_act_vs_exact']:.1e}) |")
    lines += ["", "| case | kiln ms | kiln numpy call ms | ORT ms (form) | torch fp32 ms "
              "| kiln/ORT | SQNR vs fp32 dB | kiln kernels: compressed-weight / other ms |",
              "|---|---|---|---|---|---|---|---|"]
    for r in payload["models"]:
        k = r.get("kiln_kernel_ms", {})
        lines.append(f"| {r['case']} | {r['kiln_ms']:.3f} | {r['kiln_numpy_call_ms']:.3f} | "
                     f"{r['ort_ms']:.3f} ({r['ort_form']}) | "
                     f"{r['torch_fp32_ms']:.3f} | {r['kiln_over_ort']:.2f} | "
                     f"{r['sqnr_db_vs_fp32']} | {k.get('compressed_weight_kernels', '-')} / "
                     f"{k.get('other_kernels', '-')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cases_quant")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--cases", default="gemv-int4,decoder-int4,encoder-int8")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=str(HERE / "results_quant.json"))
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    import tempfile

    names = [n for n in args.cases.split(",") if n]
    payload = {"commit": (git_commit() or "unknown")[:12], "threads": args.threads,
               "runs": args.runs, "gemv": [], "models": []}
    with tempfile.TemporaryDirectory(prefix="kiln-bench-quant-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for name in names:
            if name == "gemv-int4":
                payload["gemv"] += run_gemv(workdir, args.threads, args.runs)
            else:
                payload["models"].append(run_spec_case(name, workdir, args.threads, args.runs))
            print(json.dumps(payload["gemv"][-2:] if name == "gemv-int4"
                             else payload["models"][-1]), flush=True)
    Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    print(format_markdown(payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
