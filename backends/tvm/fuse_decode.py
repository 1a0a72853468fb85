"""Fuse a compressed weight's decode kernel into the matmul/conv that reads it.

After ``FuseOps``/``FuseTIR`` a dequantized weight is two kernels: an injective
*decode* (unpack nibbles, subtract zero point, multiply by scale; all its
inputs are constants, at least one low-bit) writing a float32 weight, and the
contraction that reads it. Relax's ``FuseOps`` never fuses a producer into a
matmul's input, so the float32 weight would be written to memory and read
back on every call. This pass groups each such pair (when the decoded weight
has no other reader) and runs ``FuseTIR`` again, giving one PrimFunc that reads
the packed weight directly; kiln's CPU rules then schedule it as a contraction.
"""

from __future__ import annotations

import logging
import re

import tvm
from tvm import relax
from tvm.relax.dpl import GlobalVarPattern, TuplePattern, is_op, wildcard

from .keep_compressed import COMPRESSED_DTYPES as LOW_BIT_DTYPES

logger = logging.getLogger(__name__)

#: Legalized kernel names of the contractions a decode may fuse into.
_CONTRACTION = re.compile(r"matmul|dense|conv")
#: Consumers with up to this many arguments are matched (x, w, bias, residual, ...).
_MAX_ARGS = 6


def _is_decode(call) -> bool:
    """All inputs constant and at least one of them low-bit: a weight decode."""
    args = call.args[1].fields if isinstance(call.args[1], relax.Tuple) else []
    if not args or not all(isinstance(a, tvm.ir.GenericConst) for a in args):
        return False
    return any(str(a.value.dtype) in LOW_BIT_DTYPES for a in args)


def _checker(consumers: re.Pattern):
    def check(ctx) -> bool:
        decode = ctx.annotated_expr["decode"]
        consumer = ctx.annotated_expr["consumer"]
        if not _is_decode(decode):
            return False
        if not consumers.search(consumer.args[0].name_hint):
            return False
        var = ctx.value_to_bound_var.get(decode)
        return var is not None and len(ctx.var_usages.get(var, [])) == 1

    return check


def _patterns(consumers: re.Pattern = _CONTRACTION) -> list[relax.transform.FusionPattern]:
    decode = is_op("relax.call_tir")(GlobalVarPattern(), wildcard(), add_constraint=False)
    patterns = []
    for n_args in range(2, _MAX_ARGS + 1):
        for position in range(n_args):
            args = [wildcard() for _ in range(n_args)]
            args[position] = decode
            consumer = is_op("relax.call_tir")(GlobalVarPattern(), TuplePattern(args),
                                               add_constraint=False)
            patterns.append(relax.transform.FusionPattern(
                "kiln.decode_contraction", consumer,
                {"decode": decode, "consumer": consumer}, _checker(consumers)))
    return patterns


#: What kiln's CPU rules schedule with the decode inside: matmul and dense
#: (schedules/quant_gemv.py), conv (schedules/quant_conv.py: a decoded panel per task;
#: depthwise through the window rule).
CPU_CONSUMERS = r"matmul|dense|conv"


def fuse_decode_into_contraction(consumers: str | None = None) -> tvm.transform.Pass:
    """Pass: group (decode -> matmul/conv) call_tir pairs and fuse each into one PrimFunc.

    ``consumers`` (a regex over the consumer kernel's name) narrows which contractions
    take their decode; by default matmul, dense and conv.
    """
    pattern = re.compile(consumers) if consumers else _CONTRACTION

    @tvm.transform.module_pass(opt_level=0, name="FuseDecodeIntoContraction")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        before = len(mod.functions)
        # bind_constants=False: FuseTIR takes no tensor constants inside a primitive function.
        grouped = relax.transform.FuseOpsByPattern(_patterns(pattern), bind_constants=False,
                                                   annotate_codegen=False)(mod)
        fused = len(grouped.functions) - before
        if fused <= 0:
            return mod
        logger.debug("fusing %d weight decode kernel(s) into their contraction", fused)
        return relax.transform.FuseTIR()(grouped)

    return _pass
