"""The ``kiln`` command line.

    kiln compile MODEL [--spec SPEC] [--input NAME=1x3x224x224] [--target T] [-o OUTDIR]
    kiln plan MODEL --spec SPEC [--emit-spec OUT.yaml|-]
    kiln run OUTDIR --inputs in.npz [--output out.npz]
    kiln passes
    kiln schema

Errors from bad input print one or two lines and exit with code 2; ``--debug``
shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from kiln.compiler.core.errors import KilnError, OutputError

logger = logging.getLogger("kiln")


def _console(stderr: bool = False):
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal:
        console.width = max(console.width, 132)  # logs and pipes: do not squeeze tables
    return console


@contextmanager
def _progress(enabled: bool):
    """A spinner with the current step on stderr (only on a terminal)."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = _console(stderr=True)
    if not enabled or not console.is_terminal:
        yield lambda text: logger.info("%s", text)
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("kiln", total=None)
        yield lambda text: progress.update(task, description=text)


def _input_shapes(bindings: list[str] | None) -> dict[str, list[int]]:
    from kiln.compiler.core.frontend import parse_input_binding
    from kiln.compiler.core.spec.schema import check_input_size

    shapes = {}
    for text in bindings or ():
        name, dims = parse_input_binding(text)
        try:
            shapes[name] = check_input_size(dims)
        except ValueError as error:
            raise KilnError(f"--input {text!r}: {error}") from None
    return shapes


def _load_spec(ref: str | None):
    from kiln.compiler.core.spec import default_spec
    from kiln.compiler.driver.specs import load_spec

    if ref is None:
        return default_spec()
    if not ref.strip():
        raise KilnError("--spec is empty: give a spec file or a built-in spec name "
                        "(`kiln specs` lists them)")
    return load_spec(ref)


def _target_arg(text: str | None):
    if text is None:
        return None
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise KilnError(f"--target: not valid JSON ({error.msg})") from None
    return text


def _check_target_name(target, spec, *, from_spec: bool) -> None:
    """An unknown preset name fails now, not after the passes (a raw dict is TVM's to check)."""
    if not isinstance(target, str):
        return
    from kiln.backends.tvm.targets import TARGETS, resolve_target

    if target in TARGETS:
        resolve_target(target)  # before any output is written (e.g. a bad KILN_HOST_MCPU)
        return
    import difflib

    close = difflib.get_close_matches(target, TARGETS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    message = (f"unknown target {target!r}{hint}; known targets: {', '.join(TARGETS)} "
               "(or a TVM target dict)")
    if from_spec:
        raise spec.error(("target",), message)
    raise KilnError(f"--target: {message}")


def _check_outdir(out: Path, model: Path, writes_onnx: bool) -> None:
    """Refuse, before any work, an OUTDIR that is a file or whose model.onnx is the input."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    try:
        clobbers = writes_onnx and model.exists() and \
            (out / "model.onnx").resolve() == model.resolve()
    except OSError:
        clobbers = False
    if clobbers:
        raise OutputError(f"{out / 'model.onnx'}: is the input model; refusing to write over "
                          "it (choose another -o OUTDIR)")


def cmd_compile(args: argparse.Namespace) -> int:
    from kiln.compiler.driver.compile import compile_model, compile_to_folder

    spec = _load_spec(args.spec)
    target = _target_arg(args.target)
    _check_target_name(spec.target, spec, from_spec=True)
    _check_target_name(target, spec, from_spec=False)
    if args.no_build:
        target = None
    elif target is None:
        target = spec.target
    out = Path(args.output) if args.output else None
    if args.tune is not None and args.tune < 0:
        raise KilnError(f"--tune {args.tune}: the number of trials must be >= 0")
    if out is None and (args.tune or args.tuning_db):
        raise KilnError("--tune/--tuning-db need -o OUTDIR (tuning happens while building)")
    if out is not None:
        _check_outdir(out, Path(args.model), spec.output.onnx)
    started = time.perf_counter()
    with _progress(not args.quiet) as say:
        if out is None:
            result = compile_model(args.model, spec, input_shapes=_input_shapes(args.input),
                                   target=target, progress=say)
        else:  # staged, all or nothing, under OUTDIR's lock (kiln.compiler.driver.outdir)
            result = compile_to_folder(args.model, spec, out,
                                       input_shapes=_input_shapes(args.input), target=target,
                                       progress=say, tune_trials=args.tune,
                                       tuning_db=args.tuning_db)
    console = _console()
    if not args.quiet:
        console.print(result.report.table())
        for line in result.report.compiled_lines():
            console.print(line)
        if out is not None:
            written = ", ".join(p.name for p in result.written)  # this run's files only
            console.print(f"wrote {out}/: {written} ({time.perf_counter() - started:.1f} s)")
        else:
            console.print("nothing written (no -o OUTDIR)")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from kiln.compiler.driver.compile import plan_model

    spec = _load_spec(args.spec)
    plan = plan_model(args.model, spec, input_shapes=_input_shapes(args.input))
    # With the spec on stdout, the plan goes to stderr.
    console = _console(stderr=args.emit_spec == "-")
    for entry in plan:
        accepted = [c for c in entry.candidates if c.accepted]
        refused = [c for c in entry.candidates if not c.accepted]
        console.print(f"[bold]{entry.name}[/bold]  select: {entry.selector} "
                      f"({entry.selected} nodes); would rewrite {len(accepted)}, "
                      f"refuses {len(refused)}")
        for c in accepted:
            console.print(f"  + {c.label}", markup=False)
        for c in refused:
            console.print(f"  - {c.label}: {c.reason}", markup=False)
    if args.emit_spec:
        _emit_spec(spec, args.emit_spec)
    return 0


def _emit_spec(spec, where: str) -> None:
    """The loaded spec as YAML (``extends`` resolved, every value written) to a file or ``-``."""
    from kiln.compiler.core.spec import dump_spec

    text = dump_spec(spec)
    if where == "-":
        sys.stdout.write(text)
        return
    try:
        Path(where).write_text(text, encoding="utf-8")
    except OSError as error:
        raise OutputError(f"{where}: cannot write the spec ({error.strerror or error})") \
            from error


def cmd_passes(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from kiln.compiler.driver import registry

    console = _console()
    for name, info in sorted(registry.available().items()):
        try:
            cls = registry.get_pass_class(name)
        except KilnError as error:
            console.print(f"{escape(name)}  [red]unavailable[/red]: {escape(str(error))}")
            continue
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        kind = "exact" if cls.exact else "lossy"
        origin = "" if info.origin == "builtin" else f" [plugin: {info.origin}]"
        # escape: "[plugin: ...]" and docstrings with brackets are not rich markup.
        console.print(f"[bold]{escape(name)}[/bold] ({kind}){escape(origin)}: {escape(doc)}")
        for field_name, field in cls.config_class.model_fields.items():
            default = field.default
            desc = f" - {field.description}" if field.description else ""
            console.print(f"    {field_name}: {_type_name(field.annotation)} = {default!r}{desc}",
                          markup=False)
        console.print("    (every pass also takes: select, optional, budget)", markup=False)
    return 0


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


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


def cmd_run(args: argparse.Namespace) -> int:
    from kiln.backends import tvm as tvm_backend

    outputs = tvm_backend.run_artifact(Path(args.artifact), Path(args.inputs),
                                       Path(args.output) if args.output else None,
                                       threads=args.threads)
    console = _console()
    for i, array in enumerate(outputs):
        console.print(f"output {i}: shape {list(array.shape)} {array.dtype}", markup=False)
    if args.output:
        console.print(f"wrote {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compile", help="rewrite, verify, export ONNX and build a model")
    p.add_argument("model", help="model.onnx, model.pt2 or MODULE:CALLABLE")
    p.add_argument("--spec", "-s", help="a spec file or built-in spec name")
    p.add_argument("--input", "-i", action="append", metavar="NAME=DIMS",
                   help="bind an input shape, e.g. x=1x3x640x640 (repeatable)")
    p.add_argument("--target", "-t", help="target preset (host, arm64, cuda-sm90, ...) or JSON")
    p.add_argument("--no-build", action="store_true", help="skip the TVM build")
    p.add_argument("--tune", type=int, metavar="TRIALS", default=None,
                   help="MetaSchedule trials (overrides the spec's tune.trials; 0: none)")
    p.add_argument("--tuning-db", metavar="DIR", default=None,
                   help="tuning database folder (default: the user's cache folder)")
    p.add_argument("-o", "--output", metavar="OUTDIR", help="folder for model.onnx, report.json...")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("plan", help="show what each pass would touch, changing nothing")
    p.add_argument("model")
    p.add_argument("--spec", "-s", required=True)
    p.add_argument("--input", "-i", action="append", metavar="NAME=DIMS")
    p.add_argument("--emit-spec", metavar="OUT", default=None,
                   help="write the loaded spec (extends resolved, every option) as YAML to OUT "
                        "(- for stdout)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("run", help="run a compiled artifact on inputs from an .npz")
    p.add_argument("artifact", metavar="OUTDIR")
    p.add_argument("--inputs", required=True, help=".npz with one array per input name")
    p.add_argument("--output", help="write outputs to this .npz")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads (default: the cores free when it starts)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("passes", help="list every pass with its options")
    p.set_defaults(func=cmd_passes)

    p = sub.add_parser("schema", help="print the spec's JSON Schema")
    p.set_defaults(func=cmd_schema)
    return parser


def _short_message(error: KilnError) -> str:
    """At most two lines, whatever text a library put into the error."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if len(lines) > 2:
        lines = lines[:2]
        lines[1] += " ... (more with --debug)"
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from kiln.compiler.core import interrupt

    try:
        with interrupt.handled():  # SIGTERM too; an interrupt TVM turned into an error stays one
            try:
                return args.func(args)
            except KilnError:
                if interrupt.received() is not None:
                    raise KeyboardInterrupt from None
                raise
    except KilnError as error:
        if args.debug:
            raise
        sys.stderr.write(f"kiln: error: {_short_message(error)}\n")
        if getattr(error, "failed_report", None):
            sys.stderr.write(f"kiln: report of the failed compile: {error.failed_report}\n")
        return error.exit_code
    except KeyboardInterrupt as error:
        sys.stderr.write("kiln: interrupted\n")
        interrupt.release_quietly(error)  # no native destructor warnings after this line
        return 130


if __name__ == "__main__":
    sys.exit(main())
