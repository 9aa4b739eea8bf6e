'use strict';
// The limits answer with the documented status and a body naming the limit (README "Limits"),
// end to end, under parallel requests, and only the offender is refused:
//   limits.per_ip.requests_per_second   429, another client address unaffected
//   limits.per_uid.requests_per_second  429, another uid (same address) unaffected
//   limits.max_tunnels                  503 for one WebSocket more, plain requests unaffected
// (limits.max_header_bytes: 431, in faults.test.js "a 2 MB request header ...".)
//
// Rates are counted per one-second window: a burst of BURST parallel requests can straddle two
// windows, so at most 2 x RATE of them pass, and at least BURST - 2 x RATE are refused.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const http = require('node:http');
const WebSocket = require('ws');
const h = require('../lib/harness');

const RATE = 5;
const BURST = 40;

/** GET /whoami on a new connection from `localAddress`: {status, body}. */
function get(url, { uid, localAddress = '127.0.0.1' }) {
  return new Promise((resolve, reject) => {
    const req = http.get(`${url}/whoami`, { agent: false, localAddress, headers: { cookie: `uid=${uid}` } }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode, body: Buffer.concat(chunks).toString('utf8') }));
      res.on('error', reject);
    });
    req.setTimeout(5000, () => req.destroy(new Error('timeout')));
    req.on('error', reject);
  });
}

/** Opens an Engine.IO WebSocket through `agentUrl` as cookie uid `uid`: resolves {ws} once open,
 * or {status, body} if the upgrade was refused. */
function openTunnel(agentUrl, uid) {
  const wsUrl = `${agentUrl.replace(/^http/, 'ws')}/socket.io/?EIO=4&transport=websocket`;
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(wsUrl, { headers: { cookie: `uid=${uid}` }, perMessageDeflate: false });
    const timer = setTimeout(() => { ws.terminate(); reject(new Error(`${uid}: no answer to the upgrade`)); }, 5000);
    ws.on('open', () => { clearTimeout(timer); resolve({ ws }); });
    ws.on('unexpected-response', (req, res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => { clearTimeout(timer); resolve({ status: res.statusCode, body: Buffer.concat(chunks).toString('utf8') }); });
    });
    ws.on('error', (err) => { clearTimeout(timer); reject(err); });
  });
}

/** Tallies statuses; every refusal must be `status` with a body naming `key`. */
function tally(results, status, key) {
  const by = {};
  for (const r of results) {
    by[r.status] = (by[r.status] || 0) + 1;
    if (r.status !== 200) {
      assert.equal(r.status, status, `unexpected ${r.status}: ${r.body}`);
      assert.ok(r.body.includes(key), `the ${status} body does not name ${key}: ${JSON.stringify(r.body)}`);
    }
  }
  return by;
}

describe('limits: documented status, body naming the limit, only the offender refused', { timeout: 60_000 }, () => {
  let env;
  let A;
  let B;

  before(async () => {
    env = new h.TestEnv('limits');
    A = await env.startBackend();
    B = await env.startBackend();
  });

  after(async () => {
    if (env) await env.close();
  });

  const agentWith = async (limits) => {
    const cfg = env.makeConfig({ port: await h.freePort(), pools: { default: [A.addr, B.addr] } });
    cfg.limits = limits;
    return env.startAgent(cfg);
  };

  it('limits.per_ip.requests_per_second: 429 naming it; another address is unaffected', async () => {
    const agent = await agentWith({ per_ip: { requests_per_second: RATE, max_concurrent: 0 } });
    const burst = Array.from({ length: BURST }, (_, i) => get(agent.url, { uid: `ip-${i}`, localAddress: '127.0.0.1' }));
    // Meanwhile, a few requests from another loopback address (its own budget).
    const other = Array.from({ length: RATE - 1 }, (_, i) => get(agent.url, { uid: `other-${i}`, localAddress: '127.0.0.2' }));
    const by = tally(await Promise.all(burst), 429, 'limits.per_ip.requests_per_second');
    assert.ok((by[200] || 0) >= 1 && (by[200] || 0) <= 2 * RATE, `${JSON.stringify(by)}: ${2 * RATE} at most may pass`);
    assert.ok((by[429] || 0) >= BURST - 2 * RATE, `${JSON.stringify(by)}: the excess was not refused`);
    const otherBy = tally(await Promise.all(other), 429, 'limits.per_ip.requests_per_second');
    assert.deepEqual(otherBy, { 200: RATE - 1 }, 'another client address was refused');
  });

  it('limits.per_uid.requests_per_second: 429 naming it; another uid is unaffected', async () => {
    const agent = await agentWith({ per_uid: { requests_per_second: RATE, max_concurrent: 0 } });
    const burst = Array.from({ length: BURST }, () => get(agent.url, { uid: 'hot' }));
    const other = Array.from({ length: RATE - 1 }, () => get(agent.url, { uid: 'calm' }));
    const by = tally(await Promise.all(burst), 429, 'limits.per_uid.requests_per_second');
    assert.ok((by[200] || 0) >= 1 && (by[200] || 0) <= 2 * RATE, `${JSON.stringify(by)}: ${2 * RATE} at most may pass`);
    assert.ok((by[429] || 0) >= BURST - 2 * RATE, `${JSON.stringify(by)}: the excess was not refused`);
    assert.deepEqual(tally(await Promise.all(other), 429, 'limits.per_uid.requests_per_second'), { 200: RATE - 1 },
      'another uid was refused');
  });

  it('limits.per_uid.max_concurrent counts the canonical uid: bob, bob, b%6Fb is three of one user', async () => {
    const agent = await agentWith({ per_uid: { requests_per_second: 0, max_concurrent: 2 } });
    // A tunnel holds its concurrency slot while it is open.
    const open = (uid) => openTunnel(agent.url, uid);
    const held = [];
    try {
      for (const spelling of ['bob', 'bob']) {
        const t = await open(spelling);
        assert.ok(t.ws, `${spelling} refused: ${t.status} ${t.body}`);
        held.push(t.ws);
      }
      const third = await open('b%6Fb');
      if (third.ws) held.push(third.ws);
      assert.equal(third.status, 429, `b%6Fb is bob's third connection: ${third.ws ? 'admitted' : third.body}`);
      assert.match(third.body, /limits\.per_uid\.max_concurrent/);
      const other = await open('alice');
      if (other.ws) held.push(other.ws);
      assert.ok(other.ws, `another uid was refused: ${other.status} ${other.body}`);
    } finally {
      for (const ws of held) ws.terminate();
    }
  });

  it('limits.max_tunnels: one WebSocket more gets 503 naming it; plain requests are unaffected', async () => {
    const MAX = 3;
    const agent = await agentWith({ max_tunnels: MAX });
    const open = (uid) => openTunnel(agent.url, uid);
    const tunnels = [];
    try {
      for (let i = 0; i < MAX; i++) {
        const t = await open(`t-${i}`);
        assert.ok(t.ws, `tunnel ${i} of ${MAX} refused: ${t.status} ${t.body}`);
        tunnels.push(t.ws);
      }
      const over = await open('t-over');
      if (over.ws) tunnels.push(over.ws);
      assert.equal(over.status, 503, `tunnel ${MAX + 1} with limits.max_tunnels ${MAX}: ${over.ws ? 'opened' : over.body}`);
      assert.match(over.body, /limits\.max_tunnels/);
      const plain = await get(agent.url, { uid: 't-plain' });
      assert.equal(plain.status, 200, `a plain request while the tunnels are full: ${plain.body}`);
      // A tunnel closes: its slot is free again (polled: the close reaches the agent a moment later).
      tunnels.shift().close();
      const again = await h.poll(async () => {
        const t = await open('t-again');
        return t.ws ? t.ws : false;
      }, { attempts: 40, what: 'a tunnel slot to be free after a close' });
      tunnels.push(again);
    } finally {
      for (const ws of tunnels) ws.terminate();
    }
  });
});
