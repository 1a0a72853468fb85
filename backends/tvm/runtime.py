"""Load and run a compiled artifact (``model.so`` + ``manifest.json``).

:func:`load` gives a :class:`CompiledModel`: call it with numpy arrays (in the
manifest's input order, or by name) and get numpy arrays back in the
manifest's output order. Inputs are checked against the manifest first, so a
wrong name, shape or dtype is a one-line KilnError rather than a TVM trace.
:func:`run_artifact` is the ``kiln run OUTDIR --inputs in.npz`` entry point.

Threads. TVM's CPU thread pool splits each parallel loop statically, one chunk per
thread, and waits for the slowest: a thread that shares its core with a busy neighbour
(another thread pool still spinning, a preprocessing thread, another process) stalls
every kernel by up to a scheduler time slice (measured before this: 23x slower beside a
spinning ONNX Runtime worker on 2 cores). So ``threads=`` (default: the cores this
process may use, capped by TVM's pool size, ``TVM_NUM_THREADS``) is the most a call
uses; the first calls of a default model use the cores free at load time
(:func:`free_cores`), and every call's count is then chosen from the model's own call
times (:class:`ThreadGovernor`, in threads.py: a stalled call drops a thread, and the
other count is tried now and then, backing off from 1 s to a minute while it loses).
``adapt=False`` keeps exactly ``threads``. TVM's workers are not pinned to cores
(``TVM_BIND_THREADS=0`` unless set), so the OS can move them off a busy one, and they
keep TVM's idle spin (threads.SPIN_COUNT). TVM keeps one pool per calling thread: the
count is applied in each thread that calls the model.

Buffers (CPU). An input that is contiguous, writable and on a 64-byte boundary is passed
to TVM as it is (DLPack); any other is copied into an aligned buffer the model keeps for
that input (one per calling thread, reused by the next call) instead of a fresh TVM
allocation each call. The outputs are TVM's own output tensors handed over as numpy
arrays without a copy: each call's are new memory the caller owns (a later call never
writes into them). An output that could be seen elsewhere is copied: one that overlaps
an input (an Identity output), another output of the call, or an output of the previous
call still held by the model (a constant output; the first call from each thread copies
every output, as nothing is known yet). So the model holds one call's outputs per
calling thread beyond what the caller keeps.

Repeated inputs. Each thread keeps its previous call's inputs with their TVM tensors: an
input that is the same array object, with the same shape, strides and dtype, keeps its
tensor (no check, no DLPack wrapping again; a staged one is copied again, as its values
may have changed) and the call reads what it holds now. A decode loop passing the same
cache buffers every step (27 inputs, 25 outputs) so spends ~0.2 ms less CPU a step
outside the kernels (docs/llm.md, Session 12). The outputs' overlap checks are one sorted
sweep (:func:`spans_disjoint`), falling back to the check per output only when it finds one.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from kiln.compiler.core.atomic import write_atomic
from kiln.compiler.core.errors import KilnError

from .manifest import Manifest, TensorSpec, check_files, read_manifest
from .targets import cuda_device_present, host_arch
from .threads import ThreadGovernor, allowed_cores, configure_pool, free_cores, pool_state

logger = logging.getLogger(__name__)


def _prepare_cuda_jit() -> None:
    """Let TVM compile the library's CUDA C kernels on load.

    TVM 0.27 compiles CUDA kernels when the library is loaded, through the
    ``tvm_callback_cuda_compile`` hook registered by ``tvm.support.nvcc``. Its
    default NVRTC path needs the ``cuda-bindings`` package; without it, use nvcc.
    """
    import tvm.support.nvcc  # noqa: F401  (registers the compile hook)

    if "TVM_CUDA_COMPILE_MODE" in os.environ:
        return
    try:
        import cuda.bindings.nvrtc  # noqa: F401
    except ImportError:
        if shutil.which("nvcc") is None:
            raise KilnError("loading a CUDA artifact compiles its kernels: install nvcc "
                            "(CUDA toolkit) or `pip install cuda-bindings`") from None
        os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"


def _shape_fits(want: tuple, got: tuple, sizes: dict[str, int]) -> bool:
    """``got`` matches ``want`` (ints equal; a symbol takes one size across all inputs,
    recorded in ``sizes``)."""
    if len(want) != len(got):
        return False
    for w, g in zip(want, got, strict=True):
        if isinstance(w, str):
            if sizes.setdefault(w, int(g)) != g:
                return False
        elif w != g:
            return False
    return True


def _check_ranges(spec: TensorSpec, sizes: dict[str, int], dims: dict[str, list[int]]) -> None:
    """One line when a symbolic dim of ``spec`` is outside the range the build serves."""
    for axis, dim in enumerate(spec.shape):
        if isinstance(dim, str) and dim in dims:
            lo, hi = dims[dim]
            if not lo <= sizes[dim] <= hi:
                raise KilnError(f"input {spec.name!r} dim {axis} ({dim}) is {sizes[dim]}, "
                                f"outside the range this build serves ({dim}={lo}..{hi}); "
                                "rebuild with a wider --dim")


class CompiledModel:
    """A loaded artifact: ``model(*arrays, **named) -> list[np.ndarray]``.

    ``threads``: CPU threads each call uses (None: the cores free at load time).
    """

    def __init__(self, outdir: Path, manifest: Manifest, *, threads: int | None = None,
                 adapt: bool = True) -> None:
        import tvm

        self.outdir = Path(outdir)
        self.manifest = manifest
        if manifest.target_arch != host_arch():
            raise KilnError(f"{outdir}: built for {manifest.target_arch} "
                            f"({manifest.target_name}); this machine is {host_arch()}")
        if manifest.target_family == "cuda":
            if not cuda_device_present():
                raise KilnError(f"{outdir}: built for {manifest.target_name}, "
                                "but no CUDA GPU is visible")
            _prepare_cuda_jit()
            self.device = tvm.cuda(0)
        else:
            self.device = tvm.cpu(0)
        library = self.outdir / manifest.library
        if not library.is_file():
            raise KilnError(f"{outdir}: {manifest.library} is missing")
        module = tvm.runtime.load_module(str(library))
        self._vms = _ThreadVM(module, self.device, _load_time_weights(module, manifest,
                                                                      self.device))
        self._buffers = CallBuffers()
        self._names = [s.name for s in manifest.inputs]
        self._name_set = frozenset(self._names)
        #: each input's symbolic dims, (axis, symbol)
        self._symbols = [tuple((axis, dim) for axis, dim in enumerate(s.shape)
                               if isinstance(dim, str)) for s in manifest.inputs]
        if threads is not None and (not isinstance(threads, int) or threads < 1
                                    or isinstance(threads, bool)):
            raise KilnError(f"threads={threads!r}: expected a whole number of threads >= 1")
        #: the most CPU threads a call uses (TVM's pool may allow fewer than requested)
        self.max_threads = configure_pool(allowed_cores() if threads is None else threads)
        start = min(self.max_threads, free_cores()) if threads is None else self.max_threads
        #: CPU threads the next call uses
        self.threads = configure_pool(start)
        #: picks 1..max_threads per call from the call times (None: ``adapt=False``)
        self.governor = ThreadGovernor(self.max_threads, start) if adapt else None
        if threads is not None and self.max_threads < threads:
            logger.warning("%s: %d threads asked for, TVM's pool has %d (set TVM_NUM_THREADS "
                           "before TVM starts for more)", outdir, threads, self.threads)

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.manifest.inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self.manifest.outputs

    def _arrange(self, arrays: tuple[Any, ...], named: dict[str, Any]) -> list[np.ndarray]:
        """Inputs in manifest order, each checked for shape and dtype (one that is the same
        array object, shape and dtype as in this thread's previous call was checked then:
        only its symbols' sizes are recorded)."""
        specs = self.manifest.inputs
        names = self._names
        if len(arrays) > len(specs):
            raise KilnError(f"expected {len(specs)} input(s) ({', '.join(names)}), "
                            f"got {len(arrays)} positional")
        given: dict[str, Any] = dict(zip(names, arrays, strict=False))
        for name, value in named.items():
            if name not in self._name_set:
                raise KilnError(f"unknown input {name!r}; inputs are: {', '.join(names)}")
            if name in given:
                raise KilnError(f"input {name!r} given twice (positionally and by name)")
            given[name] = value
        ordered = []
        sizes: dict[str, int] = {}
        known = self._buffers.bound
        for index, spec in enumerate(specs):
            value = given.get(spec.name, _MISSING)
            if value is _MISSING:
                raise KilnError(f"missing input {spec.name!r} ({spec.describe()})")
            last = known.get(index)
            if last is not None and value is last.array and value.shape == last.shape \
                    and value.dtype == last.dtype and all(
                        sizes.setdefault(dim, last.shape[axis]) == last.shape[axis]
                        for axis, dim in self._symbols[index]):
                ordered.append(value)
                continue
            array = np.asarray(value)
            if not _shape_fits(spec.shape, array.shape, sizes) or str(array.dtype) != spec.dtype:
                got = TensorSpec(spec.name, tuple(array.shape), str(array.dtype))
                raise KilnError(f"input {spec.name!r}: expected shape {spec.describe()}, "
                                f"got {got.describe()}")
            if sizes:
                _check_ranges(spec, sizes, self.manifest.dims)
            ordered.append(array)
        return ordered

    def __call__(self, *arrays: Any, **named: Any) -> list[np.ndarray]:
        import tvm

        ordered = self._arrange(arrays, named)
        if getattr(pool_state, "threads", None) != self.threads:  # another thread or model
            configure_pool(self.threads)
        on_cpu = self.device.dlpack_device_type() == 1
        buffers = self._buffers
        if on_cpu:
            args, shared = buffers.inputs(ordered)
        else:
            # ascontiguousarray makes a 0-d array 1-d; TVM checks the rank, so keep it
            args = [device_tensor(np.ascontiguousarray(a).reshape(a.shape), self.device)
                    for a in ordered]
        started = time.perf_counter()
        result = self._vms.main(*args)
        if self.governor is not None and on_cpu:
            now = time.perf_counter()
            wanted = self.governor.observe(now - started, now,
                                           tuple(a.shape for a in ordered))
            if wanted != self.threads:
                logger.debug("%s: %d -> %d threads", self.outdir, self.threads, wanted)
                self.threads = configure_pool(wanted)
                self.governor.threads = self.threads
        results = [result] if isinstance(result, tvm.runtime.Tensor) else list(result)
        if not on_cpu:
            return [r.numpy() for r in results]
        return buffers.outputs(results, shared)

    def __repr__(self) -> str:
        ins = ", ".join(f"{s.name} {s.describe()}" for s in self.inputs)
        return (f"CompiledModel({self.outdir}, target={self.manifest.target_name!r}, "
                f"threads={self.threads}, inputs: {ins})")


_MISSING = object()

#: TVM takes a CPU array without copying only when it starts on this boundary
DLPACK_ALIGNMENT = 64


def _shareable(array: np.ndarray) -> bool:
    """TVM may read ``array`` in place (DLPack): contiguous, writable, 64-byte aligned."""
    return bool(array.size) and array.flags.c_contiguous and array.flags.writeable and \
        array.ctypes.data % DLPACK_ALIGNMENT == 0


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialized C-contiguous array starting on a ``DLPACK_ALIGNMENT`` boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + DLPACK_ALIGNMENT, dtype=np.uint8)
    start = -raw.ctypes.data % DLPACK_ALIGNMENT
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _span(tensor, nbytes: int) -> tuple[int, int]:
    """The bytes a compact TVM tensor covers, [first, past the last) (``data_ptr()`` is
    cheap where numpy's ``ctypes.data`` costs about a microsecond)."""
    start = tensor.data_ptr()
    return start, start + nbytes


def span_overlaps(span: tuple[int, int], spans: list[tuple[int, int]]) -> bool:
    return any(span[0] < hi and lo < span[1] for lo, hi in spans)


def _load_time_weights(module, manifest: Manifest, device) -> tuple:
    """The weights ``main`` takes after the inputs, computed once by the library's
    :data:`kiln.backends.tvm.load_time.INIT_FUNCTION` (none for most models)."""
    from tvm.runtime.vm import VirtualMachine

    from .manifest import LOAD_TIME_INIT as INIT_FUNCTION
    from .manifest import LOAD_TIME_KEY as MANIFEST_KEY

    if not manifest.extra.get(MANIFEST_KEY):
        return ()
    return tuple(VirtualMachine(module, device)[INIT_FUNCTION]())


class _ThreadVM(threading.local):
    """One Relax VM per calling thread over the one loaded library: a VM keeps its call
    frames' registers in itself, so two threads calling one VM at once overwrite each
    other's registers (seen as TVM's ``reg < frame->register_file.size()`` check failing)."""

    def __init__(self, library, device, load_time: tuple = ()) -> None:
        from tvm.runtime.vm import VirtualMachine

        self.vm = VirtualMachine(library, device)
        main = self.vm["main"]
        # weights the library computes once when loaded (load_time.INIT_FUNCTION)
        self.main = (lambda *args: main(*args, *load_time)) if load_time else main


class _Bound(NamedTuple):
    """One input of a thread's previous call: the array, its shape, dtype and strides then,
    and the TVM tensor (of it, or of its staging buffer) and the bytes that tensor covers."""

    array: np.ndarray | None  # None: not reused (TVM holds a copy of the values)
    shape: tuple
    dtype: np.dtype | None
    strides: tuple
    tensor: Any
    span: tuple[int, int] | None
    staged: np.ndarray | None


class CallBuffers(threading.local):
    """One calling thread's input staging buffers, its previous call's inputs (their TVM
    tensors, reused when the same array comes again: a decode loop's cache) and outputs
    (the module docstring says why each exists)."""

    def __init__(self) -> None:
        self.staging: dict[int, np.ndarray] = {}
        self.bound: dict[int, _Bound] = {}
        self.previous: list | None = None  # the last call's TVM output tensors
        self.previous_spans: list[tuple[int, int]] = []

    def inputs(self, arrays: list[np.ndarray]) -> tuple[list, list[tuple[int, int]]]:
        """TVM tensors of ``arrays`` and the memory they share with TVM (their spans)."""
        tensors, shared = [], []
        bound = self.bound
        for index, array in enumerate(arrays):
            last = bound.get(index)
            if last is None or array is not last.array or array.shape != last.shape \
                    or array.strides != last.strides or array.dtype != last.dtype:
                last = bound[index] = self._bind(index, array)
            elif last.staged is not None:  # its values may have changed since
                np.copyto(last.staged, array)
            tensors.append(last.tensor)
            if last.span is not None:
                shared.append(last.span)
        return tensors, shared

    def _bind(self, index: int, array: np.ndarray) -> _Bound:
        """The TVM tensor of a new input: ``array`` itself when TVM may read it in place,
        else its staging buffer (a copy of it now); its span when TVM reads that memory."""
        import tvm

        source, staged = array, None
        if array.size and not _shareable(array):
            buffer = self.staging.get(index)
            if buffer is None or buffer.shape != array.shape or buffer.dtype != array.dtype:
                buffer = self.staging[index] = aligned_empty(array.shape, array.dtype)
            np.copyto(buffer, array)
            source = staged = buffer
        tensor, span = None, None
        if source.size:
            try:
                tensor = tvm.runtime.from_dlpack(source)
                span = _span(tensor, source.nbytes)
            except Exception:  # an exotic dtype numpy cannot export: TVM copies it
                tensor = None
        if tensor is None:
            # ascontiguousarray makes a 0-d array 1-d; TVM checks the rank, so keep it
            tensor = tvm.runtime.tensor(np.ascontiguousarray(array).reshape(array.shape))
            if array.size:  # TVM's copy of values that may change: made again next call
                return _Bound(None, (), None, (), tensor, None, None)
        return _Bound(array, array.shape, array.dtype, array.strides, tensor, span, staged)

    def outputs(self, results: list, shared: list[tuple[int, int]]) -> list[np.ndarray]:
        """numpy arrays of the call's output tensors: TVM's memory where only the caller
        can see it, copies otherwise."""
        views: list = []
        for tensor in results:
            try:
                views.append(np.from_dlpack(tensor))
            except Exception:  # a dtype numpy has no DLPack import for
                views.append(None)
        spans = [None if v is None else _span(t, v.nbytes) for t, v in zip(results, views)]
        if self.previous is not None and all(v is not None and v.size and v.flags.c_contiguous
                                             for v in views) \
                and spans_disjoint(spans, shared + self.previous_spans):
            self.previous, self.previous_spans = results, spans
            return views  # the usual case, checked in one sweep
        arrays, kept = [], []
        for tensor, view, span in zip(results, views, spans, strict=True):
            if view is None:
                arrays.append(tensor.numpy())
                continue
            seen = self.previous is None or not view.size or not view.flags.c_contiguous or \
                span_overlaps(span, shared) or span_overlaps(span, kept) or \
                span_overlaps(span, self.previous_spans)
            arrays.append(view.copy() if seen else view)
            kept.append(span)
        self.previous, self.previous_spans = results, kept
        return arrays


def spans_disjoint(spans: list[tuple[int, int]], others: list[tuple[int, int]]) -> bool:
    """No span of ``spans`` overlaps another of them or one of ``others`` (those may overlap
    each other): one sweep over all of them sorted, where checking each output against the
    rest cost 25 outputs x 77 spans of Python comparisons a decode step."""
    top_all = top_out = 0  # the furthest end so far of any span / of ``spans`` alone
    for lo, hi, out in sorted([(lo, hi, True) for lo, hi in spans]
                              + [(lo, hi, False) for lo, hi in others]):
        if lo < (top_all if out else top_out):
            return False
        top_all = max(top_all, hi)
        if out:
            top_out = max(top_out, hi)
    return True


def device_tensor(array: np.ndarray, device):
    """``array`` as a TVM tensor on ``device``: on the CPU, a contiguous, writable array on
    a 64-byte boundary (what TVM's kernels assume) is passed without a copy (DLPack),
    anything else is copied."""
    import tvm

    if device.dlpack_device_type() == 1 and _shareable(array):
        try:
            return tvm.runtime.from_dlpack(array)
        except Exception:  # an exotic dtype numpy cannot export: copy it
            pass
    return tvm.runtime.tensor(array, device)


def load(outdir: Path | str, *, threads: int | None = None,
         adapt: bool = True) -> CompiledModel:
    """Load the artifact in ``outdir`` for this machine (CPU, or the GPU for CUDA builds).

    ``threads``: the most CPU threads a call uses (None: the cores this process may use;
    the first calls use those free now, :func:`free_cores`). ``adapt``: each call's count
    is chosen between 1 and that from the calls' times (:class:`ThreadGovernor`: fewer
    beside a busy process); False keeps exactly ``threads`` (benchmarks of one count).
    Every file the manifest covers is checked against its SHA-256 first (a folder mixing
    builds, or a damaged library, is a KilnError, never loaded).
    """
    outdir = Path(outdir)
    manifest = read_manifest(outdir)
    check_files(outdir, manifest)
    return CompiledModel(outdir, manifest, threads=threads, adapt=adapt)


def _npz_inputs(model: CompiledModel, path: Path) -> dict[str, np.ndarray]:
    """Arrays of an .npz by input name; ``arr_0``... (``np.savez(*arrays)``) map by position."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as err:
        raise KilnError(f"{path}: cannot read inputs ({err})") from err
    names = [s.name for s in model.inputs]
    positional = [f"arr_{i}" for i in range(len(data))]
    if sorted(data) == sorted(positional) and not set(data) & set(names):
        return {names[i]: data[f"arr_{i}"] for i in range(min(len(names), len(data)))}
    return data


def run_artifact(outdir: Path | str, inputs_npz: Path | str,
                 output_npz: Path | str | None = None, *,
                 threads: int | None = None) -> list[np.ndarray]:
    """Run the artifact in ``outdir`` on the arrays of ``inputs_npz`` (``threads`` as
    for :func:`load`).

    Outputs are returned in manifest order and, with ``output_npz``, saved
    there (keys = output names), written atomically.
    """
    model = load(outdir, threads=threads)
    outputs = model(**_npz_inputs(model, Path(inputs_npz)))
    if output_npz is not None:
        buffer = io.BytesIO()
        named = {spec.name: array for spec, array in zip(model.outputs, outputs, strict=True)}
        np.savez(buffer, **named)
        write_atomic(Path(output_npz), buffer.getvalue())
        logger.info("wrote %d output(s) to %s", len(outputs), output_npz)
    return outputs
