"""drop_blocks: near-identity residual blocks of a small transformer are the ones dropped
(ranked by cosine of input and output on calibration data), the output error stays small
and is far smaller than dropping the same number of ordinary blocks; rate and count;
refusals; idempotence."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from pydantic import ValidationError

from kiln.compiler.core.errors import PassError
from kiln.compiler.core.frontend import load_model
from kiln.compiler.core.metrics import sqnr_db
from kiln.compiler.testing.block_models import export_transformer
from kiln.compiler.testing.quant_models import calibration, feeds, run
from kiln.passes.prune.drop_blocks import (
    DROPPED_KEY,
    DropBlocks,
    DropBlocksConfig,
    token_cosine,
)
from kiln.passes.share.blocks import find_blocks

#: blocks 3 (layer 1's MLP) and 4 (layer 2's attention) are near-identity
QUIET = (3, 4)
#: measured 79.7 dB with the two quiet blocks dropped, 19.9 dB with the two least similar
QUIET_DROP_SQNR_DB = 50
LOUD_DROP_SQNR_DB = 30


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return export_transformer(tmp_path_factory.mktemp("drop") / "t.onnx", quiet=QUIET)


def _dropper(model: ir.Model, **options) -> DropBlocks:
    return DropBlocks(DropBlocksConfig(**options), calibration=calibration(model))


def test_drops_the_near_identity_blocks(source):
    model = load_model(source)
    inputs = feeds(model, seed=7)
    (before,) = run(model, inputs)
    labels = [b.label for b in find_blocks(model)]
    assert len(labels) == 8
    ops_before = len(list(model.graph))
    drop = _dropper(model, rate=0.25)
    assert drop(model).modified
    accepted = [c.label for c in drop.last_candidates if c.accepted]
    assert accepted == [labels[i] for i in QUIET]
    assert [b.label for b in find_blocks(model)] == [lab for i, lab in enumerate(labels)
                                                     if i not in QUIET]
    assert len(list(model.graph)) < ops_before - 2 * 10
    refused = [c.reason for c in drop.last_candidates if not c.accepted]
    assert len(refused) == 6 and all(r.startswith("kept (cosine ") for r in refused)
    assert drop.note.startswith("dropped 2 of 8 blocks")
    assert all(drop.scores[labels[i]] > 0.999 for i in QUIET)
    assert max(s for lab, s in drop.scores.items()
               if lab not in accepted) < min(drop.scores[lab] for lab in accepted)
    # the quiet blocks' weights left the file
    names = set(model.graph.initializers)
    assert not any(n.startswith("blocks.3.") or n.startswith("blocks.4.") for n in names)
    (after,) = run(model, inputs)
    assert sqnr_db(before, after) > QUIET_DROP_SQNR_DB


def test_dropping_ordinary_blocks_costs_more(source):
    """The same count of other blocks (the ranking's least similar) hurts far more."""
    model = load_model(source)
    inputs = feeds(model, seed=7)
    (before,) = run(model, inputs)
    blocks = find_blocks(model)
    ranking = _dropper(model, count=2)
    ranking.candidates(model)
    loud = sorted(blocks, key=lambda b: ranking.scores[b.label])[:2]
    drop = DropBlocks(DropBlocksConfig(count=2), calibration=calibration(model),
                      selected=lambda n: n in {b.add for b in loud} or n.op_type != "Add")
    assert drop(model).modified
    (after,) = run(model, inputs)
    assert sqnr_db(before, after) < LOUD_DROP_SQNR_DB


def test_count_and_idempotence(source):
    model = load_model(source)
    drop = _dropper(model, count=3)
    assert drop(model).modified
    assert sum(c.accepted for c in drop.last_candidates) == 3
    assert model.metadata_props[DROPPED_KEY] == "3 of 8"
    again = _dropper(model, count=3)
    assert not again(model).modified
    assert {c.reason for c in again.last_candidates} == {"blocks already dropped (3 of 8)"}


def test_refusals_and_config():
    with pytest.raises(ValidationError, match="exactly one"):
        DropBlocksConfig()
    with pytest.raises(ValidationError, match="exactly one"):
        DropBlocksConfig(rate=0.5, count=1)
    with pytest.raises(ValidationError):
        DropBlocksConfig(rate=1.0)
    assert DropBlocksConfig(count=20).wanted(8) == 8
    assert DropBlocksConfig(rate=0.3).wanted(8) == 2


def test_graph_output_block_is_refused_and_calibration_required(source):
    model = load_model(source)
    last = find_blocks(model)[-1]
    # make the last block's output a graph output: it cannot go
    model.graph.outputs.append(last.output)
    drop = _dropper(model, count=8)
    drop(model)
    (refused,) = [c for c in drop.last_candidates if not c.accepted]
    assert refused.label == last.label and refused.reason.startswith("its output is a graph")
    with pytest.raises(PassError, match="calibration"):
        DropBlocks(DropBlocksConfig(count=1))(load_model(source))


def test_token_cosine():
    x = np.array([[[1.0, 0.0], [0.0, 2.0]]])
    assert token_cosine(x, x) == pytest.approx(1.0)
    assert token_cosine(x, -x) == pytest.approx(-1.0)
    assert token_cosine(x, np.array([[[0.0, 1.0], [0.0, 1.0]]])) == pytest.approx(0.5)
    assert token_cosine(np.zeros((2, 3)), np.zeros((2, 3))) == 1.0
