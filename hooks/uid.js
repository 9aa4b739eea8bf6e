// gopush uid hook: who is this request for?
//
// Called for every plain HTTP request *and* every WebSocket upgrade (the original gopush had two
// hooks for that, `agent` and `onupgrade`; here one does both). Return the uid as a string (or a
// number), or null/undefined when the request has none: gopush then answers 430, as before.
//
// `req` is read-only: method, path, url, query, cookies, headers (lower-case names), ip (after
// trusted_proxies), product. Values in `query` and `cookies` are decoded, like Express did.
// There is no require(), filesystem, network or timer; console.log writes to the agent's log.
// A hook that throws fails only its own request (430 by default: hooks.on_throw.uid).

module.exports = function uid(req) {
  // The original gopush's default: the `uid` cookie, else ?uid= in the URL.
  return req.cookies.uid || req.query.uid || null;
};

// Variants (replace the function above):
//
// A session cookie with a prefix, e.g. `sid=u:42:2f9c...`:
//
//   module.exports = function uid(req) {
//     const sid = req.cookies.sid || '';
//     if (!sid.startsWith('u:')) return null;
//     return sid.split(':')[1];
//   };
//
// Signed tokens (JWT): QuickJS has no crypto, and verifying signatures in JS would be slow and
// easy to get wrong. Use the declarative `jwt` uid source instead of a uid hook; it is verified
// in Rust and works for WebSocket upgrades (token in the query). In conf/*.yaml:
//
//   uid:
//     sources:
//       - jwt:
//           from: query          # cookie | query | header (a `Bearer ` prefix is removed)
//           name: token
//           key: ${JWT_SECRET}   # or key_file: jwt-public.pem for RS256 / ES256
//           alg: HS256           # the only algorithm accepted
//           claim: sub           # the uid (and the hash key)
//
// and connect with io("https://host", { query: { token } }).
