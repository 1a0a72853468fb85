"""SQNR, max abs and relative error: the one definition verify, quantize, tests and bench use."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kiln.compiler.core.metrics import max_abs_error, relative_error, sqnr_db, sqnr_db_from_sums


def test_sqnr_of_a_known_error():
    ref = np.array([1.0, 1.0], np.float32)
    # signal 2, noise 0.02: 10 log10(100) = 20 dB
    assert sqnr_db(ref, np.array([1.1, 0.9])) == pytest.approx(20.0)
    assert sqnr_db(ref, ref) == math.inf


def test_sqnr_edge_cases():
    assert sqnr_db(np.zeros(3), np.ones(3)) == -math.inf
    assert sqnr_db(np.ones(3), np.array([1.0, np.inf, 1.0])) == -math.inf
    assert sqnr_db_from_sums(0.0, 0.0) == math.inf
    assert sqnr_db_from_sums(4.0, 0.04) == pytest.approx(20.0)


def test_sqnr_reshapes_actual_to_the_reference():
    ref = np.arange(6, dtype=np.float32).reshape(2, 3) + 1
    assert sqnr_db(ref, ref.reshape(-1) * 1.01) == pytest.approx(40.0)


def test_max_abs_and_relative_error():
    ref = np.array([[2.0, -4.0]])
    actual = np.array([2.5, -4.0])
    assert max_abs_error(ref, actual) == pytest.approx(0.5)
    assert relative_error(actual, ref) == pytest.approx(0.5 / 4.0)
    assert relative_error(np.array([0.1, 0.0]), np.zeros(2)) == pytest.approx(0.1)  # absolute
    assert max_abs_error(np.zeros(0), np.zeros(0)) == 0.0
