// gopush admin hook: may this request use the admin console?
//
// Return true to let it in, false to refuse. Anything else, or a throw, refuses.

module.exports = function admin(req) {
  // Only from this machine. Behind a proxy, list it in `trusted_proxies` so that req.ip is
  // the client's address rather than the proxy's.
  return req.ip === '127.0.0.1' || req.ip === '::1';
};
