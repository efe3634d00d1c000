"""The post-quantum pre-key carrier through the real registries (issue #16, phase A).

For each registry — the real AGT core 5.0.0 and agentmesh-platform 3.7.0, and the embedded
development registry — an agent registers with its signed last-resort ML-KEM key in
``metadata`` and uploads 20 one-time pre-keys each carrying a signed one-time ML-KEM key
(about 38 KB of JSON).  Checked: both come back byte for byte; each one-time pair is handed
out exactly once, in upload order, then ``null``; a hybrid session sets up from what was
fetched on both paths (one-time and last-resort); and the npm 4.0.0 TypeScript client's
registry parser and KNOCK parser accept the extended objects as if they were classic; and the
relays forward a hybrid KNOCK (about 1.5 KB more than a classic one) unchanged.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers import Drbg
from servers import ServerPair
from websockets.asyncio.client import connect

from agt_mesh.core import frames as fr
from agt_mesh.core import pq
from agt_mesh.core import registry_codec as rc
from agt_mesh.core.encoding import b64url_decode
from agt_mesh.core.identity import Identity
from agt_mesh.core.x3dh import PreKeyStore
from agt_mesh.shell.registry import RegistryClient
from agt_mesh.shell.relay import relay_ws_url

OTKS = 20  # what MeshClient uploads by default
T0 = 1_767_225_600


@pytest.fixture(scope="module", params=["agt-5.0.0", "agt-3.7.0", "dev"])
def servers(request: pytest.FixtureRequest) -> Iterator[ServerPair]:
    pair = ServerPair(request.param).start()
    yield pair
    pair.stop()


class Agent:
    def __init__(self, label: str) -> None:
        self.rng = Drbg(f"pq-carrier/{label}/{time.time_ns()}")  # fresh identities: servers keep state
        self.identity = Identity.from_seed(self.rng(32))
        self.prekeys = PreKeyStore(self.identity)
        self.spk = self.prekeys.generate_signed_pre_key(self.rng)
        self.kem = pq.KemPreKeyStore()
        self.last_resort = self.kem.generate_last_resort(self.rng, created_at=T0)

    def upload_body(self) -> tuple[dict[str, object], list[pq.KemPreKey]]:
        otks = self.prekeys.generate_one_time_pre_keys(OTKS, self.rng)
        kem_otks = self.kem.generate_one_time(OTKS, self.rng, created_at=T0)
        return pq.prekey_upload_body(self.identity, self.spk, otks, kem_otks), kem_otks


async def _publish(pair: ServerPair, agent: Agent) -> dict[str, object]:
    metadata = {"display_name": "pq-bob", **pq.advert_metadata(agent.identity, agent.last_resort)}
    async with RegistryClient(pair.registry_url, agent.identity) as registry:
        await registry.register(["pq-bob"], metadata)
    body, _ = agent.upload_body()
    _put(pair, agent, body)
    return body


def _put(pair: ServerPair, agent: Agent, body: dict[str, object]) -> None:
    did = agent.identity.did
    stamp = fr.iso_timestamp(time.time())
    response = httpx.put(
        pair.registry_url + rc.prekeys_path(did),
        json=body,
        headers={"authorization": rc.auth_header(agent.identity, did, stamp)},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    assert response.json()["otk_count"] == OTKS


async def test_metadata_and_one_time_entries_survive_and_are_consumed_once(servers: ServerPair) -> None:
    bob = Agent("bob")
    body = await _publish(servers, bob)
    did = bob.identity.did
    # the other candidate carriers, probed: extra keys at the top level and in signed_pre_key
    probed = {**body, "pq_probe": "top", "signed_pre_key": {**body["signed_pre_key"], "pq_probe": "spk"}}  # type: ignore[dict-item]
    _put(servers, bob, probed)

    record = httpx.get(servers.registry_url + rc.agent_path(did), timeout=10).json()
    sent = pq.advert_metadata(bob.identity, bob.last_resort)[pq.PQ_METADATA_KEY]
    assert record["metadata"][pq.PQ_METADATA_KEY] == sent  # the exact string, ~1.75 KB
    advert = pq.parse_advert(record["metadata"])
    assert advert is not None
    advert.verify(bob.identity.ed25519_public, None)

    uploaded = body["one_time_pre_keys"]
    assert isinstance(uploaded, list)
    handed_out = []
    for _ in range(OTKS + 1):
        fetched = httpx.get(servers.registry_url + rc.prekeys_path(did), timeout=10).json()
        handed_out.append(fetched["one_time_pre_key"])
        # the signed pre-key block is returned as the registry rebuilt it: only the three
        # classic fields survive there, which is why the KEM keys do not ride in it
        assert set(fetched["signed_pre_key"]) == {"key_id", "public_key", "signature"}
        assert "pq_probe" not in fetched
    assert handed_out[:OTKS] == uploaded  # verbatim, in order, each once
    assert handed_out[OTKS] is None
    kem_ids = [entry["pq"]["key_id"] for entry in uploaded]
    assert len(set(kem_ids)) == OTKS


async def test_hybrid_sessions_from_fetched_material_on_both_paths(servers: ServerPair) -> None:
    bob, alice = Agent("bob"), Agent("alice")
    await _publish(servers, bob)
    did = bob.identity.did
    record = httpx.get(servers.registry_url + rc.agent_path(did), timeout=10).json()
    advert = pq.parse_advert(record["metadata"])
    for index in range(OTKS + 1):
        fetched = httpx.get(servers.registry_url + rc.prekeys_path(did), timeout=10).json()
        if index not in (0, OTKS):
            continue
        kem_prekey = pq.choose_kem_prekey(pq.parse_bundle_kem_prekey(fetched), advert, pinned_pq=True)
        assert kem_prekey is not None
        want = pq.KemKeyKind.ONE_TIME if index == 0 else pq.KemKeyKind.LAST_RESORT
        assert kem_prekey.kind is want
        init = pq.initiate_hybrid(alice.identity, rc.parse_bundle(fetched), kem_prekey, alice.rng)
        frame = pq.knock_with_pq(fr.knock_frame(alice.identity.did, did, f"k{index}", "t", init.establishment), init.pq)
        parsed = fr.parse_frame(json.loads(fr.encode_frame(frame)))
        assert parsed.establishment is not None
        ext = pq.parse_pq_establishment(json.loads(fr.encode_frame(frame))["establishment"]["pq"])
        resp = pq.respond_hybrid(bob.prekeys, bob.kem, parsed.establishment, ext)
        assert resp.shared_secret == init.shared_secret and resp.kem_key_kind is want


_TS_CHECK = r"""
const path = require("node:path");
const dist = path.join(process.argv[1], "@microsoft/agent-governance-sdk/dist/encryption");
const { RegistryClient } = require(path.join(dist, "registry-client.js"));
const { MeshClient } = require(path.join(dist, "mesh-client.js"));
(async () => {
  const [registryUrl, did, establishmentJson] = process.argv.slice(2);
  const registry = new RegistryClient({ baseUrl: registryUrl });
  const agent = await registry.getAgent(did);
  const bundle = await registry.fetchPrekeys(did);
  const client = new MeshClient({ relayUrl: "http://127.0.0.1:9", agentDid: "did:mesh:ts", autoReconnect: false });
  const est = client.deserializeEstablishment(JSON.parse(establishmentJson));
  const hex = (u) => Buffer.from(u).toString("hex");
  console.log(JSON.stringify({
    metadataKeys: Object.keys(agent.metadata).sort(),
    identityKey: hex(bundle.identityKey), signedPreKey: hex(bundle.signedPreKey),
    oneTimePreKey: hex(bundle.oneTimePreKey), oneTimePreKeyId: bundle.oneTimePreKeyId,
    bundleKeys: Object.keys(bundle).sort(),
    establishment: { ik: hex(est.initiatorIdentityKey), ek: hex(est.ephemeralPublicKey), otk: est.usedOneTimeKeyId,
                     keys: Object.keys(est).sort() },
  }));
})().catch((e) => { console.error(String(e && e.stack || e)); process.exit(1); });
"""


async def test_npm_4_0_0_parsers_ignore_the_extensions(servers: ServerPair, node_modules: Path) -> None:
    bob, alice = Agent("bob"), Agent("alice")
    body = await _publish(servers, bob)
    first = body["one_time_pre_keys"][0]  # type: ignore[index]
    # a hybrid establishment as an agt_mesh initiator would put it in the KNOCK
    fetched = {**{k: v for k, v in body.items() if k != "one_time_pre_keys"}, "one_time_pre_key": first}
    kem_prekey = pq.parse_bundle_kem_prekey(fetched)
    assert kem_prekey is not None
    init = pq.initiate_hybrid(alice.identity, rc.parse_bundle(fetched), kem_prekey, alice.rng)
    frame = pq.knock_with_pq(fr.knock_frame("did:mesh:a", bob.identity.did, "k", "t", init.establishment), init.pq)
    proc = subprocess.run(
        [
            "node",
            "-e",
            _TS_CHECK,
            str(node_modules),
            servers.registry_url,
            bob.identity.did,
            json.dumps(frame["establishment"]),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["metadataKeys"] == ["agt_mesh_pq", "display_name"]
    assert out["identityKey"] == bob.identity.x25519_public.hex()
    assert out["signedPreKey"] == bob.spk.public.hex()
    assert out["oneTimePreKey"] == b64url_decode(first["public_key"]).hex()
    assert out["oneTimePreKeyId"] == first["key_id"]
    # the TS bundle is exactly the classic one: the "pq" object was not picked up
    assert out["bundleKeys"] == sorted(
        [
            "identityKey",
            "identityKeyEd",
            "signedPreKey",
            "signedPreKeySignature",
            "signedPreKeyId",
            "oneTimePreKey",
            "oneTimePreKeyId",
        ]
    )
    assert out["establishment"] == {
        "ik": alice.identity.x25519_public.hex(),
        "ek": init.establishment.ephemeral_public_key.hex(),
        "otk": init.establishment.one_time_pre_key_id,
        "keys": ["ephemeralPublicKey", "initiatorIdentityKey", "usedOneTimeKeyId"],
    }


async def test_relays_forward_a_hybrid_knock_unchanged(servers: ServerPair) -> None:
    bob, alice = Agent("bob"), Agent("alice")
    body = await _publish(servers, bob)
    fetched = {
        **{k: v for k, v in body.items() if k != "one_time_pre_keys"},
        "one_time_pre_key": body["one_time_pre_keys"][0],
    }  # type: ignore[index]
    kem_prekey = pq.parse_bundle_kem_prekey(fetched)
    assert kem_prekey is not None
    init = pq.initiate_hybrid(alice.identity, rc.parse_bundle(fetched), kem_prekey, alice.rng)
    a_did, b_did = alice.identity.did, bob.identity.did
    knock = pq.knock_with_pq(
        fr.knock_frame(a_did, b_did, "pq-knock-1", fr.iso_timestamp(time.time()), init.establishment), init.pq
    )
    url = relay_ws_url(servers.relay_url)
    async with connect(url) as ws_b, connect(url) as ws_a:
        for ws, agent in ((ws_b, bob), (ws_a, alice)):
            did = agent.identity.did
            await ws.send(
                fr.encode_frame(fr.connect_frame(did, identity=agent.identity, timestamp=fr.iso_timestamp(time.time())))
            )
        await asyncio.sleep(0.3)  # both registered with the relay before the KNOCK is routed
        await ws_a.send(fr.encode_frame(knock))
        async with asyncio.timeout(10):
            while True:
                received = json.loads(await ws_b.recv())
                if received.get("type") == "knock":
                    break
    assert received == knock  # every byte of the extension arrived
    resp = pq.respond_hybrid(
        bob.prekeys,
        bob.kem,
        fr.parse_frame(received).establishment,  # type: ignore[arg-type]
        pq.parse_pq_establishment(received["establishment"]["pq"]),
    )
    assert resp.shared_secret == init.shared_secret
