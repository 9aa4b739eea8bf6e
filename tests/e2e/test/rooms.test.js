'use strict';
// Scenario 3: a room message crosses backends. Client X sits on backend A, client Y on backend B
// (uids chosen with `gopush route`), both join room r1 through the agent, X emits to the room and
// Y receives it (the Redis adapter carries it from A to B).

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../lib/harness');

const CANDIDATES = ['alice', 'bob', 'carol', 'dave', 'erin', 'frank', 'grace', 'heidi', 'ivan', 'judy',
  'user-1', 'user-2', 'user-3', 'user-4', 'user-5', 'user-6', 'user-7', 'user-8'];

describe('room messages across backends', { timeout: 60_000 }, () => {
  let s;
  let onA;
  let onB;

  before(async () => {
    s = await h.startStandard('rooms');
    const picked = await h.pickUids(s.agent.configFile, [s.A.addr, s.B.addr], 2, CANDIDATES);
    onA = picked.get(s.A.addr);
    onB = picked.get(s.B.addr);
  });

  after(async () => {
    if (s) await s.env.close();
  });

  const cases = [
    { name: 'both default transports', x: {}, y: {} },
    { name: 'X websocket only, Y polling only', x: { transports: ['websocket'] }, y: { transports: ['polling'] } },
  ];

  cases.forEach((c, idx) => {
    it(`X on A and Y on B exchange a room message (${c.name})`, async () => {
      const room = `r1`;
      const xu = onA[idx];
      const yu = onB[idx];
      const X = await s.env.connect(s.agent.url, { ...c.x, extraHeaders: { cookie: `uid=${xu}` } });
      const Y = await s.env.connect(s.agent.url, { ...c.y, query: { uid: yu } });
      try {
        assert.equal(X.hello.port, s.A.port, `X (${xu}) should be on A`);
        assert.equal(Y.hello.port, s.B.port, `Y (${yu}) should be on B`);

        const yJoin = await h.emitAck(Y.socket, 'room', { room });
        assert.equal(yJoin.port, s.B.port);
        const xJoin = await h.emitAck(X.socket, 'room', { room });
        assert.equal(xJoin.port, s.A.port);

        // X -> Y
        const yGot = h.once(Y.socket, 'msg', 5000, `Y to receive 'msg' from X via ${room}`);
        await h.emitAck(X.socket, 'room', { room, event: 'msg', text: `hi-${idx}` });
        assert.deepEqual(await yGot, { text: `hi-${idx}` });

        // Y -> X
        const xGot = h.once(X.socket, 'msg', 5000, `X to receive 'msg' from Y via ${room}`);
        await h.emitAck(Y.socket, 'room', { room, event: 'msg', text: `re-${idx}` });
        assert.deepEqual(await xGot, { text: `re-${idx}` });
      } finally {
        X.socket.close();
        Y.socket.close();
      }
    });
  });

  it('the original gopush flow: emit `room` without ack, the other side receives', async () => {
    const X = await s.env.connect(s.agent.url, { extraHeaders: { cookie: `uid=${onA[0]}` } });
    const Y = await s.env.connect(s.agent.url, { extraHeaders: { cookie: `uid=${onB[0]}` } });
    try {
      assert.notEqual(X.hello.port, Y.hello.port);
      await h.emitAck(Y.socket, 'room', { room: 'r1' });
      const yGot = h.once(Y.socket, 'msg', 5000, "Y to receive 'msg'");
      X.socket.emit('room', { room: 'r1', event: 'msg', text: 'hi' });
      assert.deepEqual(await yGot, { text: 'hi' });
    } finally {
      X.socket.close();
      Y.socket.close();
    }
  });
});
