"""The pass registry: one static mapping from spec name to pass class (imported
lazily), plus third-party passes registered under the ``kiln.passes``
entry-point group.

This module ties names to passes; the spec and selector code does not import it:
the spec loader gets ``config_class`` handed in (``kiln.compiler.driver.specs``).
"""

from __future__ import annotations

import difflib
import importlib
import logging
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import entry_points

from kiln.compiler.core.errors import KilnError
from kiln.compiler.core.pass_api import KilnPass, PassConfig

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "kiln.passes"

# name -> "module:Class" (lazy: importing a pass module only when it is used)
BUILTIN_PASSES: dict[str, str] = {
    "fold_batchnorm": "kiln.passes.reparam.fold_batchnorm:FoldBatchNorm",
    "merge_branches": "kiln.passes.reparam.merge_branches:MergeBranches",
    "merge_lora": "kiln.passes.reparam.merge_lora:MergeLora",
    "fold_parametrization": "kiln.passes.reparam.fold_parametrization:FoldParametrization",
    "low_rank": "kiln.passes.reparam.low_rank:LowRank",
    "dedupe_weights": "kiln.passes.share.dedupe_weights:DedupeWeights",
    "share_blocks": "kiln.passes.share.share_blocks:ShareBlocks",
    "template_share": "kiln.passes.share.template_share:TemplateShare",
    "quantize": "kiln.passes.quant.quantize:Quantize",
    "migrate_scales": "kiln.passes.quant.migrate_scales:MigrateScales",
    "equalize": "kiln.passes.quant.equalize:Equalize",
    "salient_split": "kiln.passes.quant.salient_split:SalientSplit",
    "prune_channels": "kiln.passes.prune.prune_channels:PruneChannels",
    "apply_mask": "kiln.passes.prune.apply_mask:ApplyMask",
    "prune": "kiln.passes.prune.prune:Prune",
    "rewrite_rule": "kiln.passes.rules.rewrite_rule:RewriteRule",
    "drop_blocks": "kiln.passes.prune.drop_blocks:DropBlocks",
    "moe_router": "kiln.passes.moe.moe_router:MoeRouter",
    "moe_dense_to_sparse": "kiln.passes.moe.moe_dense_to_sparse:MoeDenseToSparse",
    "moe_prune_experts": "kiln.passes.moe.moe_prune_experts:MoePruneExperts",
    "moe_merge_experts": "kiln.passes.moe.moe_merge_experts:MoeMergeExperts",
    "moe_upcycle": "kiln.passes.moe.moe_upcycle:MoeUpcycle",
}


@dataclass(frozen=True)
class PassInfo:
    name: str
    target: str          # "module:Class"
    origin: str          # "builtin" or the distribution name of a plugin


def _load_target(target: str) -> type[KilnPass]:
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    cls = getattr(module, attr)
    if not (isinstance(cls, type) and issubclass(cls, KilnPass)):
        raise KilnError(f"{target} is not a kiln pass (subclass of KilnPass)")
    return cls


@lru_cache(maxsize=1)
def available() -> dict[str, PassInfo]:
    """Every pass name kiln knows: built-ins, then plugins (a plugin cannot shadow a built-in)."""
    infos = {name: PassInfo(name, target, "builtin") for name, target in BUILTIN_PASSES.items()}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in infos:
            logger.warning("plugin pass %r from %s ignored: name taken by a built-in pass",
                           ep.name, ep.dist.name if ep.dist else "?")
            continue
        infos[ep.name] = PassInfo(ep.name, ep.value, ep.dist.name if ep.dist else "plugin")
    return infos


def get_pass_class(name: str) -> type[KilnPass]:
    infos = available()
    if name not in infos:
        close = difflib.get_close_matches(name, infos, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KilnError(f"unknown pass {name!r}{hint}; known: {', '.join(sorted(infos))}")
    try:
        cls = _load_target(infos[name].target)
    except KilnError:
        raise
    except Exception as error:
        raise KilnError(f"pass {name!r} ({infos[name].target}) cannot be loaded: "
                        f"{type(error).__name__}: {error}") from error
    return cls


def config_class(name: str) -> type[PassConfig]:
    """The options class of pass ``name`` (the spec loader's lookup); KilnError if unknown."""
    return get_pass_class(name).config_class
