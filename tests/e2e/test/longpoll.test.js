'use strict';
// Long-polls are never cut by the agent (README: Pingora's 60 s read/write timeouts do not apply
// to a held poll): a Socket.IO backend with pingInterval 70 s holds an idle client's long-poll
// GET for 70 s, past those 60 s, before it answers with the ping. The client must get that
// ping on the same session, with no disconnect, and its session must keep working.
//
// About 75 s of waiting: the npm script runs two files at once, so this overlaps other files
// instead of adding to the suite's time.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../lib/harness');

const PING_INTERVAL_MS = 70_000;

describe('a long-poll held past 60 s', { timeout: 150_000 }, () => {
  let env;
  let agent;

  before(async () => {
    env = new h.TestEnv('longpoll');
    const A = await env.startBackend({ pingInterval: PING_INTERVAL_MS, pingTimeout: 20_000 });
    agent = await env.startAgent(env.makeConfig({ port: await h.freePort(), pools: { default: [A.addr] } }));
  });

  after(async () => {
    if (env) await env.close();
  });

  it('completes when the backend answers after 70 s: same session, no disconnect', async () => {
    const { socket } = await env.connect(agent.url, { transports: ['polling'], query: { uid: 'patient' } });
    const sid = socket.io.engine.id;
    const disconnects = [];
    socket.on('disconnect', (reason) => disconnects.push(reason));
    // The handshake's last exchange: from here on the client's next GET is held until the ping.
    assert.deepEqual(await h.emitAck(socket, 'echo', 'start', 5000), 'start');
    const idleFrom = performance.now();
    const pinged = await h.withTimeout(new Promise((resolve, reject) => {
      socket.io.engine.once('ping', () => resolve(performance.now()));
      socket.once('disconnect', (reason) => reject(new Error(
        `the session was cut after ${Math.round(performance.now() - idleFrom)} ms of waiting for the ping: ${reason}`)));
    }), PING_INTERVAL_MS + 30_000, 'the backend\'s ping, answered to the held long-poll');
    const heldMs = Math.round(pinged - idleFrom);
    assert.ok(heldMs >= 60_000, `the ping came ${heldMs} ms after the last exchange: the poll was not held past 60 s`);
    assert.deepEqual(disconnects, [], 'the session was cut');
    assert.equal(socket.io.engine.id, sid, 'a new session was made');
    assert.equal(socket.io.engine.transport.name, 'polling');
    assert.deepEqual(await h.emitAck(socket, 'echo', 'after', 5000), 'after');
    process.stdout.write(`# longpoll: a poll held ${heldMs} ms (pingInterval ${PING_INTERVAL_MS} ms) completed with the ping\n`);
    socket.close();
  });
});
