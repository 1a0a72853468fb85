"""Timing scheduled kernels with MetaSchedule's builder and runner (records are kept
only when they beat kiln's own rule measured the same way)."""

from __future__ import annotations

import logging
import os

import tvm
from tvm import tirx

from kiln.backends.tvm import remote

log = logging.getLogger(__name__)


def build_candidate(mod: tvm.IRModule, target: tvm.target.Target, _params=None):
    """MetaSchedule's candidate build without its ``import tvm.s_tir.tensor_intrin``.

    The default build imports TVM's tensor-intrinsic registry in every fresh builder
    worker (MetaSchedule restarts its builder pool for each batch): 27 s per batch
    here, longer than the builds. kiln's fp32 search space uses no tensor intrinsics.
    """
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm.tirx.build(mod, target=target)


def candidate_builder():
    """MetaSchedule's local builder with :func:`build_candidate`, one worker per core."""
    from tvm.s_tir import meta_schedule as ms

    return ms.builder.LocalBuilder(f_build=build_candidate, max_workers=os.cpu_count() or 1)


def _best_secs(run_secs) -> float | None:
    """The fastest repeat: on a shared machine the slower ones measure the neighbours."""
    values = [float(v) for v in run_secs] if run_secs else []
    good = [v for v in values if v < 1e9]
    return min(good) if good else None


def measure(funcs: dict[str, tirx.PrimFunc], target: tvm.target.Target) -> dict[str, float]:
    """Seconds per call of each (scheduled) PrimFunc, with MetaSchedule's builder and runner."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    names = list(funcs)
    if not names:
        return {}
    builder = candidate_builder()
    runner = remote.runner(ms.runner.EvaluatorConfig(  # on a board with --rpc
        number=3, repeat=3, min_repeat_ms=50, enable_cpu_cache_flush=False))
    mods = [tvm.IRModule({"main": funcs[n].with_attr("global_symbol", "main")}) for n in names]
    built = builder.build([ms.builder.BuilderInput(m, target) for m in mods])
    inputs, order = [], []
    for name, mod, result in zip(names, mods, built, strict=True):
        if result.error_msg:
            log.debug("measuring %s failed to build: %s", name, result.error_msg)
            continue
        # the args after the packing block is removed (a packed weight is a packed param)
        measured = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)["main"]
        inputs.append(ms.runner.RunnerInput(result.artifact_path, "cpu",
                                            ms.arg_info.ArgInfo.from_prim_func(measured)))
        order.append(name)
    out = {}
    for name, future in zip(order, runner.run(inputs), strict=True):
        result = future.result()
        secs = _best_secs(result.run_secs) if not result.error_msg else None
        if result.error_msg:
            log.debug("measuring %s failed: %s", name, result.error_msg[-1500:])
        if secs is not None:
            out[name] = secs
    return out


def measure_pairs(kiln_funcs: dict[str, tirx.PrimFunc], tuned_funcs: dict[str, tirx.PrimFunc],
                   target: tvm.target.Target) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds per call of kiln's and the record's schedule of each kernel, measured
    alternately (kiln, record, kiln, record, ...) and each twice, keeping the faster run."""
    funcs = {}
    for name, func in tuned_funcs.items():
        if name in kiln_funcs:
            funcs[f"kiln:{name}"] = kiln_funcs[name]
        funcs[f"ms:{name}"] = func
    first, second = measure(funcs, target), measure(funcs, target)
    measured = {k: min(v for v in (first.get(k), second.get(k)) if v is not None)
                for k in funcs if k in first or k in second}
    kiln = {k[5:]: v for k, v in measured.items() if k.startswith("kiln:")}
    tuned = {k[3:]: v for k, v in measured.items() if k.startswith("ms:")}
    return kiln, tuned

