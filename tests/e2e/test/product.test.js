'use strict';
// Scenario 2 (the original gopush's): `?product=test` selects the `test` pool; an empty or absent
// product selects the `default` pool.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../lib/harness');

// Six uids, three per default backend: backend ports are random, so fixed names could all land on
// one backend (about 3% of runs with six names).
const CANDIDATES = ['alice', 'bob', 'carol', 'dave', 'erin', 'frank', 'grace', 'heidi', 'ivan', 'judy',
  'user-1', 'user-2', 'user-3', 'user-4', 'user-5', 'user-6', 'user-7', 'user-8', 'user-9', 'user-10'];
let UIDS;
const TRANSPORTS = [['polling'], ['websocket'], undefined];

describe('product selects the pool', { timeout: 60_000 }, () => {
  let s;
  let ring; // uid -> default-pool addr

  before(async () => {
    s = await h.startStandard('product');
    const picked = await h.pickUids(s.agent.configFile, [s.A.addr, s.B.addr], 3, CANDIDATES);
    UIDS = [...picked.get(s.A.addr), ...picked.get(s.B.addr)];
    ring = await h.routeMap(s.agent.configFile, UIDS);
  });

  after(async () => {
    if (s) await s.env.close();
  });

  it('the route CLI sends every uid of product test to the test backend', async () => {
    const t = await h.routeMap(s.agent.configFile, UIDS, 'test');
    for (const [uid, addr] of t) assert.equal(addr, s.T.addr, `route ${uid} --product test`);
    assert.equal(new Set(ring.values()).size, 2, 'sample uids should cover both default backends');
  });

  it('?product=test lands on the test pool backend (every transport)', async () => {
    for (const transports of TRANSPORTS) {
      for (const uid of UIDS) {
        const { socket, hello } = await s.env.connect(s.agent.url, {
          transports, query: { uid, product: 'test' },
        });
        socket.close();
        assert.equal(hello.port, s.T.port, `uid ${uid} product=test transports=${transports}: landed on ${hello.port}`);
        assert.equal(hello.uid, uid);
      }
    }
  });

  it('?product=test with the uid in a cookie lands on the test backend', async () => {
    for (const uid of UIDS) {
      const { socket, hello } = await s.env.connect(s.agent.url, {
        transports: ['polling'], query: { product: 'test' }, extraHeaders: { cookie: `uid=${uid}` },
      });
      socket.close();
      assert.equal(hello.port, s.T.port);
      assert.equal(hello.uid, uid);
    }
  });

  it('empty product and absent product use the default pool', async () => {
    for (const product of ['', undefined]) {
      for (const transports of TRANSPORTS) {
        for (const uid of UIDS) {
          const query = product === undefined ? { uid } : { uid, product };
          const { socket, hello } = await s.env.connect(s.agent.url, { transports, query });
          socket.close();
          assert.equal(hello.port, h.portOf(ring.get(uid)),
            `uid ${uid} product=${JSON.stringify(product)} transports=${transports}: landed on ${hello.port}, ring says ${ring.get(uid)}`);
        }
      }
    }
  });

  it('plain HTTP follows the same pools (GET /whoami)', async () => {
    for (const uid of UIDS) {
      const t = await h.httpGet(`${s.agent.url}/whoami?product=test`, { headers: { cookie: `uid=${uid}` } });
      assert.equal(t.status, 200, t.body);
      assert.equal(JSON.parse(t.body).port, s.T.port);
      const d = await h.httpGet(`${s.agent.url}/whoami?product=`, { headers: { cookie: `uid=${uid}` } });
      assert.equal(d.status, 200, d.body);
      assert.equal(JSON.parse(d.body).port, h.portOf(ring.get(uid)));
    }
  });
});
