"""Run a kiln artifact and save its outputs (runs under qemu-aarch64 in the arm64 rootfs).

    python3 run_on_target.py ARTIFACT_DIR INPUTS.npz OUTPUTS.npz

Needs only numpy, TVM's runtime and kiln's pure-Python runtime module; the
driver (edge_check.py) sets TVM_USE_RUNTIME_LIB=1 so TVM's 250 MB compiler
library is never loaded under emulation.
"""

from __future__ import annotations

import sys
import time


def main() -> int:
    outdir, inputs, outputs = sys.argv[1:4]
    start = time.perf_counter()
    from kiln.backends.tvm import run_artifact

    run_artifact(outdir, inputs, outputs)
    sys.stderr.write(f"target run: {time.perf_counter() - start:.1f} s\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
