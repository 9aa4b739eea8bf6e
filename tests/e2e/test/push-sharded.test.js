'use strict';
// Push with `push.adapter: sharded`: the Node backends use @socket.io/redis-adapter's
// createShardedAdapter (Redis 7 sharded pub/sub, SPUBLISH/SSUBSCRIBE) on a real redis-server, and
// /api/push and /api/disconnect must reach them exactly as a Node instance of the cluster would:
// to one user's sockets (its uid room, on that room's own shard channel), to a room on both
// backends, to everyone, and a disconnect of one user.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { createClient } = require('redis');
const h = require('../lib/harness');

const TOKEN = 'e2e-sharded-token';
const CANDIDATES = Array.from({ length: 40 }, (_, i) => `shard-${i}`);

describe('push through the sharded adapter', { timeout: 120_000 }, () => {
  let env;
  let A;
  let B;
  let agent;
  let onA;
  let onB;
  let redis;
  const api = (method, path, opts = {}) => h.admin(agent, method, path, { token: TOKEN, ...opts });
  const connectAs = (uid, opts = {}) => env.connect(agent.url, { query: { uid }, ...opts });
  /** Waits until `n` nodes subscribe to the shard channel of `room` (the adapter subscribes to a
   * room's channel asynchronously, after the socket joined it). */
  const subscribed = (channel, n) => h.poll(async () => {
    const counts = await redis.sendCommand(['PUBSUB', 'SHARDNUMSUB', channel]);
    if (Number(counts[1]) < n) throw new Error(`${channel}: ${counts[1]} of ${n} subscribers`);
    return true;
  }, { what: `${n} subscribers on ${channel}` });

  before(async () => {
    env = new h.TestEnv('push-sharded');
    await env.startRedis();
    A = await env.startBackend({ adapter: 'sharded' });
    B = await env.startBackend({ adapter: 'sharded' });
    const adminPort = await h.freePort();
    const cfg = env.makeConfig({
      port: await h.freePort(),
      pools: { default: [A.addr, B.addr] },
      extra: {
        admin: { listen: `127.0.0.1:${adminPort}`, token: TOKEN },
        push: { redis: env.redis.url, uid_room: 'uid:{uid}', adapter: 'sharded', timeout: '1s' },
      },
    });
    agent = await env.startAgent(cfg);
    const picked = await h.pickUids(agent.configFile, [A.addr, B.addr], 2, CANDIDATES);
    onA = picked.get(A.addr);
    onB = picked.get(B.addr);
    redis = createClient({ url: env.redis.url });
    await redis.connect();
  });

  after(async () => {
    if (redis) await redis.quit();
    if (env) await env.close();
  });

  it('a push to a uid reaches exactly that user, on its room\'s shard channel', async () => {
    const alice = onA[0];
    const a = await connectAs(alice);
    const b = await connectAs(onB[0]);
    const other = await connectAs(onA[1]);
    try {
      await subscribed(`socket.io#/#uid:${alice}#`, 1);
      const got = [a, b, other].map((c) => h.recorder(c.socket, 'news'));
      const arrived = h.once(a.socket, 'news', 5000, 'alice to get news');
      const r = await api('POST', '/api/push', { body: { uid: alice, event: 'news', data: { n: 1, text: 'hé' } } });
      assert.equal(r.status, 200, r.text);
      assert.equal(r.json.channel, `socket.io#/#uid:${alice}#`);
      assert.equal(r.json.receivers, 1, 'only the node holding alice subscribes to her room');
      assert.deepEqual(await arrived, { n: 1, text: 'hé' });
      // Markers to the others, then check they never saw `news`.
      for (const c of [b, other]) await subscribed(`socket.io#/#uid:${c.hello.uid}#`, 1);
      const marks = [b, other].map((c) => h.once(c.socket, 'marker', 5000, 'marker'));
      for (const c of [b, other]) {
        const m = await api('POST', '/api/push', { body: { uid: c.hello.uid, event: 'marker' } });
        assert.equal(m.status, 200, m.text);
      }
      await Promise.all(marks);
      assert.deepEqual(got.map((g) => g.length), [1, 0, 0]);
    } finally {
      for (const c of [a, b, other]) c.socket.close();
    }
  });

  it('a room on both backends, everyone, and a disconnect of one user', async () => {
    const x = await connectAs(onA[1]);
    const y = await connectAs(onB[1]);
    try {
      assert.deepEqual([x.hello.port, y.hello.port], [A.port, B.port]);
      await h.emitAck(x.socket, 'room', { room: 'lobby' });
      await h.emitAck(y.socket, 'room', { room: 'lobby' });
      await subscribed('socket.io#/#lobby#', 2);
      const inRoom = [x, y].map((c) => h.once(c.socket, 'hello-room', 5000, 'room member to get the push'));
      const r = await api('POST', '/api/push', { body: { room: 'lobby', event: 'hello-room', data: [1, 2, 3] } });
      assert.equal(r.status, 200, r.text);
      assert.equal(r.json.receivers, 2);
      assert.deepEqual(await Promise.all(inRoom), [[1, 2, 3], [1, 2, 3]]);
      const all = [x, y].map((c) => h.once(c.socket, 'everyone', 5000, 'everyone to get the broadcast'));
      const r2 = await api('POST', '/api/push', { body: { all: true, event: 'everyone' } });
      assert.equal(r2.status, 200, r2.text);
      assert.equal(r2.json.channel, 'socket.io#/#');
      await Promise.all(all);
      const gone = h.once(y.socket, 'disconnect', 5000, 'the disconnected user to be disconnected');
      const d = await api('POST', '/api/disconnect', { body: { uid: y.hello.uid } });
      assert.equal(d.status, 200, d.text);
      const reason = await gone; // (reason, description)
      assert.equal(Array.isArray(reason) ? reason[0] : reason, 'io server disconnect');
      assert.ok(x.socket.connected, 'the other user stays connected');
    } finally {
      for (const c of [x, y]) c.socket.close();
    }
  });
});
