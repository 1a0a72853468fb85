"""``kiln generate MODEL --prompt-ids 1,2,3 --max-new-tokens N``: greedy decoding (docs/llm.md).

MODEL is a compiled folder (``kiln compile MODEL_DIR -t host -o OUTDIR``) or a checkpoint
folder, compiled first (``--spec``, into ``-o OUTDIR`` or a temporary folder). Prints the
new token ids, comma-separated, and (unless ``-q``) the prefill time and decode speed.
"""

from __future__ import annotations

import argparse
import json

from kiln.compiler.core.errors import KilnError


def _token_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected token ids like 1,2,3") from None
    if not ids or any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError(f"{text!r}: expected non-negative token ids like 1,2,3")
    return ids


def add_generate_command(sub, common, make_parser) -> None:
    """Register ``generate`` (``make_parser``: the CLI's ``_sub``)."""
    p = make_parser(sub, "generate", common, "decode greedily with a compiled language model")
    p.add_argument("model", metavar="MODEL",
                   help="a compiled folder (manifest.json) or a checkpoint folder (config.json)")
    p.add_argument("--prompt-ids", required=True, type=_token_ids, metavar="IDS",
                   help="the prompt's token ids, comma-separated (e.g. 1,2,3)")
    p.add_argument("--max-new-tokens", type=int, default=16, metavar="N",
                   help="how many tokens to generate (default 16)")
    p.add_argument("--spec", "-s", metavar="SPEC", default=None,
                   help="the spec a checkpoint folder is compiled with (default: no passes)")
    p.add_argument("-o", "--output", metavar="OUTDIR", default=None,
                   help="keep the compiled checkpoint in OUTDIR (default: a temporary folder)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="most CPU threads a call uses; each call picks 1..N from the calls' times "
                        "(default N: the cores this process may use)")
    p.add_argument("--json", action="store_true",
                   help="print the tokens and timings as JSON")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from kiln.compiler.driver.console import make_console, native_output_silenced, progress
    from kiln.compiler.driver.generate import generate

    if args.max_new_tokens < 1:
        raise KilnError(f"--max-new-tokens {args.max_new_tokens}: expected at least 1")
    silent = (args.quiet or args.json) and not args.debug
    with progress("off" if args.quiet or args.json else "auto") as say, \
            native_output_silenced(silent):
        result = generate(args.model, args.prompt_ids, args.max_new_tokens, spec=args.spec,
                          outdir=args.output, threads=args.threads, progress=say)
    speed = result.decode_tokens_per_second()
    if args.json:
        print(json.dumps({"prompt": result.prompt, "tokens": result.tokens,
                          "prefill_seconds": round(result.prefill_seconds, 6),
                          "decode_tokens_per_second": speed and round(speed, 3)}))
        return 0
    print(",".join(str(t) for t in result.tokens))
    if not args.quiet:
        line = f"prefill {len(result.prompt)} tokens: {result.prefill_seconds * 1e3:.1f} ms"
        if speed is not None:
            line += f"; decode: {speed:.1f} tokens/s over {len(result.decode_seconds)} steps"
        make_console(stderr=True).print(line, markup=False)
    return 0
