'use strict';
// The admin page in headless Chromium, driven over the Chrome DevTools Protocol (the `ws`
// package): sign in with the token, the backend table renders real numbers (open tunnels of
// socket.io clients connected through the agent), the uid lookup answers, the drain button
// drains (checked through the API), and a screenshot is saved as target/admin-page.png. With a
// cluster section: who is online, and its disconnect button per connection.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const WebSocket = require('ws');
const h = require('../lib/harness');

const TOKEN = 'page-token';
const CHROMIUM = process.env.CHROMIUM_BIN || '/usr/bin/chromium';
const SHOT = path.resolve(__dirname, '../../../target/admin-page.png');
const CANDIDATES = Array.from({ length: 40 }, (_, i) => `page-user-${i}`);

/** A minimal CDP client over one page target. */
async function openChromium(env) {
  const port = await h.freePort();
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'gopush-chromium-'));
  const proc = new h.Proc('chromium', CHROMIUM, [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--no-first-run',
    '--disable-dev-shm-usage', `--user-data-dir=${profile}`, `--remote-debugging-port=${port}`,
    '--remote-debugging-address=127.0.0.1', '--window-size=1280,1060', 'about:blank',
  ]);
  env.procs.push(proc);
  const target = await h.poll(async () => {
    const list = await (await fetch(`http://127.0.0.1:${port}/json/list`, { signal: AbortSignal.timeout(1000) })).json();
    return list.find((t) => t.type === 'page');
  }, { attempts: 60, delayMs: 100, what: 'chromium DevTools endpoint' });
  const ws = new WebSocket(target.webSocketDebuggerUrl);
  await h.once(ws, 'open', 10000, 'CDP websocket');
  let id = 0;
  const pending = new Map();
  ws.on('message', (m) => {
    const msg = JSON.parse(m);
    const p = pending.get(msg.id);
    if (p) { pending.delete(msg.id); p(msg); }
  });
  const send = (method, params = {}) => h.withTimeout(new Promise((resolve) => {
    const i = ++id;
    pending.set(i, resolve);
    ws.send(JSON.stringify({ id: i, method, params }));
  }), 15000, `CDP ${method}`);
  const evaluate = async (expression) => {
    const r = await send('Runtime.evaluate', { expression, awaitPromise: true, returnByValue: true });
    if (r.error || r.result.exceptionDetails) {
      throw new Error(`evaluate failed: ${expression}: ${JSON.stringify(r.error || r.result.exceptionDetails)}`);
    }
    return r.result.result.value;
  };
  const waitFor = (expression, what) => h.poll(() => evaluate(expression), {
    attempts: 60, delayMs: 100, maxDelayMs: 300, what,
  });
  // Called after the environment killed chromium: the profile is no longer being written.
  const close = () => {
    ws.close();
    fs.rmSync(profile, { recursive: true, force: true, maxRetries: 5, retryDelay: 100 });
  };
  return { send, evaluate, waitFor, close };
}

describe('admin page in headless Chromium', { timeout: 120_000 }, () => {
  let env;
  let agent;
  let A;
  let B;
  let browser;

  before(async () => {
    env = new h.TestEnv('admin-page');
    await env.startRedis();
    A = await env.startBackend();
    B = await env.startBackend();
    const port = await h.freePort();
    const cfg = env.makeConfig({
      port,
      pools: { default: [A.addr, B.addr] },
      extra: {
        admin: { listen: `127.0.0.1:${await h.freePort()}`, token: TOKEN },
        push: { redis: env.redis.url },
      },
    });
    agent = await env.startAgent(cfg);
    browser = await openChromium(env);
  });

  after(async () => {
    if (env) await env.close();
    if (browser) browser.close();
  });

  it('signs in, shows live numbers, looks up a uid, pushes, and drains a backend', async () => {
    const picked = await h.pickUids(agent.configFile, [A.addr, B.addr], 3, CANDIDATES);
    const clients = [];
    const b = browser;
    await b.send('Page.navigate', { url: `${agent.adminUrl}/?poll=300` });
    // No token yet: the API answers 401 and the login box shows.
    await b.waitFor(`getComputedStyle(document.getElementById('login')).display === 'flex'`, 'the login box');
    await b.evaluate(`document.getElementById('token').value = ${JSON.stringify(TOKEN)};
      document.querySelector('#login button').click(); true`);
    const row = (addr) => `document.querySelector('#backends tr[data-backend="${addr}"]')`;
    await b.waitFor(`!!${row(A.addr)} && !!${row(B.addr)}`, 'both backend rows');
    // Clients arrive one by one, each seen by the page before the next (the chart gets steps).
    const arrivals = [...picked.get(A.addr), ...picked.get(B.addr).slice(0, 2)];
    for (const [i, uid] of arrivals.entries()) {
      clients.push(await env.connect(agent.url, { query: { uid }, transports: ['websocket'] }));
      const onA = Math.min(i + 1, 3);
      const onB = Math.max(0, i - 2);
      await b.waitFor(`${row(A.addr)}.querySelector('.tunnels').textContent === '${onA}'
        && ${row(B.addr)}.querySelector('.tunnels').textContent === '${onB}'`, `${i + 1} clients in the table`);
    }
    await b.waitFor(`${row(A.addr)}.querySelector('.tunnels').textContent === '3'
      && ${row(B.addr)}.querySelector('.tunnels').textContent === '2'`, 'open tunnels 3 and 2 in the table');
    assert.equal(await b.evaluate(`${row(A.addr)}.querySelector('.health').textContent`), 'healthy');
    assert.equal(await b.evaluate(`sessionStorage.getItem('gopush-admin-token')`), TOKEN);
    // The chart has one series per backend.
    await b.waitFor(`document.querySelectorAll('#chart polyline.series').length === 2`, 'two chart series');

    // Uid lookup.
    const uid = picked.get(A.addr)[0];
    await b.evaluate(`document.querySelector('#lookup [name=uid]').value = ${JSON.stringify(uid)};
      document.querySelector('#lookup button').click(); true`);
    await b.waitFor(`document.getElementById('lookup-out').textContent.includes(${JSON.stringify(`"backend": "${A.addr}"`)})`,
      'the lookup answer');

    // Push form: the user's socket receives the event.
    const got = h.once(clients[0].socket, 'message', 5000, 'the pushed message');
    await b.evaluate(`document.querySelector('#push [name=target]').value = ${JSON.stringify(uid)};
      document.querySelector('#push button.primary').click(); true`);
    assert.deepEqual(await got, { text: 'hello from gopush' });
    await b.waitFor(`document.getElementById('push-out').textContent.startsWith('HTTP 200')`, 'the push answer');

    // Drain button.
    await b.evaluate(`${row(A.addr)}.querySelector('button.drain').click(); true`);
    await b.waitFor(`${row(A.addr)}.querySelector('.state').textContent === 'draining'`, 'A shown draining');
    const st = await h.admin(agent, 'GET', '/api/status', { token: TOKEN });
    const a = st.json.pools[0].backends.find((x) => x.addr === A.addr);
    assert.equal(a.draining, true, 'the button drained A');
    assert.equal(a.open_tunnels, 3, 'open tunnels stay while draining');
    await b.waitFor(`${row(A.addr)}.querySelector('button.drain').textContent === 'Undrain'`, 'the undrain button');

    // Screenshot (CI artifact; docs/admin.png is a copy).
    await b.evaluate(`window.scrollTo(0, 0); true`);
    const shot = await b.send('Page.captureScreenshot', { format: 'png' });
    fs.mkdirSync(path.dirname(SHOT), { recursive: true });
    fs.writeFileSync(SHOT, Buffer.from(shot.result.data, 'base64'));
    assert.ok(fs.statSync(SHOT).size > 10_000, 'a real screenshot');

    await b.evaluate(`${row(A.addr)}.querySelector('button.drain').click(); true`);
    await b.waitFor(`${row(A.addr)}.querySelector('.state').textContent === 'serving'`, 'A serving again');
    for (const c of clients) c.socket.close();
  });

  it('shows who is online (cluster section) and finds a uid\'s connections', async () => {
    const port = await h.freePort();
    const cfg = env.makeConfig({
      port,
      pools: { default: [A.addr, B.addr] },
      sources: [{ query: 'uid' }],
      extra: {
        admin: { listen: `127.0.0.1:${await h.freePort()}`, token: TOKEN },
        cluster: { redis: env.redis.url, heartbeat: '300ms', ttl: '2s', timeout: '200ms' },
      },
    });
    const clustered = await env.startAgent(cfg);
    const b = browser;
    const { socket: ws } = await env.connect(clustered.url, { query: { uid: 'zoe' }, transports: ['websocket'] });
    const { socket: poll } = await env.connect(clustered.url, { query: { uid: 'zoe' }, transports: ['polling'] });
    const { socket: other } = await env.connect(clustered.url, { query: { uid: 'yan' }, transports: ['websocket'] });
    await b.send('Page.navigate', { url: `${clustered.adminUrl}/?poll=300` });
    // Same origin as before is not guaranteed (another port): sign in again if asked.
    await b.waitFor(`getComputedStyle(document.getElementById('login')).display === 'flex'
      || getComputedStyle(document.getElementById('online')).display === 'block'`, 'the page');
    await b.evaluate(`if (getComputedStyle(document.getElementById('login')).display === 'flex') {
      document.getElementById('token').value = ${JSON.stringify(TOKEN)};
      document.querySelector('#login button').click(); } true`);
    await b.waitFor(`getComputedStyle(document.getElementById('online')).display === 'block'`, 'the who-is-online panel');
    await b.waitFor(`document.querySelector('#online-users tr[data-uid="zoe"] td.num')?.textContent === '2'
      && document.querySelector('#online-users tr[data-uid="yan"] td.num')?.textContent === '1'`, 'zoe (2) and yan (1) listed');
    await b.waitFor(`document.getElementById('online-totals').textContent.includes('2 users, 3 connections on 1 agents')`, 'the totals');
    // Search.
    await b.evaluate(`document.querySelector('#who [name=uid]').value = 'zoe'; document.querySelector('#who button').click(); true`);
    await b.waitFor(`document.querySelectorAll('#who-conns tbody tr').length === 2`, "zoe's two connections");
    const transports = await b.evaluate(`[...document.querySelectorAll('#who-conns tbody tr')].map((r) => r.cells[0].textContent).sort().join(',')`);
    assert.equal(transports, 'polling,websocket');
    // A uid that is not online.
    await b.evaluate(`document.querySelector('#who [name=uid]').value = 'nobody'; document.querySelector('#who button').click(); true`);
    await b.waitFor(`document.querySelector('#who-out .who-status')?.textContent === 'nobody: offline'`, 'nobody offline');
    // Clicking a listed uid searches it; after its sockets close the list drops it.
    ws.close();
    poll.close();
    await b.waitFor(`!document.querySelector('#online-users tr[data-uid="zoe"]')`, 'zoe gone from the list');
    await b.evaluate(`document.querySelector('#online-users button.who[data-uid="yan"]').click(); true`);
    await b.waitFor(`document.querySelectorAll('#who-conns tbody tr').length === 1
      && document.querySelector('#who-out .who-status').textContent.startsWith('yan: online')`, "yan's connection via the list");
    other.close();
  });

  it('disconnects one connection with its button (WebSocket, then polling): a final disconnect', async () => {
    const port = await h.freePort();
    const cfg = env.makeConfig({
      port,
      pools: { default: [A.addr, B.addr] },
      sources: [{ query: 'uid' }],
      extra: {
        admin: { listen: `127.0.0.1:${await h.freePort()}`, token: TOKEN },
        cluster: { redis: env.redis.url, heartbeat: '300ms', ttl: '2s', timeout: '200ms' },
      },
    });
    const clustered = await env.startAgent(cfg);
    const b = browser;
    // Clients that would reconnect after anything but a server disconnect.
    const client = async (transports) => {
      const { socket } = await env.connect(clustered.url, {
        query: { uid: 'kim' }, transports, reconnection: true, reconnectionDelay: 100, reconnectionDelayMax: 100,
      });
      const seen = { disconnects: [], attempts: 0 };
      socket.on('disconnect', (reason) => seen.disconnects.push(reason));
      socket.io.on('reconnect_attempt', () => { seen.attempts += 1; });
      return { socket, seen };
    };
    const ws = await client(['websocket']);
    const poll = await client(['polling']);
    await b.send('Page.navigate', { url: `${clustered.adminUrl}/?poll=300` });
    await b.waitFor(`getComputedStyle(document.getElementById('login')).display === 'flex'
      || getComputedStyle(document.getElementById('online')).display === 'block'`, 'the page');
    await b.evaluate(`if (getComputedStyle(document.getElementById('login')).display === 'flex') {
      document.getElementById('token').value = ${JSON.stringify(TOKEN)};
      document.querySelector('#login button').click(); } true`);
    await b.waitFor(`getComputedStyle(document.getElementById('online')).display === 'block'`, 'the who-is-online panel');
    await b.evaluate(`document.querySelector('#who [name=uid]').value = 'kim'; document.querySelector('#who button').click(); true`);
    await b.waitFor(`document.querySelectorAll('#who-conns tbody tr').length === 2`, "kim's two connections");
    const rowOf = (transport) => `[...document.querySelectorAll('#who-conns tbody tr')].find((r) => r.cells[0].textContent === '${transport}')`;
    for (const [transport, c, left] of [['websocket', ws, 1], ['polling', poll, 0]]) {
      await b.evaluate(`${rowOf(transport)}.querySelector('button.kick').click(); true`);
      await h.poll(() => c.seen.disconnects.length > 0, { attempts: 50, delayMs: 100, what: `${transport}: a disconnect` });
      assert.deepEqual(c.seen.disconnects, ['io server disconnect'], transport);
      // The page looks again once the directory dropped it.
      await b.waitFor(`document.querySelectorAll('#who-conns tbody tr').length === ${left}
        && !${rowOf(transport)}`, `the ${transport} row gone`);
      const u = await h.admin(clustered, 'GET', '/api/users/kim', { token: TOKEN });
      assert.equal(u.json.connections.length, left, u.text);
      assert.equal(c.seen.attempts, 0, `${transport}: no reconnection attempt`);
      assert.equal(c.socket.connected, false);
    }
    const m = await h.admin(clustered, 'GET', '/metrics', { token: TOKEN });
    assert.match(m.text, /gopush_connections_closed_total\{reason="admin"\} 2\n/);
  });
});
