"""A conformance worker: reads cases (JSON, one a line) on stdin, runs each with
:func:`~kiln.compiler.testing.conformance.runner.run_in_process`, and writes each
outcome (JSON, one a line) to the file descriptor named by
``KILN_CONFORMANCE_RESULT_FD`` (a ``ping`` line is answered ``ready`` once TVM is
imported). Started by :func:`runner.run_cases`, not by hand."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys

from .cases import Case
from .runner import PING, READY, run_in_process


def main() -> None:
    out = os.fdopen(int(os.environ["KILN_CONFORMANCE_RESULT_FD"]), "w")
    logging.disable(logging.WARNING)
    import kiln.backends.tvm  # noqa: F401  (TVM's import: seconds, minutes on a loaded host)
    import kiln.compiler.driver.compile  # noqa: F401

    for line in sys.stdin:
        if line.strip() == PING:
            out.write(READY + "\n")
            out.flush()
            continue
        entry = json.loads(line)
        for key in ("domains", "input_types", "output_types"):
            entry[key] = tuple(entry[key])
        if entry["name"] == os.environ.get("KILN_CONFORMANCE_SIGNAL_ON"):
            os.kill(os.getpid(), signal.SIGSEGV)  # the runner's own test: a crashing case
        outcome = run_in_process(Case(**entry))
        out.write(outcome.to_json() + "\n")
        out.flush()


if __name__ == "__main__":
    main()
