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


#: Limits that keep a hostile or broken document from taking the machine: nesting depth
#: (PyYAML composes recursively; 20000 ``[`` would end in a RecursionError), the number of
#: values once aliases are expanded (a 500-byte "billion laughs" expands to 10^9), and the
#: text's size. Real specs are a few levels deep and a few hundred values long.
MAX_DEPTH = 64
MAX_VALUES = 100_000
MAX_CHARS = 1 << 20


class _SpecLoader(yaml.SafeLoader):
    """The safe loader, refusing nesting deeper than MAX_DEPTH while it composes and
    remembering where the first alias is (to name it if aliases expand too far)."""

    def __init__(self, text: str, file: str) -> None:
        super().__init__(text)
        self.file = file
        self.depth = 0
        self.first_alias: int | None = None

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent) and self.first_alias is None:
            self.first_alias = self.peek_event().start_mark.line + 1
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise SpecError(f"invalid YAML: nested deeper than {MAX_DEPTH} levels",
                                file=self.file, line=line)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _check_expansion(root: yaml.Node, loader: _SpecLoader) -> None:
    """Refuse, before anything is expanded, a document whose aliases make it too big or too
    deep (or refer to themselves). The node graph shares aliased nodes, so sizes are
    counted once per node (memoized), not once per use."""
    sizes: dict[int, tuple[int, int]] = {}     # id(node) -> (values, depth) once expanded
    open_nodes: set[int] = set()

    def measure(n: yaml.Node) -> tuple[int, int]:
        key = id(n)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise SpecError("invalid YAML: an alias refers to the node that contains it",
                            file=loader.file, line=n.start_mark.line + 1)
        open_nodes.add(key)
        values, depth = 1, 0
        children = [c for pair in n.value for c in pair] if isinstance(n, yaml.MappingNode) \
            else n.value if isinstance(n, yaml.SequenceNode) else []
        for child in children:
            child_values, child_depth = measure(child)
            values += child_values
            depth = max(depth, child_depth)
            if values > MAX_VALUES or depth >= MAX_DEPTH:
                what = f"more than {MAX_VALUES} values" if values > MAX_VALUES else \
                    f"nesting deeper than {MAX_DEPTH} levels"
                raise SpecError(f"invalid YAML: aliases expand to {what}; refusing to "
                                "expand them (write the values out or use `extends:`)",
                                file=loader.file, line=loader.first_alias or 1)
        open_nodes.discard(key)
        sizes[key] = (values, depth + 1)
        return sizes[key]

    measure(root)


def _yaml_error(error: yaml.YAMLError, file: str) -> SpecError:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return SpecError(f"invalid YAML: {problem}", file=file, line=mark.line + 1 if mark else None)


def compose(text: str, file: str) -> tuple[Any, Locations]:
    """Parse ``text``: (data, the line of every key path); bad YAML is a SpecError."""
    if len(text) > MAX_CHARS:
        raise SpecError(f"a spec larger than {MAX_CHARS >> 20} MiB is refused", file=file)
    try:
        loader = _SpecLoader(text, file)     # its reader already checks the characters
    except yaml.YAMLError as error:
        raise _yaml_error(error, file) from None
    try:
        try:
            node = loader.get_single_node()
        except yaml.YAMLError as error:
            raise _yaml_error(error, file) from None
        if node is not None:
            _check_expansion(node, loader)
        return _build(node, file, loader)
    finally:
        loader.dispose()


def _build(node: yaml.Node | None, file: str, loader: _SpecLoader) -> tuple[Any, Locations]:
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
            return _scalar(n, file, loader)
        return [] if isinstance(n, yaml.SequenceNode) else {}

    return build(node, ()), locations


def _scalar(n: yaml.ScalarNode, file: str, loader: yaml.SafeLoader) -> Any:
    """One scalar, constructed by the document's own loader (not a new one per scalar)."""
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
