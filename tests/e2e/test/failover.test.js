'use strict';
// Scenario 5: failover and recovery. Backend A is SIGKILLed: once the agent's health check notices,
// A's uids connect to B while B's uids stay on B. A restarts on the same port: A's uids go back
// to A, and a polling-only session created on B during the outage keeps working (the agent
// remembers sid -> backend even though the ring now says A for its uid).

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../lib/harness');

const CANDIDATES = ['alice', 'bob', 'carol', 'dave', 'erin', 'frank', 'grace', 'heidi', 'ivan', 'judy',
  'user-1', 'user-2', 'user-3', 'user-4', 'user-5', 'user-6', 'user-7', 'user-8', 'user-9', 'user-10'];

describe('failover and recovery', { timeout: 90_000 }, () => {
  let s;
  let uidsA;
  let uidsB;

  before(async () => {
    s = await h.startStandard('failover', { healthCheck: { kind: 'tcp', interval: '200ms' } });
    const picked = await h.pickUids(s.agent.configFile, [s.A.addr, s.B.addr], 3, CANDIDATES);
    uidsA = picked.get(s.A.addr);
    uidsB = picked.get(s.B.addr);
  });

  after(async () => {
    if (s) await s.env.close();
  });

  const landOn = async (uid, opts = {}) => {
    const { socket, hello } = await s.env.connect(s.agent.url, {
      transports: ['polling'], extraHeaders: { cookie: `uid=${uid}` }, ...opts,
    }, { timeoutMs: 3000 });
    socket.close();
    return hello.port;
  };

  it('kill A, recover A, with a polling session surviving the ring change', async () => {
    // healthy: the ring's placement
    for (const uid of uidsA) assert.equal(await landOn(uid), s.A.port, `${uid} before the outage`);
    for (const uid of uidsB) assert.equal(await landOn(uid), s.B.port, `${uid} before the outage`);

    // outage
    const aPort = s.A.port;
    await s.A.proc.kill('SIGKILL');
    assert.equal(await h.tcpProbe(aPort), false, 'A should be down');
    await h.poll(async () => (await landOn(uidsA[0])) === s.B.port, {
      attempts: 40, delayMs: 100, maxDelayMs: 300, what: `${uidsA[0]} (an A uid) to be served by B after A died`,
    });
    for (const uid of uidsA) {
      for (const transports of [['polling'], ['websocket']]) {
        assert.equal(await landOn(uid, { transports }), s.B.port, `${uid} (${transports}) during the outage`);
      }
    }
    for (const uid of uidsB) assert.equal(await landOn(uid), s.B.port, `${uid} during the outage`);

    // a polling-only session for an A uid, created during the outage: it lives on B
    const { socket: session, hello } = await s.env.connect(s.agent.url, {
      transports: ['polling'], extraHeaders: { cookie: `uid=${uidsA[1]}` },
    });
    assert.equal(hello.port, s.B.port, 'outage session should be on B');
    let disconnected = null;
    session.on('disconnect', (reason) => { disconnected = reason; });

    // recovery
    const A2 = await s.env.startBackend({ port: aPort });
    assert.equal(A2.port, aPort);
    await h.poll(async () => (await landOn(uidsA[0])) === aPort, {
      attempts: 40, delayMs: 100, maxDelayMs: 300, what: `${uidsA[0]} to return to A after A restarted`,
    });
    for (const uid of uidsA) assert.equal(await landOn(uid), aPort, `${uid} after recovery`);
    for (const uid of uidsB) assert.equal(await landOn(uid), s.B.port, `${uid} after recovery`);

    // the outage session keeps working on B for >= 3 s of polling cycles
    const ticks = [];
    session.on('tick', (t) => ticks.push(t));
    const started = await h.emitAck(session, 'ticks', { count: 16, every: 200 });
    assert.equal(started.port, s.B.port);
    const t0 = Date.now();
    let n = 0;
    while (Date.now() - t0 < 3500) {
      const echo = await h.emitAck(session, 'echo', { n }, 2000);
      assert.deepEqual(echo, { n }, 'echo through the outage session');
      n++;
      await h.delay(250); // pacing of the client's own traffic, not a synchronisation
    }
    await h.poll(() => ticks.length >= 16, { attempts: 20, delayMs: 100, maxDelayMs: 200, what: '16 ticks' });
    assert.ok(ticks.every((t) => t.port === s.B.port), 'ticks should come from B');
    assert.deepEqual(ticks.map((t) => t.n), Array.from({ length: 16 }, (_, i) => i), 'no tick lost');
    const me = await h.emitAck(session, 'whoami');
    assert.equal(me.port, s.B.port);
    assert.equal(me.sid, hello.sid, 'same engine.io session');
    assert.equal(disconnected, null, `outage session was disconnected: ${disconnected}`);
    assert.equal(session.connected, true);
    session.close();
  });
});
