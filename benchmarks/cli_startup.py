#!/usr/bin/env python3
"""Start-up time of the ``agt-mesh`` command line (its imports are lazy).

Runs ``python -m agt_mesh --help`` and the ``agt-mesh`` console script ``--help`` about ten
times each and prints the medians, plus a bare ``python -c pass`` as the floor; also
reports which heavy modules importing ``agt_mesh.cli.main`` loads (it should be none).

Usage: ``python benchmarks/cli_startup.py [--runs 10] [--json]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HEAVY = ("agt_mesh.shell.client", "httpx", "websockets", "nacl", "cryptography", "msgpack", "asyncio")
TARGET = 0.3


def timed(cmd: list[str], runs: int) -> list[float]:
    subprocess.run(cmd, capture_output=True, check=True)  # warm the file cache
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        out.append(time.perf_counter() - t0)
    return out


def heavy_imports(python: str = sys.executable) -> list[str]:
    """The heavy modules that ``import agt_mesh.cli.main`` loads."""
    code = f"import sys, agt_mesh.cli.main; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    return proc.stdout.split()


def console_script() -> str | None:
    here = Path(sys.executable).parent / "agt-mesh"
    return str(here) if here.exists() else shutil.which("agt-mesh")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    rows: dict[str, list[float]] = {
        "python -c pass (floor)": timed([sys.executable, "-c", "pass"], args.runs),
        "python -m agt_mesh --help": timed([sys.executable, "-m", "agt_mesh", "--help"], args.runs),
    }
    script = console_script()
    if script:
        rows["agt-mesh --help"] = timed([script, "--help"], args.runs)
    medians = {name: statistics.median(times) for name, times in rows.items()}
    heavy = heavy_imports()
    if args.json:
        print(json.dumps({"runs": args.runs, "median_seconds": medians, "heavy_imports": heavy, "target": TARGET}))
    else:
        for name, med in medians.items():
            print(f"{name:<28} median {med * 1000:7.1f} ms  (min {min(rows[name]) * 1000:.1f} ms, {args.runs} runs)")
        print(f"heavy modules loaded by agt_mesh.cli.main: {', '.join(heavy) or 'none'}")
        print(f"target: --help under {TARGET * 1000:.0f} ms")
    worst = max(v for k, v in medians.items() if "help" in k)
    return 0 if worst < TARGET and not heavy else 1


if __name__ == "__main__":
    sys.exit(main())
