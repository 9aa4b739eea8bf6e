'use strict';
// Preloaded into the Node backends by run.sh (`node -r benches/backlog.js tests/e2e/lib/backend.js`):
// makes their listen backlog BENCH_BACKEND_BACKLOG (run.sh: 4096) instead of Node's 511.
//
// Why: in the connect storm (2,000 clients at once) a 511-entry accept queue overflows while
// Node is busy with handshakes; the kernel then drops SYNs, the client or proxy retransmits after
// 1 s, and the storm measures the backend's accept queue and the proxies' connect-timeout policy
// rather than the proxies. 0 keeps Node's default (to reproduce exactly that).
const net = require('node:net');

const backlog = Number(process.env.BENCH_BACKEND_BACKLOG || 0);
if (backlog > 0) {
  const listen = net.Server.prototype.listen;
  net.Server.prototype.listen = function listenWithBacklog(...args) {
    // backend.js calls listen(port, host, callback); other shapes pass through untouched.
    if (typeof args[0] === 'number' && typeof args[1] === 'string' && typeof args[2] === 'function') {
      return listen.call(this, { port: args[0], host: args[1], backlog }, args[2]);
    }
    return listen.apply(this, args);
  };
}
