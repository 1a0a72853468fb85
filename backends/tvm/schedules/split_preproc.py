"""``SplitLayoutRewritePreproc`` applied only to the kernels that have a weight-packing block.

TVM 0.27's pass visits every PrimFunc of the module and aborts on one whose root holds
no block (``There should be a compute block if there is only one subtree under the
root``): TOPI's TopK/argsort, ScatterElements and NonMaxSuppression kernels are written
with the IR builder (loops and buffer stores, no blocks), so any model with one of them
next to a matmul (a Mixtral-style top-2 router) failed to compile. This pass hands TVM's
a module holding only the PrimFuncs that carry a ``meta_schedule.layout_rewrite_preproc``
block (the ones it splits) and the Relax functions, then puts the others back unchanged.
"""

from __future__ import annotations

import tvm
from tvm import relax, s_tir, tirx

from kiln.backends.tvm.schedules.dense import PREPROC_ANNOTATION


def has_preproc_block(func: tirx.PrimFunc) -> bool:
    """Whether ``func`` has a block annotated as a layout-rewrite preprocess."""
    try:
        sch = s_tir.Schedule(func)
        pending = sch.get_child_blocks(sch.get_sblock("root"))
    except Exception:  # noqa: BLE001 - a kernel without blocks (IR-builder TOPI code)
        return False
    while pending:
        block = pending.pop()
        if PREPROC_ANNOTATION in sch.get(block).annotations:
            return True
        pending.extend(sch.get_child_blocks(block))
    return False


@tvm.transform.module_pass(opt_level=0, name="kiln.SplitLayoutRewritePreproc")
def split_layout_rewrite_preproc(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """TVM's ``SplitLayoutRewritePreproc`` on the kernels it applies to (see module doc)."""
    aside = {gvar: func for gvar, func in mod.functions.items()
             if isinstance(func, tirx.PrimFunc) and not has_preproc_block(func)}
    if len(aside) == sum(isinstance(f, tirx.PrimFunc) for f in mod.functions.values()):
        return mod  # nothing to split
    visible = tvm.IRModule({gvar: func for gvar, func in mod.functions.items()
                            if gvar not in aside}, attrs=mod.attrs)
    split = relax.transform.SplitLayoutRewritePreproc()(visible)
    for gvar, func in aside.items():
        split[gvar] = func
    # the kernels that were split are no longer called: dropped here, on the whole module
    # (TVM's pass ends with the same DeadCodeElimination)
    return relax.transform.DeadCodeElimination()(split)
