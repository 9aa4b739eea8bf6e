'use strict';
// The access log (issue 15, claim 7): one line per request and one per WebSocket tunnel when it
// closes, target `gopush::access`. The default text format writes `key=value` fields; with
// `access_log.format: json` every line is one JSON object carrying every documented field
// (README "Access log format"; src/access_log.rs). The uid logged is the canonical one: a request
// with `?uid=b%6Fb` logs `bob`.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const WebSocket = require('ws');
const h = require('../lib/harness');

const FIELDS = ['timestamp', 'level', 'target', 'method', 'path', 'status', 'uid', 'pool', 'backend',
  'affinity', 'tunnel', 'ms', 'bytes'];

/** `key=value` fields of a text line (values unquoted; quoted ones JSON-decoded). */
function textFields(line) {
  const out = {};
  const body = line.slice(line.indexOf('gopush::access:') + 'gopush::access:'.length);
  for (const m of body.matchAll(/(\w+)=("(?:[^"\\]|\\.)*"|\S+)/g)) {
    out[m[1]] = m[2].startsWith('"') ? JSON.parse(m[2]) : m[2];
  }
  return out;
}

/** Opens a raw Engine.IO WebSocket, joins `/`, waits for the backend's `port` event, closes. */
function tunnelOnce(url, query) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`${url.replace(/^http/, 'ws')}/socket.io/?EIO=4&transport=websocket&${query}`,
      { perMessageDeflate: false });
    const timer = setTimeout(() => { ws.terminate(); reject(new Error('no port event over the tunnel')); }, 5000);
    let port = null;
    ws.on('message', (data) => {
      const s = data.toString();
      if (s.startsWith('0{')) ws.send('40');
      if (s.startsWith('42["port"')) {
        port = JSON.parse(s.slice(2))[1];
        ws.close(1000);
      }
    });
    ws.on('close', () => { clearTimeout(timer); resolve(port); });
    ws.on('error', (err) => { clearTimeout(timer); reject(err); });
  });
}

describe('access log', { timeout: 60_000 }, () => {
  let env;
  let A;
  let B;
  let dead; // a port nothing listens on: its pool's requests fail with an error
  let text;
  let json;

  before(async () => {
    env = new h.TestEnv('access');
    await env.startRedis();
    [A, B] = await env.startBackends(2);
    dead = await h.freePort();
    const pools = { default: [A.addr, B.addr], dead: [`127.0.0.1:${dead}`] };
    const common = { pools, healthCheck: { kind: 'none' }, sources: [{ query: 'uid' }] };
    text = await env.startAgent(env.makeConfig({ port: await h.freePort(), ...common }));
    json = await env.startAgent(env.makeConfig({ port: await h.freePort(), ...common, extra: { access_log: { format: 'json' } } }));
  });

  after(async () => {
    if (env) await env.close();
  });

  /** The access lines an agent has written so far, parsed by `parse`. */
  const accessLines = (agent, parse) => agent.proc.out.split('\n').filter((l) => l.includes('gopush::access')).map(parse);

  /** Waits for the access line matching `pred` (bounded: the writer is a background thread). */
  const lineFor = (agent, parse, pred, what) => h.poll(() => accessLines(agent, parse).find(pred),
    { attempts: 40, delayMs: 25, maxDelayMs: 200, what: `the access line for ${what}` });

  /** A request, a failing request and a closed tunnel through `agent`; returns what each should log. */
  const traffic = async (agent) => {
    const r = await h.httpGet(`${agent.url}/whoami?uid=b%6Fb&tag=${agent.port}`);
    assert.equal(r.status, 200, r.body);
    const who = JSON.parse(r.body);
    const failed = await h.httpGet(`${agent.url}/whoami?uid=carol&product=dead`);
    assert.equal(failed.status, 503, `a request to a refusing backend: ${failed.status} ${failed.body}`);
    const port = await tunnelOnce(agent.url, 'uid=t%75nnel');
    assert.ok(port === A.port || port === B.port, `tunnel landed on ${port}`);
    return { who, bytes: Buffer.byteLength(r.body), tunnelPort: port };
  };

  it('text (the default): key=value lines for a request, a failed request and a closed tunnel', async () => {
    const t = await traffic(text);
    const req = await lineFor(text, textFields, (f) => f.path === '/whoami' && f.uid === 'bob', 'GET /whoami?uid=b%6Fb');
    assert.deepEqual(
      { method: req.method, status: req.status, uid: req.uid, pool: req.pool, backend: req.backend, affinity: req.affinity, tunnel: req.tunnel, bytes: req.bytes },
      { method: 'GET', status: '200', uid: 'bob', pool: 'default', backend: `127.0.0.1:${t.who.port}`, affinity: 'false', tunnel: 'false', bytes: String(t.bytes) },
    );
    assert.match(req.ms, /^\d+(\.\d+)?$/, `ms=${req.ms}`);
    assert.equal(req.error, undefined, 'no error field on a good request');
    const fail = await lineFor(text, textFields, (f) => f.uid === 'carol', 'the failed request');
    assert.deepEqual([fail.status, fail.pool, fail.backend], ['503', 'dead', `127.0.0.1:${dead}`]);
    assert.ok(fail.error && fail.error.length > 0, `the failed request names its error: ${JSON.stringify(fail)}`);
    const tun = await lineFor(text, textFields, (f) => f.uid === 'tunnel', 'the closed tunnel');
    assert.deepEqual(
      { method: tun.method, path: tun.path, status: tun.status, tunnel: tun.tunnel, backend: tun.backend, pool: tun.pool },
      { method: 'GET', path: '/socket.io/', status: '101', tunnel: 'true', backend: `127.0.0.1:${t.tunnelPort}`, pool: 'default' },
    );
    assert.ok(Number(tun.bytes) > 0, `a tunnel that carried frames logs bytes=${tun.bytes}`);
    assert.match(tun.ms, /^\d+(\.\d+)?$/);
    assert.doesNotMatch(text.proc.out, /^\{/m, 'a JSON line in the text log');
  });

  it('json: every line one JSON object with every documented field', async () => {
    const t = await traffic(json);
    const lines = json.proc.out.split('\n').filter((l) => l.trim());
    for (const l of lines) assert.doesNotThrow(() => JSON.parse(l), `not a JSON line: ${l}`);
    const req = await lineFor(json, JSON.parse, (f) => f.path === '/whoami' && f.uid === 'bob', 'GET /whoami?uid=b%6Fb');
    for (const k of FIELDS) assert.ok(k in req, `field ${k} missing: ${JSON.stringify(req)}`);
    assert.deepEqual(
      { level: req.level, target: req.target, method: req.method, path: req.path, status: req.status, uid: req.uid, pool: req.pool,
        backend: req.backend, affinity: req.affinity, tunnel: req.tunnel, bytes: req.bytes },
      { level: 'INFO', target: 'gopush::access', method: 'GET', path: '/whoami', status: 200, uid: 'bob', pool: 'default',
        backend: `127.0.0.1:${t.who.port}`, affinity: false, tunnel: false, bytes: t.bytes },
    );
    assert.equal(typeof req.ms, 'number');
    assert.ok(req.ms >= 0);
    assert.ok(!Number.isNaN(Date.parse(req.timestamp)), `timestamp ${req.timestamp}`);
    assert.equal(req.error, undefined);
    const fail = await lineFor(json, JSON.parse, (f) => f.uid === 'carol', 'the failed request');
    assert.deepEqual([fail.status, fail.pool, fail.backend], [503, 'dead', `127.0.0.1:${dead}`]);
    assert.equal(typeof fail.error, 'string', `error field: ${JSON.stringify(fail)}`);
    const tun = await lineFor(json, JSON.parse, (f) => f.uid === 'tunnel', 'the closed tunnel');
    for (const k of FIELDS) assert.ok(k in tun, `field ${k} missing on the tunnel line: ${JSON.stringify(tun)}`);
    assert.deepEqual([tun.status, tun.tunnel, tun.path, tun.backend], [101, true, '/socket.io/', `127.0.0.1:${t.tunnelPort}`]);
    assert.ok(tun.bytes > 0);

    // affinity: a polling session's later requests come from the sid memory.
    const { socket, hello } = await env.connect(json.url, { transports: ['polling'], query: { uid: 'dave' } });
    assert.deepEqual(await h.emitAck(socket, 'echo', 1), 1);
    const aff = await lineFor(json, JSON.parse, (f) => f.uid === 'dave' && f.affinity === true, 'a request of a known session');
    assert.equal(aff.backend, `127.0.0.1:${hello.port}`);
    socket.close();
  });
});
