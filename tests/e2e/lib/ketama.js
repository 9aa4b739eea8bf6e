'use strict';
// Reference model of nginx's `hash $key consistent` (ngx_http_upstream_hash_module, Ketama):
// used by the tests for diagnostics only (the assertions compare real nginx with the real agent).
//
// For each server "host:port" (as written in the config) with weight w, 160*w points are made:
//   base = crc32 state over host, "\0", port
//   prev = 0; repeat: h = crc32(base || prev as 4 little-endian bytes); point(h); prev = h
// Points are sorted by hash (duplicates dropped). A key maps to the first point whose hash is
// >= crc32(key), wrapping around to the first point.

const TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

function crc32(buf) {
  let c = 0xffffffff;
  for (let i = 0; i < buf.length; i++) c = TABLE[(c ^ buf[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function splitServer(server) {
  let j = 0;
  for (; j < server.length; j++) {
    const c = server[server.length - j - 1];
    if (c === ':') return [server.slice(0, server.length - j - 1), server.slice(server.length - j)];
    if (c < '0' || c > '9') break;
  }
  return [server, ''];
}

/** servers: ["127.0.0.1:4000", ...] or [{addr, weight}] -> continuum */
function buildContinuum(servers) {
  const points = [];
  for (const s of servers) {
    const addr = typeof s === 'string' ? s : s.addr;
    const weight = typeof s === 'string' ? 1 : (s.weight || 1);
    const [host, port] = splitServer(addr);
    const base = Buffer.concat([Buffer.from(host), Buffer.from([0]), Buffer.from(port)]);
    const prev = Buffer.alloc(4);
    for (let j = 0; j < 160 * weight; j++) {
      const h = crc32(Buffer.concat([base, prev]));
      points.push({ hash: h, addr });
      prev.writeUInt32LE(h, 0);
    }
  }
  points.sort((a, b) => a.hash - b.hash);
  const dedup = [];
  for (const p of points) if (!dedup.length || dedup[dedup.length - 1].hash !== p.hash) dedup.push(p);
  return dedup;
}

/** The server address a key (string or Buffer: raw bytes) maps to. */
function lookup(continuum, key) {
  const h = crc32(Buffer.isBuffer(key) ? key : Buffer.from(String(key)));
  let lo = 0;
  let hi = continuum.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (continuum[mid].hash < h) lo = mid + 1; else hi = mid;
  }
  return continuum[lo % continuum.length].addr;
}

module.exports = { crc32, buildContinuum, lookup };
