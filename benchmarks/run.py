#!/usr/bin/env python3
"""Crypto benchmark, side by side with the TypeScript SDK in the same run.

Runs ``benchmarks/ts_bench.js`` (npm ``@microsoft/agent-governance-sdk@4.0.0`` in Node) and
``benchmarks/crypto_bench.py`` (this SDK plus the primitive floor), then prints medians of
the rounds and, for each row, the ratio to TypeScript and to the floor.  Machines are
noisy: only medians and ratios from one run are meaningful, never a lone absolute time.

Usage: ``python benchmarks/run.py [--rounds 5] [--seconds 0.5] [--json OUT] [--markdown]``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import crypto_bench  # noqa: E402

TARGETS = {  # row: (min ratio to TS, max ratio to floor) from the project's goals
    "oneway_1024": (4.0, 1.3),
    "oneway_65536": (10.0, None),
    "pingpong_64": (25.0, 1.15),
    "pingpong_1024": (25.0, 1.15),
    "pingpong_65536": (25.0, 1.15),
    "x3dh": (25.0, 1.15),
}
MEMORY_TARGET = 1024


def run_ts(rounds: int, seconds: float, rows: list[str]) -> dict[str, Any]:
    cmd = [
        "node",
        "--expose-gc",
        str(HERE / "ts_bench.js"),
        "--rounds",
        str(rounds),
        "--seconds",
        str(seconds),
        "--rows",
        ",".join([*rows, "memory"]),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=HERE.parent)
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=0.5)
    ap.add_argument("--warmup", type=float, default=0.1)
    ap.add_argument("--rows", default=",".join(crypto_bench.ROWS))
    ap.add_argument("--json", metavar="OUT", help="also write the full results as JSON")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = ap.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]

    ts = run_ts(args.rounds, args.seconds, rows)
    py = crypto_bench.run(tuple(rows), args.rounds, args.seconds, args.warmup)
    mem_py = crypto_bench.memory_per_session()

    table = []
    for row in rows:
        sdk = statistics.median(py["sdk"][row])
        floor = statistics.median(py["floor"][row])
        ts_ops = statistics.median(ts["rounds"][row])
        table.append(
            {
                "row": row,
                "sdk_ops": sdk,
                "floor_ops": floor,
                "ts_ops": ts_ops,
                "x_ts": sdk / ts_ops,
                "x_floor": floor / sdk,
            }
        )
    result = {
        "python": platform.python_version(),
        "node": ts.get("node"),
        "ts_impl": ts.get("impl"),
        "rounds": args.rounds,
        "seconds_per_round": args.seconds,
        "rows": table,
        "memory_per_session_bytes": {"sdk": mem_py, "ts": ts.get("memory_per_session_bytes")},
        "raw": {"python": py, "ts": ts["rounds"]},
    }

    def verdict(row: str, x_ts: float, x_floor: float) -> str:
        want = TARGETS.get(row)
        if not want:
            return ""
        ok = x_ts >= want[0] and (want[1] is None or x_floor <= want[1])
        goal = f">= {want[0]:g}x TS" + (f", <= {want[1]:g}x floor" if want[1] else "")
        return ("met" if ok else "MISSED") + f" ({goal})"

    if args.markdown:
        print(
            "| operation | this SDK (ops/s) | TS SDK 4.0.0 (ops/s) | primitive floor (ops/s) "
            "| × TS | cost vs floor | target |"
        )
        print("|---|---:|---:|---:|---:|---:|---|")
        for r in table:
            print(
                f"| {r['row']} | {r['sdk_ops']:,.0f} | {r['ts_ops']:,.0f} | {r['floor_ops']:,.0f} "
                f"| {r['x_ts']:.1f}× | {r['x_floor']:.2f}× | {verdict(r['row'], r['x_ts'], r['x_floor'])} |"
            )
        ts_mem = ts.get("memory_per_session_bytes")
        print(
            f"| memory per session endpoint | {mem_py:,.0f} B | {ts_mem:,.0f} B | — | — | — "
            f"| {'met' if mem_py <= MEMORY_TARGET else 'MISSED'} (<= {MEMORY_TARGET} B) |"
        )
    else:
        print(f"{'row':16} {'sdk ops/s':>12} {'ts ops/s':>10} {'floor ops/s':>12} {'x TS':>7} {'x floor':>8}")
        for r in table:
            print(
                f"{r['row']:16} {r['sdk_ops']:12,.0f} {r['ts_ops']:10,.0f} {r['floor_ops']:12,.0f} "
                f"{r['x_ts']:7.1f} {r['x_floor']:8.2f}  {verdict(r['row'], r['x_ts'], r['x_floor'])}"
            )
        print(f"memory per session endpoint: sdk {mem_py:,.0f} B, ts {ts.get('memory_per_session_bytes')} B")
    print(f"(medians of {args.rounds} rounds of {args.seconds}s; Python {result['python']}, Node {result['node']})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
