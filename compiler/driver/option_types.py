"""Pass options as people read them, from each config class's JSON Schema (``kiln passes``).

``Union[IntWeights, FloatWeights]`` and ``Literal['a', 'b']`` are how Python prints
annotations; the schema says the same thing in a form that is stable across Python and
pydantic versions, so the listing is written from it:
``weights: IntWeights | FloatWeights | PowerWeights | CodebookWeights``,
``clip: 'none' | 'mse_search'``, ``dims: list[int]``, ``symmetric: bool | None``.
"""

from __future__ import annotations

import json
from typing import Any

_SCALARS = {"boolean": "bool", "integer": "int", "number": "float", "string": "str",
            "null": "None"}


def plain_text(doc: str) -> str:
    """A docstring on one line, without reStructuredText's double backticks."""
    return " ".join(doc.replace("``", "").split())


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def type_text(schema: dict[str, Any]) -> str:
    """A JSON Schema (one property) as a type: ``int``, ``'a' | 'b'``, ``list[int]``,
    ``Name | None`` (``Name`` for a ``$ref`` to a definition)."""
    if "$ref" in schema:
        return _ref_name(schema["$ref"])
    if "const" in schema:
        return repr(schema["const"])
    if "enum" in schema:
        return " | ".join(repr(v) for v in schema["enum"])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            parts: list[str] = []
            for branch in schema[key]:
                text = type_text(branch)
                if text not in parts:
                    parts.append(text)
            return " | ".join(parts)
    kind = schema.get("type")
    if isinstance(kind, list):
        return " | ".join(type_text({**schema, "type": k}) for k in kind)
    if kind == "array":
        if "prefixItems" in schema:
            return "tuple[" + ", ".join(type_text(s) for s in schema["prefixItems"]) + "]"
        items = schema.get("items")
        return f"list[{type_text(items)}]" if items else "list"
    if kind == "object":
        values = schema.get("additionalProperties")
        if isinstance(values, dict):
            return f"dict[str, {type_text(values)}]"
        return schema.get("title", "dict")
    if kind in _SCALARS:
        return _SCALARS[kind]
    return "any"


def _default_text(schema: dict[str, Any]) -> str | None:
    if "default" not in schema:
        return None
    return repr(schema["default"])


def option_lines(schema: dict[str, Any], indent: str = "    ") -> list[str]:
    """``name: type = default - description`` for each property of an object schema."""
    lines = []
    required = set(schema.get("required", ()))
    for name, prop in schema.get("properties", {}).items():
        default = _default_text(prop)
        text = f"{indent}{name}: {type_text(prop)}"
        if default is not None:
            text += f" = {default}"
        elif name in required:
            text += " (required)"
        if prop.get("description"):
            text += f" - {plain_text(prop['description'])}"
        lines.append(text)
    return lines


def _refs(value: Any) -> list[str]:
    """Every definition name a schema fragment refers to, in order of first use."""
    found: list[str] = []
    if isinstance(value, dict):
        if "$ref" in value:
            found.append(_ref_name(value["$ref"]))
        for child in value.values():
            found += [r for r in _refs(child) if r not in found]
    elif isinstance(value, list):
        for child in value:
            found += [r for r in _refs(child) if r not in found]
    return found


def definition_lines(schema: dict[str, Any]) -> list[str]:
    """The definitions an options schema uses (``IntWeights``: its own options), each with
    its docstring, for ``kiln passes NAME``."""
    defs = schema.get("$defs", {})
    order: list[str] = []
    pending = _refs(schema.get("properties", {}))
    while pending:
        name = pending.pop(0)
        if name in order or name not in defs:
            continue
        order.append(name)
        pending += _refs(defs[name].get("properties", {}))
    lines = []
    for name in order:
        body = defs[name]
        doc = plain_text(body.get("description") or "")
        lines.append(f"  {name}" + (f": {doc}" if doc else ""))
        if body.get("properties"):
            lines += option_lines(body, indent="    ")
        else:
            lines.append(f"    {type_text(body)}")
    return lines


def pass_json(name: str, cls: Any, origin: str) -> dict[str, Any]:
    """What ``kiln passes --json`` prints for one pass (options as a JSON Schema)."""
    doc = (cls.__doc__ or "").strip()
    return {"name": name, "exact": bool(cls.exact), "origin": origin,
            "summary": doc.splitlines()[0] if doc else "",
            "options": json.loads(json.dumps(cls.config_class.model_json_schema()))}
