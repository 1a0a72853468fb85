"""Test configuration: slow end-to-end cases run only with KILN_SLOW=1 (``make test-all``).

Tests import kiln as installed (``pip install -e .``), never the source folders as
top-level packages: shared model builders and references are ``kiln.compiler.testing``.
"""

from __future__ import annotations

import os

import pytest

# The build cache (kiln.compiler.driver.buildcache) is on by default for users; the suite
# compiles the same model again on purpose, so it is off unless a test turns it on.
os.environ.setdefault("KILN_BUILD_CACHE", "off")
# kiln gives TVM's pool every physical core; the suite runs in parallel workers (pytest -n),
# so each worker's compiled models run on one thread unless a test asks for more.
os.environ.setdefault("TVM_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("KILN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow end-to-end case: run with KILN_SLOW=1 (make test-all)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
