'use strict';
// Dynamic discovery: pool `default` takes its backends from DNS (a dnsmasq started by the test on
// a loopback port, its records in a hosts file). Adding a record adds a backend (only the uids
// the ring gives it move); removing one drains it: new sessions go elsewhere while a live
// polling session on it keeps working.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const h = require('../lib/harness');

const NAME = 'chat.gopush.test';
const UIDS = Array.from({ length: 40 }, (_, i) => `dns-${i}`);
const DNSMASQ = fs.existsSync('/usr/sbin/dnsmasq') ? '/usr/sbin/dnsmasq' : 'dnsmasq';

describe('DNS discovery', { timeout: 90_000 }, () => {
  let env;
  let agent;
  let dns;
  let hosts;
  let A;
  let B;

  before(async () => {
    env = new h.TestEnv('dns');
    await env.startRedis();
    const port = await h.freePort();
    A = await env.startBackend({ port, host: '127.0.0.1' });
    B = await env.startBackend({ port, host: '127.0.0.2' });
    hosts = path.join(env.dir, 'hosts');
    fs.writeFileSync(hosts, `127.0.0.1 ${NAME}\n`);
    const dnsPort = await h.freePort();
    dns = new h.Proc('dnsmasq', DNSMASQ, ['--keep-in-foreground', '--no-resolv', '--no-hosts',
      `--addn-hosts=${hosts}`, '--listen-address=127.0.0.1', '--bind-interfaces', `--port=${dnsPort}`,
      '--user=root', '--pid-file', '--log-facility=-', '--log-queries'], {});
    env.procs.push(dns);
    await dns.waitForOutput(/started, version/, 10000, 'dnsmasq start');
    const cfg = env.makeConfig({ port: await h.freePort(), pools: { default: [] } });
    cfg.pools.default = { dns: { name: NAME, port, interval: '200ms', resolver: `127.0.0.1:${dnsPort}` } };
    agent = await env.startAgent(cfg);
  });

  after(async () => {
    if (env) await env.close();
  });

  const hostOf = async (uid) => {
    const r = await h.httpGet(`${agent.url}/whoami`, { headers: { cookie: `uid=${uid}` } });
    assert.equal(r.status, 200, `${uid}: ${r.status} ${r.body}`);
    return `${JSON.parse(r.body).host}:${JSON.parse(r.body).port}`;
  };

  /** The ring's answer for UIDS over a static list, per the route CLI (decided from the file). */
  const expected = async (backends, file) => {
    const cfg = structuredClone(agent.cfg);
    cfg.pools.default = { backends };
    return h.routeMap(env.writeConfig(cfg, file), UIDS);
  };

  const setRecords = (ips) => {
    fs.writeFileSync(hosts, ips.map((ip) => `${ip} ${NAME}\n`).join(''));
    process.kill(dns.pid, 'SIGHUP'); // dnsmasq re-reads --addn-hosts
  };

  it('follows the records: a new backend takes only its uids; a removed one is drained', async () => {
    for (const uid of UIDS.slice(0, 10)) assert.equal(await hostOf(uid), A.addr, `${uid} with one record`);

    setRecords(['127.0.0.1', '127.0.0.2']);
    const both = await expected([A.addr, B.addr], 'static-ab.yaml');
    const toB = UIDS.filter((u) => both.get(u) === B.addr);
    assert.ok(toB.length > 5, `only ${toB.length} uids for B`);
    await h.poll(async () => (await hostOf(toB[0])) === B.addr,
      { attempts: 60, delayMs: 100, maxDelayMs: 300, what: 'the agent to discover the second record' });
    for (const uid of UIDS) assert.equal(await hostOf(uid), both.get(uid), `${uid} with two records`);

    // A live polling session on B, then B's record goes away.
    const { socket: live, hello } = await env.connect(agent.url, {
      transports: ['polling'], extraHeaders: { cookie: `uid=${toB[0]}` },
    });
    assert.equal(`${hello.host}:${hello.port}`, B.addr);
    const sid = live.io.engine.id;
    setRecords(['127.0.0.1']);
    await h.poll(async () => (await hostOf(toB[1])) === A.addr,
      { attempts: 60, delayMs: 100, maxDelayMs: 300, what: 'new sessions of B uids to go to A' });
    for (const uid of UIDS) assert.equal(await hostOf(uid), A.addr, `${uid} with one record again`);
    for (let i = 0; i < 3; i++) assert.deepEqual(await h.emitAck(live, 'echo', { i }), { i });
    assert.equal(live.io.engine.id, sid, 'the drained session was not cut');
    assert.match(agent.proc.out, /backend left discovery: draining/);
    live.close();
  });

  it('keeps the last good list while the DNS server is down (issue 15, claim 8)', async () => {
    setRecords(['127.0.0.1', '127.0.0.2']);
    const both = await expected([A.addr, B.addr], 'static-ab2.yaml');
    const toB = UIDS.filter((u) => both.get(u) === B.addr);
    await h.poll(async () => (await hostOf(toB[0])) === B.addr,
      { attempts: 60, delayMs: 100, maxDelayMs: 300, what: 'the agent to discover the second record again' });
    for (const uid of UIDS) assert.equal(await hostOf(uid), both.get(uid), `${uid} with two records`);

    const failures = () => (agent.proc.out.match(/discovery failed, keeping the current backends/g) || []).length;
    const lastFailure = () => agent.proc.out.split('\n').filter((l) => l.includes('discovery failed')).pop();
    const changes = () => (agent.proc.out.match(/discovery changed the pool/g) || []).length;
    const changed = changes();

    // The name loses its records (the lookup fails: no records) ...
    let before = failures();
    setRecords([]);
    await h.poll(async () => failures() >= before + 2,
      { attempts: 60, delayMs: 100, maxDelayMs: 300, what: 'two failed lookups (no records) logged' });
    for (const uid of UIDS) assert.equal(await hostOf(uid), both.get(uid), `${uid} while the name has no records`);

    // ... then the DNS server stops. A lookup times out (the resolver's own timeout, ~16 s here);
    // requests keep going to the same backends meanwhile and after.
    before = failures();
    await dns.kill('SIGKILL');
    let requests = 0;
    await h.poll(async () => {
      const uid = UIDS[requests++ % UIDS.length];
      try {
        assert.equal(await hostOf(uid), both.get(uid), `${uid} with the DNS server down`);
      } catch (err) {
        throw Object.assign(err, { fatal: true }); // a wrong answer fails now, it is not "not yet"
      }
      return failures() > before;
    }, { attempts: 300, delayMs: 100, maxDelayMs: 200, what: 'a failed lookup with the DNS server down logged' });
    assert.match(lastFailure(), /DNS lookup of chat\.gopush\.test/);
    for (const uid of UIDS) assert.equal(await hostOf(uid), both.get(uid), `${uid} after a failed lookup`);
    assert.equal(changes(), changed, 'the membership changed while DNS failed');
  });
});

// File discovery (issue 15, claim 8): a file that becomes invalid, empty, a directory or missing
// keeps the last good list; a valid one is followed again.
describe('file discovery keeps the last good list', { timeout: 60_000 }, () => {
  let env;
  let agent;
  let list;
  let A;
  let B;

  before(async () => {
    env = new h.TestEnv('file-disc');
    await env.startRedis();
    [A, B] = await env.startBackends(2);
    list = path.join(env.dir, 'backends.txt');
    fs.writeFileSync(list, `# discovered\n${A.addr}\n${B.addr}\n`);
    const cfg = env.makeConfig({ port: await h.freePort(), pools: { default: [] } });
    cfg.pools.default = { file: { path: list, interval: '200ms' } };
    agent = await env.startAgent(cfg);
  });

  after(async () => {
    if (env) await env.close();
  });

  const portOf = async (uid) => {
    const r = await h.httpGet(`${agent.url}/whoami`, { headers: { cookie: `uid=${uid}` } });
    assert.equal(r.status, 200, `${uid}: ${r.status} ${r.body}`);
    return `127.0.0.1:${JSON.parse(r.body).port}`;
  };
  const failures = () => (agent.proc.out.match(/discovery failed, keeping the current backends/g) || []).length;

  it('an invalid, empty, unreadable or missing file keeps the backends; a valid one is followed', async () => {
    const cfg = structuredClone(agent.cfg);
    cfg.pools.default = { backends: [A.addr, B.addr] };
    const both = await h.routeMap(env.writeConfig(cfg, 'static.yaml'), UIDS);
    assert.ok(UIDS.some((u) => both.get(u) === B.addr) && UIDS.some((u) => both.get(u) === A.addr), 'uids on both backends');
    for (const uid of UIDS) assert.equal(await portOf(uid), both.get(uid), `${uid} with the file`);

    const breakages = [
      ['invalid', /backends\.txt:2: /, () => fs.writeFileSync(list, `${A.addr}\nnot-an-address\n`)],
      ['empty', /no backends found; keeping the previous ones/, () => fs.writeFileSync(list, '# nothing\n')],
      ['a directory', /backends\.txt: /, () => { fs.rmSync(list); fs.mkdirSync(list); }],
      ['missing', /backends\.txt: /, () => fs.rmSync(list, { recursive: true })],
    ];
    for (const [what, why, doIt] of breakages) {
      const before = failures();
      doIt();
      await h.poll(async () => failures() >= before + 2,
        { attempts: 60, delayMs: 100, maxDelayMs: 300, what: `two failed reads of the ${what} file logged` });
      assert.match(agent.proc.out.split('\n').filter((l) => l.includes('discovery failed')).pop(), why, what);
      for (const uid of UIDS) assert.equal(await portOf(uid), both.get(uid), `${uid} with the file ${what}`);
    }
    // A valid file again, with A only: followed (discovery was alive all along).
    fs.writeFileSync(list, `${A.addr}\n`);
    const moved = UIDS.find((u) => both.get(u) === B.addr);
    await h.poll(async () => (await portOf(moved)) === A.addr,
      { attempts: 60, delayMs: 100, maxDelayMs: 300, what: 'the agent to follow the valid file' });
  });
});
