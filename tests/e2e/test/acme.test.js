'use strict';
// ACME (issue #13, item 3) against a real pebble (Debian package `pebble`): the agent obtains a
// certificate over HTTP-01, answered on its plain listener; pebble resolves the test domains
// through a dnsmasq started here (all of *.acme.test is 127.0.0.1) and validates on `httpPort`,
// which is the plain listener port of the agent under test (the same port in every case).
// pebble's HTTPS uses a leaf signed by a CA made here with openssl, given to the agent as
// `directory_ca`; pebble's issuing root comes from its management interface (/roots/0).

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { execFileSync } = require('node:child_process');
const crypto = require('node:crypto');
const fs = require('node:fs');
const https = require('node:https');
const path = require('node:path');
const tls = require('node:tls');
const h = require('../lib/harness');

const DNSMASQ = fs.existsSync('/usr/sbin/dnsmasq') ? '/usr/sbin/dnsmasq' : 'dnsmasq';
const PEBBLE = process.env.PEBBLE_BIN || 'pebble';

/** A CA and a leaf for 127.0.0.1 signed by it (pebble's HTTPS), made with openssl. */
function makePki(dir) {
  const ossl = (args) => execFileSync('openssl', args, { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] });
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];
  ossl(['req', '-x509', ...ec, '-keyout', 'ca.key', '-out', 'ca.pem', '-days', '2',
    '-subj', '/CN=gopush e2e pebble CA',
    '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign']);
  ossl(['req', ...ec, '-keyout', 'key.pem', '-out', 'csr.pem', '-subj', '/CN=localhost']);
  fs.writeFileSync(path.join(dir, 'ext.cnf'),
    'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n');
  ossl(['x509', '-req', '-in', 'csr.pem', '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial',
    '-out', 'cert.pem', '-days', '2', '-extfile', 'ext.cnf']);
  return { ca: path.join(dir, 'ca.pem'), cert: path.join(dir, 'cert.pem'), key: path.join(dir, 'key.pem') };
}

function httpsGet(url, ca) {
  return new Promise((resolve, reject) => {
    const req = https.get(url, { ca: fs.readFileSync(ca), timeout: 5000 }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c) => { body += c; });
      res.on('end', () => resolve({ status: res.statusCode, body }));
    });
    req.on('timeout', () => req.destroy(new Error(`timeout: GET ${url}`)));
    req.on('error', reject);
  });
}

/** The PEM blocks of a chain, as X509Certificate objects, leaf first. */
/** A hex serial as the agent logs it: lower case, no leading zeros. */
const hexSerial = (s) => s.toLowerCase().replace(/^0+/, '');

/** The serials of the certificates an agent logged as in use. */
const servedSerials = (agent) => [...agent.proc.out.matchAll(/acme: certificate in use.*?serial=([0-9a-f]+)/g)]
  .map((m) => m[1]);

function parseChain(pem) {
  const blocks = pem.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) || [];
  return blocks.map((b) => new crypto.X509Certificate(b));
}

/** The serial of the leaf a TLS listener on 127.0.0.1:port serves for `servername`. */
function servedOverTls(port, servername) {
  return h.withTimeout(new Promise((resolve, reject) => {
    const s = tls.connect({ host: '127.0.0.1', port, servername, rejectUnauthorized: false }, () => {
      const leaf = s.getPeerX509Certificate();
      s.destroy();
      resolve(leaf ? leaf.serialNumber : null);
    });
    s.once('error', reject);
  }), 5000, `a TLS handshake for ${servername} on :${port}`);
}

describe('ACME certificates from pebble (HTTP-01, TLS-ALPN-01)', { timeout: 300_000 }, () => {
  let env;
  let pki;
  let pebble;
  let backend;
  let directory;
  let mgmt;
  let agentPort; // pebble's httpPort: where it validates HTTP-01
  let alpnPort; // pebble's tlsPort: where it validates TLS-ALPN-01
  let root; // pebble's issuing root

  before(async () => {
    env = new h.TestEnv('acme');
    pki = makePki(env.dir);
    backend = await env.startBackend();
    const [dnsPort, pebblePort, mgmtPort, tlsPort, port] = await h.freePorts(5);
    agentPort = port;
    alpnPort = tlsPort;
    const dns = new h.Proc('dnsmasq', DNSMASQ, ['--keep-in-foreground', '--no-resolv', '--no-hosts',
      '--address=/acme.test/127.0.0.1', '--listen-address=127.0.0.1', '--bind-interfaces',
      `--port=${dnsPort}`, '--user=root', '--pid-file', '--log-facility=-'], {});
    env.procs.push(dns);
    await dns.waitForOutput(/started, version/, 10000, 'dnsmasq start');
    const config = path.join(env.dir, 'pebble.json');
    fs.writeFileSync(config, JSON.stringify({
      pebble: {
        listenAddress: `127.0.0.1:${pebblePort}`,
        managementListenAddress: `127.0.0.1:${mgmtPort}`,
        certificate: pki.cert,
        privateKey: pki.key,
        httpPort: agentPort,
        tlsPort,
        ocspResponderURL: '',
        externalAccountBindingRequired: false,
      },
    }));
    pebble = new h.Proc('pebble', PEBBLE, ['-config', config, '-dnsserver', `127.0.0.1:${dnsPort}`], {
      // No sleep before validating; no bad-nonce rejections (the client retries them, but they
      // only slow the test down).
      env: { PEBBLE_VA_NOSLEEP: '1', PEBBLE_WFE_NONCEREJECT: '0' },
      logFile: path.join(env.dir, 'pebble.log'),
    });
    env.procs.push(pebble);
    directory = `https://127.0.0.1:${pebblePort}/dir`;
    mgmt = `https://127.0.0.1:${mgmtPort}`;
    await h.poll(async () => {
      if (pebble.exited) throw Object.assign(new Error(`pebble exited:\n${pebble.tail()}`), { fatal: true });
      return (await h.tcpProbe(pebblePort)) && h.tcpProbe(mgmtPort);
    }, { attempts: 60, delayMs: 100, maxDelayMs: 300, what: 'pebble to listen' });
    const r = await httpsGet(`${mgmt}/roots/0`, pki.ca);
    assert.equal(r.status, 200, r.body);
    root = new crypto.X509Certificate(r.body);
  });

  after(async () => {
    if (env) await env.close();
  });

  // With `tlsPort`: a TLS listener with no configured certificate, which serves the ACME one.
  const acmeConfig = (port, acme, tlsPort) => {
    const cfg = env.makeConfig({
      port,
      pools: { default: [backend.addr] },
      extra: {
        acme: { directory, email: 'ops@acme.test', directory_ca: pki.ca, check_interval: '1s', ...acme },
      },
    });
    if (tlsPort) cfg.listen = [`127.0.0.1:${port}`, { addr: `127.0.0.1:${tlsPort}`, tls: { certificates: [] } }];
    return cfg;
  };

  const startAgent = (port, acme, tlsPort) => env.startAgent(acmeConfig(port, acme, tlsPort));

  /** Waits until the TLS listener serves the leaf with `serial` for `name`. */
  const waitServed = (port, name, serial) => h.poll(async () => (await servedOverTls(port, name).catch(() => null)) === serial,
    { attempts: 80, delayMs: 100, maxDelayMs: 250, what: `the TLS listener on :${port} to serve serial ${serial} for ${name}` });

  const stop = async (agent) => { await agent.proc.kill('SIGKILL'); };

  const orders = async (agent) => {
    const m = await h.admin(agent, 'GET', '/metrics');
    const count = (result) => Number((new RegExp(`^gopush_acme_orders_total\\{result="${result}"\\} (\\d+)$`, 'm')
      .exec(m.text) || [])[1]);
    return { ok: count('ok'), error: count('error') };
  };

  const storedChain = (storage, name) => {
    const f = path.join(storage, name, 'cert.pem');
    return fs.existsSync(f) ? parseChain(fs.readFileSync(f, 'utf8')) : [];
  };

  const waitForSerial = async (agent, storage, name, { not } = {}) => {
    let serial = null;
    await h.poll(async () => {
      if (agent.proc.exited) throw Object.assign(new Error(`agent exited:\n${agent.proc.tail()}`), { fatal: true });
      const chain = storedChain(storage, name);
      serial = chain.length ? chain[0].serialNumber : null;
      return serial !== null && serial !== not;
    }, { attempts: 120, delayMs: 250, maxDelayMs: 500, what: `a certificate for ${name} in ${storage}` })
      .catch((e) => { throw new Error(`${e.message}\n--- agent:\n${agent.proc.tail()}\n--- pebble:\n${pebble.tail()}`); });
    return serial;
  };

  const storage1 = () => path.join(env.dir, 'storage-1');
  const DOMAINS = ['a.acme.test', 'www.a.acme.test'];
  let firstSerial;

  it('issues: the stored chain verifies against pebble\'s root and names the domains; TLS serves it', async () => {
    const tlsPort = await h.freePort();
    const agent = await startAgent(agentPort, { domains: DOMAINS, storage: storage1() }, tlsPort);
    try {
      firstSerial = await waitForSerial(agent, storage1(), 'a.acme.test');
      // The TLS listener (no configured certificate) serves it for both names, without a restart.
      for (const d of DOMAINS) await waitServed(tlsPort, d, firstSerial);
      const chain = storedChain(storage1(), 'a.acme.test');
      assert.ok(chain.length >= 2, `chain of ${chain.length}`);
      for (let i = 0; i + 1 < chain.length; i++) {
        assert.ok(chain[i].verify(chain[i + 1].publicKey), `chain[${i}] is signed by chain[${i + 1}]`);
      }
      const top = chain[chain.length - 1];
      assert.ok(top.verify(root.publicKey), 'the chain ends at pebble\'s root');
      for (const d of DOMAINS) assert.ok(chain[0].subjectAltName.includes(`DNS:${d}`), `${d} in ${chain[0].subjectAltName}`);
      const key = fs.readFileSync(path.join(storage1(), 'a.acme.test', 'key.pem'), 'utf8');
      assert.ok(chain[0].checkPrivateKey(crypto.createPrivateKey(key)), 'key.pem is the leaf\'s key');
      assert.equal((fs.statSync(path.join(storage1(), 'a.acme.test', 'key.pem')).mode & 0o077), 0, 'key.pem is private');
      await h.poll(async () => (await orders(agent)).ok === 1, { attempts: 40, delayMs: 100, what: 'orders{ok} = 1' });
      // Plain traffic is served as before (no uid needed for the challenge, a uid for the rest).
      const r = await h.httpGet(`${agent.url}/whoami`, { headers: { cookie: 'uid=u1' } });
      assert.equal(r.status, 200, r.body);
      const miss = await h.httpGet(`${agent.url}/.well-known/acme-challenge/not-a-pending-token`);
      assert.notEqual(miss.status, 200, 'an unknown token is not answered');
    } finally {
      await stop(agent);
    }
  });

  it('tls-alpn-01: validated on the TLS listener alone (no plain port for pebble), then served there', async () => {
    const storage = path.join(env.dir, 'storage-alpn');
    const domain = 'alpn.acme.test';
    // The plain listener is not pebble's httpPort, and no agent listens there: HTTP-01 could not
    // succeed, so an issued certificate was validated over tls-alpn-01.
    const port = await h.freePort();
    const cfg = acmeConfig(port, { domains: [domain], storage, challenge: 'tls-alpn-01' });
    cfg.listen = [`127.0.0.1:${port}`, { addr: `127.0.0.1:${alpnPort}`, tls: { certificates: [] } }];
    const agent = await env.startAgent(cfg);
    try {
      const serial = await waitForSerial(agent, storage, domain);
      await waitServed(alpnPort, domain, serial);
      const chain = storedChain(storage, domain);
      assert.ok(chain[chain.length - 1].verify(root.publicKey), 'the chain ends at pebble\'s root');
      // The challenge certificate is gone with the order: a validator's handshake now fails.
      const left = fs.readdirSync(path.join(storage, 'challenges')).filter((f) => f.startsWith('tls-alpn-01'));
      assert.deepEqual(left, [], 'no challenge certificate left in the storage');
      const late = await h.withTimeout(new Promise((resolve) => {
        const s = tls.connect({ host: '127.0.0.1', port: alpnPort, servername: domain, ALPNProtocols: ['acme-tls/1'], rejectUnauthorized: false },
          () => { s.destroy(); resolve('handshake completed'); });
        s.once('error', (e) => resolve(e.code || e.message));
      }), 5000, 'an acme-tls/1 handshake');
      assert.notEqual(late, 'handshake completed', 'no challenge pending: no certificate for acme-tls/1');
      // Ordinary clients on the same listener are served as before.
      const r = await h.httpGet(`${agent.url}/whoami`, { headers: { cookie: 'uid=u1' } });
      assert.equal(r.status, 200, r.body);
    } finally {
      await stop(agent);
    }
  });

  it('a restart reuses the stored certificate: no new order, same serial', async () => {
    assert.ok(firstSerial, 'the first case issued');
    const agent = await startAgent(agentPort, { domains: DOMAINS, storage: storage1() });
    try {
      await agent.proc.waitForOutput(/acme: certificate in use/, 20000, 'the stored certificate in use');
      assert.deepEqual(servedSerials(agent), [hexSerial(firstSerial)]);
      // Several checks (check_interval 1s) pass without an order.
      await h.delay(2500);
      assert.deepEqual(await orders(agent), { ok: 0, error: 0 });
      assert.equal(storedChain(storage1(), 'a.acme.test')[0].serialNumber, firstSerial);
    } finally {
      await stop(agent);
    }
  });

  it('renews when the certificate expires within renew_before: a new serial on disk', async () => {
    // pebble's certificates are valid for years: renew_before longer than that makes every check
    // find the stored one due.
    const tlsPort = await h.freePort();
    const agent = await startAgent(agentPort, { domains: DOMAINS, storage: storage1(), renew_before: '36500days' }, tlsPort);
    try {
      const renewed = await waitForSerial(agent, storage1(), 'a.acme.test', { not: firstSerial });
      assert.notEqual(renewed, firstSerial);
      // New handshakes get a renewed certificate, in the same process (with this renew_before
      // every check renews again, so any serial but the first will do).
      await h.poll(async () => {
        const served = await servedOverTls(tlsPort, 'a.acme.test').catch(() => null);
        return served !== null && served !== firstSerial;
      }, { attempts: 80, delayMs: 100, maxDelayMs: 250, what: 'the TLS listener to serve a renewed certificate' });
      const chain = storedChain(storage1(), 'a.acme.test');
      assert.ok(chain[chain.length - 1].verify(root.publicKey));
      assert.match(agent.proc.out, /the stored one is due: it expires in/);
      assert.ok((await orders(agent)).ok >= 1);
    } finally {
      await stop(agent);
    }
  });

  it('two agents sharing storage, started together, make one order and use the same certificate', async () => {
    const storage = path.join(env.dir, 'storage-shared');
    const acme = { domains: ['b.acme.test'], storage };
    // Only the first is on pebble's httpPort: if the other orders, the first answers the
    // challenge from the shared storage.
    const [a, b] = await Promise.all([startAgent(agentPort, acme), startAgent(await h.freePort(), acme)]);
    try {
      const serial = await waitForSerial(a, storage, 'b.acme.test');
      for (const agent of [a, b]) {
        await agent.proc.waitForOutput(/acme: certificate in use/, 30000, 'the certificate in use');
        assert.deepEqual(servedSerials(agent), [hexSerial(serial)]);
      }
      const [oa, ob] = [await orders(a), await orders(b)];
      assert.equal(oa.ok + ob.ok, 1, `orders: ${JSON.stringify({ a: oa, b: ob })}`);
      assert.equal(oa.error + ob.error, 0);
      assert.equal(storedChain(storage, 'b.acme.test')[0].serialNumber, serial);
    } finally {
      await stop(a);
      await stop(b);
    }
  });

  it('a stored account the CA does not know is replaced by a new one', async () => {
    // The account of the first case with another id: the CA answers accountDoesNotExist.
    const stored = JSON.parse(fs.readFileSync(path.join(storage1(), 'account.json'), 'utf8'));
    stored.credentials.id = stored.credentials.id.replace(/[^/]+$/, '0000000000000000');
    const storage = path.join(env.dir, 'storage-forgotten');
    fs.mkdirSync(storage);
    fs.writeFileSync(path.join(storage, 'account.json'), JSON.stringify(stored));
    const agent = await startAgent(agentPort, { domains: ['d.acme.test'], storage });
    try {
      await waitForSerial(agent, storage, 'd.acme.test');
      assert.match(agent.proc.out, /acme: new order: .*accountDoesNotExist/);
      await h.poll(async () => (await orders(agent)).ok === 1, { attempts: 40, delayMs: 100, what: 'orders{ok} = 1' });
      assert.equal((await orders(agent)).error, 1);
      const now = JSON.parse(fs.readFileSync(path.join(storage, 'account.json'), 'utf8'));
      assert.notEqual(now.credentials.id, stored.credentials.id);
    } finally {
      await stop(agent);
    }
  });

  it('an order the CA refuses is logged with its ACME problem, counted and retried', async () => {
    // dnsmasq answers only *.acme.test: pebble cannot resolve this name, so validation fails.
    const storage = path.join(env.dir, 'storage-refused');
    const agent = await startAgent(agentPort, { domains: ['nowhere.invalid-tld-gopush'], storage });
    try {
      await h.poll(async () => (await orders(agent)).error >= 2,
        { attempts: 80, delayMs: 250, maxDelayMs: 500, what: 'two refused orders' })
        .catch((e) => { throw new Error(`${e.message}\n--- agent:\n${agent.proc.tail()}`); });
      assert.equal((await orders(agent)).ok, 0);
      assert.match(agent.proc.out, /ERROR gopush::acme: acme: .*urn:ietf:params:acme:error:/);
      assert.ok(!fs.existsSync(path.join(storage, 'nowhere.invalid-tld-gopush', 'cert.pem')));
    } finally {
      await stop(agent);
    }
  });

  it('pebble down: the agent starts and serves; the failed order is counted and retried', async () => {
    const closed = await h.freePort();
    const storage = path.join(env.dir, 'storage-down');
    const agent = await startAgent(agentPort, {
      domains: ['c.acme.test'], storage, directory: `https://127.0.0.1:${closed}/dir`,
    });
    try {
      const r = await h.httpGet(`${agent.url}/whoami`, { headers: { cookie: 'uid=u2' } });
      assert.equal(r.status, 200, r.body);
      await h.poll(async () => (await orders(agent)).error >= 2,
        { attempts: 60, delayMs: 250, maxDelayMs: 500, what: 'two failed orders' });
      assert.equal((await orders(agent)).ok, 0);
      assert.match(agent.proc.out, /acme: .*127\.0\.0\.1/);
      assert.match(agent.proc.out, /retry_in/);
      assert.ok(!fs.existsSync(path.join(storage, 'c.acme.test', 'cert.pem')));
    } finally {
      await stop(agent);
    }
  });
});
