'use strict';
// Signed-token uid: a WebSocket-only client carries a JWT in the query (browsers cannot set
// headers on an upgrade); the agent verifies it and hashes the `sub` claim. Expired, not yet
// valid, wrongly signed and other-algorithm tokens are refused with 430 and a reason that does not
// leak the key. Tokens are signed here with node:crypto (HS256 HMAC, RS256 with a test key).

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const h = require('../lib/harness');

const SECRET = 'e2e-jwt-secret-0123456789-abcdefghij';
const FIXTURES = path.resolve(__dirname, '../../fixtures/jwt');
const RSA_PRIVATE = fs.readFileSync(path.join(FIXTURES, 'rsa-private.pem'), 'utf8');
const RSA_PUBLIC = fs.readFileSync(path.join(FIXTURES, 'rsa-public.pem'), 'utf8');
const POLL = '/socket.io/?EIO=4&transport=polling';
const CANDIDATES = ['alice', 'bob', 'carol', 'dave', 'erin', 'frank', 'grace', 'heidi', 'ivan', 'judy',
  'user-1', 'user-2', 'user-3', 'user-4', 'user-5', 'user-6'];

const b64url = (buf) => Buffer.from(buf).toString('base64url');
const now = () => Math.floor(Date.now() / 1000);

function sign(claims, { alg = 'HS256', secret = SECRET } = {}) {
  const head = b64url(JSON.stringify({ alg, typ: 'JWT' }));
  const body = b64url(JSON.stringify(claims));
  const input = `${head}.${body}`;
  let sig;
  if (alg === 'HS256') sig = crypto.createHmac('sha256', secret).update(input).digest();
  else if (alg === 'HS512') sig = crypto.createHmac('sha512', secret).update(input).digest();
  else if (alg === 'RS256') sig = crypto.sign('sha256', Buffer.from(input), RSA_PRIVATE);
  else throw new Error(`alg ${alg}`);
  return `${input}.${b64url(sig)}`;
}

describe('signed-token (JWT) uid source', { timeout: 90_000 }, () => {
  let s;
  let sample;

  before(async () => {
    const env = new h.TestEnv('jwt');
    s = { env };
    await env.startRedis();
    s.A = await env.startBackend();
    s.B = await env.startBackend();
    const port = await h.freePort();
    const cfg = s.env.makeConfig({
      port,
      pools: { default: [s.A.addr, s.B.addr] },
      sources: [
        { jwt: { from: 'query', name: 'token', key: SECRET, alg: 'HS256' } },
        { jwt: { from: 'query', name: 'rtoken', key_file: path.join(FIXTURES, 'rsa-public.pem'), alg: 'RS256' } },
        { jwt: { from: 'header', name: 'authorization', key: SECRET, alg: 'HS256', claim: 'uid' } },
      ],
    });
    s.agent = await s.env.startAgent(cfg);
    const byBackend = await h.pickUids(s.agent.configFile, [s.A.addr, s.B.addr], 2, CANDIDATES);
    sample = [...byBackend].flatMap(([addr, uids]) => uids.map((uid) => ({ uid, addr })));
  });

  after(async () => {
    if (s) await s.env.close();
  });

  it('websocket-only clients with a token in the query land on the ring backend of `sub`', async () => {
    for (const { uid, addr } of sample) {
      for (let i = 0; i < 2; i++) {
        const token = sign({ sub: uid, exp: now() + 300 });
        const { socket, hello } = await s.env.connect(s.agent.url, { transports: ['websocket'], query: { token } });
        try {
          assert.equal(hello.transport, 'websocket');
          assert.equal(hello.port, h.portOf(addr), `${uid} landed on ${hello.port}, ring says ${addr}`);
          assert.equal(hello.uid, uid, 'the backend gets the claim as uid');
          assert.equal(hello.header, uid);
          const me = await h.emitAck(socket, 'whoami');
          assert.equal(me.uid, uid);
        } finally {
          socket.close();
        }
      }
    }
  });

  it('RS256 tokens, and the claim from a bearer header (polling)', async () => {
    for (const { uid, addr } of sample) {
      const rtoken = sign({ sub: uid, exp: now() + 300 }, { alg: 'RS256' });
      const ws = await s.env.connect(s.agent.url, { transports: ['websocket'], query: { rtoken } });
      ws.socket.close();
      assert.equal(ws.hello.port, h.portOf(addr));
      assert.equal(ws.hello.uid, uid);
      const bearer = sign({ sub: 'ignored', uid, exp: now() + 300 });
      const p = await s.env.connect(s.agent.url, {
        transports: ['polling'], extraHeaders: { authorization: `Bearer ${bearer}` },
      });
      p.socket.close();
      assert.equal(p.hello.port, h.portOf(addr));
      assert.equal(p.hello.uid, uid);
    }
  });

  const refused = [
    ['expired', () => `token=${sign({ sub: 'alice', exp: now() - 600 })}`, /expired/],
    ['not yet valid', () => `token=${sign({ sub: 'alice', exp: now() + 7200, nbf: now() + 3600 })}`, /not valid yet/],
    ['wrong signature', () => `token=${sign({ sub: 'alice', exp: now() + 300 }, { secret: 'not-the-secret' })}`, /signature/],
    ['other algorithm (HS512)', () => `token=${sign({ sub: 'alice', exp: now() + 300 }, { alg: 'HS512' })}`, /algorithm/],
    ['alg confusion: HS256 signed with the RSA public key',
      () => `rtoken=${sign({ sub: 'mallory', exp: now() + 300 }, { secret: RSA_PUBLIC })}`, /algorithm/],
    ['garbage', () => 'token=abc.def.ghi', /malformed/],
    ['no exp', () => `token=${sign({ sub: 'alice' })}`, /claim/],
  ];

  for (const [name, query, reason] of refused) {
    it(`${name} -> 430 with a reason that does not leak the key`, async () => {
      const r = await h.httpGet(`${s.agent.url}${POLL}&${query()}`);
      assert.equal(r.status, 430, r.body);
      assert.match(r.body, /^gopush: uid refused: /, r.body);
      assert.match(r.body, reason, r.body);
      assert.ok(!r.body.includes(SECRET) && !r.body.includes('BEGIN PUBLIC KEY'), r.body);
    });
  }

  it('a websocket client with an expired token does not connect', async () => {
    const token = sign({ sub: 'alice', exp: now() - 600 });
    await assert.rejects(
      h.connect(s.agent.url, { transports: ['websocket'], query: { token } }, { timeoutMs: 3000 }),
      /connect_error|timed out/,
    );
  });

  it('no token at all -> 430 naming the token sources', async () => {
    const r = await h.httpGet(`${s.agent.url}${POLL}&uid=alice`, { headers: { cookie: 'uid=alice' } });
    assert.equal(r.status, 430, r.body);
    assert.match(r.body, /no uid/);
    assert.match(r.body, /signed token in query `token`/);
  });
});
