// gopush admin hook: may this request use the admin console?
//
// Return true to let it in, false to refuse. Anything else, or a throw, refuses.
//
// Decide by a secret that only the operator has, never by the address alone. A web page open in
// a browser on this machine can point its own name at 127.0.0.1 (DNS rebinding) and then call the
// admin listener: its requests come from 127.0.0.1 just like yours, and carry whatever headers
// and cookies that page chooses. So `req.ip === '127.0.0.1'` admits it. (gopush also refuses a
// `Host` that is a name rather than an IP address unless admin.token is set, but the hook is
// your authentication: make it check something such a page cannot send.)
//
// Simplest and best: set `admin.token: ${GOPUSH_ADMIN_TOKEN}` in the configuration; gopush then
// checks `Authorization: Bearer TOKEN` before this hook runs, and the hook only adds rules (for
// example `return req.ip.startsWith('10.');` behind `trusted_proxies`).
//
// Without admin.token, this example admits `Authorization: Bearer SECRET`, which is what the
// admin page sends after you type SECRET into its login box (and `curl -H 'Authorization:
// Bearer SECRET'`). Put a long random string below and keep this file readable by the agent
// only. While it is empty, everybody is refused.
const SECRET = '';

// Compares without stopping at the first difference (the time taken does not tell how much
// of a guess was right).
function same(a, b) {
  if (a.length !== b.length) return false;
  let diff = 0;
  for (let i = 0; i < a.length; i++) diff |= a.charCodeAt(i) ^ b.charCodeAt(i);
  return diff === 0;
}

module.exports = function admin(req) {
  if (SECRET.length < 16) return false; // not set up yet: nobody
  return same(req.headers.authorization || '', 'Bearer ' + SECRET);
};
