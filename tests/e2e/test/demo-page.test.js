'use strict';
// The built-in demo, end to end in a real browser: `gopush demo` (the agent on :6003 in front of
// its two built-in Socket.IO backends on 127.0.0.1:4000 / :4001) serves its page, and headless
// Chromium, driven over the Chrome DevTools Protocol (with `ws`, no Playwright), uses it:
//   - the page connects through the agent and shows the backend port;
//   - for one uid per backend (chosen with `gopush route -c conf/demo.yaml`, never hard-coded) the
//     page's backend port and its GET /whoami answer are the backend the route CLI names;
//   - the room chat crosses backends: a Node socket.io-client on the other backend and the page
//     exchange a message in both directions;
//   - over https (the demo's TLS listener on :6443, a self-signed localhost certificate the demo
//     makes at start; Chromium trusts exactly that key, --ignore-certificate-errors-spki-list):
//     the page connects, its GET /whoami and a polling session it opens go over HTTP/2
//     (`nextHopProtocol` of the resource timing entries) and its WebSocket over HTTP/1.1 (the
//     handshake's 101, which HTTP/2 does not have);
//   - a screenshot of the page goes to <repo>/target/demo-page.png (a CI artifact).
//
// The demo listens on fixed ports (6003, 4000, 4001): the test fails at once with a clear message
// if one is taken. The other test files use random free ports from the ephemeral range, so running
// them alongside (--test-concurrency=2) is fine.
//
// Environment: GOPUSH_BIN (as in lib/harness.js), CHROMIUM_BIN (default /usr/bin/chromium, else
// `chromium` on PATH), GOPUSH_E2E_KEEP (keep the temp dir with the demo and Chromium logs).

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const fs = require('node:fs');
const net = require('node:net');
const tls = require('node:tls');
const path = require('node:path');
const WebSocket = require('ws');
const h = require('../lib/harness');

const REPO = path.resolve(__dirname, '../../..');
const DEMO_CONF = path.join(REPO, 'conf', 'demo.yaml');
const SCREENSHOT = path.join(REPO, 'target', 'demo-page.png');
const AGENT_PORT = 6003;
const AGENT = `http://127.0.0.1:${AGENT_PORT}`;
const TLS_PORT = 6443;
const AGENT_TLS = `https://localhost:${TLS_PORT}`;
// Where `gopush demo` binds (fixed by the demo itself): checked free before it starts.
const FIXED_BINDS = [['0.0.0.0', AGENT_PORT], ['0.0.0.0', TLS_PORT], ['127.0.0.1', 4000], ['127.0.0.1', 4001]];

const CANDIDATES = ['alice', 'bob', 'carol', 'dave', 'erin', 'frank', 'grace', 'heidi', 'ivan', 'judy',
  'mallory', 'oscar', 'peggy', 'trent', 'victor', 'walter',
  ...Array.from({ length: 32 }, (_, i) => `user-${i + 1}`)];

// ---------------------------------------------------------------------------------------------
// helpers

function findChromium() {
  if (process.env.CHROMIUM_BIN) return process.env.CHROMIUM_BIN;
  if (fs.existsSync('/usr/bin/chromium')) return '/usr/bin/chromium';
  for (const dir of (process.env.PATH || '').split(path.delimiter)) {
    const f = path.join(dir || '.', 'chromium');
    try {
      fs.accessSync(f, fs.constants.X_OK);
      return f;
    } catch (_) { /* next */ }
  }
  throw new Error('chromium not found: neither /usr/bin/chromium nor `chromium` on PATH '
    + '(Debian: apt-get install chromium; or set CHROMIUM_BIN)');
}

/** Throws a clear error if host:port cannot be bound (the demo's fixed ports). */
async function assertBindable(host, port) {
  const srv = net.createServer();
  try {
    await new Promise((resolve, reject) => {
      srv.once('error', reject);
      srv.listen({ host, port, exclusive: true }, resolve);
    });
  } catch (err) {
    throw new Error(`\`gopush demo\` needs ${host}:${port}, but it cannot be bound (${err.code || err.message}); `
      + 'is another `gopush demo` (or something else) running? Stop it and re-run this test.');
  } finally {
    await new Promise((r) => srv.close(() => r()));
  }
}

/** The backends of pool `default` in conf/demo.yaml, per `gopush check` (["IP:port", ...]). */
async function demoBackends() {
  const r = await h.execGopush(['check', '-c', DEMO_CONF]);
  assert.equal(r.code, 0, `gopush check -c ${DEMO_CONF} failed: ${r.stderr || r.stdout}`);
  const m = r.stdout.match(/^pool default:\n((?:[ \t]+\S+.*\n?)+)/m);
  assert.ok(m, `gopush check printed no 'pool default:' block: ${r.stdout}`);
  const addrs = [...m[1].matchAll(/\b(\d{1,3}(?:\.\d{1,3}){3}:\d{1,5})\b/g)].map((x) => x[1]);
  assert.equal(addrs.length, 2, `expected the demo's two backends in pool default, got ${JSON.stringify(addrs)}`);
  return addrs;
}

/** `gopush route UID -c conf/demo.yaml`: the first line of stdout is the chosen "IP:port". */
async function routeDemo(uid) {
  const r = await h.execGopush(['route', uid, '-c', DEMO_CONF]);
  assert.equal(r.code, 0, `gopush route ${uid} -c ${DEMO_CONF} exited ${r.code}: ${r.stderr || r.stdout}`);
  const first = r.stdout.split('\n')[0].trim();
  assert.match(first, /^\d{1,3}(?:\.\d{1,3}){3}:\d{1,5}$/, `gopush route ${uid}: first line is not IP:port: ${JSON.stringify(r.stdout)}`);
  return first;
}

/** base64(SHA-256(SubjectPublicKeyInfo)) of the leaf served on 127.0.0.1:port for `localhost`. */
function servedSpki(port) {
  return h.withTimeout(new Promise((resolve, reject) => {
    const s = tls.connect({ host: '127.0.0.1', port, servername: 'localhost', rejectUnauthorized: false, ALPNProtocols: ['http/1.1'] }, () => {
      const der = s.getPeerX509Certificate().publicKey.export({ type: 'spki', format: 'der' });
      s.destroy();
      resolve(crypto.createHash('sha256').update(der).digest('base64'));
    });
    s.once('error', reject);
  }), 5000, `a TLS handshake with the demo on :${port}`);
}

/** A minimal CDP client over one target's WebSocket; every command is bounded. */
class Cdp {
  constructor(ws) {
    this.ws = ws;
    this.nextId = 0;
    this.pending = new Map();
    this.exceptions = []; // Runtime.exceptionThrown descriptions
    this.webSockets = []; // Network.webSocketHandshakeResponseReceived params
    this.closed = false;
    ws.on('message', (data) => {
      let msg;
      try { msg = JSON.parse(String(data)); } catch (_) { return; }
      if (msg.id !== undefined && this.pending.has(msg.id)) {
        const { resolve, reject, method } = this.pending.get(msg.id);
        this.pending.delete(msg.id);
        if (msg.error) reject(new Error(`CDP ${method}: ${msg.error.message} (${msg.error.code})`));
        else resolve(msg.result);
      } else if (msg.method === 'Network.webSocketHandshakeResponseReceived') {
        this.webSockets.push(msg.params);
      } else if (msg.method === 'Runtime.exceptionThrown') {
        const d = msg.params.exceptionDetails;
        this.exceptions.push((d.exception && d.exception.description) || d.text);
      }
    });
    ws.on('close', () => {
      this.closed = true;
      for (const { reject, method } of this.pending.values()) reject(new Error(`CDP ${method}: connection closed`));
      this.pending.clear();
    });
  }

  static async connect(url, ms = 5000) {
    const ws = new WebSocket(url, { perMessageDeflate: false });
    await h.withTimeout(new Promise((resolve, reject) => {
      ws.once('open', resolve);
      ws.once('error', reject);
    }), ms, `CDP WebSocket ${url} to open`).catch((err) => { ws.terminate(); throw err; });
    return new Cdp(ws);
  }

  send(method, params = {}, ms = 5000) {
    if (this.closed) return Promise.reject(new Error(`CDP ${method}: connection closed`));
    const id = ++this.nextId;
    const p = new Promise((resolve, reject) => this.pending.set(id, { resolve, reject, method }));
    this.ws.send(JSON.stringify({ id, method, params }));
    return h.withTimeout(p, ms, `CDP ${method}`).finally(() => this.pending.delete(id));
  }

  /** Evaluates `expression` in the page; returns its value (JSON-serialisable). */
  async evaluate(expression, ms = 5000) {
    const r = await this.send('Runtime.evaluate', { expression, awaitPromise: true, returnByValue: true }, ms);
    if (r.exceptionDetails) {
      const d = r.exceptionDetails;
      throw new Error(`page threw evaluating ${expression}: ${(d.exception && d.exception.description) || d.text}`);
    }
    return r.result.value;
  }

  close() {
    try { this.ws.terminate(); } catch (_) { /* ignore */ }
  }
}

// What the page shows, for assertions and failure messages.
const SNAPSHOT_JS = `(() => {
  const t = (id) => { const e = document.getElementById(id); return e ? e.textContent : null; };
  return {
    url: location.href, title: document.title,
    state: t('state'), detail: t('detail'), port: t('port'), uid: t('uid'), seenUid: t('seen-uid'),
    whoami: t('whoami'), rooms: t('rooms'),
    messages: [...document.querySelectorAll('#messages li')].map((li) => ({
      cls: li.className, meta: (li.querySelector('.meta') || {}).textContent || '', text: li.lastChild ? li.lastChild.textContent : '',
    })),
  };
})()`;

// ---------------------------------------------------------------------------------------------

describe('gopush demo page in headless Chromium (CDP)', { timeout: 60_000 }, () => {
  let env; // harness TestEnv: temp dir + process-group kill of the demo and Chromium in close()
  let demo;
  let chrome;
  let cdp;
  let backends; // ["127.0.0.1:4000", "127.0.0.1:4001"] per `gopush check`
  const byBackend = new Map(); // "IP:port" -> uid routed there (per `gopush route`)
  let shotTaken = false;

  const snapshot = () => cdp.evaluate(SNAPSHOT_JS, 3000).catch((err) => ({ snapshotError: err.message }));

  /** Polls a page expression until truthy (bounded); the error shows the page state. */
  async function waitPage(expression, what, ms = 8000) {
    const deadline = Date.now() + ms;
    let last;
    for (;;) {
      try {
        last = await cdp.evaluate(expression, 3000);
        if (last) return last;
      } catch (err) {
        last = err.message;
      }
      if (Date.now() >= deadline) break;
      await h.delay(50);
    }
    throw new Error(`timeout after ${ms} ms waiting for ${what} (last: ${JSON.stringify(last)}); page: `
      + `${JSON.stringify(await snapshot())}; page exceptions: ${JSON.stringify(cdp.exceptions)}`);
  }

  /**
   * Types `uid` into the page's uid form, submits, and waits until the page is connected again and
   * the backend reports the uid it saw. Once in ~50 runs (on a loaded machine) the reconnect right
   * after the switch reached the backend with the PREVIOUS uid; the likely cause is that Chromium
   * commits a `document.cookie` write to its cookie store asynchronously, so the WebSocket
   * handshake the page opens at once can still carry the old cookie. That case is reported as a
   * test diagnostic (`# ...` in the TAP output, with document.cookie) and the form is submitted
   * once more; a second mismatch, or no reconnect, fails. The port and /whoami checks that follow
   * are strict either way.
   */
  async function setPageUid(t, uid) {
    for (let attempt = 1; ; attempt++) {
      await cdp.evaluate(`document.getElementById('uid-input').value = ${JSON.stringify(uid)};
        document.querySelector('#uid-form button').click(); true`);
      await waitPage(`document.getElementById('state').textContent === 'connected'
        && document.getElementById('seen-uid').textContent !== '–'
        && /^[0-9]+$/.test(document.getElementById('port').textContent)`, `the page to reconnect after setting uid ${uid}`);
      const s = await snapshot();
      if (s.seenUid === uid) return s;
      const cookie = await cdp.evaluate('document.cookie').catch((err) => err.message);
      const msg = `attempt ${attempt}: the page set uid ${uid}, but the backend :${s.port} saw uid ${s.seenUid} `
        + `(document.cookie now ${JSON.stringify(cookie)})`;
      if (attempt >= 2) throw new Error(`${msg}; page: ${JSON.stringify(s)}`);
      t.diagnostic(`${msg}; submitting the uid form again`);
    }
  }

  async function takeScreenshot() {
    await cdp.evaluate(`document.querySelector('details').open = true; true`);
    const shot = await cdp.send('Page.captureScreenshot', { format: 'png', captureBeyondViewport: true }, 10000);
    const png = Buffer.from(shot.data, 'base64');
    fs.mkdirSync(path.dirname(SCREENSHOT), { recursive: true });
    fs.writeFileSync(SCREENSHOT, png);
    shotTaken = true;
    return png;
  }

  before(async () => {
    const chromiumBin = findChromium();
    if (!fs.existsSync(h.GOPUSH_BIN)) throw new Error(`gopush binary not found at ${h.GOPUSH_BIN} (cargo build --release, or set GOPUSH_BIN)`);
    for (const [host, port] of FIXED_BINDS) await assertBindable(host, port);

    backends = await demoBackends();
    // One uid per backend, the mapping taken from the route CLI (never hard-coded).
    for (const uid of CANDIDATES) {
      const addr = await routeDemo(uid);
      assert.ok(backends.includes(addr), `gopush route ${uid} named ${addr}, not one of ${JSON.stringify(backends)}`);
      if (!byBackend.has(addr)) byBackend.set(addr, uid);
      if (byBackend.size === backends.length) break;
    }
    assert.equal(byBackend.size, backends.length,
      `the route CLI put none of ${CANDIDATES.length} candidate uids on some backend: ${JSON.stringify([...byBackend])}`);

    env = new h.TestEnv('demo-page');

    // gopush demo; ready once GET / through the agent answers 200 with the page.
    demo = new h.Proc('gopush-demo', h.GOPUSH_BIN, ['demo'], {
      logFile: path.join(env.dir, 'gopush-demo.log'),
      env: { RUST_LOG: process.env.RUST_LOG || 'info' },
    });
    env.procs.push(demo);
    await h.poll(async () => {
      if (demo.exited) {
        throw Object.assign(new Error(`gopush demo exited ${JSON.stringify(demo.exited)}:\n${demo.tail()}`), { fatal: true });
      }
      const r = await h.httpGet(`${AGENT}/`, { timeoutMs: 1000 });
      return r.status === 200 && r.body.includes('<title>gopush demo</title>');
    }, { attempts: 60, delayMs: 50, maxDelayMs: 300, what: `GET ${AGENT}/ to answer 200 with the demo page` }).catch((err) => {
      throw new Error(`${err.message}\n--- ${demo.describe()} output:\n${demo.tail()}`);
    });

    // The demo's https listener is up too; Chromium will trust the key it serves (and only it).
    const spki = await h.poll(() => servedSpki(TLS_PORT).catch(() => false),
      { attempts: 40, delayMs: 50, maxDelayMs: 300, what: `the demo's TLS listener on :${TLS_PORT}` });

    // headless Chromium with a fresh profile (so no uid cookie yet) and a CDP port.
    const cdpPort = await h.freePort();
    const profile = fs.mkdtempSync(path.join(env.dir, 'chromium-profile-'));
    chrome = new h.Proc('chromium', chromiumBin, [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--no-first-run', '--window-size=1000,1400',
      `--user-data-dir=${profile}`, `--remote-debugging-port=${cdpPort}`,
      `--ignore-certificate-errors-spki-list=${spki}`, 'about:blank',
    ], { logFile: path.join(env.dir, 'chromium.log') });
    env.procs.push(chrome);
    const target = await h.poll(async () => {
      if (chrome.exited) {
        throw Object.assign(new Error(`chromium exited ${JSON.stringify(chrome.exited)}:\n${chrome.tail()}`), { fatal: true });
      }
      const r = await h.httpGet(`http://127.0.0.1:${cdpPort}/json/list`, { timeoutMs: 1000 });
      if (r.status !== 200) return false;
      return JSON.parse(r.body).find((t) => t.type === 'page' && t.webSocketDebuggerUrl);
    }, { attempts: 60, delayMs: 100, maxDelayMs: 400, what: `chromium /json/list on port ${cdpPort} to list a page` }).catch((err) => {
      throw new Error(`${err.message}\n--- ${chrome.describe()} output:\n${chrome.tail()}`);
    });
    cdp = await Cdp.connect(target.webSocketDebuggerUrl);
    await cdp.send('Runtime.enable');
    await cdp.send('Page.enable');
    await cdp.send('Network.enable');
  }, { timeout: 40_000 });

  after(async () => {
    try {
      // On failure still leave a screenshot behind for the CI artifact (best effort, bounded).
      if (cdp && !cdp.closed && !shotTaken) await takeScreenshot().catch(() => {});
    } finally {
      if (cdp) cdp.close();
      if (env) await env.close(); // closes tracked sockets, kills demo + Chromium process groups, removes the temp dir
    }
  });

  it('serves the page, which connects through the agent to the backend `gopush route` names for its cookie uid', async () => {
    await cdp.send('Page.navigate', { url: `${AGENT}/` });
    await waitPage(`document.title === 'gopush demo'
      && document.getElementById('state').textContent === 'connected'
      && /^[0-9]+$/.test(document.getElementById('port').textContent)
      && document.getElementById('seen-uid').textContent !== '–'`, 'the page to connect and show a backend port');
    const s = await snapshot();
    // A fresh profile has no cookie: the page made up a uid, set the cookie and connected with it.
    assert.match(s.uid, /^user-\d{4}$/, `generated uid: ${JSON.stringify(s)}`);
    assert.equal(s.seenUid, s.uid, 'the backend saw the cookie uid');
    // The browser's cookie store (not only what the page shows) holds that uid.
    const cookies = await cdp.send('Network.getCookies', { urls: [`${AGENT}/`] });
    assert.ok(cookies.cookies.some((c) => c.name === 'uid' && c.value === s.uid), `uid cookie: ${JSON.stringify(cookies)}`);
    const expected = await routeDemo(s.uid);
    assert.equal(s.port, String(h.portOf(expected)), `uid ${s.uid}: page port vs gopush route (${expected})`);
  });

  it('one uid per backend: the page\'s backend port and GET /whoami match `gopush route`', async (t) => {
    assert.equal(byBackend.size, 2);
    for (const [addr, uid] of byBackend) {
      const port = h.portOf(addr);
      const s = await setPageUid(t, uid);
      assert.equal(s.state, 'connected');
      assert.equal(s.uid, uid, 'the page shows the uid it set');
      assert.equal(s.port, String(port), `uid ${uid}: page backend port vs gopush route (${addr}); page: ${JSON.stringify(s)}`);
      assert.ok(s.messages.some((m) => m.text === `connected to backend :${port} as ${uid}`),
        `a 'connected to backend :${port} as ${uid}' line: ${JSON.stringify(s.messages)}`);

      // The page's GET /whoami button (plain HTTP through the agent, uid from the cookie).
      await cdp.evaluate(`document.getElementById('whoami').textContent = '';
        document.getElementById('whoami-btn').click(); true`);
      const text = await waitPage(`(() => { const t = document.getElementById('whoami').textContent;
        return t.startsWith('GET /whoami') ? t : false; })()`, `the /whoami answer for ${uid}`);
      const m = text.match(/^GET \/whoami \u2192 (\d+) (.*)$/s);
      assert.ok(m, `whoami line: ${JSON.stringify(text)}`);
      assert.equal(m[1], '200', `whoami status: ${text}`);
      assert.deepEqual(JSON.parse(m[2]), { port, uid }, `uid ${uid}: /whoami vs gopush route (${addr})`);
    }
  });

  it('room chat crosses backends: a Node client on the other backend and the page exchange messages', async (t) => {
    const [[pageAddr, pageUid], [nodeAddr, nodeUid]] = [...byBackend];
    const pagePort = h.portOf(pageAddr);
    const nodePort = h.portOf(nodeAddr);
    assert.notEqual(pagePort, nodePort);
    const room = `e2e-${process.pid}-${Date.now()}`;

    // The page sits on pageAddr (set again: the previous test may have left it elsewhere).
    let s = await setPageUid(t, pageUid);
    assert.equal(s.port, String(pagePort), `page on ${pageAddr}: ${JSON.stringify(s)}`);

    // The page joins the room.
    await cdp.evaluate(`document.getElementById('room-input').value = ${JSON.stringify(room)};
      document.querySelector('#room-form button').click(); true`);
    await waitPage(`[...document.querySelectorAll('#messages li')].some((li) => li.textContent === ${JSON.stringify(`joined room ${room}`)})`,
      `the page to join room ${room}`);

    // A Node socket.io-client whose cookie uid lands on the other backend joins the same room.
    const { socket, hello } = await env.connect(AGENT, { transports: ['websocket'], extraHeaders: { cookie: `uid=${nodeUid}` } });
    assert.deepEqual(hello, { port: nodePort, uid: nodeUid }, `node client (uid ${nodeUid}) should be on ${nodeAddr}`);
    const got = [];
    socket.on('chat', (msg) => got.push(msg));
    const join = await h.emitAck(socket, 'room', { room });
    assert.equal(join.ok, true, `node join: ${JSON.stringify(join)}`);

    // Node -> page (from backend nodePort to the page's socket on pagePort).
    const toPage = `hello page, from :${nodePort}`;
    const sent = await h.emitAck(socket, 'room', { room, event: 'chat', uid: nodeUid, port: nodePort, text: toPage });
    assert.equal(sent.ok, true, `node send: ${JSON.stringify(sent)}`);
    assert.equal(sent.recipients, 1, `the page is the one other member of ${room}: ${JSON.stringify(sent)}`);
    await waitPage(`[...document.querySelectorAll('#messages li')].some((li) =>
        li.querySelector('.meta') && li.querySelector('.meta').textContent === ${JSON.stringify(`[${room}] ${nodeUid} via :${nodePort}`)}
        && li.lastChild.textContent === ${JSON.stringify(toPage)})`, 'the node client\'s message on the page');

    // Page -> node (from backend pagePort to the node client on nodePort).
    const toNode = `hello node, from :${pagePort}`;
    const nodeGot = h.once(socket, 'chat', 5000, `the node client to receive the page's chat message in ${room}`);
    await cdp.evaluate(`document.getElementById('msg-input').value = ${JSON.stringify(toNode)};
      document.querySelector('#msg-form button').click(); true`);
    assert.deepEqual(await nodeGot, { room, event: 'chat', uid: pageUid, port: pagePort, text: toNode });
    assert.equal(got.length, 1, `exactly one chat message at the node client: ${JSON.stringify(got)}`);
    // The page shows its own message with the ack's recipient count.
    await waitPage(`[...document.querySelectorAll('#messages li.me')].some((li) =>
        li.querySelector('.meta').textContent === ${JSON.stringify(`[${room}] me \u2192 1 socket(s)`)}
        && li.lastChild.textContent === ${JSON.stringify(toNode)})`, 'the page\'s own message with its ack (1 socket)');
    s = await snapshot();
    assert.equal(s.rooms, room, `joined rooms shown: ${JSON.stringify(s)}`);
    assert.equal(s.state, 'connected');
    socket.close();
  });

  it('over https: the page connects; /whoami and a polling session go over HTTP/2, the WebSocket over HTTP/1.1', async () => {
    cdp.webSockets.length = 0;
    await cdp.send('Page.navigate', { url: `${AGENT_TLS}/` });
    await waitPage(`location.protocol === 'https:'
      && document.getElementById('state').textContent === 'connected'
      && /^[0-9]+$/.test(document.getElementById('port').textContent)
      && document.getElementById('seen-uid').textContent !== '–'`, 'the https page to connect and show a backend port');
    const s = await snapshot();
    assert.equal(s.seenUid, s.uid, `the backend saw the page's uid over wss: ${JSON.stringify(s)}`);
    assert.equal(s.port, String(h.portOf(await routeDemo(s.uid))), `uid ${s.uid}: page port vs gopush route`);
    // The WebSocket: answered with a 101, which only HTTP/1.1 has (no RFC 8441 in gopush).
    const ws = cdp.webSockets.find((w) => w.response && w.response.status === 101);
    assert.ok(ws, `a WebSocket handshake answered 101: ${JSON.stringify(cdp.webSockets.map((w) => w.response && w.response.status))}`);

    // The page's GET /whoami, and an Engine.IO polling session opened from the page (handshake,
    // then a poll with its sid), as the browser's resource timing saw them.
    await cdp.evaluate(`document.getElementById('whoami').textContent = '';
      document.getElementById('whoami-btn').click(); true`);
    await waitPage(`document.getElementById('whoami').textContent.startsWith('GET /whoami \u2192 200')`, 'the /whoami answer over https');
    const polled = await cdp.evaluate(`(async () => {
      const open = await (await fetch('/socket.io/?EIO=4&transport=polling&t=e2e1')).text();
      const sid = JSON.parse(open.slice(1)).sid;
      await fetch('/socket.io/?EIO=4&transport=polling&t=e2e2&sid=' + encodeURIComponent(sid), { method: 'POST', body: '40' });
      const connected = await (await fetch('/socket.io/?EIO=4&transport=polling&t=e2e3&sid=' + encodeURIComponent(sid))).text();
      return { open: open.slice(0, 1), connected };
    })()`, 10000);
    assert.equal(polled.open, '0', `Engine.IO open packet: ${JSON.stringify(polled)}`);
    assert.match(polled.connected, /(^|\x1e)40\{"sid":/, `the polling session reached its backend again (no "Session ID unknown"): ${JSON.stringify(polled)}`);
    const hops = await cdp.evaluate(`performance.getEntriesByType('resource')
      .filter((e) => /[/]whoami|transport=polling&t=e2e/.test(e.name))
      .map((e) => ({ name: e.name.replace(location.origin, ''), proto: e.nextHopProtocol }))`);
    // (Chromium may leave the POST out of resource timing; the two GETs and /whoami must be there.)
    for (const want of ['/whoami', 't=e2e1', 't=e2e3']) {
      assert.ok(hops.some((e) => e.name.includes(want)), `a resource entry for ${want}: ${JSON.stringify(hops)}`);
    }
    for (const e of hops) assert.equal(e.proto, 'h2', `${e.name} went over ${e.proto}: ${JSON.stringify(hops)}`);
  });

  it('no uncaught page exceptions; screenshot saved to target/demo-page.png', async () => {
    assert.deepEqual(cdp.exceptions, [], 'uncaught exceptions in the page');
    const png = await takeScreenshot();
    assert.ok(png.subarray(0, 8).equals(Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a])), 'PNG signature');
    const width = png.readUInt32BE(16);
    const height = png.readUInt32BE(20);
    assert.ok(width >= 600 && height >= 600, `screenshot size ${width}x${height}`);
    assert.ok(fs.statSync(SCREENSHOT).size > 10_000, `${SCREENSHOT} looks empty`);
  });
});
