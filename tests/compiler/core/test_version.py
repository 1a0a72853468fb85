from __future__ import annotations

from importlib import metadata

from kiln.compiler.core.version import kiln_version


def test_version_is_the_installed_distributions():
    assert kiln_version() == metadata.version("kiln")
