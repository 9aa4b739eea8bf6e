'use strict';
// Auth callback uid source (like nginx auth_request): the agent asks a small real app (a Node
// http server started here) who the `session` cookie belongs to. Answers are cached per exact
// credential; a refusal is 430; an app that does not answer in time is 503, never a hang.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const http = require('node:http');
const h = require('../lib/harness');

const POLL = '/socket.io/?EIO=4&transport=polling';
const CANDIDATES = ['alice', 'bob', 'carol', 'dave', 'erin', 'frank', 'grace', 'heidi', 'ivan', 'judy',
  'user-1', 'user-2', 'user-3', 'user-4', 'user-5', 'user-6'];

/**
 * The user's app: GET /whoami reads `cookie: session=...`.
 *   session=ok-NAME    -> 200, x-uid: NAME
 *   session=json-NAME  -> 200, {"uid": "NAME"}
 *   session=no         -> 401
 *   session=slow       -> never answers
 * Counts the questions per session value.
 */
async function startApp() {
  const hits = new Map();
  const held = new Set();
  const server = http.createServer((req, res) => {
    const m = /(?:^|;\s*)session=([^;]*)/.exec(req.headers.cookie || '');
    const session = m ? m[1] : '';
    hits.set(session, (hits.get(session) || 0) + 1);
    if (req.url !== '/whoami') { res.writeHead(404); res.end(); return; }
    if (session.startsWith('ok-')) { res.writeHead(200, { 'x-uid': session.slice(3), 'content-length': 0 }); res.end(); return; }
    if (session.startsWith('json-')) {
      const body = JSON.stringify({ uid: session.slice(5) });
      res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
      res.end(body);
      return;
    }
    if (session === 'slow') { held.add(res); return; }
    res.writeHead(401, { 'content-length': 0 });
    res.end();
  });
  const port = await h.freePort();
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', resolve);
  });
  return {
    port,
    hits,
    close: () => new Promise((resolve) => {
      for (const res of held) res.destroy();
      server.closeAllConnections();
      server.close(() => resolve());
    }),
  };
}

describe('auth callback uid source', { timeout: 90_000 }, () => {
  let env;
  let app;
  let agent;
  let sample;

  before(async () => {
    env = new h.TestEnv('callback');
    app = await startApp();
    await env.startRedis();
    const A = await env.startBackend();
    const B = await env.startBackend();
    const port = await h.freePort();
    const cfg = env.makeConfig({
      port,
      pools: { default: [A.addr, B.addr] },
      sources: [
        { callback: { url: `http://127.0.0.1:${app.port}/whoami`, forward: ['cookie'], timeout: '300ms', cache: '30s' } },
        { query: 'uid' },
      ],
    });
    agent = await env.startAgent(cfg);
    const byBackend = await h.pickUids(agent.configFile, [A.addr, B.addr], 2, CANDIDATES);
    sample = [...byBackend].flatMap(([addr, uids]) => uids.map((uid) => ({ uid, addr })));
  });

  after(async () => {
    if (env) await env.close();
    if (app) await app.close();
  });

  const MODES = [
    { name: 'polling', opts: { transports: ['polling'] } },
    { name: 'websocket', opts: { transports: ['websocket'] } },
    { name: 'upgrade', opts: {}, upgrade: true },
  ];

  for (const mode of MODES) {
    it(`the app names the uid; it lands on the ring's backend (${mode.name})`, async () => {
      for (const { uid, addr } of sample) {
        const { socket, hello } = await env.connect(agent.url, {
          ...mode.opts, extraHeaders: { cookie: `session=ok-${uid}` },
        });
        try {
          assert.equal(hello.port, h.portOf(addr), `${uid} landed on ${hello.port}, ring says ${addr}`);
          assert.equal(hello.uid, uid);
          assert.equal(hello.header, uid);
          if (mode.upgrade) {
            await h.waitUpgraded(socket);
            const me = await h.emitAck(socket, 'whoami');
            assert.equal(me.port, h.portOf(addr));
            assert.equal(me.transport, 'websocket');
          }
        } finally {
          socket.close();
        }
      }
    });
  }

  it('answers are cached per credential: one question for many requests', async () => {
    const cookie = 'session=json-zoe';
    for (let i = 0; i < 5; i++) {
      const r = await h.httpGet(`${agent.url}/whoami`, { headers: { cookie } });
      assert.equal(r.status, 200, r.body);
      assert.equal(JSON.parse(r.body).uid_query, 'zoe');
    }
    assert.equal(app.hits.get('json-zoe'), 1, 'the app was asked once');
    // A socket.io session (handshake, polls, upgrade) is all cache hits for a known credential.
    const { socket } = await env.connect(agent.url, { extraHeaders: { cookie } });
    await h.waitUpgraded(socket);
    socket.close();
    assert.equal(app.hits.get('json-zoe'), 1);
  });

  it('cached answers never cross credentials', async () => {
    const names = ['yann', 'yves', 'yuri', 'yara'];
    for (let round = 0; round < 2; round++) {
      for (const n of names) {
        const r = await h.httpGet(`${agent.url}/whoami`, { headers: { cookie: `session=ok-${n}` } });
        assert.equal(JSON.parse(r.body).uid_query, n, `round ${round}`);
      }
    }
    for (const n of names) assert.equal(app.hits.get(`ok-${n}`), 1);
  });

  it('a refusal is 430; no credentials falls through to the next source', async () => {
    const r = await h.httpGet(`${agent.url}${POLL}`, { headers: { cookie: 'session=no' } });
    assert.equal(r.status, 430, r.body);
    assert.match(r.body, /refused the credentials/);
    const q = await h.httpGet(`${agent.url}/whoami?uid=quinn`);
    assert.equal(q.status, 200, q.body);
    assert.equal(JSON.parse(q.body).uid_query, 'quinn');
    const none = await h.httpGet(`${agent.url}${POLL}`);
    assert.equal(none.status, 430, none.body);
    assert.match(none.body, /auth callback http:\/\/127\.0\.0\.1/);
  });

  it('an app that does not answer -> 503 within the timeout, and the agent keeps serving', async () => {
    const started = Date.now();
    const r = await h.httpGet(`${agent.url}${POLL}`, { headers: { cookie: 'session=slow' }, timeoutMs: 5000 });
    assert.equal(r.status, 503, r.body);
    assert.ok(Date.now() - started < 2000, `took ${Date.now() - started} ms`);
    await agent.proc.waitForOutput(/auth callback timed out/, 5000, 'the timeout in the log');
    const ok = await h.httpGet(`${agent.url}/whoami`, { headers: { cookie: 'session=ok-alice' } });
    assert.equal(ok.status, 200, ok.body);
  });
});
