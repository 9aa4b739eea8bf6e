'use strict';
// The admin API against a running agent in front of real Node Socket.IO backends that use
// @socket.io/redis-adapter on a real redis-server: authentication, status numbers, route lookup,
// drain (new sessions move, a live polling session stays), push to a uid / a room / everyone
// through Redis, disconnect, reload, bad input, Redis down, and the exact wire format against the
// official @socket.io/redis-emitter.
//
// "Did not receive" is proven without sleeping: after the push under test, a marker event is
// pushed to the same client; Redis delivers in publish order and each Node adapter handles its
// messages in order, so a client that gets the marker but not the event never will.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const { createClient } = require('redis');
const { Emitter } = require('@socket.io/redis-emitter');
const h = require('../lib/harness');

const TOKEN = 'e2e-admin-token';
const CANDIDATES = Array.from({ length: 40 }, (_, i) => `user-${i}`);

describe('admin API', { timeout: 180_000 }, () => {
  let env;
  let A;
  let B;
  let agent;
  let onA;
  let onB;
  let cfg;
  const api = (method, path, opts = {}) => h.admin(agent, method, path, { token: TOKEN, ...opts });
  const status = async () => {
    const r = await api('GET', '/api/status');
    assert.equal(r.status, 200, r.text);
    return r.json;
  };
  const backendStatus = (st, addr, pool = 'default') => st.pools.find((p) => p.name === pool)
    .backends.find((b) => b.addr === addr);
  const connectAs = (uid, opts = {}) => env.connect(agent.url, { query: { uid }, ...opts });
  /** gopush_config_reloads_total{result} from /metrics (0 before the first one). */
  const reloads = async (result) => {
    const m = await api('GET', '/metrics');
    assert.equal(m.status, 200, m.text);
    const v = new RegExp(`^gopush_config_reloads_total\\{result="${result}"\\} (\\d+)$`, 'm').exec(m.text);
    return v ? Number(v[1]) : 0;
  };
  let spawnedAt;

  before(async () => {
    env = new h.TestEnv('admin');
    await env.startRedis();
    A = await env.startBackend();
    B = await env.startBackend();
    const port = await h.freePort();
    const adminPort = await h.freePort();
    cfg = env.makeConfig({
      port,
      pools: { default: [A.addr, B.addr] },
      extra: {
        admin: { listen: `127.0.0.1:${adminPort}`, token: TOKEN },
        push: { redis: env.redis.url, uid_room: 'uid:{uid}', max_payload: 2048, timeout: '1s' },
      },
    });
    spawnedAt = performance.now();
    agent = await env.startAgent(cfg);
    const picked = await h.pickUids(agent.configFile, [A.addr, B.addr], 6, CANDIDATES);
    onA = picked.get(A.addr);
    onB = picked.get(B.addr);
  });

  after(async () => {
    if (env) await env.close();
  });

  it('requires the bearer token on the API and metrics, not on the page', async () => {
    for (const path of ['/api/status', '/metrics', '/api/route?uid=x']) {
      const none = await h.admin(agent, 'GET', path);
      assert.equal(none.status, 401, `${path} without a token`);
      assert.match(none.headers.get('www-authenticate') || '', /Bearer/);
      const wrong = await h.admin(agent, 'GET', path, { token: `${TOKEN}x` });
      assert.equal(wrong.status, 401, `${path} with a wrong token`);
      const right = await api('GET', path);
      assert.equal(right.status, 200, `${path} with the token: ${right.text}`);
    }
    const post = await h.admin(agent, 'POST', '/api/push', { body: { all: true, event: 'x' } });
    assert.equal(post.status, 401);
    const page = await h.admin(agent, 'GET', '/');
    assert.equal(page.status, 200);
    assert.match(page.text, /<title>gopush admin<\/title>/);
  });

  it('status shows version, config and both backends healthy', async () => {
    const st = await status();
    assert.match(st.version, /^\d+\.\d+\.\d+/);
    assert.equal(st.config.file, fs.realpathSync(agent.configFile));
    // Whole seconds since the process started: never more than the time since we spawned it,
    // and it moves with the clock (a constant, e.g. always 0, fails the poll).
    const maxUptime = () => Math.ceil((performance.now() - spawnedAt) / 1000);
    assert.ok(Number.isInteger(st.uptime_seconds) && st.uptime_seconds <= maxUptime(),
      `uptime_seconds ${st.uptime_seconds}, but the agent was spawned ${maxUptime()} s ago`);
    const later = await h.poll(async () => {
      const s = await status();
      return s.uptime_seconds >= st.uptime_seconds + 1 ? s : false;
    }, { attempts: 30, delayMs: 100, maxDelayMs: 200, what: 'uptime_seconds to grow by one' });
    assert.ok(later.uptime_seconds <= maxUptime(), `uptime_seconds ${later.uptime_seconds} > ${maxUptime()} s since spawn`);
    for (const b of [A, B]) {
      const s = backendStatus(st, b.addr);
      assert.ok(s, `backend ${b.addr} listed`);
      assert.equal(s.healthy, true);
      assert.equal(s.draining, false);
    }
  });

  it('route lookup agrees with where socket.io clients land', async () => {
    for (const uid of [onA[0], onB[0], onA[1], onB[1]]) {
      const r = await api('GET', `/api/route?uid=${encodeURIComponent(uid)}`);
      assert.equal(r.status, 200, r.text);
      const { hello, socket } = await connectAs(uid);
      socket.close();
      assert.equal(`127.0.0.1:${hello.port}`, r.json.backend, `uid ${uid}`);
      assert.equal(r.json.ring, r.json.backend);
      assert.equal(r.json.pool, 'default');
      assert.notEqual(r.json.failover, r.json.backend);
      assert.ok([A.addr, B.addr].includes(r.json.failover));
    }
    assert.equal((await api('GET', '/api/route')).status, 400);
    assert.equal((await api('GET', '/api/route?uid=a&product=nope')).status, 404);
  });

  it('status numbers move when clients connect through the agent, and fall back to zero', async () => {
    const before0 = await status();
    const reqA0 = backendStatus(before0, A.addr).requests;
    const clients = [];
    try {
      for (const uid of [onA[2], onA[3], onA[4]]) clients.push(await connectAs(uid, { transports: ['websocket'] }));
      for (const uid of [onB[2], onB[3]]) clients.push(await connectAs(uid, { transports: ['websocket'] }));
      const st = await h.poll(async () => {
        const s = await status();
        const a = backendStatus(s, A.addr);
        const b = backendStatus(s, B.addr);
        return a.open_tunnels === 3 && b.open_tunnels === 2 ? s : false;
      }, { attempts: 40, what: 'open tunnels 3 on A and 2 on B' });
      assert.ok(backendStatus(st, A.addr).requests >= reqA0 + 3, 'upgrades counted while the tunnels are open');
    } finally {
      for (const c of clients) c.socket.close();
    }
    await h.poll(async () => {
      const s = await status();
      return backendStatus(s, A.addr).open_tunnels === 0 && backendStatus(s, B.addr).open_tunnels === 0;
    }, { attempts: 40, what: 'open tunnels back to 0' });
  });

  it('drain moves new sessions only: a live polling session stays; drain survives a reload', async () => {
    const uid = onA[5];
    // A polling-only session on A, created before the drain.
    const live = await connectAs(uid, { transports: ['polling'] });
    assert.equal(live.hello.port, A.port);
    const d = await api('POST', `/api/backends/${A.addr}/drain`);
    assert.equal(d.status, 200, d.text);
    assert.equal(d.json.draining, true);
    try {
      // New sessions of that uid go to the next backend on the ring.
      const route = await api('GET', `/api/route?uid=${uid}`);
      assert.equal(route.json.backend, B.addr);
      assert.equal(route.json.ring, A.addr);
      assert.equal(route.json.ring_draining, true);
      const fresh = await connectAs(uid);
      fresh.socket.close();
      assert.equal(fresh.hello.port, B.port, 'a new session avoids the draining backend');
      // The live polling session keeps working on A (its sid is remembered).
      for (let i = 0; i < 3; i++) {
        const who = await h.emitAck(live.socket, 'whoami');
        assert.equal(who.port, A.port);
        assert.equal(who.transport, 'polling');
      }
      // The held long-poll counts on A (polled: between two polls there is a brief gap).
      const st = await h.poll(async () => {
        const s = await status();
        return backendStatus(s, A.addr).active_requests >= 1 ? s : false;
      }, { attempts: 40, what: 'the held long-poll to count on A' });
      assert.equal(backendStatus(st, A.addr).draining, true);
      // A reload (SIGHUP, and the API) keeps the drain state.
      const loaded0 = st.config.loaded_at_unix;
      const ok0 = await reloads('ok');
      process.kill(agent.proc.pid, 'SIGHUP');
      await h.poll(async () => (await reloads('ok')) === ok0 + 1, { attempts: 40, what: 'the SIGHUP reload to be counted' });
      const rl = await api('POST', '/api/reload');
      assert.equal(rl.status, 200, rl.text);
      assert.equal(await reloads('ok'), ok0 + 2, 'the API reload was counted: both reloads happened');
      assert.ok(rl.json.loaded_at_unix >= loaded0);
      assert.equal(backendStatus(await status(), A.addr).draining, true, 'drain survives reloads');
      // The session ends: A's counts fall to zero.
      live.socket.close();
      await h.poll(async () => {
        const s = backendStatus(await status(), A.addr);
        return s.active_requests === 0 && s.open_tunnels === 0;
      }, { attempts: 40, what: 'A drained to zero' });
    } finally {
      live.socket.close();
      const u = await api('POST', `/api/backends/${A.addr}/undrain`);
      assert.equal(u.status, 200, u.text);
    }
    const back = await connectAs(uid);
    back.socket.close();
    assert.equal(back.hello.port, A.port, 'undrained: the uid is back on A');
    assert.equal((await api('POST', '/api/backends/127.0.0.1:1/drain')).status, 404);
    assert.equal((await api('POST', '/api/backends/nonsense/drain')).status, 400);
  });

  it('push to a uid reaches exactly that user\'s sockets', async () => {
    const alice = onA[0];
    const bob = onB[0];
    const a1 = await connectAs(alice, { transports: ['websocket'] });
    const a2 = await connectAs(alice, { transports: ['polling'] }); // a second tab
    const b = await connectAs(bob);
    const other = await connectAs(onA[1]); // same backend as alice, other user
    const sockets = [a1, a2, b, other].map((c) => c.socket);
    try {
      const got = sockets.map((s) => h.recorder(s, 'news'));
      const gotA1 = h.once(a1.socket, 'news', 5000, 'alice tab 1 to get news');
      const gotA2 = h.once(a2.socket, 'news', 5000, 'alice tab 2 to get news');
      const r = await api('POST', '/api/push', { body: { uid: alice, event: 'news', data: { n: 1, text: 'hé' } } });
      assert.equal(r.status, 200, r.text);
      assert.equal(r.json.room, `uid:${alice}`);
      assert.equal(r.json.channel, `socket.io#/#uid:${alice}#`);
      assert.ok(r.json.receivers >= 2, `both Node instances subscribed (receivers ${r.json.receivers})`);
      assert.deepEqual(await gotA1, { n: 1, text: 'hé' });
      assert.deepEqual(await gotA2, { n: 1, text: 'hé' });
      // Markers to the others, then check they never saw `news`.
      const marks = [b.socket, other.socket].map((s) => h.once(s, 'marker', 5000, 'marker'));
      for (const uid of [bob, onA[1]]) {
        const m = await api('POST', '/api/push', { body: { uid, event: 'marker' } });
        assert.equal(m.status, 200, m.text);
      }
      await Promise.all(marks);
      assert.equal(got[0].length, 1);
      assert.equal(got[1].length, 1);
      assert.equal(got[2].length, 0, 'bob got nothing');
      assert.equal(got[3].length, 0, 'another user on alice\'s backend got nothing');
    } finally {
      for (const s of sockets) s.close();
    }
  });

  it('push to a room reaches its members on both backends; `all` reaches everyone', async () => {
    const x = await connectAs(onA[2]);
    const y = await connectAs(onB[2]);
    const z = await connectAs(onB[3]); // not a member
    try {
      assert.equal(x.hello.port, A.port);
      assert.equal(y.hello.port, B.port);
      await h.emitAck(x.socket, 'room', { room: 'lobby' });
      await h.emitAck(y.socket, 'room', { room: 'lobby' });
      const zGot = h.recorder(z.socket, 'hello-room');
      const got = [x, y].map((c) => h.once(c.socket, 'hello-room', 5000, 'room member to get the push'));
      const r = await api('POST', '/api/push', { body: { room: 'lobby', event: 'hello-room', data: [1, 2, 3] } });
      assert.equal(r.status, 200, r.text);
      assert.deepEqual(await Promise.all(got), [[1, 2, 3], [1, 2, 3]]);
      const all = [x, y, z].map((c) => h.once(c.socket, 'everyone', 5000, 'everyone to get the broadcast'));
      const r2 = await api('POST', '/api/push', { body: { all: true, event: 'everyone' } });
      assert.equal(r2.status, 200, r2.text);
      assert.equal(r2.json.channel, 'socket.io#/#');
      await Promise.all(all);
      assert.equal(zGot.length, 0, 'the non-member got no room message');
    } finally {
      for (const c of [x, y, z]) c.socket.close();
    }
  });

  it('disconnect closes that user\'s sockets wherever they are, and no others', async () => {
    const carol = onB[4];
    const c1 = await connectAs(carol, { transports: ['websocket'] });
    const c2 = await connectAs(carol, { transports: ['polling'] });
    const d = await connectAs(onA[4]);
    try {
      const gone = [c1, c2].map((c) => h.once(c.socket, 'disconnect', 5000, 'carol to be disconnected'));
      const r = await api('POST', '/api/disconnect', { body: { uid: carol } });
      assert.equal(r.status, 200, r.text);
      assert.equal(r.json.channel, 'socket.io-request#/#');
      const reasons = (await Promise.all(gone)).map((r) => (Array.isArray(r) ? r[0] : r));
      assert.deepEqual(reasons, ['io server disconnect', 'io server disconnect']);
      const who = await h.emitAck(d.socket, 'whoami');
      assert.equal(who.uid, onA[4], 'another user stays connected');
    } finally {
      for (const c of [c1, c2, d]) c.socket.close();
    }
  });

  it('publishes byte for byte what @socket.io/redis-emitter publishes', async () => {
    const sub = createClient({ url: env.redis.url });
    const pub = createClient({ url: env.redis.url });
    await Promise.all([sub.connect(), pub.connect()]);
    try {
      const seen = [];
      await sub.pSubscribe(['socket.io#*', 'socket.io-request#*'], (msg, channel) => seen.push({ channel, msg }), true);
      const emitter = new Emitter(pub);
      const data = { a: 1, b: [1, 'x', null, true], c: -7, d: 1.5, e: 'ünïcødé', f: 70000 };
      const waitFor = (n) => h.poll(() => seen.length >= n, { attempts: 40, what: `${n} messages on redis` });
      emitter.to('uid:zed').emit('cmp', data);
      await waitFor(1);
      assert.equal((await api('POST', '/api/push', { body: { uid: 'zed', event: 'cmp', data } })).status, 200);
      await waitFor(2);
      emitter.emit('cmp2');
      await waitFor(3);
      assert.equal((await api('POST', '/api/push', { body: { all: true, event: 'cmp2' } })).status, 200);
      await waitFor(4);
      emitter.of('/chat').in('uid:zed').disconnectSockets();
      await waitFor(5);
      assert.equal((await api('POST', '/api/disconnect', { body: { uid: 'zed', namespace: '/chat' } })).status, 200);
      await waitFor(6);
      for (const [i, j] of [[0, 1], [2, 3], [4, 5]]) {
        assert.equal(seen[j].channel.toString(), seen[i].channel.toString(), 'same channel');
        assert.equal(seen[j].msg.toString('hex'), seen[i].msg.toString('hex'), `same bytes (${seen[i].channel})`);
      }
    } finally {
      await Promise.allSettled([sub.quit(), pub.quit()]);
    }
  });

  it('metrics are Prometheus text and count the traffic', async () => {
    const value = (text, re) => {
      const m = text.match(re);
      return m ? Number(m[1]) : 0;
    };
    const re = new RegExp(`gopush_requests_total\\{backend="${A.addr.replace(/\./g, '\\.')}",class="2xx",pool="default"\\} (\\d+)`);
    const m0 = await api('GET', '/metrics');
    assert.equal(m0.status, 200);
    assert.match(m0.headers.get('content-type'), /text\/plain/);
    const before0 = value(m0.text, re);
    const c = await connectAs(onA[0], { transports: ['polling'] });
    await h.emitAck(c.socket, 'whoami');
    c.socket.close();
    const m1 = await api('GET', '/metrics');
    assert.ok(value(m1.text, re) > before0, 'the 2xx counter of A grew');
    assert.match(m1.text, /gopush_backend_healthy\{backend="[^"]+",pool="default"\} 1/);
    assert.match(m1.text, /gopush_uid_lookups_total\{result="hit",source="query:uid"\} [1-9]/);
    assert.match(m1.text, /gopush_pushes_total\{kind="uid",result="ok"\} [1-9]/);
    assert.match(m1.text, /gopush_request_duration_seconds_bucket\{pool="default",le="\+Inf"\} [1-9]/);
    assert.doesNotMatch(m1.text, /user-\d/, 'no per-uid labels');
  });

  it('bad input gets a 400 that names the field, and nothing is published', async () => {
    // Everything published on the adapters' channels while the bad requests are made; a valid
    // push at the end is the marker: Redis delivers in publish order, so once it is seen,
    // anything the bad requests had published would have been seen before it.
    const sub = createClient({ url: env.redis.url });
    await sub.connect();
    const seen = [];
    await sub.pSubscribe(['socket.io#*', 'socket.io-request#*'], (msg, channel) => seen.push(channel.toString()), true);
    const cases = [
      [{ raw: '{"uid": "a", "event": ' }, /invalid JSON/],
      [{ body: { uid: 'a', event: 'e', colour: 'red' } }, /unknown field `colour`/],
      [{ body: { event: 'e' } }, /target missing/],
      [{ body: { uid: 'a', room: 'r', event: 'e' } }, /target ambiguous/],
      [{ body: { uid: 'a' } }, /missing field `event`/],
      [{ body: { uid: 'a', event: 'disconnect' } }, /event: .*reserved/],
      [{ body: { uid: 'a', event: 'e', namespace: 'chat' } }, /namespace/],
      [{ body: { uid: 'a', event: 'e', data: 'x'.repeat(3000) } }, /data: .*push\.max_payload/],
      [{ raw: JSON.stringify({ uid: 'a', event: 'e', data: 'x'.repeat(20000) }) }, /body: larger than/],
    ];
    for (const [opts, want] of cases) {
      const r = await api('POST', '/api/push', opts);
      assert.equal(r.status, 400, `${JSON.stringify(opts).slice(0, 80)} -> ${r.text}`);
      assert.match(r.json.error, want);
    }
    const d = await api('POST', '/api/disconnect', { body: { all: true } });
    assert.equal(d.status, 400);
    assert.match(d.json.error, /all/);
    assert.equal((await api('GET', '/api/push')).status, 405);
    assert.equal((await api('GET', '/api/nope')).status, 404);
    try {
      const marker = await api('POST', '/api/push', { body: { uid: 'bad-input-marker', event: 'm' } });
      assert.equal(marker.status, 200, marker.text);
      await h.poll(() => seen.length >= 1, { attempts: 40, what: 'the marker push on redis' });
      assert.deepEqual(seen, ['socket.io#/#uid:bad-input-marker#'], 'the bad requests published something');
    } finally {
      await sub.quit().catch(() => {});
    }
  });

  it('reload: 400 with the config error keeps the running config; 200 with the new load time', async () => {
    const st0 = await status();
    const [ok0, err0] = [await reloads('ok'), await reloads('error')];
    const good = fs.readFileSync(agent.configFile, 'utf8');
    fs.writeFileSync(agent.configFile, `${good}\nbogus_key: 1\n`);
    try {
      const bad = await api('POST', '/api/reload');
      assert.equal(bad.status, 400, bad.text);
      assert.match(bad.json.error, /bogus_key/);
      assert.equal((await status()).config.loaded_at_unix, st0.config.loaded_at_unix);
      assert.deepEqual([await reloads('ok'), await reloads('error')], [ok0, err0 + 1], 'counted as a failed reload');
    } finally {
      fs.writeFileSync(agent.configFile, good);
    }
    const ok = await api('POST', '/api/reload');
    assert.equal(ok.status, 200, ok.text);
    assert.ok(ok.json.loaded_at_unix >= st0.config.loaded_at_unix);
    assert.equal(await reloads('ok'), ok0 + 1, 'the good reload happened (and was counted)');
    assert.equal((await status()).config.loaded_at_unix, ok.json.loaded_at_unix, 'status shows the new load time');
    const c = await connectAs(onB[0]);
    c.socket.close();
    assert.equal(c.hello.port, B.port, 'still routing after reloads');
  });

  it('Redis down: push and disconnect answer 503 with the reason', async () => {
    await env.redis.proc.kill('SIGKILL');
    const r = await api('POST', '/api/push', { body: { uid: 'a', event: 'e' } });
    assert.equal(r.status, 503, r.text);
    assert.match(r.json.error, /redis/i);
    const d = await api('POST', '/api/disconnect', { body: { room: 'r' } });
    assert.equal(d.status, 503, d.text);
    assert.match(d.json.error, /redis/i);
    const m = await api('GET', '/metrics');
    assert.match(m.text, /gopush_pushes_total\{kind="uid",result="unavailable"\} [1-9]/);
  });
});
