"""kiln: compile neural networks with verified rewrites (ONNX/PyTorch in; ONNX and TVM kernels out).

    kiln compile MODEL [--spec SPEC] [--input NAME=1x3x224x224] [--target T] [-o OUTDIR]
    kiln plan MODEL --spec SPEC [--emit-spec OUT.yaml|-] [--json]
    kiln run OUTDIR --inputs in.npz [--output out.npz]
    kiln generate MODEL --prompt-ids 1,2,3 [--max-new-tokens N]
    kiln passes [NAME] [--json]
    kiln specs [NAME]
    kiln schema

Errors from bad input print one or two lines and exit with code 2; --debug shows the
traceback. -v/--verbose, -q/--quiet and --debug go before or after the subcommand.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from kiln.compiler.core.errors import KilnError, OutputError
from kiln.compiler.driver.cli_generate import add_generate_command
from kiln.compiler.driver.cli_listing import cmd_passes, cmd_schema, cmd_specs
from kiln.compiler.driver.cli_listing import print_json as _print_json
from kiln.compiler.driver.console import make_console as _console
from kiln.compiler.driver.console import native_output_silenced, print_table, progress

logger = logging.getLogger("kiln")


def _input_shapes(bindings: list[str] | None, dims: list[str] | None = None
                  ) -> dict[str, list[int | str]]:
    """``--input`` shapes; a symbolic dim stays a string (kiln.compiler.driver.symbolic),
    with its ``--dim NAME=LO..HI`` range attached as ``NAME=LO..HI``."""
    from kiln.compiler.core.spec.schema import check_input_size
    from kiln.compiler.driver import symbolic

    ranges = dict(symbolic.parse_dim_option(text) for text in dims or ())
    shapes: dict[str, list[int | str]] = {}
    for text in bindings or ():
        name, tokens = symbolic.parse_binding(text)
        if all(t.strip().isdigit() for t in tokens):
            try:
                shapes[name] = check_input_size([int(t) for t in tokens])
            except ValueError as error:
                raise KilnError(f"--input {text!r}: {error}") from None
            continue
        shapes[name] = [int(t) if t.strip().isdigit() else
                        (f"{t}={ranges[t][0]}..{ranges[t][1]}" if t in ranges else t)
                        for t in tokens]
    named = {t for dims_ in shapes.values() for t in dims_ if isinstance(t, str)}
    for symbol, (lo, hi) in ranges.items():  # a range for a model's own dim_param
        if not any(t == symbol or t.startswith(f"{symbol}=") for t in named):
            shapes.setdefault(f"*{symbol}", [f"{symbol}={lo}..{hi}"])
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
        except RecursionError:
            raise KilnError("--target: JSON nested too deeply") from None
    return text


def _check_target_name(target, spec, *, from_spec: bool) -> None:
    """An unknown preset name or an invalid raw target dict fails now, not after the passes."""
    from kiln.backends.tvm.targets import TARGETS, resolve_target

    if target is None:
        return
    if not isinstance(target, str):
        try:
            resolve_target(target)  # a bad mcpu or kind, before any work or output
        except KilnError as err:
            if from_spec:
                raise spec.error(("target",), str(err)) from None
            raise KilnError(f"--target: {err}") from None
        return

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


def _buildcache():
    from kiln.compiler.driver import buildcache

    return buildcache


def _key(args, spec, target, shapes):
    return _buildcache().build_key(args.model, spec, target=target, input_shapes=shapes,
                                   options={"no_build": args.no_build, "tune": args.tune,
                                            "tuning_db": args.tuning_db})


def _check(args, spec, target, shapes, out: Path | None) -> int:
    """--check: print whether OUTDIR holds this compile's outputs; 0 current, 1 stale."""
    if out is None:
        raise KilnError("--check needs -o OUTDIR (the folder to check)")
    key, why = _key(args, spec, target, shapes)
    current, why = _buildcache().check_outdir(out, key) if key is not None else \
        (False, f"cannot tell: {why}")
    print(f"{out}: {'up to date' if current else 'stale: ' + why}")
    return 0 if current else 1


def _build_key(args, spec, target, shapes, out: Path | None):
    """(key, cache folder) of this compile (kiln.compiler.driver.buildcache)."""
    cache = None if args.no_cache else (Path(args.cache) if args.cache else
                                        _buildcache().default_cache_dir())
    if out is None or cache is None:
        return None, cache
    return _key(args, spec, target, shapes)[0], cache


def _inputs_writer(key):
    if key is None:
        return None
    return lambda staging: _buildcache().write_inputs(staging, key)


def _after_write(key, llm: bool, target, progress):
    """OUTDIR's extra files: inputs.json (build cache), and for a checkpoint folder the
    one-token decode build (kiln.compiler.driver.generate.with_decode_build)."""
    if not llm:
        return _inputs_writer(key)
    from kiln.compiler.driver.generate import with_decode_build

    return with_decode_build(_inputs_writer(key), target, progress)


def _reuse(args, key, cache: Path, out: Path, started: float) -> bool:
    """OUTDIR already current, or filled from the cache: True (nothing to compile)."""
    bc = _buildcache()
    current, _ = bc.check_outdir(out, key)
    entry = None if current else bc.lookup(cache, key)
    if not current and entry is None:
        return False
    written: list[Path] = []
    if current:  # newer than the model and spec, for make-style tools (content unchanged)
        for name in json.loads((out / "inputs.json").read_text())["files"]:
            os.utime(out / name)
        os.utime(out / "inputs.json")
    if entry is not None:
        from kiln.compiler.driver.outdir import OutputFolder

        model = Path(args.model)
        with OutputFolder(out, protect=(model,) if model.exists() else ()) as folder:
            bc.copy_entry(entry, folder.staging)
            written = folder.commit()
    how = "up to date" if current else f"from the build cache ({entry})"
    if args.json:
        _print_json({"model": str(args.model), "output": str(out), "cached": not current,
                     "up_to_date": current, "files": [p.name for p in written],
                     "seconds": round(time.perf_counter() - started, 3),
                     "report": json.loads((out / "report.json").read_text())
                     if (out / "report.json").is_file() else None})
    elif not args.quiet:
        _console().print(f"{out}/: {how}, nothing compiled "
                         f"({time.perf_counter() - started:.1f} s)", markup=False,
                         soft_wrap=True)
    return True


def cmd_compile(args: argparse.Namespace) -> int:
    from kiln.compiler.driver.compile import compile_model, compile_to_folder

    spec = _load_spec(args.spec)
    if args.keep_symbols:
        from kiln.compiler.core.spec.schema import with_sections

        spec = with_sections(spec, output=spec.output.model_copy(update={"keep_symbols": True}))
    if args.strict:  # a lossy pass that changes nothing fails (driver.pass_checks)
        from kiln.compiler.core.spec.schema import with_sections

        spec = with_sections(spec, strict=True)
    if args.measure:  # time the host build vs uncompressed and ORT (driver.measure)
        from kiln.compiler.core.spec.schema import with_sections

        spec = with_sections(spec, output=spec.output.model_copy(update={"measure": args.measure}))
        if args.no_build or not args.output or not (args.target or spec.target):
            raise KilnError("--measure needs -o OUTDIR and a build (--target, not --no-build)")
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
    shapes = _input_shapes(args.input, args.dim)
    if args.check:
        return _check(args, spec, target, shapes, out)
    # a checkpoint folder also gets the one-token decode build (OUTDIR/decode), which the
    # build cache does not hold: such a compile bypasses the cache
    from kiln.compiler.core.llm_export import is_llm_folder

    llm = target is not None and out is not None and is_llm_folder(Path(args.model))
    key, cache = (None, None) if llm else _build_key(args, spec, target, shapes, out)
    if key is not None and cache is not None and _reuse(args, key, cache, out, started):
        return 0
    # -q and --json print nothing but the result: TVM's C++ logging goes to a scratch file
    silent = (args.quiet or args.json) and not args.debug
    with progress("off" if args.quiet or args.json else "auto",
                  every_step=args.verbose > 0) as say, \
            native_output_silenced(silent):
        if out is None:
            result = compile_model(args.model, spec, input_shapes=shapes,
                                   target=target, progress=say)
        else:  # staged, all or nothing, under OUTDIR's lock (kiln.compiler.driver.outdir)
            result = compile_to_folder(args.model, spec, out,
                                       input_shapes=shapes, target=target,
                                       progress=say, tune_trials=args.tune,
                                       tuning_db=args.tuning_db,
                                       after_write=_after_write(key, llm, target, say))
            if key is not None and cache is not None:
                _buildcache().store(cache, key, out)
    console = _console()
    seconds = time.perf_counter() - started
    if args.json:
        _print_json({"model": str(args.model), "output": str(out) if out else None,
                     "files": [p.name for p in result.written] if out is not None else [],
                     "seconds": round(seconds, 3), "compiled": result.report.compiled_lines(),
                     "report": json.loads(result.report.to_json())})
    elif not args.quiet:
        print_table(console, result.report.table())
        for line in result.report.summary_lines() + result.report.compiled_lines():
            console.print(line, markup=False)          # wrapped at the console's width
        if out is not None:
            written = ", ".join(p.name for p in result.written)  # this run's files only
            console.print(f"wrote {out}/: {written} ({seconds:.1f} s)", markup=False,
                          soft_wrap=True)
            if llm:
                from kiln.compiler.driver.generate import builds_in

                for line in builds_in(out):
                    console.print(f"build {line}", markup=False, soft_wrap=True)
        else:
            console.print("nothing written (no -o OUTDIR)")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from kiln.compiler.driver.compile import plan_model
    from kiln.compiler.driver.sensitivity import ranking_lines

    spec = _load_spec(args.spec)
    if args.json and args.emit_spec == "-":
        raise KilnError("--json and --emit-spec - both write to stdout; give --emit-spec a file")
    with progress("off" if args.quiet or args.json or not args.sensitivity else "auto") as say:
        plan = plan_model(args.model, spec, input_shapes=_input_shapes(args.input, args.dim),
                          sensitivity_of_layers=args.sensitivity, progress=say)
    if args.json:
        _print_json([{"pass": entry.name, "select": str(entry.selector),
                      "selected": entry.selected,
                      "rewrites": [c.label for c in entry.candidates if c.accepted],
                      "refuses": [{"node": c.label, "reason": c.reason}
                                  for c in entry.candidates if not c.accepted]}
                     | ({"sensitivity": [s.to_dict() for s in entry.ranking]}
                        if entry.ranking is not None else {}) for entry in plan])
        if args.emit_spec:
            _emit_spec(spec, args.emit_spec)
        return 0
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
        for line in ranking_lines(entry.name, entry.ranking) if entry.ranking else []:
            console.print(line, markup=False)
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


def cmd_run(args: argparse.Namespace) -> int:
    from kiln.backends import tvm as tvm_backend

    with native_output_silenced(args.quiet and not args.debug):
        outputs = tvm_backend.run_artifact(Path(args.artifact), Path(args.inputs),
                                           Path(args.output) if args.output else None,
                                           threads=args.threads)
    if args.quiet:
        return 0
    console = _console()
    for i, array in enumerate(outputs):
        console.print(f"output {i}: shape {list(array.shape)} {array.dtype}", markup=False)
    if args.output:
        console.print(f"wrote {args.output}")
    return 0


#: (command, what it does) per subcommand, shown under its --help
_EXAMPLES: dict[str, list[tuple[str, str]]] = {
    "compile": [
        ("kiln compile model.onnx -o out/", "verify, export ONNX, build for this CPU"),
        ("kiln compile model.onnx --spec int8 -o out/", "a built-in spec (kiln specs lists them)"),
        ("kiln compile model.onnx -s my.yaml -i x=1x3x224x224 -t arm64 -o out/",
         "your spec, a bound input shape, an arm64 build"),
        ("kiln compile model.onnx --spec int4-weights --no-build -o out/",
         "the rewritten model.onnx and report only"),
        ("kiln compile model.onnx -o out/ --tune 200", "tune kernels (needs kiln[tune])"),
        ("kiln compile model.onnx -o out/ --json", "the summary as JSON, for scripts"),
    ],
    "plan": [
        ("kiln plan model.onnx --spec int8", "the nodes each pass would rewrite or refuse"),
        ("kiln plan model.onnx --spec my.yaml --input x=1x3x640x640", "with a bound input"),
        ("kiln plan model.onnx --spec my.yaml --emit-spec -", "the resolved spec as YAML"),
        ("kiln plan model.onnx --spec int8 --json", "the plan as JSON"),
    ],
    "run": [
        ("kiln run out/ --inputs in.npz", "print the outputs' shapes and dtypes"),
        ("kiln run out/ --inputs in.npz --output out.npz --threads 2", "save the outputs"),
    ],
    "passes": [
        ("kiln passes", "every pass and its options"),
        ("kiln passes quantize", "one pass, the types of its options spelled out"),
        ("kiln passes --json", "the options as JSON Schema"),
    ],
    "specs": [
        ("kiln specs", "the built-in specs, one line each"),
        ("kiln specs int8 > my.yaml", "a built-in spec, to start your own from"),
    ],
    "schema": [("kiln schema > kiln-spec.schema.json", "for editors that check YAML")],
    "generate": [("kiln generate out/ --prompt-ids 1,2,3 --max-new-tokens 16",
                  "greedy decoding with a compiled checkpoint (docs/llm.md)")],
}


def _examples(name: str) -> str | None:
    if name not in _EXAMPLES:
        return None
    return "examples:\n" + "\n".join(f"  # {what}\n  {command}" for command, what in
                                      _EXAMPLES[name])


def _common_options(defaults: bool) -> argparse.ArgumentParser:
    """-v, -q and --debug, accepted before and after the subcommand (after it, they are
    SUPPRESSed defaults, so that they do not undo what was given before it)."""
    common = argparse.ArgumentParser(add_help=False)
    keep = {} if defaults else {"default": argparse.SUPPRESS}
    group = common.add_argument_group("output")
    group.add_argument("-v", "--verbose", action="count", help="log more (-v: info, -vv: debug)",
                       **({"default": 0} if defaults else keep))
    group.add_argument("-q", "--quiet", action="store_true",
                       help="print nothing on success, TVM's own C++ logging included",
                       **({"default": False} if defaults else keep))
    group.add_argument("--debug", action="store_true",
                       help="show tracebacks and debug logs (TVM's logging is not silenced)",
                       **({"default": False} if defaults else keep))
    return common


def _sub(sub, name: str, common, help_text: str):
    return sub.add_parser(name, parents=[common], help=help_text, description=help_text,
                          epilog=_examples(name),
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _model_and_inputs(p: argparse.ArgumentParser, *, spec_required: bool) -> None:
    p.add_argument("model", help="the model: model.onnx, model.pt2 (torch.export) or "
                                 "MODULE:CALLABLE returning (nn.Module, example inputs)")
    p.add_argument("--spec", "-s", metavar="SPEC", required=spec_required,
                   help="a spec file (my.yaml) or a built-in spec name (int8, reparam, ...: "
                        "kiln specs lists them)" + ("" if spec_required else
                                                    "; default: no passes"))
    p.add_argument("--input", "-i", action="append", metavar="NAME=DIMS",
                   help="bind a dynamic input's shape, e.g. x=1x3x640x640 (repeat for each "
                        "input; overrides the spec's inputs:); a dim may be a symbol (W), "
                        "a range (16..1024) or both (W=16..1024): one build serves every size")
    p.add_argument("--dim", action="append", metavar="NAME=LO..HI",
                   help="the range of a symbolic dim named in --input or by the model "
                        "(ONNX dim_param), e.g. W=16..1024")


def build_parser() -> argparse.ArgumentParser:
    from kiln.compiler.core.version import kiln_version

    parser = argparse.ArgumentParser(
        prog="kiln", description=__doc__.split("\n\n")[0],
        epilog="kiln COMMAND --help shows a command's options and examples.",
        parents=[_common_options(defaults=True)])
    parser.add_argument("--version", action="version", version=f"kiln {kiln_version()}")
    common = _common_options(defaults=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _sub(sub, "compile", common, "rewrite, verify, export ONNX and build a model")
    _model_and_inputs(p, spec_required=False)
    p.add_argument("--target", "-t", metavar="TARGET",
                   help="a target preset (host, x86-64-v3, arm64, cuda-sm90, ...) or a TVM "
                        "target as JSON, e.g. '{\"kind\": \"llvm\", \"mcpu\": \"znver4\"}'; "
                        "default: the spec's target:, else host")
    p.add_argument("--no-build", action="store_true",
                   help="skip the TVM build (write the rewritten model.onnx and report only)")
    p.add_argument("--tune", type=int, metavar="TRIALS", default=None,
                   help="MetaSchedule trials for kernels without a tuning record (overrides "
                        "the spec's tune.trials; 0: none; needs pip install 'kiln[tune]')")
    p.add_argument("--tuning-db", metavar="DIR", default=None,
                   help="tuning database folder (default: the user's cache folder)")
    p.add_argument("-o", "--output", metavar="OUTDIR",
                   help="folder for model.onnx, model.so, manifest.json, report.json "
                        "(replaced all or nothing); without it nothing is written")
    p.add_argument("--keep-symbols", action="store_true",
                   help="keep the symbol table in a cross-compiled library (default: strip "
                        "arm64 libraries, about a third smaller)")
    p.add_argument("--measure", type=int, nargs="?", const=20, default=0, metavar="RUNS",
                   help="after a host build, time it against the uncompressed model and ONNX "
                        "Runtime (RUNS calls each, default 20) into report.json; warns when "
                        "the compressed module is slower, with the reasons")
    p.add_argument("--strict", action="store_true",
                   help="a lossy pass that changes nothing is an error (spec: strict: true)")
    p.add_argument("--json", action="store_true",
                   help="print the summary (report, files written) as JSON on stdout")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 0 when OUTDIR holds the outputs of exactly this "
                        "compile (same model, spec, target, kiln), 1 when they are stale")
    p.add_argument("--cache", metavar="DIR", default=None,
                   help="build cache folder (default: $KILN_BUILD_CACHE_DIR, else "
                        "~/.cache/kiln/builds; KILN_BUILD_CACHE=off disables it): a compile "
                        "already done is copied from there instead of run again")
    p.add_argument("--no-cache", action="store_true",
                   help="neither read nor fill the build cache, and rebuild even when "
                        "OUTDIR is up to date")
    p.set_defaults(func=cmd_compile)

    p = _sub(sub, "plan", common, "show what each pass would touch, changing nothing")
    _model_and_inputs(p, spec_required=True)
    p.add_argument("--emit-spec", metavar="OUT", default=None,
                   help="write the loaded spec (extends resolved, every option) as YAML to OUT "
                        "(- for stdout; the plan then goes to stderr)")
    p.add_argument("--json", action="store_true",
                   help="print the plan as JSON: per pass, the nodes it rewrites and refuses "
                        "(with the reason)")
    p.add_argument("--sensitivity", action="store_true",
                   help="rank each lossy pass's layers by the output SQNR of rewriting each "
                        "alone (on the verification samples)")
    p.set_defaults(func=cmd_plan)

    p = _sub(sub, "run", common, "run a compiled artifact on inputs from an .npz")
    p.add_argument("artifact", metavar="OUTDIR", help="a folder kiln compile -o wrote")
    p.add_argument("--inputs", required=True, metavar="IN.npz",
                   help=".npz with one array per input name")
    p.add_argument("--output", metavar="OUT.npz", help="write the outputs to this .npz")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="most CPU threads a call uses; each call picks 1..N from the calls' times "
                        "(default N: the cores this process may use)")
    p.set_defaults(func=cmd_run)

    p = _sub(sub, "passes", common, "list every pass with its options")
    p.add_argument("name", nargs="?", metavar="NAME",
                   help="show one pass, with the types its options refer to spelled out")
    p.add_argument("--json", action="store_true",
                   help="print the passes and their options (as JSON Schema) as JSON")
    p.set_defaults(func=cmd_passes)

    p = _sub(sub, "specs", common, "list the built-in specs, or print one")
    p.add_argument("name", nargs="?", metavar="NAME", help="print this built-in spec's YAML")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(func=cmd_specs)

    p = _sub(sub, "schema", common, "print the spec's JSON Schema (every pass's options too)")
    p.set_defaults(func=cmd_schema)
    add_generate_command(sub, common, _sub)
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
    # -v: kiln's own info; -vv and --debug: everything's debug logs; -q: errors only
    if args.debug or args.verbose >= 2:
        level = logging.DEBUG
    else:
        level = logging.ERROR if args.quiet else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("kiln").setLevel(logging.INFO if args.verbose == 1 and not args.debug
                                       else logging.NOTSET)
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
