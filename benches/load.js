#!/usr/bin/env node
'use strict';
// Load generator and probes for benches/run.sh (one mode per call, one JSON result per call).
//
//   node load.js ports N                  N free TCP ports on 127.0.0.1, one per line
//   node load.js parity  --urls U1,U2 --direct B1,B2 [--uids N] [--product P]
//   node load.js http      --url U [--pids P,..] --secs S --warm S --conns C [--uid U]
//   node load.js polling   --url U | --direct B1,B2  [--pids ..] --clients N --echoes E
//   node load.js websocket --url U | --direct B1,B2  [--pids ..] --clients N --secs S
//   node load.js idle      --url U --pids P,.. --tiers 5000,20000 [--redis-port R]
//   node load.js storm     --url U | --direct B1,B2  [--pids ..] --clients N
//
// Common: --record FILE --scenario NAME --target NAME --round R append the result as one JSON line
// to FILE (run.sh aggregates the lines); --timeout-ms T bounds the whole call. The exit code is
// non-zero when the scenario saw any error (run.sh turns that into a failed scenario), after the
// result has been recorded, so a failing run still shows its numbers.
//
// Targets: `--url` is a proxy (nginx or gopush) or a single backend. `--direct B1,B2` is the
// direct-to-backend baseline: each client computes, with the same Ketama model nginx uses, which
// of the backends its uid belongs to and connects there, so the baseline puts exactly the same
// load on each Node backend as the proxies do.
//
// `--pids` are the proxy's processes (nginx: master + workers; gopush: its one process): their
// CPU time (utime + stime from /proc/PID/stat) is read before and after the measured phase, and
// for `idle` their resident memory (VmRSS from /proc/PID/status).
//
// Every loop here is bounded by a count and by a deadline.

const { spawn, execFileSync } = require('node:child_process');
const fs = require('node:fs');
const http = require('node:http');
const net = require('node:net');
const path = require('node:path');

const ROOT = path.resolve(__dirname, '..');

function need(mod) {
  try {
    return require(mod);
  } catch (err) {
    console.error(`load.js: cannot load '${mod}' (${err.code || err.message}). The benchmarks reuse the e2e suite's ` +
      'packages: run `(cd tests/e2e && npm ci)` and start with NODE_PATH=tests/e2e/node_modules (run.sh does).');
    process.exit(2);
  }
}

// ---------------------------------------------------------------------------------------------
// arguments, time, statistics

function parseArgs(argv) {
  const out = { _: [] };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (!a.startsWith('--')) { out._.push(a); continue; }
    const v = argv[i + 1];
    if (v === undefined || v.startsWith('--')) throw new Error(`missing value for ${a}`);
    out[a.slice(2)] = v;
    i++;
  }
  return out;
}

const nowMs = () => Number(process.hrtime.bigint()) / 1e6;
const delay = (ms) => new Promise((r) => setTimeout(r, ms));
const list = (s) => (s ? String(s).split(',').map((x) => x.trim()).filter(Boolean) : []);
const num = (v, d) => (v === undefined ? d : Number(v));

function withTimeout(promise, ms, what) {
  let t;
  return Promise.race([
    promise,
    new Promise((_, reject) => { t = setTimeout(() => reject(new Error(`timeout after ${ms} ms: ${what}`)), ms); }),
  ]).finally(() => clearTimeout(t));
}

/** p-th percentile (0..100) of an unsorted array of numbers, nearest-rank; null if empty. */
function percentile(values, p) {
  if (!values.length) return null;
  const s = Float64Array.from(values).sort();
  const rank = Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1));
  return s[rank];
}

const round3 = (x) => (x === null || x === undefined || !Number.isFinite(x) ? null : Math.round(x * 1000) / 1000);

/** Runs `fn(i)` for i in [0, n) with at most `limit` in flight. */
async function forLimit(n, limit, fn) {
  let next = 0;
  const worker = async () => {
    while (next < n) {
      const i = next++;
      await fn(i);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, n) }, worker));
}

// ---------------------------------------------------------------------------------------------
// /proc: CPU and memory of the proxy processes

let clkTck = null;
function ticksPerSecond() {
  if (clkTck === null) {
    try { clkTck = Number(execFileSync('getconf', ['CLK_TCK']).toString().trim()) || 100; } catch (_) { clkTck = 100; }
  }
  return clkTck;
}

/** Sum of utime + stime (seconds) of `pids`; throws if one is gone (a crashed proxy is an error). */
function cpuSeconds(pids) {
  let ticks = 0;
  for (const pid of pids) {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    // Fields after the command name "(...)": state is field 3, utime 14, stime 15.
    const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    ticks += Number(rest[11]) + Number(rest[12]);
  }
  return ticks / ticksPerSecond();
}

/** Sum of VmRSS (bytes) of `pids`. */
function rssBytes(pids) {
  let kb = 0;
  for (const pid of pids) {
    const m = /^VmRSS:\s+(\d+) kB/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
    if (!m) throw new Error(`no VmRSS for pid ${pid}`);
    kb += Number(m[1]);
  }
  return kb * 1024;
}

/** The text of `INFO section` from the Redis on 127.0.0.1:port (raw RESP; bounded by `ms`). */
function redisInfo(port, section, ms = 3000) {
  return withTimeout(new Promise((resolve, reject) => {
    const sock = net.connect({ host: '127.0.0.1', port });
    let buf = Buffer.alloc(0);
    sock.on('error', reject);
    sock.on('connect', () => sock.write(`*2\r\n$4\r\nINFO\r\n$${section.length}\r\n${section}\r\n`));
    sock.on('data', (d) => {
      buf = Buffer.concat([buf, d]);
      const nl = buf.indexOf('\r\n');
      if (nl < 0) return;
      const head = buf.subarray(0, nl).toString();
      if (head[0] !== '$') { sock.destroy(); reject(new Error(`redis INFO: ${head}`)); return; }
      const len = Number(head.slice(1));
      if (buf.length >= nl + 2 + len) {
        sock.destroy();
        resolve(buf.subarray(nl + 2, nl + 2 + len).toString());
      }
    });
  }), ms, `redis INFO ${section}`);
}

/** Redis's used memory (bytes) and commands executed so far (all commands, every client). */
async function redisCost(port) {
  const mem = /^used_memory:(\d+)/m.exec(await redisInfo(port, 'memory'));
  const stats = await redisInfo(port, 'commandstats');
  let calls = 0;
  for (const m of stats.matchAll(/^cmdstat_[^:]+:calls=(\d+)/gm)) calls += Number(m[1]);
  return { mem: mem ? Number(mem[1]) : null, calls };
}

// ---------------------------------------------------------------------------------------------
// targets

/** uid -> base URL: the proxy, or (direct baseline) the backend the ring gives the uid. */
function targetFor(o) {
  if (o.url) return () => o.url.replace(/\/+$/, '');
  const backends = list(o.direct);
  if (!backends.length) throw new Error('--url or --direct is required');
  // The e2e suite's reference model of nginx's `hash ... consistent`; gopush uses the same ring.
  const ketama = require(path.join(ROOT, 'tests/e2e/lib/ketama.js'));
  const continuum = ketama.buildContinuum(backends);
  return (uid) => `http://${ketama.lookup(continuum, uid)}`;
}

// ---------------------------------------------------------------------------------------------
// a minimal Engine.IO v4 / Socket.IO v5 WebSocket client (idle and storm)
//
// socket.io-client costs ~tens of kB and noticeable CPU per connection in the load generator,
// which shares the two cores with the proxy. For the idle and storm scenarios (thousands of
// connections, no events) this client speaks the same protocol with the plain `ws` package:
// open (`0{..}`) -> CONNECT to `/` (`40`) -> connected (`40{"sid":..}`), and answers the
// server's pings (`2` -> `3`) so the backends keep the sessions.

function eioConnect(WebSocket, base, uid, timeoutMs, onDrop) {
  return new Promise((resolve, reject) => {
    const url = `${base.replace(/^http/, 'ws')}/socket.io/?EIO=4&transport=websocket`;
    const ws = new WebSocket(url, {
      headers: { cookie: `uid=${uid}` },
      perMessageDeflate: false,
      handshakeTimeout: timeoutMs,
    });
    let settled = false;
    const timer = setTimeout(() => fail(new Error('connect timeout')), timeoutMs);
    function fail(err) {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      try { ws.terminate(); } catch (_) { /* already closed */ }
      reject(err);
    }
    ws.on('message', (data) => {
      const s = data.toString();
      if (s === '2') { ws.send('3'); return; }
      if (settled) return;
      if (s[0] === '0') ws.send('40');
      else if (s.startsWith('40')) { settled = true; clearTimeout(timer); resolve(ws); }
      else if (s.startsWith('44')) fail(new Error(`socket.io connect error ${s.slice(0, 80)}`));
    });
    ws.on('unexpected-response', (_req, res) => fail(new Error(`HTTP ${res.statusCode} instead of 101`)));
    ws.on('error', (err) => fail(err));
    ws.on('close', (code) => {
      if (!settled) fail(new Error(`closed (${code}) before connected`));
      else if (onDrop && !ws.benchClosing) onDrop(code);
    });
  });
}

/** Closes `sockets` and waits (bounded) until they are all closed. */
async function closeAll(sockets, ms) {
  const closed = sockets.map((ws) => new Promise((r) => {
    if (ws.readyState === ws.CLOSED) return r();
    ws.once('close', r);
    ws.benchClosing = true;
    try { ws.close(); } catch (_) { r(); }
  }));
  try {
    await withTimeout(Promise.all(closed), ms, 'closing websockets');
  } catch (_) {
    for (const ws of sockets) try { ws.terminate(); } catch (_) { /* gone */ }
  }
}

// ---------------------------------------------------------------------------------------------
// modes

async function modePorts(o) {
  const n = Number(o._[1] || 1);
  if (!(n >= 1 && n <= 64)) throw new Error('ports N: 1..64');
  const servers = [];
  for (let i = 0; i < n; i++) {
    const s = net.createServer();
    await new Promise((res, rej) => { s.once('error', rej); s.listen(0, '127.0.0.1', res); });
    servers.push(s);
  }
  const ports = servers.map((s) => s.address().port);
  await Promise.all(servers.map((s) => new Promise((r) => s.close(r))));
  process.stdout.write(ports.join('\n') + '\n');
  return null;
}

function httpGetJson(url, headers, ms) {
  return new Promise((resolve, reject) => {
    const req = http.get(url, { headers, agent: false, timeout: ms }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c) => { body += c; });
      res.on('end', () => {
        if (res.statusCode !== 200) return reject(new Error(`${url}: HTTP ${res.statusCode} ${body.slice(0, 120)}`));
        try { resolve(JSON.parse(body)); } catch (err) { reject(new Error(`${url}: not JSON: ${body.slice(0, 120)}`)); }
      });
    });
    req.on('timeout', () => req.destroy(new Error(`${url}: timeout`)));
    req.on('error', reject);
  });
}

/**
 * Equivalence check before measuring: for N uids, GET /whoami through every proxy must land on
 * the backend the Ketama model predicts. If nginx and gopush disagreed, the comparison would not
 * be of equivalent setups.
 */
async function modeParity(o) {
  const urls = list(o.urls);
  const backends = list(o.direct);
  const ketama = require(path.join(ROOT, 'tests/e2e/lib/ketama.js'));
  const continuum = ketama.buildContinuum(backends);
  const n = num(o.uids, 40);
  const mismatches = [];
  for (let i = 0; i < n; i++) {
    const uid = `p${i}`;
    const want = Number(ketama.lookup(continuum, uid).split(':').pop());
    for (const u of urls) {
      const r = await httpGetJson(`${u}/whoami`, { cookie: `uid=${uid}` }, 3000);
      if (r.port !== want) mismatches.push(`${u} uid=${uid}: backend ${r.port}, ring says ${want}`);
    }
  }
  return { uids: n, proxies: urls.length, mismatches: mismatches.length, details: mismatches.slice(0, 5),
    errors: mismatches.length };
}

/** One wrk run; resolves with the JSON its `done` hook prints (benches/wrk-report.lua). */
function runWrk({ url, secs, conns, threads, uid, close }) {
  return new Promise((resolve, reject) => {
    // `close`: a new connection per request (over TLS, a full handshake per request).
    const args = ['-t', String(threads), '-c', String(conns), '-d', `${secs}s`, '--timeout', '5s',
      '-H', `Cookie: uid=${uid}`, ...(close ? ['-H', 'Connection: close'] : []),
      '-s', path.join(__dirname, 'wrk-report.lua'), url];
    const p = spawn(process.env.WRK_BIN || 'wrk', args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    p.stdout.on('data', (d) => { out += d; });
    p.stderr.on('data', (d) => { err += d; });
    const killer = setTimeout(() => p.kill('SIGKILL'), (secs + 20) * 1000);
    p.on('error', (e) => { clearTimeout(killer); reject(e); });
    p.on('close', (code) => {
      clearTimeout(killer);
      const m = /^WRK_JSON (\{.*\})$/m.exec(out);
      if (code !== 0 || !m) return reject(new Error(`wrk exited ${code}: ${(err || out).slice(-400)}`));
      resolve(JSON.parse(m[1]));
    });
  });
}

async function modeHttp(o) {
  const pids = list(o.pids);
  const spec = { url: o.url, secs: num(o.secs, 5), conns: num(o.conns, 50), threads: num(o.threads, 1),
    uid: o.uid || 'u123', close: o.close === '1' };
  // Warm-up (not recorded): fills the proxies' upstream keep-alive pools and the JITs.
  if (num(o.warm, 0) > 0) await runWrk({ ...spec, secs: num(o.warm, 0) });
  const c0 = pids.length ? cpuSeconds(pids) : null;
  const w = await runWrk(spec);
  const c1 = pids.length ? cpuSeconds(pids) : null;
  const seconds = w.duration_us / 1e6;
  // A run that completed no request measured nothing (wrk counts connect failures per socket,
  // so a target that accepts and never answers shows no error): that is an error, not 0 rps.
  const none = w.requests > 0 ? 0 : 1;
  const errors = w.err_connect + w.err_read + w.err_write + w.err_status + w.err_timeout + none;
  const cpu = c0 === null ? null : c1 - c0;
  return {
    requests: w.requests,
    seconds: round3(seconds),
    rps: Math.round(w.requests / seconds),
    p50_ms: round3(w.p50_us / 1000),
    p99_ms: round3(w.p99_us / 1000),
    proxy_cpu_s: round3(cpu),
    cpu_per_10k: cpu === null || !w.requests ? null : round3((cpu / w.requests) * 1e4),
    errors,
    error_detail: errors ? { connect: w.err_connect, read: w.err_read, write: w.err_write,
      status: w.err_status, timeout: w.err_timeout, ...(none ? { no_request_completed: true } : {}) } : undefined,
  };
}

/** Resolves when `socket` is connected, rejects on connect_error or after `ms`. */
function sioConnected(socket, ms) {
  return withTimeout(new Promise((resolve, reject) => {
    if (socket.connected) return resolve();
    socket.once('connect', resolve);
    socket.once('connect_error', (err) => reject(new Error(`connect_error: ${err.message}`)));
  }), ms, 'socket.io connect');
}

/**
 * Socket.IO long-polling: N clients (transport polling only) each do the handshake, then `echoes`
 * acked `echo` events one after the other. acks/s = all acks / wall time of the whole thing
 * (handshakes included), as a browser fleet on polling would see it.
 */
async function modePolling(o) {
  const { io } = need('socket.io-client');
  const pids = list(o.pids);
  const target = targetFor(o);
  const n = num(o.clients, 200);
  const echoes = num(o.echoes, 20);
  const deadline = num(o['timeout-ms'], 60000);
  const rtts = [];
  const errs = [];
  let acks = 0;
  const sockets = [];
  const c0 = pids.length ? cpuSeconds(pids) : null;
  const t0 = nowMs();
  const one = async (i) => {
    const uid = `u${i}`;
    // A browser keeps its polling connections alive; so does each simulated client.
    const agent = new http.Agent({ keepAlive: true, maxSockets: 2 });
    const socket = io(target(uid), {
      transports: ['polling'], extraHeaders: { cookie: `uid=${uid}` }, agent,
      forceNew: true, reconnection: false, timeout: 10000,
    });
    sockets.push({ socket, agent });
    await sioConnected(socket, 15000);
    for (let k = 0; k < echoes; k++) {
      const t = nowMs();
      const back = await socket.timeout(10000).emitWithAck('echo', { i, k });
      if (!back || back.i !== i || back.k !== k) throw new Error(`echo mismatch: ${JSON.stringify(back)}`);
      rtts.push(nowMs() - t);
      acks++;
    }
  };
  const all = Promise.all(Array.from({ length: n }, (_, i) => one(i).catch((err) => { errs.push(err.message); })));
  await withTimeout(all, deadline, 'polling clients').catch((err) => errs.push(err.message));
  const wall = (nowMs() - t0) / 1000;
  const c1 = pids.length ? cpuSeconds(pids) : null;
  for (const { socket, agent } of sockets) { socket.close(); agent.destroy(); }
  const cpu = c0 === null ? null : c1 - c0;
  return {
    clients: n, echoes, acks, expected: n * echoes, seconds: round3(wall),
    acks_per_s: Math.round(acks / wall),
    p50_ms: round3(percentile(rtts, 50)), p99_ms: round3(percentile(rtts, 99)),
    proxy_cpu_s: round3(cpu), cpu_per_10k: cpu === null || !acks ? null : round3((cpu / acks) * 1e4),
    errors: errs.length + (n * echoes - acks > 0 && !errs.length ? 1 : 0),
    error_sample: errs.slice(0, 3),
  };
}

/**
 * Socket.IO over WebSocket: N clients connect (transport websocket only), then each runs a closed
 * loop of acked `echo` events for `secs` seconds. acks/s and the round-trip percentiles cover
 * the echo phase only (connecting is measured by `storm`).
 */
async function modeWebsocket(o) {
  const { io } = need('socket.io-client');
  const pids = list(o.pids);
  const target = targetFor(o);
  const n = num(o.clients, 200);
  const secs = num(o.secs, 5);
  const maxPerClient = num(o['max-acks'], 200000);
  const errs = [];
  const rtts = [];
  let acks = 0;
  const sockets = Array.from({ length: n }, (_, i) => io(target(`u${i}`), {
    transports: ['websocket'], extraHeaders: { cookie: `uid=u${i}` },
    forceNew: true, reconnection: false, timeout: 10000,
  }));
  const connected = await Promise.allSettled(sockets.map((s) => sioConnected(s, 20000)));
  connected.forEach((r) => { if (r.status === 'rejected') errs.push(r.reason.message); });
  let drops = 0;
  sockets.forEach((s) => s.on('disconnect', (why) => { if (why !== 'io client disconnect') drops++; }));
  const c0 = pids.length ? cpuSeconds(pids) : null;
  const t0 = nowMs();
  const end = t0 + secs * 1000;
  const loop = async (s, i) => {
    if (!s.connected) return;
    for (let k = 0; k < maxPerClient && nowMs() < end; k++) {
      const t = nowMs();
      const back = await s.timeout(10000).emitWithAck('echo', k);
      if (back !== k) throw new Error(`echo mismatch on client ${i}: ${JSON.stringify(back)}`);
      rtts.push(nowMs() - t);
      acks++;
    }
  };
  await withTimeout(Promise.all(sockets.map((s, i) => loop(s, i).catch((err) => { errs.push(err.message); }))),
    secs * 1000 + 15000, 'websocket echo loops').catch((err) => errs.push(err.message));
  const wall = (nowMs() - t0) / 1000;
  const c1 = pids.length ? cpuSeconds(pids) : null;
  for (const s of sockets) s.close();
  const cpu = c0 === null ? null : c1 - c0;
  return {
    clients: n, acks, seconds: round3(wall), acks_per_s: Math.round(acks / wall),
    p50_ms: round3(percentile(rtts, 50)), p99_ms: round3(percentile(rtts, 99)),
    proxy_cpu_s: round3(cpu), cpu_per_10k: cpu === null || !acks ? null : round3((cpu / acks) * 1e4),
    errors: errs.length + drops, drops, error_sample: errs.slice(0, 3),
  };
}

/**
 * Idle WebSockets: opens connections tier by tier (e.g. 5,000 then 20,000 in total) through a
 * proxy and reads the proxy's RSS before and at each tier: (after - before) / n is the memory a
 * proxy spends per idle connection (client side + upstream side). Connections are held a moment
 * (`--hold-ms`) so lazily freed buffers settle; a proxy that drops an idle one is an error.
 */
async function modeIdle(o) {
  const WebSocket = need('ws');
  const pids = list(o.pids);
  if (!pids.length) throw new Error('idle: --pids of the proxy are required');
  const target = targetFor(o);
  const tiers = list(o.tiers).map(Number).sort((a, b) => a - b);
  const concurrency = num(o.concurrency, 200);
  const hold = num(o['hold-ms'], 1500);
  const deadline = nowMs() + num(o['timeout-ms'], 180000);
  const sockets = [];
  const errs = [];
  let drops = 0;
  // With --redis-port (gopush with `cluster:`): what the directory costs Redis per connection.
  const redisPort = o['redis-port'] ? Number(o['redis-port']) : null;
  const redis0 = redisPort ? await redisCost(redisPort) : null;
  const before = rssBytes(pids);
  const c0 = cpuSeconds(pids);
  const out = [];
  for (const tier of tiers) {
    const from = sockets.length;
    const t0 = nowMs();
    await forLimit(tier - from, concurrency, async (k) => {
      if (nowMs() > deadline || errs.length > 50) return;
      const uid = `i${from + k}`;
      try {
        sockets.push(await eioConnect(WebSocket, target(uid), uid, 15000, () => { drops++; }));
      } catch (err) {
        errs.push(err.message);
      }
    });
    const openS = (nowMs() - t0) / 1000;
    await delay(hold);
    const after = rssBytes(pids);
    const open = sockets.length;
    const row = { tier, open, open_s: round3(openS), rss_before_mb: round3(before / 1048576),
      rss_after_mb: round3(after / 1048576), per_conn_kb: open ? round3((after - before) / open / 1024) : null };
    if (redisPort && open) {
      const r = await redisCost(redisPort);
      row.redis_bytes_per_conn = Math.round((r.mem - redis0.mem) / open);
      row.redis_cmds_per_conn = round3((r.calls - redis0.calls) / open);
    }
    out.push(row);
    if (open < tier) break;
  }
  const cpu = cpuSeconds(pids) - c0;
  await closeAll(sockets, 15000);
  return { tiers: out, proxy_cpu_s: round3(cpu), errors: errs.length + drops, drops, error_sample: errs.slice(0, 3) };
}

/**
 * Connect storm: N WebSocket clients start connecting in the same event-loop turn. Reports the
 * time until the last one is connected (Socket.IO CONNECT acknowledged by the backend) and the
 * connect-time percentiles; a client that is not connected within `--client-timeout-ms` fails.
 */
async function modeStorm(o) {
  const WebSocket = need('ws');
  const pids = list(o.pids);
  const target = targetFor(o);
  const n = num(o.clients, 2000);
  const perClient = num(o['client-timeout-ms'], 30000);
  const times = [];
  const errs = [];
  const sockets = [];
  const c0 = pids.length ? cpuSeconds(pids) : null;
  const t0 = nowMs();
  await Promise.all(Array.from({ length: n }, async (_, i) => {
    const uid = `s${i}`;
    try {
      sockets.push(await eioConnect(WebSocket, target(uid), uid, perClient));
      times.push(nowMs() - t0);
    } catch (err) {
      errs.push(err.message);
    }
  }));
  const all = (nowMs() - t0) / 1000;
  const c1 = pids.length ? cpuSeconds(pids) : null;
  await closeAll(sockets, 15000);
  return {
    clients: n, connected: sockets.length, all_connected_s: round3(all),
    p50_ms: round3(percentile(times, 50)), p99_ms: round3(percentile(times, 99)),
    proxy_cpu_s: c0 === null ? null : round3(c1 - c0),
    errors: errs.length, error_sample: [...new Set(errs)].slice(0, 3),
  };
}

/** Criterion's estimates (CRITERION_HOME/**\/new/{benchmark,estimates}.json) -> result lines. */
function modeCriterion(o) {
  const home = o.dir;
  const found = [];
  const walk = (d, depth) => {
    if (depth > 6 || !fs.existsSync(d)) return;
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (!e.isDirectory()) continue;
      if (e.name === 'new' && fs.existsSync(path.join(p, 'estimates.json'))) found.push(p);
      else walk(p, depth + 1);
    }
  };
  walk(home, 0);
  const rows = found.map((p) => {
    const b = JSON.parse(fs.readFileSync(path.join(p, 'benchmark.json'), 'utf8'));
    const e = JSON.parse(fs.readFileSync(path.join(p, 'estimates.json'), 'utf8'));
    return { bench: b.full_id || b.title, mean_ns: round3(e.mean.point_estimate),
      median_ns: round3(e.median.point_estimate), ci_low_ns: round3(e.mean.confidence_interval.lower_bound),
      ci_high_ns: round3(e.mean.confidence_interval.upper_bound) };
  }).sort((a, b) => a.bench.localeCompare(b.bench));
  return { benches: rows, errors: rows.length ? 0 : 1, error_sample: rows.length ? [] : [`no estimates under ${home}`] };
}

// ---------------------------------------------------------------------------------------------

const MODES = { ports: modePorts, parity: modeParity, http: modeHttp, polling: modePolling,
  websocket: modeWebsocket, idle: modeIdle, storm: modeStorm, criterion: modeCriterion };

async function main() {
  const o = parseArgs(process.argv.slice(2));
  const mode = o._[0];
  if (!MODES[mode]) throw new Error(`usage: load.js ${Object.keys(MODES).join('|')} ...`);
  // Hard stop for the whole call, whatever happens inside (bounded by design, this is the belt).
  const hard = setTimeout(() => {
    console.error(`load.js ${mode}: hard timeout, exiting`);
    process.exit(3);
  }, num(o['timeout-ms'], 180000) + 30000);
  hard.unref();
  const result = await MODES[mode](o);
  if (result === null) return 0;
  const line = { scenario: o.scenario || mode, target: o.target || null, round: o.round ? Number(o.round) : null,
    ...result };
  if (o.record) fs.appendFileSync(o.record, JSON.stringify(line) + '\n');
  process.stdout.write(`RESULT ${JSON.stringify(line)}\n`);
  return result.errors ? 1 : 0;
}

main().then((code) => {
  // Open handles (agents, timers of socket.io-client) must not keep the process alive.
  process.exit(code);
}, (err) => {
  console.error(`load.js: ${err && err.stack ? err.stack : err}`);
  process.exit(2);
});
