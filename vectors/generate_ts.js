#!/usr/bin/env node
// Known-answer vector generator: drives the REAL npm package
// @microsoft/agent-governance-sdk@4.0.0 with deterministic, logged randomness and
// writes vectors/ts-npm-4.0.0.json in the `agt-mesh-vectors/1` format
// (see /work/shared/spec/vectors.md and wire.md §10).
//
// Usage: node vectors/generate_ts.js [--out PATH]
//
// Randomness: before the SDK is loaded, `require("node:crypto").webcrypto.getRandomValues`
// (=== globalThis.crypto in Node 20) is replaced by a DRBG whose stream is
// SHA256(label || u32be(0)) || SHA256(label || u32be(1)) || ...; each call takes the next
// buf.length bytes. Every draw is logged (driver tag, SDK call site, length, bytes) so the
// private keys the SDK keeps to itself (pre-keys, ephemeral and ratchet keys) and the AEAD
// nonces can be attributed and written into the vectors. Each case uses its own label.
// `Date` is fixed to 2026-01-01T00:00:00.000Z, `randomUUID` is a counter and
// `Math.random` returns 0.5.
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const nodeCrypto = require("node:crypto");

// ───────────────────────── deterministic environment (install BEFORE the SDK) ──────────

const FIXED_TIME_MS = Date.UTC(2026, 0, 1, 0, 0, 0, 0);
const FIXED_ISO = "2026-01-01T00:00:00.000Z";
const RealDate = Date;
class FixedDate extends RealDate {
  constructor(...args) {
    if (args.length === 0) super(FIXED_TIME_MS);
    else super(...args);
  }
  static now() {
    return FIXED_TIME_MS;
  }
}
globalThis.Date = FixedDate;
Math.random = () => 0.5;

const sha256Node = (data) => nodeCrypto.createHash("sha256").update(data).digest();

const drbg = {
  label: null, // null = no case active: any draw is a bug
  block: 0,
  pool: Buffer.alloc(0),
  offset: 0,
  who: "",
  log: [],
};

function drbgReset(label) {
  drbg.label = label;
  drbg.block = 0;
  drbg.pool = Buffer.alloc(0);
  drbg.offset = 0;
  drbg.who = "";
  drbg.log = [];
}

function drbgTake(n) {
  while (drbg.pool.length < n) {
    const ctr = Buffer.alloc(4);
    ctr.writeUInt32BE(drbg.block++, 0);
    drbg.pool = Buffer.concat([drbg.pool, sha256Node(Buffer.concat([Buffer.from(drbg.label, "utf8"), ctr]))]);
  }
  const out = Buffer.from(drbg.pool.subarray(0, n));
  drbg.pool = drbg.pool.subarray(n);
  return out;
}

// Names of the SDK functions on the call stack of a draw, innermost first.
function sdkSite(stack) {
  const names = [];
  for (const line of stack.split("\n").slice(1)) {
    const m = /^\s*at (?:(.+?) \()?(.+?):\d+:\d+\)?$/.exec(line);
    if (!m || !m[2].includes(`agent-governance-sdk${path.sep}dist${path.sep}`)) continue;
    names.push(`${(m[1] || "<anon>").replace(/^(new |async )/, "")}@${path.basename(m[2])}`);
  }
  return names.join("<");
}

Error.stackTraceLimit = 40;
const webcrypto = nodeCrypto.webcrypto;
webcrypto.getRandomValues = function patchedGetRandomValues(buf) {
  if (drbg.label === null) throw new Error("DRBG draw outside of a case");
  const site = sdkSite(new Error().stack);
  if (!/^randomBytes@(x3dh|ratchet)\.js</.test(site)) {
    throw new Error(`unexpected random draw from outside the SDK crypto core: ${site || "<no sdk frame>"}`);
  }
  const bytes = drbgTake(buf.byteLength);
  new Uint8Array(buf.buffer, buf.byteOffset, buf.byteLength).set(bytes);
  drbg.log.push({ who: drbg.who, site, offset: drbg.offset, len: bytes.length, hex: bytes.toString("hex") });
  drbg.offset += bytes.length;
  return buf;
};

let uuidCounter = 0;
const nextUuid = () => `00000000-0000-4000-8000-${(uuidCounter++).toString(16).padStart(12, "0")}`;
webcrypto.randomUUID = nextUuid;
nodeCrypto.randomUUID = nextUuid;
if (globalThis.crypto !== webcrypto) throw new Error("globalThis.crypto is not node:crypto webcrypto");

// ───────────────────────── the SDK (loaded after the patches) ──────────────────────────

const SDK_DIR = path.dirname(require.resolve("@microsoft/agent-governance-sdk/package.json"));
const SDK_VERSION = JSON.parse(fs.readFileSync(path.join(SDK_DIR, "package.json"), "utf8")).version;
const sdk = require("@microsoft/agent-governance-sdk");
const { X3DHKeyManager, DoubleRatchet, SecureChannel, MeshClient, ed25519ToX25519 } = sdk;
// Not reachable through the package "exports" map in 4.0.0; loaded by file path (servers.md §4.3).
const { ed25519AuthSigner } = require(path.join(SDK_DIR, "dist/encryption/registry-client.js"));
// Independent computations only (the SDK's own dependencies).
const { ed25519, x25519 } = require("@noble/curves/ed25519.js");
const { hkdf } = require("@noble/hashes/hkdf.js");
const { sha256 } = require("@noble/hashes/sha2.js");

if (SDK_VERSION !== "4.0.0") throw new Error(`expected SDK 4.0.0, found ${SDK_VERSION}`);

// Observer on the ratchet initialisers: records the SK that SecureChannel passes in
// (SecureChannel keeps no reference to the X3DH result). Calls straight through.
const skSpy = { sender: null, receiver: null };
const origInitSender = DoubleRatchet.initSender;
const origInitReceiver = DoubleRatchet.initReceiver;
DoubleRatchet.initSender = function (sk, ...rest) {
  skSpy.sender = Uint8Array.from(sk);
  return origInitSender.call(this, sk, ...rest);
};
DoubleRatchet.initReceiver = function (sk, ...rest) {
  skSpy.receiver = Uint8Array.from(sk);
  return origInitReceiver.call(this, sk, ...rest);
};

// ───────────────────────── helpers ─────────────────────────────────────────────────────

const hex = (u8) => Buffer.from(u8).toString("hex");
const unhex = (s) => new Uint8Array(Buffer.from(s, "hex"));
const utf8 = (s) => new TextEncoder().encode(s);
const b64 = (s) => new Uint8Array(Buffer.from(s, "base64"));
const b64url = (s) => new Uint8Array(Buffer.from(s, "base64url"));
const concat = (...a) => new Uint8Array(Buffer.concat(a.map((x) => Buffer.from(x))));
const eq = (a, b) => Buffer.from(a).equals(Buffer.from(b));

function assert(cond, msg) {
  if (!cond) throw new Error(`assertion failed: ${msg}`);
}

const X3DH_INFO = utf8("AgentMesh_X3DH_v1");
const legacyKdf = (dhConcat) => hkdf(sha256, dhConcat, new Uint8Array(32).fill(0xff), X3DH_INFO, 32);

function identity(name) {
  const seed = new Uint8Array(sha256Node(Buffer.from(`agentmesh-kat/${name}/ed25519-seed`, "utf8")));
  const edPub = ed25519.getPublicKey(seed);
  const did = "did:mesh:" + hex(sha256(edPub)).slice(0, 32);
  return { name, seed, edPub, did };
}

function serializeHeader(h) {
  const buf = Buffer.alloc(40);
  Buffer.from(h.dhPublicKey).copy(buf, 0);
  buf.writeUInt32BE(h.previousChainLength, 32);
  buf.writeUInt32BE(h.messageNumber, 36);
  return new Uint8Array(buf);
}
function parseHeader(bytes) {
  const b = Buffer.from(bytes);
  assert(b.length === 40, "header length");
  return { dhPublicKey: new Uint8Array(b.subarray(0, 32)), previousChainLength: b.readUInt32BE(32), messageNumber: b.readUInt32BE(36) };
}

// Runs fn() and returns [result, draws made during it].
function withDraws(who, fn) {
  const start = drbg.log.length;
  drbg.who = who;
  const result = fn();
  return [result, drbg.log.slice(start)];
}

function errorClass(err) {
  const m = err instanceof Error ? err.message : String(err);
  if (/^invalid tag$/.test(m)) return "auth";
  if (/^Too many skipped messages/.test(m)) return "too_many_skipped";
  // < 12 bytes: ratchet.js "Ciphertext too short"; 12..27 bytes: @noble/ciphers length check.
  if (/^Ciphertext too short$/.test(m) || /expected length bigger than tagLength=16/.test(m)) return "malformed";
  throw new Error(`SDK threw an error with no vector class: ${m}`);
}

const cases = [];

// ───────────────────────── identity ────────────────────────────────────────────────────

const NAMES = ["alice", "bob", "carol", "dave", "erin"];
const IDS = Object.fromEntries(NAMES.map((n) => [n, identity(n)]));

for (const name of NAMES) {
  drbgReset(`agt-kat/identity/${name}`);
  const id = IDS[name];
  const conv = ed25519ToX25519(id.seed, id.edPub);
  const km = new X3DHKeyManager(id.seed, id.edPub);
  assert(eq(km.identityKey.publicKey, conv.publicKey) && eq(km.identityKey.privateKey, conv.privateKey), "km IK = ed25519ToX25519");
  assert(eq(km.identityKeyEd, id.edPub), "identityKeyEd");
  assert(drbg.log.length === 0, "identity derivation draws nothing");
  cases.push({
    name: `identity/${name}`,
    kind: "identity",
    ed25519_seed: hex(id.seed),
    expect: { ed25519_pub: hex(id.edPub), x25519_priv: hex(conv.privateKey), x25519_pub: hex(conv.publicKey), did: id.did },
  });
}

// ───────────────────────── x3dh_kdf: published KAT ─────────────────────────────────────

{
  const dhConcat = Uint8Array.from({ length: 96 }, (_, i) => i);
  const sk = legacyKdf(dhConcat);
  const published = "4d1a12faac5d3f02cfbf818d22cb0fd421fc4f06705ff05aa90e4e069552e22b";
  assert(hex(sk) === published, "legacy KDF KAT");
  cases.push({
    name: "x3dh_kdf/published-kat-bytes-00-5f",
    kind: "x3dh_kdf",
    source:
      "published KAT (upstream tests/encryption.test.ts 'X3DH KDF', legacy value); computed here with " +
      "@noble/hashes HKDF-SHA256(salt=FF*32, IKM=dh_concat, info='AgentMesh_X3DH_v1', L=32) and asserted equal",
    dh_concat: hex(dhConcat),
    expect: { sk: published },
  });
}

// ───────────────────────── session cases ───────────────────────────────────────────────

// Plaintexts used below.
const BIG5000 = Uint8Array.from({ length: 5000 }, (_, i) => (i * 131 + (i >> 8)) & 0xff);
const UNICODE = utf8("héllo wörld — 你好, мир ✓ 🔐");

/**
 * Runs one X3DH + Double Ratchet conversation on the real SDK classes.
 * spec = { name, label, alice, bob, otkCount, useOtk, api: "ratchet"|"channel", script(s) }
 * The script calls s.enc(by, plaintext) -> event index, s.dec(by, index),
 * s.decRaw(by, headerBytes, ciphertextBytes, expectedClass).
 */
function runSession(spec) {
  drbgReset(spec.label);
  uuidCounter = 0;
  const A = IDS[spec.alice];
  const B = IDS[spec.bob];
  const kmA = new X3DHKeyManager(A.seed, A.edPub);
  const kmB = new X3DHKeyManager(B.seed, B.edPub);

  const [spk, spkDraws] = withDraws("bob", () => kmB.generateSignedPreKey());
  assert(spkDraws.length === 1 && spkDraws[0].len === 32 && /generateSignedPreKey/.test(spkDraws[0].site), "spk draw");
  const [otks, otkDraws] = withDraws("bob", () => kmB.generateOneTimePreKeys(spec.otkCount));
  assert(otkDraws.length === spec.otkCount && otkDraws.every((d) => d.len === 32 && /generateOneTimePreKeys/.test(d.site)), "otk draws");
  assert(eq(x25519.getPublicKey(unhex(spkDraws[0].hex)), spk.publicKey), "spk priv from draw");
  otks.forEach((o, i) => assert(eq(x25519.getPublicKey(unhex(otkDraws[i].hex)), o.publicKey) && o.keyId === i, "otk priv from draw"));
  assert(eq(kmB.signedPreKey.keyPair.privateKey, unhex(spkDraws[0].hex)), "spk priv matches SDK state");

  const bundle = kmB.getPublicBundle(spec.useOtk === null ? undefined : spec.useOtk);
  assert((spec.useOtk === null) === (bundle.oneTimePreKey === undefined), "bundle otk presence");
  const extraAD = utf8(`${A.did}|${B.did}`);
  const ad = concat(extraAD, kmA.identityKey.publicKey, kmB.identityKey.publicKey);

  let alice, bob, sk, ekPub, usedOtk, initDraws, ad2;
  if (spec.api === "channel") {
    let est;
    [[alice, est], initDraws] = withDraws("alice", () => SecureChannel.createSender(kmA, bundle, extraAD));
    sk = skSpy.sender;
    ekPub = est.ephemeralPublicKey;
    usedOtk = est.usedOneTimeKeyId;
    assert(eq(est.initiatorIdentityKey, kmA.identityKey.publicKey), "establishment ik");
    const [bobCh, rDraws] = withDraws("bob", () => SecureChannel.createReceiver(kmB, est, extraAD));
    assert(rDraws.length === 0, "createReceiver draws nothing");
    assert(eq(skSpy.receiver, sk), "SK agreement (channel)");
    bob = bobCh;
    ad2 = [alice.associatedData, bob.associatedData];
  } else {
    let x, ratchetA;
    [[x, ratchetA], initDraws] = withDraws("alice", () => {
      const r = kmA.initiate(bundle);
      return [r, DoubleRatchet.initSender(r.sharedSecret, bundle.signedPreKey)];
    });
    sk = x.sharedSecret;
    ekPub = x.ephemeralPublicKey;
    usedOtk = x.usedOneTimeKeyId;
    const [y, rDraws] = withDraws("bob", () => kmB.respond(kmA.identityKey.publicKey, ekPub, usedOtk));
    assert(rDraws.length === 0, "respond draws nothing");
    assert(eq(y.sharedSecret, sk), "SK agreement (direct)");
    const ratchetB = DoubleRatchet.initReceiver(y.sharedSecret, {
      privateKey: kmB.signedPreKey.keyPair.privateKey,
      publicKey: kmB.signedPreKey.keyPair.publicKey,
    });
    ad2 = [concat(extraAD, x.associatedData), concat(extraAD, y.associatedData)];
    alice = { send: (pt) => ratchetA.encrypt(pt, ad2[0]), receive: (m) => ratchetA.decrypt(m, ad2[0]) };
    bob = { send: (pt) => ratchetB.encrypt(pt, ad2[1]), receive: (m) => ratchetB.decrypt(m, ad2[1]) };
  }
  assert(eq(ad2[0], ad) && eq(ad2[1], ad), "channel AD layout");
  assert((spec.useOtk === null ? undefined : spec.useOtk) === usedOtk, "used otk id");
  assert(initDraws.length === 2 && initDraws.every((d) => d.len === 32), "initiator draws");
  assert(/initiate@x3dh\.js/.test(initDraws[0].site) && /initSender@ratchet\.js/.test(initDraws[1].site), "initiator draw order");
  const ekPriv = unhex(initDraws[0].hex);
  const ratchetPriv = unhex(initDraws[1].hex);
  assert(eq(x25519.getPublicKey(ekPriv), ekPub), "ek priv from draw");

  // dh_concat computed independently from the recorded private keys (wire.md §2.3 order),
  // once from each side, then checked against the SK the SDK produced.
  const dhA = [
    x25519.getSharedSecret(kmA.identityKey.privateKey, bundle.signedPreKey),
    x25519.getSharedSecret(ekPriv, bundle.identityKey),
    x25519.getSharedSecret(ekPriv, bundle.signedPreKey),
  ];
  const spkPriv = unhex(spkDraws[0].hex);
  const dhB = [
    x25519.getSharedSecret(spkPriv, kmA.identityKey.publicKey),
    x25519.getSharedSecret(kmB.identityKey.privateKey, ekPub),
    x25519.getSharedSecret(spkPriv, ekPub),
  ];
  if (spec.useOtk !== null) {
    dhA.push(x25519.getSharedSecret(ekPriv, bundle.oneTimePreKey));
    dhB.push(x25519.getSharedSecret(unhex(otkDraws[spec.useOtk].hex), ekPub));
  }
  const dhConcat = concat(...dhA);
  assert(eq(dhConcat, concat(...dhB)), "dh_concat both sides");
  assert(eq(legacyKdf(dhConcat), sk), "SDK SK = legacy KDF(dh_concat)");

  const events = [];
  const sent = []; // event index -> {header, ciphertext, plaintext}
  const parties = { alice, bob };
  const s = {
    enc(by, plaintext) {
      const [msg, draws] = withDraws(by, () => parties[by].send(plaintext));
      assert(draws.length === 1 && draws[0].len === 12 && /encrypt@ratchet\.js/.test(draws[0].site), "one nonce draw per encrypt");
      assert(draws[0].hex === hex(msg.ciphertext.subarray(0, 12)), "nonce is ciphertext prefix");
      assert(msg.ciphertext.length === plaintext.length + 28, "blob length");
      const headerBytes = serializeHeader(msg.header);
      const idx = events.length;
      sent[idx] = { header: headerBytes, ciphertext: Uint8Array.from(msg.ciphertext), plaintext, by };
      events.push({ op: "encrypt", by, plaintext: hex(plaintext), nonce: draws[0].hex, expect: { header: hex(headerBytes), ciphertext: hex(msg.ciphertext) } });
      return idx;
    },
    dec(by, idx, expectErr) {
      const m = sent[idx];
      assert(m && m.by !== by, "decrypt refers to a message of the peer");
      return decryptEvent(by, { op: "decrypt", by, message: idx }, m.header, m.ciphertext, m.plaintext, expectErr);
    },
    decRaw(by, headerBytes, ciphertext, expectErr) {
      return decryptEvent(by, { op: "decrypt_raw", by, header: hex(headerBytes), ciphertext: hex(ciphertext) }, headerBytes, ciphertext, null, expectErr);
    },
  };
  function decryptEvent(by, ev, headerBytes, ciphertext, plaintext, expectErr) {
    assert(!events.length || !events[events.length - 1].expect.error, "nothing after an error event");
    let out, err = null;
    const [, draws] = withDraws(by, () => {
      try {
        out = parties[by].receive({ header: parseHeader(headerBytes), ciphertext: Uint8Array.from(ciphertext) });
      } catch (e) {
        err = e;
      }
    });
    assert(draws.length <= 1 && draws.every((d) => d.len === 32 && /dhRatchetStep@ratchet\.js/.test(d.site)), "decrypt draws");
    ev.ratchet_priv = draws.length ? draws[0].hex : null;
    if (err) {
      const cls = errorClass(err);
      assert(cls === expectErr, `expected ${expectErr}, SDK threw ${cls} (${err.message})`);
      ev.expect = { error: cls };
    } else {
      assert(!expectErr, `expected ${expectErr}, SDK decrypted`);
      if (plaintext) assert(eq(out, plaintext), "round-trip plaintext");
      ev.expect = { plaintext: hex(out) };
    }
    events.push(ev);
    return events.length - 1;
  }

  spec.script(s, sent);
  drbg.label = null;

  cases.push({
    name: spec.name,
    kind: "session",
    description: spec.description,
    sdk_api: spec.api === "channel" ? "X3DHKeyManager + SecureChannel.createSender/createReceiver/send/receive" : "X3DHKeyManager.initiate/respond + DoubleRatchet.initSender/initReceiver/encrypt/decrypt",
    drbg_label: spec.label,
    alice: { ed25519_seed: hex(A.seed), did: A.did },
    bob: { ed25519_seed: hex(B.seed), did: B.did },
    bob_spk: { id: spk.keyId, priv: spkDraws[0].hex },
    bob_otks: otks.map((o, i) => ({ id: o.keyId, priv: otkDraws[i].hex })),
    use_otk: spec.useOtk,
    alice_ek_priv: hex(ekPriv),
    alice_ratchet_priv: hex(ratchetPriv),
    expect: {
      bob_spk_pub: hex(spk.publicKey),
      bob_spk_sig: hex(spk.signature),
      bob_otk_pubs: otks.map((o) => hex(o.publicKey)),
      alice_ek_pub: hex(ekPub),
      sk: hex(sk),
      ad: hex(ad),
    },
    events,
  });
  cases.push({
    name: `x3dh_kdf/${spec.name.replace(/^session\//, "")}`,
    kind: "x3dh_kdf",
    source: `dh_concat recomputed with @noble/curves x25519 from the private keys drawn in session case ${spec.name}; sk is what the SDK's initiate()/respond() produced`,
    dh_concat: hex(dhConcat),
    expect: { sk: hex(sk) },
  });
}

const txt = (s) => utf8(s);
const flip = (u8, i) => {
  const c = Uint8Array.from(u8);
  c[i] ^= 0x01;
  return c;
};

// S1: OTK, several turn changes in both directions, out-of-order within a chain, tampered end.
runSession({
  name: "session/otk1-turns-ooo-tampered-auth",
  description: "OTK id 1 of 3; A->B a0..a3 with a3 before a2 (same chain), B->A b0,b1 delivered b1 then b0, " +
    "five more turn changes; ends with a bit-flipped ciphertext of an undelivered message -> auth",
  label: "agt-kat/session/1",
  alice: "alice", bob: "bob", otkCount: 3, useOtk: 1, api: "ratchet",
  script(s, sent) {
    const a0 = s.enc("alice", txt("alice->bob #0"));
    const a1 = s.enc("alice", txt("alice->bob #1"));
    const a2 = s.enc("alice", txt("alice->bob #2"));
    const a3 = s.enc("alice", txt("alice->bob #3"));
    s.dec("bob", a0); // first message: DH step
    s.dec("bob", a1);
    s.dec("bob", a3); // skips n=2
    s.dec("bob", a2); // from the skipped-key cache
    const b0 = s.enc("bob", txt("bob->alice #0"));
    const b1 = s.enc("bob", txt("bob->alice #1"));
    s.dec("alice", b1); // DH step + skip b0
    s.dec("alice", b0);
    for (let turn = 0; turn < 5; turn++) {
      const x = s.enc("alice", txt(`alice turn ${turn}`));
      s.dec("bob", x);
      const y = s.enc("bob", txt(`bob turn ${turn}`));
      const z = s.enc("bob", txt(`bob turn ${turn} again`));
      s.dec("alice", y);
      s.dec("alice", z);
    }
    const t = s.enc("alice", txt("this one gets tampered"));
    s.decRaw("bob", sent[t].header, flip(sent[t].ciphertext, 20), "auth");
  },
});

// S2: no OTK (3-DH) although Bob published OTKs; late messages from an older chain (via pn).
runSession({
  name: "session/no-otk-3dh-late-previous-chain-malformed-short",
  description: "use_otk null (Bob holds 2 unused OTKs); a1,a2 are still in flight when Alice's next chain starts " +
    "(pn=3) and are decrypted late from keys stored through pn; empty and non-ASCII plaintexts; ends with an " +
    "11-byte ciphertext (< 12 bytes, SDK 'Ciphertext too short') -> malformed",
  label: "agt-kat/session/2",
  alice: "carol", bob: "dave", otkCount: 2, useOtk: null, api: "ratchet",
  script(s, sent) {
    const a0 = s.enc("alice", txt("first"));
    const a1 = s.enc("alice", txt("second (late)"));
    const a2 = s.enc("alice", UNICODE);
    s.dec("bob", a0);
    const b0 = s.enc("bob", new Uint8Array(0));
    s.dec("alice", b0);
    const a3 = s.enc("alice", txt("new chain, pn=3"));
    s.dec("bob", a3); // DH step; stores keys for a1, a2 of the previous chain through pn
    s.dec("bob", a2);
    s.dec("bob", a1);
    const b1 = s.enc("bob", UNICODE);
    s.dec("alice", b1);
    const a4 = s.enc("alice", new Uint8Array(0));
    s.dec("bob", a4);
    // Next in-chain header for Bob's receive chain (no DH step), but an 11-byte blob.
    const a5 = s.enc("alice", txt("x"));
    s.decRaw("bob", sent[a5].header, sent[a5].ciphertext.subarray(0, 11), "malformed");
  },
});

// S3: SecureChannel API, OTK 0, big / empty / non-ASCII payloads, ends with a 27-byte blob.
runSession({
  name: "session/channel-otk0-big-empty-unicode-malformed-27b",
  description: "SecureChannel API; 5000-byte, empty and non-ASCII UTF-8 plaintexts in both directions; ends with a " +
    "27-byte ciphertext (12..27 bytes: @noble/ciphers length error, not a tag error) -> malformed",
  label: "agt-kat/session/3",
  alice: "alice", bob: "carol", otkCount: 2, useOtk: 0, api: "channel",
  script(s, sent) {
    const a0 = s.enc("alice", BIG5000);
    const a1 = s.enc("alice", new Uint8Array(0));
    s.dec("bob", a0);
    s.dec("bob", a1);
    const b0 = s.enc("bob", UNICODE);
    const b1 = s.enc("bob", BIG5000);
    s.dec("alice", b0);
    s.dec("alice", b1);
    const a2 = s.enc("alice", UNICODE);
    s.dec("bob", a2);
    const b2 = s.enc("bob", new Uint8Array(0));
    s.dec("alice", b2);
    const a3 = s.enc("alice", txt("cut short"));
    s.decRaw("bob", sent[a3].header, sent[a3].ciphertext.subarray(0, 27), "malformed");
  },
});

// S4: 102 messages, only the last delivered (gap 101 > 100) as Bob's first message.
runSession({
  name: "session/otk0-gap-101-first-message-too-many-skipped",
  description: "Alice encrypts 102 messages (n=0..101); Bob receives only n=101 as his first message: the DH step " +
    "happens (ratchet_priv drawn) and then skipping 101 > 100 keys fails -> too_many_skipped",
  label: "agt-kat/session/4",
  alice: "bob", bob: "alice", otkCount: 1, useOtk: 0, api: "ratchet",
  script(s) {
    let last;
    for (let i = 0; i < 102; i++) last = s.enc("alice", txt(`m${i}`));
    s.dec("bob", last, "too_many_skipped");
  },
});

// S5: gap of exactly 100 is accepted; SecureChannel; no OTKs at all.
runSession({
  name: "session/channel-no-otks-gap-100-boundary-ok",
  description: "SecureChannel API, Bob published no OTKs (3-DH); Alice encrypts 101 messages, Bob receives n=100 " +
    "first (exactly 100 skipped keys: allowed), then n=50, n=0, n=99 from the cache; turn changes follow",
  label: "agt-kat/session/5",
  alice: "dave", bob: "erin", otkCount: 0, useOtk: null, api: "channel",
  script(s) {
    const ids = [];
    for (let i = 0; i < 101; i++) ids.push(s.enc("alice", txt(`bulk ${i}`)));
    s.dec("bob", ids[100]);
    s.dec("bob", ids[50]);
    s.dec("bob", ids[0]);
    s.dec("bob", ids[99]);
    const b0 = s.enc("bob", txt("got them"));
    s.dec("alice", b0);
    const a = s.enc("alice", txt("good"));
    s.dec("bob", a);
    s.dec("bob", ids[1]); // still cached from the previous chain
  },
});

// S6: too many skipped through pn (previous chain), detected before the DH step.
runSession({
  name: "session/otk2-gap-via-pn-too-many-skipped",
  description: "Bob has received a0 only; Alice sends a1..a101 (never delivered), receives b0, and starts a new chain " +
    "with pn=102: Bob must skip 101 > 100 keys of the previous chain -> too_many_skipped before any DH step (ratchet_priv null)",
  label: "agt-kat/session/6",
  alice: "erin", bob: "bob", otkCount: 3, useOtk: 2, api: "ratchet",
  script(s) {
    const a0 = s.enc("alice", txt("a0"));
    s.dec("bob", a0);
    const b0 = s.enc("bob", txt("b0"));
    for (let i = 1; i <= 101; i++) s.enc("alice", txt(`lost a${i}`));
    s.dec("alice", b0);
    const n = s.enc("alice", txt("new chain pn=102"));
    s.dec("bob", n, "too_many_skipped");
  },
});

// ───────────────────────── MeshClient runs: frames and registry requests ───────────────

const REGISTRY_URL = "http://registry.invalid";
const RELAY_URL = "http://relay.invalid";

function makeRegistry() {
  const reg = { agents: new Map(), prekeys: new Map(), requests: [] };
  reg.fetchImpl = async (url, init) => {
    assert(url.startsWith(REGISTRY_URL), "registry url");
    const p = url.slice(REGISTRY_URL.length);
    const headers = init.headers || {};
    reg.requests.push({ who: drbg.who, method: init.method, path: p, headers: { ...headers }, body: init.body });
    const reply = (status, obj) => ({ ok: status >= 200 && status < 300, status, text: async () => (obj === undefined ? "" : JSON.stringify(obj)) });
    let m;
    if (init.method === "POST" && p === "/v1/agents") {
      const body = JSON.parse(init.body);
      reg.agents.set(body.did, body);
      return reply(201, { did: body.did, status: "registered" });
    }
    if ((m = /^\/v1\/agents\/([^/]+)\/prekeys$/.exec(p))) {
      const did = decodeURIComponent(m[1]);
      if (init.method === "PUT") {
        const body = JSON.parse(init.body);
        reg.prekeys.set(did, { ...body, one_time_pre_keys: [...body.one_time_pre_keys] });
        return reply(200, { did, otk_count: body.one_time_pre_keys.length });
      }
      if (init.method === "GET") {
        const b = reg.prekeys.get(did);
        if (!b) return reply(404, { detail: "not found" });
        const otk = b.one_time_pre_keys.shift() || null; // FIFO, like the Python registry
        return reply(200, { identity_key: b.identity_key, identity_key_ed: b.identity_key_ed, signed_pre_key: b.signed_pre_key, one_time_pre_key: otk });
      }
    }
    return reply(404, { detail: "not found" });
  };
  return reg;
}

// In-memory relay: a wsFactory per client returns a plain object with send/close and the
// onopen/onmessage/onclose/onerror properties the client assigns (wire.md §10.3 option 2).
function makeRelay() {
  const relay = { bound: new Map(), sent: [] };
  relay.factory = (name) => (url) => {
    assert(url === RELAY_URL.replace(/^http/, "ws") + "/ws", "ws url");
    const sock = { onopen: null, onmessage: null, onclose: null, onerror: null, readyState: 0 };
    sock.send = (data) => {
      relay.sent.push({ name, data });
      const f = JSON.parse(data);
      if (f.type === "connect") relay.bound.set(f.from, sock);
      else if (["message", "knock", "knock_accept", "knock_reject"].includes(f.type)) {
        const target = relay.bound.get(f.to);
        if (target) setImmediate(() => target.onmessage({ data }));
      }
    };
    sock.close = (code) => {
      sock.readyState = 3;
      for (const [did, s] of relay.bound) if (s === sock) relay.bound.delete(did);
      setImmediate(() => sock.onclose && sock.onclose({ code }));
    };
    setImmediate(() => {
      sock.readyState = 1;
      sock.onopen();
    });
    return sock;
  };
  return relay;
}

async function settle() {
  for (let i = 0; i < 50; i++) await new Promise((r) => setImmediate(r));
}

function makeClient(relay, reg, name, extra = {}) {
  const id = IDS[name];
  const km = new X3DHKeyManager(id.seed, id.edPub);
  const { registryClientOptions, ...rest } = extra;
  const client = new MeshClient({
    relayUrl: RELAY_URL,
    registryUrl: REGISTRY_URL,
    registryClientOptions: { fetchImpl: reg.fetchImpl, maxRetries: 0, ...(registryClientOptions || {}) },
    keyManager: km,
    agentDid: id.did,
    wsFactory: relay.factory(name),
    displayName: name[0].toUpperCase() + name.slice(1),
    autoReconnect: false,
    ...rest,
  });
  const errors = [];
  client.onError((kind, from, detail) => errors.push(`${kind} ${from} ${detail}`));
  return { name, id, km, client, errors, received: [] };
}

async function connectAndCapture(c) {
  const start = drbg.log.length;
  drbg.who = c.name;
  await c.client.connect();
  c.regDraws = drbg.log.slice(start).filter((d) => /generateSignedPreKey|generateOneTimePreKeys/.test(d.site));
}

// Registry cases for the POST + PUT one client sent during auto-registration.
function registryCases(reg, c, tag) {
  const reqs = reg.requests.filter((r) => r.who === c.name && r.method !== "GET");
  assert(reqs.length === 2 && reqs[0].method === "POST" && reqs[1].method === "PUT", "auto-register = POST then PUT");
  const spkDraw = c.regDraws[0];
  assert(/generateSignedPreKey/.test(spkDraw.site), "first registration draw is the SPK");
  const otkDraws = c.regDraws.slice(1);
  assert(otkDraws.every((d) => /generateOneTimePreKeys/.test(d.site)), "then the OTKs");
  const put = JSON.parse(reqs[1].body);
  assert(eq(x25519.getPublicKey(unhex(spkDraw.hex)), b64url(put.signed_pre_key.public_key)), "spk priv vs upload");
  assert(put.one_time_pre_keys.length === otkDraws.length, "otk count");
  put.one_time_pre_keys.forEach((o, i) => assert(o.key_id === i && eq(x25519.getPublicKey(unhex(otkDraws[i].hex)), b64url(o.public_key)), "otk priv vs upload"));
  const post = JSON.parse(reqs[0].body);
  assert(post.did === c.id.did && eq(b64url(post.public_key), c.km.identityKey.publicKey), "legacy POST body");
  return reqs.map((r, i) => {
    const auth = r.headers.authorization;
    let timestamp = FIXED_ISO;
    if (auth !== undefined) {
      const parts = auth.split(" ");
      assert(parts.length === 4 && parts[0] === "Ed25519-Timestamp" && parts[1] === c.id.did, "auth header shape");
      timestamp = parts[2];
      assert(ed25519.verify(b64url(parts[3]), utf8(timestamp), c.id.edPub), "auth signature");
    }
    const body = JSON.parse(r.body);
    return {
      name: `registry/${c.name}${tag}/${i === 0 ? "post-agents-legacy" : "put-prekeys"}${auth !== undefined ? "-with-authorization" : ""}`,
      kind: "registry",
      method: r.method,
      path: r.path,
      headers: auth !== undefined ? { authorization: auth } : {},
      body,
      context: {
        ed25519_seed: hex(c.id.seed),
        timestamp,
        did: c.id.did,
        shape: "legacy",
        capabilities: post.capabilities,
        metadata: post.metadata,
        spk: { id: put.signed_pre_key.key_id, priv: spkDraw.hex },
        otks: otkDraws.map((d, k) => ({ id: put.one_time_pre_keys[k].key_id, priv: d.hex })),
      },
    };
  });
}

// vectors.md `frame` context for one frame the client sent.
function frameContext(f) {
  const keys = Object.keys(f);
  const pick = (...names) => {
    const extra = keys.filter((k) => !["v", "type", ...names].includes(k));
    assert(extra.length === 0, `unexpected field(s) ${extra} in ${f.type} frame`);
    return Object.fromEntries(names.map((n) => [n, f[n]]));
  };
  assert(f.v === 1, "v");
  switch (f.type) {
    case "connect":
    case "fetch_pending":
    case "disconnect":
      return pick("from");
    case "heartbeat":
      return pick("from", "ts");
    case "ack":
      return pick("id");
    case "knock_accept":
      return pick("from", "to", "id", "knock_id", "ts");
    case "knock_reject":
      return pick("from", "to", "id", "knock_id", "reason", "ts");
    case "knock": {
      const c = pick("from", "to", "id", "ts", "intent", "establishment");
      assert(JSON.stringify(c.intent) === '{"action":"establish_session"}', "knock intent");
      const e = c.establishment;
      assert(Object.keys(e).every((k) => ["ik", "ek", "otk"].includes(k)), "establishment keys");
      return { from: c.from, to: c.to, id: c.id, ts: c.ts, ik: hex(b64(e.ik)), ek: hex(b64(e.ek)), otk: e.otk === undefined ? null : e.otk };
    }
    case "message": {
      assert(!("plaintext" in f), "plaintext-peer message frames have no vector context");
      const c = pick("from", "to", "id", "ts", "header", "ciphertext");
      assert(Object.keys(c.header).join(",") === "dh,pn,n", "header keys");
      const header = serializeHeader({ dhPublicKey: b64(c.header.dh), previousChainLength: c.header.pn, messageNumber: c.header.n });
      return { from: c.from, to: c.to, id: c.id, ts: c.ts, header: hex(header), ciphertext: hex(b64(c.ciphertext)) };
    }
    default:
      throw new Error(`no vector context for frame type ${f.type}`);
  }
}

async function runMesh() {
  drbgReset("agt-kat/mesh-client/1");
  uuidCounter = 0;
  const relay = makeRelay();
  const reg = makeRegistry();
  const alice = makeClient(relay, reg, "alice", { capabilities: ["echo", "kat"], registrationMetadata: { team: "vectors" }, oneTimePrekeyCount: 3 });
  const bob = makeClient(relay, reg, "bob", { capabilities: ["echo"], oneTimePrekeyCount: 3 });
  const carol = makeClient(relay, reg, "carol", { oneTimePrekeyCount: 0 }); // no OTKs -> 3-DH knock
  for (const c of [alice, bob, carol]) c.client.onMessage((from, payload, plain) => c.received.push({ from, payload, plain }));
  // Bob's KNOCK policy rejects carol.
  bob.client.onKnock(async (from) => from !== carol.id.did);

  for (const c of [alice, bob, carol]) await connectAndCapture(c);

  drbg.who = "alice";
  await alice.client.establishSessionWithPeer(bob.id.did); // knock with otk 0
  await settle(); // bob: knock_accept
  await alice.client.send(bob.id.did, { text: "hello bob", n: 1 });
  await alice.client.send(bob.id.did, { text: "héllo again ✓", n: 2 });
  drbg.who = "bob";
  await settle(); // bob decrypts, acks
  await bob.client.send(alice.id.did, { text: "hi alice", n: 3 });
  drbg.who = "alice";
  await settle(); // alice decrypts (DH step), acks
  await alice.client.send(bob.id.did, { text: "new chain", n: 4 });
  drbg.who = "bob";
  await settle();

  drbg.who = "carol";
  await carol.client.establishSessionWithPeer(bob.id.did); // knock with otk 1
  drbg.who = "bob";
  await settle(); // bob: knock_reject; carol drops her session
  assert(carol.client.getSession(bob.id.did) === undefined, "knock_reject closes the initiator session");

  drbg.who = "alice";
  await alice.client.establishSessionWithPeer(carol.id.did); // no OTK on the registry -> no otk
  await settle(); // carol: knock_accept (no policy handler -> accept)
  await alice.client.send(carol.id.did, { text: "hello carol" });
  drbg.who = "carol";
  await settle();
  await carol.client.send(alice.id.did, { text: "hello alice, from carol" });
  drbg.who = "alice";
  await settle();

  alice.client.sendHeartbeat();
  bob.client.sendHeartbeat();
  for (const c of [alice, bob, carol]) {
    drbg.who = c.name;
    await c.client.disconnect();
  }
  await settle();

  for (const c of [alice, bob, carol]) assert(c.errors.length === 0, `${c.name} errors: ${c.errors}`);
  assert(bob.received.length === 3 && alice.received.length === 2 && carol.received.length === 1, "deliveries");
  assert(JSON.stringify(bob.received[1].payload) === '{"text":"héllo again ✓","n":2}', "non-ASCII payload");
  const foreign = drbg.log.filter((d) => !/x3dh\.js|ratchet\.js/.test(d.site));
  assert(foreign.length === 0, "all draws from the SDK crypto core");
  drbg.label = null;

  const out = [];
  const seq = {};
  for (const { name, data } of relay.sent) {
    const f = JSON.parse(data);
    assert(JSON.stringify(f) === data, "frames are compact JSON.stringify output");
    seq[name] = (seq[name] || 0) + 1;
    let detail = f.type;
    if (f.type === "knock") detail += f.establishment.otk === undefined ? "-no-otk" : `-otk${f.establishment.otk}`;
    if (f.type === "message") detail += `-pn${f.header.pn}-n${f.header.n}`;
    if (f.to) detail += `-to-${Object.values(IDS).find((i) => i.did === f.to).name}`;
    out.push({ name: `frame/${name}/${String(seq[name]).padStart(2, "0")}-${detail}`, kind: "frame", frame: f, context: frameContext(f) });
  }
  const types = new Set(out.map((c) => c.frame.type));
  for (const t of ["connect", "fetch_pending", "knock", "message", "knock_accept", "knock_reject", "ack", "heartbeat", "disconnect"]) {
    assert(types.has(t), `frame type ${t} covered`);
  }
  assert(out.some((c) => c.frame.type === "knock" && c.context.otk === null), "knock without otk covered");
  assert(out.some((c) => c.frame.type === "knock" && c.context.otk !== null), "knock with otk covered");
  return [...registryCases(reg, alice, ""), ...registryCases(reg, bob, ""), ...registryCases(reg, carol, ""), ...out];
}

// npm RegistryClient with an Ed25519-Timestamp authSigner (registryClientOptions.authSigner).
async function runRegistryAuth() {
  drbgReset("agt-kat/registry-auth/1");
  uuidCounter = 0;
  const relay = makeRelay();
  const reg = makeRegistry();
  const id = IDS.dave;
  const dave = makeClient(relay, reg, "dave", {
    capabilities: ["search"],
    oneTimePrekeyCount: 2,
    registryClientOptions: { authSigner: ed25519AuthSigner(id.did, id.seed) },
  });
  await connectAndCapture(dave);
  await dave.client.disconnect();
  await settle();
  drbg.label = null;
  return registryCases(reg, dave, "-authsigner");
}

// Not emitted (vectors.md defines no context for it): confirm the plaintext-peer frame shape.
async function checkPlaintextPeerFrame() {
  drbgReset("agt-kat/plaintext-peer-check");
  uuidCounter = 0;
  const relay = makeRelay();
  const legacy = "did:mesh:legacy-peer";
  const km = new X3DHKeyManager(IDS.erin.seed, IDS.erin.edPub);
  const c = new MeshClient({ relayUrl: RELAY_URL, registryUrl: "", keyManager: km, agentDid: IDS.erin.did, plaintextPeers: [legacy], wsFactory: relay.factory("erin"), autoReconnect: false });
  await c.connect();
  await c.send(legacy, { text: "plain é" });
  let threw = null;
  try {
    await c.send(legacy, { text: "✓" }); // above U+00FF: btoa throws
  } catch (e) {
    threw = e;
  }
  await c.disconnect();
  await settle();
  drbg.label = null;
  const f = JSON.parse(relay.sent[2].data);
  assert(Object.keys(f).join(",") === "v,type,from,to,id,ts,ciphertext,plaintext" && f.plaintext === true, "plaintext frame shape");
  assert(Buffer.from(f.ciphertext, "base64").toString("latin1") === '{"text":"plain é"}', "plaintext = btoa(latin1 JSON)");
  assert(threw !== null, "btoa rejects characters above U+00FF");
}

async function main() {
  const argv = process.argv.slice(2);
  let outPath = path.join(__dirname, "ts-npm-4.0.0.json");
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--out" && argv[i + 1]) outPath = path.resolve(argv[++i]);
    else throw new Error(`usage: node vectors/generate_ts.js [--out PATH] (unknown argument ${argv[i]})`);
  }
  cases.push(...(await runMesh()));
  cases.push(...(await runRegistryAuth()));
  await checkPlaintextPeerFrame();

  const names = new Set();
  for (const c of cases) {
    assert(!names.has(c.name), `duplicate case name ${c.name}`);
    names.add(c.name);
  }
  const doc = {
    format: "agt-mesh-vectors/1",
    generator: `vectors/generate_ts.js driving @microsoft/agent-governance-sdk@${SDK_VERSION} (npm) on node ${process.version}; ` +
      "randomness: DRBG SHA256(utf8(label) || u32be(i)), per-case labels (case field drbg_label)",
    x3dh_kdf: "legacy",
    cases,
  };
  fs.writeFileSync(outPath, JSON.stringify(doc, null, 1) + "\n");
  const kinds = {};
  for (const c of cases) kinds[c.kind] = (kinds[c.kind] || 0) + 1;
  console.log(`wrote ${outPath}: ${cases.length} cases ${JSON.stringify(kinds)}`);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
