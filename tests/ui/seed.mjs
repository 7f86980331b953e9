// The calls of the browser tests: their D1 rows (as the Worker writes them) and recordings,
// stereo WAVs in the layout the Worker records (left the caller, right the agent, 8 kHz
// μ-law), made of tones where each side speaks. The Worker's own recording path is covered
// end to end by tests/e2e_recording.rs.
//
// sql() is a realistic Japanese seed: the docs' picture of the call page is taken of it alone
// (tests/ui/call-page-picture.test.mjs). testSql() adds what only the tests want: markup in an
// error message (escaping), events a good call would not have or the page does not know, and
// a long recording (renewing an expired link).

import { MULAW_SILENCE, mulawEncode } from '../../scripts/sim/audio.mjs';

export const CALL_SID = 'CA5eed00000000000000000000000000a1';
export const OTHER_SID = 'CA5eed00000000000000000000000000a2';
export const RECORDING_KEY = `recordings/${CALL_SID}.wav`;
export const DURATION_MS = 12_000;
/** A call whose recording is too long for the browser to buffer whole (about 4 MB ahead;
 *  this one is 9.6 MB): a seek far into it needs a new Range request, on the link the page
 *  holds. */
export const LONG_SID = 'CA5eed00000000000000000000000000a3';
export const LONG_RECORDING_KEY = `recordings/${LONG_SID}.wav`;
export const LONG_DURATION_MS = 600_000;
/** A call the fallback answered: never streamed (no stream duration), Twilio's duration only. */
export const UNSTREAMED_SID = 'CA5eed00000000000000000000000000a4';
export const UNSTREAMED_TWILIO_S = 42;
const CONNECTED_MS = Date.parse('2026-11-20T01:30:00.500Z');

/** The conversation: [seq, role, text, offset_ms, interrupted, until_ms (audio end)]. */
export const TURNS = [
  [0, 'agent', 'お電話ありがとうございます。AIアシスタントがご用件を承ります。', 640, 0, 2_900],
  [1, 'caller', '予約の変更をお願いしたいのですが。', 3_100, 0, 4_300],
  [2, 'agent', 'かしこまりました。ご予約の', 4_400, 1, 5_200],
  [3, 'caller', '山田です。明日の予約です。', 5_200, 0, 6_600],
  [4, 'agent', '山田様、明日午後三時のご予約を確認いたしました。何時に変更なさいますか。', 8_300, 0, 11_200],
];
export const BARGE_IN_MS = 5_200;
export const TOOL_CALL_MS = 7_600;
export const DTMF_MS = 7_000;

const iso = (ms) => new Date(ms).toISOString();
const q = (s) => (s === null ? 'NULL' : typeof s === 'number' ? String(s) : `'${String(s).replace(/'/g, "''")}'`);

/** The recording of CALL_SID. */
export const wav = () => wavOf(DURATION_MS, TURNS);
/** The recording of LONG_SID: silence. */
export const longWav = () => wavOf(LONG_DURATION_MS, []);

/** Bytes of the recordings' WAV header (src/recording.rs HEADER_BYTES). */
const HEADER = 58;

/** A WAV of `ms` milliseconds (μ-law, `WAVE_FORMAT_MULAW`, with the 18-byte `fmt ` and the
 *  `fact` chunk, as src/recording.rs writes it), a tone on each side where its turns speak. */
function wavOf(ms, turns) {
  const rate = 8000;
  const n = (ms / 1000) * rate;
  const buf = Buffer.alloc(HEADER + n * 2, MULAW_SILENCE);
  buf.write('RIFF', 0);
  buf.writeUInt32LE(HEADER - 8 + n * 2, 4);
  buf.write('WAVEfmt ', 8);
  buf.writeUInt32LE(18, 16);
  buf.writeUInt16LE(7, 20);
  buf.writeUInt16LE(2, 22);
  buf.writeUInt32LE(rate, 24);
  buf.writeUInt32LE(rate * 2, 28);
  buf.writeUInt16LE(2, 32);
  buf.writeUInt16LE(8, 34);
  buf.writeUInt16LE(0, 36);
  buf.write('fact', 38);
  buf.writeUInt32LE(4, 42);
  buf.writeUInt32LE(n, 46);
  buf.write('data', 50);
  buf.writeUInt32LE(n * 2, 54);
  for (const [, role, , from, , until] of turns) {
    const hz = role === 'caller' ? 220 : 440;
    const channel = role === 'caller' ? 0 : 1;
    for (let i = (from * rate) / 1000; i < (until * rate) / 1000; i++) {
      const env = Math.min(1, (i - (from * rate) / 1000) / 400, ((until * rate) / 1000 - i) / 400);
      const v = Math.round(9000 * env * Math.sin((2 * Math.PI * hz * i) / rate) * (0.6 + 0.4 * Math.sin((2 * Math.PI * 3 * i) / rate)));
      buf[HEADER + i * 2 + channel] = mulawEncode(v);
    }
  }
  return buf;
}

/** One `calls` row; `o.key` a recording of `o.duration` ms. */
function callRow(sid, o) {
  const bytes = HEADER + o.duration * 16;
  return `INSERT INTO calls (call_sid, account_sid, from_number, to_number, agent_id, direction, status,
    stream_sid, openai_session_id, started_at, connected_at, ended_at, duration_ms, end_reason, input_tokens,
    output_tokens, total_tokens, first_audio_ms, barge_ins, twilio_duration_s, recording_key, recording_duration_ms,
    recording_bytes, transcription_input_tokens, transcription_output_tokens, transcription_audio_ms) VALUES (${[sid,
    'AC00000000000000000000000000000001', o.from, o.to, 'default', 'inbound', o.status,
    `MZ${sid.slice(2)}`, 'sess_seed', iso(o.connected - 500), iso(o.connected), iso(o.connected + o.duration), o.duration,
    o.end_reason, o.input, o.output, o.input + o.output, o.first_audio, o.barge_ins, Math.round(o.duration / 1000),
    o.key, o.key ? o.duration : null, o.key ? bytes : null, o.transcribed_in ?? 0, o.transcribed_out ?? 0,
    o.transcribed_ms ?? 0,
  ].map(q).join(', ')});`;
}

/** `call_events` rows of CALL_SID: [seq, ms from the stream start, type, detail]. */
function eventRows(events) {
  return events.map(([seq, at, type, detail]) => `INSERT INTO call_events (call_sid, seq, at, type, detail) VALUES
      (${[CALL_SID, seq, iso(CONNECTED_MS + at), type, JSON.stringify(detail)].map(q).join(', ')});`);
}

/** The realistic seed: the reviewed call (its transcript, a barge-in, a key press, a tool
 *  call and the agent's hang-up) and a call that failed. */
export function sql() {
  const lines = [
    callRow(CALL_SID, {
      from: '+819012345678', to: '+815012345678', status: 'completed', connected: CONNECTED_MS, duration: DURATION_MS,
      end_reason: 'twilio_stop', input: 1234, output: 567, first_audio: 640, barge_ins: 1, key: RECORDING_KEY,
      transcribed_in: 210, transcribed_out: 48,
    }),
    callRow(OTHER_SID, {
      from: '+819087654321', to: '+815012345678', status: 'failed', connected: CONNECTED_MS - 3_600_000, duration: 4_000,
      end_reason: 'openai_connect_failed', input: 0, output: 0, first_audio: null, barge_ins: 0, key: null,
    }),
  ];
  for (const [seq, role, text, offset, interrupted] of TURNS) {
    lines.push(`INSERT INTO transcript_entries (call_sid, seq, role, text, offset_ms, item_id, interrupted) VALUES
      (${[CALL_SID, seq, role, text, offset, `item_${seq}`, interrupted].map(q).join(', ')});`);
  }
  lines.push(...eventRows([
    [0, BARGE_IN_MS, 'barge_in', { item_id: 'item_2', audio_end_ms: 800, received_ms: 2400 }],
    [1, TOOL_CALL_MS, 'tool_call', { name: 'lookup_reservation', call_id: 'call_1', arguments: '{"name":"山田"}', ok: true, output: '{"time":"15:00"}', duration_ms: 412 }],
    [2, DTMF_MS, 'dtmf', { digit: '5' }],
    [6, 11_500, 'hangup', { ok: true, twilio: 200, reason: 'the caller said goodbye', attempts: 1 }],
  ]));
  return lines.join('\n');
}

/** Agents only the tests have: one edited in the page while someone else edits it through
 *  the API, one whose stored voice the page does not list (written by hand, or a voice
 *  newer than the page), and a row the API cannot read (written by hand with `tools = ''`). */
export const SECOND_AGENT = 'agt_second';
export const HAND_VOICE_AGENT = 'agt_hand_voice';
export const HAND_VOICE = 'juniper';
export const BROKEN_AGENT = 'agt_broken';

function agentRow(id, name, voice, tools = '[]') {
  return `INSERT INTO agents (id, name, instructions, greeting, voice, tools) VALUES
    (${[id, name, `${name}の指示`, `${name}の挨拶`, voice, tools].map(q).join(', ')});`;
}

/** What the tests add to sql(): on the reviewed call an AI error whose message is markup
 *  (shown as text, never run), a reconnect, and an event type the page does not know (shown
 *  raw); LONG_SID, an older call with a long recording; UNSTREAMED_SID, older still; and the
 *  agents above. */
export function testSql() {
  return [
    `INSERT INTO calls (call_sid, account_sid, from_number, to_number, agent_id, direction, status, started_at, ended_at,
      end_reason, twilio_duration_s) VALUES (${[UNSTREAMED_SID, 'AC00000000000000000000000000000001', '+819055556666',
      '+815012345678', 'default', 'inbound', 'completed', iso(CONNECTED_MS - 10_800_000),
      iso(CONNECTED_MS - 10_800_000 + UNSTREAMED_TWILIO_S * 1000), 'fallback_only', UNSTREAMED_TWILIO_S].map(q).join(', ')});`,
    agentRow(SECOND_AGENT, '予約受付', 'cedar'),
    agentRow(HAND_VOICE_AGENT, '手書きの声', HAND_VOICE),
    agentRow(BROKEN_AGENT, '壊れた行', 'sage', ''),
    ...eventRows([
      [3, 9_000, 'openai_error', { type: 'invalid_request_error', code: 'bad_thing', message: '<img src=x onerror="window.__xss=1">', param: null }],
      [4, 9_500, 'reconnect', { attempt: 1, why: 'openai closed 1006', delay_ms: 250 }],
      [5, 10_000, 'mystery_event', {}],
    ]),
    callRow(LONG_SID, {
      from: '+819011112222', to: '+815012345678', status: 'completed', connected: CONNECTED_MS - 7_200_000,
      duration: LONG_DURATION_MS, end_reason: 'agent_hangup', input: 9000, output: 4000, first_audio: 700, barge_ins: 0,
      key: LONG_RECORDING_KEY,
      // Transcribed by a model billed by the audio's length (whisper-1).
      transcribed_ms: 241_400,
    }),
  ].join('\n');
}
