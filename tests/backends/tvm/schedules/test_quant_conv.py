"""kiln's decode_conv rule: a quantized conv decodes one panel of its weight per task.

NCHW/OIHW (as imported) and NHWC/OHWI (``ConvertLayout``, the weight path decode ->
permute_dims) take the same path; the kernel is compared with ONNX Runtime on the
quantized graph, and no float32 buffer the size of the weight is left in it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from onnx import TensorProto, helper  # noqa: E402
from tvm import relax, s_tir  # noqa: E402
from tvm.s_tir.analysis import detect_buffer_access_lca  # noqa: E402

from kiln.backends.tvm.importer import lower_to_relax  # noqa: E402
from kiln.backends.tvm.schedules import schedule_rules_used  # noqa: E402
from kiln.backends.tvm.schedules.analysis import RuleContext  # noqa: E402
from kiln.backends.tvm.schedules.quant_conv import (  # noqa: E402
    MIN_PIXELS_PER_PANEL,
    _row_chunks,
    schedule_decode_conv,
)
from kiln.compiler.core.metrics import relative_error  # noqa: E402
from kiln.compiler.testing import quant_models as models  # noqa: E402
from kiln.compiler.testing.reference import DECODE_REL_TOL, exact_reference  # noqa: E402
from kiln.passes.quant.quantize import Quantize, QuantizeConfig  # noqa: E402

NHWC = {"relax.nn.conv2d": ["NHWC", "OHWI"]}
TARGET = {"kind": "llvm", "mcpu": "znver4", "num-cores": 2}
FORMS = {
    "int8-per-channel": {"dtype": "int8"},
    "int4-g32": {"dtype": "int4", "granularity": {"group": 32}},
    "uint4-g32-zero-point": {"dtype": "uint4", "granularity": {"group": 32}, "symmetric": False},
}


def _conv(ci=32, co=128, hw=10, k=3, groups=1, seed=0):
    """x[1, ci, hw, hw] -> Conv(co, k x k, groups) + bias -> Relu -> y."""
    rng = np.random.default_rng(seed)
    inits = [models.init("w", rng.standard_normal((co, ci // groups, k, k)) * 0.2),
             models.init("b", rng.standard_normal(co) * 0.1)]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[k // 2] * 4,
                              group=groups),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    return models.build(nodes, inits,
                        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, ci, hw, hw])],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, co, hw, hw])])


def _relax(model, layout: str):
    mod = lower_to_relax(model)
    return relax.transform.ConvertLayout(NHWC)(mod) if layout == "nhwc" else mod


def _to_scheduled(target) -> list:
    """The CPU build up to its schedule phase, without a layout rewrite of its own (so
    that each test picks the conv layout)."""
    from kiln.backends.tvm.fuse_decode import CPU_CONSUMERS, fuse_decode_into_contraction
    from kiln.backends.tvm.keep_compressed import fold_constants_keeping_compressed
    from kiln.backends.tvm.schedules import cpu_schedule_passes

    return [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
            fold_constants_keeping_compressed(), relax.transform.FuseOps(),
            relax.transform.FuseTIR(), fuse_decode_into_contraction(CPU_CONSUMERS),
            *cpu_schedule_passes(target)]


def _scheduled(model, layout: str) -> tvm.IRModule:
    target = tvm.target.Target(TARGET)
    with target:
        return tvm.transform.Sequential(_to_scheduled(target))(_relax(model, layout))


def _run(model, layout: str, feeds) -> np.ndarray:
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    target = tvm.target.Target(TARGET)
    with target:
        mod = tvm.transform.Sequential(_to_scheduled(target))(_relax(model, layout))
    executable = tvm.compile(mod, target=target, relax_pipeline=tvm.transform.Sequential(
        cpu_generic.dataflow_lower_passes(target) + cpu_generic.finalize_passes(target)))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(v) for v in feeds.values()]).numpy()


def _float_buffers(func) -> dict[str, int]:
    """Elements of each float32 buffer the kernel allocates, as compacted at lowering."""
    mod = tvm.transform.Sequential([
        s_tir.transform.LowerInitBlock(),
        s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
        s_tir.transform.ConvertBlocksToOpaque(),
        s_tir.transform.CompactBufferAllocation(),
    ])(tvm.IRModule({"main": func}))
    params = {str(p.name) for p in mod["main"].params}
    return {str(b.name): math.prod(int(d) for d in b.shape)
            for b in detect_buffer_access_lca(mod["main"])
            if str(b.name) not in params and str(b.dtype) == "float32"}


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("form", list(FORMS))
def test_quantized_conv_decodes_panels_inside_its_kernel(form, layout):
    model = _conv()
    Quantize(QuantizeConfig(weights=FORMS[form]))(model)
    mod = _scheduled(model, layout)
    rules = schedule_rules_used(mod)
    (kernel,) = [name for name, rule in rules.items() if rule == "decode_conv"]
    assert "conv2d" in kernel and not [r for r in rules.values() if r == "contraction"], rules
    # the largest float buffer is one task's panel: 64 of the 128 output channels
    weight = 128 * 32 * 3 * 3
    assert max(_float_buffers(mod[kernel]).values()) <= weight // 2
    feeds = models.feeds(model)
    assert relative_error(_run(model, layout, feeds),
                          exact_reference(model, feeds)) < DECODE_REL_TOL


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_depthwise_conv_takes_its_decode_into_the_window_kernel(layout):
    """NCHW: a tap's weight is one broadcast per output row, the decode is inlined in the
    reduction. NHWC: the vector runs over channels, the decode is a loop nest of the same
    kernel run once per call (C * 3 * 3 weights)."""
    model = _conv(ci=32, co=32, hw=16, groups=32)
    Quantize(QuantizeConfig(weights={"dtype": "int8"}))(model)
    mod = _scheduled(model, layout)
    rules = schedule_rules_used(mod)
    (kernel,) = [name for name in rules if "conv2d" in name]
    assert rules[kernel] == "decode_conv", rules
    decoded = [n for name, n in _float_buffers(mod[kernel]).items()
               if "dequantized" in name or "transpose" in name]
    assert decoded == ([] if layout == "nchw" else [32 * 3 * 3])
    feeds = models.feeds(model)
    assert relative_error(_run(model, layout, feeds),
                          exact_reference(model, feeds)) < DECODE_REL_TOL


def _kernels(model, layout: str = "nchw"):
    """(name, PrimFunc, RuleContext) of each kernel after fusion."""
    from kiln.backends.tvm.schedules.pipeline import _const_params, _vector_lanes_f32

    target = tvm.target.Target(TARGET)
    with target:
        mod = tvm.transform.Sequential(_to_scheduled(target)[:-3])(_relax(model, layout))
    consts = _const_params(mod)
    lanes = _vector_lanes_f32(target)
    return [(gvar.name_hint, func,
             RuleContext(target=target, vector_lanes_f32=lanes, num_cores=2,
                         const_params=consts.get(gvar.name_hint, frozenset())))
            for gvar, func in mod.functions.items() if isinstance(func, tvm.tirx.PrimFunc)]


def test_refuses_float_convs_and_matmuls():
    """A conv without a compressed weight is the contraction rule's; a quantized matmul
    (decode -> [K, N] weight, one reduction) is decode_contraction's."""
    for name, func, ctx in _kernels(_conv()):
        assert schedule_decode_conv(func, ctx) is None, name
    mlp = models.mlp(d_in=128, hidden=256, d_out=64, batch=8)
    Quantize(QuantizeConfig(weights={"dtype": "int4", "granularity": {"group": 32}}))(mlp)
    for name, func, ctx in _kernels(mlp):
        assert schedule_decode_conv(func, ctx) is None, name


def test_rows_split_into_chunks_only_while_panels_are_fewer_than_cores():
    # one 64-channel panel, 56 x 14 row tiles of 4 pixels, 2 cores: 4 tasks
    assert _row_chunks(1, 56 * 14, 4, cores=2) == 4
    # enough panels: no split (each split decodes its panel again)
    assert _row_chunks(8, 49, 7, cores=2) == 1
    # a chunk keeps at least MIN_PIXELS_PER_PANEL pixels
    chunks = _row_chunks(1, 8, 4, cores=16)
    assert 8 // chunks * 4 >= MIN_PIXELS_PER_PANEL

