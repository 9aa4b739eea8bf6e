'use strict';
// The fault suite of the production-operations issue: backends, Redis and clients misbehave, and
// the agent keeps serving normal clients within a stated latency bound.
//
//   kill -9 of a backend mid-poll and mid-websocket   Redis stopped (push 503, proxying continues)
//   garbage bytes on raw TCP                          a 2 MB request header, very long URLs
//   10,000 idle connections                           slowloris (one header byte per second)
//   SIGUSR1 reopens the error log of a daemon
//
// "Normal clients" are probes that run during each fault: an HTTP GET through the agent on a new
// TCP connection every PROBE_EVERY_MS, and socket.io clients that connect and echo. The bound is
// a fault-tolerance limit on this shared 2-core machine, not a performance claim: p99 of the
// probe latencies under LATENCY_BOUND_MS, and no probe failing. Each scenario prints a `# faults:`
// line with what it measured (docs/RELIABILITY.md records them).

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const net = require('node:net');
const path = require('node:path');
const { createClient } = require('redis');
const h = require('../lib/harness');

/**
 * p99 of the probe latencies must stay under this while a fault runs (ms). The measured p99s were
 * 4-91 ms (docs/RELIABILITY.md); the bound is far above that because another test file runs
 * alongside on the same 2 cores. It still catches an agent that stalls (a blocked event loop, a
 * probe queued behind the fault), and a probe that fails or takes its 5 s timeout fails anyway.
 */
const LATENCY_BOUND_MS = 2000;
/** Probes each scenario must have run (the doc promises "at least 50 per scenario"). */
const MIN_PROBES = 50;
/** Pacing of the HTTP probe loop (ms between the end of one probe and the next). */
const PROBE_EVERY_MS = 20;
/** Idle connections held open at once (the test fails, saying why, if fd limits are too low). */
const IDLE_CONNECTIONS = 10_000;
/** Slowloris connections. */
const SLOW_CONNECTIONS = 500;
/** `limits.header_timeout` of the slowloris agent. */
const SLOW_HEADER_TIMEOUT_MS = 4000;

const report = (line) => process.stdout.write(`# faults: ${line}\n`);

function summary(latencies) {
  const s = [...latencies].sort((a, b) => a - b);
  const at = (q) => (s.length ? s[Math.min(s.length - 1, Math.ceil(q * s.length) - 1)] : NaN);
  const r = (x) => Math.round(x * 10) / 10;
  return { n: s.length, p50: r(at(0.5)), p99: r(at(0.99)), max: r(s.length ? s[s.length - 1] : NaN) };
}

/**
 * A normal client: GET /whoami through the agent, each on a new TCP connection, one after the
 * other until stopped (bounded: at most `max` probes). `stop()` resolves the latency summary and
 * the failures.
 */
function startProbe(url, uids, { max = 20_000 } = {}) {
  const latencies = [];
  const failures = [];
  let stopped = false;
  const loop = (async () => {
    for (let i = 0; !stopped && i < max; i++) {
      const uid = uids[i % uids.length];
      const t0 = performance.now();
      try {
        const r = await h.request(`${url}/whoami`, { agent: false, headers: { cookie: `uid=${uid}` }, timeoutMs: 5000 });
        if (r.status !== 200) failures.push(`HTTP ${r.status}: ${r.body.slice(0, 100)}`);
      } catch (err) {
        failures.push(err.message);
      }
      latencies.push(performance.now() - t0);
      await h.delay(PROBE_EVERY_MS); // pacing of the client's own traffic, not a synchronisation
    }
  })();
  return {
    latencies,
    failures,
    /** Stops the loop once at least `atLeast` probes ran (bounded wait; fails if they did not). */
    async stop({ atLeast = MIN_PROBES } = {}) {
      try {
        await h.poll(() => latencies.length >= atLeast, {
          attempts: 150, delayMs: 50, maxDelayMs: 200, what: `${atLeast} probes`,
        });
      } finally {
        stopped = true;
        await loop;
      }
      return { ...summary(latencies), failures };
    },
  };
}

function assertWithinBound(name, probe) {
  assert.ok(probe.n >= MIN_PROBES, `${name}: only ${probe.n} probes ran`);
  assert.deepEqual(probe.failures.slice(0, 5), [], `${name}: ${probe.failures.length} of ${probe.n} probes failed`);
  assert.ok(probe.p99 < LATENCY_BOUND_MS, `${name}: probe p99 ${probe.p99} ms >= ${LATENCY_BOUND_MS} ms (${JSON.stringify(probe)})`);
}

const fmtProbe = (p) => `probes n=${p.n} p50=${p.p50} ms p99=${p.p99} ms max=${p.max} ms failed=${p.failures.length}`;

/** A socket.io client connects through the agent and echoes; resolves its latency in ms. */
async function sioRoundTrip(env, url, uid, transports) {
  const t0 = performance.now();
  const { socket, hello } = await env.connect(url, { transports, extraHeaders: { cookie: `uid=${uid}` } }, { timeoutMs: 5000 });
  try {
    assert.deepEqual(await h.emitAck(socket, 'echo', { uid }, 5000), { uid });
    return { ms: performance.now() - t0, port: hello.port };
  } finally {
    socket.close();
  }
}

/** Whether `text` holds a complete HTTP/1.1 response (head, and a Content-Length body). */
function completeResponse(text) {
  const end = text.indexOf('\r\n\r\n');
  if (end < 0) return false;
  const m = /\r\ncontent-length: *(\d+)/i.exec(text.slice(0, end));
  return !m || text.length - (end + 4) >= Number(m[1]);
}

/**
 * Opens a raw TCP connection, writes `chunks` (optionally ends the write side) and resolves once
 * the agent answered completely or closed the connection, or `waitMs` passed:
 * {response (latin1), closed, error, ms}.
 */
function raw(port, chunks, { end = false, waitMs = 5000 } = {}) {
  return new Promise((resolve) => {
    const t0 = performance.now();
    const sock = net.connect(port, '127.0.0.1');
    const got = [];
    let error = null;
    let done = false;
    const finish = (closed) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      sock.destroy();
      resolve({ response: Buffer.concat(got).toString('latin1'), closed, error, ms: performance.now() - t0 });
    };
    const timer = setTimeout(() => finish(false), waitMs);
    sock.on('data', (d) => {
      got.push(d);
      if (completeResponse(Buffer.concat(got).toString('latin1'))) finish(false);
    });
    sock.on('error', (e) => { error = e.code || e.message; });
    sock.on('close', () => finish(true));
    sock.on('connect', () => {
      for (const c of chunks) sock.write(c);
      if (end) sock.end();
    });
  });
}

const statusOf = (response) => {
  const m = /^HTTP\/1\.[01] (\d{3})/.exec(response);
  return m ? Number(m[1]) : null;
};

function fdCount(pid) {
  return fs.readdirSync(`/proc/${pid}/fd`).length;
}

/** The soft RLIMIT_NOFILE of a process. */
function nofile(pid = 'self') {
  const line = fs.readFileSync(`/proc/${pid}/limits`, 'utf8').split('\n').find((l) => l.startsWith('Max open files'));
  const soft = line && line.split(/\s{2,}/)[1];
  return soft === 'unlimited' ? Infinity : Number(soft);
}

function alive(pid) {
  try { process.kill(pid, 0); return true; } catch (_) { return false; }
}

// ---------------------------------------------------------------------------------------------

describe('fault: kill -9 of a backend mid-poll and mid-websocket', { timeout: 90_000 }, () => {
  let env;
  let A;
  let B;
  let agent;
  let onA;
  let onB;

  before(async () => {
    env = new h.TestEnv('faults-kill');
    await env.startRedis();
    A = await env.startBackend();
    B = await env.startBackend();
    agent = await env.startAgent(env.makeConfig({
      port: await h.freePort(), pools: { default: [A.addr, B.addr] }, healthCheck: { kind: 'tcp', interval: '200ms' },
    }));
    const picked = await h.pickUids(agent.configFile, [A.addr, B.addr], 5,
      Array.from({ length: 60 }, (_, i) => `k-${i}`));
    onA = picked.get(A.addr);
    onB = picked.get(B.addr);
  });

  after(async () => {
    if (env) await env.close();
  });

  const landOn = async (uid) => {
    const { socket, hello } = await env.connect(agent.url, { transports: ['polling'], extraHeaders: { cookie: `uid=${uid}` } });
    socket.close();
    return hello.port;
  };

  it('A\'s clients reconnect by themselves to B, B\'s clients are untouched; A\'s uids return after its restart', async () => {
    // Two clients per uid, one long-polling, one on a WebSocket, reconnecting by themselves.
    const clients = [];
    for (const uid of [...onA.slice(0, 4), ...onB.slice(0, 4)]) {
      for (const transports of [['polling'], ['websocket']]) {
        const { socket, hello } = await env.connect(agent.url, {
          transports, extraHeaders: { cookie: `uid=${uid}` },
          reconnection: true, reconnectionDelay: 200, reconnectionDelayMax: 1000,
        });
        const c = { uid, transports, socket, port: hello.port, sid: socket.io.engine.id, disconnects: [], hellos: [] };
        socket.on('disconnect', (reason) => c.disconnects.push(reason));
        socket.on('hello', (again) => c.hellos.push({ port: again.port, at: performance.now() }));
        clients.push(c);
      }
    }
    const ofA = clients.filter((c) => c.port === A.port);
    const ofB = clients.filter((c) => c.port === B.port);
    assert.equal(ofA.length, 8, 'the ring put the A uids on A');
    assert.equal(ofB.length, 8, 'the ring put the B uids on B');
    // Traffic in flight at the moment of the kill: every client receives a tick every 50 ms,
    // and each polling client has its long-poll GET waiting on its backend.
    for (const c of clients) await h.emitAck(c.socket, 'ticks', { count: 1000, every: 50 });
    await h.poll(async () => clients.every((c) => c.socket.connected), { what: 'all clients connected' });

    const probe = startProbe(agent.url, onB);
    await h.poll(() => probe.latencies.length >= 10, { attempts: 100, what: 'probes running' });
    const killedAt = performance.now();
    await A.proc.kill('SIGKILL');

    // A's clients notice, reconnect through the agent, and are served by B.
    await h.poll(() => ofA.every((c) => c.socket.connected && c.hellos.length >= 1), {
      attempts: 100, delayMs: 100, maxDelayMs: 200, what: 'every client of A to reconnect through the agent',
    });
    const recovered = ofA.map((c) => c.hellos[0].at - killedAt).sort((a, b) => a - b);
    for (const c of ofA) {
      assert.ok(c.disconnects.length >= 1, `${c.uid} ${c.transports} was not disconnected`);
      assert.deepEqual(c.hellos.map((x) => x.port), [B.port], `${c.uid} ${c.transports} reconnected to ${JSON.stringify(c.hellos)}`);
      const me = await h.emitAck(c.socket, 'whoami', undefined, 5000);
      assert.equal(me.port, B.port);
    }
    // New sessions during the outage: A's uids on B, B's uids on B.
    for (const uid of onA) assert.equal(await landOn(uid), B.port, `${uid} (an A uid) during the outage`);
    for (const uid of onB) assert.equal(await landOn(uid), B.port, `${uid} (a B uid) during the outage`);

    // A comes back on its port: its uids return, for new sessions only.
    const A2 = await env.startBackend({ port: A.port });
    await h.poll(async () => (await landOn(onA[0])) === A2.port, {
      attempts: 60, delayMs: 100, maxDelayMs: 300, what: `${onA[0]} to return to A after its restart`,
    });
    for (const uid of onA) assert.equal(await landOn(uid), A2.port, `${uid} after A's restart`);
    for (const uid of onB) assert.equal(await landOn(uid), B.port, `${uid} after A's restart`);
    const p = await probe.stop();

    // The clients that moved stay on B (their sessions live there); B's were never disturbed.
    for (const c of ofA) {
      const me = await h.emitAck(c.socket, 'whoami', undefined, 5000);
      assert.equal(me.port, B.port, `${c.uid} ${c.transports} after A's restart`);
      assert.equal(c.disconnects.length, 1, `${c.uid} ${c.transports}: ${c.disconnects}`);
    }
    for (const c of ofB) {
      assert.deepEqual(c.disconnects, [], `${c.uid} ${c.transports} (on B) was disconnected`);
      assert.deepEqual(c.hellos, [], `${c.uid} ${c.transports} (on B) reconnected`);
      assert.equal(c.socket.io.engine.id, c.sid, `${c.uid} ${c.transports} (on B) changed engine.io session`);
      const me = await h.emitAck(c.socket, 'whoami', undefined, 5000);
      assert.equal(me.port, B.port);
    }
    for (const c of clients) c.socket.close();
    assertWithinBound('kill -9', p);
    const reasons = [...new Set(ofA.flatMap((c) => c.disconnects))];
    report(`kill -9: ${ofA.length} clients of A (4 polling, 4 websocket; reasons ${reasons.join(', ')}) back on B `
      + `${Math.round(recovered[0])}-${Math.round(recovered[recovered.length - 1])} ms after the kill; `
      + `${ofB.length} clients of B: 0 disconnects; ${fmtProbe(p)}`);
  });
});

// ---------------------------------------------------------------------------------------------

describe('fault: Redis stopped', { timeout: 90_000 }, () => {
  const TOKEN = 'faults-token';
  let env;
  let A;
  let B;
  let agent;
  const api = (method, p, opts = {}) => h.admin(agent, method, p, { token: TOKEN, ...opts });

  before(async () => {
    env = new h.TestEnv('faults-redis');
    await env.startRedis();
    A = await env.startBackend();
    B = await env.startBackend();
    agent = await env.startAgent(env.makeConfig({
      port: await h.freePort(),
      pools: { default: [A.addr, B.addr] },
      extra: {
        admin: { listen: `127.0.0.1:${await h.freePort()}`, token: TOKEN },
        push: { redis: env.redis.url, uid_room: 'uid:{uid}', timeout: '1s' },
      },
    }));
  });

  after(async () => {
    if (env) await env.close();
  });

  /** Restarts redis-server on the port it had (the backends' and the agent's Redis URL). */
  const restartRedis = async () => {
    const { port } = env.redis;
    const p = new h.Proc(`redis:${port}`, 'redis-server', [
      '--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', env.dir, '--daemonize', 'no',
    ], { logFile: path.join(env.dir, `redis-${port}-2.log`) });
    env.procs.push(p);
    await p.waitForOutput(/Ready to accept connections/, 10000, 'redis readiness after restart');
    env.redis.proc = p;
  };

  it('push answers 503 with the reason while proxying continues; push works again once Redis is back', async () => {
    const news = [];
    const { socket: alice } = await env.connect(agent.url, {
      transports: ['websocket'], query: { uid: 'r-alice' }, reconnection: true, reconnectionDelay: 200,
    });
    alice.on('news', (d) => news.push(d));
    const push = (n) => api('POST', '/api/push', { body: { uid: 'r-alice', event: 'news', data: { n } } });
    const ok = await push(0);
    assert.equal(ok.status, 200, ok.text);
    await h.poll(() => news.some((d) => d.n === 0), { what: 'push 0 delivered' });

    // --- Redis stops (SIGTERM: a clean shutdown, as `systemctl stop redis` does)
    const probe = startProbe(agent.url, ['r-p1', 'r-p2', 'r-p3']);
    await h.poll(() => probe.latencies.length >= 10, { attempts: 100, what: 'probes running' });
    // Proc.kill falls back to SIGKILL after 5 s: a clean stop is exit code 0, not a signal.
    const exit = await env.redis.proc.kill('SIGTERM');
    assert.deepEqual(exit, { code: 0, signal: null }, 'redis stopped on SIGTERM');
    const refusals = [];
    for (let i = 1; i <= 3; i++) {
      const t0 = performance.now();
      const r = await push(i);
      refusals.push(Math.round(performance.now() - t0));
      assert.equal(r.status, 503, r.text);
      assert.match(r.json.error, /redis/i);
    }
    const d = await api('POST', '/api/disconnect', { body: { uid: 'r-alice' } });
    assert.equal(d.status, 503, d.text);

    // Proxying continues: new socket.io clients connect and echo, the old one echoes.
    const fresh = [];
    for (let i = 0; i < 6; i++) {
      fresh.push(await sioRoundTrip(env, agent.url, `r-new-${i}`, i % 2 ? ['websocket'] : ['polling']));
    }
    assert.deepEqual(await h.emitAck(alice, 'echo', 'still here', 5000), 'still here');
    const p = await probe.stop();
    assertWithinBound('Redis down', p);

    // --- Redis is back (same port): the agent reconnects by itself on the next push.
    const backAt = performance.now();
    await restartRedis();
    let failedAfter = 0;
    await h.poll(async () => {
      const r = await push(100);
      if (r.status === 200 && r.json.receivers >= 2) return true; // both Node adapters resubscribed
      if (r.status !== 200) failedAfter += 1;
      return false;
    }, { attempts: 60, delayMs: 100, maxDelayMs: 500, what: 'push to reach both backends after Redis restarted' });
    const recoveredMs = Math.round(performance.now() - backAt);
    await h.poll(() => news.some((x) => x.n === 100), { attempts: 60, what: 'the push after the restart delivered' });
    // Redis restarts again with no push in between: the agent's connection is now a dead one,
    // and the next push must not fail on it.
    assert.deepEqual(await env.redis.proc.kill('SIGTERM'), { code: 0, signal: null }, 'redis stopped on SIGTERM again');
    await restartRedis();
    await h.poll(async () => {
      // wait for the backends' adapters (not the agent) to resubscribe, by asking Redis
      const c = createClient({ url: env.redis.url });
      c.on('error', () => {});
      try {
        await c.connect();
        const [, subscribers] = await c.sendCommand(['PUBSUB', 'NUMSUB', 'socket.io-request#/#']);
        return Number(subscribers) >= 2;
      } finally {
        await c.quit().catch(() => {});
      }
    }, { attempts: 60, delayMs: 100, maxDelayMs: 500, what: 'both backends resubscribed (PUBSUB NUMSUB)' });
    const first = await push(200);
    assert.equal(first.status, 200, `first push after a Redis restart with no push in between: ${first.text}`);
    await h.poll(async () => news.some((x) => x.n >= 200) || (await push(201)) && false,
      { attempts: 60, what: 'a push delivered after the second restart' });

    // --- Redis hangs (SIGSTOP): a push waits push.timeout, then 503; proxying continues.
    const redisPid = env.redis.proc.pid;
    process.kill(redisPid, 'SIGSTOP');
    let hungMs;
    try {
      const t0 = performance.now();
      const hung = await push(300);
      hungMs = Math.round(performance.now() - t0);
      assert.equal(hung.status, 503, hung.text);
      assert.match(hung.json.error, /redis did not answer within 1s \(the event may still be delivered/);
      assert.ok(hungMs < 2500, `a push to a hung Redis took ${hungMs} ms (push.timeout 1s)`);
      await sioRoundTrip(env, agent.url, 'r-hung', ['polling']);
    } finally {
      process.kill(redisPid, 'SIGCONT');
    }
    await h.poll(async () => (await push(301)).status === 200, { attempts: 40, what: 'push after SIGCONT' });
    await h.poll(() => news.some((x) => x.n === 301), { attempts: 60, what: 'push 301 delivered' });
    // Redis delivers in order: had the timed-out PUBLISH (300) been executed on resume, it
    // arrived before 301.
    // So a 503 after a timeout means "not confirmed", as the error says, not "not sent".
    const lateDelivered = news.some((x) => x.n === 300);
    // Whether it is delivered is not promised (the README says "may"): recorded runs delivered
    // it, and the report says which. What holds in every run: at most once (no retry after a
    // timeout), and in order, before the push that followed it.
    const n300 = news.map((x) => x.n).filter((n) => n === 300).length;
    assert.ok(n300 <= 1, `the timed-out push was delivered ${n300} times`);
    if (lateDelivered) {
      assert.ok(news.findIndex((x) => x.n === 300) < news.findIndex((x) => x.n === 301), 'the timed-out push arrived after the next one');
    }
    alice.close();
    report(`Redis hung (SIGSTOP): push 503 after ${hungMs} ms; the timed-out push was ${lateDelivered ? '' : 'not '}delivered once Redis resumed`);
    report(`Redis down: push 503 in ${refusals.join('/')} ms (push.timeout 1s); ${fresh.length} new socket.io clients `
      + `connected and echoed in ${Math.round(Math.max(...fresh.map((f) => f.ms)))} ms max; ${fmtProbe(p)}; `
      + `after the restart push reached both backends in ${recoveredMs} ms (${failedAfter} 503s meanwhile); `
      + 'first push after a restart with no push in between: 200');
  });
});

// ---------------------------------------------------------------------------------------------

describe('fault: misbehaving clients', { timeout: 150_000 }, () => {
  let env;
  let A;
  let B;
  let base;
  let agent; // defaults (limits.header_timeout 10s)
  const normalUids = ['n-1', 'n-2', 'n-3', 'n-4'];

  before(async () => {
    env = new h.TestEnv('faults-clients');
    await env.startRedis();
    A = await env.startBackend();
    B = await env.startBackend();
    base = env.makeConfig({ port: await h.freePort(), pools: { default: [A.addr, B.addr] } });
    agent = await env.startAgent(base);
  });

  after(async () => {
    if (env) await env.close();
  });

  const stillServing = async (a, what) => {
    assert.equal(a.proc.exited, null, `${what}: the agent exited: ${a.proc.tail()}`);
    const r = await h.request(`${a.url}/whoami`, { agent: false, headers: { cookie: 'uid=after' } });
    assert.equal(r.status, 200, `${what}: ${r.body}`);
    for (const transports of [['polling'], ['websocket']]) await sioRoundTrip(env, a.url, 'after', transports);
  };

  it('garbage bytes: 400 or a closed connection, and the agent keeps serving', async () => {
    const rnd = h.prng(6);
    const random = (n) => Buffer.from(Array.from({ length: n }, () => Math.floor(rnd() * 256)));
    const cases = [
      { name: 'random binary (4 KiB)', chunks: [random(4096)] },
      { name: 'random binary (64 KiB)', chunks: [random(65536)] },
      { name: 'NUL and 0xFF in a header line', chunks: [Buffer.from('GET /whoami HTTP/1.1\r\nHost: x\r\nX-J\x00nk: \xff\xfe\r\n\r\n', 'latin1')] },
      { name: 'junk request line', chunks: ['GARBAGE GARBAGE GARBAGE\r\n\r\n'] },
      { name: 'HTTP/1.1 line with junk after it', chunks: ['GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\n\x01\x02\x03 junk junk\r\n\r\n'] },
      { name: 'HTTP/9.9', chunks: ['GET /whoami HTTP/9.9\r\nHost: x\r\n\r\n'] },
      { name: 'header without a colon', chunks: ['GET /whoami HTTP/1.1\r\nHost x\r\nno colon here\r\n\r\n'] },
      { name: 'TLS ClientHello on the plain port', chunks: [Buffer.from('16030100a5010000a10303' + '00'.repeat(160), 'hex')] },
      { name: 'HTTP/2 preface (h2c is off)', chunks: ['PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n'] },
      // A valid head is proxied, so the backend (404 for POST) may answer before the body fails.
      { name: 'bad chunked body', chunks: ['POST /whoami HTTP/1.1\r\nHost: x\r\nCookie: uid=g\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nnot hex\r\n'], want: [400, 404, 502] },
      { name: 'half a request line, then close', chunks: ['GET /who'], end: true },
      { name: 'half a header, then close', chunks: ['GET /whoami HTTP/1.1\r\nHost: x\r\nX-Half: ab'], end: true },
      { name: 'head, half a body, then close', chunks: ['POST /whoami HTTP/1.1\r\nHost: x\r\nCookie: uid=g\r\nContent-Length: 100\r\n\r\nabc'], end: true, want: [400, 404, 502] },
    ];
    const probe = startProbe(agent.url, normalUids);
    const outcomes = [];
    for (const c of cases) {
      const r = await raw(agent.port, c.chunks, { end: !!c.end, waitMs: 15_000 });
      const status = statusOf(r.response);
      outcomes.push(`${c.name}: ${status || (r.closed ? 'closed' : 'open')} in ${Math.round(r.ms)} ms`);
      assert.ok(r.closed || status !== null, `${c.name}: no answer, and the connection still open after 15 s`);
      const want = c.want || [400];
      if (r.response.length) assert.ok(want.includes(status), `${c.name}: answered ${JSON.stringify(r.response.slice(0, 80))}`);
    }
    // The same garbage from 200 connections at once.
    const many = await h.mapLimit(Array.from({ length: 200 }, (_, i) => cases[i % cases.length]), 50,
      (c) => raw(agent.port, c.chunks, { end: !!c.end, waitMs: 15_000 }));
    assert.ok(many.every((r) => r.closed || statusOf(r.response) !== null), `${many.filter((r) => !r.closed).length} of 200 neither answered nor closed`);
    const p = await probe.stop();
    await stillServing(agent, 'after garbage');
    assertWithinBound('garbage', p);
    report(`garbage: ${outcomes.join('; ')}; 200 concurrent: all closed; ${fmtProbe(p)}`);
  });

  it('a 2 MB request header and very long URLs: 400/431 or closed, and the agent keeps serving', async () => {
    const head = (target, extra = '') => `GET ${target} HTTP/1.1\r\nHost: x\r\nCookie: uid=big\r\n${extra}\r\n`;
    const big = (n) => 'a'.repeat(n);
    const cases = [
      { name: '2 MB header', mayClose: true, data: head('/whoami', `X-Big: ${big(2 * 1024 * 1024)}\r\n`), want: [400, 431] },
      { name: '2 MB of 1 KB headers', mayClose: true, data: head('/whoami', Array.from({ length: 2048 }, (_, i) => `X-H${i}: ${big(1000)}\r\n`).join('')), want: [400, 431] },
      { name: '100 KB header', data: head('/whoami', `X-Big: ${big(100 * 1024)}\r\n`), want: [431] },
      { name: '2 MB URL', mayClose: true, data: head(`/whoami?x=${big(2 * 1024 * 1024)}`), want: [400, 431] },
      // The http crate refuses a URI over 64 KiB (Pingora answers 400); under it, gopush's limit.
      { name: '100 KB URL', data: head(`/whoami?x=${big(100 * 1024)}`), want: [400] },
      { name: '32 KB URL', data: head(`/whoami?x=${big(32 * 1024)}`), want: [431] },
      { name: '20 KB cookie', data: head('/whoami', `Cookie: pad=${big(20 * 1024)}\r\n`), want: [431] },
    ];
    const probe = startProbe(agent.url, normalUids);
    const outcomes = [];
    for (const c of cases) {
      const r = await raw(agent.port, [c.data], { waitMs: 15_000 });
      const status = statusOf(r.response);
      outcomes.push(`${c.name}: ${status || 'closed'}${r.error ? ` (${r.error})` : ''} in ${Math.round(r.ms)} ms`);
      assert.ok(r.closed || status !== null, `${c.name}: no answer and not closed in 15 s`);
      // A head over Pingora's own buffer (the 2 MB ones) may be cut before an answer can be
      // read (the client is still writing when the agent closes); a head Pingora reads whole
      // gets gopush's answer, so for those a closed connection is a failure.
      if (!c.mayClose) assert.ok(status !== null, `${c.name}: closed without an answer${r.error ? ` (${r.error})` : ''}`);
      assert.ok(status === null || c.want.includes(status), `${c.name}: answered ${JSON.stringify(r.response.slice(0, 120))}`);
      if (status === 431) assert.match(r.response, /limits\.max_header_bytes/);
    }
    // 20 clients sending 2 MB heads at once.
    const many = await h.mapLimit(Array.from({ length: 20 }, () => cases[0]), 20,
      (c) => raw(agent.port, [c.data], { waitMs: 15_000 }));
    assert.ok(many.every((r) => r.closed || [400, 431].includes(statusOf(r.response))),
      JSON.stringify(many.map((r) => [statusOf(r.response), r.closed])));
    const p = await probe.stop();
    await stillServing(agent, 'after 2 MB heads');
    assertWithinBound('2 MB header', p);
    report(`big heads: ${outcomes.join('; ')}; 20 concurrent 2 MB heads: ${[...new Set(many.map((r) => statusOf(r.response) || 'closed'))].join('/')}; ${fmtProbe(p)}`);
  });

  it('10,000 idle connections: normal clients are served within the bound; the fds return afterwards', async () => {
    // This agent keeps idle connections for a minute (the default deadline, 10 s, would start
    // closing them while they are being counted).
    const cfg = env.withListen(base, await h.freePort());
    cfg.limits = { header_timeout: '60s' };
    const idleAgent = await env.startAgent(cfg);
    const pid = idleAgent.proc.pid;
    // Both ends of every connection are on this machine: the test process holds N sockets, the
    // agent N more; each needs its own fd budget.
    const headroom = 1000;
    const n = IDLE_CONNECTIONS;
    assert.ok(Math.min(nofile(), nofile(pid)) >= n + headroom,
      `${n} idle connections need RLIMIT_NOFILE >= ${n + headroom}, but it is ${nofile()} here and ${nofile(pid)} for the agent `
      + '(raise it: `ulimit -n`; .ci/run raises the hard limit as root, the npm script the soft one to the hard one)');
    await h.request(`${idleAgent.url}/whoami`, { agent: false, headers: { cookie: 'uid=warm' } });
    const baseline = fdCount(pid);
    const socks = [];
    let closedByAgent = 0;
    const openedAt = performance.now();
    await h.mapLimit(Array.from({ length: n }, (_, i) => i), 200, (i) => new Promise((resolve, reject) => {
      const s = net.connect(idleAgent.port, '127.0.0.1');
      s.setTimeout(10_000, () => s.destroy(new Error('connect timeout')));
      s.once('error', (e) => reject(new Error(`idle connection ${i}: ${e.message}`)));
      s.once('connect', () => {
        s.setTimeout(0);
        s.removeAllListeners('error');
        s.on('error', () => {});
        s.on('close', () => { if (!s.destroyedByUs) closedByAgent += 1; });
        // half of them send a partial request, the other half nothing
        if (i % 2) s.write('GET /whoami HTTP/1.1\r\nHost: x\r\nCookie: uid=idle\r\n');
        socks.push(s);
        resolve();
      });
    }));
    const openMs = Math.round(performance.now() - openedAt);
    const held = await h.poll(() => { const f = fdCount(pid); return f >= baseline + n * 0.99 ? f : false; },
      { attempts: 100, delayMs: 50, maxDelayMs: 200, what: `the agent to hold ${n} more fds than ${baseline}` });

    const probe = startProbe(idleAgent.url, normalUids);
    const sio = [];
    for (let i = 0; i < 6; i++) sio.push((await sioRoundTrip(env, idleAgent.url, `idle-n-${i}`, i % 2 ? ['websocket'] : ['polling'])).ms);
    await h.poll(() => probe.latencies.length >= 100, { attempts: 200, delayMs: 50, maxDelayMs: 100, what: '100 probes' });
    const p = await probe.stop();
    assert.equal(closedByAgent, 0, 'the agent closed idle connections within a minute');

    const closedAt = performance.now();
    for (const s of socks) { s.destroyedByUs = true; s.destroy(); }
    const after = await h.poll(() => { const f = fdCount(pid); return f <= baseline + 10 ? f : false; },
      { attempts: 100, delayMs: 50, maxDelayMs: 200, what: `the agent's fds back near ${baseline}` });
    const releaseMs = Math.round(performance.now() - closedAt);
    await stillServing(idleAgent, 'after the idle connections');
    assertWithinBound('idle connections', p);
    report(`idle: ${n} connections opened in ${openMs} ms (half with a partial request); agent fds ${baseline} -> ${held} -> ${after} `
      + `(${releaseMs} ms after they closed); socket.io connect+echo max ${Math.round(Math.max(...sio))} ms; ${fmtProbe(p)}`);
    await idleAgent.proc.kill('SIGKILL');
  });

  it('slowloris: one header byte per second cannot hold a connection past limits.header_timeout', async () => {
    const cfg = env.withListen(base, await h.freePort());
    cfg.limits = { header_timeout: `${SLOW_HEADER_TIMEOUT_MS}ms` };
    const slowAgent = await env.startAgent(cfg);
    const pid = slowAgent.proc.pid;
    await h.request(`${slowAgent.url}/whoami`, { agent: false, headers: { cookie: 'uid=warm' } });
    const baseline = fdCount(pid);
    const n = SLOW_CONNECTIONS;
    assert.ok(nofile() >= n + 1000, `${n} slowloris connections need RLIMIT_NOFILE >= ${n + 1000}, it is ${nofile()}`);
    const conns = [];
    const open = (i, keepAlive) => new Promise((resolve, reject) => {
      // `notBefore`: a moment no later than the start of the agent's deadline for the dribbled
      // head (taken before the connect, or before the first request of a kept-alive connection,
      // whose deadline starts after that request), so `closedAt - notBefore` can only overstate
      // how long the agent held the head, however late this busy event loop sees the events.
      const notBefore = performance.now();
      const s = net.connect(slowAgent.port, '127.0.0.1');
      const c = { s, i, keepAlive, notBefore, startedAt: null, closedAt: null, bytes: 0, got: '' };
      s.once('error', (e) => { if (c.startedAt === null) reject(e); });
      s.on('error', () => {});
      s.on('data', (d) => { c.got += d.toString('latin1'); });
      s.on('close', () => { c.closedAt = performance.now(); });
      s.once('connect', async () => {
        if (keepAlive) {
          // A normal request first; the dribbling starts with the next one on the same connection.
          c.notBefore = performance.now();
          s.write(`GET /whoami HTTP/1.1\r\nHost: x\r\nCookie: uid=ka-${i}\r\n\r\n`);
          try {
            await h.poll(() => /\r\n\r\n\{[\s\S]*\}$/.test(c.got), { attempts: 50, what: `keep-alive response ${i}` });
          } catch (e) { reject(e); return; }
        }
        c.startedAt = performance.now();
        s.write('GET /whoami HTTP/1.1\r\n');
        conns.push(c);
        resolve();
      });
    });
    await h.mapLimit(Array.from({ length: n }, (_, i) => i), 100, (i) => open(i, i < 10));
    const probe = startProbe(slowAgent.url, normalUids);
    // One header byte per second to every open connection, for at most 2.5 x the deadline.
    const header = 'X-Slowloris: abcdefghijklmnopqrstuvwxyz\r\n';
    const ticks = Math.ceil((SLOW_HEADER_TIMEOUT_MS * 2.5) / 1000);
    for (let t = 0; t < ticks && conns.some((c) => c.closedAt === null); t++) {
      await h.delay(1000); // the attack's own pace, not a synchronisation
      for (const c of conns) {
        if (c.closedAt === null) { c.s.write(header[c.bytes % header.length]); c.bytes += 1; }
      }
    }
    await h.poll(() => conns.every((c) => c.closedAt !== null), {
      attempts: 50, delayMs: 100, maxDelayMs: 200, what: 'the agent to close every slowloris connection',
    });
    const p = await probe.stop();
    const held = conns.map((c) => c.closedAt - c.startedAt).sort((a, b) => a - b);
    const heldAtLeast = conns.map((c) => c.closedAt - c.notBefore).sort((a, b) => a - b);
    const afterFds = await h.poll(() => { const f = fdCount(pid); return f <= baseline + 10 ? f : false; },
      { attempts: 100, delayMs: 50, maxDelayMs: 200, what: `the agent's fds back near ${baseline}` });
    for (const c of conns) {
      // The keep-alive ones got their first answer; none got an answer to the dribbled request.
      const answers = (c.got.match(/HTTP\/1\.1 \d{3}/g) || []).length;
      assert.equal(answers, c.keepAlive ? 1 : 0, `connection ${c.i}: ${JSON.stringify(c.got.slice(0, 200))}`);
    }
    const bytes = Math.max(...conns.map((c) => c.bytes));
    // Not before the deadline: measured from `notBefore` (see open()), lag only adds to it, so
    // no allowance is needed beyond timer rounding (a few ms).
    assert.ok(heldAtLeast[0] >= SLOW_HEADER_TIMEOUT_MS - 20,
      `a connection was closed ${Math.round(heldAtLeast[0])} ms after its connect, before the ${SLOW_HEADER_TIMEOUT_MS} ms deadline`);
    // Not held long past it: measured from when this loop saw the head begin (later than the
    // agent's start, so lag can only shorten it), with a wide allowance for the close to reach
    // this loop while it feeds 500 sockets (an agent without the deadline fails the poll above).
    assert.ok(held[held.length - 1] <= SLOW_HEADER_TIMEOUT_MS + 3000, `a connection was held ${held[held.length - 1]} ms`);
    await stillServing(slowAgent, 'after slowloris');
    assertWithinBound('slowloris', p);
    // Counted, and not logged line by line (an attack would flood the log).
    const metrics = await h.admin(slowAgent, 'GET', '/metrics');
    const counted = Number((/^gopush_header_timeouts_total (\d+)$/m.exec(metrics.text) || [])[1]);
    assert.equal(counted, n, `gopush_header_timeouts_total: ${counted}`);
    assert.doesNotMatch(slowAgent.proc.out, /header_timeout|while reading request headers/, 'cut connections were logged');
    report(`slowloris: ${n} connections (10 after a first request on keep-alive) sending a header byte per second, `
      + `up to ${bytes} bytes each: all closed ${Math.round(held[0])}-${Math.round(held[held.length - 1])} ms after their head began `
      + `(>= ${Math.round(heldAtLeast[0])} ms after the connect) `
      + `(header_timeout ${SLOW_HEADER_TIMEOUT_MS} ms), gopush_header_timeouts_total ${counted}; agent fds back to ${afterFds} (baseline ${baseline}); ${fmtProbe(p)}`);
    await slowAgent.proc.kill('SIGKILL');
  });

  it('SIGUSR1 to an agent in the foreground is ignored (it would otherwise kill it)', async () => {
    process.kill(agent.proc.pid, 'SIGUSR1');
    await agent.proc.waitForOutput(/SIGUSR1: no error log file to reopen/, 5000, 'the ignored-SIGUSR1 line');
    await stillServing(agent, 'after SIGUSR1');
  });

  it('SIGUSR1 makes a daemon reopen its error log (logrotate)', async () => {
    const cfg = env.withListen(base, await h.freePort());
    cfg.admin = { enabled: false };
    const logFile = path.join(env.dir, 'error.log');
    cfg.server.error_log = logFile;
    cfg.server.daemon_wait_for_ready = true;
    const file = env.writeConfig(cfg, 'daemon.yaml');
    const url = `http://127.0.0.1:${h.portOf(cfg.listen)}`;
    const readPid = () => {
      const t = fs.existsSync(cfg.server.pid_file) ? fs.readFileSync(cfg.server.pid_file, 'utf8').trim() : '';
      return /^\d+$/.test(t) ? Number(t) : null;
    };
    // The daemon leaves our process group: whatever happens, it is stopped by its pid. Resolves
    // how it stopped: 'SIGTERM' (it exited within the bound), 'SIGKILL' (it had to be killed),
    // or null (it was not running).
    const stopDaemon = async () => {
      const pid = readPid();
      if (!pid || !alive(pid)) return null;
      process.kill(pid, 'SIGTERM');
      try {
        await h.poll(() => !alive(pid), { attempts: 60, delayMs: 100, maxDelayMs: 200, what: 'the daemon to stop on SIGTERM' });
        return 'SIGTERM';
      } catch (_) {
        if (alive(pid)) process.kill(pid, 'SIGKILL');
        return 'SIGKILL';
      }
    };
    const starter = new h.Proc('gopush:daemon-starter', h.GOPUSH_BIN, ['run', '-d', '-c', file], { env: { RUST_LOG: 'info' } });
    env.procs.push(starter);
    let pid;
    let stoppedBy;
    try {
      // daemon_wait_for_ready: `run -d` returns once the daemon is up (systemd's Type=forking)
      const t0 = performance.now();
      const started = await h.withTimeout(starter.exitPromise, 20_000, 'gopush run -d to return once the daemon is ready');
      const readyMs = Math.round(performance.now() - t0);
      assert.equal(started.code, 0, `gopush run -d: ${JSON.stringify(started)} ${starter.tail()}`);
      pid = await h.poll(() => { const p = readPid(); return p && alive(p) ? p : false; }, { what: 'the daemon pid file' });
      await h.poll(async () => (await h.request(`${url}/whoami`, { agent: false, headers: { cookie: 'uid=up' }, timeoutMs: 1000 })).status === 200,
        { what: 'the daemon to serve' });
      const get = (uid) => h.request(`${url}/whoami`, { agent: false, headers: { cookie: `uid=${uid}` } });
      const logHas = (f, s) => fs.existsSync(f) && fs.readFileSync(f, 'utf8').includes(s);
      assert.equal((await get('before-rotate')).status, 200);
      await h.poll(() => logHas(logFile, 'before-rotate'), { what: 'the access line in the error log' });

      // logrotate: move the file, then SIGUSR1
      const rotated = `${logFile}.1`;
      fs.renameSync(logFile, rotated);
      assert.equal((await get('between')).status, 200);
      await h.poll(() => logHas(rotated, 'between'), { what: 'lines still going to the moved file before SIGUSR1' });
      process.kill(pid, 'SIGUSR1');
      await h.poll(() => logHas(logFile, 'error log reopened'), { what: 'a new error log at the original path' });
      assert.equal((await get('after-rotate')).status, 200);
      await h.poll(() => logHas(logFile, 'after-rotate'), { what: 'new lines in the new file' });
      assert.equal(logHas(rotated, 'after-rotate'), false, 'a new line went to the moved file');
      assert.ok(alive(pid), 'the daemon is still running');
      report(`daemon: \`run -d\` returned after ${readyMs} ms (daemon_wait_for_ready); SIGUSR1: after the rename, lines went to ${path.basename(rotated)} until SIGUSR1, then to a new ${path.basename(logFile)} `
        + `(${fs.readFileSync(logFile, 'utf8').split('\n').filter(Boolean).length} lines so far); the daemon kept serving`);
      stoppedBy = await stopDaemon();
    } finally {
      await stopDaemon();
    }
    // (Checked here, not in the `finally`, so that it cannot hide the failure that got us there.)
    assert.equal(stoppedBy, 'SIGTERM', 'the daemon did not stop on SIGTERM within ~10 s: it had to be SIGKILLed');
    assert.ok(!alive(pid), 'the daemon is gone');
  });
});
