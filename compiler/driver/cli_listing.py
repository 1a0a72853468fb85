"""The listing commands of the CLI: ``kiln passes``, ``kiln specs``, ``kiln schema``."""

from __future__ import annotations

import argparse
import json
import sys

from kiln.compiler.core.errors import KilnError
from kiln.compiler.driver.console import make_console as _console


def print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def cmd_passes(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from kiln.compiler.driver import option_types, registry

    infos = registry.available()
    if args.name is not None:
        registry.get_pass_class(args.name)          # an unknown name: KilnError with a hint
        infos = {args.name: infos[args.name]}
    console = _console()
    listing = []
    for name, info in sorted(infos.items()):
        try:
            cls = registry.get_pass_class(name)
        except KilnError as error:
            listing.append({"name": name, "origin": info.origin, "unavailable": str(error)})
            if not args.json:
                console.print(f"{escape(name)}  [red]unavailable[/red]: {escape(str(error))}",
                              soft_wrap=True)
            continue
        if args.json:
            listing.append(option_types.pass_json(name, cls, info.origin))
            continue
        doc = (cls.__doc__ or "").strip()
        kind = "exact" if cls.exact else "lossy"
        origin = "" if info.origin == "builtin" else f" [plugin: {info.origin}]"
        # escape: "[plugin: ...]" and docstrings with brackets are not rich markup.
        first = option_types.plain_text(doc.splitlines()[0]) if doc else ""
        console.print(f"[bold]{escape(name)}[/bold] ({kind}){escape(origin)}: {escape(first)}",
                      soft_wrap=True)
        schema = cls.config_class.model_json_schema()
        for line in option_types.option_lines(schema):
            console.print(line, markup=False, soft_wrap=True)
        console.print("    (every pass also takes: select, optional, budget)", markup=False)
        if args.name is not None:
            extra = option_types.definition_lines(schema)
            if extra:
                console.print("  where:", markup=False)
                for line in extra:
                    console.print(line, markup=False, soft_wrap=True)
    if args.json:
        print_json(listing)
    return 0


def cmd_specs(args: argparse.Namespace) -> int:
    from kiln.compiler.core.spec import builtin_specs
    from kiln.compiler.core.spec.located_yaml import compose

    specs = builtin_specs()
    if args.name is not None:
        if args.name not in specs:
            import difflib

            close = difflib.get_close_matches(args.name, specs, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise KilnError(f"no built-in spec named {args.name!r}{hint}; built-in: "
                            f"{', '.join(sorted(specs))}")
        sys.stdout.write(specs[args.name].read_text(encoding="utf-8"))
        return 0
    rows = []
    for name, path in sorted(specs.items()):
        data, _ = compose(path.read_text(encoding="utf-8"), str(path))
        data = data if isinstance(data, dict) else {}
        summary = " ".join(str(data.get("description") or "").split())
        if data.get("extends"):
            summary = f"(extends {data['extends']}) {summary}".strip()
        rows.append({"name": name, "description": summary, "file": str(path)})
    if args.json:
        print_json(rows)
        return 0
    console = _console()
    width = max((len(r["name"]) for r in rows), default=0)
    for row in rows:
        console.print(f"{row['name']:<{width}}  {row['description']}", markup=False,
                      soft_wrap=True)
    console.print("(kiln specs NAME prints one; kiln compile --spec NAME uses it)", markup=False)
    return 0


def spec_json_schema() -> dict:
    """The spec's JSON Schema, with each registered pass's options."""
    from kiln.compiler.core.spec import Budget, Selector, Spec
    from kiln.compiler.driver import registry

    schema = Spec.model_json_schema(mode="validation")
    schema.setdefault("$defs", {})
    schema["properties"].pop("source", None)
    for name, model in (("Selector", Selector), ("Budget", Budget)):
        sub = model.model_json_schema()
        # Its own $defs (SelectorBase, ParamCondition) must sit at the root for "#/$defs/..".
        for key, value in sub.pop("$defs", {}).items():
            schema["$defs"].setdefault(key, value)
        schema["$defs"][name] = sub
    items = []
    for name in sorted(registry.available()):
        try:
            cls = registry.get_pass_class(name)
        except KilnError:
            continue
        options = cls.config_class.model_json_schema()
        props = dict(options.get("properties", {}))
        props["select"] = {"$ref": "#/$defs/Selector"}
        props["optional"] = {"type": "boolean"}
        props["budget"] = {"$ref": "#/$defs/Budget"}
        for key, value in options.get("$defs", {}).items():
            schema["$defs"].setdefault(key, value)
        body = {"type": "object", "properties": props, "additionalProperties": False}
        items.append({"type": "object", "properties": {name: {"anyOf": [body, {"type": "null"}]}},
                      "required": [name], "additionalProperties": False,
                      "description": (cls.__doc__ or "").strip().splitlines()[0]})
        items.append({"const": name})
    schema["properties"]["passes"] = {"type": "array", "items": {"anyOf": items}}
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "kiln spec"
    return schema


def cmd_schema(args: argparse.Namespace) -> int:
    sys.stdout.write(json.dumps(spec_json_schema(), indent=2, sort_keys=True) + "\n")
    return 0
