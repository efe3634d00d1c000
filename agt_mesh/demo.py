"""A local two-agent demo: X3DH through a KNOCK frame, then ratcheted messages both ways.

Everything runs in one process; the "relay" is a list of JSON frames, so the transcript
shows exactly what a relay would see next to what each agent reads.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any, TextIO

from agt_mesh.core import frames as fr
from agt_mesh.core.encoding import compact_json
from agt_mesh.core.identity import Identity
from agt_mesh.core.ratchet import DoubleRatchet
from agt_mesh.core.x3dh import PreKeyStore, channel_ad, initiate, respond


def run_demo(out: TextIO, *, as_json: bool = False) -> int:
    rng = os.urandom
    alice, bob = Identity.generate(rng), Identity.generate(rng)
    bob_keys = PreKeyStore(bob)
    bob_keys.generate_signed_pre_key(rng)
    bob_keys.generate_one_time_pre_keys(5, rng)
    transcript: list[dict[str, Any]] = []

    def ts() -> str:
        return fr.iso_timestamp(time.time())

    # Alice fetches Bob's bundle (one OTK) and KNOCKs with the X3DH establishment.
    bundle = bob_keys.public_bundle(bob_keys.one_time_pre_keys[0].key_id)
    init = initiate(alice, bundle, rng)
    ad = channel_ad(alice.did, bob.did, alice.x25519_public, bob.x25519_public)
    a = DoubleRatchet.init_sender(init.shared_secret, bundle.signed_pre_key, ad, rng)
    knock = fr.knock_frame(alice.did, bob.did, str(uuid.uuid4()), ts(), init.establishment)
    transcript.append({"relay_saw": knock, "note": "alice -> bob KNOCK (X3DH establishment inside)"})

    parsed = fr.parse_frame(json.loads(fr.encode_frame(knock)))
    assert isinstance(parsed, fr.KnockFrame) and parsed.establishment is not None
    cand = respond(bob_keys, parsed.establishment)[0]
    assert bob_keys.signed_pre_key is not None
    b = DoubleRatchet.init_receiver(
        cand.shared_secret, bob_keys.signed_pre_key.private, bob_keys.signed_pre_key.public, ad
    )

    def send(sender: DoubleRatchet, frm: Identity, to: Identity, payload: Any) -> dict[str, Any]:
        header, blob = sender.encrypt(compact_json(payload).encode(), rng)
        return fr.message_frame(frm.did, to.did, str(uuid.uuid4()), ts(), header, blob)

    def recv(receiver: DoubleRatchet, frame: dict[str, Any]) -> Any:
        msg = fr.parse_frame(json.loads(fr.encode_frame(frame)))
        assert isinstance(msg, fr.MessageFrame) and msg.header is not None
        return json.loads(receiver.decrypt(msg.header, msg.ciphertext, rng))

    conversation = [
        (a, b, alice, bob, {"text": "hello bob", "n": 1}),
        (b, a, bob, alice, {"text": "hello alice", "n": 2}),
        (a, b, alice, bob, {"text": "ping", "n": 3}),
        (b, a, bob, alice, {"text": "pong ✓", "n": 4}),
    ]
    for snd, rcv, frm, to, payload in conversation:
        frame = send(snd, frm, to, payload)
        got = recv(rcv, frame)
        assert got == payload
        transcript.append({"relay_saw": frame, "reader": "bob" if to is bob else "alice", "read": got})

    # A duplicate delivery is refused without harming the session.
    dup = transcript[-1]["relay_saw"]
    try:
        recv(a, dup)
        dup_result = "accepted (unexpected)"
    except Exception as exc:  # DuplicateMessageError
        dup_result = f"refused: {type(exc).__name__}"
    frame = send(b, bob, alice, {"text": "still working after the duplicate", "n": 5})
    transcript.append({"relay_saw": frame, "reader": "alice", "read": recv(a, frame)})

    if as_json:
        out.write(
            json.dumps(
                {
                    "alice": alice.did,
                    "bob": bob.did,
                    "transcript": transcript,
                    "duplicate": dup_result,
                },
                ensure_ascii=False,
            )
            + "\n"
        )
        return 0
    out.write(f"alice = {alice.did}\nbob   = {bob.did}\n\n")
    for entry in transcript:
        frame = entry["relay_saw"]
        shown = compact_json(frame)
        out.write(f"relay saw : {shown[:150]}{'...' if len(shown) > 150 else ''}\n")
        if "read" in entry:
            out.write(f"{entry['reader']:>5} read: {compact_json(entry['read'])}\n\n")
        else:
            out.write(f"           ({entry['note']})\n\n")
    out.write(f"duplicate delivery of the last frame: {dup_result}\n")
    out.write("every message decrypted by its reader; the relay saw only ciphertext.\n")
    return 0
