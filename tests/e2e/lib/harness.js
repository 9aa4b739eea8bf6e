'use strict';
// Test harness for the gopush end-to-end suite.
//
// Everything here is bounded: each wait has a deadline and fails with a message that says what
// was awaited and shows the tail of the relevant process output. Child processes are started in
// their own process group (detached) and killed as a group; a process-exit hook kills whatever a
// test forgot, so no redis/backend/agent/nginx outlives the test file.

const { spawn, execFile } = require('node:child_process');
const fs = require('node:fs');
const http = require('node:http');
const fsp = require('node:fs/promises');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const { io: ioClient } = require('socket.io-client');
const WebSocket = require('ws');

const E2E_DIR = path.resolve(__dirname, '..');
const BACKEND_JS = path.join(__dirname, 'backend.js');
const GOPUSH_BIN = process.env.GOPUSH_BIN
  ? path.resolve(process.env.GOPUSH_BIN)
  : path.resolve(E2E_DIR, '../../target/release/gopush');
const REDIS_BIN = process.env.REDIS_SERVER_BIN || 'redis-server';
const REDIS_CLI_BIN = process.env.REDIS_CLI_BIN || 'redis-cli';
const NGINX_BIN = process.env.NGINX_BIN || '/usr/sbin/nginx';
const KEEP_TMP = !!process.env.GOPUSH_E2E_KEEP;

// ---------------------------------------------------------------------------------------------
// small utilities

const delay = (ms) => new Promise((r) => setTimeout(r, ms));

/** Rejects with `Error(message)` if `promise` does not settle within `ms`. */
function withTimeout(promise, ms, message) {
  let timer;
  const t = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timeout after ${ms} ms: ${typeof message === 'function' ? message() : message}`)), ms);
  });
  return Promise.race([promise, t]).finally(() => clearTimeout(timer));
}

/**
 * Calls `fn(attempt)` until it returns a value other than undefined/false or `attempts` run out.
 * Throws from `fn` count as "not yet"; the last one is reported. Back-off grows from `delayMs`
 * to `maxDelayMs`.
 */
async function poll(fn, { attempts = 50, delayMs = 50, maxDelayMs = 500, what = 'condition' } = {}) {
  let lastErr = null;
  let lastVal;
  let d = delayMs;
  for (let i = 0; i < attempts; i++) {
    try {
      lastVal = await fn(i);
      if (lastVal !== undefined && lastVal !== false) return lastVal;
    } catch (err) {
      if (err && err.fatal) throw err;
      lastErr = err;
    }
    if (i + 1 < attempts) {
      await delay(d);
      d = Math.min(maxDelayMs, Math.ceil(d * 1.5));
    }
  }
  const why = lastErr ? `last error: ${lastErr.message}` : `last value: ${JSON.stringify(lastVal)}`;
  throw new Error(`gave up waiting for ${what} after ${attempts} attempts (${why})`);
}

/**
 * Calls `fn` every `stepMs` until it returns a truthy value or `ms` pass (a time bound, where
 * `poll` bounds attempts); throws from `fn` count as "not yet" unless marked `fatal`. The error
 * names `what` and the last value or error.
 */
async function until(fn, ms, what, stepMs = 100) {
  const deadline = Date.now() + ms;
  let last;
  let lastErr;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (err) {
      if (err && err.fatal) throw err;
      lastErr = err;
    }
    if (Date.now() > deadline) {
      throw new Error(`not within ${ms} ms: ${what} (last: ${lastErr ? lastErr.message : JSON.stringify(last)})`);
    }
    await delay(stepMs);
  }
}

/** GET `path` on `agent`'s admin API; asserts a 200 and answers the JSON body. */
async function adminJson(agent, path) {
  const r = await admin(agent, 'GET', path);
  if (r.status !== 200) throw new Error(`${path}: ${r.status} ${r.text}`);
  return r.json;
}

/**
 * What a redis-server on `port` reports, read with redis-cli: commands run per command name,
 * memory used, bytes received; `delta` subtracts two `commands()` readings.
 */
function redisStats(port) {
  const { execFileSync } = require('node:child_process');
  const cli = (...args) => execFileSync(process.env.REDIS_CLI_BIN || 'redis-cli', ['-p', String(port), ...args], { encoding: 'utf8' });
  return {
    cli,
    commands() {
      const out = {};
      for (const m of cli('INFO', 'commandstats').matchAll(/^cmdstat_(\w+):calls=(\d+)/gm)) out[m[1]] = Number(m[2]);
      return out;
    },
    usedMemory: () => Number(cli('INFO', 'memory').match(/^used_memory:(\d+)/m)[1]),
    netIn: () => Number(cli('INFO', 'stats').match(/^total_net_input_bytes:(\d+)/m)[1]),
    delta: (before, now) => Object.fromEntries(Object.entries(now)
      .map(([k, v]) => [k, v - (before[k] || 0)]).filter(([, v]) => v > 0)),
  };
}

/** Waits for one `event` on an EventEmitter-like object (bounded). */
function once(emitter, event, ms, what) {
  return withTimeout(new Promise((resolve) => emitter.once(event, (...args) => resolve(args.length > 1 ? args : args[0]))),
    ms, what || `event '${event}'`);
}

/** Runs `fn` over `items` with at most `limit` in flight; results keep the input order. */
async function mapLimit(items, limit, fn) {
  const out = new Array(items.length);
  let next = 0;
  const workers = Array.from({ length: Math.min(limit, items.length) }, async () => {
    while (next < items.length) {
      const i = next++;
      out[i] = await fn(items[i], i);
    }
  });
  await Promise.all(workers);
  return out;
}

/** Deterministic PRNG (mulberry32) so generated uid sets are reproducible. */
function prng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

// ---------------------------------------------------------------------------------------------
// ports

/**
 * Ports for servers are picked below the kernel's ephemeral range: a port the kernel hands out
 * with listen(0) comes from that range, where the outgoing connections of a test running in
 * parallel (10,000 idle clients in faults.test.js) can take it between the check and the server's
 * bind. Random within the window, each one checked free by binding it.
 */
const SERVER_PORTS = (() => {
  let low = 32768;
  try {
    low = Number(fs.readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/)[0]) || low;
  } catch { /* not Linux: keep the usual default */ }
  const hi = low - 1;
  const lo = Math.max(1024, hi - 12000);
  return hi - lo >= 1000 ? { lo, hi } : null; // too narrow: fall back to listen(0)
})();

function bindOnce(port) {
  return new Promise((resolve) => {
    const srv = net.createServer();
    srv.once('error', () => resolve(null));
    srv.listen(port, '127.0.0.1', () => resolve(srv));
  });
}

/**
 * Ports handed out during this run are never handed out again, so that a server stopped and
 * restarted on its own port (an agent SIGKILLed and started again with the same configuration)
 * cannot find it taken in between by a server of another test file running in parallel. The
 * files run as sibling processes of one `node --test`, so they share its parent's pid: a
 * reservation is a file created exclusively in a directory named after it (removed by
 * lib/count-reporter.mjs, which runs in that parent, when the run ends).
 */
const PORTS_DIR = path.join(os.tmpdir(), `gopush-e2e-ports-${process.ppid}`);

function reserve(port) {
  try {
    fs.mkdirSync(PORTS_DIR, { recursive: true });
    fs.closeSync(fs.openSync(path.join(PORTS_DIR, String(port)), 'wx'));
    return true;
  } catch (e) {
    if (e.code === 'EEXIST') return false;
    throw e;
  }
}

/** `n` distinct free TCP ports on 127.0.0.1 (all held open until every one is picked). */
async function freePorts(n) {
  const servers = [];
  try {
    for (let tries = 0; servers.length < n && tries < 1000; tries++) {
      const port = SERVER_PORTS
        ? SERVER_PORTS.lo + Math.floor(Math.random() * (SERVER_PORTS.hi - SERVER_PORTS.lo + 1))
        : 0;
      const srv = await bindOnce(port);
      if (!srv) continue;
      if (reserve(srv.address().port)) servers.push(srv);
      else srv.close();
    }
    if (servers.length < n) throw new Error(`could not find ${n} free ports`);
    return servers.map((s) => s.address().port);
  } finally {
    await Promise.all(servers.map((s) => new Promise((r) => s.close(r))));
  }
}

async function freePort() {
  return (await freePorts(1))[0];
}

/** Resolves true if a TCP connection to host:port is accepted within `ms`. */
function tcpProbe(port, host = '127.0.0.1', ms = 500) {
  return new Promise((resolve) => {
    const sock = net.connect({ port, host });
    const done = (ok) => { sock.destroy(); resolve(ok); };
    sock.setTimeout(ms, () => done(false));
    sock.once('connect', () => done(true));
    sock.once('error', () => done(false));
  });
}

// ---------------------------------------------------------------------------------------------
// processes

const live = new Set();

function killGroup(child, signal = 'SIGKILL') {
  if (!child || child.pid === undefined) return;
  try { process.kill(-child.pid, signal); } catch (_) { /* already gone */ }
  try { child.kill(signal); } catch (_) { /* already gone */ }
}

process.on('exit', () => {
  for (const p of live) killGroup(p.child, 'SIGKILL');
});
for (const sig of ['SIGINT', 'SIGTERM']) {
  process.once(sig, () => {
    for (const p of live) killGroup(p.child, 'SIGKILL');
    process.exit(130);
  });
}

class Proc {
  constructor(name, cmd, args, { env, cwd, logFile } = {}) {
    this.name = name;
    this.cmd = cmd;
    this.args = args;
    this.out = '';
    this.exited = null; // {code, signal}
    this.child = spawn(cmd, args, {
      cwd: cwd || E2E_DIR,
      env: { ...process.env, ...(env || {}) },
      detached: true, // own process group, killed as a group
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    this.pid = this.child.pid;
    this.log = logFile ? fs.createWriteStream(logFile, { flags: 'a' }) : null;
    const onData = (chunk) => {
      const s = chunk.toString('utf8');
      this.out += s;
      if (this.out.length > 256 * 1024) this.out = this.out.slice(-128 * 1024);
      if (this.log) this.log.write(s);
      this._notify();
    };
    this.child.stdout.on('data', onData);
    this.child.stderr.on('data', onData);
    this.waiters = new Set();
    this.exitPromise = new Promise((resolve) => {
      this.child.once('error', (err) => {
        this.out += `\n[spawn error: ${err.message}]\n`;
        this.exited = this.exited || { code: null, signal: null, error: err };
        live.delete(this);
        this._notify();
        resolve(this.exited);
      });
      this.child.once('exit', (code, signal) => {
        this.exited = { code, signal };
        live.delete(this);
        this._notify();
        resolve(this.exited);
      });
    });
    live.add(this);
  }

  _notify() {
    for (const w of this.waiters) w();
  }

  tail(n = 3000) {
    return this.out.length > n ? `...${this.out.slice(-n)}` : this.out;
  }

  describe() {
    return `${this.name} (pid ${this.pid}: ${this.cmd} ${this.args.join(' ')})`;
  }

  /** Waits until the combined output matches `re` (bounded); fails early if the process exits. */
  waitForOutput(re, ms, what) {
    return new Promise((resolve, reject) => {
      const check = () => {
        const m = this.out.match(re);
        if (m) { cleanup(); resolve(m); return; }
        if (this.exited) {
          cleanup();
          reject(new Error(`${this.describe()} exited (${JSON.stringify(this.exited)}) before printing ${re}; output:\n${this.tail()}`));
        }
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(new Error(`timeout after ${ms} ms waiting for ${what || re} from ${this.describe()}; output:\n${this.tail()}`));
      }, ms);
      const cleanup = () => { clearTimeout(timer); this.waiters.delete(check); };
      this.waiters.add(check);
      check();
    });
  }

  /** Sends `signal` to the process group and waits (bounded) for the exit. */
  async kill(signal = 'SIGKILL', ms = 5000) {
    if (this.exited) return this.exited;
    killGroup(this.child, signal);
    try {
      return await withTimeout(this.exitPromise, ms, `${this.describe()} to exit after ${signal}`);
    } catch (err) {
      killGroup(this.child, 'SIGKILL');
      return withTimeout(this.exitPromise, 2000, `${this.describe()} to exit after SIGKILL`);
    } finally {
      if (this.log) this.log.end();
    }
  }
}

/** Runs redis-cli with `args` (bounded); resolves its stdout, rejects with its output. */
function redisCli(args, timeoutMs = 5000) {
  return new Promise((resolve, reject) => {
    execFile(REDIS_CLI_BIN, args, { timeout: timeoutMs, encoding: 'utf8' }, (err, stdout, stderr) => {
      if (err) reject(new Error(`redis-cli ${args.join(' ')}: ${err.message}\n${stdout}${stderr}`));
      else resolve(stdout);
    });
  });
}

// ---------------------------------------------------------------------------------------------
// YAML (the subset the gopush config needs; strings are JSON-quoted, which YAML accepts)

function yamlScalar(v) {
  if (v === null || v === undefined) return 'null';
  if (typeof v === 'number' || typeof v === 'boolean') return String(v);
  return JSON.stringify(String(v));
}

function isScalar(v) {
  return v === null || v === undefined || typeof v !== 'object';
}

function toYaml(value, indent = 0) {
  const pad = ' '.repeat(indent);
  if (isScalar(value)) return `${pad}${yamlScalar(value)}\n`;
  if (Array.isArray(value)) {
    if (value.length === 0) return `${pad}[]\n`;
    if (value.every(isScalar)) return `${pad}[${value.map(yamlScalar).join(', ')}]\n`;
    let out = '';
    for (const item of value) {
      if (isScalar(item)) { out += `${pad}- ${yamlScalar(item)}\n`; continue; }
      const body = toYaml(item, indent + 2);
      out += `${pad}- ${body.slice(indent + 2)}`;
    }
    return out;
  }
  const keys = Object.keys(value).filter((k) => value[k] !== undefined);
  if (keys.length === 0) return `${pad}{}\n`;
  let out = '';
  for (const k of keys) {
    const v = value[k];
    const key = /^[A-Za-z_][A-Za-z0-9_-]*$/.test(k) ? k : JSON.stringify(k);
    if (isScalar(v) || (Array.isArray(v) && (v.length === 0 || v.every(isScalar)))
        || (!Array.isArray(v) && Object.keys(v).length === 0)) {
      out += `${pad}${key}: ${toYaml(v, 0).trimEnd()}\n`;
    } else {
      out += `${pad}${key}:\n${toYaml(v, indent + 2)}`;
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// gopush CLI

function execGopush(args, { timeoutMs = 10000 } = {}) {
  return new Promise((resolve) => {
    execFile(GOPUSH_BIN, args, { timeout: timeoutMs, maxBuffer: 4 * 1024 * 1024 }, (err, stdout, stderr) => {
      resolve({
        code: err ? (typeof err.code === 'number' ? err.code : -1) : 0,
        error: err && typeof err.code !== 'number' ? err : null,
        stdout: String(stdout),
        stderr: String(stderr),
      });
    });
  });
}

/**
 * `gopush route UID [--product P] [--agent] -c FILE` -> "IP:port": the first address on stdout
 * (the chosen backend; later lines may name the fallback, e.g. "if it is down: IP:port").
 * By default the CLI decides from FILE alone; `agent: true` asks the running agent at the
 * file's `admin.listen` instead (health, drain and the sid memory included).
 */
async function gopushRoute(configFile, uid, product, { agent = false } = {}) {
  const args = ['route', uid];
  if (product !== undefined) args.push('--product', product);
  if (agent) args.push('--agent');
  args.push('-c', configFile);
  const r = await execGopush(args);
  if (r.code !== 0) {
    throw new Error(`gopush ${args.join(' ')} exited ${r.code}: ${r.stderr || r.stdout}`);
  }
  const m = r.stdout.match(/\b\d{1,3}(?:\.\d{1,3}){3}:\d{1,5}\b/);
  if (!m) throw new Error(`gopush ${args.join(' ')}: no IP:port on stdout: ${JSON.stringify(r.stdout)}`);
  return m[0];
}

/** uid -> "IP:port" per the route CLI, for many uids (bounded concurrency). */
async function routeMap(configFile, uids, product, opts) {
  const addrs = await mapLimit(uids, 8, (uid) => gopushRoute(configFile, uid, product, opts));
  return new Map(uids.map((u, i) => [u, addrs[i]]));
}

/**
 * Picks `perBackend` uids for each address in `addrs` (per the route CLI) from `candidates`.
 * Returns Map addr -> [uid...]; throws if some backend does not get enough uids.
 */
async function pickUids(configFile, addrs, perBackend, candidates, product) {
  const routes = await routeMap(configFile, candidates, product);
  const out = new Map(addrs.map((a) => [a, []]));
  for (const [uid, addr] of routes) {
    if (out.has(addr) && out.get(addr).length < perBackend) out.get(addr).push(uid);
  }
  for (const [addr, list] of out) {
    if (list.length < perBackend) {
      const seen = [...new Set(routes.values())];
      throw new Error(`route CLI put only ${list.length} of ${candidates.length} candidate uids on ${addr} `
        + `(need ${perBackend}); addresses seen: ${JSON.stringify(seen)}`);
    }
  }
  return out;
}

function portOf(addr) {
  return Number(String(addr).split(':').pop());
}

// ---------------------------------------------------------------------------------------------
// HTTP helpers

/**
 * GET through node:http (optionally with a keep-alive agent); resolves {status, body, headers}.
 */
function request(url, { agent, headers = {}, timeoutMs = 5000 } = {}) {
  return new Promise((resolve, reject) => {
    const req = http.get(url, { agent, headers }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode, body: Buffer.concat(chunks).toString('utf8'), headers: res.headers }));
      res.on('error', reject);
    });
    req.setTimeout(timeoutMs, () => req.destroy(new Error(`GET ${url} timed out after ${timeoutMs} ms`)));
    req.on('error', reject);
  });
}

/** fetch() with a bounded timeout; returns {status, body, headers}. */
async function httpGet(url, { headers = {}, timeoutMs = 5000 } = {}) {
  const res = await fetch(url, { headers, signal: AbortSignal.timeout(timeoutMs), redirect: 'manual' });
  const body = await res.text();
  return { status: res.status, body, headers: res.headers };
}

/**
 * A request to an agent's admin listener: `agent` is what startAgent returned. `body` is sent as
 * JSON, `raw` as is. Resolves {status, text, json (or null), headers}.
 */
async function admin(agent, method, path, { token, body, raw, headers = {}, timeoutMs = 5000 } = {}) {
  if (!agent.adminUrl) throw new Error('this agent has no admin listener');
  const h = { ...headers };
  if (token !== undefined) h.authorization = `Bearer ${token}`;
  let payload;
  if (raw !== undefined) payload = raw;
  else if (body !== undefined) payload = JSON.stringify(body);
  if (payload !== undefined) h['content-type'] = 'application/json';
  const res = await fetch(`${agent.adminUrl}${path}`, {
    method, headers: h, body: payload, signal: AbortSignal.timeout(timeoutMs),
  });
  const text = await res.text();
  let json = null;
  try { json = JSON.parse(text); } catch (_) { /* not JSON (metrics, page) */ }
  return { status: res.status, text, json, headers: res.headers };
}

/** The first listen address of a config (`listen` is a string or a list of strings / entries). */
function firstListen(cfg) {
  const first = Array.isArray(cfg.listen) ? cfg.listen[0] : cfg.listen;
  return typeof first === 'string' ? first : first.addr;
}

// ---------------------------------------------------------------------------------------------
// TLS: a test CA and certificates made with the openssl CLI (ECDSA P-256)

function opensslRun(args, cwd) {
  return new Promise((resolve, reject) => {
    execFile('openssl', args, { cwd, timeout: 10000 }, (err, stdout, stderr) => {
      if (err) reject(new Error(`openssl ${args.join(' ')}: ${err.message}\n${stderr}`));
      else resolve(stdout);
    });
  });
}

/** A throw-away CA in `dir`: {dir, cert (path), key (path), pem (its PEM text)}. */
async function makeTestCa(dir) {
  const cert = path.join(dir, 'ca.pem');
  const key = path.join(dir, 'ca.key');
  await opensslRun(['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes',
    '-keyout', key, '-out', cert, '-days', '2', '-subj', '/CN=gopush e2e test CA'], dir);
  return { dir, cert, key, pem: fs.readFileSync(cert, 'utf8') };
}

/**
 * A leaf certificate for `names` (subjectAltNames: DNS names, or IP addresses) signed by `ca`, written as `stem`.pem
 * (leaf then CA) and `stem`.key; resolves {cert, key, pem}.
 */
async function issueCert(ca, stem, names) {
  const key = path.join(ca.dir, `${stem}.key`);
  const csr = path.join(ca.dir, `${stem}.csr`);
  const leaf = path.join(ca.dir, `${stem}.leaf.pem`);
  const ext = path.join(ca.dir, `${stem}.ext`);
  const cert = path.join(ca.dir, `${stem}.pem`);
  fs.writeFileSync(ext, `subjectAltName=${names.map((n) => (net.isIP(n) ? `IP:${n}` : `DNS:${n}`)).join(',')}\n`);
  await opensslRun(['req', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes',
    '-keyout', key, '-out', csr, '-subj', `/CN=${names[0]}`], ca.dir);
  await opensslRun(['x509', '-req', '-in', csr, '-CA', ca.cert, '-CAkey', ca.key, '-CAcreateserial',
    '-days', '1', '-extfile', ext, '-out', leaf], ca.dir);
  const pem = fs.readFileSync(leaf, 'utf8');
  fs.writeFileSync(cert, pem + ca.pem);
  return { cert, key, pem };
}

// ---------------------------------------------------------------------------------------------
// socket.io client

/**
 * Connects a socket.io-client socket (no reconnection) and resolves with
 * {socket, hello} once the backend's `hello` event arrived. Rejects on connect_error/timeout.
 */
function connect(url, opts = {}, { timeoutMs = 5000 } = {}) {
  const socket = ioClient(url, {
    forceNew: true,
    reconnection: false,
    timeout: timeoutMs,
    ...opts,
  });
  return new Promise((resolve, reject) => {
    let done = false;
    const finish = (err, val) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      if (err) { socket.close(); reject(err); } else resolve(val);
    };
    const timer = setTimeout(() => finish(new Error(
      `socket.io connect to ${url} (${JSON.stringify(opts)}) timed out after ${timeoutMs} ms without 'hello'`)), timeoutMs);
    socket.once('hello', (hello) => finish(null, { socket, hello }));
    socket.once('connect_error', (err) => {
      const ctx = err && err.context && err.context.status ? ` (HTTP ${err.context.status})` : '';
      const desc = err && err.description ? ` [${err.description.message || err.description}]` : '';
      const e = new Error(`socket.io connect_error via ${url} (${JSON.stringify(opts)}): ${err && err.message}${ctx}${desc}`);
      e.cause = err;
      finish(e);
    });
  });
}

/** Resolves once the socket's engine runs on the websocket transport (bounded). */
function waitUpgraded(socket, ms = 5000) {
  const engine = socket.io.engine;
  if (engine.transport && engine.transport.name === 'websocket') return Promise.resolve();
  return withTimeout(new Promise((resolve, reject) => {
    engine.once('upgrade', () => resolve());
    engine.once('upgradeError', (err) => reject(new Error(`upgradeError: ${err && err.message}`)));
  }), ms, 'transport upgrade polling -> websocket');
}

/** socket.emitWithAck with a bounded timeout. */
function emitAck(socket, event, arg, ms = 3000) {
  const s = socket.timeout(ms);
  return arg === undefined ? s.emitWithAck(event) : s.emitWithAck(event, arg);
}

// ---------------------------------------------------------------------------------------------
// environment: redis + backends + agents + nginx for one test file

class TestEnv {
  constructor(name) {
    this.name = name;
    this.procs = [];
    this.sockets = new Set();
    this.dir = fs.mkdtempSync(path.join(os.tmpdir(), `gopush-e2e-${name}-`));
    this.backends = [];
  }

  track(socket) {
    this.sockets.add(socket);
    return socket;
  }

  async connect(url, opts, o) {
    const r = await connect(url, opts, o);
    this.track(r.socket);
    return r;
  }

  async startRedis() {
    const port = await freePort();
    const p = new Proc(`redis:${port}`, REDIS_BIN, [
      '--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no',
      '--dir', this.dir, '--daemonize', 'no',
    ], { logFile: path.join(this.dir, `redis-${port}.log`) });
    this.procs.push(p);
    await p.waitForOutput(/Ready to accept connections/, 10000, 'redis readiness');
    this.redis = { port, url: `redis://127.0.0.1:${port}`, proc: p };
    return this.redis;
  }

  /**
   * A Redis Cluster of `n` primaries on loopback (no replicas): `n` redis-server with
   * `--cluster-enabled yes`, each with its own client and bus port and its own directory (nodes
   * file) under the test's temp dir, joined with `redis-cli --cluster create`; resolves once every
   * node reports `cluster_state:ok`, all slots assigned and all nodes known (bounded).
   */
  async startRedisCluster(n = 3) {
    const ports = await freePorts(2 * n); // client ports, then cluster bus ports
    const nodes = [];
    for (let i = 0; i < n; i++) {
      const port = ports[i];
      const dir = path.join(this.dir, `rcluster-${port}`);
      fs.mkdirSync(dir);
      const p = new Proc(`redis:${port}`, REDIS_BIN, [
        '--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no',
        '--dir', dir, '--daemonize', 'no', '--cluster-enabled', 'yes',
        '--cluster-port', String(ports[n + i]), '--cluster-config-file', path.join(dir, 'nodes.conf'),
        '--cluster-node-timeout', '5000',
      ], { logFile: path.join(this.dir, `redis-${port}.log`) });
      this.procs.push(p);
      nodes.push({ port, url: `redis://127.0.0.1:${port}`, proc: p });
    }
    await Promise.all(nodes.map((node) => node.proc.waitForOutput(/Ready to accept connections/, 10000,
      `redis cluster node ${node.port} readiness`)));
    await redisCli(['--cluster', 'create', ...nodes.map((node) => `127.0.0.1:${node.port}`),
      '--cluster-replicas', '0', '--cluster-yes'], 30000);
    await poll(async () => {
      for (const node of nodes) {
        const info = await redisCli(['-p', String(node.port), 'cluster', 'info']);
        const ok = /cluster_state:ok/.test(info) && /cluster_slots_ok:16384/.test(info)
          && new RegExp(`cluster_known_nodes:${n}\\b`).test(info);
        if (!ok) throw new Error(`node ${node.port}: ${info.replace(/\r?\n/g, ' ').slice(0, 200)}`);
      }
      return true;
    }, { attempts: 60, delayMs: 100, maxDelayMs: 500, what: 'every cluster node to report cluster_state:ok' });
    this.redisCluster = { nodes, urls: nodes.map((node) => node.url) };
    return this.redisCluster;
  }

  /** Starts a backend on `port` (a free one if omitted). */
  async startBackend({ port, host, pingInterval, pingTimeout, redisUrl, redisCluster, adapter } = {}) {
    port = port || await freePort();
    const args = [BACKEND_JS, '--port', String(port)];
    if (host) args.push('--host', host);
    const r = redisUrl || (this.redis && this.redis.url);
    if (redisCluster) args.push('--redis-cluster', redisCluster.join(','));
    else if (r) args.push('--redis', r);
    if (pingInterval) args.push('--ping-interval', String(pingInterval));
    if (pingTimeout) args.push('--ping-timeout', String(pingTimeout));
    if (adapter) args.push('--adapter', adapter);
    const p = new Proc(`backend:${port}`, process.execPath, args,
      { logFile: path.join(this.dir, `backend-${port}.log`) });
    this.procs.push(p);
    await p.waitForOutput(new RegExp(`^listening ${port}$`, 'm'), 10000, `backend ${port} 'listening' line`);
    const b = { port, addr: `${host || '127.0.0.1'}:${port}`, proc: p };
    this.backends.push(b);
    return b;
  }

  async startBackends(n, opts) {
    const out = [];
    for (let i = 0; i < n; i++) out.push(await this.startBackend(opts));
    return out;
  }

  /**
   * A gopush config object. `pools` maps pool name -> array of "IP:port" (or {addr, weight}).
   */
  makeConfig({ port, pools, healthCheck, sources, forward, productParam, extra, tag = `${port}` }) {
    const cfg = {
      listen: `127.0.0.1:${port}`,
      uid: {
        sources: sources || [{ cookie: 'uid' }, { query: 'uid' }, { header: 'x-user-id' }],
        forward: forward || { header: 'x-gopush-uid', query: 'uid' },
      },
      product_param: productParam || 'product',
      pools: Object.fromEntries(Object.entries(pools).map(([k, v]) => [k, { backends: v }])),
      health_check: healthCheck || { kind: 'tcp', interval: '200ms' },
      upstream: { connect_timeout: '1s' },
      server: {
        threads: 2,
        upgrade_sock: path.join(this.dir, `upgrade-${tag}.sock`),
        pid_file: path.join(this.dir, `gopush-${tag}.pid`),
        grace_period_seconds: 1,
        graceful_shutdown_timeout_seconds: 1,
      },
      ...(extra || {}),
    };
    return cfg;
  }

  /** The same config on another listen port (and its own pid file / upgrade socket). */
  withListen(cfg, port) {
    const c = structuredClone(cfg);
    c.listen = `127.0.0.1:${port}`;
    delete c.admin; // startAgent picks a free admin port
    c.server = {
      ...c.server,
      upgrade_sock: path.join(this.dir, `upgrade-${port}.sock`),
      pid_file: path.join(this.dir, `gopush-${port}.pid`),
    };
    return c;
  }

  writeConfig(cfg, file) {
    const f = path.join(this.dir, file || `gopush-${firstListen(cfg).split(':').pop()}.yaml`);
    fs.writeFileSync(f, toYaml(cfg));
    return f;
  }

  /**
   * Writes `cfg` and starts `gopush run -c FILE`; resolves once the listen port accepts TCP and
   * an HTTP request through it gets any HTTP status.
   */
  async startAgent(cfg, { file } = {}) {
    if (!fs.existsSync(GOPUSH_BIN)) throw new Error(`gopush binary not found at ${GOPUSH_BIN} (set GOPUSH_BIN)`);
    // Every agent gets its own admin port unless the test chose one: the default (6004) would be
    // shared by agents running side by side.
    // Set on the caller's object, so that a test rewriting the file for a reload keeps it.
    if (cfg.admin === undefined) cfg.admin = { listen: `127.0.0.1:${await freePort()}` };
    const configFile = this.writeConfig(cfg, file);
    // With several listen entries the first must be plain HTTP: readiness is probed there.
    const port = portOf(firstListen(cfg));
    const p = new Proc(`gopush:${port}`, GOPUSH_BIN, ['run', '-c', configFile], {
      logFile: path.join(this.dir, `gopush-${port}.log`),
      env: { RUST_LOG: process.env.RUST_LOG || 'info' },
    });
    this.procs.push(p);
    const url = `http://127.0.0.1:${port}`;
    await poll(async () => {
      if (p.exited) {
        throw Object.assign(new Error(`gopush exited ${JSON.stringify(p.exited)}:\n${p.tail()}`), { fatal: true });
      }
      if (!(await tcpProbe(port))) return false;
      const r = await httpGet(`${url}/socket.io/?EIO=4&transport=polling`, { timeoutMs: 1000 });
      return r.status > 0;
    }, { attempts: 60, delayMs: 50, maxDelayMs: 400, what: `gopush agent on ${url} to answer HTTP` }).catch((err) => {
      throw new Error(`${err.message}\n--- ${p.describe()} output:\n${p.tail()}`);
    });
    const adminUrl = cfg.admin && cfg.admin.listen && cfg.admin.enabled !== false ? `http://${cfg.admin.listen}` : null;
    return { port, url, configFile, proc: p, cfg, adminUrl };
  }

  /** Starts nginx with a `hash $cookie_uid consistent` upstream over `backends` (["IP:port"]). */
  async startNginx(backends, { keyVar = '$cookie_uid' } = {}) {
    const port = await freePort();
    const d = fs.mkdtempSync(path.join(this.dir, 'nginx-'));
    for (const sub of ['client_body', 'proxy', 'fastcgi', 'uwsgi', 'scgi', 'logs']) fs.mkdirSync(path.join(d, sub));
    fs.chmodSync(d, 0o755);
    const conf = `
${process.getuid && process.getuid() === 0 ? 'user root root;' : ''}
worker_processes 1;
error_log ${d}/logs/error.log warn;
pid ${d}/nginx.pid;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path ${d}/client_body;
  proxy_temp_path ${d}/proxy;
  fastcgi_temp_path ${d}/fastcgi;
  uwsgi_temp_path ${d}/uwsgi;
  scgi_temp_path ${d}/scgi;
  keepalive_requests 100000;
  upstream u {
    hash ${keyVar} consistent;
${backends.map((b) => `    server ${b};`).join('\n')}
    keepalive 32;
  }
  server {
    listen 127.0.0.1:${port};
    location / {
      proxy_pass http://u;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_next_upstream off;
    }
  }
}
`;
    const confFile = path.join(d, 'nginx.conf');
    fs.writeFileSync(confFile, conf);
    const p = new Proc(`nginx:${port}`, NGINX_BIN, ['-c', confFile, '-p', d, '-e', `${d}/logs/error.log`, '-g', 'daemon off;'],
      { logFile: path.join(d, 'logs', 'stdout.log') });
    this.procs.push(p);
    await poll(async () => {
      if (p.exited) {
        const log = fs.existsSync(`${d}/logs/error.log`) ? fs.readFileSync(`${d}/logs/error.log`, 'utf8') : '';
        throw new Error(`nginx exited ${JSON.stringify(p.exited)}: ${p.tail()}\n${log}`);
      }
      return tcpProbe(port);
    }, { attempts: 50, delayMs: 50, maxDelayMs: 300, what: `nginx on port ${port}` });
    return { port, url: `http://127.0.0.1:${port}`, proc: p, dir: d };
  }

  async close() {
    for (const s of this.sockets) {
      try { s.close(); } catch (_) { /* ignore */ }
    }
    this.sockets.clear();
    // agents/nginx first (SIGTERM lets them close sockets), then backends, then redis
    const order = (p) => (p.name.startsWith('gopush') || p.name.startsWith('nginx') ? 0
      : p.name.startsWith('backend') ? 1 : 2);
    const procs = [...this.procs].sort((a, b) => order(a) - order(b));
    for (const p of procs) await p.kill(p.name.startsWith('nginx') ? 'SIGTERM' : 'SIGKILL', 3000);
    this.procs = [];
    if (!KEEP_TMP) {
      await fsp.rm(this.dir, { recursive: true, force: true }).catch(() => {});
    } else {
      process.stderr.write(`# gopush e2e: kept ${this.dir}\n`);
    }
  }
}

/**
 * The standard set-up of a test file: redis, two backends A and B in pool `default`, one backend T
 * in pool `test`, and one agent. `pools` adds extra pools; `healthCheck` overrides the default
 * ({kind: tcp, interval: 200ms}); `backend` options are passed to every backend.
 */
async function startStandard(name, { healthCheck, pools = {}, backend = {} } = {}) {
  const env = new TestEnv(name);
  try {
    await env.startRedis();
    const A = await env.startBackend(backend);
    const B = await env.startBackend(backend);
    const T = await env.startBackend(backend);
    const port = await freePort();
    const cfg = env.makeConfig({
      port,
      pools: { default: [A.addr, B.addr], test: [T.addr], ...pools },
      healthCheck,
    });
    const agent = await env.startAgent(cfg);
    return { env, A, B, T, agent, cfg };
  } catch (err) {
    await env.close();
    throw err;
  }
}

/** Records every `event` a socket receives (so absence can be checked after a marker). */
function recorder(socket, event) {
  const got = [];
  socket.on(event, (data) => got.push(data));
  return got;
}

/** An Engine.IO 4 WebSocket session (cookie `uid`) that answers pings and records how it was
 * closed (`closeCode`, `closedAt` as `Date.now()`). */
function rawEngineIo(url, uid) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`${url.replace(/^http/, 'ws')}/socket.io/?EIO=4&transport=websocket`,
      { headers: { cookie: `uid=${uid}` }, perMessageDeflate: false });
    const c = { uid, ws, open: false, closeCode: null, closedAt: null };
    const timer = setTimeout(() => { ws.terminate(); reject(new Error(`${uid}: no Engine.IO open packet`)); }, 10000);
    ws.on('message', (data) => {
      const text = data.toString();
      if (text.startsWith('0') && !c.open) {
        c.open = true;
        clearTimeout(timer);
        resolve(c);
      } else if (text === '2') {
        ws.send('3');
      }
    });
    ws.on('close', (code) => { c.closeCode = code; c.closedAt = Date.now(); });
    ws.on('error', (err) => { clearTimeout(timer); if (!c.open) reject(err); });
  });
}

module.exports = {
  redisCli,
  makeTestCa,
  issueCert,
  firstListen,
  rawEngineIo,
  recorder,
  startStandard,
  GOPUSH_BIN,
  BACKEND_JS,
  TestEnv,
  Proc,
  connect,
  emitAck,
  waitUpgraded,
  delay,
  withTimeout,
  poll,
  until,
  redisStats,
  adminJson,
  once,
  mapLimit,
  prng,
  freePort,
  freePorts,
  tcpProbe,
  toYaml,
  execGopush,
  gopushRoute,
  portOf,
  httpGet,
  admin,
  request,
  routeMap,
  pickUids,
};
