#!/usr/bin/env node
'use strict';
// Turns the raw results of benches/run.sh (one JSON line per scenario x target x round) into
// BENCHMARKS.md (tables, machine, ratios gopush/nginx, method) and benchmarks.svg (a bar chart
// drawn here as plain SVG text: no plotting tool needed).
//
//   node report.js --results results.jsonl --out DIR --mode full|smoke --rounds N [--elapsed S]
//                  [--failed a,b] [--idle-note TEXT] [--config TEXT] [--gopush-version V] [--commit C]
//
// Rounds are combined by the median (errors are summed), so one disturbed round on a shared
// machine does not decide a number.

const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { spawnSync } = require('node:child_process');

function parseArgs(argv) {
  const out = {};
  for (let i = 0; i < argv.length; i += 2) {
    if (!argv[i].startsWith('--')) throw new Error(`unexpected ${argv[i]}`);
    out[argv[i].slice(2)] = argv[i + 1] === undefined ? '' : argv[i + 1];
  }
  return out;
}

const o = parseArgs(process.argv.slice(2));
const lines = fs.readFileSync(o.results, 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l));
const failed = (o.failed || '').split(',').filter(Boolean);
const TARGETS = ['direct', 'nginx', 'pingora', 'gopush'];
const PROXIES = ['nginx', 'pingora', 'gopush'];

// ---------------------------------------------------------------------------------------------
// aggregation

function median(xs) {
  const v = xs.filter((x) => typeof x === 'number' && Number.isFinite(x)).sort((a, b) => a - b);
  if (!v.length) return null;
  const m = v.length >> 1;
  return v.length % 2 ? v[m] : (v[m - 1] + v[m]) / 2;
}

/** scenario -> target -> {metric: median over rounds, errors: sum, rounds: n} */
function aggregate(scenario) {
  const out = {};
  for (const t of [...TARGETS, 'gopush-cluster']) {
    const rows = lines.filter((l) => l.scenario === scenario && l.target === t);
    if (!rows.length) continue;
    const agg = { rounds: rows.length, errors: rows.reduce((s, r) => s + (r.errors || 0), 0) };
    for (const k of Object.keys(rows[0])) {
      if (['scenario', 'target', 'round', 'errors'].includes(k) || typeof rows[0][k] !== 'number') continue;
      agg[k] = median(rows.map((r) => r[k]));
    }
    agg.samples = rows;
    out[t] = agg;
  }
  return out;
}

const R = {
  http: aggregate('http'),
  'http-static': aggregate('http-static'),
  polling: aggregate('polling'),
  websocket: aggregate('websocket'),
  storm: aggregate('storm'),
  https: aggregate('https'),
  handshake: aggregate('handshake'),
  wss: aggregate('wss'),
};
const idle = {};
for (const l of lines.filter((x) => x.scenario === 'idle')) idle[l.target] = l;
const idleWss = {};
for (const l of lines.filter((x) => x.scenario === 'idle-wss')) idleWss[l.target] = l;
const micro = lines.find((l) => l.scenario === 'micro');
const parity = lines.find((l) => l.scenario === 'parity');

// ---------------------------------------------------------------------------------------------
// formatting

function fmt(x, digits) {
  if (x === null || x === undefined || !Number.isFinite(x)) return '–';
  if (digits !== undefined) return x.toFixed(digits);
  const a = Math.abs(x);
  if (a >= 1000) return Math.round(x).toLocaleString('en-US');
  if (a >= 100) return x.toFixed(0);
  if (a >= 10) return x.toFixed(1);
  if (a >= 1) return x.toFixed(2);
  return x.toFixed(3);
}
const ratio = (g, n) => (g === null || n === null || g === undefined || n === undefined || !n ? null : g / n);
const fmtRatio = (r) => (r === null ? '–' : `${r.toFixed(2)}×`);
function fmtNs(ns) {
  if (ns === null || ns === undefined) return '–';
  return ns >= 1000 ? `${(ns / 1000).toFixed(2)} µs` : `${ns.toFixed(1)} ns`;
}
/** A markdown table; numbers columns are right-aligned unless `left` (all columns left). */
const table = (head, rows, left = false) => [
  `| ${head.join(' | ')} |`,
  `|${head.map((h, i) => (i === 0 || left ? '---' : '--:')).join('|')}|`,
  ...rows.map((r) => `| ${r.join(' | ')} |`),
].join('\n');
const get = (s, t, k) => (R[s] && R[s][t] ? R[s][t][k] : null);

// ---------------------------------------------------------------------------------------------
// machine

/** stdout + stderr of a short command (nginx -v and wrk -v print on stderr; wrk -v exits 1). */
function sh(cmd, args) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 5000 });
  return `${r.stdout || ''}${r.stderr || ''}`.trim();
}
const cpus = os.cpus();
const machine = {
  date: new Date().toISOString().replace(/\.\d+Z$/, 'Z'),
  nproc: sh('nproc', []) || String(cpus.length),
  cpu: cpus.length ? cpus[0].model.replace(/\s+/g, ' ') : 'unknown',
  kernel: `${os.type()} ${os.release()} ${os.arch()}`,
  mem: `${Math.round(os.totalmem() / 2 ** 30)} GiB`,
  nginx: (sh(process.env.NGINX_BIN || '/usr/sbin/nginx', ['-v']).match(/nginx\/\S+/) || ['nginx ?'])[0],
  node: `node ${process.version}`,
  redis: (sh(process.env.REDIS_SERVER_BIN || 'redis-server', ['--version']).match(/v=\S+/) || ['?'])[0].replace('v=', 'redis '),
  wrk: (sh('wrk', ['-v']).match(/wrk \S+/) || ['wrk ?'])[0],
};

// ---------------------------------------------------------------------------------------------
// markdown

const md = [];
const p = (s = '') => md.push(s);

p('# Benchmarks');
p();
p('<!-- Generated by benches/run.sh (benches/report.js). Edit those, not this file. -->');
p();
p('gopush against nginx doing the same job (`hash $cookie_uid consistent` over the same Socket.IO backends, ' +
  'WebSocket headers, same worker count), against **bare Pingora** (`examples/bare_pingora.rs`: the same ' +
  'cookie → Ketama routing on Pingora 0.9.1 and nothing else, which separates what Pingora costs from what ' +
  'gopush adds) and against a direct-to-backend baseline, on one machine over loopback. Reproduce with `bash benches/run.sh` (full run, under 10 minutes) or `bash benches/run.sh ' +
  '--smoke` (every scenario for a few seconds, as CI runs it).');
p();
if (o.mode !== 'full') {
  p(`> **${o.mode} run**: tiny counts and durations, meant to prove the harness works, not to be quoted. ` +
    'Run `bash benches/run.sh` on a quiet machine for real numbers.');
  p();
}
if (failed.length) {
  p(`> **Failed scenarios: ${failed.join(', ')}.** Their numbers below are incomplete or include errors.`);
  p();
}

p('## Machine');
p();
p(table(['', ''], [
  ['date (UTC)', machine.date],
  ['CPU', `${machine.cpu}, nproc ${machine.nproc}`],
  ['kernel', machine.kernel],
  ['memory', machine.mem],
  ['software', `${o['gopush-version'] || 'gopush'} (commit ${o.commit || '?'}), ${machine.nginx}, ${machine.node}, ${machine.redis}, ${machine.wrk}`],
  ['run', `${o.mode}, ${o.rounds} round(s) per scenario, ${o.elapsed || '?'} s; ${o.config || ''}`],
], true));
p();
p('Everything (load generator, proxies, Node backends, redis) shares these cores, so absolute numbers ' +
  'depend heavily on the machine; compare the **ratios** and the proxy CPU / memory columns, which are ' +
  'the proxy\'s own cost.');
p();

p('## Results');
p();
// Summary of ratios: one line per headline metric.
const sumRows = [];
const addSum = (label, better, n, g, b = null) => {
  if (n === null && g === null) return;
  sumRows.push([label, better, fmt(n), fmt(b), fmt(g), fmtRatio(ratio(g, n)), fmtRatio(ratio(g, b))]);
};
/** One summary line of scenario `s`, metric `k`, for nginx, gopush and bare Pingora. */
const sum = (label, better, s, k) => addSum(label, better, get(s, 'nginx', k), get(s, 'gopush', k), get(s, 'pingora', k));
sum('HTTP via Node: req/s', 'higher', 'http', 'rps');
sum('HTTP via Node: p99 ms', 'lower', 'http', 'p99_ms');
sum('HTTP via Node: proxy CPU s / 10k req', 'lower', 'http', 'cpu_per_10k');
sum('HTTP static: req/s', 'higher', 'http-static', 'rps');
sum('HTTP static: p99 ms', 'lower', 'http-static', 'p99_ms');
sum('HTTP static: proxy CPU s / 10k req', 'lower', 'http-static', 'cpu_per_10k');
sum('Socket.IO polling: acks/s', 'higher', 'polling', 'acks_per_s');
sum('Socket.IO polling: proxy CPU s / 10k acks', 'lower', 'polling', 'cpu_per_10k');
sum('Socket.IO websocket: acks/s', 'higher', 'websocket', 'acks_per_s');
sum('Socket.IO websocket: p99 RTT ms', 'lower', 'websocket', 'p99_ms');
sum('Socket.IO websocket: proxy CPU s / 10k acks', 'lower', 'websocket', 'cpu_per_10k');
const idleTiers = (t) => (idle[t] ? idle[t].tiers : []);
for (const tier of idleTiers('gopush')) {
  const n = idleTiers('nginx').find((x) => x.tier === tier.tier);
  const b = idleTiers('pingora').find((x) => x.tier === tier.tier);
  addSum(`idle WebSockets (${tier.tier.toLocaleString('en-US')}): proxy kB / connection`, 'lower',
    n ? n.per_conn_kb : null, tier.per_conn_kb, b ? b.per_conn_kb : null);
}
sum('connect storm: s to all connected', 'lower', 'storm', 'all_connected_s');
sum('HTTPS static (keep-alive): req/s', 'higher', 'https', 'rps');
sum('HTTPS static (keep-alive): proxy CPU s / 10k req', 'lower', 'https', 'cpu_per_10k');
sum('TLS handshakes / s (new connection per request)', 'higher', 'handshake', 'rps');
sum('TLS handshakes: proxy CPU s / 10k', 'lower', 'handshake', 'cpu_per_10k');
sum('Socket.IO over wss: acks/s', 'higher', 'wss', 'acks_per_s');
sum('Socket.IO over wss: proxy CPU s / 10k acks', 'lower', 'wss', 'cpu_per_10k');
for (const tier of (idleWss.gopush ? idleWss.gopush.tiers : [])) {
  const n = (idleWss.nginx ? idleWss.nginx.tiers : []).find((x) => x.tier === tier.tier);
  addSum(`idle wss (${tier.tier.toLocaleString('en-US')}): proxy kB / connection`, 'lower',
    n ? n.per_conn_kb : null, tier.per_conn_kb, null);
}
p('### gopush / nginx, and gopush / bare Pingora');
p();
p(table(['metric', 'better', 'nginx', 'bare Pingora', 'gopush', 'gopush / nginx', 'gopush / Pingora'], sumRows));
p();
if (parity) {
  p(`Placement check before measuring: ${parity.uids} uids through each of the ${parity.proxies || 'two'} proxies, ` +
    `${parity.mismatches ? `**${parity.mismatches} mismatches**` : 'every one on the same backend, the one the Ketama model predicts'}.`);
  p();
}

function errCell(a) {
  return a.errors ? `**${a.errors}**` : '0';
}
p('### HTTP keep-alive GET with a uid cookie (wrk)');
p();
const httpRows = [];
for (const [s, label] of [['http', 'Node `GET /whoami`'], ['http-static', 'nginx `return 200`']]) {
  for (const t of TARGETS) {
    const a = R[s][t];
    if (!a) continue;
    httpRows.push([label, t, fmt(a.rps), fmt(a.p50_ms), fmt(a.p99_ms), t === 'direct' ? 'n/a' : fmt(a.cpu_per_10k), errCell(a)]);
  }
  const r1 = ratio(get(s, 'gopush', 'rps'), get(s, 'nginx', 'rps'));
  if (r1 !== null) {
    httpRows.push([label, '*gopush / nginx*', fmtRatio(r1), fmtRatio(ratio(get(s, 'gopush', 'p50_ms'), get(s, 'nginx', 'p50_ms'))),
      fmtRatio(ratio(get(s, 'gopush', 'p99_ms'), get(s, 'nginx', 'p99_ms'))),
      fmtRatio(ratio(get(s, 'gopush', 'cpu_per_10k'), get(s, 'nginx', 'cpu_per_10k'))), '']);
  }
}
p(httpRows.length ? table(['backend', 'target', 'req/s', 'p50 ms', 'p99 ms', 'proxy CPU s / 10k req', 'errors'], httpRows) : '_not run_');
p();

p('### Socket.IO (socket.io-client 4, one uid cookie per client)');
p();
const sioRows = [];
for (const [s, label] of [['polling', 'polling: handshake + echoes'], ['websocket', 'websocket: echo loop']]) {
  for (const t of TARGETS) {
    const a = R[s][t];
    if (!a) continue;
    sioRows.push([label, t, fmt(a.acks_per_s), fmt(a.p50_ms), fmt(a.p99_ms), t === 'direct' ? 'n/a' : fmt(a.cpu_per_10k), errCell(a)]);
  }
  const r1 = ratio(get(s, 'gopush', 'acks_per_s'), get(s, 'nginx', 'acks_per_s'));
  if (r1 !== null) {
    sioRows.push([label, '*gopush / nginx*', fmtRatio(r1), fmtRatio(ratio(get(s, 'gopush', 'p50_ms'), get(s, 'nginx', 'p50_ms'))),
      fmtRatio(ratio(get(s, 'gopush', 'p99_ms'), get(s, 'nginx', 'p99_ms'))),
      fmtRatio(ratio(get(s, 'gopush', 'cpu_per_10k'), get(s, 'nginx', 'cpu_per_10k'))), '']);
  }
}
p(sioRows.length ? table(['scenario', 'target', 'acks/s', 'ack RTT p50 ms', 'ack RTT p99 ms', 'proxy CPU s / 10k acks', 'errors'], sioRows) : '_not run_');
p();

p('### Idle WebSockets: proxy memory per connection');
p();
const idleRows = [];
for (const t of PROXIES) {
  const r = idle[t];
  if (!r) continue;
  for (const x of r.tiers) {
    idleRows.push([x.tier.toLocaleString('en-US'), t, String(x.open), fmt(x.rss_before_mb), fmt(x.rss_after_mb),
      fmt(x.per_conn_kb), fmt(x.open_s), r.errors ? `**${r.errors}**` : '0']);
  }
}
p(idleRows.length ? table(['connections', 'proxy', 'open', 'RSS before MB', 'RSS after MB', 'kB / connection', 'open time s', 'errors'], idleRows) : '_not run_');
if (o['idle-note']) { p(); p(`Note: ${o['idle-note']}.`); }
p();

p('### Cluster features on vs off (`cluster:` on the same Redis: directory, presence, shared sid memory)');
p();
const clusterRows = [];
{
  const off = get('storm', 'gopush', 'all_connected_s');
  const on = get('storm', 'gopush-cluster', 'all_connected_s');
  if (off !== null || on !== null) {
    clusterRows.push([`connect storm (${fmt(get('storm', 'gopush', 'clients'))}): s to all connected`, fmt(off), fmt(on),
      fmtRatio(ratio(on, off)), '', '']);
  }
  for (const x of (idle['gopush-cluster'] ? idle['gopush-cluster'].tiers : [])) {
    const base = (idle.gopush ? idle.gopush.tiers : []).find((y) => y.tier === x.tier);
    clusterRows.push([`idle WebSockets (${x.tier.toLocaleString('en-US')}): proxy kB / connection`,
      fmt(base ? base.per_conn_kb : null), fmt(x.per_conn_kb),
      base && x.per_conn_kb !== null && base.per_conn_kb !== null ? `${(x.per_conn_kb - base.per_conn_kb).toFixed(2)} kB more` : '–',
      fmt(x.redis_bytes_per_conn), fmt(x.redis_cmds_per_conn)]);
  }
}
p(clusterRows.length ? table(['metric', 'gopush', 'gopush + cluster', 'on / off', 'Redis bytes / connection', 'Redis commands / connection'], clusterRows) : '_not run_');
p();
p('Redis bytes are `used_memory` after − before the tier, over the open connections; commands are every command Redis ran meanwhile ' +
  '(`INFO commandstats`, all clients: the directory\'s batched writes, heartbeats, and the Socket.IO adapter\'s own traffic), over the open connections.');
p();

p('### TLS (one ECDSA P-256 certificate; nginx `ssl http2`, gopush TLS listener with h2)');
p();
const tlsRows = [];
for (const [s, label, k, unit] of [['https', 'HTTPS keep-alive, static backend', 'rps', 'req/s'],
  ['handshake', 'new TLS connection per request', 'rps', 'handshakes/s'],
  ['wss', 'Socket.IO websocket echo over wss', 'acks_per_s', 'acks/s']]) {
  for (const t of ['nginx', 'gopush']) {
    const a = R[s][t];
    if (!a) continue;
    tlsRows.push([label, t, `${fmt(a[k])} ${unit}`, fmt(a.p50_ms), fmt(a.p99_ms), fmt(a.cpu_per_10k), errCell(a)]);
  }
  const r1 = ratio(get(s, 'gopush', k), get(s, 'nginx', k));
  if (r1 !== null) {
    tlsRows.push([label, '*gopush / nginx*', fmtRatio(r1), fmtRatio(ratio(get(s, 'gopush', 'p50_ms'), get(s, 'nginx', 'p50_ms'))),
      fmtRatio(ratio(get(s, 'gopush', 'p99_ms'), get(s, 'nginx', 'p99_ms'))),
      fmtRatio(ratio(get(s, 'gopush', 'cpu_per_10k'), get(s, 'nginx', 'cpu_per_10k'))), '']);
  }
}
for (const t of ['nginx', 'gopush']) {
  const r = idleWss[t];
  if (!r) continue;
  for (const x of r.tiers) {
    tlsRows.push([`idle wss (${x.tier.toLocaleString('en-US')})`, t, `${fmt(x.per_conn_kb)} kB / connection`,
      '', '', '', r.errors ? `**${r.errors}**` : '0']);
  }
}
p(tlsRows.length ? table(['scenario', 'target', 'rate', 'p50 ms', 'p99 ms', 'proxy CPU s / 10k', 'errors'], tlsRows) : '_not run_');
p();

p('### Connect storm: WebSocket clients connecting at once');
p();
const stormRows = [];
for (const t of TARGETS) {
  const a = R.storm[t];
  if (!a) continue;
  stormRows.push([t, fmt(a.clients), fmt(a.connected), fmt(a.all_connected_s), fmt(a.p50_ms), fmt(a.p99_ms),
    t === 'direct' ? 'n/a' : fmt(a.proxy_cpu_s), errCell(a)]);
}
p(stormRows.length ? table(['target', 'clients', 'connected', 'time to all connected s', 'connect p50 ms', 'connect p99 ms', 'proxy CPU s', 'failures'], stormRows) : '_not run_');
p();

p('### Micro-benchmarks (criterion): uid resolution + ring selection, and a JavaScript uid hook');
p();
if (micro && micro.benches && micro.benches.length) {
  p(table(['benchmark', 'mean', 'median', 'mean 95% CI'],
    micro.benches.map((b) => [`\`${b.bench}\``, fmtNs(b.mean_ns), fmtNs(b.median_ns), `${fmtNs(b.ci_low_ns)} – ${fmtNs(b.ci_high_ns)}`])));
} else {
  p('_not run_');
}
p();

p('## Chart');
p();
p('![gopush, nginx, bare Pingora and direct, per scenario](benchmarks.svg)');
p();

p(`## What is measured, and how

All processes listen on 127.0.0.1 with free ports: a fresh \`redis-server\`, two Node Socket.IO backends
(\`tests/e2e/lib/backend.js\`, \`@socket.io/redis-adapter\`), a static nginx answering \`return 200\` on two
ports, nginx as the proxy, bare Pingora and gopush. Each scenario runs its targets in rotating order
(direct, nginx, pingora, gopush; then nginx, pingora, gopush, direct; …) and a number above is the median over the rounds (errors are summed).

| scenario | load | reported |
|---|---|---|
| HTTP via Node | \`wrk -t1\` keep-alive GETs of \`/whoami\` with \`Cookie: uid=u123\`, after a warm-up | req/s, latency p50/p99, proxy CPU seconds per 10k requests |
| HTTP static | the same against \`/whoami?product=static\`, a pool of two nginx \`return 200\` backends, so the proxy rather than Node is the bottleneck | the same |
| Socket.IO polling | N clients, transport \`polling\` only, each: handshake, then E acked \`echo\` events in sequence; keep-alive like a browser | acks/s over the whole run (handshakes included), ack round trip p50/p99, errors |
| Socket.IO websocket | N clients, transport \`websocket\` only, each a closed loop of acked \`echo\` for S seconds | acks/s, ack round trip p50/p99, errors |
| idle WebSockets | 5,000 then 20,000 (where \`ulimit -n\` allows) Engine.IO WebSocket sessions through each proxy, answering pings | (proxy RSS after − before) / connections |
| connect storm | 2,000 WebSocket clients started in the same event-loop turn | time until the last one has its Socket.IO CONNECT acknowledged, connect p50/p99, failures |
| HTTPS static | the HTTP static load against each proxy's TLS listener (one ECDSA P-256 certificate, TLS 1.2/1.3, h2 offered; wrk speaks HTTP/1.1); nginx and gopush only (the bare Pingora example has no TLS listener) | req/s, latency, proxy CPU per 10k requests |
| TLS handshakes | the same with \`Connection: close\`: every request is a new connection and a full handshake (no session resumption) | handshakes/s = req/s, proxy CPU per 10k handshakes |
| Socket.IO over wss | the websocket scenario over \`wss://\` (the load generator trusts the test CA) | acks/s, ack round trip, proxy CPU |
| idle wss | the idle scenario over \`wss://\` (5,000) | (proxy RSS after − before) / connections |
| micro | criterion, in process: \`UidResolver::resolve\` on a request head and \`Router::route\` on the Ketama ring (\`benches/resolve_select.rs\`); the same uid from a JavaScript \`uid(req)\` hook, from the cookie source and from a JWT (\`benches/hook_cost.rs\`) | time per call |

- **Direct baseline.** HTTP goes straight to the backend that uid \`u123\` maps to (so every target
  loads the same single backend); Socket.IO clients compute their backend with the Ketama model and
  connect to it, so the Node backends see the same load as through a proxy. Idle memory has no direct
  row: there is no proxy.
- **Proxy CPU** is \`utime + stime\` of the proxy's processes from \`/proc/PID/stat\` read before and after
  the measured phase (nginx: master + both workers), divided by the work done. **Memory** is \`VmRSS\`
  from \`/proc/PID/status\` (nginx: summed over its processes).
- **Backends.** The Node backends listen with a backlog of 4096 (\`benches/backlog.js\`) instead of
  Node's 511, which a 2,000-client storm overflows: the kernel then drops SYNs and the storm measures
  the backends' accept queue and each proxy's connect-failure policy rather than the proxy (see below).
- **Socket.IO clients** carry their uid in the cookie (\`extraHeaders: {cookie: 'uid=…'}\`), so nginx's
  \`hash $cookie_uid consistent\` and gopush pick the same backend; a placement check through both
  proxies runs before anything is measured. The idle and storm scenarios use a minimal Engine.IO client
  on the \`ws\` package (the same protocol as socket.io-client, a fraction of its cost per connection),
  so the load generator, which shares the CPU, does not dominate.

### Fairness

| | nginx | gopush |
|---|---|---|
| workers | \`worker_processes 2\` (one event loop per process) | \`server.threads: 2\`, \`work_stealing: false\` (one event loop per thread; bare Pingora: the same) |
| placement | \`hash $cookie_uid consistent\` over the same \`IP:port\` list | Ketama ring (the same), \`uid.sources: [cookie uid]\` |
| WebSocket | \`proxy_http_version 1.1\`, \`Upgrade\` / \`Connection\` passed, \`proxy_read_timeout 3600s\` | Pingora's upgrade tunnel, idle timeout lifted after the 101 |
| upstream keep-alive | \`keepalive 128\`, \`keepalive_requests 1000000\` (client side too) | \`upstream_keepalive_pool_size: 128\` |
| headers to backend | \`X-Gopush-Uid\`, \`X-Real-IP\`, \`X-Forwarded-For\`, \`X-Forwarded-Proto\` | the same, plus the \`uid\` query parameter |
| logging | \`access_log off\` | \`access_log.enabled: false\`, \`RUST_LOG=warn\` |
| listen backlog | 4096 | Pingora's (65535, capped by \`net.core.somaxconn\`) |
| upstream connect | nginx defaults: \`proxy_connect_timeout 60s\`, \`max_fails=1 fail_timeout=10s\`, next upstream on error/timeout | \`upstream.connect_timeout: 1s\`, one retry on the next ring backend |

gopush additionally runs TCP health checks (1 s) and records Engine.IO \`sid → backend\` affinity for
polling handshakes; nginx does neither. Both are part of what gopush costs. Bare Pingora runs with
Pingora's defaults (same keep-alive pool size, 128) and none of gopush's work: no uid validation, no
header rewriting, no limits, health checks, affinity or metrics.

### Observed during development: storms against a full accept queue

With the backends at Node's default backlog (\`BENCH_BACKEND_BACKLOG=0 bash benches/run.sh --only storm
--rounds 1\`), the storm's SYNs overflow the backends' accept queues and connects to them time out:

- nginx with gopush's 1 s connect timeout copied in (\`proxy_connect_timeout 1s\`) answered about a
  quarter of the 2,000 clients with 502: after one timed-out connect its passive check (\`max_fails=1
  fail_timeout=10s\`) marks the backend down, soon both. With nginx's default 60 s it waits out the SYN
  retransmits and connects everyone, which is why the comparison keeps nginx's default.
- gopush (\`upstream.connect_timeout: 1s\`) retries a timed-out connect once on the next backend of the
  ring; when that one times out too the client gets 502, and its TCP health check (1 s timeout) also
  times out against the full queue and marks a live backend unhealthy (moving its uids), after which
  a retry can end in 503 \`no healthy backend in the pool\`. Two runs: 31 and 57 of 2,000 clients
  failed, while nginx with its defaults connected all 2,000 (more slowly). A connect timeout above the
  first SYN retransmit (1 s) or a health check needing consecutive failures would avoid it.

${(() => { try { return fs.readFileSync(path.join(__dirname, 'FINDINGS.md'), 'utf8').trim(); } catch { return ''; } })()}

## Reading the numbers on another machine

Absolute req/s and acks/s scale with the CPU and are capped by whatever saturates first on a small machine
(often the Node backend or the load generator, which share the cores). The ratios gopush / nginx, the proxy
CPU per 10k requests and the memory per idle connection are properties of the proxies and carry over
best. Run the harness on your machine and compare ratios, not raw values.

## Running

\`\`\`sh
bash benches/run.sh              # full: 3 rounds, writes docs/BENCHMARKS.md and docs/benchmarks.svg
bash benches/run.sh --smoke      # CI: every scenario, small counts; exits non-zero if one errors
bash benches/run.sh --only http-static,idle --rounds 1 --out /tmp/b   # a subset, elsewhere
cargo bench --bench resolve_select --bench hook_cost                  # the micro-benchmarks alone
\`\`\`

Needs \`wrk\`, \`nginx\` (nginx-light), \`redis-server\`, Node ≥ 20 with the e2e packages
(\`cd tests/e2e && npm ci\`) and cargo: a full run builds and measures the \`dist\` profile (fat LTO, what
production builds; gopush and bare Pingora alike), a smoke run the \`release\` build the tests use
(\`BENCH_PROFILE\` overrides).
Options: \`--rounds N\`, \`--out DIR\`, \`--only/--skip LIST\`, \`--keep\` (keep the work directory with
the generated nginx/gopush configs, every log and the raw \`results.jsonl\`).
`);

// ---------------------------------------------------------------------------------------------
// SVG: small multiples, one panel per metric, one bar per target

const COLORS = { direct: '#9e9e9e', nginx: '#2e7d32', pingora: '#1565c0', gopush: '#e8590c' };
const esc = (s) => String(s).replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
const panels = [];
const panel = (title, better, values) => {
  const v = values.filter(([, x]) => x !== null && x !== undefined && Number.isFinite(x));
  if (v.length) panels.push({ title, better, values: v });
};
const trio = (s, k, targets = TARGETS) => targets.map((t) => [t, get(s, t, k)]);
panel('HTTP via Node: req/s', 'higher is better', trio('http', 'rps'));
panel('HTTP via Node: p99 latency, ms', 'lower is better', trio('http', 'p99_ms'));
panel('HTTP via Node: proxy CPU s / 10k req', 'lower is better', trio('http', 'cpu_per_10k', PROXIES));
panel('HTTP static: req/s', 'higher is better', trio('http-static', 'rps'));
panel('HTTP static: p99 latency, ms', 'lower is better', trio('http-static', 'p99_ms'));
panel('HTTP static: proxy CPU s / 10k req', 'lower is better', trio('http-static', 'cpu_per_10k', PROXIES));
panel('Socket.IO polling: acks/s', 'higher is better', trio('polling', 'acks_per_s'));
panel('Socket.IO websocket: acks/s', 'higher is better', trio('websocket', 'acks_per_s'));
panel('Socket.IO websocket: ack p99, ms', 'lower is better', trio('websocket', 'p99_ms'));
const tiersAll = idleTiers('gopush').map((x) => x.tier);
for (const tier of [tiersAll[0], tiersAll[tiersAll.length - 1]].filter((x, i, a) => x !== undefined && a.indexOf(x) === i)) {
  panel(`Idle WebSockets (${tier.toLocaleString('en-US')}): kB / conn`, 'lower is better',
    PROXIES.map((t) => [t, (idleTiers(t).find((x) => x.tier === tier) || {}).per_conn_kb]));
}
panel(`Connect storm (${fmt(get('storm', 'gopush', 'clients'))}): s to all`, 'lower is better', trio('storm', 'all_connected_s'));

const COLS = 3;
const PW = 300;
const PH = 150;
const TOP = 64;
const W = COLS * PW + 20;
const H = TOP + Math.ceil(Math.max(panels.length, 1) / COLS) * PH + 30;
const svg = [];
svg.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="Helvetica, Arial, sans-serif">`);
svg.push(`<rect width="${W}" height="${H}" fill="#ffffff"/>`);
svg.push(`<text x="10" y="24" font-size="17" font-weight="bold">gopush vs nginx vs bare Pingora vs direct${o.mode !== 'full' ? ` (${esc(o.mode)} run, not for quoting)` : ''}</text>`);
svg.push(`<text x="10" y="44" font-size="11" fill="#555">${esc(`${machine.date} · ${machine.cpu} · nproc ${machine.nproc} · ${machine.kernel} · ${machine.nginx} · ${o['gopush-version'] || 'gopush'} (${o.commit || '?'})`)}</text>`);
let lx = W - 300;
for (const t of TARGETS) {
  svg.push(`<rect x="${lx}" y="14" width="12" height="12" fill="${COLORS[t]}"/><text x="${lx + 16}" y="24" font-size="12">${t}</text>`);
  lx += 72;
}
panels.forEach((pn, i) => {
  const x0 = 10 + (i % COLS) * PW;
  const y0 = TOP + Math.floor(i / COLS) * PH;
  svg.push(`<g transform="translate(${x0},${y0})">`);
  svg.push(`<rect x="0" y="0" width="${PW - 10}" height="${PH - 10}" fill="#fafafa" stroke="#ddd"/>`);
  svg.push(`<text x="8" y="17" font-size="12" font-weight="bold">${esc(pn.title)}</text>`);
  svg.push(`<text x="8" y="31" font-size="10" fill="#777">${esc(pn.better)}</text>`);
  const max = Math.max(...pn.values.map(([, v]) => v)) || 1;
  const barMax = PW - 10 - 60 - 70;
  pn.values.forEach(([t, v], k) => {
    const y = 40 + k * 24;
    const w = Math.max(1, (v / max) * barMax);
    svg.push(`<text x="54" y="${y + 13}" font-size="11" text-anchor="end">${t}</text>`);
    svg.push(`<rect x="60" y="${y}" width="${w.toFixed(1)}" height="18" fill="${COLORS[t]}"/>`);
    svg.push(`<text x="${(60 + w + 4).toFixed(1)}" y="${y + 13}" font-size="11">${esc(fmt(v))}</text>`);
  });
  svg.push('</g>');
});
if (!panels.length) svg.push(`<text x="10" y="${TOP + 20}" font-size="13">no results</text>`);
svg.push(`<text x="10" y="${H - 10}" font-size="10" fill="#777">generated by benches/run.sh · medians over ${esc(o.rounds)} round(s) · every process on the same machine over loopback</text>`);
svg.push('</svg>');

fs.mkdirSync(o.out, { recursive: true });
fs.writeFileSync(path.join(o.out, 'BENCHMARKS.md'), md.join('\n').replace(/\n{3,}/g, '\n\n'));
fs.writeFileSync(path.join(o.out, 'benchmarks.svg'), svg.join('\n') + '\n');
