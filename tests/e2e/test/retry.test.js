'use strict';
// A refused connect is retried on the next backend of the ring (README "How a request is
// handled", step 3): with health checks off (`health_check: {kind: none}`), nothing else can
// steer a request away from a dead backend, so when one is killed every request of its uids
// must still get a 200, from the other backend, with no error in between; the other backend's
// uids stay where they are.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../lib/harness');

const CANDIDATES = Array.from({ length: 60 }, (_, i) => `retry-${i}`);
const PER_BACKEND = 8;
const ROUNDS = 5;

describe('refused connect: retried on the next ring backend', { timeout: 60_000 }, () => {
  let env;
  let A;
  let B;
  let agent;
  let onA;
  let onB;

  before(async () => {
    env = new h.TestEnv('retry');
    A = await env.startBackend();
    B = await env.startBackend();
    agent = await env.startAgent(env.makeConfig({
      port: await h.freePort(), pools: { default: [A.addr, B.addr] }, healthCheck: { kind: 'none' },
    }));
    const picked = await h.pickUids(agent.configFile, [A.addr, B.addr], PER_BACKEND, CANDIDATES);
    onA = picked.get(A.addr);
    onB = picked.get(B.addr);
  });

  after(async () => {
    if (env) await env.close();
  });

  /** GET /whoami for `uid` on a new connection: the port that answered, or the failure. */
  const get = async (uid) => {
    try {
      const r = await h.request(`${agent.url}/whoami`, { agent: false, headers: { cookie: `uid=${uid}` }, timeoutMs: 5000 });
      if (r.status !== 200) return { uid, error: `HTTP ${r.status}: ${r.body.slice(0, 120)}` };
      return { uid, port: JSON.parse(r.body).port };
    } catch (err) {
      return { uid, error: err.message };
    }
  };

  it('every request of a killed backend\'s uids gets 200 from the other one; no error', async () => {
    for (const uid of onA) assert.deepEqual(await get(uid), { uid, port: A.port }, 'before the kill');
    for (const uid of onB) assert.deepEqual(await get(uid), { uid, port: B.port }, 'before the kill');

    await A.proc.kill('SIGKILL');
    // Nothing listens on A's port now: a connect there is refused at once.
    assert.equal(await h.tcpProbe(A.port), false, 'A\'s port still accepts connections');

    const results = [];
    for (let round = 0; round < ROUNDS; round++) {
      // Sequential and in parallel: both must be retried.
      for (const uid of onA) results.push(await get(uid));
      results.push(...await Promise.all([...onA, ...onB].map(get)));
    }
    const errors = results.filter((r) => r.error);
    assert.deepEqual(errors.slice(0, 5), [], `${errors.length} of ${results.length} requests failed after A was killed`);
    for (const r of results) {
      assert.equal(r.port, B.port, `${r.uid} answered by ${r.port}`);
    }
    assert.equal(results.length, ROUNDS * (2 * onA.length + onB.length));
  });
});
