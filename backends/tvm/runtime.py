"""Load and run a compiled artifact (``model.so`` + ``manifest.json``).

:func:`load` gives a :class:`CompiledModel`: call it with numpy arrays (in the
manifest's input order, or by name) and get numpy arrays back in the
manifest's output order. Inputs are checked against the manifest first, so a
wrong name, shape or dtype is a one-line KilnError rather than a TVM trace.
:func:`run_artifact` is the ``kiln run OUTDIR --inputs in.npz`` entry point.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from kiln.compiler.core.errors import KilnError

from .manifest import Manifest, TensorSpec, read_manifest, write_atomic
from .targets import cuda_device_present, host_arch

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


class CompiledModel:
    """A loaded artifact: ``model(*arrays, **named) -> list[np.ndarray]``."""

    def __init__(self, outdir: Path, manifest: Manifest) -> None:
        import tvm
        from tvm.runtime.vm import VirtualMachine

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
        self._library = tvm.runtime.load_module(str(library))
        self._vm = VirtualMachine(self._library, self.device)
        self._main = self._vm["main"]

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.manifest.inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self.manifest.outputs

    def _arrange(self, arrays: tuple[Any, ...], named: dict[str, Any]) -> list[np.ndarray]:
        """Inputs in manifest order, each checked for shape and dtype."""
        specs = self.manifest.inputs
        names = [s.name for s in specs]
        if len(arrays) > len(specs):
            raise KilnError(f"expected {len(specs)} input(s) ({', '.join(names)}), "
                            f"got {len(arrays)} positional")
        given: dict[str, Any] = dict(zip(names, arrays, strict=False))
        for name, value in named.items():
            if name not in names:
                raise KilnError(f"unknown input {name!r}; inputs are: {', '.join(names)}")
            if name in given:
                raise KilnError(f"input {name!r} given twice (positionally and by name)")
            given[name] = value
        ordered = []
        for spec in specs:
            if spec.name not in given:
                raise KilnError(f"missing input {spec.name!r} ({spec.describe()})")
            array = np.asarray(given[spec.name])
            got = TensorSpec(spec.name, tuple(array.shape), str(array.dtype))
            if got.shape != spec.shape or got.dtype != spec.dtype:
                raise KilnError(f"input {spec.name!r}: expected shape {spec.describe()}, "
                                f"got {got.describe()}")
            ordered.append(np.ascontiguousarray(array))
        return ordered

    def __call__(self, *arrays: Any, **named: Any) -> list[np.ndarray]:
        import tvm

        ordered = self._arrange(arrays, named)
        args = [tvm.runtime.tensor(a, self.device) for a in ordered]
        result = self._main(*args)
        results = [result] if isinstance(result, tvm.runtime.Tensor) else list(result)
        return [r.numpy() for r in results]

    def __repr__(self) -> str:
        ins = ", ".join(f"{s.name} {s.describe()}" for s in self.inputs)
        return f"CompiledModel({self.outdir}, target={self.manifest.target_name!r}, inputs: {ins})"


def load(outdir: Path | str) -> CompiledModel:
    """Load the artifact in ``outdir`` for this machine (CPU, or the GPU for CUDA builds)."""
    outdir = Path(outdir)
    return CompiledModel(outdir, read_manifest(outdir))


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
                 output_npz: Path | str | None = None) -> list[np.ndarray]:
    """Run the artifact in ``outdir`` on the arrays of ``inputs_npz``.

    Outputs are returned in manifest order and, with ``output_npz``, saved
    there (keys = output names), written atomically.
    """
    model = load(outdir)
    outputs = model(**_npz_inputs(model, Path(inputs_npz)))
    if output_npz is not None:
        buffer = io.BytesIO()
        named = {spec.name: array for spec, array in zip(model.outputs, outputs, strict=True)}
        np.savez(buffer, **named)
        write_atomic(Path(output_npz), buffer.getvalue())
        logger.info("wrote %d output(s) to %s", len(outputs), output_npz)
    return outputs
