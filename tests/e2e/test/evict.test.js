'use strict';
// Closing connections on purpose (issue 14, item 3 and the admin's disconnect of item 2): two
// gopush agents on one real redis-server, two real socket.io v4 backends with the Redis
// adapter, real socket.io-clients *with reconnection on* (the point: a kicked client must see
// "io server disconnect" and stay away, not reconnect and kick the new one back).
//
// - `limits.per_uid.max_connections: 1, on_exceed: close_oldest`: a second connection of a uid
//   through the other agent closes the first (WebSocket, then polling), the second stays.
// - `DELETE /api/connections/{agent}/{id}` for a WebSocket and a polling connection, asked
//   from the agent that does not hold it (a command through Redis).
// - A closed polling session on the wire (raw Engine.IO requests): what each poll gets, also
//   when the polls reach the other agent or an agent started after the close; and real
//   socket.io-clients behind a TCP balancer without stickiness.
// - With Redis down, close_oldest falls back to the agent's own connections.
// Every wait is a poll with a deadline; "does not reconnect" is watched over a bounded window.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../lib/harness');

/** How long a kicked client is watched for a reconnection (its delay is 100 ms: it would try). */
const WATCH_MS = 1500;

describe('closing connections: close_oldest across agents, admin disconnect', { timeout: 180_000 }, () => {
  let env;
  let a1;
  let a2;

  before(async () => {
    env = new h.TestEnv('evict');
    await env.startRedis();
    const A = await env.startBackend();
    const B = await env.startBackend();
    const config = async () => env.makeConfig({
      port: await h.freePort(),
      pools: { default: [A.addr, B.addr] },
      sources: [{ query: 'uid' }],
      extra: {
        cluster: { redis: env.redis.url, heartbeat: '500ms', ttl: '3s', timeout: '300ms' },
        limits: { per_uid: { max_connections: 1, on_exceed: 'close_oldest' } },
      },
    });
    a1 = await env.startAgent(await config());
    a2 = await env.startAgent(await config());
  });

  after(async () => {
    if (env) await env.close();
  });

  const api = h.adminJson;
  const user = (agent, uid) => api(agent, `/api/users/${encodeURIComponent(uid)}`);
  const agentId = async (agent) => (await h.until(async () => {
    const s = (await api(agent, '/api/status')).cluster;
    return s.stale === false && s;
  }, 10000, 'agent in sync')).agent;
  const closed = async (agent, reason) => {
    const r = await h.admin(agent, 'GET', '/metrics');
    const line = r.text.split('\n').find((l) => l.startsWith(`gopush_connections_closed_total{reason="${reason}"}`));
    return line === undefined ? undefined : Number(line.split(' ').pop());
  };

  /**
   * A socket.io-client that would reconnect (quickly) after anything but a server disconnect;
   * records its disconnect reasons and reconnection attempts.
   */
  const client = async (agent, uid, transports) => {
    const { socket, hello } = await env.connect(agent.url, {
      query: { uid }, transports, reconnection: true, reconnectionDelay: 100, reconnectionDelayMax: 100,
    });
    const seen = { disconnects: [], attempts: 0 };
    socket.on('disconnect', (reason) => seen.disconnects.push(reason));
    socket.io.on('reconnect_attempt', () => { seen.attempts += 1; });
    return { socket, hello, seen };
  };

  /** The kicked client saw "io server disconnect" and, over the window, did not come back. */
  const kickedForGood = async (c, what) => {
    await h.until(() => c.seen.disconnects.length > 0, 5000, `${what}: a disconnect`);
    assert.deepEqual(c.seen.disconnects, ['io server disconnect'], what);
    const until_ = Date.now() + WATCH_MS;
    while (Date.now() < until_) {
      assert.equal(c.seen.attempts, 0, `${what}: no reconnection attempt`);
      assert.equal(c.socket.connected, false, `${what}: stays disconnected`);
      await h.delay(100);
    }
  };

  /** The backends (through the adapter) no longer hold the socket `id`, and still hold `keep`. */
  const backendsLetGo = (asker, id, keep) => h.until(async () => {
    const all = await h.emitAck(asker, 'sockets');
    const ids = all.map((s) => s.id);
    return !ids.includes(id) && ids.includes(keep) && all;
  }, 5000, `the backends to drop socket ${id}`);

  /** Waits until a poll through `agent` is held by the backend (counted as an active request). */
  const pollHeld = (agent) => h.until(async () => {
    const st = await api(agent, '/api/status');
    return st.pools[0].backends.some((x) => x.active_requests > 0);
  }, 5000, 'the poll to be held by the backend');

  /** `DELETE /api/connections/{agent}/{id}` through `via`, for a listed id `agent/id`. */
  const adminClose = async (via, id) => {
    const r = await h.admin(via, 'DELETE', `/api/connections/${id.split('/').map(encodeURIComponent).join('/')}`);
    assert.equal(r.status, 202, r.text);
  };

  for (const transport of ['websocket', 'polling']) {
    it(`close_oldest: a second connection through the other agent closes the first (${transport})`, async () => {
      const uid = `one-${transport}`;
      const before = await closed(a1, 'close_oldest');
      const first = await client(a1, uid, [transport]);
      await h.until(async () => (await user(a2, uid)).connections.length === 1, 5000, 'the first connection listed');
      const second = await client(a2, uid, ['websocket']);
      await kickedForGood(first, `first (${transport})`);
      assert.equal(second.socket.connected, true, 'the second stays');
      assert.deepEqual(second.seen.disconnects, []);
      const u = await h.until(async () => {
        const v = await user(a1, uid);
        return v.stale === false && v.connections.length === 1 && v;
      }, 5000, 'the directory to show one connection');
      assert.equal(u.connections[0].agent, await agentId(a2), JSON.stringify(u));
      assert.equal(u.connections[0].transport, 'websocket');
      await backendsLetGo(second.socket, first.socket.id, second.socket.id);
      // Closed by the agent that held it, counted there.
      assert.equal(await closed(a1, 'close_oldest'), before + 1);
      // And the one left is the one a third connection closes next (it is the oldest now).
      const third = await client(a1, uid, ['polling']);
      await kickedForGood(second, 'second, closed by a third');
      assert.equal(third.socket.connected, true);
      third.socket.close();
      await h.until(async () => (await user(a2, uid)).connections.length === 0, 5000, 'no connection left');
    });
  }

  for (const transport of ['websocket', 'polling']) {
    it(`DELETE /api/connections/{agent}/{id} closes one ${transport} connection, asked from the agent that does not hold it`, async () => {
      const uid = `admin-${transport}`;
      const other = `bystander-${transport}`;
      const before = await closed(a2, 'admin');
      const victim = await client(a2, uid, [transport]);
      const bystander = await client(a1, other, ['websocket']);
      const [id] = (await h.until(async () => {
        const v = await user(a1, uid);
        return v.connections.length === 1 && v.connections.map((c) => c.id);
      }, 5000, 'the connection listed'));
      const [agent, conn] = id.split('/');
      // Unknown connection of this agent: 404, nothing closed.
      const none = await h.admin(a2, 'DELETE', `/api/connections/${encodeURIComponent(agent)}/nope`);
      assert.equal(none.status, 404, none.text);
      assert.equal(victim.socket.connected, true);
      // GET is not the way to close.
      assert.equal((await h.admin(a1, 'GET', `/api/connections/${agent}/${conn}`)).status, 405);
      // Asked from a1; a2 holds it (a command through Redis).
      await adminClose(a1, id);
      await kickedForGood(victim, `admin-closed ${transport}`);
      await h.until(async () => (await user(a1, uid)).connections.length === 0, 5000, 'the directory to drop it');
      await backendsLetGo(bystander.socket, victim.socket.id, bystander.socket.id);
      assert.equal(bystander.socket.connected, true);
      assert.equal(await closed(a2, 'admin'), before + 1);
      bystander.socket.close();
    });
  }

  it('a closed polling session, on the wire: the pending poll gets 41, the next the close, the backend forgets it', async () => {
    const base = `${a1.url}/socket.io/?EIO=4&transport=polling&uid=raw`;
    const get = async (q = '') => {
      const r = await fetch(`${base}${q}`, { signal: AbortSignal.timeout(10000) });
      return { status: r.status, body: await r.text() };
    };
    const open = await get();
    assert.equal(open.status, 200, open.body);
    const { sid } = JSON.parse(open.body.slice(1));
    const [id] = await h.until(async () => {
      const v = await user(a2, 'raw');
      return v.connections.length === 1 && v.connections.map((c) => c.id);
    }, 5000, 'the session listed');
    assert.equal(id, `${await agentId(a1)}/${sid}`);
    // A poll the backend holds (it has nothing to say yet)...
    const pending = get(`&sid=${sid}`);
    // ... is pending at the backend once the agent counts it as an active request.
    await pollHeld(a1);
    await adminClose(a1, id);
    // The backend answered the held poll (a noop after the Engine.IO close the agent posted); the
    // client got the Socket.IO DISCONNECT instead.
    assert.deepEqual(await pending, { status: 200, body: '41' });
    // A POST (socket.io-client posts its own close then) is acknowledged by the agent.
    const post = await fetch(`${base}&sid=${sid}`, { method: 'POST', body: '1', signal: AbortSignal.timeout(5000) });
    assert.equal(post.status, 200);
    assert.equal(await post.text(), 'ok');
    // The next poll: the Engine.IO close, from the agent.
    assert.deepEqual(await get(`&sid=${sid}`), { status: 200, body: '1' });
    // After that the agent forgets the session: the backend no longer knows it.
    const after = await get(`&sid=${sid}`);
    assert.equal(after.status, 400, after.body);
    assert.match(after.body, /Session ID unknown/);
    await h.until(async () => (await user(a2, 'raw')).connections.length === 0, 5000, 'the directory to drop it');
  });

  it('a closed polling session whose polls reach the other agent: that agent answers the goodbye, and so does an agent started later', async () => {
    // The session's agent is a1 (its handshake); its polls go through a2.
    const url = (a) => `${a.url}/socket.io/?EIO=4&transport=polling&uid=across`;
    const get = async (a, q = '') => {
      const r = await fetch(`${url(a)}${q}`, { signal: AbortSignal.timeout(10000) });
      return { status: r.status, body: await r.text() };
    };
    const open = await get(a1);
    assert.equal(open.status, 200, open.body);
    const { sid } = JSON.parse(open.body.slice(1));
    const [id] = await h.until(async () => {
      const v = await user(a2, 'across');
      return v.connections.length === 1 && v.connections.map((c) => c.id);
    }, 5000, 'the session listed');
    assert.equal(id, `${await agentId(a1)}/${sid}`);
    // The session works through a2 (Socket.IO CONNECT, then its answer).
    const connect = await fetch(`${url(a2)}&sid=${sid}`, { method: 'POST', body: '40', signal: AbortSignal.timeout(5000) });
    assert.equal(connect.status, 200);
    const answer = await get(a2, `&sid=${sid}`);
    assert.equal(answer.status, 200, answer.body);
    assert.match(answer.body, /^40\{"sid"/);
    // A poll through a2 that the backend holds...
    const pending = get(a2, `&sid=${sid}`);
    await pollHeld(a2);
    // ... when a1 closes the session (asked through a2: a command to a1 through Redis).
    await adminClose(a2, id);
    // a2 got a1's goodbye (P:bye) before the backend answered the held poll: the client gets the
    // DISCONNECT. Under load the backend's noop can win that race (the message is on its way,
    // not waited for); then the next poll gets the DISCONNECT (from the message, or from the
    // backend's 400 and the marker).
    const held = await pending;
    assert.equal(held.status, 200);
    if (held.body !== '41') {
      assert.equal(held.body, '6', 'the backend\'s noop, if not the goodbye');
      assert.deepEqual(await get(a2, `&sid=${sid}`), { status: 200, body: '41' });
    }
    const post = await fetch(`${url(a2)}&sid=${sid}`, { method: 'POST', body: '1', signal: AbortSignal.timeout(5000) });
    assert.equal(await post.text(), 'ok');
    assert.deepEqual(await get(a2, `&sid=${sid}`), { status: 200, body: '1' });
    // An agent that was not running at the close learns it from the shared sid memory.
    const a3 = await env.startAgent(await env.makeConfig({
      port: await h.freePort(),
      pools: { default: env.backends.map((b) => b.addr) },
      sources: [{ query: 'uid' }],
      extra: { cluster: { redis: env.redis.url, heartbeat: '500ms', ttl: '3s', timeout: '300ms' } },
    }));
    await agentId(a3);
    assert.deepEqual(await get(a3, `&sid=${sid}`), { status: 200, body: '41' });
    assert.deepEqual(await get(a3, `&sid=${sid}`), { status: 200, body: '1' });
    // Each of its two polls asked (the marker is not learnt as a backend).
    const lookups = await h.admin(a3, 'GET', '/metrics');
    assert.match(lookups.text, /gopush_cluster_sid_lookups_total\{result="closed"\} 2\n/);
  });

  it('an agent that missed the goodbye message turns the backend\'s 400 into the goodbye (the marker in the shared sid memory)', async () => {
    const url = (a) => `${a.url}/socket.io/?EIO=4&transport=polling&uid=missed`;
    const get = async (a, q) => {
      const r = await fetch(`${url(a)}${q}`, { signal: AbortSignal.timeout(10000) });
      return { status: r.status, body: await r.text() };
    };
    const open = await get(a1, '');
    const { sid } = JSON.parse(open.body.slice(1));
    const [id] = await h.until(async () => {
      const v = await user(a2, 'missed');
      return v.connections.length === 1 && v.connections.map((c) => c.id);
    }, 5000, 'the session listed');
    // a2 knows the session (its polls went there).
    const connect = await fetch(`${url(a2)}&sid=${sid}`, { method: 'POST', body: '40', signal: AbortSignal.timeout(5000) });
    assert.equal(await connect.text(), 'ok');
    assert.match((await get(a2, `&sid=${sid}`)).body, /^40\{"sid"/);
    const lookups = async () => {
      const line = (await h.admin(a2, 'GET', '/metrics')).text.split('\n')
        .find((l) => l.startsWith('gopush_cluster_sid_lookups_total{result="closed"}'));
      return line === undefined ? 0 : Number(line.split(' ').pop());
    };
    const before = await lookups();
    const listening = async () => (await h.redisCli(['-p', String(env.redis.port), 'PUBSUB', 'NUMSUB', 'gopush:bye'])).trim().split('\n').pop();
    const agentsListening = await listening();
    // Every agent's pub/sub connection dropped (they come back after 500 ms): a2 misses P:bye.
    await h.redisCli(['-p', String(env.redis.port), 'CLIENT', 'KILL', 'TYPE', 'pubsub']);
    await adminClose(a1, id);
    // Through a2: the backend's noop to a poll it held when the close came, if any, then its 400,
    // which a2 turns into the goodbye after reading the marker.
    const bodies = [];
    for (let i = 0; i < 3 && bodies.at(-1) !== '41'; i++) {
      const r = await get(a2, `&sid=${sid}`);
      assert.equal(r.status, 200, r.body);
      bodies.push(r.body);
    }
    assert.equal(bodies.at(-1), '41', JSON.stringify(bodies));
    assert.ok(bodies.slice(0, -1).every((b) => b === '6'), JSON.stringify(bodies));
    assert.equal(await lookups(), before + 1, 'the marker was read');
    assert.deepEqual(await get(a2, `&sid=${sid}`), { status: 200, body: '1' });
    // Then the backend answers again: the marker does not start the goodbye over.
    const after = await get(a2, `&sid=${sid}`);
    assert.equal(after.status, 400, after.body);
    // The agents subscribe again.
    await h.until(async () => (await listening()) === agentsListening, 5000, 'the agents listening again');
  });

  // An L4 balancer without stickiness in front of both agents, and clients that open a new TCP
  // connection for each request (`agent: false`): round-robin (polls alternate between the
  // agents), and "moved" (the handshake reached a1, every later connection reaches a2, as when
  // a balancer takes a1 out of rotation): the held poll is then always on the other agent.
  for (const mode of ['round-robin', 'moved']) {
    it(`socket.io-clients polling through a ${mode} TCP balancer are closed cleanly`, async () => {
      const net = require('node:net');
      let turn = 0;
      const pick = () => (mode === 'moved' ? (turn++ === 0 ? a1 : a2) : [a1, a2][turn++ % 2]);
      const lb = net.createServer((c) => {
        const up = net.connect(Number(new URL(pick().url).port), '127.0.0.1');
        c.pipe(up).pipe(c);
        const end = () => { c.destroy(); up.destroy(); };
        c.on('error', end);
        up.on('error', end);
      });
      await new Promise((resolve) => lb.listen(0, '127.0.0.1', resolve));
      try {
        const base = `http://127.0.0.1:${lb.address().port}`;
        for (let i = 0; i < 3; i++) {
          turn = 0;
          const uid = `${mode}-${i}`;
          const { socket, hello } = await env.connect(base, {
            query: { uid }, transports: ['polling'], agent: false,
            reconnection: true, reconnectionDelay: 100, reconnectionDelayMax: 100,
          });
          const c = { socket, hello, seen: { disconnects: [], attempts: 0 } };
          socket.on('disconnect', (reason) => c.seen.disconnects.push(reason));
          socket.io.on('reconnect_attempt', () => { c.seen.attempts += 1; });
          // The session works across the agents.
          for (let k = 0; k < 4; k++) assert.ok((await h.emitAck(socket, 'sockets')).length > 0);
          const [id] = await h.until(async () => {
            const v = await user(a1, uid);
            return v.connections.length === 1 && v.connections.map((x) => x.id);
          }, 5000, 'the session listed');
          await adminClose(i % 2 ? a1 : a2, id);
          await kickedForGood(c, `${mode} client ${i}`);
        }
      } finally {
        lb.close();
      }
    });
  }

  // Last: it stops Redis for good.
  it('with Redis down, close_oldest sees and closes only the agent\'s own connections', async () => {
    const uid = 'offline-redis';
    await env.redis.proc.kill('SIGKILL');
    for (const a of [a1, a2]) {
      await h.until(async () => (await api(a, '/api/status')).cluster.stale === true, 5000, 'the agent to notice Redis is gone');
    }
    const first = await client(a1, uid, ['websocket']);
    // Through the other agent: it cannot see the first, so nothing is closed.
    const elsewhere = await client(a2, uid, ['websocket']);
    // Through the same agent: its own oldest is closed.
    const second = await client(a1, uid, ['websocket']);
    await kickedForGood(first, 'first, closed by its own agent');
    assert.equal(second.socket.connected, true);
    assert.equal(elsewhere.socket.connected, true, 'per agent: the other agent\'s connection stays');
    assert.deepEqual(elsewhere.seen.disconnects, []);
    for (const c of [second, elsewhere]) c.socket.close();
  });
});
