"""Small Relax test models: a ``main`` made by ``fn(bb, *params)`` over float32 inputs."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax


def relax_module(fn, *inputs: np.ndarray, shapes=None) -> tvm.IRModule:
    """A module whose ``main`` takes arrays shaped like ``inputs`` (or, given ``shapes``,
    one per input, shaped so: symbolic dims as ``tirx.Var``) and returns ``fn``'s value."""
    bb = relax.BlockBuilder()
    shapes = shapes or [a.shape for a in inputs]
    params = [relax.Var(f"x{n}", relax.TensorType(shape, "float32"))
              for n, shape in enumerate(shapes)]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(fn(bb, *params))
        bb.emit_func_output(out)
    return bb.get()


def build_scheduled(fn, x: np.ndarray):
    """``relax_module(fn, x)`` built for ``host`` by kiln's CPU pipeline: (the module after
    the schedule phase, the output on ``x``)."""
    from kiln.backends.tvm.pipeline import relax_pipeline
    from kiln.backends.tvm.targets import resolve_target

    target = resolve_target("host")
    scheduled: list[tvm.IRModule] = []
    executable = tvm.compile(relax_module(fn, x), target=target.tvm_target(),
                             relax_pipeline=relax_pipeline(target, None, scheduled.append))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    return scheduled[-1], vm["main"](tvm.runtime.tensor(x)).numpy()
