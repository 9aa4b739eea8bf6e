'use strict';
// JavaScript hooks: the uid comes from a uid hook (a session cookie with a prefix, or ?uid=),
// over polling, websocket and the polling -> websocket upgrade; a route hook sends product `test`
// to a fixed backend and everything else to the hashed default pool (the original gopush's own
// scenario); a hook that throws or loops fails only its request; a SIGHUP reload recompiles.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const h = require('../lib/harness');

const POLL = '/socket.io/?EIO=4&transport=polling';
const CANDIDATES = ['alice', 'bob', 'carol', 'dave', 'erin', 'frank', 'grace', 'heidi', 'ivan', 'judy',
  'user-1', 'user-2', 'user-3', 'user-4', 'user-5', 'user-6', 'user-7', 'user-8', 'user-9', '42'];

const UID_JS = `// test uid hook
module.exports = function uid(req) {
  if (req.query.spin) { while (true) {} }
  if (req.query.boom) { throw new Error('boom requested'); }
  const s = req.cookies.session;
  if (s && s.startsWith('u:')) return s.slice(2);
  return req.query.uid || null;
};
`;

const routeJs = (port) => `module.exports = function route(req, uid) {
  if (req.product === 'test') return { ip: '127.0.0.1', port: ${port} };
  return null;
};
`;

describe('JavaScript uid and route hooks', { timeout: 120_000 }, () => {
  let env;
  let A;
  let B;
  let T;
  let agent;
  let sample; // [{uid, addr}] covering A and B

  before(async () => {
    env = new h.TestEnv('hooks');
    await env.startRedis();
    A = await env.startBackend();
    B = await env.startBackend();
    T = await env.startBackend(); // in no pool: only the route hook reaches it
    fs.writeFileSync(path.join(env.dir, 'uid.js'), UID_JS);
    fs.writeFileSync(path.join(env.dir, 'route.js'), routeJs(T.port));
    fs.writeFileSync(path.join(env.dir, 'admin.js'),
      "module.exports = (req) => req.headers['x-hook-pass'] === 'yes' && req.ip === '127.0.0.1';\n");
    const port = await h.freePort();
    const cfg = env.makeConfig({
      port,
      pools: { default: [A.addr, B.addr] },
      extra: {
        uid: { forward: { header: 'x-gopush-uid', query: 'uid' } },
        hooks: { uid: 'uid.js', route: 'route.js', admin: 'admin.js', timeout: '50ms' },
      },
    });
    agent = await env.startAgent(cfg);
    const byBackend = await h.pickUids(agent.configFile, [A.addr, B.addr], 2, CANDIDATES);
    sample = [...byBackend].flatMap(([addr, uids]) => uids.map((uid) => ({ uid, addr })));
  });

  after(async () => {
    if (env) await env.close();
  });

  it('gopush check compiles the hooks', async () => {
    const r = await h.execGopush(['check', '-c', agent.configFile]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /hook uid: .*uid\.js \(compiled\)/);
    assert.match(r.stdout, /hook route: .*route\.js \(compiled\)/);
  });

  const MODES = [
    { name: 'polling', opts: { transports: ['polling'] }, transport: 'polling' },
    { name: 'websocket', opts: { transports: ['websocket'] }, transport: 'websocket' },
    { name: 'upgrade', opts: {}, transport: 'polling', upgrade: true },
  ];

  for (const mode of MODES) {
    it(`uid from the hook (session cookie) lands on the ring's backend: ${mode.name}`, async () => {
      for (const { uid, addr } of sample) {
        const { socket, hello } = await env.connect(agent.url, {
          ...mode.opts, extraHeaders: { cookie: `session=u:${uid}` },
        });
        try {
          assert.equal(hello.port, h.portOf(addr), `${uid} landed on ${hello.port}, ring says ${addr}`);
          assert.equal(hello.uid, uid, 'backend handshake query uid');
          assert.equal(hello.header, uid, 'backend x-gopush-uid header');
          assert.equal(hello.transport, mode.transport);
          if (mode.upgrade) {
            await h.waitUpgraded(socket);
            const me = await h.emitAck(socket, 'whoami');
            assert.equal(me.transport, 'websocket');
            assert.equal(me.port, h.portOf(addr), 'the upgrade stays on the same backend');
            assert.equal(me.sid, hello.sid);
          }
        } finally {
          socket.close();
        }
      }
    });
  }

  it('uid from the hook via ?uid= (no cookie), websocket only', async () => {
    for (const { uid, addr } of sample) {
      const { socket, hello } = await env.connect(agent.url, { transports: ['websocket'], query: { uid } });
      socket.close();
      assert.equal(hello.port, h.portOf(addr));
      assert.equal(hello.uid, uid);
    }
  });

  it('route hook: product test goes to the fixed backend, everything else is hashed', async () => {
    for (const mode of MODES) {
      for (const { uid, addr } of sample) {
        const t = await env.connect(agent.url, {
          ...mode.opts, query: { product: 'test' }, extraHeaders: { cookie: `session=u:${uid}` },
        });
        t.socket.close();
        assert.equal(t.hello.port, T.port, `${mode.name} ${uid} product=test`);
        assert.equal(t.hello.uid, uid);
        const d = await env.connect(agent.url, { ...mode.opts, extraHeaders: { cookie: `session=u:${uid}` } });
        d.socket.close();
        assert.equal(d.hello.port, h.portOf(addr), `${mode.name} ${uid} without product`);
      }
    }
    const r = await h.httpGet(`${agent.url}/whoami?product=test`, { headers: { cookie: 'session=u:alice' } });
    assert.equal(r.status, 200, r.body);
    assert.equal(JSON.parse(r.body).port, T.port);
    assert.equal(JSON.parse(r.body).uid_query, 'alice');
    // The hook returned null for an unknown product: the configured pools decide (404).
    const n = await h.httpGet(`${agent.url}/whoami?product=nope`, { headers: { cookie: 'session=u:alice' } });
    assert.equal(n.status, 404, n.body);
  });

  it('no uid from the hook -> 430 naming the hook', async () => {
    const r = await h.httpGet(`${agent.url}${POLL}`, { headers: { cookie: 'session=x:1' } });
    assert.equal(r.status, 430, r.body);
    assert.match(r.body, /no uid/);
    assert.match(r.body, /uid hook .*uid\.js/);
    await assert.rejects(h.connect(agent.url, { transports: ['polling'] }), /connect_error/);
  });

  it('a hook that throws fails only its request (430) and logs file:line', async () => {
    const r = await h.httpGet(`${agent.url}${POLL}&boom=1`, { headers: { cookie: 'session=u:alice' } });
    assert.equal(r.status, 430, r.body);
    assert.doesNotMatch(r.body, /boom requested/, 'the JS error stays in the log');
    await agent.proc.waitForOutput(/uid\.js:4: Error: boom requested/, 5000, 'the hook error in the log');
    const ok = await h.httpGet(`${agent.url}/whoami`, { headers: { cookie: 'session=u:alice' } });
    assert.equal(ok.status, 200, ok.body);
  });

  it('an endless hook is interrupted: 500 for that request, the agent keeps serving', async () => {
    const started = Date.now();
    const r = await h.httpGet(`${agent.url}${POLL}&spin=1`, { headers: { cookie: 'session=u:alice' }, timeoutMs: 5000 });
    assert.equal(r.status, 500, r.body);
    assert.ok(Date.now() - started < 3000, `took ${Date.now() - started} ms`);
    await agent.proc.waitForOutput(/hook uid: interrupted: .*uid\.js/, 5000, 'the interruption in the log');
    // Both worker threads still answer, many times over.
    const results = await h.mapLimit(Array.from({ length: 20 }, (_, i) => i), 4, async () => {
      const x = await h.httpGet(`${agent.url}/whoami`, { headers: { cookie: 'session=u:bob' } });
      return x.status;
    });
    assert.deepEqual([...new Set(results)], [200]);
    // ... and a second endless request is interrupted too, next to normal ones.
    const [spin, normal] = await Promise.all([
      h.httpGet(`${agent.url}${POLL}&spin=1`, { headers: { cookie: 'session=u:alice' } }),
      h.httpGet(`${agent.url}/whoami`, { headers: { cookie: 'session=u:carol' } }),
    ]);
    assert.equal(spin.status, 500);
    assert.equal(normal.status, 200);
  });

  it('the admin hook guards the admin API; hook counters are in /metrics', async () => {
    const refused = await h.admin(agent, 'GET', '/api/status');
    assert.equal(refused.status, 401, refused.text);
    const admitted = await h.admin(agent, 'GET', '/api/status', { headers: { 'x-hook-pass': 'yes' } });
    assert.equal(admitted.status, 200, admitted.text);
    const metrics = await h.admin(agent, 'GET', '/metrics', { headers: { 'x-hook-pass': 'yes' } });
    assert.equal(metrics.status, 200, metrics.text);
    const count = (result) => {
      const m = new RegExp(`^gopush_hooks_total\\{result="${result}"\\} (\\d+)$`, 'm').exec(metrics.text);
      return m ? Number(m[1]) : -1;
    };
    assert.ok(count('timeout') >= 2, `hook timeouts in /metrics: ${count('timeout')}`);
    assert.ok(count('error') >= 1, `hook errors in /metrics: ${count('error')}`);
    assert.ok(count('call') > count('timeout') + count('error'), `hook calls in /metrics: ${count('call')}`);
  });

  it('SIGHUP reload recompiles the hooks (a new route takes effect)', async () => {
    const before = await h.httpGet(`${agent.url}/whoami?product=test`, { headers: { cookie: 'session=u:alice' } });
    assert.equal(JSON.parse(before.body).port, T.port);
    fs.writeFileSync(path.join(env.dir, 'route.js'), routeJs(A.port));
    process.kill(agent.proc.pid, 'SIGHUP');
    await agent.proc.waitForOutput(/configuration reloaded/, 5000, 'the reload');
    // Every worker thread recompiles on its next hook call: all answers move to A.
    const ports = await h.mapLimit(Array.from({ length: 10 }, (_, i) => i), 2, async () => {
      const r = await h.httpGet(`${agent.url}/whoami?product=test`, { headers: { cookie: 'session=u:alice' } });
      return JSON.parse(r.body).port;
    });
    assert.deepEqual([...new Set(ports)], [A.port]);
    // A broken hook is refused by the reload; the running hooks stay.
    fs.writeFileSync(path.join(env.dir, 'route.js'), 'module.exports = function (req) {\n  return (;\n};\n');
    process.kill(agent.proc.pid, 'SIGHUP');
    await agent.proc.waitForOutput(/reload refused.*route\.js:2/, 5000, 'the refused reload naming route.js:2');
    const still = await h.httpGet(`${agent.url}/whoami?product=test`, { headers: { cookie: 'session=u:alice' } });
    assert.equal(JSON.parse(still.body).port, A.port);
  });
});
