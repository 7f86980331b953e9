// Unit tests of the simulator's part of Twilio's REST API (scripts/sim/rest.mjs), served on
// the stand-in's port under /twilio: the call update the Worker sends to hang up or
// transfer, with Basic auth as the Worker sends it (src/twilio.rs update_call).
//
//   node --test tests/sim/

import assert from 'node:assert/strict';
import { once } from 'node:events';
import { test } from 'node:test';

import { StandIn } from '../../scripts/sim/standin.mjs';
import { TwilioRest, basicAuth, callPath } from '../../scripts/sim/rest.mjs';

const TOKEN = 'tok-rest-test';
const AC = 'AC0123456789abcdef0123456789abcdef';
const CA = 'CAfedcba9876543210fedcba9876543210';

async function withStandIn(rest, fn) {
  const s = new StandIn({ port: 0, rest });
  await s.listen();
  try {
    await fn(`http://127.0.0.1:${s.port}/twilio`);
  } finally {
    await s.close();
  }
}

const basic = (user, pw) => `Basic ${Buffer.from(`${user}:${pw}`).toString('base64')}`;

function update(base, form, { account = AC, call = CA, auth = basic(AC, TOKEN), method = 'POST' } = {}) {
  return fetch(`${base}/2010-04-01/Accounts/${account}/Calls/${call}.json`, {
    method,
    headers: { Authorization: auth, 'Content-Type': 'application/x-www-form-urlencoded' },
    body: method === 'POST' ? new URLSearchParams(form).toString() : undefined,
  });
}

test('paths and credentials are read as Twilio reads them', () => {
  assert.deepEqual(callPath(`/2010-04-01/Accounts/${AC}/Calls/${CA}.json`), { accountSid: AC, callSid: CA });
  assert.equal(callPath(`/2010-04-01/Accounts/${AC}/Calls.json`), null);
  assert.equal(callPath(`/2010-04-01/Accounts/${AC}/Calls/${CA}/Streams.json`), null);
  assert.deepEqual(basicAuth(basic('AC1', 'a:b')), ['AC1', 'a:b']);
  assert.equal(basicAuth('Bearer x'), null);
});

test('a hang-up of the simulated call is answered 200 with the call, and reported once', async () => {
  const rest = new TwilioRest({ authToken: TOKEN });
  rest.expect({ accountSid: AC, callSid: CA });
  const updates = [];
  rest.on('update', (u) => updates.push(u));
  await withStandIn(rest, async (base) => {
    const r = await update(base, [['Status', 'completed']]);
    assert.equal(r.status, 200);
    const call = await r.json();
    assert.equal(call.sid, CA);
    assert.equal(call.account_sid, AC);
    assert.equal(call.status, 'completed');
    // Asked again: still 200, not reported twice.
    assert.equal((await update(base, [['Status', 'completed']])).status, 200);
    // New TwiML for a call that has ended: Twilio's 21220.
    const late = await update(base, [['Twiml', '<Response><Dial>+81312345678</Dial></Response>']]);
    assert.equal(late.status, 400);
    assert.equal((await late.json()).code, 21220);
  });
  assert.equal(updates.length, 1);
  assert.equal(updates[0].status, 'completed');
  assert.equal(updates[0].callSid, CA);
});

test('a transfer (new TwiML with a Dial) is reported with its TwiML; the call stays in progress', async () => {
  const rest = new TwilioRest({ authToken: TOKEN });
  rest.expect({ accountSid: AC, callSid: CA });
  const got = once(rest, 'update');
  await withStandIn(rest, async (base) => {
    const twiml = '<Response><Say>おつなぎします。</Say><Dial action="https://x/y">+81312345678</Dial></Response>';
    const r = await update(base, [['Twiml', twiml]]);
    assert.equal(r.status, 200);
    assert.equal((await r.json()).status, 'in-progress');
    const [u] = await got;
    assert.equal(u.twiml, twiml);
    assert.equal(u.status, undefined);
  });
});

test('credentials: the call AccountSid or TWILIO_ACCOUNT_SID as user, TWILIO_AUTH_TOKEN as password', async () => {
  const rest = new TwilioRest({ authToken: TOKEN, accountSid: 'ACconfigured' });
  rest.expect({ accountSid: AC, callSid: CA });
  const refused = [];
  rest.on('refused', (r) => refused.push(r));
  await withStandIn(rest, async (base) => {
    const wrongPw = await update(base, [['Status', 'completed']], { auth: basic(AC, 'nope') });
    assert.equal(wrongPw.status, 401);
    assert.equal((await wrongPw.json()).code, 20003);
    assert.equal((await update(base, [['Status', 'completed']], { auth: basic('ACother', TOKEN) })).status, 401);
    assert.equal((await update(base, [['Status', 'completed']], { auth: '' })).status, 401);
    assert.equal((await update(base, [['Status', 'completed']], { auth: basic('ACconfigured', TOKEN) })).status, 200);
  });
  assert.equal(refused.length, 3);
  assert.ok(refused.every((r) => r.status === 401));
});

test('another call, another method or another path is refused as Twilio refuses it', async () => {
  const rest = new TwilioRest({ authToken: TOKEN });
  rest.expect({ accountSid: AC, callSid: CA });
  await withStandIn(rest, async (base) => {
    const other = await update(base, [['Status', 'completed']], { call: 'CA0000' });
    assert.equal(other.status, 404);
    assert.equal((await other.json()).code, 20404);
    assert.equal((await update(base, [], { method: 'GET' })).status, 405);
    assert.equal((await fetch(`${base}/2010-04-01/Accounts/${AC}/Calls.json`, { method: 'POST' })).status, 404);
    // The stand-in's own paths are still there.
    assert.equal((await fetch(base.replace('/twilio', '/healthz'))).status, 200);
  });
});
