'use strict';
// Push on a real Redis Cluster (`push.redis_cluster`, `push.adapter: sharded`): three
// redis-server with cluster mode on loopback, joined by `redis-cli --cluster create`; two Node
// backends on createShardedAdapter with a node-redis cluster client; real socket.io-clients through
// one gopush agent. A shard channel lives on the primary that owns its slot, so each push must be
// SPUBLISHed there: the rooms and uids below are chosen so that their channels are owned by
// different nodes (checked with CLUSTER KEYSLOT / CLUSTER SLOTS), and each node's SPUBLISH count
// is read, so a client that sent everything to one node fails. Last, a slot is moved after the
// agent learned the slot map: its next SPUBLISH gets MOVED from the old owner and must follow it.
// Also the classic adapter (createAdapter, PUBLISH) over the same cluster.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { createClient } = require('redis');
const h = require('../lib/harness');

const TOKEN = 'e2e-rcluster-token';
const CANDIDATES = Array.from({ length: 60 }, (_, i) => `rc-${i}`);
const uidChannel = (uid) => `socket.io#/#uid:${uid}#`;
const roomChannel = (room) => `socket.io#/#${room}#`;

describe('push on a Redis Cluster (push.redis_cluster, sharded adapter)', { timeout: 180_000 }, () => {
  let env;
  let A;
  let B;
  let agent;
  let onA;
  let onB;
  let cluster;
  /** port -> a plain (non-cluster) client of that node, to ask it about itself. */
  const node = new Map();
  const api = (method, p, opts = {}) => h.admin(agent, method, p, { token: TOKEN, ...opts });
  const connectAs = (uid, opts = {}) => env.connect(agent.url, { query: { uid }, ...opts });

  /** The slot of `channel` and the port of its owner, as node `viaPort` sees the slot map. */
  async function ownerOf(channel, viaPort = cluster.nodes[0].port) {
    const c = node.get(viaPort);
    const slot = Number(await c.sendCommand(['CLUSTER', 'KEYSLOT', channel]));
    const ranges = await c.sendCommand(['CLUSTER', 'SLOTS']);
    const r = ranges.find(([lo, hi]) => slot >= Number(lo) && slot <= Number(hi));
    assert.ok(r, `slot ${slot} of ${channel} is assigned`);
    return { slot, port: Number(r[2][1]) };
  }

  /** Waits until `n` subscribers hold `channel` on its owner (the adapter subscribes to a room's
   * channel asynchronously, after the socket joined it). */
  const subscribed = (channel, n, port) => h.poll(async () => {
    const owner = port || (await ownerOf(channel)).port;
    const counts = await node.get(owner).sendCommand(['PUBSUB', 'SHARDNUMSUB', channel]);
    if (Number(counts[1]) < n) throw new Error(`${channel} on ${owner}: ${counts[1]} of ${n} subscribers`);
    return true;
  }, { what: `${n} subscribers on ${channel}` });

  /** `cmdstat_spublish` of one node: {calls, rejected}. */
  async function spublishStats(port) {
    const info = String(await node.get(port).sendCommand(['INFO', 'commandstats']));
    const m = info.match(/cmdstat_spublish:calls=(\d+),[^\r\n]*?rejected_calls=(\d+)/);
    return m ? { calls: Number(m[1]), rejected: Number(m[2]) } : { calls: 0, rejected: 0 };
  }

  before(async () => {
    env = new h.TestEnv('push-rcluster');
    cluster = await env.startRedisCluster(3);
    for (const n of cluster.nodes) {
      const c = createClient({ url: n.url });
      c.on('error', () => {}); // a node client only asks questions; errors surface as rejections
      await c.connect();
      node.set(n.port, c);
    }
    A = await env.startBackend({ redisCluster: cluster.urls, adapter: 'sharded' });
    B = await env.startBackend({ redisCluster: cluster.urls, adapter: 'sharded' });
    const adminPort = await h.freePort();
    const cfg = env.makeConfig({
      port: await h.freePort(),
      pools: { default: [A.addr, B.addr] },
      extra: {
        admin: { listen: `127.0.0.1:${adminPort}`, token: TOKEN },
        // One seed is enough: the client reads the slot map from it.
        push: { redis_cluster: [cluster.urls[1]], uid_room: 'uid:{uid}', adapter: 'sharded', timeout: '2s' },
      },
    });
    agent = await env.startAgent(cfg);
    const picked = await h.pickUids(agent.configFile, [A.addr, B.addr], 12, CANDIDATES);
    onA = picked.get(A.addr);
    onB = picked.get(B.addr);
  });

  after(async () => {
    for (const c of node.values()) await c.quit().catch(() => {});
    if (env) await env.close();
  });

  it('a push to a uid reaches that user on either backend, their channels on different nodes', async () => {
    // A user on A and one on B whose uid channels are owned by different nodes.
    const owners = new Map();
    for (const u of [...onA, ...onB]) owners.set(u, await ownerOf(uidChannel(u)));
    let pair = null;
    for (const a of onA) {
      const b = onB.find((u) => owners.get(u).port !== owners.get(a).port);
      if (!pair && b) pair = { a, b, oa: owners.get(a), ob: owners.get(b) };
    }
    assert.ok(pair, 'two uids on different backends whose channels live on different nodes');
    const alice = await connectAs(pair.a);
    const bob = await connectAs(pair.b);
    try {
      assert.deepEqual([alice.hello.port, bob.hello.port], [A.port, B.port]);
      await subscribed(uidChannel(pair.a), 1);
      await subscribed(uidChannel(pair.b), 1);
      const got = [alice, bob].map((c) => h.recorder(c.socket, 'news'));
      for (const [c, owner, n] of [[alice, pair.oa, 1], [bob, pair.ob, 2]]) {
        const before = await spublishStats(owner.port);
        const arrived = h.once(c.socket, 'news', 5000, `${c.hello.uid} to get news`);
        const r = await api('POST', '/api/push', { body: { uid: c.hello.uid, event: 'news', data: { n } } });
        assert.equal(r.status, 200, r.text);
        assert.equal(r.json.channel, uidChannel(c.hello.uid));
        assert.equal(r.json.receivers, 1, 'the one backend holding the user, on the owner of the channel');
        assert.deepEqual(await arrived, { n });
        const after = await spublishStats(owner.port);
        assert.ok(after.calls > before.calls, `SPUBLISH executed on the owner ${owner.port} (${JSON.stringify([before, after])})`);
      }
      // Each saw only its own push (the second arrived after the first was delivered).
      assert.deepEqual(got.map((g) => g.length), [1, 1]);
    } finally {
      for (const c of [alice, bob]) c.socket.close();
    }
  });

  it('rooms on all three nodes reach members on both backends; everyone; a disconnect', async () => {
    // One room per node.
    const byOwner = new Map();
    for (let i = 0; byOwner.size < cluster.nodes.length && i < 200; i++) {
      const room = `room-${i}`;
      const { port } = await ownerOf(roomChannel(room));
      if (!byOwner.has(port)) byOwner.set(port, room);
    }
    assert.equal(byOwner.size, 3, 'rooms whose shard channels live on three different nodes');
    const x = await connectAs(onA[1]);
    const y = await connectAs(onB[1]);
    try {
      assert.deepEqual([x.hello.port, y.hello.port], [A.port, B.port]);
      for (const room of byOwner.values()) {
        await h.emitAck(x.socket, 'room', { room });
        await h.emitAck(y.socket, 'room', { room });
      }
      for (const [port, room] of byOwner) await subscribed(roomChannel(room), 2, port);
      for (const [port, room] of byOwner) {
        const before = await spublishStats(port);
        const inRoom = [x, y].map((c) => h.once(c.socket, 'in-room', 5000, `a member of ${room} to get the push`));
        const r = await api('POST', '/api/push', { body: { room, event: 'in-room', data: { room } } });
        assert.equal(r.status, 200, r.text);
        assert.equal(r.json.channel, roomChannel(room));
        assert.equal(r.json.receivers, 2, `both backends subscribe to ${room} on node ${port}`);
        assert.deepEqual(await Promise.all(inRoom), [{ room }, { room }]);
        const after = await spublishStats(port);
        assert.ok(after.calls > before.calls, `SPUBLISH executed on node ${port}, the owner of ${room}`);
      }
      const all = [x, y].map((c) => h.once(c.socket, 'everyone', 5000, 'everyone to get the broadcast'));
      const r = await api('POST', '/api/push', { body: { all: true, event: 'everyone' } });
      assert.equal(r.status, 200, r.text);
      assert.equal(r.json.channel, 'socket.io#/#');
      assert.equal(r.json.receivers, 2);
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

  it('classic adapter on the same cluster: PUBLISH reaches backends subscribed on any node', async () => {
    // createAdapter over a cluster client subscribes on one node of its choice; a PUBLISH on any
    // node is spread by the cluster bus, so the agent's publish (routed by the channel's slot)
    // reaches both backends wherever they subscribed.
    const C = await env.startBackend({ redisCluster: cluster.urls });
    const D = await env.startBackend({ redisCluster: cluster.urls });
    const cfg = env.makeConfig({
      port: await h.freePort(),
      pools: { default: [C.addr, D.addr] },
      extra: {
        admin: { listen: `127.0.0.1:${await h.freePort()}`, token: TOKEN },
        push: { redis_cluster: cluster.urls, uid_room: 'uid:{uid}', timeout: '2s' },
      },
    });
    const classic = await env.startAgent(cfg);
    const picked = await h.pickUids(classic.configFile, [C.addr, D.addr], 1, CANDIDATES);
    const c = await env.connect(classic.url, { query: { uid: picked.get(C.addr)[0] } });
    const d = await env.connect(classic.url, { query: { uid: picked.get(D.addr)[0] } });
    const call = (p, body) => h.admin(classic, 'POST', p, { token: TOKEN, body });
    try {
      assert.deepEqual([c.hello.port, d.hello.port], [C.port, D.port]);
      for (const x of [c, d]) {
        const arrived = h.once(x.socket, 'news', 5000, `${x.hello.uid} to get the classic push`);
        const r = await call('/api/push', { uid: x.hello.uid, event: 'news', data: { to: x.hello.uid } });
        assert.equal(r.status, 200, r.text);
        assert.equal(r.json.channel, `socket.io#/#uid:${x.hello.uid}#`);
        assert.deepEqual(await arrived, { to: x.hello.uid });
      }
      const all = [c, d].map((x) => h.once(x.socket, 'everyone', 5000, 'everyone to get the classic broadcast'));
      const r = await call('/api/push', { all: true, event: 'everyone' });
      assert.equal(r.status, 200, r.text);
      await Promise.all(all);
      const gone = h.once(d.socket, 'disconnect', 5000, 'the disconnected user to be disconnected');
      const dis = await call('/api/disconnect', { uid: d.hello.uid });
      assert.equal(dis.status, 200, dis.text);
      const reason = await gone;
      assert.equal(Array.isArray(reason) ? reason[0] : reason, 'io server disconnect');
      assert.ok(c.socket.connected, 'the other user stays connected');
    } finally {
      for (const x of [c, d]) x.socket.close();
    }
  });

  it('after a slot moved, the next SPUBLISH follows MOVED to the new owner', async () => {
    // A room no backend subscribes to, in a slot that holds none of the backends' channels (the
    // move unsubscribes those, and node-redis 4 does not re-subscribe them), so the test reads
    // the channel itself on whichever node owns it.
    const held = new Set();
    for (const n of cluster.nodes) {
      for (const ch of await node.get(n.port).sendCommand(['PUBSUB', 'SHARDCHANNELS'])) {
        held.add((await ownerOf(String(ch))).slot);
      }
    }
    let pick = null;
    for (let i = 0; !pick && i < 200; i++) {
      const o = await ownerOf(roomChannel(`moving-${i}`));
      if (!held.has(o.slot)) pick = { room: `moving-${i}`, ...o };
    }
    assert.ok(pick, 'a room in a slot without backend channels');
    const channel = roomChannel(pick.room);
    const from = pick.port;
    const to = cluster.nodes.map((n) => n.port).find((p) => p !== from);
    const listen = async (port) => {
      const sub = createClient({ url: `redis://127.0.0.1:${port}` });
      sub.on('error', () => {});
      await sub.connect();
      const got = [];
      await sub.sSubscribe(channel, (message) => got.push(JSON.parse(message)));
      return { sub, got };
    };
    const push = (n) => api('POST', '/api/push', { body: { room: pick.room, event: 'moved', data: { n } } });

    // Before: delivered on the owner (the agent's slot map is current).
    const old = await listen(from);
    try {
      const r = await push(1);
      assert.equal(r.status, 200, r.text);
      assert.equal(r.json.receivers, 1);
      await h.poll(() => old.got.length === 1, { what: 'the push on the old owner' });
      assert.deepEqual(old.got[0].data.packet.data, ['moved', { n: 1 }]);
    } finally {
      await old.sub.quit().catch(() => {});
    }

    // Move the (key-less) slot: importing on the target, migrating on the source, then every
    // node assigns it to the target (the target first, which bumps its config epoch).
    const id = async (port) => String(await node.get(port).sendCommand(['CLUSTER', 'MYID']));
    const [fromId, toId] = [await id(from), await id(to)];
    const s = String(pick.slot);
    await node.get(to).sendCommand(['CLUSTER', 'SETSLOT', s, 'IMPORTING', fromId]);
    await node.get(from).sendCommand(['CLUSTER', 'SETSLOT', s, 'MIGRATING', toId]);
    assert.equal(Number(await node.get(from).sendCommand(['CLUSTER', 'COUNTKEYSINSLOT', s])), 0);
    const order = [to, from, ...cluster.nodes.map((n) => n.port).filter((p) => p !== to && p !== from)];
    for (const port of order) await node.get(port).sendCommand(['CLUSTER', 'SETSLOT', s, 'NODE', toId]);
    await h.poll(async () => {
      for (const n of cluster.nodes) {
        const o = await ownerOf(channel, n.port);
        if (o.port !== to) throw new Error(`node ${n.port} still maps slot ${s} to ${o.port}`);
      }
      return true;
    }, { what: `every node to map slot ${s} to ${to}` });

    const moved = await listen(to);
    try {
      const [fromBefore, toBefore] = [await spublishStats(from), await spublishStats(to)];
      const r = await push(2);
      assert.equal(r.status, 200, r.text);
      assert.equal(r.json.receivers, 1, 'published on the new owner');
      await h.poll(() => moved.got.length === 1, { what: 'the push on the new owner' });
      assert.deepEqual(moved.got[0].data.packet.data, ['moved', { n: 2 }]);
      const [fromAfter, toAfter] = [await spublishStats(from), await spublishStats(to)];
      assert.ok(fromAfter.rejected > fromBefore.rejected,
        `the agent's stale slot map sent it to the old owner first, which answered MOVED (${JSON.stringify([fromBefore, fromAfter])})`);
      assert.ok(toAfter.calls > toBefore.calls, 'then it ran on the new owner');
    } finally {
      await moved.sub.quit().catch(() => {});
    }
  });
});
