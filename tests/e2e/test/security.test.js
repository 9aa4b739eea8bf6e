'use strict';
// Scenario 4: the backend only ever sees the uid the agent resolved. A client that sends
// `?uid=mallory` and `x-gopush-uid: mallory` next to its `uid=alice` cookie (cookie is the first
// source) must reach the backend as alice, with no trace of mallory. Plus the error statuses:
// no uid -> 430, invalid uid -> 400, unknown product -> 404, all backends down -> 503.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../lib/harness');

const POLL = '/socket.io/?EIO=4&transport=polling';

describe('uid spoofing and error statuses', { timeout: 60_000 }, () => {
  let s;
  let deadPorts;

  before(async () => {
    deadPorts = await h.freePorts(2); // nothing listens there
    s = await h.startStandard('security', {
      pools: { dead: deadPorts.map((p) => `127.0.0.1:${p}`) },
      healthCheck: { kind: 'tcp', interval: '200ms' },
    });
  });

  after(async () => {
    if (s) await s.env.close();
  });

  const MODES = [
    { name: 'polling', opts: { transports: ['polling'] } },
    { name: 'websocket', opts: { transports: ['websocket'] } },
    { name: 'default (upgrade)', opts: {}, upgrade: true },
  ];

  for (const mode of MODES) {
    it(`cookie uid beats spoofed query uid and x-gopush-uid header (${mode.name})`, async () => {
      const alice = await h.gopushRoute(s.agent.configFile, 'alice');
      const { socket, hello } = await s.env.connect(s.agent.url, {
        ...mode.opts,
        query: { uid: 'mallory' },
        extraHeaders: { cookie: 'uid=alice', 'x-gopush-uid': 'mallory' },
      });
      try {
        assert.equal(hello.port, h.portOf(alice), 'alice must be routed as alice');
        assert.equal(hello.uid, 'alice', `handshake query uid: ${JSON.stringify(hello.query)}`);
        assert.equal(hello.header, 'alice', `x-gopush-uid header: ${JSON.stringify(hello.header)}`);
        const seen = JSON.stringify({ query: hello.query, url: hello.url, headers: hello.headers });
        assert.ok(!/mallory/i.test(seen), `backend handshake still carries mallory: ${seen}`);
        if (mode.upgrade) {
          await h.waitUpgraded(socket);
          const me = await h.emitAck(socket, 'whoami');
          assert.equal(me.port, h.portOf(alice));
          assert.equal(me.uid, 'alice');
        }
      } finally {
        socket.close();
      }
    });
  }

  it('plain HTTP: backend sees only the resolved uid, plus forwarding headers', async () => {
    const r = await h.httpGet(`${s.agent.url}/whoami?uid=mallory&x=1&uid=mallory2`, {
      headers: { cookie: 'uid=alice', 'x-gopush-uid': 'mallory' },
    });
    assert.equal(r.status, 200, r.body);
    const w = JSON.parse(r.body);
    assert.equal(w.uid_query, 'alice', `backend query uid: ${JSON.stringify(w.uid_query)} (url ${w.url})`);
    assert.equal(w.uid_header, 'alice', `backend x-gopush-uid: ${JSON.stringify(w.uid_header)}`);
    assert.ok(!/mallory/i.test(JSON.stringify(w)), `mallory leaked to the backend: ${r.body}`);
    assert.match(w.url, /[?&]x=1(&|$)/, 'other query parameters must be kept');
    assert.match(String(w.headers['x-forwarded-for'] || ''), /127\.0\.0\.1/, 'X-Forwarded-For');
    assert.equal(w.headers['x-real-ip'], '127.0.0.1', 'X-Real-IP');
    assert.equal(w.headers['x-forwarded-proto'], 'http', 'X-Forwarded-Proto');
  });

  it('query uid is used when there is no cookie, header source when neither', async () => {
    const q = await h.httpGet(`${s.agent.url}/whoami?uid=quentin`, { headers: { 'x-gopush-uid': 'mallory' } });
    assert.equal(q.status, 200, q.body);
    const wq = JSON.parse(q.body);
    assert.equal(wq.uid_query, 'quentin');
    assert.equal(wq.uid_header, 'quentin');

    const hd = await h.httpGet(`${s.agent.url}/whoami`, { headers: { 'x-user-id': 'henry', 'x-gopush-uid': 'mallory' } });
    assert.equal(hd.status, 200, hd.body);
    const wh = JSON.parse(hd.body);
    assert.equal(wh.uid_query, 'henry');
    assert.equal(wh.uid_header, 'henry');
    assert.equal(wh.port, h.portOf(await h.gopushRoute(s.agent.configFile, 'henry')));
  });

  it('missing uid -> 430 naming the sources; x-gopush-uid alone is not a source', async () => {
    for (const headers of [{}, { 'x-gopush-uid': 'mallory' }, { cookie: 'other=1' }]) {
      const r = await h.httpGet(`${s.agent.url}${POLL}`, { headers });
      assert.equal(r.status, 430, `headers ${JSON.stringify(headers)}: ${r.status} ${r.body}`);
      assert.match(r.body, /^gopush: no uid/, r.body);
      assert.match(r.body, /cookie/i, `430 body should name the cookie source: ${r.body}`);
      assert.match(r.body, /query/i, `430 body should name the query source: ${r.body}`);
      assert.match(r.body, /x-user-id/i, `430 body should name the header source: ${r.body}`);
    }
    // and socket.io-client reports the failure instead of connecting
    await assert.rejects(h.connect(s.agent.url, { transports: ['polling'] }), /connect_error/);
  });

  it('invalid uid (> 256 bytes) -> 400', async () => {
    const r = await h.httpGet(`${s.agent.url}${POLL}`, { headers: { cookie: `uid=${'a'.repeat(257)}` } });
    assert.equal(r.status, 400, r.body);
    assert.match(r.body, /^gopush: invalid uid/, r.body);
    const ok = await h.httpGet(`${s.agent.url}/whoami`, { headers: { cookie: `uid=${'a'.repeat(256)}` } });
    assert.equal(ok.status, 200, `a 256-byte uid is valid: ${ok.body}`);
  });

  it('unknown product -> 404', async () => {
    const r = await h.httpGet(`${s.agent.url}${POLL}&product=nope&uid=alice`);
    assert.equal(r.status, 404, r.body);
    assert.match(r.body, /^gopush: unknown product/, r.body);
  });

  it('all backends of the pool down -> 503', async () => {
    const url = `${s.agent.url}${POLL}&product=dead&uid=alice`;
    // the health check (200 ms) has to notice first; poll, bounded
    const r = await h.poll(async () => {
      const x = await h.httpGet(url);
      return x.status === 503 ? x : false;
    }, { attempts: 30, delayMs: 100, maxDelayMs: 300, what: 'HTTP 503 for a pool whose backends are all down' });
    assert.match(r.body, /^gopush: no healthy backend/, r.body);
    // the healthy pools are unaffected
    const ok = await h.httpGet(`${s.agent.url}/whoami?uid=alice`);
    assert.equal(ok.status, 200, ok.body);
  });
});
