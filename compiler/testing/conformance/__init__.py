"""ONNX's backend conformance suite, run through kiln (issue 16).

- :mod:`.cases`: the cases (node tests generated from the onnx wheel and cached,
  plus the wheel's model tests) and the figures' filters;
- :mod:`.runner`: compile + build + run + compare each case in worker processes
  (crashes and hangs are classified, never end the run);
- ``python -m kiln.compiler.testing.conformance --op Resize``: run one op's cases
  (``--case NAME``, ``--kind``, ``--all``, ``--json out.jsonl``; ``--help``).
"""

from .cases import Case, all_cases, select
from .runner import OUTCOMES, Outcome, failures, run_cases, run_in_process, summarize

__all__ = ["OUTCOMES", "Case", "Outcome", "all_cases", "failures", "run_cases", "run_in_process",
           "select", "summarize"]
