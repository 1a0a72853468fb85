"""Times each case (kiln, ONNX Runtime, torch) by ``bench.timing``'s protocol and reports
medians and ratios."""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.build import build_case
from bench.case import ort_runner
from bench.cases import CASES
from bench.timing import git_commit, time_engines
from kiln.compiler.core.metrics import relative_error

log = logging.getLogger("bench")

# kiln must match ONNX Runtime this closely (relative to the output's largest magnitude).
MATCH_RTOL = 1e-4


def _max_rel_error(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    return max((relative_error(g, w) for g, w in zip(got, want, strict=True)), default=0.0)


def run_case(name: str, args: argparse.Namespace, workdir: Path) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    case = CASES[name](workdir)
    built = build_case(case, workdir / name, private=args.private, tuning=args.tuning,
                       threads=args.threads)
    if built.unscheduled:
        log.info("%s: %d kernels left unscheduled: %s", name, len(built.unscheduled),
                 ", ".join(built.unscheduled))
    ort_run = ort_runner(case, args.threads)
    error = _max_rel_error(built.run(case.inputs), ort_run())
    if error > MATCH_RTOL:
        log.warning("%s: kiln differs from ONNX Runtime by %.2e (relative to max |y|)", name, error)
    fns: dict[str, Callable[[], object]] = {"kiln": lambda: built.run(case.inputs), "ort": ort_run}
    if case.torch_fn is not None:
        fns["torch"] = case.torch_fn
    times = time_engines(args.protocol, fns, args.runs, args.warmup, args.gap_ms / 1e3)
    return {
        "case": name,
        "kiln_ms": round(times["kiln"], 4),
        "ort_ms": round(times["ort"], 4),
        "torch_ms": round(times["torch"], 4) if "torch" in times else None,
        "ratio_vs_ort": round(times["kiln"] / times["ort"], 4),
        "bytes": built.bytes,
        "compile_s": round(built.compile_s, 2),
        "tuned": bool(built.tuned) if built.tuned is not None else None,  # any tuning record used
        "tuned_kernels": built.tuned,  # kernels scheduled by a tuning record
        "max_rel_err_vs_ort": float(f"{error:.3g}"),
        "unscheduled_kernels": len(built.unscheduled) if built.unscheduled is not None else None,
        "built_via": built.via,
    }


def geomean(values: list[float]) -> float | None:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def format_table(results: list[dict], geo: float | None) -> str:
    header = f"{'case':<16}{'kiln ms':>11}{'ort ms':>10}{'torch ms':>10}{'kiln/ort':>10}" \
             f"{'MB':>8}{'compile s':>11}{'unsched':>9}{'tuned':>7}{'rel err':>10}"
    lines = [header, "-" * len(header)]
    for r in results:
        torch_ms = f"{r['torch_ms']:.3f}" if r["torch_ms"] is not None else "-"
        lines.append(f"{r['case']:<16}{r['kiln_ms']:>11.3f}{r['ort_ms']:>10.3f}{torch_ms:>10}"
                     f"{r['ratio_vs_ort']:>10.2f}{r['bytes'] / 1e6:>8.1f}{r['compile_s']:>11.1f}"
                     f"{'-' if r['unscheduled_kernels'] is None else r['unscheduled_kernels']:>9}"
                     f"{'-' if r.get('tuned') is None else r['tuned']:>7}"
                     f"{r['max_rel_err_vs_ort']:>10.1e}")
    if geo is not None:
        lines.append(f"geomean kiln/ort: {geo:.3f}")
    return "\n".join(lines)


def machine_description() -> dict[str, str]:
    """The CPU the bench ran on and the ``host`` target kiln built for (which
    ``KILN_HOST_MCPU`` may force to another CPU, e.g. ``x86-64-v3`` for the AVX2 path)."""
    from kiln.backends.tvm.targets import detect_host_cpu

    cpu, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu == "unknown CPU":
                cpu = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "other"
    if "avx512_vnni" in flags:
        isa += " + VNNI"
    return {"cpu": cpu, "isa": isa, "host_mcpu": detect_host_cpu()}


def format_markdown(payload: dict) -> str:
    """The results as a Markdown table (for bench/RESULTS.md)."""
    commit = (payload.get("commit") or "unknown")[:10]
    machine = payload.get("machine") or {}
    where = (f" Built for host mcpu `{machine['host_mcpu']}` on {machine['cpu']} "
             f"({machine['isa']}).") if machine else ""
    lines = [f"Commit `{commit}`, {payload['threads']} threads, median of {payload['runs']} "
             f"{payload.get('protocol', 'interleaved')} runs, tuning records: "
             f"{payload.get('tuning', 'shipped')}.{where}", "",
             "| case | kiln ms | ORT ms | torch ms | kiln/ORT | MB | compile s | tuned kernels "
             "| rel err vs ORT |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in payload["cases"]:
        torch_ms = f"{r['torch_ms']:.2f}" if r.get("torch_ms") is not None else "-"
        count = r.get("tuned_kernels", r.get("tuned"))
        tuned = "-" if count is None else str(int(count))
        lines.append(f"| {r['case']} | {r['kiln_ms']:.2f} | {r['ort_ms']:.2f} | {torch_ms} | "
                     f"{r['ratio_vs_ort']:.2f} | {r['bytes'] / 1e6:.1f} | {r['compile_s']:.1f} | "
                     f"{tuned} | {r['max_rel_err_vs_ort']:.1e} |")
    if payload.get("geomean_ratio_vs_ort") is not None:
        lines += ["", f"Geometric mean kiln/ORT (fp32 cases): "
                      f"**{payload['geomean_ratio_vs_ort']:.2f}**"]
    return "\n".join(lines) + "\n"


def run_bench(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.list:
        print("\n".join(CASES))
        return 0
    names = [n for n in args.cases.split(",") if n] or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"unknown case(s): {', '.join(unknown)}; known: {', '.join(CASES)}")
        return 2
    if getattr(args, "rpc", None):
        from bench.remote import run_remote

        return run_remote(args, names, CASES)
    results = []
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        for name in names:
            log.info("case %s", name)
            results.append(run_case(name, args, workdir))
            print(format_table(results[-1:], None).splitlines()[-1], flush=True)
    geo = geomean([r["ratio_vs_ort"] for r in results if r["case"].endswith("-fp32")])
    print()
    machine = machine_description()
    print(f"threads={args.threads} runs={args.runs} gap={args.gap_ms} ms "
          f"(median, {args.protocol}); host target mcpu={machine['host_mcpu']} "
          f"on {machine['cpu']} ({machine['isa']})")
    print(format_table(results, geo))
    if args.json:
        payload = {"commit": git_commit(), "threads": args.threads, "runs": args.runs,
                   "protocol": args.protocol, "tuning": args.tuning, "machine": machine,
                   "cases": results,
                   "geomean_ratio_vs_ort": round(geo, 4) if geo is not None else None}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
        print()
        print(format_markdown(payload))
    return 0
