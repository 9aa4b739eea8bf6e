'use strict';
// sid memory end to end, against an attacker who knows a victim's sid (issue 15, security item 5;
// issue 12: `gopush route`, `/api/route` and the proxy agree with a route hook and a live sid).
//
// Two backends in pool `default`, the uid from `?uid=`. The victim opens an Engine.IO polling
// session by hand (raw HTTP), then her backend is drained so that her ring answer moves: from then
// on only the sid memory keeps her polls on her backend. The attacker sends her sid under his own
// uid (GET and POST) and asks a backend page that echoes input to answer a handshake-shaped body
// naming her sid (outside the Socket.IO path). Her session must stay hers: her polls still reach
// her backend, and the admin API and the CLI answer `via: session` for her and `via: ring` for him.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const h = require('../lib/harness');
const ketama = require('../lib/ketama');

const SEP = '\x1e'; // Engine.IO 4 packet separator in a polling payload

describe('sid memory against a stolen sid', { timeout: 90_000 }, () => {
  let env;
  let A;
  let B;
  let C;
  let explicit; // the backend the route hook names for hooked-addr
  let agent;

  before(async () => {
    env = new h.TestEnv('sid');
    await env.startRedis();
    A = await env.startBackend();
    B = await env.startBackend();
    C = await env.startBackend(); // pool `side`: only the route hook sends uids there
    // hooked-addr goes to the backend its ring answer is not (per the Ketama model), so that
    // landing there shows the hook decided.
    const ring = ketama.lookup(ketama.buildContinuum([A.addr, B.addr]), 'hooked-addr');
    explicit = ring === A.addr ? B : A;
    fs.writeFileSync(path.join(env.dir, 'route.js'), `module.exports = function route(req, uid) {
  if (uid === 'hooked-pool') return 'side';
  if (uid === 'hooked-addr') return '${explicit.addr}';
  return null;
};
`);
    const port = await h.freePort();
    const cfg = env.makeConfig({
      port,
      pools: { default: [A.addr, B.addr], side: [C.addr] },
      sources: [{ query: 'uid' }],
      extra: { hooks: { route: 'route.js' } },
    });
    agent = await env.startAgent(cfg);
  });

  after(async () => {
    if (env) await env.close();
  });

  const url = (uid, sid, p = '/socket.io/') => `${agent.url}${p}?EIO=4&transport=polling&uid=${encodeURIComponent(uid)}`
    + (sid ? `&sid=${encodeURIComponent(sid)}` : '');

  const send = async (u, { method = 'GET', body } = {}) => {
    try {
      const res = await fetch(u, {
        method,
        body,
        headers: body === undefined ? {} : { 'content-type': 'text/plain;charset=UTF-8' },
        signal: AbortSignal.timeout(5000),
      });
      return { status: res.status, body: await res.text() };
    } catch (err) {
      // A poll held open: it reached a live session (for a stolen sid: the victim's).
      throw new Error(`${method} ${u}: no answer within 5 s (${err.message}): held by a live session?`);
    }
  };

  /** A raw Engine.IO polling session joined to the `/` namespace: {sid, port} (the backend's `port` event). */
  const openSession = async (uid) => {
    const hs = await send(url(uid));
    assert.equal(hs.status, 200, `${uid} handshake: ${hs.body}`);
    assert.match(hs.body, /^0\{/, `${uid} handshake: not an open packet: ${hs.body}`);
    const { sid } = JSON.parse(hs.body.slice(1));
    const join = await send(url(uid, sid), { method: 'POST', body: '40' });
    assert.equal(join.status, 200, `${uid} namespace connect: ${join.body}`);
    const r = await send(url(uid, sid));
    assert.equal(r.status, 200, `${uid} first poll: ${r.body}`);
    const portPacket = r.body.split(SEP).find((p) => p.startsWith('42["port"'));
    assert.ok(portPacket, `${uid}: no port event in ${JSON.stringify(r.body)}`);
    return { sid, port: JSON.parse(portPacket.slice(2))[1] };
  };

  let ackId = 0;
  /** One `whoami` round trip on the raw session: the port of the backend that holds it. */
  const whoami = async (uid, sid) => {
    const id = ++ackId;
    const post = await send(url(uid, sid), { method: 'POST', body: `42${id}["whoami"]` });
    assert.equal(post.status, 200, `${uid} POST on its own session: ${post.status} ${post.body}`);
    const got = await send(url(uid, sid));
    assert.equal(got.status, 200, `${uid} poll on its own session: ${got.status} ${got.body}`);
    const ack = got.body.split(SEP).find((p) => p.startsWith(`43${id}[`));
    assert.ok(ack, `${uid}: no ack ${id} in ${JSON.stringify(got.body)}`);
    return JSON.parse(ack.slice(2 + String(id).length))[0].port;
  };

  const apiRoute = async (uid, sid) => {
    const r = await h.admin(agent, 'GET', `/api/route?uid=${encodeURIComponent(uid)}${sid ? `&sid=${encodeURIComponent(sid)}` : ''}`);
    assert.equal(r.status, 200, `/api/route ${uid}: ${r.text}`);
    return r.json;
  };

  /** `gopush route UID --agent [--sid SID] -c FILE` (asks the running agent): {backend, via, uid, decidedBy}. */
  const cliRoute = async (uid, sid) => {
    // `--sid=S`, not `--sid S`: an Engine.IO sid may begin with '-', which the argument parser
    // would take for an option.
    const args = ['route', uid, '--agent', ...(sid ? [`--sid=${sid}`] : []), '-c', agent.configFile];
    const r = await h.execGopush(args);
    assert.equal(r.code, 0, `gopush ${args.join(' ')}: ${r.stderr || r.stdout}`);
    const lines = r.stdout.split('\n');
    const field = (name) => (lines.find((l) => l.startsWith(`${name}: `)) || '').slice(name.length + 2);
    return { backend: lines[0].trim(), via: field('via'), uid: field('uid'), decidedBy: field('decided by'), out: r.stdout };
  };

  it("another uid carrying a victim's sid, or a handshake-shaped answer off the Socket.IO path, does not move her session", async () => {
    const { sid, port } = await openSession('alice');
    const home = `127.0.0.1:${port}`;
    const other = home === A.addr ? B : A;
    // The attacker: a uid whose ring answer is the other backend (his requests with her sid must
    // not reach hers, where they would join her session).
    let attacker = null;
    for (const u of ['mallory', ...Array.from({ length: 40 }, (_, i) => `mallory-${i}`)]) {
      if ((await apiRoute(u)).backend === other.addr) { attacker = u; break; }
    }
    assert.ok(attacker, `no attacker uid of 41 lands on ${other.addr}`);

    const known = await apiRoute('alice', sid);
    assert.deepEqual([known.via, known.backend], ['session', home], JSON.stringify(known));

    // The attack: her sid under his uid (a poll, and a POST that would inject packets into her
    // session), and a handshake-looking request outside the Socket.IO path whose answer is an
    // open packet naming her sid.
    const stolenGet = await send(url(attacker, sid));
    assert.equal(stolenGet.status, 400, `GET with a stolen sid: ${stolenGet.status} ${stolenGet.body}`);
    assert.match(stolenGet.body, /Session ID unknown/, 'the stolen sid reached her backend');
    const stolenPost = await send(url(attacker, sid), { method: 'POST', body: '42["room",{"room":"uid:alice","event":"x"}]' });
    assert.equal(stolenPost.status, 400, `POST with a stolen sid: ${stolenPost.status} ${stolenPost.body}`);
    const forged = await send(`${url(attacker, null, '/open-packet')}&echo=${encodeURIComponent(sid)}`);
    assert.equal(forged.status, 200);
    assert.equal(JSON.parse(forged.body.slice(1)).sid, sid, 'the backend page echoed her sid as an open packet');

    // Drain her backend: her ring answer moves to the other one, so from here only the sid
    // memory keeps her polls where her session lives.
    const d = await h.admin(agent, 'POST', `/api/backends/${home}/drain`);
    assert.equal(d.status, 200, d.text);
    try {
      const ring = await apiRoute('alice');
      assert.deepEqual([ring.via, ring.backend], ['ring', other.addr], 'a new session of alice avoids the drained backend');
      for (let i = 0; i < 3; i++) assert.equal(await whoami('alice', sid), port, `alice's poll ${i} left her backend`);

      const hers = await apiRoute('alice', sid);
      assert.deepEqual([hers.via, hers.backend, hers.uid], ['session', home, 'alice'], JSON.stringify(hers));
      const his = await apiRoute(attacker, sid);
      assert.deepEqual([his.via, his.backend], ['ring', other.addr], JSON.stringify(his));

      const cli = await cliRoute('alice', sid);
      assert.deepEqual([cli.backend, cli.via, cli.uid], [home, 'session', 'alice'], cli.out);
      assert.match(cli.decidedBy, /^the running agent at /, cli.out);
      const cliHis = await cliRoute(attacker, sid);
      assert.deepEqual([cliHis.backend, cliHis.via], [other.addr, 'ring'], cliHis.out);
    } finally {
      await h.admin(agent, 'POST', `/api/backends/${home}/undrain`);
    }
    assert.doesNotMatch(agent.proc.out, /remembered for another uid/, 'no handshake named her sid');
  });

  it('with a route hook and a live sid, the proxy, /api/route and `gopush route` agree', async () => {
    // hooked-pool: the hook names pool `side` (C); the session is remembered there.
    const pooled = await openSession('hooked-pool');
    assert.equal(pooled.port, C.port, 'the route hook sent hooked-pool to pool side');
    const api = await apiRoute('hooked-pool', pooled.sid);
    const cli = await cliRoute('hooked-pool', pooled.sid);
    assert.deepEqual([api.backend, api.via, api.pool], [C.addr, 'session', 'side'], JSON.stringify(api));
    assert.deepEqual([cli.backend, cli.via], [C.addr, 'session'], cli.out);
    assert.match(cli.out, /^pool: side$/m, cli.out);
    assert.equal(await whoami('hooked-pool', pooled.sid), C.port);

    // hooked-addr: the hook names a backend outright (the one its ring answer is not).
    const addr = await openSession('hooked-addr');
    assert.equal(addr.port, explicit.port, 'the route hook named the backend of hooked-addr');
    const apiA = await apiRoute('hooked-addr', addr.sid);
    const cliA = await cliRoute('hooked-addr', addr.sid);
    assert.deepEqual([apiA.backend, apiA.via, apiA.pool], [`127.0.0.1:${addr.port}`, 'hook', null], JSON.stringify(apiA));
    assert.deepEqual([cliA.backend, cliA.via], [`127.0.0.1:${addr.port}`, 'hook'], cliA.out);
    assert.equal(await whoami('hooked-addr', addr.sid), addr.port);
  });
});
