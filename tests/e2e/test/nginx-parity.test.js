'use strict';
// Ketama / nginx compatibility: for 2,000 uids, nginx with
//   upstream u { hash $cookie_uid consistent; server B1; server B2; }
// and the gopush agent (same two backends, same order) must send every uid to the same backend.
// The uid is sent as the raw cookie value (some uids contain %xx, '=', ':' ... which neither side
// may decode). lib/ketama.js is a reference model of nginx's algorithm, used for diagnostics.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const http = require('node:http');
const h = require('../lib/harness');
const ketama = require('../lib/ketama');

const N = 2000;
const CONCURRENCY = 16;

const ENCODED = ['%20', '%40', '%2F', '%3A', '%2B', '%C3%A9', '%E2%82%AC', '%F0%9F%98%80'];

function makeUids(n) {
  const rnd = h.prng(0x60b05);
  const alnum = 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789';
  const extra = `${alnum}-_.~!*+/:=@`;
  const pick = (set, len) => Array.from({ length: len }, () => set[Math.floor(rnd() * set.length)]).join('');
  const uids = new Set();
  for (let i = 0; uids.size < n; i++) {
    const kind = i % 5;
    if (kind === 0) uids.add(`user-${i}`);
    else if (kind === 1) uids.add(String(100000 + Math.floor(rnd() * 9e8)));
    else if (kind === 2) uids.add(pick(alnum, 1 + Math.floor(rnd() * 40)));
    // Percent-encoded, as browsers and socket.io-client send non-alphanumeric uids. gopush refuses
    // (400) a uid that decodes to control characters or invalid UTF-8, so only valid encodings here.
    else if (kind === 3) uids.add(`${pick(alnum, 3)}${ENCODED[Math.floor(rnd() * ENCODED.length)]}${pick(extra, 1 + Math.floor(rnd() * 20))}`);
    else uids.add(pick(extra, 1 + Math.floor(rnd() * 200)));
  }
  return [...uids];
}

describe('nginx `hash $cookie_uid consistent` parity', { timeout: 150_000 }, () => {
  let env;
  let backends;
  let agent;
  let nginx;
  const uids = makeUids(N);

  before(async () => {
    env = new h.TestEnv('nginx');
    try {
      await env.startRedis();
      backends = await env.startBackends(3);
      const two = backends.slice(0, 2).map((b) => b.addr);
      agent = await env.startAgent(env.makeConfig({
        port: await h.freePort(),
        pools: { default: two },
        healthCheck: { kind: 'tcp', interval: '1s' },
      }));
      nginx = await env.startNginx(two);
    } catch (err) {
      await env.close();
      env = null;
      throw err;
    }
  });

  after(async () => {
    if (env) await env.close();
  });

  async function portsVia(baseUrl, cookieFor) {
    const agentKA = new http.Agent({ keepAlive: true, maxSockets: CONCURRENCY });
    try {
      return await h.mapLimit(uids, CONCURRENCY, async (uid) => {
        const r = await h.request(`${baseUrl}/whoami`, { agent: agentKA, headers: { cookie: cookieFor(uid) } });
        if (r.status !== 200) throw new Error(`GET ${baseUrl}/whoami uid=${uid}: HTTP ${r.status} ${r.body.slice(0, 200)}`);
        return JSON.parse(r.body).port;
      });
    } finally {
      agentKA.destroy();
    }
  }

  async function compare(nginxUrl, agentUrl, servers, cookieFor, nBackends) {
    const viaNginx = await portsVia(nginxUrl, cookieFor);
    const viaAgent = await portsVia(agentUrl, cookieFor);
    const model = ketama.buildContinuum(servers);
    const diffs = [];
    uids.forEach((uid, i) => {
      if (viaNginx[i] !== viaAgent[i]) {
        diffs.push({ uid, nginx: viaNginx[i], gopush: viaAgent[i], model: h.portOf(ketama.lookup(model, uid)) });
      }
    });
    const counts = {};
    for (const p of viaNginx) counts[p] = (counts[p] || 0) + 1;
    assert.equal(Object.keys(counts).length, nBackends, `nginx should use all backends: ${JSON.stringify(counts)}`);
    assert.deepEqual(diffs.slice(0, 25), [],
      `${diffs.length} of ${N} uids differ between nginx and gopush (first 25 shown; nginx spread ${JSON.stringify(counts)})`);
    return viaNginx;
  }

  const COOKIE_STYLES = [
    { name: 'single cookie', fmt: (uid) => `uid=${uid}` },
    { name: 'uid among other cookies', fmt: (uid) => `sess=abc123; uid=${uid}; theme=dark` },
  ];

  for (const style of COOKIE_STYLES) {
    it(`${N} uids land on the same backend through nginx and gopush (2 backends, ${style.name})`, async () => {
      await compare(nginx.url, agent.url, backends.slice(0, 2).map((b) => b.addr), style.fmt, 2);
    });
  }

  it(`${N} uids land on the same backend through nginx and gopush (3 backends, weights 1/2/1)`, async () => {
    const servers = [
      { addr: backends[0].addr, weight: 1 },
      { addr: backends[1].addr, weight: 2 },
      { addr: backends[2].addr, weight: 1 },
    ];
    const agent3 = await env.startAgent(env.makeConfig({
      port: await h.freePort(),
      pools: { default: servers },
      healthCheck: { kind: 'tcp', interval: '1s' },
    }));
    const nginx3 = await env.startNginx(servers.map((x) => `${x.addr} weight=${x.weight}`));
    await compare(nginx3.url, agent3.url, servers, (uid) => `uid=${uid}`, 3);
  });

  it('the reference model agrees with nginx (sanity of lib/ketama.js) and gopush route agrees on a sample', async () => {
    const viaNginx = await portsVia(nginx.url, (uid) => `uid=${uid}`);
    const model = ketama.buildContinuum(backends.slice(0, 2).map((b) => b.addr));
    const off = uids.filter((uid, i) => h.portOf(ketama.lookup(model, uid)) !== viaNginx[i]);
    assert.deepEqual(off.slice(0, 10), [], `${off.length} uids: model != nginx`);

    const sample = uids.filter((u) => !u.startsWith('-')).slice(0, 200);
    const ring = await h.routeMap(agent.configFile, sample);
    const bad = sample.filter((uid) => h.portOf(ring.get(uid)) !== viaNginx[uids.indexOf(uid)])
      .map((uid) => ({ uid, route: ring.get(uid), nginx: viaNginx[uids.indexOf(uid)] }));
    assert.deepEqual(bad.slice(0, 10), [], `${bad.length} of ${sample.length} uids: gopush route != nginx`);
  });
});
