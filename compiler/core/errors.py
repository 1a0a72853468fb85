"""kiln's error kinds: one root, a few kinds, each printable in one or two lines.

The CLI prints ``str(error)`` and exits with code 2; a traceback is shown only
with ``--debug``.
"""

from __future__ import annotations

from collections.abc import Sequence


class KilnError(Exception):
    """Root of every error kiln raises on purpose (bad input, failed check)."""

    exit_code = 2


class SpecError(KilnError):
    """A spec is malformed: names the file, the line and the key path."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 path: str | None = None) -> None:
        self.file = file
        self.line = line
        self.path = path
        self.detail = message
        where = ""
        if file:
            where = f"{file}:{line}" if line else file
        if path:
            where = f"{where} {path}" if where else path
        super().__init__(f"{where}: {message}" if where else message)


class FrontendError(KilnError):
    """A model could not be loaded or exported into kiln's IR.

    ``input_key``: the ``--input`` key that names no input of the model, when that is
    the error (the driver maps it back to the spec line that gave it).
    """

    def __init__(self, message: str, *, input_key: str | int | None = None) -> None:
        super().__init__(message)
        self.input_key = input_key


class PassError(KilnError):
    """A pass failed; names the pass and the passes that ran before it."""

    def __init__(self, message: str, *, pass_name: str, ran_before: Sequence[str] = ()) -> None:
        self.pass_name = pass_name
        self.ran_before = list(ran_before)
        before = f" (after {', '.join(self.ran_before)})" if self.ran_before else ""
        super().__init__(f"pass {pass_name!r}{before}: {message}")


class LoweringError(KilnError):
    """A model cannot be lowered for a target; names the target, op(s) and node(s)."""

    def __init__(self, message: str, *, target: str | None = None,
                 ops: dict[str, str] | None = None) -> None:
        self.target = target
        self.ops = dict(ops or {})
        prefix = f"target {target!r}: " if target else ""
        super().__init__(prefix + message)


class VerificationError(KilnError):
    """A pass (or the compiled module) changed the model's outputs beyond its budget."""

    def __init__(self, message: str, *, pass_name: str | None = None, output: str | None = None,
                 sqnr_db: float | None = None, max_abs_err: float | None = None) -> None:
        self.pass_name = pass_name
        self.output = output
        self.sqnr_db = sqnr_db
        self.max_abs_err = max_abs_err
        super().__init__(message)


class OutputError(KilnError):
    """An output could not be written (or would overwrite the input)."""
