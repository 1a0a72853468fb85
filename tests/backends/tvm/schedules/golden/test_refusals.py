"""Each rule refuses the golden kernels of the other kinds (``apply`` returns None, so
the registry's next rule gets them); the order in ``registry.RULES`` relies on it."""

from __future__ import annotations

import pytest

from .check import apply_rule
from .test_dense import contraction_before
from .test_elementwise import elementwise_before, reduction_before
from .test_window import window_before

REFUSED = [
    ("decode_conv", contraction_before), ("decode_conv", window_before),
    ("decode_contraction", contraction_before), ("decode_contraction", elementwise_before),
    ("contraction", window_before), ("contraction", reduction_before),
    ("contraction", elementwise_before),
    ("elementwise", reduction_before), ("elementwise", contraction_before),
    ("reduction", elementwise_before),
    ("sparse_dense", contraction_before), ("sparse_dense", window_before),
    ("sparse_dense", elementwise_before),
]


@pytest.mark.parametrize("rule, before", REFUSED,
                         ids=[f"{rule}-{n}" for n, (rule, _) in enumerate(REFUSED)])
def test_a_rule_refuses_other_kinds_of_kernel(rule, before):
    assert apply_rule(rule, before) is None

