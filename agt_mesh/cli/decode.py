"""``agt-mesh decode FRAME|-``: parse and explain relay frames.

With ``--identity`` the frame is also checked against our identity and stored state: a
message to us is decrypted on *copies* of the session's ratchets (the stored state never
changes, and nothing is written), a KNOCK is matched with our pre-keys and session, a
KNOCK reply with the KNOCK it answers.

JSON output: one object per frame (one line each) with the keys ``type``, ``valid``,
``error``, ``size``, ``from``, ``to``, ``id``, ``ts``, ``summary`` and ``notes`` (a list of
strings), plus per type: ``header`` ``{"dh", "pn", "n"}``, ``ciphertext_bytes``,
``plaintext_bytes``, ``plaintext_flag`` (messages); ``establishment`` ``{"ik", "ek",
"otk"}`` and ``intent`` (knocks); ``knock_id``, ``reason`` (knock replies); ``pop``
``{"did_matches_key", "signature_valid", "skew_seconds"}`` (connect); ``detail`` (error);
``entries`` (pending_messages: the list of decoded entries); and with ``--identity``
``decrypted`` ``{"ok", "ratchet", "payload", "error"}`` for messages to us.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agt_mesh.cli.common import LocalState, ago, diag, lines, load_identity, parse_time, payload_text, short
from agt_mesh.cli.errors import EXIT_OK, EXIT_USAGE, CliError

if TYPE_CHECKING:
    from agt_mesh.core.identity import Identity
    from agt_mesh.core.x3dh import PreKeyStore

#: the POP window of the AGT relays and registries
POP_WINDOW = 300.0
NONCE, TAG = 12, 16


@dataclass
class Ours:
    """What ``--identity`` adds: our identity, sessions and pre-keys (read-only copies)."""

    identity: Identity
    local: LocalState
    prekeys: PreKeyStore


@dataclass
class Explained:
    data: dict[str, Any]


def _read_frames(arg: str) -> list[str]:
    if arg != "-":
        return [arg]
    text = sys.stdin.read()
    stripped = text.strip()
    if not stripped:
        raise CliError("no frame on stdin")
    try:
        json.loads(stripped)
        return [stripped]
    except ValueError:
        return [line for line in text.splitlines() if line.strip()]


def _load_ours(args: argparse.Namespace) -> Ours:
    from agt_mesh.cli.common import stored_prekeys

    ident = load_identity(args)
    prekeys = stored_prekeys(args, ident)
    return Ours(ident, LocalState.load(args, ident.did), prekeys)


def explain_text(text: str, ours: Ours | None) -> Explained:
    from agt_mesh.core import frames as fr
    from agt_mesh.errors import MeshProtocolError

    size = len(text.encode())
    base: dict[str, Any] = {
        "type": None,
        "valid": False,
        "error": None,
        "size": size,
        "from": None,
        "to": None,
        "id": None,
        "ts": None,
        "summary": "",
        "notes": [],
    }
    try:
        obj = fr.decode_frame(text)
    except MeshProtocolError as exc:
        base["error"] = str(exc)
        base["summary"] = f"not a frame: {exc}"
        return Explained(base)
    return explain_obj(obj, ours, size)


def explain_obj(obj: Any, ours: Ours | None, size: int | None = None) -> Explained:
    from agt_mesh.core import frames as fr
    from agt_mesh.errors import MeshProtocolError

    if size is None:
        size = len(json.dumps(obj, separators=(",", ":")).encode())
    data: dict[str, Any] = {
        "type": obj.get("type") if isinstance(obj, dict) and isinstance(obj.get("type"), str) else None,
        "valid": False,
        "error": None,
        "size": size,
        "from": obj.get("from") if isinstance(obj, dict) else None,
        "to": obj.get("to") if isinstance(obj, dict) else None,
        "id": obj.get("id") if isinstance(obj, dict) else None,
        "ts": obj.get("ts") if isinstance(obj, dict) else None,
        "summary": "",
        "notes": [],
    }
    out = Explained(data)
    if isinstance(obj, dict) and obj.get("v") not in (None, 1):
        data["notes"].append(f"frame version {obj.get('v')!r}: this SDK speaks version 1")
    try:
        frame = fr.parse_frame(obj)
    except MeshProtocolError as exc:
        data["error"] = str(exc)
        data["summary"] = f"malformed {data['type'] or 'frame'}: {exc}"
        data["notes"].append("the receiver drops it (and acknowledges it, so the relay stops redelivering)")
        return out
    data["valid"] = True
    if isinstance(frame, fr.MessageFrame):
        _message(frame, data, ours)
    elif isinstance(frame, fr.KnockFrame):
        _knock(frame, data, ours)
    elif isinstance(frame, fr.KnockReplyFrame):
        _knock_reply(frame, data, ours)
    elif isinstance(frame, fr.ConnectFrame):
        _connect(frame, data)
    elif isinstance(frame, fr.PendingMessagesFrame):
        entries = [explain_obj(e, ours) for e in frame.messages]
        data["entries"] = [e.data for e in entries]
        data["summary"] = f"pending_messages: {len(entries)} stored frame(s) delivered after connect"
    elif isinstance(frame, fr.AckFrame):
        data["summary"] = f"ack of frame {frame.id} (the relay may forget it now)"
    elif isinstance(frame, fr.HeartbeatFrame):
        data["summary"] = f"heartbeat from {frame.from_did} (AGT relays stop live delivery after 90 s without one)"
    elif isinstance(frame, fr.DisconnectFrame):
        data["summary"] = f"disconnect from {frame.from_did}"
    elif isinstance(frame, fr.FetchPendingFrame):
        data["summary"] = f"fetch_pending from {frame.from_did} (asks for stored frames)"
    elif isinstance(frame, fr.ErrorFrame):
        data["detail"] = frame.detail
        data["summary"] = f"error from the relay: {frame.detail}"
        if "proof" in frame.detail.lower():
            data["notes"].append("a POP refusal: check the system clock (±5 min) and the identity file")
    else:
        data["summary"] = f"unknown frame type {frame.type!r} (ignored by this SDK)"
    return out


def _message(f: Any, data: dict[str, Any], ours: Ours | None) -> None:
    from agt_mesh.core.encoding import b64_encode

    ct = len(f.ciphertext)
    data["ciphertext_bytes"] = ct
    data["plaintext_flag"] = f.plaintext_flag
    if f.header is None:
        data["header"] = None
        data["plaintext_bytes"] = ct
        data["summary"] = f"message {short(f.from_did)} → {short(f.to_did)} WITHOUT encryption"
        try:
            payload = json.loads(f.ciphertext.decode("latin-1"))
            data["notes"].append(f"plaintext payload: {payload_text(payload)}")
        except ValueError:
            data["notes"].append("plaintext payload is not JSON")
        data["notes"].append(
            "receivers accept unencrypted frames only from allow-listed plaintext peers they never "
            "had an encrypted session with"
        )
        return
    dh, pn, n = f.header[:32], int.from_bytes(f.header[32:36], "big"), int.from_bytes(f.header[36:40], "big")
    data["header"] = {"dh": b64_encode(dh), "pn": pn, "n": n}
    data["plaintext_bytes"] = max(0, ct - NONCE - TAG)
    data["summary"] = (
        f"encrypted message {short(f.from_did)} → {short(f.to_did)}: message #{n} of the sender's "
        f"current chain (previous chain had {pn})"
    )
    if ct < NONCE + TAG:
        data["notes"].append(f"ciphertext is {ct} bytes, shorter than nonce + tag ({NONCE + TAG}): malformed")
    if ours is None:
        return
    me = ours.identity.did
    if f.from_did == me:
        data["notes"].append(
            "sent by us: a sent message cannot be decrypted afterwards (the sending chain has moved on)"
        )
        return
    if f.to_did != me:
        data["notes"].append(f"addressed to {f.to_did}, not to us ({me})")
        return
    data["decrypted"] = _decrypt(f, ours)


def _decrypt(f: Any, ours: Ours) -> dict[str, Any]:
    from agt_mesh.errors import DecryptError, DuplicateMessageError

    session = ours.local.sessions.get(f.from_did)
    if session is None:
        return {
            "ok": False,
            "ratchet": None,
            "payload": None,
            "error": "no session with the sender: its KNOCK never arrived or was rejected, or the session was reset",
        }
    tries = []
    if session.primary is not None:
        tries.append(("primary", session.primary))
    tries += [(f"candidate ({c.profile.value})", c.ratchet) for c in session.candidates]
    if session.previous is not None:
        tries.append(("previous", session.previous))
    errors = []
    for label, ratchet in tries:
        try:
            # a copy: decrypting advances a ratchet, and the stored one must not move
            plaintext = ratchet.copy().decrypt(f.header, f.ciphertext, os.urandom)
        except DuplicateMessageError as exc:
            return {
                "ok": False,
                "ratchet": label,
                "payload": None,
                "error": f"already received (its message key was used): {exc}",
            }
        except DecryptError as exc:
            errors.append(f"{label}: {exc.kind}: {exc}")
            continue
        try:
            payload: Any = json.loads(plaintext)
        except ValueError:
            return {"ok": True, "ratchet": label, "payload": None, "error": "decrypted, but the payload is not JSON"}
        return {"ok": True, "ratchet": label, "payload": payload, "error": None}
    if not tries:
        return {"ok": False, "ratchet": None, "payload": None, "error": "the session has no ratchet yet"}
    return {"ok": False, "ratchet": None, "payload": None, "error": "; ".join(errors)}


def _knock(f: Any, data: dict[str, Any], ours: Ours | None) -> None:
    from agt_mesh.core.encoding import b64_encode

    est = f.establishment
    data["intent"] = f.intent
    data["establishment"] = (
        {
            "ik": b64_encode(est.initiator_identity_key),
            "ek": b64_encode(est.ephemeral_public_key),
            "otk": est.one_time_pre_key_id,
        }
        if est is not None
        else None
    )
    data["summary"] = f"KNOCK {short(f.from_did)} → {short(f.to_did)}: asks to open a session"
    if est is None:
        if f.establishment_error:
            data["notes"].append(f"establishment is malformed ({f.establishment_error}): the receiver cannot use it")
        else:
            data["notes"].append("no establishment: a session request without X3DH (plaintext-era peers)")
        return
    data["summary"] += (
        " (X3DH with "
        + (
            f"one-time pre-key #{est.one_time_pre_key_id}"
            if est.one_time_pre_key_id is not None
            else "no one-time pre-key: the registry had none left"
        )
        + ")"
    )
    from agt_mesh.core.identity import is_mesh_did
    from agt_mesh.core.trust import dids_of_x25519, key_binds

    if is_mesh_did(f.from_did):
        if key_binds(f.from_did, est.initiator_identity_key):
            data["notes"].append("initiator identity key belongs to the sender (its DID is the hash of that key)")
        else:
            owners = " or ".join(dids_of_x25519(est.initiator_identity_key)) or "no valid key"
            data["notes"].append(
                f"initiator identity key is NOT the sender's (it belongs to {owners}): a forged `from`, "
                "refused before the policy is asked"
            )
    if ours is None or f.to_did != ours.identity.did:
        if ours is not None:
            data["notes"].append(f"addressed to {f.to_did}, not to us")
        return
    otk = est.one_time_pre_key_id
    if otk is not None:
        if ours.prekeys.has_one_time_pre_key(otk):
            data["notes"].append(f"we still hold one-time pre-key #{otk}: this KNOCK was not processed yet")
        else:
            data["notes"].append(f"one-time pre-key #{otk} is gone: consumed by this KNOCK (or never ours)")
    pin = ours.local.pin(f.from_did)
    if pin is not None and not pin.same_key(est.initiator_identity_key):
        data["notes"].append(
            "initiator identity key DIFFERS from the key pinned for the sender: refused (identity_changed) "
            f"until trusted — see `agt-mesh peer fingerprint {f.from_did}`"
        )
    session = ours.local.sessions.get(f.from_did)
    if session is None:
        data["notes"].append("we have no session with the sender")
        return
    ek = est.ephemeral_public_key
    if ek == session.establishment_ek:
        data["notes"].append("this KNOCK made our current session with the sender")
    elif any(c.knock_ek == ek for c in session.candidates):
        data["notes"].append("this KNOCK is pending: its first message has not arrived yet")
    else:
        data["notes"].append("not the KNOCK of our current session (an older or newer one)")
    pinned = session.peer_identity_key()
    if pinned is not None:
        same = pinned == est.initiator_identity_key
        data["notes"].append(
            "initiator identity key matches the one pinned in our session"
            if same
            else "initiator identity key DIFFERS from the one pinned in our session: refused as a re-key"
        )


def _knock_reply(f: Any, data: dict[str, Any], ours: Ours | None) -> None:
    data["knock_id"] = f.knock_id
    data["reason"] = f.reason
    verb = "accepts" if f.accepted else f"rejects ({f.reason or 'no reason'})"
    data["summary"] = f"{short(f.from_did)} {verb} KNOCK {f.knock_id} from {short(f.to_did)}"
    if ours is None or f.to_did != ours.identity.did:
        return
    session = ours.local.sessions.get(f.from_did)
    if session is None:
        data["notes"].append("we have no session with the sender (reset, or the KNOCK was never ours)")
    elif session.knock_id == f.knock_id:
        data["notes"].append("answers the KNOCK of our current session")
    else:
        data["notes"].append(f"stale: our current session's KNOCK is {session.knock_id} (ignored)")


def _connect(f: Any, data: dict[str, Any]) -> None:
    from agt_mesh.core.identity import did_from_ed25519
    from agt_mesh.core.primitives import ed25519_verify

    data["from"] = f.from_did
    data["summary"] = f"connect from {f.from_did}"
    pop: dict[str, Any] = {"did_matches_key": None, "signature_valid": None, "skew_seconds": None}
    data["pop"] = pop
    if f.token is not None:
        data["notes"].append(f"carries a token ({len(f.token)} characters, not shown)")
    if f.public_key is None:
        data["notes"].append("no proof of possession: AGT 5.x relays close with 4005; 3.x relays accept it")
        return
    if len(f.public_key) == 32:
        pop["did_matches_key"] = did_from_ed25519(f.public_key) == f.from_did
        if f.signature is not None and f.timestamp is not None:
            pop["signature_valid"] = ed25519_verify(f.public_key, f.signature, f.timestamp.encode())
    stamp = parse_time(f.timestamp)
    if stamp is not None:
        pop["skew_seconds"] = round(time.time() - stamp, 3)
    if pop["did_matches_key"] is False:
        data["notes"].append("the DID is not derived from public_key: the relay refuses it (4005)")
    if pop["signature_valid"] is False:
        data["notes"].append("the signature over the timestamp does not verify: the relay refuses it (4005)")
    if stamp is not None and abs(time.time() - stamp) > POP_WINDOW:
        data["notes"].append(
            f"timestamp is {ago(stamp)}: outside the ±5 min POP window now (fine if this is an old capture)"
        )


def _rows(d: dict[str, Any]) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = [("frame", f"{d['type'] or '?'} — {d['summary']}")]
    for key in ("from", "to", "id"):
        if d.get(key):
            rows.append((key, d[key]))
    if d.get("ts"):
        rows.append(("ts", f"{d['ts']} ({ago(parse_time(d['ts']))})"))
    h = d.get("header")
    if h:
        rows.append(("header", f"dh={h['dh'][:10]}… pn={h['pn']} n={h['n']}"))
    if "ciphertext_bytes" in d:
        ct = d["ciphertext_bytes"]
        rows.append(
            (
                "ciphertext",
                f"{ct} bytes"
                + (
                    f" = {NONCE} nonce + {d['plaintext_bytes']} plaintext + {TAG} tag"
                    if d.get("header") and ct >= NONCE + TAG
                    else ""
                ),
            )
        )
    est = d.get("establishment")
    if est:
        rows.append(("establishment", f"ik={est['ik'][:10]}… ek={est['ek'][:10]}… otk={est['otk']}"))
    if d.get("knock_id"):
        rows.append(("answers knock", d["knock_id"]))
    pop = d.get("pop")
    if pop:
        rows.append(
            (
                "proof",
                f"did matches key: {pop['did_matches_key']}; signature valid: {pop['signature_valid']}; "
                f"timestamp skew: {pop['skew_seconds']} s",
            )
        )
    rows.append(("size", f"{d['size']} bytes"))
    if d.get("error"):
        rows.append(("error", d["error"]))
    dec = d.get("decrypted")
    if dec:
        if dec["ok"]:
            rows.append(
                ("decrypted", f"{payload_text(dec['payload'])} ({dec['ratchet']} ratchet; stored state unchanged)")
            )
        else:
            rows.append(("not decrypted", dec["error"]))
    for note in d["notes"]:
        rows.append(("note", note))
    return rows


def _text(d: dict[str, Any], indent: str = "") -> str:
    body = "\n".join(indent + line for line in lines(_rows(d)).splitlines())
    for i, entry in enumerate(d.get("entries") or []):
        body += f"\n{indent}entry {i}:\n" + _text(entry, indent + "  ")
    return body


def decode(args: argparse.Namespace) -> int:
    frames = _read_frames(args.frame)
    ours = _load_ours(args) if args.identity else None
    if ours is not None and not args.json:
        diag(f"explaining as {ours.identity.did} (read-only: stored state is not changed)")
    bad = 0
    texts = []
    for text in frames:
        d = explain_text(text, ours).data
        bad += not d["valid"]
        if args.json:
            print(json.dumps(d, ensure_ascii=False), flush=True)
        else:
            texts.append(_text(d))
    if not args.json:
        print("\n\n".join(texts), flush=True)
    return EXIT_USAGE if bad else EXIT_OK
