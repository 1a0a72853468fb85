"""kiln's decode_conv rule: a quantized conv decodes one panel of its weight per task.

NCHW/OIHW (as imported) and NHWC/OHWI (the CPU build's channels-last rewrite, the
weight path decode -> permute_dims) take the same path, built by the production CPU
pipeline for the host's CPU; the kernel is compared with ONNX Runtime on the quantized
graph, and no float32 buffer the size of the weight is left in it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import tvm
from onnx import TensorProto, helper
from tvm import relax, s_tir
from tvm.s_tir.analysis import detect_buffer_access_lca

from kiln.backends.tvm.importer import lower_to_relax
from kiln.backends.tvm.pipeline import cpu
from kiln.backends.tvm.schedules import schedule_rules_used
from kiln.backends.tvm.schedules.quant_conv import (
    MIN_PIXELS_PER_PANEL,
    DecodeConv,
    row_chunks,
)
from kiln.backends.tvm.schedules.registry import constant_params
from kiln.backends.tvm.schedules.rule import with_const_params
from kiln.backends.tvm.targets import resolve_target
from kiln.compiler.core.metrics import relative_error
from kiln.compiler.testing import quant_models as models
from kiln.compiler.testing.reference import DECODE_REL_TOL, exact_reference
from kiln.passes.quant.quantize import Quantize, QuantizeConfig

# the host's CPU (whatever its ISA), two cores: the row split is deterministic
TARGET = {**resolve_target("host").target, "num-cores": 2}
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


def _target() -> tvm.target.Target:
    return tvm.target.Target(TARGET)


def _scheduled(model, layout: str) -> tvm.IRModule:
    """The production CPU build's legalize and schedule phases, with the convolutions
    channels-last ("nhwc") or as imported ("nchw")."""
    target = _target()
    phases = (cpu.legalize_passes(target, channels_last=layout == "nhwc")
              + cpu.schedule_passes(target))
    with target:
        return tvm.transform.Sequential(phases)(lower_to_relax(model))


def _run(model, layout: str, feeds) -> np.ndarray:
    target = _target()
    executable = tvm.compile(lower_to_relax(model), target=target, relax_pipeline=cpu.get_pipeline(
        target, channels_last=layout == "nhwc"))
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
    """(name, PrimFunc annotated with its constant params) of each kernel after fusion."""
    target = _target()
    with target:
        mod = tvm.transform.Sequential(
            cpu.legalize_passes(target, channels_last=layout == "nhwc"))(lower_to_relax(model))
    consts = constant_params(mod)
    return [(gvar.name_hint, with_const_params(func, consts.get(gvar.name_hint, frozenset())))
            for gvar, func in mod.functions.items() if isinstance(func, tvm.tirx.PrimFunc)]


def test_refuses_float_convs_and_matmuls():
    """A conv without a compressed weight is the contraction rule's; a quantized matmul
    (decode -> [K, N] weight, one reduction) is decode_contraction's."""
    for name, func in _kernels(_conv()):
        assert DecodeConv().apply(func, _target(), False) is None, name
    mlp = models.mlp(d_in=128, hidden=256, d_out=64, batch=8)
    Quantize(QuantizeConfig(weights={"dtype": "int4", "granularity": {"group": 32}}))(mlp)
    for name, func in _kernels(mlp):
        assert DecodeConv().apply(func, _target(), False) is None, name


def test_rows_split_into_chunks_only_while_panels_are_fewer_than_cores():
    # one 64-channel panel, 56 x 14 row tiles of 4 pixels, 2 cores: 4 tasks
    assert row_chunks(1, 56 * 14, 4, cores=2) == 4
    # enough panels: no split (each split decodes its panel again)
    assert row_chunks(8, 49, 7, cores=2) == 1
    # a chunk keeps at least MIN_PIXELS_PER_PANEL pixels
    chunks = row_chunks(1, 8, 4, cores=16)
    assert 8 // chunks * 4 >= MIN_PIXELS_PER_PANEL

