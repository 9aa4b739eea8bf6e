'use strict';
// Cluster-wide user.online / user.offline (issue 14, item 4): three gopush agents on one real
// redis-server, a real socket.io backend, real socket.io-clients, and a small Node HTTP receiver
// that checks every delivery's HMAC-SHA256 signature. A uid is online once for the whole cluster
// and offline once, `offline_after` after its last connection anywhere; a reconnect through
// another agent, a graceful upgrade of one agent and a crash are covered. Every wait is a poll
// with a deadline; where a test must show that an event did NOT come, it waits for a control
// uid's event that is due at the same moment or later (so the absence is not a guess).

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const http = require('node:http');
const crypto = require('node:crypto');
const h = require('../lib/harness');

const SECRET = 'presence-test-secret';
const OFFLINE_MS = 1500;
const HEARTBEAT_MS = 500;
const TTL_MS = 3000;
// The upgraded agent's grace period: its tunnels close during it, and its users' offline checks
// wait for it on top of offline_after.
const GRACE_S = 4;

const verify = (body, header) => {
  const want = Buffer.from(`sha256=${crypto.createHmac('sha256', SECRET).update(body).digest('hex')}`);
  const got = Buffer.from(String(header || ''));
  return want.length === got.length && crypto.timingSafeEqual(want, got);
};

function startReceiver(events) {
  const server = http.createServer((req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      const raw = Buffer.concat(chunks);
      const ok = verify(raw, req.headers['x-gopush-signature']);
      events.push({ ok, headers: req.headers, body: JSON.parse(raw.toString()), at: Date.now() });
      res.writeHead(ok ? 204 : 401);
      res.end();
    });
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve(server));
  });
}

describe('cluster-wide user.online / user.offline', { timeout: 180_000 }, () => {
  let env;
  let redis;
  let receiver;
  const agents = [];
  const ids = [];
  const events = [];
  const sockets = [];
  let eveOnB;
  /** Deliveries for `uid` (of `type`), de-duplicated by id as a receiver must. */
  const of = (uid, type) => {
    const seen = new Map();
    for (const e of events) if (e.body.uid === uid && (!type || e.body.type === type)) seen.set(e.body.id, e);
    return [...seen.values()];
  };
  const types = (uid) => of(uid).map((e) => e.body.type).filter((t) => t.startsWith('user.'));
  const open = async (agent, uid, opts = {}) => {
    const { socket } = await env.connect(agent.url, { query: { uid }, transports: ['websocket'], ...opts });
    sockets.push(socket);
    return socket;
  };
  /** The connection.close the agent `i` sent for `uid` (the moment the connection left it). */
  const closed = (i, uid, n = 1) => h.until(() => {
    const c = of(uid, 'connection.close').filter((e) => e.body.agent === ids[i]);
    return c.length >= n && c[n - 1];
  }, 5000, `connection.close of ${uid} from agent ${i}`);

  before(async () => {
    env = new h.TestEnv('presence');
    // A 1 s Engine.IO ping lets the upgraded agent close its tunnels cleanly and early (as in
    // upgrade.test.js); no Socket.IO Redis adapter: only the agents use Redis here.
    const backend = await env.startBackend({ pingInterval: 1000, pingTimeout: 2000 });
    redis = await env.startRedis();
    receiver = await startReceiver(events);
    const hook = `http://127.0.0.1:${receiver.address().port}/hooks`;
    for (let i = 0; i < 3; i++) {
      const cfg = env.makeConfig({
        port: await h.freePort(),
        pools: { default: [backend.addr] },
        sources: [{ query: 'uid' }],
        extra: {
          cluster: {
            redis: redis.url,
            heartbeat: `${HEARTBEAT_MS}ms`,
            ttl: `${TTL_MS}ms`,
            timeout: '300ms',
            offline_after: `${OFFLINE_MS}ms`,
            webhooks: [{ url: hook, secret: SECRET }],
          },
        },
      });
      cfg.server.grace_period_seconds = GRACE_S;
      agents.push(await env.startAgent(cfg));
    }
    for (const a of agents) {
      const r = await h.admin(a, 'GET', '/api/status');
      assert.equal(r.status, 200, r.text);
      ids.push(r.json.cluster.agent);
    }
    // All three see each other before the first event.
    await h.until(async () => (await h.admin(agents[0], 'GET', '/api/status')).json.cluster.agents === 3, 5000, '3 agents');
  });

  after(async () => {
    for (const s of sockets) s.close();
    if (receiver) receiver.close();
    if (env) await env.close();
  });

  it('one user through A then B (overlapping): one user.online; both closed: one user.offline after the grace', async () => {
    const a = await open(agents[0], 'ann');
    const online = await h.until(() => of('ann', 'user.online')[0], 5000, 'user.online');
    assert.equal(online.body.agent, ids[0]);
    const b = await open(agents[1], 'ann');
    await h.until(() => of('ann', 'connection.open').some((e) => e.body.agent === ids[1]), 5000, 'open on B');
    // A control uid leaves A at the same moment as ann's first connection: once its offline
    // arrives, an offline of ann from that close would have come too.
    const ctl = await open(agents[0], 'ann-ctl');
    await h.until(() => of('ann-ctl', 'user.online').length === 1, 5000, 'control online');
    a.disconnect();
    ctl.disconnect();
    await h.until(() => of('ann-ctl', 'user.offline').length === 1, OFFLINE_MS + 5000, 'control offline');
    assert.deepEqual(types('ann'), ['user.online'], 'B still holds ann: no offline, no second online');
    b.disconnect();
    const last = await closed(1, 'ann');
    const off = await h.until(() => of('ann', 'user.offline')[0], OFFLINE_MS + 5000, 'user.offline');
    assert.ok(off.at - last.at >= OFFLINE_MS - 100, `offline ${off.at - last.at} ms after the last close`);
    assert.deepEqual(types('ann'), ['user.online', 'user.offline']);
    // Once each, however many deliveries: every raw delivery of a type carries the one id.
    for (const t of ['user.online', 'user.offline']) {
      const raw = events.filter((e) => e.body.uid === 'ann' && e.body.type === t);
      assert.equal(new Set(raw.map((e) => e.body.id)).size, 1, `${t}: ${raw.map((e) => e.body.id)}`);
    }
    assert.equal(off.body.id, `${online.body.id}-off`, 'the offline id names the online period it ends');
    assert.ok(of('ann').every((e) => e.ok && e.headers['x-gopush-delivery'] === e.body.id), 'signed, id in the header');
  });

  it('disconnect on A and reconnect through B within the grace: no user.offline, no second user.online', async () => {
    const a = await open(agents[0], 'bob');
    const ctl = await open(agents[0], 'bob-ctl');
    await h.until(() => of('bob', 'user.online').length === 1 && of('bob-ctl', 'user.online').length === 1, 5000, 'online');
    a.disconnect();
    ctl.disconnect();
    await closed(0, 'bob');
    const b = await open(agents[1], 'bob');
    await h.until(() => of('bob-ctl', 'user.offline').length === 1, OFFLINE_MS + 5000, 'control offline');
    assert.deepEqual(types('bob'), ['user.online']);
    b.disconnect();
    await h.until(() => of('bob', 'user.offline').length === 1, OFFLINE_MS + 5000, 'bob offline');
    assert.deepEqual(types('bob'), ['user.online', 'user.offline']);
  });

  it('graceful upgrade of one agent with connected users: no offline/online flap', async () => {
    const C = agents[2];
    const uids = ['cy-1', 'cy-2', 'cy-slow'];
    // These reconnect, to the new process on the same port; the control uid does not: its
    // offline check is due with theirs (the old process reaps them all when it stops accepting).
    // cy-slow comes back 2 s after its tunnel closed, later than offline_after: only the stop's
    // postponement of the checks by its grace period keeps it from flapping. (Its tunnel closes
    // within the first half of the grace period plus one 1 s ping: by 3 s, back by 5 s < 4 + 1.5.)
    for (const uid of uids) {
      const slow = uid === 'cy-slow';
      await open(C, uid, {
        reconnection: true,
        reconnectionDelay: slow ? 2000 : 200,
        reconnectionDelayMax: slow ? 2000 : 1000,
        randomizationFactor: slow ? 0 : 0.5,
      });
    }
    await open(C, 'cy-ctl');
    await h.until(() => [...uids, 'cy-ctl'].every((u) => of(u, 'user.online').length === 1), 5000, 'online');
    const sock = C.cfg.server.upgrade_sock;
    const next = new h.Proc('gopush:new', h.GOPUSH_BIN, ['run', '-u', '-c', C.configFile], { env: { RUST_LOG: 'info' } });
    env.procs.push(next);
    await h.poll(async () => fs.existsSync(sock) || next.exited,
      { attempts: 100, delayMs: 20, maxDelayMs: 100, what: 'the new process to wait on upgrade_sock' });
    assert.equal(next.exited, null, `new process exited: ${next.tail()}`);
    const broadcast = C.proc.waitForOutput(/Broadcasting graceful shutdown/, 30000, 'the old process to broadcast its shutdown')
      .then(() => Date.now());
    process.kill(C.proc.pid, 'SIGQUIT');
    const broadcastAt = await broadcast;
    // Every user came back through the new process (a second connection.open from another agent id).
    await h.until(() => uids.every((u) => of(u, 'connection.open').length === 2), 15000, 'reconnects through the new process');
    const off = await h.until(() => of('cy-ctl', 'user.offline')[0], GRACE_S * 1000 + OFFLINE_MS + 10000, 'control offline');
    for (const u of uids) assert.deepEqual(types(u), ['user.online'], `${u}: ${types(u)}`);
    // The stop postponed the checks by the grace period: without that, a tunnel closed late in
    // it (or a client slow to come back) flaps.
    assert.ok(off.at - broadcastAt >= GRACE_S * 1000 + OFFLINE_MS - 1000,
      `control offline ${off.at - broadcastAt} ms after the shutdown broadcast`);
    agents[2] = { ...C, proc: next };
  });

  it('costs a bounded number of Redis commands and bytes per connection (measured for docs/SCALING.md)', async (t) => {
    // The workload of cluster.test.js's cost test (100 WebSocket clients through one agent, 100
    // long-polling clients through another, one uid each), here with the presence scripts: the
    // difference is what cluster-wide user.online / user.offline cost.
    const [a1, a2] = agents;
    // Bytes the agents (and this test's few reads) sent to Redis: netIn.
    const { cli, commands, usedMemory, netIn, delta } = h.redisStats(redis.port);
    // Reads of heartbeats and sweeps (one ZRANGEBYSCORE per agent and second) and of this test
    // are left out; the heartbeats' writes are counted (the bounds allow for them). Commands run
    // by the Lua scripts count as well as EVAL.
    const background = ['zrangebyscore', 'hgetall', 'zcard', 'info', 'memory', 'scan'];
    const total = (d) => Object.entries(d).filter(([k]) => !background.includes(k)).reduce((n, [, v]) => n + v, 0);
    const N = 100;
    const uids = [...Array(N).keys()].flatMap((i) => [`m${i}`, `p${i}`]);
    const mem0 = usedMemory();
    const n0 = netIn();
    const c0 = commands();
    const socks = [];
    await h.mapLimit([...Array(N).keys()], 10, async (i) => {
      socks.push((await env.connect(a1.url, { query: { uid: `m${i}` }, transports: ['websocket'] })).socket);
      socks.push((await env.connect(a2.url, { query: { uid: `p${i}` }, transports: ['polling'] })).socket);
    });
    await h.until(() => uids.every((u) => of(u, 'user.online').length === 1), 10000, `${2 * N} user.online`);
    const open = delta(c0, commands());
    const n1 = netIn();
    const bytes = usedMemory() - mem0;
    const onlineKey = Number(cli('MEMORY', 'USAGE', 'gopush:{m1}:online'));
    const c1 = commands();
    for (const s of socks) s.close();
    // Closed, then offline offline_after later (the sweeps start while the last closes are still
    // being written, so close and offline decision are measured together).
    await h.until(() => uids.every((u) => of(u, 'user.offline').length === 1), OFFLINE_MS + 10000, `${2 * N} user.offline`);
    const close = delta(c1, commands());
    const n2 = netIn();
    const perOpen = total(open) / (2 * N);
    const perClose = total(close) / (2 * N);
    t.diagnostic(`per connection opened: ${perOpen.toFixed(2)} commands, ${((n1 - n0) / (2 * N)).toFixed(0)} B sent ${JSON.stringify(open)}`);
    t.diagnostic(`per connection closed, until its user.offline: ${perClose.toFixed(2)} commands, ${((n2 - n1) / (2 * N)).toFixed(0)} B sent ${JSON.stringify(close)}`);
    t.diagnostic(`used_memory grew ${bytes} bytes for ${2 * N} connections (${(bytes / (2 * N)).toFixed(0)} B each); MEMORY USAGE of one online key ${onlineKey} B`);
    // One EVAL replaces the HSET (HSET, ZREM, SET NX inside); a close's EVAL adds EXISTS,
    // ZSCORE, ZADD when it was the uid's last, and the sweep's EVAL (ZSCORE, ZREM, HLEN, GET, DEL)
    // decides the offline.
    assert.ok(open.eval >= 2 * N, JSON.stringify(open));
    assert.ok(close.eval >= 4 * N, JSON.stringify(close));
    assert.equal(Number(cli('ZCARD', 'gopush:offline')), 0, 'no pending checks left');
    assert.equal(Number(cli('EXISTS', 'gopush:{m1}:online')), 0, 'online keys deleted with the offline');
    assert.ok(perOpen <= 8, `about 6.5 commands per open: ${perOpen}`);
    assert.ok(perClose <= 17, `about 14.5 commands per close and offline: ${perClose}`);
  });

  it('SIGKILL of the agent holding a user\'s only connection: user.offline from another agent within ttl + grace', async () => {
    const A = agents[0];
    await open(A, 'dora');
    // eve also holds a connection on B: she stays online.
    await open(A, 'eve');
    eveOnB = await open(agents[1], 'eve');
    await h.until(() => of('dora', 'user.online').length === 1 && of('eve', 'user.online').length === 1
      && of('eve', 'connection.open').length === 2, 5000, 'online');
    await A.proc.kill('SIGKILL');
    const killAt = Date.now();
    const bound = TTL_MS + OFFLINE_MS + 3000;
    const off = await h.until(() => of('dora', 'user.offline')[0], bound + 2000, 'dora offline');
    const after = off.at - killAt;
    assert.ok(after <= bound, `offline ${after} ms after the kill, bound ${bound}`);
    // Not before the dead agent's entries could be reaped (ttl after its last heartbeat) + grace.
    assert.ok(after >= TTL_MS - HEARTBEAT_MS + OFFLINE_MS - 200, `offline only ${after} ms after the kill`);
    assert.notEqual(off.body.agent, ids[0], 'sent by a live agent');
    assert.deepEqual(types('dora'), ['user.online', 'user.offline']);
    assert.deepEqual(types('eve'), ['user.online'], 'eve is still connected through B');
  });

  it('Redis unreachable for a while: user.* events wait for it (connection.* do not), then come once', async () => {
    const B = agents[1];
    const stale = async () => {
      const r = await h.admin(B, 'GET', '/metrics');
      const line = r.text.split('\n').find((l) => l.startsWith('gopush_cluster_stale '));
      return line !== undefined && Number(line.split(' ').pop()) === 1;
    };
    const pid = redis.proc.child.pid;
    // hal is online through B before the outage and stays connected through it.
    await open(B, 'hal');
    await h.until(() => of('hal', 'user.online').length === 1, 5000, 'hal online');
    // Hung, not restarted: Redis keeps its data. gus connects at once, so his write may reach
    // Redis and run there while the agent times out on it: when the agent re-publishes its table,
    // the open script finds gus's own online id and the user.online is sent then.
    process.kill(pid, 'SIGSTOP');
    let resumed = false;
    try {
      await open(B, 'gus');
      await h.until(() => of('gus', 'connection.open').length === 1, 5000, 'connection.open while Redis hangs');
      assert.ok(eveOnB.connected, 'eve still connected through B');
      eveOnB.disconnect();
      // (Her connection through the killed A never got a connection.close: that process is gone.)
      await h.until(() => of('eve', 'connection.close').length === 1, 5000, 'connection.close while Redis hangs');
      await h.until(stale, 5000, 'B to notice');
      assert.deepEqual(types('gus'), [], 'no user.online without Redis');
      process.kill(pid, 'SIGCONT');
      resumed = true;
    } finally {
      if (!resumed) process.kill(pid, 'SIGCONT');
    }
    await h.until(() => of('gus', 'user.online').length === 1, 10000, 'gus online once Redis answers');
    await h.until(() => of('eve', 'user.offline').length === 1, OFFLINE_MS + 10000, 'eve offline once Redis answers');
    assert.deepEqual(types('gus'), ['user.online']);
    assert.deepEqual(types('eve'), ['user.online', 'user.offline']);
    // B re-published hal's connection too, but his user.online was sent already: not again (raw
    // deliveries, not de-duplicated; eve's offline came after it through the same queue).
    const halOnline = events.filter((e) => e.body.uid === 'hal' && e.body.type === 'user.online');
    assert.equal(halOnline.length, 1, `hal: ${halOnline.map((e) => e.body.id)}`);
  });
});
