// gopush route hook: which backend serves this request?
//
// `route(req, uid)` returns one of:
//   null / undefined    use the configured pools: ?product= names the pool, else `default`,
//                       and the uid is hashed onto that pool's ring (Ketama, health-checked);
//   "pool-name"         that pool's ring (e.g. a canary pool);
//   "ip:port"           this backend exactly, like the original gopush's router functions;
//   { ip, port }        the same, in the original gopush's shape.
//
// An explicit backend is outside every pool: no ring, no health check, no retry elsewhere.

module.exports = function route(req, uid) {
  // The original gopush's example: product `test` is routed by a function to its own server.
  if (req.product === 'test') {
    return { ip: '127.0.0.1', port: 4002 };
  }
  // Everything else: the default pool, hashed by uid.
  return null;
};

// More examples:
//
//   // a tenant on its own pool (pools.acme in the configuration)
//   if (req.headers.host === 'acme.example.com') return 'acme';
//
//   // some users into a canary pool
//   if (uid.endsWith('7')) return 'canary';
