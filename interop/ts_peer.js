#!/usr/bin/env node
// A TypeScript interop peer: one real @microsoft/agent-governance-sdk@4.0.0 MeshClient
// driven by a line-based JSON control protocol (see interop/README.md).
//
//   stdin : one JSON command per line   {"id": 1, "cmd": "send", "to": "did:mesh:...", "payload": {...}}
//   stdout: one JSON object per line    {"id": 1, "ok": true, ...} | {"id": 1, "ok": false, "error": "..."}
//           plus asynchronous events    {"event": "message", "from": ..., "payload": ...}
//   stderr: logs only
//
// Modes (init.mode):
//   "pop"   — npm 4.0.0 plus the servers.md §4.3 shims, through public options only: the connect
//             frame gets the DID proof of possession in `wsFactory`; registration is the POP
//             body + an `Ed25519-Timestamp`-authenticated pre-key upload through an injected
//             `RegistryClient` (loaded by file path: it is not in the package's exports map);
//             `autoRegister: false`.  For AGT core 5.0.0 and the dev relay.
//   "stock" — plain npm 4.0.0 (legacy register body, no POP).  For agentmesh-platform 3.7.0, and
//             to show how it fails against POP-enforcing servers.
"use strict";

const path = require("node:path");
const nodeCrypto = require("node:crypto");
const readline = require("node:readline");

// stdout carries the control protocol only.
console.log = console.error;
console.info = console.error;
console.debug = console.error;

const WebSocket = require("ws");
const { ed25519 } = require("@noble/curves/ed25519.js");
const SDK_DIR = path.dirname(require.resolve("@microsoft/agent-governance-sdk/package.json"));
const { MeshClient, X3DHKeyManager } = require("@microsoft/agent-governance-sdk");
const { RegistryClient, ed25519AuthSigner } = require(path.join(SDK_DIR, "dist/encryption/registry-client.js"));
const SDK_VERSION = require(path.join(SDK_DIR, "package.json")).version;

const HEARTBEAT_MS = 20_000;
const b64 = (u8) => Buffer.from(u8).toString("base64");
const b64u = (u8) => Buffer.from(u8).toString("base64url");
const enc = (s) => new TextEncoder().encode(s);

function log(...args) {
  process.stderr.write(`[ts-peer ${state.name || "?"}] ${args.join(" ")}\n`);
}

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

const state = {
  cfg: null,
  name: "",
  id: null, // {seed, pub, did}
  km: null,
  client: null,
  generation: 0, // bumped by restart; events of older clients are ignored
  attached: null, // resolves at the first frame the relay writes to the newest socket
  inbox: [], // [{from, payload, plaintext}]
  waiters: new Set(),
  errors: [], // onError: {kind, peer, detail}
  disconnects: [], // onDisconnect: {reason, code}
  closes: [], // socket close events: {code, reason}
  relayErrors: [], // {"type":"error"} frames from the relay
  framesIn: {}, // inbound frame type -> count
  knocks: [], // {from, verdict}
  heartbeat: null,
  sent: 0,
  holding: false,
  held: [],
};

function makeIdentity(seedHex) {
  const seed = seedHex ? Uint8Array.from(Buffer.from(seedHex, "hex")) : ed25519.utils.randomSecretKey();
  if (seed.length !== 32) throw new Error("seed must be 32 bytes of hex");
  const pub = ed25519.getPublicKey(seed);
  const did = "did:mesh:" + nodeCrypto.createHash("sha256").update(pub).digest("hex").slice(0, 32);
  return { seed, pub, did };
}

// A `ws` socket that (pop mode) adds the proof of possession to the connect frame, and
// reports what the relay says (error frames, close codes, inbound frame types) to the harness.
function wsFactory(gen) {
  return (url) => {
    const ws = new WebSocket(url);
    // The relay writes nothing to a socket before it has processed its connect frame, so
    // the first frame it sends (the answer to fetch_pending: pending_messages or an error)
    // means the connection is attached; frames routed to us from then on are live.
    let attached;
    state.attached = new Promise((resolve) => (attached = resolve));
    const send = ws.send.bind(ws);
    ws.send = (data, ...rest) => {
      if (state.holding && gen === state.generation) {
        // fault injection (`hold`/`release`): keep outgoing frames until released
        state.held.push(() => ws.send(data, ...rest));
        return undefined;
      }
      if (state.cfg.mode === "pop") {
        const f = JSON.parse(data);
        if (f.type === "connect") {
          const ts = new Date().toISOString();
          Object.assign(f, {
            public_key: b64(state.id.pub),
            timestamp: ts,
            signature: b64(ed25519.sign(enc(ts), state.id.seed)),
          });
          data = JSON.stringify(f);
        }
      }
      return send(data, ...rest);
    };
    ws.addEventListener("message", (ev) => {
      attached();
      if (gen !== state.generation) return;
      let f;
      try {
        f = JSON.parse(String(ev.data));
      } catch {
        return;
      }
      const t = typeof f.type === "string" ? f.type : "?";
      state.framesIn[t] = (state.framesIn[t] || 0) + 1;
      if (t === "error") {
        state.relayErrors.push(String(f.detail));
        emit({ event: "relay_error", detail: f.detail });
      } else if (t === "knock_reject" || t === "knock_accept") {
        emit({ event: t, from: f.from, reason: f.reason ?? null });
      }
    });
    ws.addEventListener("close", (ev) => {
      if (gen !== state.generation) return;
      const c = { code: ev.code, reason: String(ev.reason || "") };
      state.closes.push(c);
      emit({ event: "close", ...c });
    });
    return ws;
  };
}

async function registerPop(cfg, id, km) {
  const ts = new Date().toISOString();
  const pk = b64u(id.pub);
  const proof = ed25519.sign(enc(pk + ts), id.seed);
  const r = await fetch(`${cfg.registry}/v1/agents`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({
      public_key: pk,
      proof: b64u(proof),
      proof_timestamp: ts,
      capabilities: [cfg.name],
      metadata: { display_name: cfg.name, runtime: "node", library: `@microsoft/agent-governance-sdk/${SDK_VERSION}` },
    }),
  });
  const text = await r.text();
  if (r.status !== 201 && r.status !== 200 && r.status !== 409) {
    const err = new Error(`POP register failed: ${r.status} ${text}`);
    err.status = r.status;
    throw err;
  }
  const reg = new RegistryClient({ baseUrl: cfg.registry, authSigner: ed25519AuthSigner(id.did, id.seed) });
  await reg.uploadPrekeys(id.did, km.identityKey.publicKey, km.identityKeyEd, km.generateSignedPreKey(),
    km.generateOneTimePreKeys(cfg.otks ?? 20));
  return { reg, status: r.status };
}

function newClient(reg, km) {
  const cfg = state.cfg;
  const gen = ++state.generation;
  state.km = km;
  const opts = {
    relayUrl: cfg.relay,
    keyManager: state.km,
    agentDid: state.id.did,
    displayName: cfg.name,
    autoReconnect: cfg.auto_reconnect ?? true,
    reconnectBaseDelayMs: cfg.reconnect_base_ms ?? 1000,
    wsFactory: wsFactory(gen),
  };
  if (cfg.mode === "pop") {
    Object.assign(opts, { registryClient: reg, autoRegister: false });
  } else {
    Object.assign(opts, { registryUrl: cfg.registry, oneTimePrekeyCount: cfg.otks ?? 20 });
  }
  const c = new MeshClient(opts);
  c.onMessage((from, payload, plaintext) => {
    if (gen !== state.generation) return;
    state.inbox.push({ from, payload, plaintext });
    emit({ event: "message", from, payload, plaintext });
    for (const w of [...state.waiters]) w();
  });
  c.onError((kind, peer, detail) => {
    if (gen !== state.generation) return;
    const e = { kind, peer: peer ?? null, detail: String(detail) };
    state.errors.push(e);
    emit({ event: "error", ...e });
  });
  c.onDisconnect((reason, code) => {
    if (gen !== state.generation) return;
    state.disconnects.push({ reason, code: code ?? null });
    emit({ event: "disconnect", reason, code: code ?? null });
  });
  c.onE2EVerified((peer, first) => {
    if (gen !== state.generation) return;
    emit({ event: "e2e_verified", peer, first });
  });
  c.onKnock(async (from, intent) => {
    const verdict = !state.cfg.reject_knocks;
    state.knocks.push({ from, verdict });
    emit({ event: "knock", from, intent, verdict });
    return verdict;
  });
  return c;
}

function startHeartbeat() {
  stopHeartbeat();
  state.heartbeat = setInterval(() => {
    try {
      if (state.client) state.client.sendHeartbeat();
    } catch (err) {
      log("heartbeat failed:", err);
    }
  }, HEARTBEAT_MS);
}

function stopHeartbeat() {
  if (state.heartbeat) clearInterval(state.heartbeat);
  state.heartbeat = null;
}

async function connectFresh() {
  // Build a MeshClient (registering first in pop mode) and connect it.
  // A new key manager each time: its pre-keys (and every session) die with the client.
  const km = new X3DHKeyManager(state.id.seed, state.id.pub);
  let reg = null;
  let status = null;
  if (state.cfg.mode === "pop") {
    ({ reg, status } = await registerPop(state.cfg, state.id, km));
  }
  state.client = newClient(reg, km);
  await state.client.connect();
  await whenAttached();
  startHeartbeat();
  return { register_status: status };
}

// `connect()` resolves when the socket opens, before the relay has attached it: a frame
// routed to us in that window is stored (and KNOCKs stored for a TypeScript peer, which never
// acks them, come back after every restart). Wait for the relay's first frame, briefly.
async function whenAttached() {
  const wait = state.attached;
  if (!wait) return;
  await Promise.race([wait, new Promise((resolve) => setTimeout(resolve, 5000))]);
}

function take(from, n) {
  const out = [];
  for (let i = 0; i < state.inbox.length && out.length < n; ) {
    if (from == null || state.inbox[i].from === from) {
      out.push(state.inbox.splice(i, 1)[0]);
    } else {
      i++;
    }
  }
  return out;
}

function countFrom(from) {
  return state.inbox.filter((m) => from == null || m.from === from).length;
}

function waitUntil(pred, timeoutMs) {
  return new Promise((resolve) => {
    if (pred()) return resolve(true);
    const done = (v) => {
      state.waiters.delete(check);
      clearTimeout(timer);
      resolve(v);
    };
    const check = () => {
      if (pred()) done(true);
    };
    const timer = setTimeout(() => done(pred()), timeoutMs);
    state.waiters.add(check);
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const commands = {
  async init(a) {
    if (!a.relay || !a.registry) throw new Error("init needs relay and registry");
    if (a.mode !== "pop" && a.mode !== "stock") throw new Error("mode must be pop or stock");
    if (state.client) await commands.quit_client();
    state.cfg = { ...a, name: a.name || "ts-peer" };
    state.name = state.cfg.name;
    state.id = makeIdentity(a.seed);
    return { did: state.id.did, public_key: b64(state.id.pub), sdk: `@microsoft/agent-governance-sdk@${SDK_VERSION}`, mode: a.mode };
  },

  async connect() {
    if (!state.cfg) throw new Error("init first");
    if (!state.client) {
      const r = await connectFresh();
      return { connected: state.client.isConnected, ...r };
    }
    await state.client.connect();
    await whenAttached();
    startHeartbeat();
    return { connected: state.client.isConnected };
  },

  async send(a) {
    const c = state.client;
    if (!c) throw new Error("not connected");
    let established = false;
    if (!c.getSession(a.to)) {
      await c.establishSessionWithPeer(a.to);
      established = true;
    }
    await c.send(a.to, a.payload);
    state.sent++;
    return { established };
  },

  async expect(a) {
    const n = a.count ?? 1;
    const ok = await waitUntil(() => countFrom(a.from) >= n, (a.within ?? 10) * 1000);
    if (!ok) {
      const got = state.inbox.filter((m) => a.from == null || m.from === a.from).map((m) => m.payload);
      const err = new Error(`timeout: ${got.length}/${n} messages from ${a.from ?? "anyone"}`);
      err.extra = { got };
      throw err;
    }
    return { payloads: take(a.from, n).map((m) => m.payload) };
  },

  async drain(a) {
    if (a.wait) await sleep(a.wait * 1000);
    return { payloads: take(a.from, Infinity).map((m) => m.payload) };
  },

  async disconnect() {
    stopHeartbeat();
    if (state.client) await state.client.disconnect();
    return {};
  },

  async restart(a) {
    // A process restart: the MeshClient and every session, ratchet, pre-key and buffer are gone.
    stopHeartbeat();
    if (state.client) {
      try {
        await state.client.disconnect();
      } catch (err) {
        log("disconnect during restart:", err);
      }
    }
    state.client = null;
    if (a && a.pause) await sleep(a.pause * 1000);
    const r = await connectFresh();
    return { connected: state.client.isConnected, ...r };
  },

  async hold() {
    state.holding = true;
    return {};
  },

  async release() {
    state.holding = false;
    const held = state.held.splice(0);
    for (const send of held) send();
    return { released: held.length };
  },

  async heartbeat() {
    if (state.client) state.client.sendHeartbeat();
    return {};
  },

  async session(a) {
    const s = state.client ? state.client.getSession(a.peer) : undefined;
    return { exists: !!s, encrypted: !!(s && s.channel), message_count: s ? s.messageCount : 0 };
  },

  async report() {
    const c = state.client;
    return {
      did: state.id ? state.id.did : null,
      connected: !!(c && c.isConnected),
      sessions: c ? [...c.sessions.keys()] : [],
      errors: state.errors,
      disconnects: state.disconnects,
      closes: state.closes,
      relay_errors: state.relayErrors,
      frames_in: state.framesIn,
      knocks: state.knocks,
      inbox: state.inbox.length,
      sent: state.sent,
      durable: false,
    };
  },

  async quit_client() {
    stopHeartbeat();
    if (state.client) {
      try {
        await state.client.disconnect();
      } catch (err) {
        log("disconnect:", err);
      }
    }
    state.client = null;
    state.generation++;
    return {};
  },

  async quit() {
    await commands.quit_client();
    setTimeout(() => process.exit(0), 20);
    return {};
  },
};

async function handle(line) {
  let msg;
  try {
    msg = JSON.parse(line);
  } catch (err) {
    emit({ id: null, ok: false, error: `bad JSON: ${err.message}` });
    return;
  }
  const { id, cmd } = msg;
  const fn = commands[cmd];
  if (!fn) {
    emit({ id, ok: false, error: `unknown command ${cmd}` });
    return;
  }
  try {
    const out = await fn(msg);
    emit({ id, ok: true, ...out });
  } catch (err) {
    const reply = { id, ok: false, error: err instanceof Error ? `${err.name}: ${err.message}` : String(err) };
    if (err && err.status !== undefined) reply.status = err.status;
    if (err && err.body !== undefined) reply.body = String(err.body).slice(0, 2000);
    if (err && err.extra) Object.assign(reply, err.extra);
    emit(reply);
  }
}

process.on("unhandledRejection", (err) => log("unhandled rejection:", err && err.stack ? err.stack : err));
const rl = readline.createInterface({ input: process.stdin });
rl.on("line", (line) => {
  if (line.trim()) void handle(line);
});
rl.on("close", () => {
  void commands.quit_client().finally(() => process.exit(0));
});
