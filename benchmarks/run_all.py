"""Regenerate every table and plot in docs/results (and so in the README).

    python -m benchmarks.run_all            # all but the peers, about 3 hours on 2 cores
    python -m benchmarks.run_all --quick    # smoke run of each script, about 10 minutes

Each script is also runnable alone (see benchmarks/README.md). Peers (NNCF, AIMET) need
their own environment: see benchmarks/peers.py.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

SCRIPTS = ("accuracy", "pruning", "calib_size", "renorm_variants", "renorm_auto", "efficientnet", "speed", "reconstruct", "deploy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", choices=SCRIPTS, default=list(SCRIPTS))
    args = parser.parse_args()
    for name in args.only:
        start = time.time()
        command = [sys.executable, "-m", f"benchmarks.{name}"] + (["--quick"] if args.quick else [])
        print(f"== {' '.join(command[1:])}", flush=True)
        subprocess.run(command, check=True)
        print(f"== {name}: {(time.time() - start) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
