'use strict';
// Presence webhooks (issue 14, item 4): a gopush agent on a real redis-server with a real
// socket.io backend and real socket.io-clients; a small Node HTTP receiver in the test checks
// every delivery's HMAC-SHA256 signature over the exact body (node crypto) and records it.
// Every wait is a poll with a deadline.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const http = require('node:http');
const crypto = require('node:crypto');
const h = require('../lib/harness');

const SECRET = 'webhook-test-secret';
const OFFLINE_MS = 1500;

const sigOf = (secret, body) => `sha256=${crypto.createHmac('sha256', secret).update(body).digest('hex')}`;
/** What a receiver does: constant-time comparison of the header with its own HMAC. */
const verify = (secret, body, header) => {
  const want = Buffer.from(sigOf(secret, body));
  const got = Buffer.from(String(header || ''));
  return want.length === got.length && crypto.timingSafeEqual(want, got);
};

/** A receiver on `port`: records verified deliveries (raw body kept), answers 401 to bad ones. */
function startReceiver(port, events) {
  const server = http.createServer((req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      const raw = Buffer.concat(chunks);
      const ok = verify(SECRET, raw, req.headers['x-gopush-signature']);
      events.push({ ok, raw, headers: req.headers, body: JSON.parse(raw.toString()), at: Date.now() });
      res.writeHead(ok ? 204 : 401);
      res.end();
    });
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', () => resolve(server));
  });
}

describe('presence webhooks', { timeout: 120_000 }, () => {
  let env;
  let agent;
  let receiver;
  let hookPort;
  const events = [];
  // De-duplicated by id, as a receiver must (delivery is at least once).
  const of = (uid, type) => {
    const seen = new Map();
    for (const e of events) if (e.body.uid === uid && (!type || e.body.type === type)) seen.set(e.body.id, e);
    return [...seen.values()];
  };

  before(async () => {
    env = new h.TestEnv('webhooks');
    const backend = await env.startBackend();
    const redis = await env.startRedis();
    hookPort = await h.freePort();
    receiver = await startReceiver(hookPort, events);
    const port = await h.freePort();
    agent = await env.startAgent(env.makeConfig({
      port,
      pools: { default: [backend.addr] },
      sources: [{ query: 'uid' }],
      extra: {
        cluster: {
          redis: redis.url,
          heartbeat: '500ms',
          ttl: '3s',
          timeout: '300ms',
          offline_after: `${OFFLINE_MS}ms`,
          webhooks: [{ url: `http://127.0.0.1:${hookPort}/hooks`, secret: SECRET }],
        },
      },
    }));
  });

  after(async () => {
    if (receiver) receiver.close();
    if (env) await env.close();
  });

  it('connect: connection.open + user.online once, signed; close: one user.offline after offline_after', async () => {
    const { socket } = await env.connect(agent.url, { query: { uid: 'ann' }, transports: ['websocket'] });
    await h.until(() => of('ann', 'user.online').length === 1 && of('ann', 'connection.open').length === 1, 5000, 'open + online');
    for (const e of of('ann')) {
      assert.ok(e.ok, 'signature verifies');
      assert.equal(e.headers['x-gopush-delivery'], e.body.id);
      assert.equal(e.headers['x-gopush-event'], e.body.type);
      assert.equal(e.headers['content-type'], 'application/json');
    }
    assert.equal(of('ann', 'connection.open')[0].body.transport, 'websocket');
    socket.disconnect();
    const close = (await h.until(() => of('ann', 'connection.close')[0], 5000, 'connection.close'));
    assert.equal(of('ann', 'user.offline').length, 0, 'no user.offline at the close');
    const off = await h.until(() => of('ann', 'user.offline')[0], OFFLINE_MS + 5000, 'user.offline');
    assert.ok(off.at - close.at >= OFFLINE_MS - 100, `offline ${off.at - close.at} ms after the close`);
    assert.equal(of('ann', 'user.online').length, 1);
    assert.ok(of('ann').every((e) => e.ok));
  });

  it('a polling client upgrading to WebSocket, then a quick reconnect: no offline/online flap', async () => {
    const first = await env.connect(agent.url, { query: { uid: 'bob' } });
    await h.waitUpgraded(first.socket);
    await h.until(() => of('bob', 'user.online').length === 1, 5000, 'online');
    first.socket.disconnect();
    await h.until(() => of('bob', 'connection.close').length === 1, 5000, 'close');
    // Back within the grace.
    const second = await env.connect(agent.url, { query: { uid: 'bob' }, transports: ['websocket'] });
    await h.until(() => of('bob', 'connection.open').length === 2, 5000, 'second open');
    second.socket.disconnect();
    await h.until(() => of('bob', 'user.offline').length === 1, OFFLINE_MS + 5000, 'offline');
    const types = of('bob').map((e) => e.body.type);
    assert.deepEqual(types.filter((t) => t === 'user.online').length, 1, `${types}`);
    assert.deepEqual(types.filter((t) => t === 'user.offline').length, 1, `${types}`);
    // The upgrade is the same connection: one open for it, not two.
    assert.deepEqual(types.filter((t) => t === 'connection.open').length, 2, `${types}`);
    assert.deepEqual(types.filter((t) => t === 'connection.close').length, 2, `${types}`);
    const offline = of('bob', 'user.offline')[0];
    assert.ok(of('bob', 'connection.close').every((c) => c.at <= offline.at));
  });

  it('receiver down then up: the events arrive late (at least once, ids de-duplicate)', async () => {
    await new Promise((r) => receiver.close(r));
    const { socket } = await env.connect(agent.url, { query: { uid: 'cat' }, transports: ['websocket'] });
    socket.disconnect();
    // Down for a while: the agent retries with backoff and keeps proxying.
    const other = await env.connect(agent.url, { query: { uid: 'dan' }, transports: ['websocket'] });
    other.socket.disconnect();
    assert.equal(of('cat').length, 0);
    receiver = await startReceiver(hookPort, events);
    await h.until(() => of('cat', 'user.offline').length === 1, OFFLINE_MS + 15000, 'late delivery');
    const types = of('cat').map((e) => e.body.type).sort();
    assert.deepEqual(types, ['connection.close', 'connection.open', 'user.offline', 'user.online']);
    assert.ok(of('cat').every((e) => e.ok));
  });

  it('a wrong secret fails the signature check (the receiver would reject it)', async () => {
    const e = of('ann', 'user.online')[0];
    assert.ok(verify(SECRET, e.raw, e.headers['x-gopush-signature']));
    assert.ok(!verify('not-the-secret', e.raw, e.headers['x-gopush-signature']));
    // One byte of the body changed fails too.
    const tampered = Buffer.from(e.raw);
    tampered[tampered.length - 2] ^= 1;
    assert.ok(!verify(SECRET, tampered, e.headers['x-gopush-signature']));
  });
});
