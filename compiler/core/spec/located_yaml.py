"""YAML that keeps, for every key, the file and line it was written on.

``compose(text, file)`` returns plain data (maps, lists, scalars) and the
``Locations`` of every key path in it, so that an error found later (by pydantic,
by a pass's config, by the driver) can name ``file:line key.path``. Only plain maps
and lists are accepted: ``!!python/...`` tags, sets, ordered maps and merge keys
are refused with their line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from kiln.compiler.core.errors import SpecError

KeyPath = tuple[str | int, ...]

_PLAIN_KEY = re.compile(r"[A-Za-z0-9_\-*/:@+]+\Z")
_PLAIN_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")


def format_path(path: KeyPath) -> str:
    """``passes[1].select.op``; a key that is not plain text is quoted: ``inputs['input.1']``."""
    out = ""
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        elif isinstance(part, str) and _PLAIN_KEY.match(part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out


@dataclass
class Locations:
    """Key path -> (file, line) for every key of a (possibly merged) document."""

    lines: dict[KeyPath, tuple[str, int]] = field(default_factory=dict)

    def find(self, path: KeyPath) -> tuple[str | None, int | None]:
        """The line of ``path``, or of its nearest recorded parent."""
        for cut in range(len(path), -1, -1):
            hit = self.lines.get(tuple(path[:cut]))
            if hit:
                return hit
        return None, None

    def copy_under(self, src: KeyPath, dst: KeyPath) -> None:
        """Record every path below ``src`` below ``dst`` too (paths already there win)."""
        for key, where in list(self.lines.items()):
            if key[:len(src)] == src and len(key) > len(src):
                self.lines.setdefault(dst + key[len(src):], where)


class _UniqueKeyLoader(yaml.SafeLoader):
    pass


def compose(text: str, file: str) -> tuple[Any, Locations]:
    """Parse ``text``: (data, the line of every key path); bad YAML is a SpecError."""
    try:
        node = yaml.compose(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise SpecError(f"invalid YAML: {problem}", file=file,
                        line=mark.line + 1 if mark else None) from None
    locations = Locations()
    if node is None:
        return None, locations

    def build(n: yaml.Node, path: KeyPath) -> Any:
        locations.lines.setdefault(path, (file, n.start_mark.line + 1))
        if isinstance(n, (yaml.MappingNode, yaml.SequenceNode)) and n.tag not in _PLAIN_TAGS:
            # !!python/..., !!set, !!omap: the spec language has plain maps and lists only.
            raise SpecError(f"invalid YAML: tag {n.tag!r} is not supported", file=file,
                            line=n.start_mark.line + 1, path=format_path(path))
        if isinstance(n, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in n.value:
                key = build_scalar(key_node)
                if isinstance(key, (list, dict)):
                    raise SpecError("a key must be a scalar", file=file,
                                    line=key_node.start_mark.line + 1, path=format_path(path))
                if key in out:
                    raise SpecError(f"duplicate key {key!r}", file=file,
                                    line=key_node.start_mark.line + 1, path=format_path(path))
                child = path + (key,)
                # A block value starts on the line after its key; the key's line wins.
                locations.lines[child] = (file, key_node.start_mark.line + 1)
                out[key] = build(value_node, child)
            return out
        if isinstance(n, yaml.SequenceNode):
            return [build(v, path + (i,)) for i, v in enumerate(n.value)]
        return build_scalar(n)

    def build_scalar(n: yaml.Node) -> Any:
        if isinstance(n, yaml.ScalarNode):
            return _scalar(n, file)
        return [] if isinstance(n, yaml.SequenceNode) else {}

    return build(node, ()), locations


def _scalar(n: yaml.ScalarNode, file: str) -> Any:
    loader = _UniqueKeyLoader("")
    try:
        return loader.construct_object(n)
    except yaml.YAMLError as error:
        # Tags the safe loader refuses (!!python/..., merge keys `<<`) and bad !!binary etc.
        if n.tag == "tag:yaml.org,2002:merge":
            problem = "merge keys (`<<`) are not supported; use `extends:`"
        else:
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            problem = f"invalid YAML: {problem}"
        raise SpecError(problem, file=file, line=n.start_mark.line + 1) from None
    finally:
        loader.dispose()
