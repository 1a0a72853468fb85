"""Greedy decoding with a compiled decoder step (``kiln generate``, docs/llm.md).

A decoder step (:mod:`kiln.compiler.core.llm_export`) takes the new tokens, their
positions, a mask over the cached slots and every layer's cached keys (stored transposed,
``[1, kv_heads, head_dim, past]``) and values (``[1, kv_heads, past, head_dim]``), and
returns the logits and the new tokens' keys and values only. :func:`greedy` runs it: one
step over the whole prompt (prefill), then one step per generated token, each time
writing the new keys and values into the cache (:class:`KVCache`) and appending the
arg-max token.

The cache (:class:`KVCache`) is one buffer per cache input with spare slots (a multiple of
:data:`CACHE_CHUNK`), masked until filled: each token writes one column in place, the
buffers go to the step as they are (contiguous, 64-byte aligned: TVM reads them without a
copy), and the whole cache is copied only when it outgrows its buffers (once every
:data:`CACHE_CHUNK` tokens). The first slot stays masked (``past_mask = 0``, zeros) so
that no input dimension is ever 0 (kiln's symbolic dims start at 1); it gets no weight.

    from kiln.compiler.driver.generate import generate
    result = generate("MODEL_DIR", [1, 2, 3], max_new_tokens=16)   # compiles, then decodes
    result.tokens                                                  # the 16 new token ids
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kiln.compiler.core.errors import KilnError
from kiln.compiler.core.llm_export import is_llm_folder

logger = logging.getLogger(__name__)

#: one decoder step: named inputs -> outputs (logits, then the new keys/values in past order)
Step = Callable[[dict[str, np.ndarray]], Sequence[np.ndarray]]
_PAST = re.compile(r"^past_(key|value)_(\d+)$")


@dataclass(frozen=True)
class CacheLayout:
    """The cache inputs of a decoder step, read from its input names and shapes."""

    names: tuple[str, ...]          # past_key_0, past_value_0, past_key_1, ...
    kv_heads: int
    head_dim: int
    max_past: int | None = None     # the most cached slots the step accepts (None: unknown)

    @classmethod
    def from_inputs(cls, inputs: Sequence[tuple[str, Sequence]], dims: dict | None = None
                    ) -> CacheLayout:
        """``inputs``: (name, shape) pairs; ``dims``: the symbols' ranges (a manifest's)."""
        names = [n for n, _ in inputs]
        needed = ("input_ids", "position_ids", "past_mask")
        missing = [n for n in needed if n not in names]
        pasts = [(n, s) for n, s in inputs if _PAST.match(n)]
        if missing or not pasts or not pasts[0][0].startswith("past_key"):
            raise KilnError(f"not a kiln decoder step (inputs: {', '.join(names)}; expected "
                            "input_ids, position_ids, past_mask, past_key_N, past_value_N)")
        shape = list(pasts[0][1])       # past_key: [1, kv_heads, head_dim, past]
        kv_heads, head_dim = int(shape[1]), int(shape[2])
        max_past = None
        if dims and isinstance(shape[3], str) and shape[3] in dims:
            max_past = int(dims[shape[3]][1])
        return cls(tuple(n for n, _ in pasts), kv_heads, head_dim, max_past)

    def shape(self, name: str, slots: int) -> tuple[int, int, int, int]:
        """The shape of cache input ``name`` holding ``slots`` slots."""
        if name.startswith("past_key"):
            return (1, self.kv_heads, self.head_dim, slots)
        return (1, self.kv_heads, slots, self.head_dim)

    def empty(self) -> dict[str, np.ndarray]:
        """The starting cache: one masked slot of zeros (``past_mask`` not included)."""
        return {name: np.zeros(self.shape(name, 1), np.float32) for name in self.names}


#: the cache's buffers grow by this many slots (so the whole cache is copied once per
#: CACHE_CHUNK tokens, and attention reads at most CACHE_CHUNK - 1 masked spare slots)
CACHE_CHUNK = 64
#: buffers start on this boundary (TVM then reads them in place: runtime.DLPACK_ALIGNMENT)
ALIGNMENT = 64


def aligned_zeros(shape: Sequence[int], dtype) -> np.ndarray:
    """A zeroed C-contiguous array starting on an :data:`ALIGNMENT` boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.zeros(nbytes + ALIGNMENT, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start:start + nbytes].view(dtype).reshape(tuple(shape))


class KVCache:
    """A decoder step's cache inputs as growable buffers written in place.

    ``feeds()`` gives ``past_mask`` and every ``past_*`` buffer at its full capacity (the
    spare slots masked, zeros); ``append(news)`` writes a step's new keys and values
    (the step's outputs after the logits, in cache order) into the next slots. ``chunk=1``
    keeps no spare slot (a copy of the whole cache per step, as a concatenation would).
    """

    def __init__(self, layout: CacheLayout, chunk: int = CACHE_CHUNK) -> None:
        if chunk < 1:
            raise KilnError(f"chunk={chunk}: expected at least 1")
        self.layout, self.chunk = layout, chunk
        self.filled = 1                 # the masked first slot
        self.buffers: dict[str, np.ndarray] = {}
        self.mask = aligned_zeros((1, 1), np.int64)
        self._resize(self.capacity_for(1))

    @property
    def capacity(self) -> int:
        return int(self.mask.shape[1])

    def capacity_for(self, slots: int) -> int:
        """The buffer size for ``slots`` slots: a multiple of the chunk, within the step's
        range when that is known (never below ``slots``)."""
        capacity = -(-slots // self.chunk) * self.chunk
        if self.layout.max_past is not None:
            capacity = min(capacity, self.layout.max_past)
        return max(capacity, slots)

    def _resize(self, capacity: int) -> None:
        kept = self.filled
        for name in self.layout.names:
            buffer = aligned_zeros(self.layout.shape(name, capacity), np.float32)
            old = self.buffers.get(name)
            if old is not None:
                if name.startswith("past_key"):
                    buffer[..., :kept] = old[..., :kept]
                else:
                    buffer[:, :, :kept] = old[:, :, :kept]
            self.buffers[name] = buffer
        self.mask = aligned_zeros((1, capacity), np.int64)
        self.mask[0, 1:kept] = 1

    def feeds(self) -> dict[str, np.ndarray]:
        return {"past_mask": self.mask, **self.buffers}

    def append(self, news: Sequence[np.ndarray]) -> None:
        if len(news) != len(self.layout.names):
            raise KilnError(f"the step returned {len(news)} cache outputs after the logits; "
                            f"expected {len(self.layout.names)} (new_key_N, new_value_N)")
        seq = int(news[0].shape[-1])
        start, end = self.filled, self.filled + seq
        if end > self.capacity:
            self._resize(self.capacity_for(end))
        for name, new in zip(self.layout.names, news, strict=True):
            if name.startswith("past_key"):      # [1, KV, D, seq] into slots start..end
                self.buffers[name][..., start:end] = new
            else:                                # [1, KV, seq, D]
                self.buffers[name][:, :, start:end] = new
        self.mask[0, start:end] = 1
        self.filled = end


@dataclass
class Generation:
    """What :func:`greedy` produced: the new tokens, and timings in seconds."""

    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    #: the logits row each new token was picked from (``keep_logits=True``)
    logits: list[np.ndarray] = field(default_factory=list)
    prefill_seconds: float = 0.0
    decode_seconds: list[float] = field(default_factory=list)

    def decode_tokens_per_second(self) -> float | None:
        """New tokens per second over the decode steps (the prefill's token excluded)."""
        total = sum(self.decode_seconds)
        return len(self.decode_seconds) / total if total > 0 else None


def greedy(step: Step, layout: CacheLayout, prompt: Sequence[int], max_new_tokens: int, *,
           keep_logits: bool = False, stop: Sequence[int] = (), chunk: int = CACHE_CHUNK
           ) -> Generation:
    """Decode ``max_new_tokens`` tokens after ``prompt`` greedily (stopping early at a
    token in ``stop``); ``chunk``: the cache's growth step (:class:`KVCache`)."""
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise KilnError("the prompt is empty: give at least one token id")
    if max_new_tokens < 1:
        raise KilnError(f"max_new_tokens={max_new_tokens}: expected at least 1")
    needed = len(prompt) + max_new_tokens   # cached slots at the last step, the masked one too
    if layout.max_past is not None and needed - 1 > layout.max_past:
        raise KilnError(f"{len(prompt)} prompt + {max_new_tokens} new tokens need "
                        f"{needed - 1} cached slots; the step takes at most {layout.max_past}")
    result = Generation(prompt)
    cache = KVCache(layout, chunk)
    ids = np.asarray([prompt], np.int64)
    positions = np.arange(len(prompt), dtype=np.int64)[None]
    for i in range(max_new_tokens):
        feeds = {"input_ids": ids, "position_ids": positions, **cache.feeds()}
        began = time.perf_counter()
        outputs = step(feeds)
        seconds = time.perf_counter() - began
        if i == 0:
            result.prefill_seconds = seconds
        else:
            result.decode_seconds.append(seconds)
        row = outputs[0][0, -1]
        token = int(np.argmax(row))
        result.tokens.append(token)
        if keep_logits:
            result.logits.append(np.array(row))
        if token in stop or i == max_new_tokens - 1:
            break
        cache.append(outputs[1:1 + len(layout.names)])
        ids = np.asarray([[token]], np.int64)
        positions = np.asarray([[cache.filled - 1]], np.int64)
    return result


def teacher_forced(step: Step, layout: CacheLayout, tokens: Sequence[int], prefill: int = 1
                   ) -> np.ndarray:
    """The logits rows at positions ``prefill - 1 .. len(tokens) - 1`` when ``tokens`` are fed
    as the model's own output would be: a prefill of the first ``prefill``, then one step
    per token through the cache (for agreement figures on real text)."""
    tokens = [int(t) for t in tokens]
    if not 1 <= prefill <= len(tokens):
        raise KilnError(f"prefill={prefill} for {len(tokens)} tokens")
    cache = KVCache(layout)
    rows, start, ids = [], 0, tokens[:prefill]
    while True:
        outputs = step({"input_ids": np.asarray([ids], np.int64),
                        "position_ids": np.arange(start, start + len(ids), dtype=np.int64)[None],
                        **cache.feeds()})
        rows.append(np.array(outputs[0][0, -1]))
        start += len(ids)
        if start >= len(tokens):
            return np.stack(rows)
        cache.append(outputs[1:1 + len(layout.names)])
        ids = [tokens[start]]


#: the folder, inside a compiled decoder, of its one-token build (``seq`` fixed at 1)
DECODE_DIR = "decode"


def decode_shapes(max_past: int) -> dict[str, list]:
    """The input shapes of the one-token build: static rows (so the backend's int4 GEMV
    rules apply), the cache length still symbolic."""
    return {"input_ids": [1, 1], "position_ids": [1, 1], "*past": [f"past=1..{max_past}"]}


def compile_decode(folder: str | os.PathLike, *, target: str | dict | None = "host",
                   progress=None) -> Path | None:
    """Build ``folder``'s one-token decode step into ``folder/decode`` from the folder's
    (already compressed) ``model.onnx``, no passes; None when ``seq`` is not symbolic."""
    import json

    from kiln.compiler.driver.compile import compile_to_folder

    folder = Path(folder)
    dims = json.loads((folder / "manifest.json").read_text()).get("dims") or {}
    if "seq" not in dims or "past" not in dims:
        return None
    if progress is not None:
        progress("building the one-token decode step (seq = 1)")
    compile_to_folder(folder / "model.onnx", None, folder / DECODE_DIR,
                      input_shapes=decode_shapes(int(dims["past"][1])), target=target,
                      progress=progress)
    return folder / DECODE_DIR


def with_decode_build(after_write: Callable[[Path], object] | None, target, progress=None
                      ) -> Callable[[Path], None]:
    """An ``after_write`` for ``compile_to_folder`` that runs ``after_write`` (if any), then
    adds the one-token build (:func:`compile_decode`): what ``kiln compile MODEL_DIR -o OUTDIR``
    does for a checkpoint folder."""
    def write(staging: Path) -> None:
        if after_write is not None:
            after_write(staging)
        compile_decode(staging, target=target, progress=progress)

    return write


def builds_in(outdir: str | os.PathLike) -> list[str]:
    """The builds a compiled decoder folder holds, in words (for the CLI's report)."""
    import json

    outdir = Path(outdir)
    found = []
    for folder, what in ((outdir, "the symbolic step (prompts, any seq)"),
                         (outdir / DECODE_DIR, "the one-token step (seq = 1, decoding)")):
        manifest = folder / "manifest.json"
        if manifest.is_file():
            dims = json.loads(manifest.read_text()).get("dims") or {}
            ranges = ", ".join(f"{k} {lo}..{hi}" for k, (lo, hi) in sorted(dims.items()))
            found.append(f"{folder}/: {what}" + (f" [{ranges}]" if ranges else ""))
    return found


def compiled_step(outdir: str | os.PathLike, *, threads: int | None = None
                  ) -> tuple[Step, CacheLayout]:
    """The decoder step of a compiled artifact (``kiln compile MODEL_DIR -t host -o OUTDIR``);
    with a ``decode/`` build inside (:func:`compile_decode`), one-token steps run on it."""
    from kiln.backends import tvm as tvm_backend

    model = tvm_backend.load(outdir, threads=threads)
    layout = CacheLayout.from_inputs([(s.name, s.shape) for s in model.inputs],
                                     model.manifest.dims)
    if not (Path(outdir) / DECODE_DIR / "manifest.json").is_file():
        return (lambda feeds: model(**feeds)), layout
    decode = tvm_backend.load(Path(outdir) / DECODE_DIR, threads=threads)

    def step(feeds: dict[str, np.ndarray]) -> Sequence[np.ndarray]:
        return (decode if feeds["input_ids"].shape[1] == 1 else model)(**feeds)

    return step, layout


def compile_checkpoint(model_dir: str | os.PathLike, outdir: str | os.PathLike, *,
                       spec=None, target: str = "host", progress=None, decode: bool = True,
                       input_shapes=None):
    """``kiln compile MODEL_DIR --spec SPEC -t TARGET -o OUTDIR``, plus (``decode``) the
    one-token build in ``OUTDIR/decode`` (:func:`compile_decode`)."""
    from kiln.compiler.driver.compile import compile_to_folder

    return compile_to_folder(model_dir, spec, outdir, input_shapes=input_shapes, target=target,
                             progress=progress,
                             after_write=with_decode_build(None, target, progress)
                             if decode else None)


def generate(model: str | os.PathLike, prompt: Sequence[int], max_new_tokens: int, *,
             spec=None, outdir: str | os.PathLike | None = None, threads: int | None = None,
             keep_logits: bool = False, progress=None) -> Generation:
    """Greedy decoding with ``model``: a compiled OUTDIR, or a checkpoint folder that is
    compiled first (with ``spec``, into ``outdir`` or a temporary folder)."""
    path = Path(model)
    if (path / "manifest.json").is_file():
        step, layout = compiled_step(path, threads=threads)
        return greedy(step, layout, prompt, max_new_tokens, keep_logits=keep_logits)
    if not is_llm_folder(path):
        raise KilnError(f"{path}: neither a compiled artifact (manifest.json) nor a "
                        "checkpoint folder (config.json)")
    with tempfile.TemporaryDirectory(prefix="kiln-generate-") as scratch:
        target_dir = Path(outdir) if outdir is not None else Path(scratch) / "build"
        compile_checkpoint(path, target_dir, spec=spec, progress=progress)
        step, layout = compiled_step(target_dir, threads=threads)
        return greedy(step, layout, prompt, max_new_tokens, keep_logits=keep_logits)
