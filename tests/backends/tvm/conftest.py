"""Fixtures for the TVM backend tests, and the KILN_SLOW gate for this folder.

Slow cases (real models) run only with ``KILN_SLOW=1``; the skip is applied
here to this folder's tests so it holds whether or not a top-level conftest
does the same.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    if os.environ.get("KILN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow end-to-end case: run with KILN_SLOW=1")
    for item in items:
        if "slow" in item.keywords and HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(skip)
