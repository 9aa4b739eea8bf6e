'use strict';
// Stop signals (README "What happens to connections"):
//   SIGTERM  the listeners close at once; an in-flight request (a held long-poll) finishes within
//            grace_period_seconds; WebSocket tunnels are closed with 1001; the process exits 0.
//   SIGINT   stops at once: no grace period, the held long-poll is cut.
// Each is checked on its own agent; no SIGKILL fallback counts as a stop.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../lib/harness');

const PING_INTERVAL_MS = 2000;

describe('stop signals', { timeout: 90_000 }, () => {
  let env;
  let A;

  before(async () => {
    env = new h.TestEnv('signals');
    A = await env.startBackend({ pingInterval: PING_INTERVAL_MS, pingTimeout: 5000 });
  });

  after(async () => {
    if (env) await env.close();
  });

  const agentWithGrace = async (seconds, backend = A) => {
    const cfg = env.makeConfig({ port: await h.freePort(), pools: { default: [backend.addr] } });
    cfg.server.grace_period_seconds = seconds;
    cfg.server.graceful_shutdown_timeout_seconds = 1;
    return env.startAgent(cfg);
  };

  /** A polling client whose next GET is held by the backend until its ping (<= 2 s). */
  const heldPoll = async (agent, uid) => {
    const { socket } = await env.connect(agent.url, { transports: ['polling'], query: { uid } });
    const c = { socket, pings: [], disconnects: [] };
    socket.io.engine.on('ping', () => c.pings.push(performance.now()));
    socket.on('disconnect', (reason) => c.disconnects.push({ reason, at: performance.now() }));
    assert.deepEqual(await h.emitAck(socket, 'echo', uid, 5000), uid);
    return c;
  };

  it('SIGTERM: listeners close at once, the held long-poll finishes, tunnels get 1001, exit 0', async () => {
    const GRACE_S = 4;
    const agent = await agentWithGrace(GRACE_S);
    const poll = await heldPoll(agent, 'term-poll');
    const raws = await Promise.all([0, 1, 2].map((i) => h.rawEngineIo(agent.url, `term-ws-${i}`)));
    const termAt = performance.now();
    const termWall = Date.now();
    process.kill(agent.proc.pid, 'SIGTERM');
    // The listening socket is closed at once: new connections are refused.
    await h.poll(async () => !(await h.tcpProbe(agent.port)), { attempts: 20, delayMs: 50, maxDelayMs: 100,
      what: 'the listen port to refuse connections after SIGTERM' });
    const exit = await h.withTimeout(agent.proc.exitPromise, (GRACE_S + 1 + 5) * 1000, 'the agent to exit after SIGTERM');
    const exitMs = Math.round(performance.now() - termAt);
    assert.deepEqual(exit, { code: 0, signal: null }, `exit after SIGTERM: ${agent.proc.tail()}`);
    // The poll that was held at SIGTERM was answered (with the backend's ping), not cut.
    const pinged = poll.pings.filter((t) => t > termAt);
    assert.ok(pinged.length >= 1, `the held long-poll did not finish (pings ${poll.pings.length}, disconnects ${JSON.stringify(poll.disconnects)})`);
    assert.ok(pinged[0] - termAt <= PING_INTERVAL_MS + 1000, `the held long-poll finished ${Math.round(pinged[0] - termAt)} ms after SIGTERM`);
    for (const r of raws) {
      assert.equal(r.closeCode, 1001, `${r.uid}: closed with ${r.closeCode}, not 1001 (going away)`);
    }
    process.stdout.write(`# signals: SIGTERM: held poll answered ${Math.round(pinged[0] - termAt)} ms after the signal, `
      + `tunnels closed 1001 at ${raws.map((r) => Math.round(r.closedAt - termWall)).join('/')} ms, exit 0 after ${exitMs} ms (grace ${GRACE_S} s)\n`);
  });

  it('SIGINT: stops at once; the held long-poll is cut', async () => {
    const GRACE_S = 20;
    // A backend that holds an idle poll for 25 s: nothing but the stop can end it during the test.
    const slow = await env.startBackend({ pingInterval: 25_000, pingTimeout: 5000 });
    const agent = await agentWithGrace(GRACE_S, slow);
    const poll = await heldPoll(agent, 'int-poll');
    const intAt = performance.now();
    process.kill(agent.proc.pid, 'SIGINT');
    const exit = await h.withTimeout(agent.proc.exitPromise, 10_000, 'the agent to exit after SIGINT');
    const exitMs = Math.round(performance.now() - intAt);
    assert.equal(exit.signal, null, `killed by a signal: ${JSON.stringify(exit)}`);
    // "At once": far inside the 20 s grace period a SIGTERM would grant.
    assert.ok(exitMs < 3000, `exited ${exitMs} ms after SIGINT (grace_period_seconds ${GRACE_S})`);
    await h.poll(() => poll.disconnects.length >= 1, { attempts: 40, what: 'the polling client to notice' });
    assert.deepEqual(poll.pings, [], 'the held long-poll was answered, not cut');
    process.stdout.write(`# signals: SIGINT: exit ${JSON.stringify(exit)} after ${exitMs} ms; polling client: ${poll.disconnects[0].reason}\n`);
  });
});
