"""Python side of the crypto benchmark: this SDK's operations and their primitive floor.

Each row times the same work as the matching row of ``ts_bench.js``:

* ``x3dh``           initiate (bundle verify + ephemeral key + 4 DH + HKDF) + respond (4 DH + HKDF)
* ``oneway_<size>``  one message A->B: encrypt + decrypt, no DH step
* ``pingpong_<size>`` alternating direction: encrypt + decrypt with a DH ratchet step

The **floor** of a row is the straight-line cost of the primitives one operation needs,
called directly from this process with no protocol logic around them:

* one-way:   sender KDF_CK + nonce + AEAD seal; receiver KDF_CK + AEAD open
* ping-pong: the one-way work + DH step (keygen + 2 DH + 2 KDF_RK)
* X3DH:      Ed25519 verify + keygen + 8 DH + 2 HKDF

Memory per session endpoint is measured with ``tracemalloc`` over 1,000 receiver-side
ratchets that have each decrypted one message (so both chains exist, no skipped keys).
"""

from __future__ import annotations

import gc
import hashlib
import os
import time
import tracemalloc
from collections.abc import Callable

from agt_mesh.core.identity import Identity
from agt_mesh.core.primitives import (
    aead_decrypt,
    aead_encrypt,
    ed25519_verify,
    hkdf_sha256,
    kdf_chain,
    x25519,
    x25519_public,
)
from agt_mesh.core.ratchet import RATCHET_INFO, DoubleRatchet
from agt_mesh.core.x3dh import X3DH_INFO, PreKeyStore, channel_ad, initiate, respond

SIZES = (64, 1024, 65536)
ROWS = ("x3dh", *(f"oneway_{s}" for s in SIZES), *(f"pingpong_{s}" for s in SIZES))
_rng = os.urandom


def _ops_per_second(op: Callable[[], object], seconds: float, warmup: float) -> float:
    """Run ``op`` repeatedly for about ``seconds``; return operations per second."""
    end = time.perf_counter() + warmup
    while time.perf_counter() < end:
        op()
    batch = 1
    start = time.perf_counter()
    while time.perf_counter() - start < seconds / 20:
        op()
        batch += 1
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    now = start
    while now < deadline:
        for _ in range(batch):
            op()
        count += batch
        now = time.perf_counter()
    return count / (now - start)


def _party(name: str) -> Identity:
    return Identity(hashlib.sha256(f"bench/{name}".encode()).digest())


def _pair() -> tuple[DoubleRatchet, DoubleRatchet]:
    alice, bob = _party("alice"), _party("bob")
    keys = PreKeyStore(bob)
    spk = keys.generate_signed_pre_key(_rng)
    init = initiate(alice, keys.public_bundle(), _rng)
    sk = respond(keys, init.establishment)[0].shared_secret
    ad = channel_ad(alice.did, bob.did, alice.x25519_public, bob.x25519_public)
    a = DoubleRatchet.init_sender(init.shared_secret, spk.public, ad, _rng)
    b = DoubleRatchet.init_receiver(sk, spk.private, spk.public, ad)
    h, c = a.encrypt(b"warm-up", _rng)
    b.decrypt(h, c, _rng)
    return a, b


# -- SDK operations ---------------------------------------------------------------------


def sdk_op(row: str) -> Callable[[], object]:
    if row == "x3dh":
        alice, bob = _party("alice"), _party("bob")
        keys = PreKeyStore(bob)
        keys.generate_signed_pre_key(_rng)
        pool: list[int] = []

        def x3dh_op() -> object:
            if not pool:  # refill outside the steady state (amortised, like TS's batches)
                pool.extend(o.key_id for o in keys.generate_one_time_pre_keys(512, _rng))
            bundle = keys.public_bundle(pool.pop())
            init = initiate(alice, bundle, _rng)
            return respond(keys, init.establishment)

        return x3dh_op
    kind, size_text = row.split("_")
    pt = os.urandom(int(size_text))
    a, b = _pair()
    if kind == "oneway":

        def oneway_op() -> object:
            h, c = a.encrypt(pt, _rng)
            return b.decrypt(h, c, _rng)

        return oneway_op
    turn = [a, b]

    def pingpong_op() -> object:
        snd, rcv = turn
        h, c = snd.encrypt(pt, _rng)
        out = rcv.decrypt(h, c, _rng)
        turn.reverse()
        return out

    return pingpong_op


# -- primitive floor --------------------------------------------------------------------


def floor_op(row: str) -> Callable[[], object]:
    ck_a = ck_b = os.urandom(32)
    ad = os.urandom(147)
    header = os.urandom(40)
    if row == "x3dh":
        bob = _party("bob")
        spk_priv = os.urandom(32)
        spk_pub = x25519_public(spk_priv)
        sig = bob.sign(spk_pub)
        ed = bob.ed25519_public
        ik_a, ik_b = os.urandom(32), os.urandom(32)
        pub = x25519_public(os.urandom(32))
        salt = b"\x00" * 32

        def x3dh_floor() -> object:
            ed25519_verify(ed, sig, spk_pub)
            ek = x25519_public(_rng(32))
            dh = x25519(ik_a, pub) + x25519(ik_a, pub) + x25519(ik_a, pub) + x25519(ik_a, pub)
            hkdf_sha256(salt, dh, X3DH_INFO, 32)
            dh = x25519(ik_b, ek) + x25519(ik_b, pub) + x25519(ik_b, pub) + x25519(ik_b, pub)
            return hkdf_sha256(salt, dh, X3DH_INFO, 32)

        return x3dh_floor
    kind, size_text = row.split("_")
    pt = os.urandom(int(size_text))
    aad = ad + header
    priv = os.urandom(32)
    pub = x25519_public(os.urandom(32))
    rk = os.urandom(32)

    def message_floor() -> object:
        mk, _ = kdf_chain(ck_a)
        nonce = _rng(12)
        ct = aead_encrypt(mk, nonce, pt, aad)
        mk2, _ = kdf_chain(ck_b)
        return aead_decrypt(mk2, nonce, ct, aad)

    if kind == "oneway":
        return message_floor

    def pingpong_floor() -> object:
        out = hkdf_sha256(rk, x25519(priv, pub), RATCHET_INFO, 64)
        new = _rng(32)
        x25519_public(new)
        hkdf_sha256(out[:32], x25519(new, pub), RATCHET_INFO, 64)
        return message_floor()

    return pingpong_floor


def memory_per_session(count: int = 1000) -> float:
    """Bytes per receiver-side session endpoint (tracemalloc)."""
    spk_priv = os.urandom(32)
    spk_pub = x25519_public(spk_priv)
    ad = os.urandom(147)
    prepared = []
    for _ in range(count):
        secret = os.urandom(32)
        sender = DoubleRatchet.init_sender(secret, spk_pub, ad, _rng)
        prepared.append((secret, *sender.encrypt(os.urandom(64), _rng)))
    keep: list[DoubleRatchet] = []
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for secret, h, c in prepared:
        # each endpoint owns its AD, as a real session does
        r = DoubleRatchet.init_receiver(secret, spk_priv, spk_pub, bytes(bytearray(ad)))
        r.decrypt(h, c, _rng)
        keep.append(r)
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    stats = after.compare_to(before, "filename")
    total = sum(s.size_diff for s in stats)
    # the list holding the sessions is not part of a session
    total -= keep.__sizeof__()
    return total / count


def run(rows: tuple[str, ...], rounds: int, seconds: float, warmup: float) -> dict[str, dict[str, list[float]]]:
    """``{"sdk": {row: [ops/s per round]}, "floor": {...}}``"""
    out: dict[str, dict[str, list[float]]] = {"sdk": {}, "floor": {}}
    for row in rows:
        ops = {"sdk": sdk_op(row), "floor": floor_op(row)}
        for which in ("sdk", "floor"):
            out[which][row] = []
        for _ in range(rounds):
            for which, op in ops.items():  # interleave so machine noise hits both alike
                out[which][row].append(_ops_per_second(op, seconds, warmup))
    return out
