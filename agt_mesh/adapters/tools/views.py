"""Names and what the model is shown: message views, agent views, the peer roster text.

A peer's DID is authenticated (the session); its display name is a claim.  The names the
tools show come from the registry (a DID looked up, or a name resolved to a DID) and only
then from what the peer's frames declare; a name a message declares for itself that differs
is shown apart as ``claimed_name``.  Peer-chosen text that ends up in a prompt or a log
line goes through :func:`peer_label`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import json
import re
import time
import unicodedata
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from agt_mesh.adapters import envelopes as envs
from agt_mesh.adapters.bounded import RecentKeys
from agt_mesh.adapters.tools.config import AdapterConfig
from agt_mesh.errors import MeshError, MeshToolError, PeerNotFoundError
from agt_mesh.shell.inbox import InboundMessage

if TYPE_CHECKING:
    from agt_mesh.shell.client import MeshClient

__all__ = ["MAX_LABEL_CHARS", "Views", "is_did", "is_visible", "peer_label"]

_DID_RE = re.compile(r"^did:[a-z0-9]+:[A-Za-z0-9._%:-]{1,200}$")

#: Longest peer-chosen label (a display name, a message type) quoted into a prompt.
MAX_LABEL_CHARS = 64
#: Message ids remembered as shown to the model (for the ``new`` flag of a view).
_SHOWN_MEMORY = 10_000
#: A DID the registry did not know is asked about again after this many seconds.
_UNKNOWN_NAME_RETRY = 60.0

_ROSTER_HEADER = (
    "Peer roster: (authoritative — address these agents by exactly these names when you send "
    "them messages or files; trust this list over discovery results; map role references such "
    "as 'the analyst' to the matching name)"
)


def is_did(value: object) -> bool:
    """Whether ``value`` has the shape of a DID (``did:<method>:<id>``)."""
    return isinstance(value, str) and _DID_RE.fullmatch(value) is not None


def peer_label(text: object) -> str:
    """A peer-chosen name made safe to quote into a prompt or a log line: printable, one
    line, at most ``MAX_LABEL_CHARS`` characters (``"?"`` if nothing is left)."""
    raw = text if isinstance(text, str) else ""
    clean = "".join(ch for ch in raw if unicodedata.category(ch)[0] not in ("C", "Z") or ch == " ").strip()
    return (clean[:MAX_LABEL_CHARS] + "…") if len(clean) > MAX_LABEL_CHARS else (clean or "?")


def is_visible(msg: InboundMessage) -> bool:
    """Whether the tools show this message (internal envelopes are hidden)."""
    env = envs.parse_envelope(msg.payload)
    if env is None:
        return True
    kind = envs.unwrap_file_transfer(env)["type"]
    return kind not in envs.INTERNAL_TYPES and kind != envs.FILE_TRANSFER


def _iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _json_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


class Views:
    """The display names the tools know and the views built from them, for one client."""

    def __init__(self, client: MeshClient, config: AdapterConfig) -> None:
        self.client = client
        self.config = config
        #: DID → display name: registry-verified, resolved by us, or first declared by the peer
        self.names: dict[str, str] = {}
        self._unknown: dict[str, float] = {}
        self._shown = RecentKeys(_SHOWN_MEMORY)

    # -- names -------------------------------------------------------------------------------

    def name_of(self, did: str) -> str | None:
        """The display name of ``did``, if known."""
        return self.names.get(did)

    def sender_name(self, msg: InboundMessage) -> str | None:
        """The name shown for a message's sender (ours first, then the one it came with)."""
        return self.names.get(msg.sender) or msg.sender_name

    def note_sender(self, msg: InboundMessage) -> None:
        """Remember the name a message came with, unless the sender already has one."""
        if msg.sender_name:
            self.names.setdefault(msg.sender, msg.sender_name)

    async def learn_names(self, dids: Iterable[str], timeout: float = 3.0) -> None:
        """Look up unknown senders' display names in the registry (cached, failures too)."""
        now = time.monotonic()
        todo = [
            d
            for d in dict.fromkeys(dids)
            if d not in self.names and now - self._unknown.get(d, -1e9) > _UNKNOWN_NAME_RETRY and d != self.client.did
        ]
        if not todo:
            return

        async def one(did: str) -> None:
            try:
                record = await self.client.registry.get_agent(did)
            except MeshError:
                record = None
            if record is not None and record.display_name:
                self.names[did] = record.display_name
            else:
                self._unknown[did] = time.monotonic()

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(one(d) for d in todo)), timeout)

    async def lookup(self, name: str) -> str | None:
        """The DID registered under the exact display name ``name`` (None if there is none)."""
        try:
            did = await self.client.resolve(name)
        except PeerNotFoundError:
            return None
        self.names[did] = name
        return did

    async def resolve(self, to: str) -> tuple[str, str | None]:
        """(DID, display name) of a recipient given by name or DID.

        Raises:
            MeshToolError: ``peer_not_found``.
        """
        to = to.strip()
        if to.startswith("did:"):
            if to not in self.names:
                await self.learn_names([to])
            return to, self.names.get(to)
        did = await self.lookup(to)
        if did is None:
            raise MeshToolError(
                "peer_not_found",
                f"no agent named {to!r} is registered (names are exact and case-sensitive; "
                "use mesh_discover to look for it)",
            )
        return did, to

    # -- views -------------------------------------------------------------------------------

    def cut(self, text: str) -> str:
        limit = self.config.max_content_chars
        return text if len(text) <= limit else text[:limit] + f"… [{len(text) - limit} more characters]"

    def view(self, msg: InboundMessage) -> dict[str, Any]:
        """What the model sees of a message: sender, type, text — never file contents."""
        out: dict[str, Any] = {
            "id": msg.message_id,
            "from": msg.sender,
            "from_name": self.sender_name(msg),
            "received_at": _iso(msg.received_at),
            "new": msg.message_id not in self._shown,
        }
        env = envs.parse_envelope(msg.payload)
        if env is None:
            out["type"] = "message"
            out["content"] = self.cut(_json_text(msg.payload))
        else:
            out.update(self._envelope_view(env))
            declared = env.get("from_agent")
            if isinstance(declared, str) and declared and declared != out["from_name"]:
                out["claimed_name"] = declared
        if msg.plaintext:
            out["plaintext"] = True
        return out

    def _envelope_view(self, env: dict[str, Any]) -> dict[str, Any]:
        kind = env["type"]
        out: dict[str, Any] = {"type": kind}
        if kind in (envs.FILE_RECEIVED, envs.FILE_FAILED):
            out["file"] = {k: v for k, v in env.items() if k not in ("type", "from_agent")}
            if kind == envs.FILE_RECEIVED:
                out["content"] = (
                    f"received file {env.get('file_name')!r} ({env.get('size_bytes')} bytes, sha256 "
                    f"{str(env.get('sha256'))[:16]}…) saved as {env.get('saved_as')!r} in the incoming "
                    "directory"
                )
            else:
                out["content"] = f"file transfer {env.get('file_name')!r} failed: {env.get('error')}"
            return out
        content = env.get("content")
        if content is None:
            rest = {k: v for k, v in env.items() if k not in ("type", "timestamp")}
            out["content"] = self.cut(json.dumps(rest, ensure_ascii=False))
        else:
            out["content"] = self.cut(_json_text(content))
        cid = envs.correlation_id(env)
        if cid:
            out["request_id"] = cid
        if kind == envs.TASK_RESPONSE:
            out["ok"] = env.get("ok") is not False
        return out

    def mark_shown(self, msgs: Iterable[InboundMessage]) -> None:
        for m in msgs:
            self._shown.add(m.message_id)

    def agent_view(self, did: str, name: str | None, **extra: Any) -> dict[str, Any]:
        """An agent as the model sees it: DID, name, its role in the roster, whether it is us."""
        role = self.config.roster.get(name or "") if name else None
        out: dict[str, Any] = {"did": did, "name": name}
        if role:
            out["role"] = role
        if did == self.client.did:
            out["self"] = True
        out.update(extra)
        return out

    # -- the roster --------------------------------------------------------------------------

    def roster_entries(self) -> list[dict[str, str]]:
        """The siblings in the roster (not us), as ``{"name", "role"?}``."""
        me = self.client.display_name
        return [{"name": n, **({"role": r} if r else {})} for n, r in self.config.roster.items() if n != me]

    def with_roster(self, content: str, recipient: str | None) -> str:
        """``content`` with the authoritative ``Peer roster:`` block prepended, when two or more
        siblings are known (the recipient is not listed to itself)."""
        me = self.client.display_name
        roster = {n: r for n, r in self.config.roster.items() if n != me}
        if len(roster) < 2 or recipient == "parent" or content.lstrip().lower().startswith("peer roster:"):
            return content
        lines = [f"  - {n} — {r}" if r else f"  - {n}" for n, r in sorted(roster.items()) if n != recipient]
        if not lines:
            return content
        return "\n".join([_ROSTER_HEADER, *lines, "---", content])
