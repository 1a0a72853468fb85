"""fuse_decode: a weight's decode kernel moves into the matmul that reads it."""

from __future__ import annotations

import numpy as np
import tvm

from kiln.backends.tvm import lower_to_relax, resolve_target
from kiln.compiler.core.metrics import relative_error
from kiln.compiler.testing.onnx_models import blocked_int4_matmul, to_ir
from kiln.compiler.testing.reference import REL_TOL, ort_outputs

#: The 128x64 int4 weight in 32-column nibble tiles (importer.nibbles.pack_nibbles_tiled).
PACKED = ("uint8", (2, 128, 16))


def _legalize(mod, *decode_fusion):
    """Legalize, fold (keeping compressed weights), fuse, then ``decode_fusion``: the
    legalize steps of a build that bear on a matmul."""
    from tvm import relax

    from kiln.backends.tvm.keep_compressed import fold_constants_keeping_compressed

    return tvm.transform.Sequential([
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        fold_constants_keeping_compressed(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        *decode_fusion,
    ])(mod)


def _kernels(mod) -> dict:
    from tvm import tirx

    return {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)}


def _main_constants(mod) -> list[tuple[str, tuple[int, ...]]]:
    from tvm import relax

    found = []

    def visit(node) -> None:
        if isinstance(node, tvm.ir.GenericConst):
            found.append((str(node.value.dtype), tuple(node.value.shape)))

    relax.analysis.post_order_visit(mod["main"], visit)
    return found


def test_decode_fuses_into_its_matmul_and_stays_exact():
    """The int4 decode and the matmul become one PrimFunc that reads the packed uint8
    weight; fusing again changes nothing; built for the host it is still exact."""
    from tvm import relax

    from kiln.backends.tvm.fuse_decode import fuse_decode_into_contraction

    model = blocked_int4_matmul(k=128, n=64, m=8)  # 8 rows: past the grouped-GEMV form
    mod = lower_to_relax(to_ir(model))
    target = resolve_target("host")
    with target.tvm_target():
        fused = _legalize(mod, fuse_decode_into_contraction())
    kernels = _kernels(fused)
    assert len(kernels) == 1 and "matmul" in next(iter(kernels))
    (kernel,) = kernels.values()
    assert PACKED in [(str(p.dtype), tuple(int(d) for d in p.shape)) for p in kernel.params]
    assert PACKED in _main_constants(fused)
    with target.tvm_target():
        unchanged = fuse_decode_into_contraction()(fused)  # nothing left to fuse
    assert len(unchanged.functions) == len(fused.functions)

    executable = tvm.compile(fused, target=target.tvm_target())
    vm = relax.VirtualMachine(executable, tvm.cpu())
    x = np.random.default_rng(3).standard_normal((8, 128)).astype(np.float32)
    out = vm["main"](tvm.runtime.tensor(x)).numpy()
    (ref,) = ort_outputs(model, {"x": x}, optimize=False)
    assert relative_error(out, ref) < REL_TOL


def test_decode_stays_apart_from_a_contraction_not_named():
    """``consumers`` (a regex over the consumer kernel's name) narrows the contractions
    that take their decode: with none matching, decode and matmul stay two kernels."""
    from kiln.backends.tvm.fuse_decode import fuse_decode_into_contraction

    mod = lower_to_relax(to_ir(blocked_int4_matmul(k=128, n=64, m=8)))
    with resolve_target("host").tvm_target():
        apart = _legalize(mod, fuse_decode_into_contraction("no_such_kernel"))
    kernels = _kernels(apart)
    assert len(kernels) == 2 and any("matmul" in name for name in kernels), list(kernels)
