"""Test configuration: slow end-to-end cases run only with KILN_SLOW=1 (``make test-all``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests.torch_models / tests.real_models as MODULE:CALLABLE


def pytest_collection_modifyitems(config, items):
    if os.environ.get("KILN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow end-to-end case: run with KILN_SLOW=1 (make test-all)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
