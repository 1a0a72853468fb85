"""kiln vs llama.cpp vs ONNX Runtime GenAI on one Llama checkpoint: greedy decode tokens/s and
prefill time, same weights, same thread count (issue 18, docs/llm.md).

The checkpoint is bench/cases_llm.py's random 12-layer, hidden-768 Llama (``save_random_llama
(..., "bench", seed=SEED)``) plus a small sentencepiece tokenizer trained here on the standard
library's sources (both converters insist on one; its 1000 pieces are padded to the model's
32000 ids). Each engine gets the checkpoint through its own tool:

kiln        ``compile_checkpoint(..., spec="llm-int4")``: int4 g32 weights, the symbolic build
            for the prompt and the one-token ``decode/`` build (kiln.compiler.driver.generate)
llama.cpp   ``convert_hf_to_gguf.py --outtype f32`` (from a llama.cpp source tree: the sdist of
            llama-cpp-python holds one under vendor/llama.cpp; ``--llama-cpp-src``), then
            ``llama_cpp.llama_model_quantize`` to Q4_0
ORT GenAI   ``python -m onnxruntime_genai.models.builder -i CHECKPOINT -p int4 -e cpu``, with
            ``intra_op_num_threads`` set in its genai_config.json

The optional packages (llama-cpp-python, onnxruntime-genai, sentencepiece) are imported only
when their engine runs; an engine whose package is missing is skipped with one line. They
belong in a separate environment (docs/llm.md says how), e.g.::

    /tmp/llmvenv/bin/python -m bench.llm_compare --workdir /tmp/llm-compare \\
        --llama-cpp-src /path/to/llama.cpp --threads 2 --json /tmp/llm-compare.json

Timing: ``--repeats`` rounds, each engine once per round in turn (interleaved, so drift of a
shared machine falls on all alike); per round a prompt of ``--prompt`` tokens then
``--new`` greedy tokens (decode tokens/s over the one-token steps; also the fastest
step, the figure least hurt by other tenants), and a separate
``--prefill``-token prompt (its time). Medians over the rounds.

``OMP_WAIT_POLICY`` defaults to PASSIVE, so that no engine runs beside another's spinning
OpenMP pool; llama.cpp's own speed needs ``--engines llama.cpp`` alone with
``OMP_WAIT_POLICY=ACTIVE`` (2.4x faster decode that way in docs/llm.md's run).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from bench.case import SEED

#: one engine's run: (prompt ids, new tokens) -> (prefill seconds, decode step seconds, tokens)
Run = Callable[[Sequence[int], int], tuple[float, list[float], list[int]]]
PIECES = 1000


def checkpoint(workdir: Path) -> Path:
    """The bench Llama with a tokenizer (written once per workdir)."""
    from kiln.compiler.testing.llm_models import corpus_bytes, save_random_llama

    folder = workdir / "checkpoint"
    if (folder / "tokenizer.json").exists():
        return folder
    save_random_llama(folder, "bench", seed=SEED)
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    text = workdir / "tokenizer-corpus.txt"
    text.write_bytes(corpus_bytes(1_000_000))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(folder / "tokenizer"),
                                   vocab_size=PIECES, model_type="bpe", unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, minloglevel=2)
    LlamaTokenizer.from_pretrained(folder).save_pretrained(folder)
    return folder


def kiln_engine(ckpt: Path, workdir: Path, threads: int) -> Run:
    from kiln.compiler.driver.generate import compile_checkpoint, compiled_step, greedy

    out = workdir / "kiln-int4"
    if not (out / "decode" / "manifest.json").exists():
        compile_checkpoint(ckpt, out, spec="llm-int4", progress=print)
    step, layout = compiled_step(out, threads=threads)

    def run(prompt, new):
        result = greedy(step, layout, prompt, new)
        return result.prefill_seconds, result.decode_seconds, result.tokens

    return run


def llama_cpp_engine(ckpt: Path, workdir: Path, threads: int, source: Path | None) -> Run:
    import llama_cpp

    q4 = workdir / "model-q4_0.gguf"
    if not q4.exists():
        f32 = workdir / "model-f32.gguf"
        if not f32.exists():
            if source is None or not (source / "convert_hf_to_gguf.py").exists():
                raise RuntimeError("llama.cpp's convert_hf_to_gguf.py: give --llama-cpp-src")
            subprocess.run([sys.executable, str(source / "convert_hf_to_gguf.py"), str(ckpt),
                            "--outtype", "f32", "--outfile", str(f32)], check=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
        params.nthread = threads
        if llama_cpp.llama_model_quantize(str(f32).encode(), str(q4).encode(),
                                          ctypes.byref(params)) != 0:
            raise RuntimeError("llama_model_quantize to Q4_0 failed")
    llm = llama_cpp.Llama(model_path=str(q4), n_threads=threads, n_threads_batch=threads,
                          n_ctx=2048, n_batch=512, n_ubatch=512, verbose=False)

    def last_logits():  # the context keeps the last token's row (llm.scores is left unset)
        return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))

    def run(prompt, new):
        llm.reset()
        began = time.perf_counter()
        llm.eval(list(prompt))
        prefill = time.perf_counter() - began
        tokens = [int(np.argmax(last_logits()))]
        steps = []
        for _ in range(new - 1):
            began = time.perf_counter()
            llm.eval([tokens[-1]])
            steps.append(time.perf_counter() - began)
            tokens.append(int(np.argmax(last_logits())))
        return prefill, steps, tokens

    return run


def ort_genai_engine(ckpt: Path, workdir: Path, threads: int) -> Run:
    import onnxruntime_genai as og

    out = workdir / "ort-genai-int4"
    config = out / "genai_config.json"
    if not config.exists():
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt),
                        "-o", str(out), "-p", "int4", "-e", "cpu",
                        "-c", str(workdir / "ort-genai-cache")], check=True)
    data = json.loads(config.read_text())
    data["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    config.write_text(json.dumps(data, indent=2))
    model = og.Model(str(out))

    def run(prompt, new):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + new, do_sample=False)
        generator = og.Generator(model, params)
        began = time.perf_counter()
        generator.append_tokens(list(prompt))     # the prompt's forward pass
        generator.generate_next_token()           # picks token 1 from its logits
        prefill = time.perf_counter() - began
        steps = []
        for _ in range(new - 1):                  # each: token i's forward, then pick i + 1
            began = time.perf_counter()
            generator.generate_next_token()
            steps.append(time.perf_counter() - began)
        return prefill, steps, [int(t) for t in generator.get_sequence(0)[len(prompt):]]

    return run


def engines(names: Sequence[str], ckpt: Path, workdir: Path, threads: int,
            source: Path | None) -> dict[str, Run]:
    """The engines that could be prepared; a missing optional package skips its engine."""
    makers = {"kiln": lambda: kiln_engine(ckpt, workdir, threads),
              "llama.cpp": lambda: llama_cpp_engine(ckpt, workdir, threads, source),
              "ort-genai": lambda: ort_genai_engine(ckpt, workdir, threads)}
    ready = {}
    for name in names:
        try:
            ready[name] = makers[name]()
        except ImportError as missing:
            print(f"skipping {name}: {missing} (install it in a separate environment)")
    return ready


def measure(runs: dict[str, Run], prompt: int, new: int, prefill: int, repeats: int
            ) -> dict[str, dict]:
    rng = np.random.default_rng(SEED)
    short = [int(t) for t in rng.integers(3, PIECES, prompt)]
    long = [int(t) for t in rng.integers(3, PIECES, prefill)]
    rows: dict[str, dict[str, list]] = {n: {"tps": [], "best": [], "prefill": [], "tokens": []}
                                       for n in runs}
    for run in runs.values():                     # warm-up: one short generation each
        run(short, 4)
    for _ in range(repeats):
        for name, run in runs.items():
            _, steps, tokens = run(short, new)
            rows[name]["tps"].append(len(steps) / sum(steps))
            rows[name]["best"].append(min(steps))
            rows[name]["tokens"] = tokens
            rows[name]["prefill"].append(run(long, 1)[0] if prefill else 0.0)
    return {name: {"decode_tokens_per_second": round(statistics.median(r["tps"]), 2),
                   # the fastest step of all rounds: what a quiet machine approaches
                   "fastest_step_ms": round(1e3 * min(r["best"]), 2),
                   f"prefill_{prefill}_ms": round(1e3 * statistics.median(r["prefill"]), 1),
                   "tokens": r["tokens"][:16]} for name, r in rows.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/kiln-llm-compare"))
    parser.add_argument("--engines", default="kiln,llama.cpp,ort-genai")
    parser.add_argument("--llama-cpp-src", type=Path, default=None,
                        help="a llama.cpp source tree (for convert_hf_to_gguf.py)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--prefill", type=int, default=512, help="0: no prefill timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # before TVM starts: a pool made first by the build's check would keep 1 worker
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    ckpt = checkpoint(args.workdir)
    runs = engines(args.engines.split(","), ckpt, args.workdir, args.threads, args.llama_cpp_src)
    results = measure(runs, args.prompt, args.new, args.prefill, args.repeats)
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    report = {"threads": args.threads, "prompt": args.prompt, "new": args.new, "load": load,
              "engines": results}
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
