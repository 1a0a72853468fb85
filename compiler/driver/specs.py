"""Specs loaded with their passes' options typed by the pass registry.

The core's loader (``kiln.compiler.core.spec``) takes the lookup from pass name to config
class as an argument, because the registry that knows the passes lives here, in the
driver; these are the loaders with the registry's lookup in place, the ones the CLI, the
pipeline and most callers want.
"""

from __future__ import annotations

from pathlib import Path

from kiln.compiler.core import spec as core_spec
from kiln.compiler.core.spec import Spec
from kiln.compiler.driver import registry


def load_spec(ref: str | Path) -> Spec:
    """Load a spec by built-in name (``int8``) or path; options typed by each pass's config."""
    return core_spec.load_spec(ref, config_for=registry.config_class)


def spec_from_text(text: str, *, file: str = "<spec>") -> Spec:
    """Load a spec from a YAML string; options typed by each pass's config."""
    return core_spec.spec_from_text(text, config_for=registry.config_class, file=file)
