'use strict';
// TLS listeners (issue 13): socket.io over wss:// and https:// polling, HTTP/2 by ALPN (polling,
// uid sources, a 430 with its body, sid memory), SNI certificate choice, X-Forwarded-Proto,
// redirect_https, bad input on the TLS port (plain HTTP, unknown SNI, garbage after the
// ClientHello, 1,000 half-open handshakes), and a SIGHUP certificate swap under 100 open wss
// connections (plus a bad certificate on reload keeping the old one), and `tls.watch` loading
// rewritten files without a signal (a second agent).
//
// One agent: a plain listener (readiness, control), a TLS listener (certificates `site` for
// localhost/site.test/*.wild.test/127.0.0.1 and `other` for other.test, no `default`,
// handshake_timeout 2s) and a plain listener with redirect_https. The CA and certificates are
// made by the openssl CLI (ECDSA P-256) for this run.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const fs = require('node:fs');
const http2 = require('node:http2');
const https = require('node:https');
const net = require('node:net');
const path = require('node:path');
const tls = require('node:tls');
const h = require('../lib/harness');

const SEP = '\x1e';
const HANDSHAKE_TIMEOUT_MS = 2000;
const HEADER_TIMEOUT_MS = 1000;

describe('TLS listeners', { timeout: 240_000 }, () => {
  let env;
  let A;
  let B;
  let agent;
  let ca;
  let site;
  let other;
  let ports;

  const fingerprint = (pem) => new crypto.X509Certificate(pem).fingerprint256;

  before(async () => {
    env = new h.TestEnv('tls');
    await env.startRedis();
    A = await env.startBackend();
    B = await env.startBackend();
    ca = await h.makeTestCa(env.dir);
    site = await h.issueCert(ca, 'site', ['localhost', 'site.test', '*.wild.test', '127.0.0.1']);
    other = await h.issueCert(ca, 'other', ['other.test']);
    const [plain, secure, redirect] = await h.freePorts(3);
    ports = { plain, secure, redirect };
    const cfg = env.makeConfig({ port: plain, pools: { default: [A.addr, B.addr] } });
    cfg.listen = [
      `127.0.0.1:${plain}`,
      {
        addr: `127.0.0.1:${secure}`,
        tls: {
          certificates: [{ cert: 'site.pem', key: 'site.key' }, { cert: 'other.pem', key: 'other.key' }],
          handshake_timeout: `${HANDSHAKE_TIMEOUT_MS}ms`,
          // Off: the swaps below must be the signal's doing (tls.watch has its own agent).
          watch: '0s',
        },
      },
      { addr: `127.0.0.1:${redirect}`, redirect_https: true, https_port: secure },
    ];
    cfg.access_log = { enabled: true };
    cfg.limits = { header_timeout: `${HEADER_TIMEOUT_MS}ms` };
    agent = await env.startAgent(cfg);
  });

  after(async () => {
    if (env) await env.close();
  });

  const httpsUrl = () => `https://127.0.0.1:${ports.secure}`;

  /** The leaf the TLS listener serves for `servername` (undefined: no SNI). */
  const leafFor = (servername, { verify = true, port = ports.secure } = {}) => new Promise((resolve, reject) => {
    // Unverified for the names no certificate has: what fails must be the handshake itself.
    const opts = { host: '127.0.0.1', port, ca: ca.pem, ALPNProtocols: ['http/1.1'], rejectUnauthorized: verify };
    if (servername) opts.servername = servername;
    const s = tls.connect(opts, () => {
      const cert = s.getPeerCertificate();
      s.end();
      resolve({ fingerprint: cert.fingerprint256, san: cert.subjectaltname, alpn: s.alpnProtocol });
    });
    s.setTimeout(5000, () => s.destroy(new Error(`TLS handshake for ${servername} timed out`)));
    s.once('error', reject);
  });

  /** GET over HTTPS/1.1 with the test CA: {status, body, headers}. */
  const httpsGet = (p, headers = {}) => new Promise((resolve, reject) => {
    const req = https.get({
      host: '127.0.0.1', port: ports.secure, path: p, ca: ca.pem, servername: 'localhost', headers, agent: false,
    }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode, body: Buffer.concat(chunks).toString(), headers: res.headers }));
    });
    req.setTimeout(5000, () => req.destroy(new Error(`GET ${p} over https timed out`)));
    req.once('error', reject);
  });

  /** One request on an h2 session: {status, body, headers}. */
  const h2Request = (session, p, { method = 'GET', headers = {}, body } = {}) => new Promise((resolve, reject) => {
    const req = session.request({ ':method': method, ':path': p, ...headers });
    let status = 0;
    let respHeaders = {};
    const chunks = [];
    req.on('response', (hs) => { status = hs[':status']; respHeaders = hs; });
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => resolve({ status, body: Buffer.concat(chunks).toString(), headers: respHeaders }));
    req.on('error', reject);
    req.setTimeout(5000, () => req.close(http2.constants.NGHTTP2_CANCEL, () => reject(new Error(`h2 ${method} ${p} timed out`))));
    if (body !== undefined) req.end(body); else req.end();
  });

  const h2Connect = () => new Promise((resolve, reject) => {
    const session = http2.connect(httpsUrl(), { ca: ca.pem, servername: 'localhost' });
    session.once('connect', () => resolve(session));
    session.once('error', reject);
  });

  const metric = async (re) => {
    const r = await h.admin(agent, 'GET', '/metrics');
    const m = r.text.match(re);
    return m ? Number(m[1]) : null;
  };

  it('socket.io over wss:// and polling over https:// reach the backends with the uid and X-Forwarded-Proto https', async () => {
    const ws = await env.connect(httpsUrl(), { ca: ca.pem, transports: ['websocket'], query: { uid: 'tls-ws' } });
    assert.equal(ws.hello.transport, 'websocket');
    assert.equal(ws.hello.header, 'tls-ws', 'the uid forwarded in x-gopush-uid');
    assert.equal(ws.hello.headers['x-forwarded-proto'], 'https');
    const polling = await env.connect(httpsUrl(), {
      ca: ca.pem, transports: ['polling'], extraHeaders: { 'x-user-id': 'tls-poll' },
    });
    assert.equal(polling.hello.transport, 'polling');
    assert.equal(polling.hello.header, 'tls-poll');
    assert.equal(polling.hello.headers['x-forwarded-proto'], 'https');
    const whoami = await h.emitAck(polling.socket, 'whoami');
    assert.equal(whoami.uid, 'tls-poll');
    // The plain listener of the same agent says http.
    const plain = await env.connect(agent.url, { transports: ['websocket'], query: { uid: 'tls-ws' } });
    assert.equal(plain.hello.headers['x-forwarded-proto'], 'http');
    assert.equal(plain.hello.port, ws.hello.port, 'same uid, same backend on either listener');
    for (const s of [ws, polling, plain]) s.socket.close();
  });

  it('HTTP/2: uid sources, a 430 with its body, and an Engine.IO polling session whose sid the agent learns', async () => {
    const session = await h2Connect();
    try {
      assert.equal(session.alpnProtocol, 'h2');
      // The three uid sources over h2.
      const byCookie = await h2Request(session, '/whoami', { headers: { cookie: 'uid=h2-cookie' } });
      assert.equal(byCookie.status, 200, byCookie.body);
      const who = JSON.parse(byCookie.body);
      assert.equal(who.uid_header, 'h2-cookie');
      assert.equal(who.headers['x-forwarded-proto'], 'https');
      const byQuery = JSON.parse((await h2Request(session, '/whoami?uid=h2-query')).body);
      assert.equal(byQuery.uid_header, 'h2-query');
      const byHeader = JSON.parse((await h2Request(session, '/whoami', { headers: { 'x-user-id': 'h2-header' } })).body);
      assert.equal(byHeader.uid_header, 'h2-header');
      assert.equal(byHeader.uid_query, 'h2-header', 'the uid forwarded in the query too');
      // A refusal keeps its status and body.
      const refused = await h2Request(session, '/socket.io/?EIO=4&transport=polling');
      assert.equal(refused.status, 430);
      assert.match(refused.body, /^gopush: no uid in the request \(tried /);
      // A polling session over the same h2 connection.
      const q = (sid) => `/socket.io/?EIO=4&transport=polling&uid=h2-poller${sid ? `&sid=${encodeURIComponent(sid)}` : ''}`;
      const hs = await h2Request(session, q());
      assert.equal(hs.status, 200, hs.body);
      assert.match(hs.body, /^0\{/);
      const { sid } = JSON.parse(hs.body.slice(1));
      const join = await h2Request(session, q(sid), {
        method: 'POST', body: '40', headers: { 'content-type': 'text/plain;charset=UTF-8' },
      });
      assert.equal(join.status, 200, join.body);
      const poll = await h2Request(session, q(sid));
      assert.equal(poll.status, 200, poll.body);
      const portPacket = poll.body.split(SEP).find((p) => p.startsWith('42["port"'));
      assert.ok(portPacket, `no port event in ${JSON.stringify(poll.body)}`);
      const port = JSON.parse(portPacket.slice(2))[1];
      assert.ok([A.port, B.port].includes(port));
      // The agent learned the sid from the handshake that came over h2.
      const route = await h.admin(agent, 'GET', `/api/route?uid=h2-poller&sid=${encodeURIComponent(sid)}`);
      assert.equal(route.status, 200, route.text);
      assert.equal(route.json.via, 'session', route.text);
      assert.equal(route.json.backend, `127.0.0.1:${port}`);
      // A second poll on the session reaches the same backend (a wrong one would answer 400).
      const again = await h2Request(session, q(sid), {
        method: 'POST', body: '42["whoami"]', headers: { 'content-type': 'text/plain;charset=UTF-8' },
      });
      assert.equal(again.status, 200, again.body);
    } finally {
      session.close();
    }
    // The access log has the h2 requests.
    await agent.proc.waitForOutput(/uid=h2-header|"uid":"h2-header"|h2-header/, 5000, 'an access log line for the h2 request');
  });

  it('SNI picks the certificate from its SAN; no SNI gets the first; an unknown name fails the handshake', async () => {
    const siteFp = fingerprint(site.pem);
    const otherFp = fingerprint(other.pem);
    assert.equal((await leafFor('other.test')).fingerprint, otherFp);
    assert.equal((await leafFor('site.test')).fingerprint, siteFp);
    assert.equal((await leafFor('a.wild.test')).fingerprint, siteFp, 'the wildcard');
    assert.equal((await leafFor(undefined)).fingerprint, siteFp, 'no SNI: the first certificate');
    const handshakeRefused = (err) => {
      // rustls has no certificate for the name: its alert ends the handshake.
      assert.match(err.message, /alert|handshake/i, err.message);
      return true;
    };
    await assert.rejects(leafFor('nobody.test', { verify: false }), handshakeRefused);
    await assert.rejects(leafFor('a.b.wild.test', { verify: false }), handshakeRefused, 'a wildcard covers one label only');
    assert.equal((await httpsGet('/whoami?uid=after-sni')).status, 200);
  });

  it('plain HTTP on the TLS port and garbage after a ClientHello fail cleanly; the agent keeps serving', async () => {
    const before = await metric(/gopush_tls_handshake_failures_total\{reason="error"\} (\d+)/);
    const closedAfter = (payload) => new Promise((resolve, reject) => {
      const s = net.connect(ports.secure, '127.0.0.1', () => s.write(payload));
      const got = [];
      s.on('data', (c) => got.push(c));
      s.on('close', () => resolve(Buffer.concat(got)));
      s.on('error', () => {}); // a reset is a clean refusal too
      s.setTimeout(5000, () => { s.destroy(); reject(new Error('the TLS port kept the connection open')); });
    });
    const answer = await closedAfter('GET /whoami?uid=x HTTP/1.1\r\nHost: localhost\r\n\r\n');
    assert.doesNotMatch(answer.toString('latin1'), /^HTTP\//, 'no HTTP answer on the TLS port');
    // A real ClientHello (captured from node's TLS client), then garbage.
    const hello = await new Promise((resolve, reject) => {
      const srv = net.createServer((c) => c.once('data', (d) => { resolve(d); c.destroy(); srv.close(); }));
      srv.listen(0, '127.0.0.1', () => {
        const c = tls.connect({ host: '127.0.0.1', port: srv.address().port, servername: 'site.test', rejectUnauthorized: false });
        c.on('error', () => {});
      });
      srv.on('error', reject);
    });
    assert.equal(hello[0], 0x16, 'a TLS handshake record');
    await closedAfter(Buffer.concat([hello, crypto.randomBytes(4096)]));
    await h.poll(async () => (await metric(/gopush_tls_handshake_failures_total\{reason="error"\} (\d+)/)) >= before + 2,
      { what: 'both failures counted' });
    assert.equal((await httpsGet('/whoami?uid=after-garbage')).status, 200);
    assert.equal(agent.proc.exited, null);
  });

  it('1,000 half-open handshakes are cut at tls.handshake_timeout while a normal request still succeeds', async () => {
    const before = await metric(/gopush_tls_handshake_failures_total\{reason="timeout"\} (\d+)/);
    const N = 1000;
    const sockets = [];
    let closed = 0;
    await h.mapLimit([...Array(N).keys()], 100, (i) => new Promise((resolve, reject) => {
      const s = net.connect(ports.secure, '127.0.0.1', () => {
        // Half send the start of a ClientHello record, half nothing at all.
        if (i % 2 === 0) s.write(Buffer.from([0x16, 0x03, 0x01, 0x02, 0x00, 0x01]));
        resolve();
      });
      s.on('close', () => { closed++; });
      s.on('error', () => {});
      s.once('error', reject);
      sockets.push(s);
    }));
    const opened = Date.now();
    try {
      // All 1,000 are pending: a normal client is served at once all the same.
      const r = await httpsGet('/whoami?uid=beside-the-flood');
      assert.equal(r.status, 200);
      assert.ok(closed < N, 'the half-open handshakes were still open when the request was served');
      // The agent closes every one of them within the handshake timeout (plus scheduling slack).
      await h.poll(async () => closed === N, {
        attempts: 200, delayMs: 100, maxDelayMs: 200, what: `all ${N} half-open handshakes closed by the agent (${closed} so far)`,
      });
      const took = Date.now() - opened;
      assert.ok(took < HANDSHAKE_TIMEOUT_MS + 15_000, `closed after ${took} ms`);
      assert.ok((await metric(/gopush_tls_handshake_failures_total\{reason="timeout"\} (\d+)/)) >= before + N);
      assert.equal((await httpsGet('/whoami?uid=after-the-flood')).status, 200);
    } finally {
      for (const s of sockets) s.destroy();
    }
  });

  it('limits.header_timeout cuts a TLS HTTP/1.1 client dribbling its head, but not an idle HTTP/2 session', async () => {
    const before = await metric(/gopush_header_timeouts_total (\d+)/);
    const cut = await new Promise((resolve, reject) => {
      const s = tls.connect({ host: '127.0.0.1', port: ports.secure, ca: ca.pem, servername: 'localhost', ALPNProtocols: ['http/1.1'] }, () => {
        const at = Date.now();
        s.write('GET /whoami?uid=slow HTTP/1.1\r\nHost: localhost\r\n'); // never finished
        s.on('close', () => resolve(Date.now() - at));
      });
      s.on('error', () => {});
      s.setTimeout(10_000, () => { s.destroy(); reject(new Error('a head left unfinished was not cut')); });
    });
    assert.ok(cut >= HEADER_TIMEOUT_MS - 100, `cut after ${cut} ms`);
    assert.ok((await metric(/gopush_header_timeouts_total (\d+)/)) >= before + 1);
    // An h2 session idle for longer than the head deadline (the idle time is the scenario, not a
    // synchronisation) still carries the next request: the deadline reads HTTP/1.1 heads only.
    const session = await h2Connect();
    try {
      assert.equal((await h2Request(session, '/whoami?uid=h2-idle')).status, 200);
      await h.delay(HEADER_TIMEOUT_MS * 2);
      assert.equal(session.closed || session.destroyed, false, 'the idle h2 session was closed');
      assert.equal((await h2Request(session, '/whoami?uid=h2-idle')).status, 200);
    } finally {
      session.close();
    }
  });

  it('redirect_https answers 308 to https on the configured port, except ACME challenges', async () => {
    const base = `http://127.0.0.1:${ports.redirect}`;
    const r = await h.request(`${base}/socket.io/?EIO=4&transport=polling&uid=r`, { headers: { host: 'example.test:8080' } });
    assert.equal(r.status, 308);
    assert.equal(r.headers.location, `https://example.test:${ports.secure}/socket.io/?EIO=4&transport=polling&uid=r`);
    const root = await h.request(`${base}/`, { headers: { host: 'example.test' } });
    assert.equal(root.status, 308);
    assert.equal(root.headers.location, `https://example.test:${ports.secure}/`);
    // ACME HTTP-01 challenges are proxied as usual (the backend has no such page: its 404).
    const acme = await h.request(`${base}/.well-known/acme-challenge/tok3n?uid=acme`, { headers: { host: 'example.test' } });
    assert.equal(acme.status, 404);
    assert.match(acme.body, /^backend \d+: not found/);
    // The other plain listener does not redirect.
    assert.equal((await h.httpGet(`${agent.url}/whoami?uid=r`)).status, 200);
  });

  it('status and metrics show each certificate with its names and expiry', async () => {
    const status = await h.admin(agent, 'GET', '/api/status');
    assert.equal(status.status, 200);
    const [listener] = status.json.tls;
    assert.equal(listener.listen, `127.0.0.1:${ports.secure}`);
    const notAfter = Math.floor(new Date(new crypto.X509Certificate(site.pem).validTo).getTime() / 1000);
    assert.deepEqual(listener.certificates[0].names, ['localhost', 'site.test', '*.wild.test']);
    assert.equal(listener.certificates[0].not_after_unix, notAfter);
    const m = await metric(new RegExp(`gopush_tls_certificate_expiry_seconds\\{[^}]*name="site.test"[^}]*\\} (\\d+)`));
    assert.equal(m, notAfter);
  });

  it('SIGHUP swaps a certificate under 100 open wss connections without a drop; a bad one on reload keeps the old', async () => {
    const clients = await h.mapLimit([...Array(100).keys()], 20, (i) => env.connect(httpsUrl(), {
      ca: ca.pem, transports: ['websocket'], query: { uid: `swap-${i}` },
    }));
    let drops = 0;
    for (const c of clients) c.socket.on('disconnect', () => { drops++; });
    const next = await h.issueCert(ca, 'site-next', ['localhost', 'site.test', '*.wild.test', '127.0.0.1']);
    // The same file names get new contents.
    fs.copyFileSync(next.cert, path.join(env.dir, 'site.pem'));
    fs.copyFileSync(next.key, path.join(env.dir, 'site.key'));
    process.kill(agent.proc.pid, 'SIGHUP');
    await h.poll(async () => (await leafFor('site.test')).fingerprint === fingerprint(next.pem), {
      what: 'new handshakes served the new certificate',
    });
    assert.equal((await leafFor(undefined)).fingerprint, fingerprint(next.pem));
    // Every open connection is still there and answers.
    const acks = await h.mapLimit(clients, 20, (c) => h.emitAck(c.socket, 'whoami'));
    assert.equal(acks.length, 100);
    acks.forEach((a, i) => assert.equal(a.uid, `swap-${i}`));
    assert.equal(drops, 0);

    // A key that does not match: the reload is refused, the running certificate stays.
    fs.copyFileSync(other.key, path.join(env.dir, 'site.key'));
    const reload = await h.admin(agent, 'POST', '/api/reload');
    assert.notEqual(reload.status, 200);
    assert.match(reload.json.error, /listen\[1\]\.tls\.certificates\[0\]\.key: .*site\.key does not match the certificate .*site\.pem/);
    process.kill(agent.proc.pid, 'SIGHUP');
    await agent.proc.waitForOutput(/reload refused, the running configuration stays: .*does not match the certificate/, 5000, 'the refused reload in the log');
    assert.equal((await leafFor('site.test')).fingerprint, fingerprint(next.pem));
    assert.equal((await httpsGet('/whoami?uid=after-bad-reload')).status, 200);
    assert.equal(drops, 0);
    for (const c of clients) c.socket.close();
    // Put the matching key back for the next test's new process.
    fs.copyFileSync(next.key, path.join(env.dir, 'site.key'));
  });

  it('tls.watch loads rewritten certificate files without a signal, under open wss connections; a pair that does not load is reported and the served one stays', async () => {
    const first = await h.issueCert(ca, 'watched', ['localhost', '127.0.0.1']);
    const [plain, secure] = await h.freePorts(2);
    const cfg = env.makeConfig({ port: plain, pools: { default: [A.addr, B.addr] } });
    cfg.listen = [
      `127.0.0.1:${plain}`,
      { addr: `127.0.0.1:${secure}`, tls: { certificates: [{ cert: 'watched.pem', key: 'watched.key' }], watch: '200ms' } },
    ];
    const w = await env.startAgent(cfg, { file: 'watch.yaml' });
    try {
      const served = async () => (await leafFor('localhost', { port: secure })).fingerprint;
      assert.equal(await served(), fingerprint(first.pem));
      const clients = await h.mapLimit([...Array(20).keys()], 10, (i) => env.connect(`https://127.0.0.1:${secure}`, {
        ca: ca.pem, transports: ['websocket'], query: { uid: `watch-${i}` },
      }));
      let drops = 0;
      for (const c of clients) c.socket.on('disconnect', () => { drops++; });

      // A key that does not match the certificate: reported with the key and the problem; the
      // loaded pair stays served.
      fs.copyFileSync(other.key, path.join(env.dir, 'watched.key'));
      await w.proc.waitForOutput(/certificate files changed on disk but do not load, the served ones stay: listen\[1\]\.tls\.certificates\[0\]\.key: .*watched\.key does not match the certificate/,
        10000, 'the unloadable pair in the log');
      assert.equal(await served(), fingerprint(first.pem));

      // A renewal over the same file names (with a name of its own, to find it in /metrics).
      const renewed = await h.issueCert(ca, 'renewed', ['localhost', '127.0.0.1', 'renewed.test']);
      fs.copyFileSync(renewed.cert, path.join(env.dir, 'watched.pem'));
      fs.copyFileSync(renewed.key, path.join(env.dir, 'watched.key'));
      await h.poll(async () => (await served()) === fingerprint(renewed.pem), {
        attempts: 100, delayMs: 50, maxDelayMs: 200, what: 'new handshakes to get the renewed certificate',
      });
      assert.match(w.proc.out, /certificate files changed on disk: loaded/);
      const notAfter = Math.floor(new Date(new crypto.X509Certificate(renewed.pem).validTo).getTime() / 1000);
      const m = (await h.admin(w, 'GET', '/metrics')).text
        .match(/gopush_tls_certificate_expiry_seconds\{[^}]*name="renewed\.test"[^}]*\} (\d+)/);
      assert.ok(m, 'the renewed certificate in /metrics');
      assert.equal(Number(m[1]), notAfter);
      const acks = await h.mapLimit(clients, 10, (c) => h.emitAck(c.socket, 'whoami'));
      acks.forEach((a, i) => assert.equal(a.uid, `watch-${i}`));
      assert.equal(drops, 0);
      for (const c of clients) c.socket.close();
    } finally {
      await w.proc.kill('SIGTERM');
    }
  });

  it('a graceful upgrade (run -u) hands the TLS listener over: the new process serves TLS and h2', async () => {
    const sock = agent.cfg.server.upgrade_sock;
    const next = new h.Proc('gopush:new', h.GOPUSH_BIN, ['run', '-u', '-c', agent.configFile], { env: { RUST_LOG: 'info' } });
    env.procs.push(next);
    await h.poll(async () => fs.existsSync(sock) || next.exited,
      { attempts: 100, delayMs: 20, maxDelayMs: 100, what: 'the new process to wait on upgrade_sock' });
    assert.equal(next.exited, null, `new process exited: ${next.tail()}`);
    process.kill(agent.proc.pid, 'SIGQUIT');
    const oldExit = await h.withTimeout(agent.proc.exitPromise, 30000, 'the old process to exit');
    assert.equal(oldExit.code, 0, `old process exit ${JSON.stringify(oldExit)}: ${agent.proc.tail()}`);
    // Only the new process is left to answer on the TLS port.
    const r = await httpsGet('/whoami?uid=after-upgrade');
    assert.equal(r.status, 200, r.body);
    assert.equal(JSON.parse(r.body).headers['x-forwarded-proto'], 'https');
    const session = await h2Connect();
    try {
      assert.equal(session.alpnProtocol, 'h2');
      assert.equal((await h2Request(session, '/whoami?uid=after-upgrade-h2')).status, 200);
    } finally {
      session.close();
    }
    assert.equal(next.exited, null);
  });
});
