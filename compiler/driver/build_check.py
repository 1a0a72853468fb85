"""The TVM build of a compile's final model and its check against ONNX Runtime (the
compiled module on the verification samples, and a symbolic build at the low end, middle
and high end of its ranges)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.compiler.core.errors import VerificationError
from kiln.compiler.driver.report import CompiledReport
from kiln.compiler.driver.verify import compare

#: kiln.compiler.driver.compile.CompileResult (not imported: the driver imports this module)
CompileResult = Any

# The compiled module is compared with ONNX Runtime running the final model: float
# kernels may reorder sums (10x the verify tolerance); with quantized activations a
# rounding tie can land one quantization step away, so there a floor on SQNR applies.
COMPILED_TOLERANCE_FACTOR = 10.0
COMPILED_QUANTIZED_MIN_SQNR_DB = 35.0


def build_and_check(result: CompileResult, target, out: Path, progress, tune_trials: int,
                     tuning_db: Path | None) -> CompiledReport:
    from kiln.backends import tvm as tvm_backend

    preset = tvm_backend.resolve_target(target)
    if progress:
        progress(f"building for {preset.name}")
    built = tvm_backend.build_artifact(
        result.model, preset, out, model_hash=result.model_hash, tune_trials=tune_trials,
        tuning_db=tuning_db, keep_symbols=result.spec.output.keep_symbols,
        progress=(lambda step, done, total: progress(f"build: {step} ({done}/{total})"))
        if progress else None)
    report = CompiledReport(target=preset.name, library=built.library.name,
                            build_seconds=built.seconds, verified=False, binary=built.binary,
                            unscheduled=list(getattr(built, "unscheduled", []) or []),
                            sparse_kernels=list(getattr(built, "sparse_kernels", []) or []))
    if built.runs_on_host and result.samples:
        compiled = tvm_backend.load(out)
        outputs = [compiled(**feeds) for feeds in result.samples]
        names = [v.name for v in result.model.graph.outputs]
        metrics = compare(result.reference_outputs, outputs, names,
                          rtol=result.spec.verify.rtol * COMPILED_TOLERANCE_FACTOR,
                          atol=result.spec.verify.atol * COMPILED_TOLERANCE_FACTOR)
        report.verified = True
        report.sqnr_db = metrics.sqnr_db
        report.max_abs_err = metrics.max_abs_err
        quantized = any(p.modified and not p.exact and not p.skipped
                        for p in result.report.passes)
        close_enough = metrics.within_tolerance or (
            quantized and metrics.sqnr_db >= COMPILED_QUANTIZED_MIN_SQNR_DB)
        if not close_enough:
            raise VerificationError(f"the compiled module for {preset.name} does not match "
                                    f"ONNX Runtime: {metrics.describe()}",
                                    output=metrics.worst_output, sqnr_db=metrics.sqnr_db,
                                    max_abs_err=metrics.max_abs_err)
        _check_symbolic(result, compiled, preset.name, quantized)
    return report


def _check_symbolic(result: CompileResult, compiled, target: str, quantized: bool) -> None:
    """A symbolic build matches ONNX Runtime at the low end, middle and high end of its
    ranges (symbolic_check); VerificationError naming the first size that does not."""
    from kiln.compiler.driver.symbolic_check import check_sizes, describe_sizes

    verify = result.spec.verify
    for sizes, metrics in check_sizes(result.model, compiled, seed=verify.seed,
                                      rtol=verify.rtol * COMPILED_TOLERANCE_FACTOR,
                                      atol=verify.atol * COMPILED_TOLERANCE_FACTOR):
        if not (metrics.within_tolerance or
                (quantized and metrics.sqnr_db >= COMPILED_QUANTIZED_MIN_SQNR_DB)):
            raise VerificationError(f"the compiled module for {target} does not match ONNX "
                                    f"Runtime at {describe_sizes(sizes)}: {metrics.describe()}",
                                    output=metrics.worst_output, sqnr_db=metrics.sqnr_db,
                                    max_abs_err=metrics.max_abs_err)
