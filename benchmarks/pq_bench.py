#!/usr/bin/env python3
"""Hybrid (X25519 + ML-KEM-768) versus classic session establishment, in the same run.

Rows (each one initiate + respond, as the ``x3dh`` row of ``crypto_bench.py``):

* ``classic``             X3DH with a one-time pre-key: bundle verify + EK + 4 DH + HKDF; 4 DH + HKDF
* ``hybrid``              the same plus a one-time ML-KEM-768 key: its signature check (which also
                          covers the signed pre-key, so the classic signature check is skipped),
                          public-key import, encapsulation, decapsulation
* ``classic_no_otk``      X3DH when the registry has run out of one-time pre-keys (3 DH a side)
* ``hybrid_last_resort``  the same exhausted-registry path, hybrid: both signature checks, the
                          last-resort KEM key, and the responder's replay-set insert
* ``prekey_classic`` / ``prekey_hybrid``  making and encoding one one-time pre-key for upload
  (hybrid: plus an ML-KEM key pair and its signature) — off the establishment path, amortised
  over the sessions that consume them

Pre-keys are made before each round's timing, never inside it, for every row alike.  Within a
round the rows take turns every 20 operations (rotating who goes first), so machine noise hits
all rows alike; process CPU time is the primary clock (wall time is kept alongside), and the
medians of the rounds are reported.  Also measured: the extra bytes a hybrid KNOCK and a
hybrid pre-key bundle carry.

Usage: ``python benchmarks/pq_bench.py [--rounds 7] [--ops 400] [--json OUT] [--markdown]``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agt_mesh.core import frames as fr
from agt_mesh.core import pq
from agt_mesh.core import registry_codec as rc
from agt_mesh.core.encoding import b64url_encode, compact_json
from agt_mesh.core.identity import Identity
from agt_mesh.core.x3dh import PreKeyStore, initiate, respond

ROWS = ("classic", "hybrid", "classic_no_otk", "hybrid_last_resort", "prekey_classic", "prekey_hybrid")
TARGET = 1.3  # hybrid establishment may cost at most this much classic, same run (issue #16)
_rng = os.urandom
T0 = 1_767_225_600


def _party(name: str) -> Identity:
    return Identity(hashlib.sha256(f"bench/{name}".encode()).digest())


ALICE, BOB = _party("alice"), _party("bob")


class Responder:
    """Bob's pre-key state, refilled outside the timed part."""

    def __init__(self) -> None:
        self.keys = PreKeyStore(BOB)
        self.spk = self.keys.generate_signed_pre_key(_rng)
        self.kem = pq.KemPreKeyStore(replay_limit=1 << 20)
        self.last_resort = self.kem.generate_last_resort(_rng, created_at=T0)
        self.advert = self.last_resort.signed(BOB)

    def classic_pool(self, n: int) -> list[int]:
        return [o.key_id for o in self.keys.generate_one_time_pre_keys(n, _rng)]

    def hybrid_pool(self, n: int) -> list[tuple[int, pq.SignedKemPreKey]]:
        otks = self.keys.generate_one_time_pre_keys(n, _rng)
        kems = self.kem.generate_one_time(n, _rng, created_at=T0)
        # what the initiator reads from the registry: signed when the bundle was uploaded
        return [(o.key_id, k.signed(BOB, self.spk.public)) for o, k in zip(otks, kems, strict=True)]


def _prepare(row: str, bob: Responder, n: int) -> Callable[[int], None]:
    """``run(k)`` performs the next ``k`` of ``n`` operations of ``row``; the pre-keys they
    consume are made now, outside any timing."""
    if row == "classic":
        pool = bob.classic_pool(n)

        def classic(k: int) -> None:
            for _ in range(k):
                init = initiate(ALICE, bob.keys.public_bundle(pool.pop()), _rng)
                respond(bob.keys, init.establishment)

        return classic
    if row == "hybrid":
        hpool = bob.hybrid_pool(n)

        def hybrid(k: int) -> None:
            for _ in range(k):
                otk_id, kem = hpool.pop()
                init = pq.initiate_hybrid(ALICE, bob.keys.public_bundle(otk_id), kem, _rng)
                pq.respond_hybrid(bob.keys, bob.kem, init.establishment, init.pq)

        return hybrid
    if row == "classic_no_otk":
        bundle = bob.keys.public_bundle()

        def classic_no_otk(k: int) -> None:
            for _ in range(k):
                init = initiate(ALICE, bundle, _rng)
                respond(bob.keys, init.establishment)

        return classic_no_otk
    if row == "hybrid_last_resort":
        bundle = bob.keys.public_bundle()

        def last_resort(k: int) -> None:
            for _ in range(k):
                init = pq.initiate_hybrid(ALICE, bundle, bob.advert, _rng)
                pq.respond_hybrid(bob.keys, bob.kem, init.establishment, init.pq)

        return last_resort
    store = PreKeyStore(BOB)
    if row == "prekey_classic":

        def prekey_classic(k: int) -> None:
            for otk in store.generate_one_time_pre_keys(k, _rng):
                {"key_id": otk.key_id, "public_key": b64url_encode(otk.public)}

        return prekey_classic
    if row == "prekey_hybrid":
        kem_store = pq.KemPreKeyStore()
        spk = bob.spk

        def prekey_hybrid(k: int) -> None:
            otks = store.generate_one_time_pre_keys(k, _rng)
            kems = kem_store.generate_one_time(k, _rng, created_at=T0)
            for otk, kem in zip(otks, kems, strict=True):
                {
                    "key_id": otk.key_id,
                    "public_key": b64url_encode(otk.public),
                    "pq": kem.signed(BOB, spk.public).to_json(),
                }

        return prekey_hybrid
    raise ValueError(row)


#: the row each row is compared with in the table
BASELINE = {"hybrid": "classic", "hybrid_last_resort": "classic_no_otk", "prekey_hybrid": "prekey_classic"}

#: rows that take turns with each other (pre-key generation churns memory, so it runs apart)
GROUPS = (ROWS[:4], ROWS[4:])

CHUNK = 20  # operations timed at a stretch before the next row takes its turn


def run(rounds: int, ops: int) -> dict[str, dict[str, list[float]]]:
    """Microseconds per operation (process CPU time and wall time), one value per round and row.

    Within a round the rows of a group take turns every :data:`CHUNK` operations, so a burst of load
    from other processes on this shared machine lands on all rows alike.  CPU time is the
    primary figure: it does not count time the process spent waiting for a core.
    """
    bob = Responder()
    out: dict[str, dict[str, list[float]]] = {"cpu": {row: [] for row in ROWS}, "wall": {row: [] for row in ROWS}}
    for r in range(rounds):
        ops = max(CHUNK, ops - ops % CHUNK)
        runners = {row: _prepare(row, bob, ops) for row in ROWS}
        cpu = dict.fromkeys(ROWS, 0.0)
        wall = dict.fromkeys(ROWS, 0.0)
        for group in GROUPS:
            for chunk in range(ops // CHUNK):
                shift = (r + chunk) % len(group)
                for row in group[shift:] + group[:shift]:
                    c0, w0 = time.process_time(), time.perf_counter()
                    runners[row](CHUNK)
                    cpu[row] += time.process_time() - c0
                    wall[row] += time.perf_counter() - w0
        for row in ROWS:
            out["cpu"][row].append(cpu[row] / ops * 1e6)
            out["wall"][row].append(wall[row] / ops * 1e6)
    return out


def sizes() -> dict[str, int]:
    """Extra bytes of the hybrid forms on the wire and in the registry."""
    bob = Responder()
    otk_id, kem = bob.hybrid_pool(1)[0]
    init = pq.initiate_hybrid(ALICE, bob.keys.public_bundle(otk_id), kem, _rng)
    ts = "2026-01-01T00:00:00.000Z"
    classic_knock = fr.knock_frame(ALICE.did, BOB.did, "00000000-0000-4000-8000-000000000000", ts, init.establishment)
    hybrid_knock = pq.knock_with_pq(classic_knock, init.pq)
    otks = bob.keys.generate_one_time_pre_keys(20, _rng)
    kems = bob.kem.generate_one_time(20, _rng, created_at=T0)
    classic_put = rc.prekey_upload_body(BOB, bob.spk, otks)
    hybrid_put = pq.prekey_upload_body(BOB, bob.spk, otks, kems)

    def fetched(body: dict[str, Any]) -> int:
        answer = {k: v for k, v in body.items() if k != "one_time_pre_keys"}
        answer["one_time_pre_key"] = body["one_time_pre_keys"][0]
        return len(compact_json(answer))

    metadata = pq.advert_metadata(BOB, bob.last_resort)
    return {
        "knock_classic": len(fr.encode_frame(classic_knock)),
        "knock_hybrid": len(fr.encode_frame(hybrid_knock)),
        "bundle_fetch_classic": fetched(classic_put),
        "bundle_fetch_hybrid": fetched(hybrid_put),
        "prekey_put_20_classic": len(compact_json(classic_put)),
        "prekey_put_20_hybrid": len(compact_json(hybrid_put)),
        "registration_metadata_entry": len(compact_json(metadata)) - 2,
        "private_kem_key_seed": pq.KEM_SEED_LEN,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--ops", type=int, default=400, help="operations per row per round")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    if args.rounds < 5:
        ap.error("use at least 5 rounds: only medians are meaningful")
    if not pq.pq_supported():
        print("ML-KEM-768 is not available in this cryptography build", file=sys.stderr)
        return 2
    timings = run(args.rounds, args.ops)
    results = timings["cpu"]
    med = {row: statistics.median(v) for row, v in results.items()}
    wall_med = {row: statistics.median(v) for row, v in timings["wall"].items()}
    ratios = [h / c for h, c in zip(results["hybrid"], results["classic"], strict=True)]
    ratio = med["hybrid"] / med["classic"]
    lr_ratio = med["hybrid_last_resort"] / med["classic_no_otk"]
    amortised = (med["hybrid"] + med["prekey_hybrid"]) / (med["classic"] + med["prekey_classic"])
    size = sizes()
    report = {
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
        "rounds": args.rounds,
        "ops_per_round": args.ops,
        "clock": "process CPU time (wall time alongside)",
        "us_per_op_cpu": results,
        "us_per_op_wall": timings["wall"],
        "median_us": med,
        "median_us_wall": wall_med,
        "hybrid_over_classic_wall": wall_med["hybrid"] / wall_med["classic"],
        "hybrid_over_classic": ratio,
        "hybrid_over_classic_per_round": ratios,
        "last_resort_over_classic_no_otk": lr_ratio,
        "with_amortised_prekey_generation": amortised,
        "target": TARGET,
        "bytes": size,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    label = {
        "classic": "classic X3DH initiate + respond (one-time pre-key, 4 DH)",
        "hybrid": "hybrid initiate + respond (one-time pre-key + one-time KEM key)",
        "classic_no_otk": "classic X3DH, registry out of one-time pre-keys (3 DH)",
        "hybrid_last_resort": "hybrid, registry out of one-time pre-keys (last-resort KEM key)",
        "prekey_classic": "one one-time pre-key made + encoded (classic)",
        "prekey_hybrid": "one one-time pre-key made + encoded (hybrid)",
    }
    if args.markdown:
        print("| operation | µs (median) | ops/s | × classic |")
        print("|---|---:|---:|---:|")
        for row in ROWS:
            base = BASELINE.get(row, row)
            print(f"| {label[row]} | {med[row]:.0f} | {1e6 / med[row]:,.0f} | {med[row] / med[base]:.2f}× |")
    else:
        for row in ROWS:
            print(f"{row:20s} {med[row]:8.1f} µs  (rounds: {', '.join(f'{v:.0f}' for v in results[row])})")
    verdict = "met" if ratio <= TARGET else "NOT met"
    print(
        f"\nhybrid / classic establishment: {ratio:.2f}x (rounds {min(ratios):.2f}-{max(ratios):.2f}x; "
        f"target <= {TARGET}x: {verdict}); last-resort path {lr_ratio:.2f}x; "
        f"with amortised pre-key generation {amortised:.2f}x; wall clock "
        f"{wall_med['hybrid'] / wall_med['classic']:.2f}x"
    )
    print(
        f"bytes: KNOCK {size['knock_classic']} -> {size['knock_hybrid']} "
        f"(+{size['knock_hybrid'] - size['knock_classic']}); "
        f"fetched bundle {size['bundle_fetch_classic']} -> {size['bundle_fetch_hybrid']} "
        f"(+{size['bundle_fetch_hybrid'] - size['bundle_fetch_classic']}); pre-key PUT of 20 "
        f"{size['prekey_put_20_classic']} -> {size['prekey_put_20_hybrid']}; registration metadata "
        f"+{size['registration_metadata_entry']} (once per registration)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
