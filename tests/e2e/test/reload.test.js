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
   * from the file (the running agent does not run this file yet).
   */
  const expectedWith = async (backends, file) => {
    const cfg = structuredClone(s.cfg);
    cfg.pools.default.backends = backends;
    const f = s.env.writeConfig(cfg, file);
    return { cfg, map: await h.routeMap(f, UIDS) };
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

// Reload with WebSockets open (issue 15, claim 5). A reload swaps the routing, the pools and the
// hooks under running tunnels: they must stay open. The health registry is kept when
// `health_check` is unchanged, so a backend known to be down stays down (with `fall: 3` a fresh
// registry would call it healthy for about two intervals after the swap). `listen`, `server` and
// `affinity` need a restart: a reload that changes them logs the documented warning and keeps the
// old values (the old listen address serves, the new one is not opened).
describe('hot reload with WebSockets open', { timeout: 90_000 }, () => {
  const N = 8;
  let env;
  let A;
  let B;
  let T;
  let C;
  let agent;
  let cfg;

  before(async () => {
    env = new h.TestEnv('reload-ws');
    await env.startRedis();
    [A, B, T, C] = await env.startBackends(4);
    cfg = env.makeConfig({
      port: await h.freePort(),
      pools: { default: [A.addr, B.addr], test: [T.addr] },
      healthCheck: { kind: 'tcp', interval: '300ms', fall: 3 },
    });
    agent = await env.startAgent(cfg);
  });

  after(async () => {
    if (env) await env.close();
  });

  const api = async (method, p) => {
    const r = await h.admin(agent, method, p);
    assert.equal(r.status, 200, `${method} ${p}: ${r.status} ${r.text}`);
    return r;
  };
  const healthOf = async (addr) => {
    const st = (await api('GET', '/api/status')).json;
    const b = st.pools.flatMap((p) => p.backends).find((x) => x.addr === addr);
    assert.ok(b, `${addr} not in /api/status: ${JSON.stringify(st.pools)}`);
    return b.healthy;
  };
  const metricHealthy = async (addr) => {
    const m = (await api('GET', '/metrics')).text;
    const line = m.split('\n').find((l) => l.startsWith('gopush_backend_healthy{') && l.includes(`backend="${addr}"`));
    assert.ok(line, `no gopush_backend_healthy sample for ${addr}`);
    return Number(line.split(' ').pop());
  };
  const count = (re) => (agent.proc.out.match(re) || []).length;
  const LISTEN_WARN = /reload: `listen` changes need a restart or a graceful upgrade; keeping the old addresses/g;
  const SERVER_WARN = /reload: `server` and `affinity` changes need a restart or a graceful upgrade; keeping the old values/g;
  const RELOADED = /configuration reloaded/g;

  it('keeps open WebSockets and the health of kept backends; ignores listen/server/affinity with a warning', async () => {
    // N WebSocket clients through the agent, on both backends of `default`.
    const clients = [];
    for (let i = 0; i < N; i++) {
      const uid = `ws-reload-${i}`;
      const { socket, hello } = await env.connect(agent.url, { transports: ['websocket'], extraHeaders: { cookie: `uid=${uid}` } });
      const c = { uid, socket, port: hello.port, id: socket.io.engine.id, disconnects: [] };
      socket.on('disconnect', (why) => c.disconnects.push(why));
      clients.push(c);
    }
    assert.ok(new Set(clients.map((c) => c.port)).size === 2, `all ${N} clients on one backend: ${clients.map((c) => c.port)}`);

    // T goes down and the agent knows it (fall: 3 at 300 ms).
    await T.proc.kill('SIGKILL');
    await h.poll(async () => (await healthOf(T.addr)) === false,
      { attempts: 40, delayMs: 100, maxDelayMs: 300, what: `${T.addr} marked down` });
    assert.equal(await metricHealthy(T.addr), 0);
    const unhealthyLines = count(/backend is unhealthy/g);

    // Reload 1 (SIGHUP): a product pool is added (live), and `listen` and `server` change (ignored).
    const newListen = await h.freePort();
    const one = structuredClone(agent.cfg);
    one.pools.extra = { backends: [C.addr] };
    one.listen = `127.0.0.1:${newListen}`;
    one.server = { ...one.server, threads: 1 };
    const [reloaded, listenWarn, serverWarn] = [count(RELOADED), count(LISTEN_WARN), count(SERVER_WARN)];
    fs.writeFileSync(agent.configFile, h.toYaml(one));
    process.kill(agent.proc.pid, 'SIGHUP');
    await h.poll(async () => count(RELOADED) > reloaded,
      { attempts: 50, delayMs: 20, maxDelayMs: 100, what: 'the agent to log the reload' });
    assert.equal(await healthOf(T.addr), false, 'a down backend came back up across the reload (health registry not kept)');
    assert.equal(count(LISTEN_WARN), listenWarn + 1, 'the `listen` warning');
    assert.equal(count(SERVER_WARN), serverWarn + 1, 'the `server`/`affinity` warning');
    const viaExtra = await h.httpGet(`${agent.url}/whoami?product=extra`, { headers: { cookie: 'uid=p-1' } });
    assert.equal(viaExtra.status, 200, viaExtra.body);
    assert.equal(JSON.parse(viaExtra.body).port, C.port, 'the product pool added by the reload serves');
    assert.equal(await h.tcpProbe(newListen), false, `the new listen address ${newListen} was opened`);
    assert.equal((await h.httpGet(`${agent.url}/whoami`, { headers: { cookie: 'uid=p-2' } })).status, 200,
      'the old listen address still serves');

    // Reload 2 (POST /api/reload): only `affinity` changes among the restart-only keys, and
    // another product pool is added.
    const two = structuredClone(agent.cfg);
    two.pools.extra = { backends: [C.addr] };
    two.pools.extra2 = { backends: [C.addr] };
    two.affinity = { max_sessions: 5000 };
    fs.writeFileSync(agent.configFile, h.toYaml(two));
    const r = await api('POST', '/api/reload');
    assert.equal(r.json.reloaded, true, r.text);
    assert.equal(await healthOf(T.addr), false, 'a down backend came back up across the reload (health registry not kept)');
    assert.equal(await metricHealthy(T.addr), 0);
    assert.equal(count(SERVER_WARN), serverWarn + 2, 'the `affinity` change alone logs the warning');
    assert.equal(count(LISTEN_WARN), listenWarn + 1, 'no `listen` warning when listen is unchanged');
    assert.equal((await h.httpGet(`${agent.url}/whoami?product=extra2`, { headers: { cookie: 'uid=p-3' } })).status, 200);
    // The kept registry never re-learned T's state: no second "unhealthy" transition.
    assert.equal(count(/backend is unhealthy/g), unhealthyLines, 'T flipped again: its health was re-learned');

    // Every WebSocket is still open on its session and backend, and acks work.
    for (const c of clients) {
      assert.deepEqual(c.disconnects, [], `${c.uid} was disconnected`);
      assert.equal(c.socket.connected, true, `${c.uid} is not connected`);
      assert.equal(c.socket.io.engine.id, c.id, `${c.uid}: new engine.io session`);
      assert.equal(c.socket.io.engine.transport.name, 'websocket');
      const who = await h.emitAck(c.socket, 'whoami');
      assert.equal(who.port, c.port, `${c.uid} answered from another backend`);
      assert.deepEqual(await h.emitAck(c.socket, 'echo', { uid: c.uid }), { uid: c.uid });
    }
    for (const c of clients) c.socket.close();
  });
});
