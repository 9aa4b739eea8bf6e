#!/usr/bin/env node
'use strict';
// A real Socket.IO v4 backend for the gopush end-to-end tests.
//
//   node lib/backend.js --port P --redis redis://127.0.0.1:RP [--adapter sharded] [--ping-interval MS] [--ping-timeout MS]
//   node lib/backend.js --port P --redis-cluster redis://127.0.0.1:N1,redis://127.0.0.1:N2 [--adapter sharded]
//     (a Redis Cluster through node-redis's createCluster, the listed nodes as seeds)
//
// It prints `listening <port>` on stdout once the HTTP server accepts connections and the
// Redis adapter is connected; the test harness waits for that line.
//
// Socket.IO behaviour (mirrors the original gopush backends, plus a few probes for tests):
//   on connect   -> emits `port` (its own port number) and `hello`
//                   {port, uid, header, query, url, headers, sid, transport}
//                   and joins room `uid:<uid>`
//   `room`       -> ({room, event, ...data}, ack?) joins `room`; if `event` is set, emits `event` with `data`
//                   to the other members of the room (across backends, through the Redis adapter)
//   `echo`       -> (arg, ack) acks `arg` unchanged
//   `whoami`     -> (ack) acks {port, sid, uid, transport}
//   `ticks`      -> ({count, every}, ack?) emits `tick` {n, port} `count` times every `every` ms
// Plain HTTP:
//   GET /whoami  -> JSON {port, uid_query, uid_header, headers, url}
//   GET /open-packet?echo=S -> a body shaped like an Engine.IO open packet naming sid S (a page
//                   that echoes client input: what an attacker could make a backend answer)

const http = require('node:http');
const { URL } = require('node:url');
const { Server } = require('socket.io');
const { createClient, createCluster } = require('redis');
const { createAdapter, createShardedAdapter } = require('@socket.io/redis-adapter');

function parseArgs(argv) {
  const out = {};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (!a.startsWith('--')) throw new Error(`unexpected argument ${a}`);
    const key = a.slice(2);
    const val = argv[i + 1];
    if (val === undefined || val.startsWith('--')) throw new Error(`missing value for ${a}`);
    out[key] = val;
    i++;
  }
  return out;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const port = Number(args.port);
  if (!Number.isInteger(port) || port <= 0) throw new Error('--port P is required');
  const host = args.host || '127.0.0.1';

  const httpServer = http.createServer((req, res) => {
    const url = new URL(req.url, 'http://backend');
    if (req.method === 'GET' && url.pathname === '/whoami') {
      const body = JSON.stringify({
        port,
        host,
        uid_query: url.searchParams.getAll('uid').length > 1
          ? url.searchParams.getAll('uid')
          : url.searchParams.get('uid'),
        uid_header: req.headers['x-gopush-uid'] === undefined ? null : req.headers['x-gopush-uid'],
        headers: req.headers,
        url: req.url,
      });
      res.writeHead(200, {
        'content-type': 'application/json',
        'content-length': Buffer.byteLength(body),
      });
      res.end(body);
      return;
    }
    if (req.method === 'GET' && url.pathname === '/open-packet') {
      const body = `0${JSON.stringify({
        sid: url.searchParams.get('echo') || '', upgrades: ['websocket'], pingInterval: 25000, pingTimeout: 20000,
      })}`;
      res.writeHead(200, { 'content-type': 'text/plain; charset=UTF-8', 'content-length': Buffer.byteLength(body) });
      res.end(body);
      return;
    }
    res.writeHead(404, { 'content-type': 'text/plain' });
    res.end(`backend ${port}: not found\n`);
  });
  httpServer.keepAliveTimeout = 65_000;

  const opts = { cors: { origin: true, credentials: true } };
  if (args['ping-interval']) opts.pingInterval = Number(args['ping-interval']);
  if (args['ping-timeout']) opts.pingTimeout = Number(args['ping-timeout']);
  const io = new Server(httpServer, opts);

  let pub = null;
  let sub = null;
  if (args.redis || args['redis-cluster']) {
    // A cluster client routes SSUBSCRIBE / SPUBLISH to the shard owning each channel's slot and
    // re-subscribes when a slot moves (the server's SUNSUBSCRIBE push).
    pub = args['redis-cluster']
      ? createCluster({ rootNodes: args['redis-cluster'].split(',').map((url) => ({ url })) })
      : createClient({ url: args.redis });
    sub = pub.duplicate();
    for (const c of [pub, sub]) {
      c.on('error', (err) => console.error(`backend ${port}: redis error: ${err.message}`));
    }
    await Promise.all([pub.connect(), sub.connect()]);
    // --adapter sharded: Redis 7 sharded pub/sub (SPUBLISH/SSUBSCRIBE), as `push.adapter: sharded`.
    io.adapter(args.adapter === 'sharded' ? createShardedAdapter(pub, sub) : createAdapter(pub, sub));
    // Make sure our own subscriptions are active before announcing readiness, so that a room
    // broadcast published right after start-up is not missed (bounded: ~2 s).
    let ok = false;
    for (let i = 0; i < 100 && !ok; i++) {
      ok = (await io.of('/').adapter.serverCount()) >= 1;
      if (!ok) await new Promise((r) => setTimeout(r, 20));
    }
    if (!ok) throw new Error('redis adapter subscriptions not active after 2 s');
  }

  io.on('connection', (socket) => {
    const q = socket.handshake.query;
    const uid = q.uid;
    const header = socket.handshake.headers['x-gopush-uid'];
    socket.emit('port', port);
    socket.emit('hello', {
      port,
      host,
      uid,
      header,
      query: q,
      url: socket.handshake.url,
      headers: socket.handshake.headers,
      sid: socket.conn.id,
      transport: socket.conn.transport.name,
    });
    if (uid !== undefined) socket.join(`uid:${uid}`);

    socket.on('room', (payload, ack) => {
      const { room, event, ...data } = payload || {};
      if (room !== undefined) socket.join(room);
      if (event) socket.to(room).emit(event, data);
      if (typeof ack === 'function') ack({ ok: true, port, room });
    });

    socket.on('echo', (arg, ack) => {
      if (typeof ack === 'function') ack(arg);
    });

    // Every socket of the Socket.IO cluster (across backends through the Redis adapter), so a
    // test can see that a backend let go of a socket that the agent closed.
    socket.on('sockets', async (ack) => {
      if (typeof ack !== 'function') return;
      const all = await io.fetchSockets();
      ack(all.map((s) => ({ id: s.id, uid: s.handshake.query.uid, sid: s.conn && s.conn.id })));
    });

    socket.on('whoami', (ack) => {
      if (typeof ack === 'function') {
        ack({ port, sid: socket.conn.id, uid, transport: socket.conn.transport.name });
      }
    });

    socket.on('ticks', (payload, ack) => {
      const count = Math.min(Number(payload && payload.count) || 1, 1000);
      const every = Math.max(Number(payload && payload.every) || 100, 10);
      let n = 0;
      const t = setInterval(() => {
        if (!socket.connected) { clearInterval(t); return; }
        socket.emit('tick', { n: n++, port });
        if (n >= count) clearInterval(t);
      }, every);
      if (typeof ack === 'function') ack({ ok: true, port });
    });
  });

  await new Promise((resolve, reject) => {
    httpServer.once('error', reject);
    httpServer.listen(port, host, resolve);
  });
  process.stdout.write(`listening ${port}\n`);

  const shutdown = () => {
    io.close();
    Promise.allSettled([pub && pub.quit(), sub && sub.quit()]).finally(() => process.exit(0));
    setTimeout(() => process.exit(0), 1000).unref();
  };
  process.on('SIGTERM', shutdown);
  process.on('SIGINT', shutdown);
}

main().catch((err) => {
  console.error(`backend: fatal: ${err && err.stack ? err.stack : err}`);
  process.exit(1);
});
