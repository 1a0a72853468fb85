"""Writing a loaded spec back out as YAML that loads to an equal ``Spec``.

The document is self-contained: ``extends:`` is resolved (the parent's keys are in it,
the parent named in a comment), every value is written out, defaults included, so the
file means the same under a later kiln whose defaults differ, and each pass is written
``- name: {select, optional, budget, ...its options}`` in the YAML forms the loader
accepts (a config object writes its own form: ``granularity: {group: 128}``). Only
values that are None are left out: every key that may be None defaults to None.
"""

from __future__ import annotations

from typing import Any

import yaml

from kiln.compiler.core.spec.schema import COMMON_PASS_KEYS, PassEntry, Spec


def _plain(value: Any) -> Any:
    """Tuples become lists (YAML has no tuple), recursively."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def pass_item(entry: PassEntry) -> dict[str, Any]:
    """``{name: {select..., options...}}``, the YAML form of one pass."""
    body = entry.model_dump(include=set(COMMON_PASS_KEYS), exclude_none=True)
    body.update(entry.options.model_dump(exclude_none=True))
    return {entry.name: _plain(body)}


def spec_document(spec: Spec) -> dict[str, Any]:
    """The spec as plain YAML data, keys in the schema's order."""
    data = _plain(spec.model_dump(exclude={"passes", "extends"}, exclude_none=True))
    document: dict[str, Any] = {}
    for key in Spec.model_fields:
        if key == "passes":
            document["passes"] = [pass_item(entry) for entry in spec.passes]
        elif key in data:
            document[key] = data[key]
    return document


def dump_spec(spec: Spec) -> str:
    """YAML text of ``spec`` (``load`` of it gives an equal spec, ``extends`` resolved)."""
    header = f"# kiln spec, as loaded from {spec.source or 'a spec'}"
    if spec.extends:
        header += f" (extends {spec.extends}: resolved into this file)"
    text = yaml.safe_dump(spec_document(spec), sort_keys=False, default_flow_style=None,
                          allow_unicode=True, width=100)
    return f"{header}\n{text}"
