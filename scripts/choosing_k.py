"""The "Choosing k and trusting the components" commands of docs/sweeps.md, run as written there.

Automatic rank on digits, then the cNMF workflow as one sweep (consensus over 100
restarts at each rank) and its report, whose ``k_selection.png`` the page shows.

    python scripts/choosing_k.py            # writes outputs/digits_auto, multirun/digits_consensus, docs/consensus_digits
    python scripts/choosing_k.py --quick    # the same commands with fewer updates and restarts (the test)
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

#: as docs/sweeps.md writes them
COMMANDS = (
    "nmf-train data=digits model.rank=auto model.rank_max=32 optimizer=hals model.l2_W=1 model.l2_H=1 "
    "model.tol=1e-4 trainer.max_steps=1000 hydra.run.dir=outputs/digits_auto",
    "nmf-train -m data=digits 'model.rank=range(4,17,2)' model.restarts=100 model.consensus=true "
    "optimizer=hals trainer.max_steps=300 hydra.sweep.dir=multirun/digits_consensus",
    "nmf-sweep-report multirun/digits_consensus --out docs/consensus_digits",
)
#: --quick: appended to the nmf-train commands
QUICK = ("trainer.max_steps=30", "model.rank_max=8", "model.restarts=4", "callbacks.progress_bar.refresh_rate=0")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer updates, ranks and restarts")
    ap.add_argument("--cwd", type=Path, default=Path.cwd(), help="where the outputs go (default: here)")
    args = ap.parse_args()
    for command in COMMANDS:
        argv = shlex.split(command)
        if args.quick and argv[0] == "nmf-train":
            argv += [q for q in QUICK if not (q.startswith("model.rank_max") and "-m" in argv)]
            argv = [a.replace("range(4,17,2)", "range(4,7,2)") for a in argv]
        print("$", shlex.join(argv), flush=True)
        code = subprocess.call(argv, cwd=args.cwd)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
