'use strict';
// Hot reload (SIGHUP): a backend is added, then one is removed, while clients are connected.
// Only uids whose ring answer changes move, and only for new sessions: live polling sessions keep
// their backend (sid memory), and an invalid configuration is refused while the agent keeps
// serving with the running one.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const h = require('../lib/harness');
const ketama = require('../lib/ketama');

const UIDS = Array.from({ length: 60 }, (_, i) => `reload-${i}`);

describe('hot reload', { timeout: 120_000 }, () => {
  let s;
  let C;

  before(async () => {
    s = await h.startStandard('reload');
    C = await s.env.startBackend();
  });

  after(async () => {
    if (s) await s.env.close();
  });

  const landOn = async (uid) => {
    const r = await h.httpGet(`${s.agent.url}/whoami`, { headers: { cookie: `uid=${uid}` } });
    assert.equal(r.status, 200, `GET /whoami for ${uid}: ${r.status} ${r.body}`);
    return `127.0.0.1:${JSON.parse(r.body).port}`;
  };

  /**
   * Writes `backends` as pool default into a scratch file; returns the route map for UIDS, decided
   * offline (the running agent, which the CLI would otherwise ask, does not run this file yet).
   */
  const expectedWith = async (backends, file) => {
    const cfg = structuredClone(s.cfg);
    cfg.pools.default.backends = backends;
    const f = s.env.writeConfig(cfg, file);
    return { cfg, map: await h.routeMap(f, UIDS, undefined, { offline: true }) };
  };

  /** Replaces the agent's config file and sends SIGHUP; waits for the reload log line. */
  const reloadWith = async (cfg) => {
    const marks = (s.agent.proc.out.match(/configuration reloaded|reload refused/g) || []).length;
    fs.writeFileSync(s.agent.configFile, h.toYaml(cfg));
    process.kill(s.agent.proc.pid, 'SIGHUP');
    await h.poll(async () => (s.agent.proc.out.match(/configuration reloaded|reload refused/g) || []).length > marks,
      { attempts: 50, delayMs: 50, maxDelayMs: 200, what: 'the agent to log the reload outcome' });
  };

  /** The ring answer for every uid of UIDS by the reference model (lib/ketama.js, nginx's Ketama). */
  const modelMap = (backends) => {
    const c = ketama.buildContinuum(backends);
    return new Map(UIDS.map((u) => [u, ketama.lookup(c, u)]));
  };

  it('adds and removes backends without a restart; exactly the uids whose ring answer changes move; live sessions stay', async () => {
    const two = await h.routeMap(s.agent.configFile, UIDS);
    // The ports are random, so how many uids move is too: the reference model says exactly which.
    assert.deepEqual(two, modelMap([s.A.addr, s.B.addr]), '`gopush route` with A, B vs the Ketama model');
    for (const uid of UIDS.slice(0, 20)) assert.equal(await landOn(uid), two.get(uid), `${uid} before reload`);

    const add = await expectedWith([s.A.addr, s.B.addr, C.addr], 'three.yaml');
    assert.deepEqual(add.map, modelMap([s.A.addr, s.B.addr, C.addr]), '`gopush route` with A, B, C vs the Ketama model');
    const movers = UIDS.filter((u) => add.map.get(u) !== two.get(u));
    // Consistent hashing: every mover goes to the new backend; the others keep theirs.
    for (const u of movers) assert.equal(add.map.get(u), C.addr, `${u} moved, but not to the new backend`);
    assert.ok(movers.length > 0, `no uid of ${UIDS.length} moves to C: the test would prove nothing`);

    // A live polling session for a uid that will move.
    const mover = movers[0];
    const { socket: live, hello } = await s.env.connect(s.agent.url, {
      transports: ['polling'], extraHeaders: { cookie: `uid=${mover}` },
    });
    assert.equal(`127.0.0.1:${hello.port}`, two.get(mover));
    const sid = live.io.engine.id;

    await reloadWith(add.cfg);
    assert.match(s.agent.proc.out, /configuration reloaded/);
    for (const uid of UIDS) assert.equal(await landOn(uid), add.map.get(uid), `${uid} after adding C`);
    // The live session still reaches its backend (it would get "Session ID unknown" on C).
    for (let i = 0; i < 3; i++) {
      const echoed = await h.emitAck(live, 'echo', { i });
      assert.deepEqual(echoed, { i });
    }
    assert.equal(live.connected, true);
    assert.equal(live.io.engine.id, sid, 'the session was not re-created');

    // Remove A: only A's uids move.
    const drop = await expectedWith([s.B.addr, C.addr], 'two-bc.yaml');
    assert.deepEqual(drop.map, modelMap([s.B.addr, C.addr]), '`gopush route` with B, C vs the Ketama model');
    for (const uid of UIDS) {
      if (add.map.get(uid) !== s.A.addr) assert.equal(drop.map.get(uid), add.map.get(uid), `${uid} moved off a kept backend`);
    }
    await reloadWith(drop.cfg);
    for (const uid of UIDS) assert.equal(await landOn(uid), drop.map.get(uid), `${uid} after removing A`);
    live.close();
  });

  it('refuses an invalid configuration and keeps serving with the running one', async () => {
    const before = await h.routeMap(s.agent.configFile, UIDS.slice(0, 10));
    const good = fs.readFileSync(s.agent.configFile, 'utf8');
    const marks = (s.agent.proc.out.match(/reload refused/g) || []).length;
    fs.writeFileSync(s.agent.configFile, `${good}\nbogus_key: 1\n`);
    process.kill(s.agent.proc.pid, 'SIGHUP');
    await h.poll(async () => (s.agent.proc.out.match(/reload refused/g) || []).length > marks,
      { attempts: 50, delayMs: 50, maxDelayMs: 200, what: 'the agent to refuse the reload' });
    assert.match(s.agent.proc.out, new RegExp(`${path.basename(s.agent.configFile).replace('.', '\\.')}:\\d+:\\d+: bogus_key`));
    fs.writeFileSync(s.agent.configFile, good);
    for (const uid of UIDS.slice(0, 10)) assert.equal(await landOn(uid), before.get(uid), `${uid} after a refused reload`);
  });
});
