'use strict';
// Graceful binary upgrade under load (Pingora's mechanism: a new process started with -u takes
// the listening sockets from the old one, which gets SIGQUIT). While it happens: an HTTP request
// loop and 200 socket.io clients (100 long-polling, 100 websocket) run through the agent.
// Expected: 0 failed HTTP requests, 0 polling sessions lost (their long-polls finish on the old
// process within the grace period, the next ones reach the new process), and every websocket
// client reconnected through the new process to the *same* backend. Once the old process stops
// accepting, it closes its WebSocket tunnels one by one over the first half of its grace period
// (at each tunnel's next Engine.IO ping, with a close frame 1001): the disconnects must be spread
// out, not all at one instant, and the reconnect spike (the most reconnects in any 250 ms) is
// reported.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const http = require('node:http');
const h = require('../lib/harness');

const POLLING = 100;
const WEBSOCKET = 100;
const RAW = 10; // bare Engine.IO WebSocket clients: they see the close frame's status code

describe('graceful binary upgrade under load', { timeout: 150_000 }, () => {
  let env;
  let agent;
  const sockets = [];

  before(async () => {
    env = new h.TestEnv('upgrade');
    await env.startRedis();
    // A short ping interval bounds how long a long-poll is held, so they all finish inside the
    // old process's grace period.
    const A = await env.startBackend({ pingInterval: 2000, pingTimeout: 5000 });
    const B = await env.startBackend({ pingInterval: 2000, pingTimeout: 5000 });
    const cfg = env.makeConfig({ port: await h.freePort(), pools: { default: [A.addr, B.addr] } });
    cfg.server.grace_period_seconds = 6;
    cfg.server.graceful_shutdown_timeout_seconds = 1;
    agent = await env.startAgent(cfg);
  });

  after(async () => {
    for (const s of sockets) s.close();
    if (env) await env.close();
  });

  it('loses no request and no polling session; websockets come back to the same backend', async () => {
    // --- clients
    const clients = [];
    const open = async (i, transports) => {
      const uid = `up-${i}`;
      const { socket, hello } = await h.connect(agent.url, {
        transports, extraHeaders: { cookie: `uid=${uid}` }, reconnection: true,
        reconnectionDelay: 100, reconnectionDelayMax: 1000,
      }, { timeoutMs: 10000 });
      sockets.push(socket);
      const c = { uid, transports, socket, port: hello.port, sid: socket.io.engine.id, disconnects: 0, hellos: [] };
      socket.on('disconnect', () => { c.disconnects += 1; c.downAt = Date.now(); });
      socket.on('hello', (again) => { c.hellos.push(again.port); c.backAt = Date.now(); });
      clients.push(c);
    };
    await h.mapLimit(Array.from({ length: POLLING }, (_, i) => i), 20, (i) => open(i, ['polling']));
    // Opened over one ping interval (2 s), as real clients arrive at unrelated times: their
    // Engine.IO pings, the moments a tunnel can be closed cleanly, are then spread too. (Pacing
    // the load, not waiting for anything.)
    await h.mapLimit(Array.from({ length: WEBSOCKET }, (_, i) => POLLING + i), 5, async (i) => {
      await h.delay(100);
      await open(i, ['websocket']);
    });
    const raws = await h.mapLimit(Array.from({ length: RAW }, (_, i) => i), 10, (i) => h.rawEngineIo(agent.url, `raw-${i}`));

    // --- HTTP loop: keep-alive connections, as a browser or an outer proxy would use them
    const keepAlive = new http.Agent({ keepAlive: true, maxSockets: 4 });
    let stop = false;
    const stats = { ok: 0, failed: 0, errors: [], droppedUnread: [] };
    // A GET that tells whether it failed on a brand-new connection before any response byte:
    // Pingora 0.9.1 drops connections it accepted but had not read yet when the old process
    // broadcasts its shutdown (a race no ProxyHttp hook reaches; see docs/RELIABILITY.md).
    const get = (n, i) => new Promise((resolve) => {
      const req = http.get(`${agent.url}/whoami`, { agent: keepAlive, headers: { cookie: `uid=loop-${n}-${i % 50}` } }, (res) => {
        res.resume();
        res.on('end', () => resolve({ status: res.statusCode }));
        res.on('error', (err) => resolve({ err }));
      });
      req.setTimeout(5000, () => req.destroy(new Error('timeout')));
      req.on('error', (err) => resolve({ err, fresh: !req.reusedSocket }));
    });
    const loop = async (n) => {
      for (let i = 0; !stop && i < 100000; i++) {
        const r = await get(n, i);
        if (r.status === 200) stats.ok += 1;
        else if (r.err && r.fresh && /socket hang up|ECONNRESET/.test(r.err.message)) stats.droppedUnread.push({ at: Date.now(), message: r.err.message });
        else { stats.failed += 1; stats.errors.push(r.err ? r.err.message : `HTTP ${r.status}`); }
      }
    };
    const loops = [0, 1, 2, 3].map(loop);
    await h.poll(async () => stats.ok > 200, { attempts: 100, delayMs: 50, what: 'the request loop to run' });

    // --- the upgrade: new process first (it waits on upgrade_sock), then SIGQUIT to the old one
    const sock = agent.cfg.server.upgrade_sock;
    const next = new h.Proc('gopush:new', h.GOPUSH_BIN, ['run', '-u', '-c', agent.configFile],
      { env: { RUST_LOG: 'info' } });
    env.procs.push(next);
    await h.poll(async () => fs.existsSync(sock) || next.exited,
      { attempts: 100, delayMs: 20, maxDelayMs: 100, what: 'the new process to wait on upgrade_sock' });
    assert.equal(next.exited, null, `new process exited: ${next.tail()}`);
    const okBefore = stats.ok;
    // The old process logs (Pingora) "Broadcasting graceful shutdown" when, after handing its
    // listening sockets over and accepting for 5 more seconds, it tells its services to stop:
    // the one instant the accept/shutdown race can drop a fresh connection.
    const broadcast = agent.proc.waitForOutput(/Broadcasting graceful shutdown/, 30000, 'the old process to broadcast its shutdown')
      .then(() => Date.now());
    process.kill(agent.proc.pid, 'SIGQUIT');
    const quitAt = Date.now();
    const oldExit = await h.withTimeout(agent.proc.exitPromise, 30000, 'the old process to exit');
    const oldGoneAt = Date.now();
    assert.equal(oldExit.code, 0, `old process exit ${JSON.stringify(oldExit)}: ${agent.proc.tail()}`);
    const broadcastAt = await broadcast;

    // --- after: every websocket client is back, on its backend; polling sessions never dropped
    const ws = clients.filter((c) => c.transports[0] === 'websocket');
    await h.poll(async () => ws.every((c) => c.socket.connected && c.hellos.length >= 1),
      { attempts: 100, delayMs: 100, maxDelayMs: 200, what: 'every websocket client to reconnect through the new process' });
    const okAtNew = stats.ok;
    await h.poll(async () => stats.ok > okAtNew + 200, { attempts: 100, delayMs: 50, what: 'requests served by the new process' });
    stop = true;
    await Promise.all(loops);
    keepAlive.destroy();

    assert.deepEqual(stats.errors.slice(0, 5), [], `${stats.failed} of ${stats.ok + stats.failed} HTTP requests failed`);
    assert.ok(stats.droppedUnread.length <= 4, // at most one per keep-alive socket slot (maxSockets 4)
      `${stats.droppedUnread.length} fresh connections dropped unread`);
    // ... and only at the shutdown broadcast (this loop sees both a little late, under load:
    // 1 s either side), not in any other phase: a reset at any other time is a failure.
    for (const d of stats.droppedUnread) {
      assert.ok(Math.abs(d.at - broadcastAt) <= 1000,
        `a fresh connection dropped unread ${((d.at - quitAt) / 1000).toFixed(2)} s after SIGQUIT, not at the shutdown broadcast `
        + `(${((broadcastAt - quitAt) / 1000).toFixed(2)} s): ${d.message}`);
    }
    assert.ok(stats.ok > okBefore, 'requests served during and after the upgrade');
    for (const c of ws) {
      assert.ok(c.hellos.every((p) => p === c.port), `${c.uid} came back on ${c.hellos} instead of ${c.port}`);
    }
    const polling = clients.filter((c) => c.transports[0] === 'polling');
    for (const c of polling) {
      assert.equal(c.disconnects, 0, `polling session of ${c.uid} was dropped`);
      assert.equal(c.socket.io.engine.id, c.sid, `polling session of ${c.uid} was re-created`);
      const echoed = await h.emitAck(c.socket, 'echo', c.uid, 5000);
      assert.equal(echoed, c.uid);
    }
    // Tunnels were closed cleanly (1001 going away), before the old process exited, and spread
    // out rather than all at one instant.
    for (const r of raws) {
      assert.equal(r.closeCode, 1001, `${r.uid}: closed with ${r.closeCode}, not 1001 (going away)`);
      assert.ok(r.closedAt <= oldGoneAt, `${r.uid} closed only when the old process exited`);
    }
    const down = ws.map((c) => c.downAt).filter(Boolean).sort((a, b) => a - b);
    assert.equal(down.length, ws.length, 'every websocket client was moved');
    // The close window: none before the old process stopped accepting (its shutdown broadcast;
    // 1 s for this loop seeing the log line late), none after it exited.
    assert.ok(down[0] >= broadcastAt - 1000,
      `a websocket was closed ${((broadcastAt - down[0]) / 1000).toFixed(2)} s before the old process stopped accepting`);
    assert.ok(down[down.length - 1] <= oldGoneAt + 1000, 'a websocket was closed only after the old process exited');
    const backs = ws.map((c) => c.backAt).sort((a, b) => a - b);
    let spike = 0;
    for (let i = 0, j = 0; i < backs.length; i++) {
      while (backs[i] - backs[j] > 250) j++;
      spike = Math.max(spike, i - j + 1);
    }
    // The reconnect spike, as a sound bound rather than the measured value (14 and 19 of 100 in
    // two runs): at most 40 of 100 back in any 250 ms. All cut at one instant (no spreading),
    // they came back within ~0.45 s, so some 250 ms held at least half of them.
    assert.ok(spike <= 40, `reconnect spike: ${spike} of ${ws.length} back within 250 ms (bound 40)`);
    const spread = down[down.length - 1] - down[0];
    assert.ok(spread >= 1000, `websockets cut within ${spread} ms of each other: not spread out`);
    const sinceQuit = (t) => ((t - quitAt) / 1000).toFixed(1);
    if (process.env.GOPUSH_DEBUG_SPREAD) process.stdout.write(`# downs: ${down.map(sinceQuit).join(" ")}\n# backs: ${backs.map(sinceQuit).join(" ")}\n`);
    process.stdout.write(`# upgrade: ${stats.ok} HTTP requests, ${stats.failed} failed, ${stats.droppedUnread.length} fresh connections dropped unread `
      + `(shutdown broadcast ${sinceQuit(broadcastAt)} s after SIGQUIT); `
      + `${ws.length} websockets closed between ${sinceQuit(down[0])} s and ${sinceQuit(down[down.length - 1])} s after SIGQUIT `
      + `(old process exited at ${sinceQuit(oldGoneAt)} s); reconnect spike: at most ${spike} of ${ws.length} back within 250 ms; `
      + `${raws.length} raw Engine.IO clients got close code 1001\n`);
    for (const r of raws) r.ws.terminate();
  });
});
