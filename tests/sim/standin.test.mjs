// Unit tests of the offline stand-in Realtime server (scripts/sim/standin.mjs) over a real
// WebSocket: a commit of the caller's words while they are still speaking, as the Worker
// sends when the caller hangs up mid-sentence, a commit of nothing, keypad presses that call
// the agent's tools, and the benchmark's echo of appends holding several frames.
//
//   node --test tests/sim/

import assert from 'node:assert/strict';
import { test } from 'node:test';
import WebSocket from 'ws';

import { StandIn, argumentsFor, keypadPress, splitFrames } from '../../scripts/sim/standin.mjs';

/** A fresh stand-in (with `options`) and a socket to it, both closed when `t` ends. */
async function connect(t, options = {}) {
  const server = new StandIn({ port: 0, ...options });
  await server.listen();
  const ws = new WebSocket(`${server.url}?model=gpt-realtime`, { headers: { authorization: 'Bearer test' } });
  t.after(async () => {
    ws.terminate();
    await server.close();
  });
  return ws;
}

/** A session on a fresh stand-in, set up as the Worker sets it: μ-law, VAD, transcription. */
async function session(t, extra = {}) {
  const ws = await connect(t);
  const events = [];
  const waiters = [];
  ws.on('message', (data) => {
    const ev = JSON.parse(data.toString());
    events.push(ev);
    for (const w of [...waiters]) if (w.match(ev)) { waiters.splice(waiters.indexOf(w), 1); w.resolve(ev); }
  });
  const next = (type, ms = 5000) => {
    const seen = events.find((e) => e.type === type && !e.taken);
    if (seen) { seen.taken = true; return Promise.resolve(seen); }
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no ${type} within ${ms} ms; got ${events.map((e) => e.type)}`)), ms);
      waiters.push({ match: (e) => e.type === type && (e.taken = true), resolve: (e) => { clearTimeout(timer); resolve(e); } });
    });
  };
  await new Promise((resolve) => ws.once('open', resolve));
  const send = (ev) => ws.send(JSON.stringify(ev));
  send({
    type: 'session.update',
    session: {
      type: 'realtime',
      audio: {
        input: {
          format: { type: 'audio/pcmu' },
          transcription: { model: 'gpt-4o-transcribe', language: 'ja' },
          turn_detection: { type: 'server_vad', silence_duration_ms: 500, create_response: false },
        },
        output: { format: { type: 'audio/pcmu' } },
      },
      ...extra,
    },
  });
  await next('session.updated');
  return { send, next, events };
}

/** `ms` of loud μ-law (a full-scale square wave), as 20 ms appends. */
function speak(send, ms) {
  const frame = Buffer.alloc(160);
  for (let i = 0; i < frame.length; i++) frame[i] = i % 2 ? 0x00 : 0x80;
  for (let t = 0; t < ms; t += 20) send({ type: 'input_audio_buffer.append', audio: frame.toString('base64') });
}

test('a commit while the caller speaks makes their turn the item speech_started named, and transcribes it', async (t) => {
  const { send, next, events } = await session(t);
  speak(send, 400);
  const started = await next('input_audio_buffer.speech_started');
  send({ type: 'input_audio_buffer.commit', event_id: 'evt_bridge_final_commit' });
  const committed = await next('input_audio_buffer.committed');
  assert.equal(committed.item_id, started.item_id);
  const done = await next('conversation.item.input_audio_transcription.completed');
  assert.equal(done.item_id, started.item_id);
  assert.match(done.transcript, /stand-in/);
  assert.ok(!events.some((e) => e.type === 'error'), JSON.stringify(events.filter((e) => e.type === 'error')));
});

test('a commit of nothing is refused, naming the event it refuses', async (t) => {
  const { send, next } = await session(t);
  send({ type: 'input_audio_buffer.commit', event_id: 'evt_bridge_final_commit' });
  const err = await next('error');
  assert.equal(err.error.code, 'input_audio_buffer_commit_empty');
  assert.equal(err.error.event_id, 'evt_bridge_final_commit');
});

test('echo mode sends an append of several frames back a delta per 20 ms frame, each as it was', async (t) => {
  const ws = await connect(t, { mode: 'echo' });
  const deltas = [];
  ws.on('message', (data) => {
    const ev = JSON.parse(data.toString());
    if (ev.type === 'response.output_audio.delta') deltas.push(ev.delta);
  });
  await new Promise((resolve) => ws.once('open', resolve));
  const frame = (seed) => Buffer.alloc(160, seed).toString('base64');
  // One frame alone, then two in one append (the bridge's default, 40 ms at a time).
  ws.send(JSON.stringify({ type: 'input_audio_buffer.append', audio: frame(1) }));
  const pair = Buffer.concat([Buffer.alloc(160, 2), Buffer.alloc(160, 3)]).toString('base64');
  ws.send(JSON.stringify({ type: 'input_audio_buffer.append', audio: pair }));
  for (let i = 0; i < 100 && deltas.length < 3; i++) await new Promise((r) => setTimeout(r, 20));
  assert.deepEqual(deltas, [frame(1), frame(2), frame(3)]);
});

test('splitFrames cuts base64 audio into 20 ms frames', () => {
  const audio = Buffer.alloc(400, 9);
  const frames = splitFrames(audio.toString('base64'));
  assert.deepEqual(frames.map((f) => Buffer.from(f, 'base64').length), [160, 160, 80]);
  assert.deepEqual(Buffer.concat(frames.map((f) => Buffer.from(f, 'base64'))), audio);
});

/** The function tools as the Worker lists them in session.update (src/tools.rs). */
const TOOLS = ['transfer_call', 'end_call'].map((name) => ({ type: 'function', name, description: name, parameters: { type: 'object', properties: {} } }));

/** A keypad press as the Worker tells the model of it (src/call/control.rs dtmf_note). */
const press = (send, text) => {
  send({ type: 'conversation.item.create', item: { type: 'message', role: 'user', content: [{ type: 'input_text', text }] } });
  send({ type: 'response.create' });
};

test('keypad presses are read in the Worker\'s Japanese and English wording', () => {
  assert.equal(keypadPress('（お客様が電話のキーパッドで「0」を押しました）'), '0');
  assert.equal(keypadPress('(The caller pressed "#" on the phone\'s keypad.)'), '#');
  assert.equal(keypadPress('0を押しました'), null);
  assert.equal(keypadPress(null), null);
});

test('0 on the keypad calls transfer_call as the real API calls a function; its output gets the transfer notice', async (t) => {
  const { send, next, events } = await session(t, { tools: TOOLS });
  press(send, '（お客様が電話のキーパッドで「0」を押しました）');
  const created = await next('response.created');
  const done = await next('response.function_call_arguments.done');
  assert.equal(done.name, 'transfer_call');
  assert.equal(done.response_id, created.response.id);
  assert.deepEqual(JSON.parse(done.arguments), { reason: '[stand-in] the caller pressed 0' });
  const responseDone = await next('response.done');
  assert.equal(responseDone.response.status, 'completed');
  assert.deepEqual(responseDone.response.output.map((o) => [o.type, o.name, o.call_id, o.arguments]), [['function_call', 'transfer_call', done.call_id, done.arguments]]);
  // In the order of the real API's events for a function call.
  const order = events.filter((e) => e.response_id === created.response.id || e.response?.id === created.response.id || e.item?.type === 'function_call').map((e) => e.type);
  assert.deepEqual(order, [
    'response.created', 'response.output_item.added', 'conversation.item.added', 'response.function_call_arguments.delta',
    'response.function_call_arguments.done', 'response.output_item.done', 'conversation.item.done', 'response.done',
  ]);
  // The Worker's answer: the tool's output, then a response for the notice.
  send({ type: 'conversation.item.create', item: { type: 'function_call_output', call_id: done.call_id, output: '{"ok":true}' } });
  send({ type: 'response.create', response: { instructions: 'Tell the caller you are transferring them.' } });
  const notice = await next('response.output_audio_transcript.done');
  assert.match(notice.transcript, /^\[stand-in\] 担当者におつなぎします。/);
  assert.ok(!events.some((e) => e.type === 'error'), JSON.stringify(events.filter((e) => e.type === 'error')));
});

test('# calls end_call; a key whose tool the agent lacks, or no tool\'s key, gets a reply that says so', async (t) => {
  const { send, next, events } = await session(t, { tools: TOOLS.filter((x) => x.name === 'end_call') });
  press(send, '(The caller pressed "#" on the phone\'s keypad.)');
  assert.equal((await next('response.function_call_arguments.done')).name, 'end_call');
  await next('response.done');
  press(send, '（お客様が電話のキーパッドで「0」を押しました）');
  assert.match((await next('response.output_audio_transcript.done', 10_000)).transcript, /キー「0」.*transfer_call がありません/);
  await next('response.done');
  press(send, '（お客様が電話のキーパッドで「5」を押しました）');
  assert.match((await next('response.output_audio_transcript.done', 10_000)).transcript, /キー「5」を受け取りました/);
  assert.equal(events.filter((e) => e.type === 'response.function_call_arguments.done').length, 1);
});

test('argumentsFor fills every required property of a tool\'s schema, and only those', () => {
  const schema = {
    type: 'object',
    properties: {
      phone: { type: 'string' },
      plan: { type: 'string', enum: ['basic', 'premium'] },
      party: { type: 'integer', minimum: 1 },
      note: { type: 'string' },
      when: { type: 'object', properties: { date: { type: 'string', examples: ['2026-12-24'] }, flexible: { type: 'boolean' } }, required: ['date', 'flexible'] },
      tags: { type: 'array', items: { type: 'string' } },
      lang: { type: ['string', 'null'], default: 'ja' },
    },
    required: ['phone', 'plan', 'party', 'when', 'tags', 'lang'],
  };
  assert.deepEqual(argumentsFor(schema), {
    phone: '[stand-in]', plan: 'basic', party: 1, when: { date: '2026-12-24', flexible: false }, tags: [], lang: 'ja',
  });
  assert.deepEqual(argumentsFor({ type: 'object', properties: {} }), {});
  assert.deepEqual(argumentsFor(undefined), {});
  assert.deepEqual(argumentsFor({ type: 'object', properties: { n: { type: 'number' } }, required: ['n', 'missing'] }), { n: 0, missing: {} });
  assert.deepEqual(argumentsFor({
    type: 'object',
    properties: { kind: { const: 'reservation' }, contact: { anyOf: [{ type: 'string', examples: ['+81312345678'] }, { type: 'null' }] } },
    required: ['kind', 'contact'],
  }), { kind: 'reservation', contact: '+81312345678' });
});

test('1-9 call the agent\'s own tools in the order listed, and the reply repeats what the tool answered', async (t) => {
  const own = [
    { type: 'function', name: 'lookup_customer', description: 'lookup', parameters: { type: 'object', properties: { phone: { type: 'string' } }, required: ['phone'] } },
    { type: 'function', name: 'book_table', description: 'book', parameters: { type: 'object', properties: { party: { type: 'integer', minimum: 1 } }, required: ['party'] } },
  ];
  const { send, next, events } = await session(t, { tools: [TOOLS[1], own[0], TOOLS[0], own[1]] });
  press(send, '（お客様が電話のキーパッドで「1」を押しました）');
  const first = await next('response.function_call_arguments.done');
  assert.equal(first.name, 'lookup_customer');
  assert.deepEqual(JSON.parse(first.arguments), { phone: '[stand-in]' });
  await next('response.done');
  const answer = '{"name":"山田太郎","vip":true}';
  send({ type: 'conversation.item.create', item: { type: 'function_call_output', call_id: first.call_id, output: answer } });
  send({ type: 'response.create' });
  const said = await next('response.output_audio_transcript.done', 10_000);
  assert.equal(said.transcript, `[stand-in] lookup_customer の結果を受け取りました: ${answer} (offline stand-in, not OpenAI: the tool's output)`);
  await next('response.done');
  press(send, '(The caller pressed "2" on the phone\'s keypad.)');
  const second = await next('response.function_call_arguments.done');
  assert.equal(second.name, 'book_table');
  assert.deepEqual(JSON.parse(second.arguments), { party: 1 });
  await next('response.done');
  // A long answer is cut to its first 200 characters.
  send({ type: 'conversation.item.create', item: { type: 'function_call_output', call_id: second.call_id, output: 'x'.repeat(300) } });
  send({ type: 'response.create' });
  assert.match((await next('response.output_audio_transcript.done', 10_000)).transcript, new RegExp(`: ${'x'.repeat(200)}… \\(`));
  await next('response.done');
  press(send, '（お客様が電話のキーパッドで「3」を押しました）');
  assert.match((await next('response.output_audio_transcript.done', 10_000)).transcript, /キー「3」を受け取りました.*own tools, of which it has 2/);
  assert.equal(events.filter((e) => e.type === 'response.function_call_arguments.done').length, 2);
  assert.ok(!events.some((e) => e.type === 'error'), JSON.stringify(events.filter((e) => e.type === 'error')));
});

test('with handshakeMs the upgrade is answered no sooner than that after it came', async (t) => {
  const asked = performance.now();
  const ws = await connect(t, { handshakeMs: 300 });
  const created = await new Promise((resolve, reject) => {
    ws.once('message', (data) => resolve(JSON.parse(data.toString())));
    ws.once('error', reject);
  });
  assert.equal(created.type, 'session.created');
  assert.ok(performance.now() - asked >= 300, 'answered after the handshake delay');
});

test('with rttMs each client event is answered no sooner than that after it was sent, in order', async (t) => {
  const ws = await connect(t, { rttMs: 200 });
  const events = [];
  ws.on('message', (data) => events.push({ at: performance.now(), ev: JSON.parse(data.toString()) }));
  await new Promise((resolve) => ws.once('open', resolve));
  const sent = performance.now();
  ws.send(JSON.stringify({ type: 'session.update', session: { type: 'realtime', instructions: 'first' } }));
  ws.send(JSON.stringify({ type: 'session.update', session: { type: 'realtime', instructions: 'second' } }));
  const deadline = Date.now() + 5000;
  while (events.filter((e) => e.ev.type === 'session.updated').length < 2 && Date.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  const updated = events.filter((e) => e.ev.type === 'session.updated');
  assert.equal(updated.length, 2);
  assert.deepEqual(updated.map((e) => e.ev.session.instructions), ['first', 'second']);
  assert.ok(updated[0].at - sent >= 200, 'answered a round trip later');
});
