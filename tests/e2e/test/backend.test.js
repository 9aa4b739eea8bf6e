'use strict';
// Self-test of the harness, without the agent: redis + two backends + socket.io-client directly.
// If this file fails, the other files' failures say nothing about gopush.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../lib/harness');

describe('test backends without the agent', { timeout: 30_000 }, () => {
  let env;
  let A;
  let B;

  before(async () => {
    env = new h.TestEnv('backend');
    await env.startRedis();
    [A, B] = await env.startBackends(2);
  });

  after(async () => {
    if (env) await env.close();
  });

  for (const [name, opts] of [['polling', { transports: ['polling'] }], ['websocket', { transports: ['websocket'] }], ['default', {}]]) {
    it(`hello reports what the backend saw (${name})`, async () => {
      const { socket, hello } = await env.connect(`http://127.0.0.1:${A.port}`, {
        ...opts, query: { uid: 'q1' }, extraHeaders: { cookie: 'uid=alice', 'x-gopush-uid': 'hdr' },
      });
      try {
        assert.equal(hello.port, A.port);
        assert.equal(hello.uid, 'q1');
        assert.equal(hello.header, 'hdr');
        assert.equal(hello.headers.cookie, 'uid=alice', 'extraHeaders cookie must reach the backend');
        assert.deepEqual(await h.emitAck(socket, 'echo', { x: 1 }), { x: 1 });
        if (name === 'default') {
          await h.waitUpgraded(socket);
          assert.equal((await h.emitAck(socket, 'whoami')).transport, 'websocket');
        }
      } finally {
        socket.close();
      }
    });
  }

  it('room messages cross backends through redis', async () => {
    const X = await env.connect(`http://127.0.0.1:${A.port}`, { query: { uid: 'x' } });
    const Y = await env.connect(`http://127.0.0.1:${B.port}`, { transports: ['polling'], query: { uid: 'y' } });
    try {
      await h.emitAck(Y.socket, 'room', { room: 'r1' });
      const got = h.once(Y.socket, 'msg', 5000, "'msg' on Y");
      await h.emitAck(X.socket, 'room', { room: 'r1', event: 'msg', text: 'hi' });
      assert.deepEqual(await got, { text: 'hi' });
    } finally {
      X.socket.close();
      Y.socket.close();
    }
  });

  it('GET /whoami', async () => {
    const r = await h.httpGet(`http://127.0.0.1:${B.port}/whoami?uid=z`, { headers: { 'x-gopush-uid': 'z' } });
    assert.equal(r.status, 200);
    const w = JSON.parse(r.body);
    assert.equal(w.port, B.port);
    assert.equal(w.uid_query, 'z');
    assert.equal(w.uid_header, 'z');
    assert.equal(w.url, '/whoami?uid=z');
  });
});
