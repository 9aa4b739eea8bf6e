'use strict';
// Scenario 6: an idle raw WebSocket through the agent lives for 90 s. The backend's engine.io
// pingInterval is 200 s, so nothing at all flows for 90 s; then a Socket.IO event with an ack is
// sent and the reply must arrive on the same, never-closed connection.
// GOPUSH_E2E_IDLE_MS overrides the idle time (default 90000) for quick local runs.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const WebSocket = require('ws');
const h = require('../lib/harness');

const IDLE_MS = Number(process.env.GOPUSH_E2E_IDLE_MS || 90_000);

describe('idle raw WebSocket through the agent', { timeout: IDLE_MS + 60_000 }, () => {
  let s;

  before(async () => {
    s = await h.startStandard('idle', { backend: { pingInterval: 200_000 } });
  });

  after(async () => {
    if (s) await s.env.close();
  });

  it(`survives ${IDLE_MS / 1000} s without any traffic`, async (t) => {
    const url = `ws://127.0.0.1:${s.agent.port}/socket.io/?EIO=4&transport=websocket&uid=idle1`;
    const ws = new WebSocket(url, { perMessageDeflate: false });
    const frames = [];
    const waiters = [];
    let closed = null;
    const wake = () => { for (const w of waiters.splice(0)) w(); };
    ws.on('message', (data) => { frames.push(String(data)); wake(); });
    ws.on('close', (code, reason) => { closed = { code, reason: String(reason), at: Date.now() }; wake(); });
    ws.on('error', (err) => { closed = closed || { error: err.message, at: Date.now() }; wake(); });
    // ws answers protocol-level pings automatically; record them to prove the link stayed silent
    let wsPings = 0;
    ws.on('ping', () => { wsPings++; });

    /** Waits (bounded) for a frame matching `re`, failing early if the socket closes. */
    const nextFrame = (re, ms, what) => withDeadline(ms, what, () => {
      const i = frames.findIndex((f) => re.test(f));
      if (i >= 0) return frames.splice(i, 1)[0];
      if (closed) throw new Error(`websocket closed while waiting for ${what}: ${JSON.stringify(closed)}`);
      return undefined;
    });
    const withDeadline = (ms, what, check) => new Promise((resolve, reject) => {
      const timer = setTimeout(() => { done(); reject(new Error(`timeout after ${ms} ms waiting for ${what}; frames: ${JSON.stringify(frames)}`)); }, ms);
      const done = () => clearTimeout(timer);
      const tick = () => {
        try {
          const v = check();
          if (v !== undefined) { done(); resolve(v); return; }
        } catch (err) { done(); reject(err); return; }
        waiters.push(tick);
      };
      tick();
    });

    try {
      await h.withTimeout(new Promise((resolve, reject) => {
        ws.once('open', resolve);
        ws.once('unexpected-response', (req, res) => reject(new Error(`websocket upgrade refused: HTTP ${res.statusCode}`)));
        ws.once('error', reject);
      }), 5000, `websocket open ${url}`);

      const open = await nextFrame(/^0\{/, 5000, 'engine.io open packet');
      const info = JSON.parse(open.slice(1));
      assert.equal(info.pingInterval, 200_000, 'backend should use the large pingInterval');

      ws.send('40'); // socket.io CONNECT to namespace "/"
      await nextFrame(/^40\{/, 5000, 'socket.io CONNECT ack');
      const hello = JSON.parse((await nextFrame(/^42\["hello"/, 5000, 'hello event')).slice(2))[1];
      assert.equal(hello.uid, 'idle1');
      assert.ok([s.A.port, s.B.port].includes(hello.port));
      frames.length = 0; // drop the `port` event

      // --- idle: no frame in either direction; fail early if the connection closes
      const idleStart = Date.now();
      await new Promise((resolve, reject) => {
        const timer = setTimeout(resolve, IDLE_MS);
        waiters.push(function onWake() {
          if (closed) {
            clearTimeout(timer);
            reject(new Error(`websocket closed after ${((closed.at - idleStart) / 1000).toFixed(1)} s idle: ${JSON.stringify(closed)}`));
          } else {
            waiters.push(onWake);
          }
        });
      });
      assert.deepEqual(frames, [], 'no traffic was expected during the idle period');
      assert.equal(closed, null);

      // --- after the idle period: an event with an ack must round-trip
      ws.send('421["echo","after-idle"]');
      const reply = await nextFrame(/^431/, 5000, 'ack of echo after the idle period');
      assert.equal(reply, '431["after-idle"]');
      ws.send('422["whoami"]');
      const me = JSON.parse((await nextFrame(/^432/, 5000, 'ack of whoami')).slice(3))[0];
      assert.equal(me.port, hello.port, 'still on the same backend');
      assert.equal(me.sid, info.sid, 'still the same engine.io session');
      assert.equal(closed, null, 'the socket must never have closed');
      // a proxy-level keep-alive is allowed; just report it
      t.diagnostic(`WebSocket ping frames received from the agent while idle: ${wsPings}`);
    } finally {
      ws.terminate();
    }
  });
});
