'use strict';
// Issue 11, items 1 and 7: whatever query and headers the client sends, the Socket.IO backend's
// decoded view holds exactly the uid gopush resolved: `handshake.query.uid` (engine.io builds it
// with URLSearchParams, last value wins), `URLSearchParams.getAll('uid')` (first value wins for
// `get`), and the `x-gopush-uid` header once `decodeURIComponent`ed (non-ASCII uids are sent
// percent-encoded UTF-8). Query names are compared decoded (`u%69d` is `uid`), `uid[...]` (qs
// arrays) and `x_gopush_uid` (CGI-style look-alike) do not reach the backend.
//
// socket.io-client encodes query keys, so the attack handshakes are raw polling requests: the
// handshake GET, the Socket.IO CONNECT packet (POST `40`), then GETs until `hello` arrives.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const h = require('../lib/harness');

const SECRET = 'e2e-forward-secret-0123456789-abcdef';
const EIO = '/socket.io/?EIO=4&transport=polling';

const b64url = (buf) => Buffer.from(buf).toString('base64url');
function sign(claims) {
  const input = `${b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }))}.${b64url(JSON.stringify(claims))}`;
  return `${input}.${b64url(crypto.createHmac('sha256', SECRET).update(input).digest())}`;
}
const token = (sub) => sign({ sub, exp: Math.floor(Date.now() / 1000) + 300 });

/** Engine.IO v4 polling payload -> packets. */
const packets = (body) => body.split('\x1e').filter(Boolean);

/**
 * A Socket.IO handshake over raw polling requests: `query` is appended to the handshake URL as
 * it is (no encoding); `follow` (the uid part, for routing) to the follow-up requests.
 */
async function rawHello(base, query, follow, headers = {}) {
  const hs = await h.request(`${base}${EIO}&${query}`, { headers });
  assert.equal(hs.status, 200, `handshake ${query}: ${hs.status} ${hs.body}`);
  const open = packets(hs.body)[0];
  assert.ok(open && open[0] === '0', `engine.io open packet: ${hs.body}`);
  const { sid } = JSON.parse(open.slice(1));
  const next = `${base}${EIO}&${follow}&sid=${encodeURIComponent(sid)}`;
  const post = await fetch(next, {
    method: 'POST', body: '40', headers: { 'content-type': 'text/plain;charset=UTF-8' },
    signal: AbortSignal.timeout(5000),
  });
  assert.equal(post.status, 200, `CONNECT: ${post.status} ${await post.text()}`);
  for (let i = 0; i < 10; i++) {
    const r = await h.request(next);
    assert.equal(r.status, 200, `poll: ${r.status} ${r.body}`);
    for (const p of packets(r.body)) {
      if (p.startsWith('42')) {
        const [event, data] = JSON.parse(p.slice(2));
        if (event === 'hello') return data;
      }
    }
  }
  throw new Error(`no hello for ${query}`);
}

/** The backend's decoded views of the uid all equal `uid`. */
function assertOnly(hello, uid, what) {
  const ctx = `${what}: url ${hello.url} query ${JSON.stringify(hello.query)} header ${JSON.stringify(hello.header)}`;
  assert.equal(hello.uid, uid, `handshake.query.uid, ${ctx}`);
  const params = new URLSearchParams(hello.url.split('?')[1] || '');
  assert.deepEqual(params.getAll('uid'), [uid], `URLSearchParams.getAll('uid'), ${ctx}`);
  assert.deepEqual([...params.keys()].filter((k) => k.startsWith('uid[')), [], `qs bracket names, ${ctx}`);
  assert.equal(typeof hello.header, 'string', ctx);
  assert.equal(decodeURIComponent(hello.header), uid, `decodeURIComponent(x-gopush-uid), ${ctx}`);
  const lookalikes = Object.keys(hello.headers)
    .filter((k) => k !== 'x-gopush-uid' && k.replace(/_/g, '-') === 'x-gopush-uid');
  assert.deepEqual(lookalikes, [], `x-gopush-uid look-alike headers reach the backend, ${ctx}`);
  assert.ok(!JSON.stringify(hello).includes('victim'), `victim reaches the backend: ${JSON.stringify(hello)}`);
}

const ATTACKS = [
  // (a) the query already holds the resolved uid, so it used to be forwarded untouched
  (u) => `uid=${u}&u%69d=victim`,
  (u) => `uid=${u}&%75id=victim`,
  (u) => `uid=${u}&%75%69%64=victim`,
  (u) => `uid=${u}&ui%64=victim`,
  (u) => `uid=${u}&uid%5B%5D=victim`,
  (u) => `uid=${u}&uid[0]=victim`,
  // (b) an encoded name before the uid gopush appends / before the client's own
  (u) => `u%69d=victim&uid=${u}`,
  (u) => `%75%69%64=victim&x=1&uid=${u}`,
];

describe('forwarded uid: decoded query names, header encoding', { timeout: 90_000 }, () => {
  let env;
  let agent;

  before(async () => {
    env = new h.TestEnv('forward-uid');
    await env.startRedis();
    const A = await env.startBackend();
    const port = await h.freePort();
    agent = await env.startAgent(env.makeConfig({
      port,
      pools: { default: [A.addr] },
      sources: [
        { jwt: { from: 'query', name: 'token', key: SECRET, alg: 'HS256' } },
        { query: 'uid' },
      ],
    }));
  });

  after(async () => {
    if (env) await env.close();
  });

  for (const uid of ['alice', 'é']) {
    const enc = encodeURIComponent(uid);
    it(`jwt source (${uid}): encoded uid names in the query do not reach Socket.IO`, async () => {
      const t = token(uid);
      for (const attack of ATTACKS) {
        const q = `token=${t}&${attack(enc)}`;
        assertOnly(await rawHello(agent.url, q, `token=${t}`), uid, q);
      }
      // the token alone: the uid gopush appends
      assertOnly(await rawHello(agent.url, `token=${t}&u%69d=victim`, `token=${t}`), uid, 'appended');
    });

    it(`query source (${uid}): encoded uid names in the query do not reach Socket.IO`, async () => {
      for (const attack of ATTACKS.slice(0, 6)) {
        const q = attack(enc);
        assertOnly(await rawHello(agent.url, q, `uid=${enc}`), uid, q);
      }
    });

    it(`x_gopush_uid and x-gopush-uid sent by the client are replaced (${uid})`, async () => {
      const t = token(uid);
      const hello = await rawHello(agent.url, `token=${t}`, `token=${t}`, {
        x_gopush_uid: 'victim', 'x-gopush-uid': 'victim2',
      });
      assertOnly(hello, uid, 'headers');
      assert.equal(hello.headers.x_gopush_uid, undefined);
    });
  }

  it('socket.io-client (websocket) with a client uid in the query gets the token uid', async () => {
    const { socket, hello } = await env.connect(agent.url, {
      transports: ['websocket'],
      query: { token: token('é'), uid: 'victim' },
      extraHeaders: { x_gopush_uid: 'victim' },
    });
    socket.close();
    assertOnly(hello, 'é', 'socket.io-client');
  });

  it('plain HTTP (/whoami): URLSearchParams view and header', async () => {
    const r = await h.request(`${agent.url}/whoami?uid=%C3%A9&u%69d=victim&x=1`, {
      headers: { x_gopush_uid: 'victim' },
    });
    assert.equal(r.status, 200, r.body);
    const w = JSON.parse(r.body);
    assert.equal(w.uid_query, 'é', w.url);
    assert.equal(decodeURIComponent(w.uid_header), 'é');
    assert.equal(w.headers.x_gopush_uid, undefined);
    assert.deepEqual(new URLSearchParams(w.url.split('?')[1]).getAll('x'), ['1']);
  });
});
