"""Run kiln artifacts and save their outputs (runs under qemu-aarch64 in the arm64 rootfs).

    python3 run_on_target.py ARTIFACT_DIR INPUTS.npz OUTPUTS.npz [ARTIFACT_DIR INPUTS.npz OUTPUTS.npz ...]

One process runs every artifact: under emulation, starting Python and TVM's runtime
costs more than running a small model.

Needs only numpy, TVM's runtime and kiln's pure-Python runtime module; the
driver (edge_check.py) sets TVM_USE_RUNTIME_LIB=1 so TVM's 250 MB compiler
library is never loaded under emulation.
"""

from __future__ import annotations

import sys
import time


def main() -> int:
    args = sys.argv[1:]
    if not args or len(args) % 3:
        sys.stderr.write(__doc__)
        return 2
    start = time.perf_counter()
    from kiln.backends.tvm import run_artifact

    for at in range(0, len(args), 3):
        outdir, inputs, outputs = args[at:at + 3]
        run_artifact(outdir, inputs, outputs)
    sys.stderr.write(f"target run: {time.perf_counter() - start:.1f} s\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
