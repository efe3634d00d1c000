#!/usr/bin/env node
// Throughput / memory benchmark of the reference TypeScript SDK
// (@microsoft/agent-governance-sdk@4.0.0, E2E encryption module).
//
// Usage:
//   node --expose-gc benchmarks/ts_bench.js [--rounds 5] [--seconds 0.5]
//        [--rows x3dh,oneway_1024,...,memory] [--warmup 0.3] [--sessions 1000]
//
// Prints exactly one JSON object on stdout:
//   {"impl": "...", "node": "v20...", "rounds": {"<row>": [ops/s, ...]},
//    "memory_per_session_bytes": <number|null>}
// Everything else (progress, diagnostics) goes to stderr.
//
// Rows and the exact SDK work timed per operation:
//
//   x3dh
//     bundle = bob.getPublicBundle(otkId)            (untimed, prepared in batches)
//     r  = alice.initiate(bundle)                    (timed; initiate() itself runs
//                                                     verifyBundle(): Ed25519 verify of
//                                                     the SPK signature, then an ephemeral
//                                                     X25519 keygen + 4 X25519 DH + HKDF)
//     rr = bob.respond(alice.identityKey.publicKey,  (timed; 4 X25519 DH + HKDF, deletes
//                      r.ephemeralPublicKey,          the consumed OTK from bob's map)
//                      r.usedOneTimeKeyId)
//     One op = one initiate + one respond. Each OTK is single-use, so OTKs are
//     generated (bob.generateOneTimePreKeys) in batches outside the timed slices.
//
//   oneway_<n>   (n = 64, 1024, 65536 bytes of plaintext)
//     msg = sender.encrypt(pt, ad); receiver.decrypt(msg, ad)
//     sender = DoubleRatchet.initSender(x3dh secret, bob SPK public),
//     receiver = DoubleRatchet.initReceiver(x3dh secret, bob SPK pair).
//     Always sender -> receiver; the single DH ratchet step on the receiver
//     happens during warm-up, so timed ops are symmetric-only (2 HMAC chain
//     steps + ChaCha20-Poly1305 per op).
//
//   pingpong_<n>
//     Alternate directions: even ops A.encrypt -> B.decrypt, odd ops
//     B.encrypt -> A.decrypt. Every decrypt therefore performs a DH ratchet
//     step (2 X25519 DH + 1 X25519 keygen + 2 HKDF). One op = one encrypt +
//     one decrypt.
//
//   AD for every ratchet call is 147 bytes, built exactly as SecureChannel
//   would: utf8("<did A>|<did B>") (41 + 1 + 41 = 83 bytes) followed by the
//   X3DH associatedData (initiator IK || responder IK, 64 bytes).
//
//   memory  (pseudo-row, produces memory_per_session_bytes; run by default,
//            or when named in --rows)
//     See measureMemory() below.
"use strict";

const sdk = require("@microsoft/agent-governance-sdk");
const { X3DHKeyManager, DoubleRatchet } = sdk;
const { webcrypto } = require("node:crypto");

// Keep stdout clean: anything that tries console.log goes to stderr.
console.log = console.error;
console.info = console.error;

const IMPL = "@microsoft/agent-governance-sdk@4.0.0";
const SIZES = [64, 1024, 65536];
const ALL_ROWS = [
  "x3dh",
  ...SIZES.map((n) => `oneway_${n}`),
  ...SIZES.map((n) => `pingpong_${n}`),
];

// ---------------------------------------------------------------- args
function parseArgs(argv) {
  const opts = { rounds: 5, seconds: 0.5, warmup: 0.3, sessions: 1000, rows: null };
  for (let i = 0; i < argv.length; i++) {
    let a = argv[i];
    let v;
    const eq = a.indexOf("=");
    if (a.startsWith("--") && eq > 0) {
      v = a.slice(eq + 1);
      a = a.slice(0, eq);
    }
    const next = () => (v !== undefined ? v : argv[++i]);
    switch (a) {
      case "--rounds": opts.rounds = parseInt(next(), 10); break;
      case "--seconds": opts.seconds = parseFloat(next()); break;
      case "--warmup": opts.warmup = parseFloat(next()); break;
      case "--sessions": opts.sessions = parseInt(next(), 10); break;
      case "--rows": opts.rows = next().split(",").map((s) => s.trim()).filter(Boolean); break;
      case "-h":
      case "--help":
        process.stderr.write(
          "usage: node --expose-gc ts_bench.js [--rounds N] [--seconds S] " +
          "[--rows " + ALL_ROWS.join(",") + ",memory] [--warmup S] [--sessions N]\n");
        process.exit(0);
        break;
      default:
        throw new Error(`unknown argument: ${a}`);
    }
  }
  if (!(opts.rounds >= 1) || !(opts.seconds > 0) || !(opts.warmup >= 0) || !(opts.sessions >= 1)) {
    throw new Error("invalid --rounds/--seconds/--warmup/--sessions");
  }
  if (opts.rows === null) {
    opts.rows = [...ALL_ROWS, "memory"];
  } else {
    for (const r of opts.rows) {
      if (r !== "memory" && !ALL_ROWS.includes(r)) throw new Error(`unknown row: ${r}`);
    }
  }
  return opts;
}

// ---------------------------------------------------------------- helpers
function getGc() {
  if (typeof global.gc === "function") return global.gc;
  try {
    require("v8").setFlagsFromString("--expose-gc");
    const g = require("vm").runInNewContext("gc");
    if (typeof g === "function") {
      process.stderr.write("warning: --expose-gc not given; using v8.setFlagsFromString fallback\n");
      return g;
    }
  } catch (_) { /* ignore */ }
  return null;
}
const gc = getGc();
function fullGc() {
  if (!gc) return;
  for (let i = 0; i < 3; i++) gc();
}

function rand(n) {
  const b = new Uint8Array(n);
  // getRandomValues is limited to 65536 bytes per call
  for (let off = 0; off < n; off += 65536) {
    webcrypto.getRandomValues(b.subarray(off, Math.min(n, off + 65536)));
  }
  return b;
}

function newEd25519Identity() {
  const { ed25519 } = require("@noble/curves/ed25519.js");
  const sk = rand(32);
  const pk = ed25519.getPublicKey(sk);
  return { sk, pk };
}

function newKeyManager() {
  const id = newEd25519Identity();
  return new X3DHKeyManager(id.sk, id.pk);
}

function bytesEqual(a, b) {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

function concat(a, b) {
  const out = new Uint8Array(a.length + b.length);
  out.set(a, 0);
  out.set(b, a.length);
  return out;
}

const DID_A = "did:mesh:" + "a1".repeat(16); // 41 chars
const DID_B = "did:mesh:" + "b2".repeat(16); // 41 chars

// Establish a ratchet pair exactly like SecureChannel.createSender/createReceiver
// do (minus the wrapper object). Returns {sender, receiver, ad}.
function establishPair() {
  const alice = newKeyManager();
  const bob = newKeyManager();
  bob.generateSignedPreKey();
  const [otk] = bob.generateOneTimePreKeys(1);
  const bundle = bob.getPublicBundle(otk.keyId);
  const init = alice.initiate(bundle);
  const resp = bob.respond(alice.identityKey.publicKey, init.ephemeralPublicKey, init.usedOneTimeKeyId);
  if (!bytesEqual(init.sharedSecret, resp.sharedSecret)) throw new Error("X3DH secrets differ");
  if (!bytesEqual(init.associatedData, resp.associatedData)) throw new Error("X3DH AD differs");
  const userAd = new TextEncoder().encode(`${DID_A}|${DID_B}`);
  const ad = concat(userAd, init.associatedData);
  if (ad.length !== 147) throw new Error(`AD length ${ad.length} != 147`);
  const sender = DoubleRatchet.initSender(init.sharedSecret, bundle.signedPreKey);
  const spk = bob.signedPreKey.keyPair;
  const receiver = DoubleRatchet.initReceiver(resp.sharedSecret, {
    privateKey: spk.privateKey,
    publicKey: spk.publicKey,
  });
  return { sender, receiver, ad };
}

// ---------------------------------------------------------------- benches
// A bench is { op(): void, available(): number, refill(n): void (untimed) }.
let sink = 0;

function makeX3dhBench() {
  const alice = newKeyManager();
  const bob = newKeyManager();
  bob.generateSignedPreKey();
  const aliceIK = alice.identityKey.publicKey;
  let bundles = [];
  let idx = 0;
  return {
    available() { return bundles.length - idx; },
    refill(n) {
      // Append (never abandon unused OTKs in bob's map).
      const keys = bob.generateOneTimePreKeys(n);
      bundles = bundles.slice(idx).concat(keys.map((k) => bob.getPublicBundle(k.keyId)));
      idx = 0;
    },
    check() {
      const b = bundles[idx++];
      const r = alice.initiate(b);
      const rr = bob.respond(aliceIK, r.ephemeralPublicKey, r.usedOneTimeKeyId);
      if (!bytesEqual(r.sharedSecret, rr.sharedSecret)) throw new Error("x3dh mismatch");
      if (r.usedOneTimeKeyId !== b.oneTimePreKeyId || b.oneTimePreKey === undefined) {
        throw new Error("x3dh did not use the one-time pre-key");
      }
    },
    op() {
      const r = alice.initiate(bundles[idx++]);
      const rr = bob.respond(aliceIK, r.ephemeralPublicKey, r.usedOneTimeKeyId);
      sink ^= rr.sharedSecret[0];
    },
  };
}

function makeOnewayBench(size) {
  const { sender, receiver, ad } = establishPair();
  const pt = rand(size);
  return {
    available() { return Infinity; },
    refill() {},
    check() {
      const m = sender.encrypt(pt, ad);
      const out = receiver.decrypt(m, ad);
      if (!bytesEqual(out, pt)) throw new Error("oneway mismatch");
    },
    op() {
      const m = sender.encrypt(pt, ad);
      sink ^= receiver.decrypt(m, ad).length;
    },
  };
}

function makePingpongBench(size) {
  const { sender: a, receiver: b, ad } = establishPair();
  const pt = rand(size);
  let turn = 0; // 0: a -> b, 1: b -> a (b can only send after receiving)
  return {
    available() { return Infinity; },
    refill() {},
    check() {
      const [src, dst] = turn === 0 ? [a, b] : [b, a];
      turn ^= 1;
      const m = src.encrypt(pt, ad);
      const out = dst.decrypt(m, ad);
      if (!bytesEqual(out, pt)) throw new Error("pingpong mismatch");
    },
    op() {
      let m;
      if (turn === 0) {
        m = a.encrypt(pt, ad);
        sink ^= b.decrypt(m, ad).length;
      } else {
        m = b.encrypt(pt, ad);
        sink ^= a.decrypt(m, ad).length;
      }
      turn ^= 1;
    },
  };
}

function makeBench(row) {
  if (row === "x3dh") return makeX3dhBench();
  const [kind, n] = row.split("_");
  if (kind === "oneway") return makeOnewayBench(parseInt(n, 10));
  if (kind === "pingpong") return makePingpongBench(parseInt(n, 10));
  throw new Error(`unknown row ${row}`);
}

// Run `bench.op` for ~`seconds` of timed wall clock. Time is read every `k`
// ops; untimed refills happen between timed slices when the bench runs dry.
// Returns {ops, ns}.
function runTimed(bench, seconds, k) {
  const budget = BigInt(Math.round(seconds * 1e9));
  let ns = 0n;
  let ops = 0;
  while (ns < budget) {
    if (bench.available() <= 0) bench.refill(Math.max(k * 4, 16)); // untimed
    const avail = bench.available();
    const t0 = process.hrtime.bigint();
    let t = t0;
    let sliceOps = 0;
    while (true) {
      const n = Math.min(k, avail - sliceOps);
      for (let i = 0; i < n; i++) bench.op();
      sliceOps += n;
      t = process.hrtime.bigint();
      if (ns + (t - t0) >= budget || sliceOps >= avail) break;
    }
    ns += t - t0;
    ops += sliceOps;
  }
  return { ops, ns };
}

function benchRow(row, opts) {
  const bench = makeBench(row);
  // Correctness check (untimed) + initial warm-up estimate.
  if (bench.available() <= 0) bench.refill(8);
  bench.check();
  bench.check();
  // Warm-up, discarded. k=1 while we do not yet know the op cost.
  if (bench.available() <= 0) bench.refill(8);
  const w = runTimed(bench, opts.warmup, 1);
  const warmRate = w.ops / (Number(w.ns) / 1e9);
  // Read the clock about every ~1 ms of work.
  const k = Math.max(1, Math.floor(warmRate / 1000));
  const perRound = Math.ceil(warmRate * opts.seconds * 1.3) + 8;
  const rates = [];
  for (let r = 0; r < opts.rounds; r++) {
    // Pre-generate one-time pre-keys for the whole round (x3dh only).
    if (bench.available() < perRound) bench.refill(perRound - bench.available());
    fullGc();
    const { ops, ns } = runTimed(bench, opts.seconds, k);
    rates.push(ops / (Number(ns) / 1e9));
  }
  process.stderr.write(
    `${row.padEnd(16)} k=${String(k).padEnd(4)} warmup=${warmRate.toFixed(1)} ops/s  rounds=[${rates.map((x) => x.toFixed(1)).join(", ")}]\n`);
  return rates;
}

// ---------------------------------------------------------------- memory
// memory_per_session_bytes: heap cost of one established receiver-side
// Double Ratchet session endpoint.
//
// What is measured: `sessions` (default 1000) independent receiver-side
// DoubleRatchet objects, each created with DoubleRatchet.initReceiver(
// fresh random 32-byte shared secret, responder SPK pair) and each having
// decrypted exactly one 64-byte message (AD = the 147-byte channel AD) from
// its own freshly initialised sender. After that decrypt each receiver has
// performed its first DH ratchet step, so it holds: its own fresh X25519 DH
// pair, the sender's ratchet public key, root key, send + receive chain keys,
// counters and an EMPTY skipped-key map (no skipped messages).
//
// Excluded: the responder key manager / SPK (created once before the baseline
// and shared; after the DH step no receiver references the SPK any more), the
// senders and messages (dropped, garbage collected before the second reading),
// and the 1000-slot holding array (pre-allocated before the baseline).
// The X3DH handshake is not repeated per session: it only produces the 32-byte
// shared secret (replaced by a random one here) and leaves nothing in the
// ratchet state, and 1000 full handshakes would cost ~10 s of noble X25519.
//
// Reading: gc() x3, (heapUsed + external) before; build sessions; gc() x3,
// (heapUsed + external) after; (after - before) / sessions. `external` is
// included so any off-heap ArrayBuffer backing stores are counted too
// (small Uint8Arrays live on the V8 heap, so it is normally ~0).
function measureMemory(opts) {
  if (!gc) {
    process.stderr.write("memory: gc() unavailable, skipping (run with --expose-gc)\n");
    return null;
  }
  const N = opts.sessions;
  const bob = newKeyManager();
  bob.generateSignedPreKey();
  const spk = bob.signedPreKey.keyPair;
  const spkPub = spk.publicKey;
  const spkPriv = spk.privateKey;
  const ad = concat(new TextEncoder().encode(`${DID_A}|${DID_B}`), rand(64));
  const pt = rand(64);

  function makeSession() {
    const secret = rand(32);
    const sender = DoubleRatchet.initSender(secret, spkPub);
    const msg = sender.encrypt(pt, ad);
    const receiver = DoubleRatchet.initReceiver(secret, { privateKey: spkPriv, publicKey: spkPub });
    const out = receiver.decrypt(msg, ad);
    if (out.length !== pt.length) throw new Error("memory session decrypt failed");
    return receiver;
  }

  // Warm up the code paths (JIT code lives on the heap too).
  // Enough iterations for V8 to tier up / finish optimising these paths, so
  // code objects and feedback vectors are not counted as session memory.
  for (let i = 0; i < 300; i++) makeSession();

  const hold = new Array(N).fill(null);
  fullGc();
  const m0 = process.memoryUsage();
  for (let i = 0; i < N; i++) hold[i] = makeSession();
  fullGc();
  const m1 = process.memoryUsage();
  const dHeap = m1.heapUsed - m0.heapUsed;
  const dExt = m1.external - m0.external;
  const perSession = (dHeap + dExt) / N;
  process.stderr.write(
    `memory: ${N} receiver sessions: heapUsed +${dHeap} B, external +${dExt} B ` +
    `=> ${perSession.toFixed(1)} B/session (heap ${(dHeap / N).toFixed(1)}, external ${(dExt / N).toFixed(1)})\n`);
  // keep `hold` alive until after the reading
  if (hold.length !== N || hold[N - 1] === null) throw new Error("unreachable");
  return Math.round(perSession * 10) / 10;
}

// ---------------------------------------------------------------- main
function main() {
  const opts = parseArgs(process.argv.slice(2));
  const pkgVersion = require("@microsoft/agent-governance-sdk/package.json").version;
  if (`@microsoft/agent-governance-sdk@${pkgVersion}` !== IMPL) {
    process.stderr.write(`warning: installed SDK is ${pkgVersion}, expected 4.0.0\n`);
  }
  const t0 = process.hrtime.bigint();
  const rounds = {};
  for (const row of opts.rows) {
    if (row === "memory") continue;
    rounds[row] = benchRow(row, opts).map((x) => Math.round(x * 100) / 100);
  }
  const mem = opts.rows.includes("memory") ? measureMemory(opts) : null;
  process.stderr.write(
    `total ${(Number(process.hrtime.bigint() - t0) / 1e9).toFixed(1)} s (sink ${sink & 1})\n`);
  const result = {
    impl: IMPL,
    node: process.version,
    rounds,
    memory_per_session_bytes: mem,
  };
  process.stdout.write(JSON.stringify(result) + "\n");
}

main();
