'use strict';
// Scenario 1: a uid always lands on the same backend (the one the Ketama ring / `gopush route`
// names), over every Socket.IO transport, with the uid in a cookie or in the query, and two
// separate agent processes with the same config agree.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../lib/harness');

const CANDIDATES = ['alice', 'bob', 'carol', 'dave', 'erin', 'frank', 'grace', 'heidi', 'ivan', 'judy',
  'mallet', 'niaj', 'olivia', 'peggy', 'rupert', 'sybil', 'trent', 'victor', 'walter', 'user-1',
  'user-2', 'user-3', 'user-4', 'user-5', 'user-6', 'user-7', 'user-8', 'user-9', '42', '1001'];

const MODES = [
  { name: 'polling only', opts: { transports: ['polling'] }, expectTransport: 'polling' },
  { name: 'websocket only', opts: { transports: ['websocket'] }, expectTransport: 'websocket' },
  { name: 'default (polling -> websocket upgrade)', opts: {}, expectTransport: 'polling', upgrade: true },
];

const UID_VIA = [
  { name: 'cookie', opts: (uid) => ({ extraHeaders: { cookie: `uid=${uid}` } }) },
  { name: 'query', opts: (uid) => ({ query: { uid } }) },
];

describe('a uid always lands on the same backend', { timeout: 120_000 }, () => {
  let s; // {env, A, B, T, agent}
  let byBackend; // Map addr -> [uid, uid, uid]
  let sample; // [{uid, addr}]

  before(async () => {
    s = await h.startStandard('routing');
    byBackend = await h.pickUids(s.agent.configFile, [s.A.addr, s.B.addr], 3, CANDIDATES);
    sample = [...byBackend].flatMap(([addr, uids]) => uids.map((uid) => ({ uid, addr })));
  });

  after(async () => {
    if (s) await s.env.close();
  });

  it('the route CLI is deterministic and spreads uids over both default backends', async () => {
    const first = await h.routeMap(s.agent.configFile, CANDIDATES);
    const second = await h.routeMap(s.agent.configFile, CANDIDATES);
    assert.deepEqual([...second], [...first], 'gopush route gave different answers for the same uid');
    const used = new Set(first.values());
    assert.deepEqual([...used].sort(), [s.A.addr, s.B.addr].sort(),
      'the route CLI should use exactly the two default backends for these uids');
  });

  for (const mode of MODES) {
    for (const via of UID_VIA) {
      it(`${mode.name}, uid via ${via.name}: 3 connects per uid hit the ring's backend`, async () => {
        for (const { uid, addr } of sample) {
          const expected = h.portOf(addr);
          for (let i = 0; i < 3; i++) {
            const { socket, hello } = await s.env.connect(s.agent.url, { ...mode.opts, ...via.opts(uid) });
            try {
              assert.equal(hello.port, expected, `uid ${uid} (connect #${i + 1}) landed on ${hello.port}, ring says ${addr}`);
              assert.equal(hello.uid, uid, 'backend handshake query uid');
              assert.equal(hello.header, uid, 'backend x-gopush-uid header');
              assert.equal(hello.transport, mode.expectTransport);
              if (mode.upgrade) {
                await h.waitUpgraded(socket);
                const me = await h.emitAck(socket, 'whoami');
                assert.equal(me.transport, 'websocket', 'session should have upgraded to websocket');
                assert.equal(me.port, expected, 'upgraded session must stay on the same backend');
                assert.equal(me.sid, hello.sid, 'upgrade must continue the same engine.io session');
              } else {
                const me = await h.emitAck(socket, 'echo', { uid, i });
                assert.deepEqual(me, { uid, i });
              }
            } finally {
              socket.close();
            }
          }
        }
      });
    }
  }

  it('a query uid with URL-reserved characters reaches the backend as the client sent it', async () => {
    // socket.io-client percent-encodes query values; a backend reached directly decodes them back
    // (handshake.query.uid === uid). Through the agent the backend must see the same uid.
    for (const uid of ['a@b.com', 'user name', 'x/y', 'plain']) {
      const { socket, hello } = await s.env.connect(s.agent.url, { transports: ['polling'], query: { uid } });
      socket.close();
      const direct = await h.connect(`http://127.0.0.1:${hello.port}`, { transports: ['polling'], query: { uid } });
      direct.socket.close();
      assert.equal(direct.hello.uid, uid, 'sanity: direct connection');
      assert.equal(hello.uid, uid, `backend handshake query uid via the agent (url ${hello.url})`);
    }
  });

  it('two agent processes with the same config agree for 50 uids (and with gopush route)', async () => {
    const port2 = await h.freePort();
    const agent2 = await s.env.startAgent(s.env.withListen(s.cfg, port2));

    const uids = Array.from({ length: 50 }, (_, i) => `user-${i}-${(i * 2654435761 >>> 0).toString(36)}`);
    const ring = await h.routeMap(s.agent.configFile, uids);
    const ring2 = await h.routeMap(agent2.configFile, uids);
    assert.deepEqual([...ring2], [...ring], 'route CLI differs between the two (equivalent) config files');

    const via = async (agent, uid) => {
      const { socket, hello } = await s.env.connect(agent.url, { transports: ['polling'], extraHeaders: { cookie: `uid=${uid}` } });
      socket.close();
      return hello.port;
    };
    const ports1 = await h.mapLimit(uids, 8, (uid) => via(s.agent, uid));
    const ports2 = await h.mapLimit(uids, 8, (uid) => via(agent2, uid));
    const diffs = [];
    uids.forEach((uid, i) => {
      const want = h.portOf(ring.get(uid));
      if (ports1[i] !== want || ports2[i] !== want) diffs.push({ uid, ring: ring.get(uid), agent1: ports1[i], agent2: ports2[i] });
    });
    assert.deepEqual(diffs, [], 'agents disagree with each other or with the route CLI');
    assert.equal(new Set(ports1).size, 2, '50 uids should use both backends');
  });
});
