// A local stand-in for the OpenAI Realtime API (GA, protocol.md A1–A6), so a call runs
// with no network. It is NOT OpenAI and says so: every text it produces starts with
// "[stand-in]", and its "voice" is a pattern of tones.
//
// Modes:
//   conversation (default) — behaves like a session with server VAD: it detects speech in
//     the appended μ-law by energy, emits speech_started/stopped, commits the user item,
//     "transcribes" it (a stand-in text saying how long the caller spoke), and answers
//     with a response made of tones plus a stand-in transcript. It answers response.create
//     (the greeting), conversation.item.truncate and conversation.item.retrieve, cancels a
//     response when the caller talks over it, and sends the errors the real API sends for
//     the usual mistakes (missing session.type, beta field names, a second active
//     response, truncating past the audio sent). It cannot understand words, so keypad
//     presses (the Worker passes Twilio's DTMF on as a user message) ask it for the agent's
//     tools: 0 calls transfer_call and # calls end_call, and 1-9 the agent's own (webhook)
//     tools in the order the session lists them, with arguments made from each tool's
//     parameter schema, when the session has them (a function call, as the real API makes
//     one); then, for the Worker's response.create that follows the tool's output, it says a
//     stand-in transfer notice or goodbye, or what the tool answered.
//   echo — for the load benchmark: every input_audio_buffer.append comes straight back as
//     response.output_audio.delta events, one per 20 ms frame it holds (the payload itself
//     when it holds one), and tagged frames (see
//     bench/load.mjs) are time-stamped for the latency figures, served at GET /bench/stats.
//     So that a call leaves a transcript, the greeting's response.create is answered with
//     a text-only turn ("[stand-in] echo …" transcript, no audio), and every 5 s of appended
//     audio is "transcribed" as one caller turn.
//
// Run alone:  node scripts/sim/standin.mjs [--port 8788] [--mode conversation|echo]
//                                           [--handshake-ms N] [--rtt-ms N] [--quiet]
// (--handshake-ms: each WebSocket upgrade is answered N ms after it came, as OpenAI's
// connect takes time from a Worker; --rtt-ms: each client event is handled N ms after it
// came, a round trip to OpenAI; for bench/greeting.mjs.)
// The Worker must then be started with
//   --var OPENAI_REALTIME_URL:ws://127.0.0.1:8788/v1/realtime   (npm run dev:offline)
// The same port serves Twilio's REST call updates under /twilio (rest.mjs), for the Worker's
// TWILIO_API_BASE_URL=http://127.0.0.1:8788/twilio (npm run dev:offline sets it too).

import { EventEmitter } from 'node:events';
import { createServer } from 'node:http';
import { fileURLToPath } from 'node:url';
import { WebSocketServer } from 'ws';

import { BYTES_PER_MS, FRAME_BYTES, MULAW_DECODE, toneSequence } from './audio.mjs';
import { REST_PREFIX, TwilioRest } from './rest.mjs';
import { nowMs, setting } from './twilio.mjs';

export const DEFAULT_PORT = 8788;

/** The greeting's tones: C-E-G rising, twice. */
export const GREETING_NOTES = [
  { hz: 523, ms: 180 }, { hz: 0, ms: 40 }, { hz: 659, ms: 180 }, { hz: 0, ms: 40 }, { hz: 784, ms: 260 },
  { hz: 0, ms: 200 },
  { hz: 523, ms: 180 }, { hz: 0, ms: 40 }, { hz: 659, ms: 180 }, { hz: 0, ms: 40 }, { hz: 784, ms: 260 },
];
/** An answer's tones: a 440 Hz lead-in, then one 880 Hz beep per second of speech heard. */
export function answerNotes(heardMs) {
  const beeps = Math.max(1, Math.min(8, Math.round(heardMs / 1000)));
  const notes = [{ hz: 440, ms: 300 }, { hz: 0, ms: 150 }];
  for (let i = 0; i < beeps; i++) notes.push({ hz: 880, ms: 120 }, { hz: 0, ms: 120 });
  return notes;
}
export const STANDIN_TONES_HZ = [440, 523, 659, 784, 880];

const DELTA_BYTES = 800; // 100 ms of μ-law per audio delta
const DELTA_INTERVAL_MS = 50; // sent at twice real time, as the real API streams ahead

/** The length of a 20 ms μ-law frame in base64. */
const FRAME_B64 = Math.ceil(FRAME_BYTES / 3) * 4;

/** The 20 ms frames (the last maybe shorter) of base64 audio, in base64. */
export function splitFrames(payload) {
  const audio = Buffer.from(payload, 'base64');
  const frames = [];
  for (let i = 0; i < audio.length; i += FRAME_BYTES) frames.push(audio.subarray(i, i + FRAME_BYTES).toString('base64'));
  return frames;
}

/** What the stand-in does for a keypad press: the built-in tool it calls for that key. */
export const KEYPAD_TOOLS = { '0': 'transfer_call', '#': 'end_call' };

/** The longest part of a tool's output the stand-in repeats in its reply. */
const OUTPUT_SHOWN = 200;

/**
 * Arguments for a function tool, made from its parameter schema (JSON Schema, as the agent
 * gives it): every required property, by its type: the schema's `default` or `const`, else
 * its first `enum` value or first `examples` entry, else the first of `anyOf`/`oneOf`, else
 * "[stand-in]" for a string, its `minimum` or 0 for a number, false, [] or an object made
 * the same way. A real model fills them from the conversation; the stand-in cannot, and
 * its strings say so.
 */
export function argumentsFor(schema) {
  if (!schema || typeof schema !== 'object') return {};
  if ('default' in schema) return schema.default;
  if ('const' in schema) return schema.const;
  if (Array.isArray(schema.enum) && schema.enum.length) return schema.enum[0];
  if (Array.isArray(schema.examples) && schema.examples.length) return schema.examples[0];
  const either = schema.anyOf ?? schema.oneOf;
  if (Array.isArray(either) && either.length) return argumentsFor(either[0]);
  const type = Array.isArray(schema.type) ? schema.type.find((t) => t !== 'null') : schema.type;
  switch (type) {
    case 'string': return '[stand-in]';
    case 'integer': case 'number': return typeof schema.minimum === 'number' ? schema.minimum : 0;
    case 'boolean': return false;
    case 'array': return [];
    case 'null': return null;
    default: {
      const out = {};
      const props = schema.properties ?? {};
      for (const name of schema.required ?? []) out[name] = argumentsFor(props[name]);
      return out;
    }
  }
}

/**
 * The key of a keypad press as the Worker tells the model of it (a user message, in
 * Japanese or English: src/call/control.rs `dtmf_note`), or null for any other text.
 */
export function keypadPress(text) {
  const m = /キーパッドで「([0-9*#A-D])」|pressed "([0-9*#A-D])" on the phone's keypad/.exec(text ?? '');
  return m ? (m[1] ?? m[2]) : null;
}

function b64(buf) {
  return Buffer.from(buf).toString('base64');
}

function defaultSession(id) {
  return {
    type: 'realtime',
    object: 'realtime.session',
    id,
    model: 'gpt-realtime-2025-08-28',
    output_modalities: ['audio'],
    instructions: '[stand-in] default instructions of the offline stand-in Realtime server.',
    tools: [],
    tool_choice: 'auto',
    max_output_tokens: 'inf',
    tracing: null,
    truncation: 'auto',
    prompt: null,
    expires_at: Math.floor(Date.now() / 1000) + 3600,
    audio: {
      input: {
        format: { type: 'audio/pcm', rate: 24000 },
        transcription: null,
        noise_reduction: null,
        turn_detection: {
          type: 'server_vad',
          threshold: 0.5,
          prefix_padding_ms: 300,
          silence_duration_ms: 200,
          idle_timeout_ms: null,
          create_response: true,
          interrupt_response: true,
        },
      },
      output: { format: { type: 'audio/pcm', rate: 24000 }, voice: 'marin', speed: 1.0 },
    },
    include: null,
  };
}

/** Partial update as the server does it; a tagged object whose `type` changes is replaced. */
export function mergeSession(target, patch) {
  for (const [k, v] of Object.entries(patch)) {
    const t = target[k];
    const bothObjects = t && v && typeof t === 'object' && typeof v === 'object' && !Array.isArray(t) && !Array.isArray(v);
    if (bothObjects && !(v.type !== undefined && t.type !== undefined && v.type !== t.type)) {
      mergeSession(t, v);
    } else {
      target[k] = structuredClone(v);
    }
  }
  return target;
}

const SESSION_KEYS = new Set([
  'type', 'model', 'output_modalities', 'instructions', 'audio', 'tools', 'tool_choice', 'max_output_tokens',
  'tracing', 'truncation', 'include', 'prompt',
]);
const FORMATS = new Set(['audio/pcm', 'audio/pcmu', 'audio/pcma']);

/** Energy of 16-bit samples in dBFS. */
function dbfs(sumSquares, n) {
  if (!n || !sumSquares) return -Infinity;
  return 10 * Math.log10(sumSquares / n / (32768 * 32768));
}

let sessionCounter = 0;

/** One WebSocket session with the bridge. */
class Session {
  constructor(server, ws, req) {
    this.server = server;
    this.ws = ws;
    this.index = sessionCounter++;
    this.id = `sess_standin_${Date.now().toString(36)}_${this.index}`;
    this.config = defaultSession(this.id);
    this.eventSeq = 0;
    this.itemSeq = 0;
    this.items = new Map(); // id -> { role, transcript, audioBytes, status, truncatedMs }
    this.lastItemId = null;
    this.response = null; // the active response
    this.timers = new Set();
    // Input audio, VAD.
    this.inputMs = 0; // ms of audio appended this session
    this.bufferMs = 0; // ms appended since the last commit/clear
    this.voicedRun = 0;
    this.silentRun = 0;
    this.speaking = false;
    this.speechStartMs = 0;
    this.lastVoiceEndMs = 0;
    this.pendingUserItem = null;
    this.echoItem = null;
    this.handshake = { path: req.url, authorization: req.headers.authorization ?? null, beta: req.headers['openai-beta'] ?? null };
    // Each client event is handled a round trip after it came (--rtt-ms): what a Worker
    // waits for an answer from OpenAI across an ocean. Equal delays keep the order.
    const rtt = server.rttMs;
    ws.on('message', (data, isBinary) => {
      if (rtt > 0) setTimeout(() => this.onMessage(data, isBinary), rtt);
      else this.onMessage(data, isBinary);
    });
    ws.on('close', (code, reason) => {
      for (const t of this.timers) clearTimeout(t);
      this.timers.clear();
      this.server.emit('closed', { session: this, code, reason: reason.toString() });
    });
    ws.on('error', () => {});
    this.send({ type: 'session.created', session: this.config });
    this.server.emit('session', { session: this });
  }

  get mode() {
    return this.server.mode;
  }

  send(event) {
    if (this.ws.readyState !== this.ws.OPEN) return;
    if (!event.event_id) event.event_id = `event_standin_${this.index}_${++this.eventSeq}`;
    this.ws.send(JSON.stringify(event));
  }

  later(ms, fn) {
    const t = setTimeout(() => {
      this.timers.delete(t);
      fn();
    }, ms);
    this.timers.add(t);
    return t;
  }

  newItemId() {
    return `item_standin${this.index}_${++this.itemSeq}`;
  }

  error(code, message, param, cause) {
    this.server.emit('error_sent', { session: this, code, message });
    this.send({
      type: 'error',
      error: { type: 'invalid_request_error', code, message, param: param ?? null, event_id: cause?.event_id ?? null },
    });
  }

  onMessage(data, isBinary) {
    if (isBinary) return this.error('invalid_event', 'Binary frames are not supported.', null, null);
    const text = data.toString();
    // The hot path of the benchmark: skip JSON for appends in echo mode.
    if (this.mode === 'echo' && text.startsWith('{"type":"input_audio_buffer.append"')) {
      const m = /"audio":"([^"]*)"/.exec(text);
      if (m) return this.echo(m[1]);
    }
    let ev;
    try {
      ev = JSON.parse(text);
    } catch {
      return this.error('invalid_json', 'The event is not valid JSON.', null, null);
    }
    switch (ev.type) {
      case 'session.update': return this.onSessionUpdate(ev);
      case 'input_audio_buffer.append': return this.mode === 'echo' ? this.echo(ev.audio ?? '') : this.onAppend(ev);
      case 'input_audio_buffer.commit': return this.onCommit(ev);
      case 'input_audio_buffer.clear':
        this.bufferMs = 0;
        return this.send({ type: 'input_audio_buffer.cleared' });
      case 'response.create': return this.onResponseCreate(ev);
      case 'response.cancel': return this.onResponseCancel(ev);
      case 'conversation.item.create': return this.onItemCreate(ev);
      case 'conversation.item.truncate': return this.onTruncate(ev);
      case 'conversation.item.retrieve': return this.onRetrieve(ev);
      case 'conversation.item.delete':
        if (!this.items.delete(ev.item_id)) return this.error('item_not_found', `Item with item_id '${ev.item_id}' not found.`, 'item_id', ev);
        return this.send({ type: 'conversation.item.deleted', item_id: ev.item_id });
      default:
        return this.error('invalid_value', `Invalid value: '${ev.type}'. Unknown client event type.`, 'type', ev);
    }
  }

  // ---- session ----

  onSessionUpdate(ev) {
    const s = ev.session;
    if (!s || typeof s !== 'object') return this.error('missing_required_parameter', "Missing required parameter: 'session'.", 'session', ev);
    if (s.type === undefined) return this.error('missing_required_parameter', "Missing required parameter: 'session.type'.", 'session.type', ev);
    for (const k of Object.keys(s)) {
      if (!SESSION_KEYS.has(k)) return this.error('unknown_parameter', `Unknown parameter: 'session.${k}'.`, `session.${k}`, ev);
    }
    for (const side of ['input', 'output']) {
      const f = s.audio?.[side]?.format;
      if (f && !FORMATS.has(f.type)) {
        return this.error('invalid_value', `Invalid value: '${f.type}'. Supported values are: 'audio/pcm', 'audio/pcmu', and 'audio/pcma'.`, `session.audio.${side}.format.type`, ev);
      }
    }
    mergeSession(this.config, s);
    this.config.id = this.id;
    this.send({ type: 'session.updated', session: this.config });
    this.server.emit('session_updated', { session: this, config: this.config });
  }

  get turnDetection() {
    return this.config.audio?.input?.turn_detection ?? null;
  }

  inputFormat() {
    return this.config.audio?.input?.format?.type ?? 'audio/pcm';
  }

  // ---- echo mode (benchmark) ----

  /** The greeting in echo mode: a finished agent turn with a transcript and no audio. */
  echoTurn() {
    const id = `resp_standin_${this.index}_${++this.itemSeq}`;
    const itemId = this.newItemId();
    const text = '[stand-in] echo: こちらは負荷試験用の代役サーバーです (load-test stand-in, not OpenAI)';
    const item = { id: itemId, object: 'realtime.item', type: 'message', status: 'completed', role: 'assistant', content: [{ type: 'output_audio', transcript: text }] };
    const usage = { total_tokens: 0, input_tokens: 0, output_tokens: 0 };
    this.send({ type: 'response.created', response: { object: 'realtime.response', id, status: 'in_progress', output: [] } });
    this.send({ type: 'response.output_item.added', response_id: id, output_index: 0, item: { ...item, status: 'in_progress', content: [] } });
    this.send({ type: 'response.output_audio_transcript.done', response_id: id, item_id: itemId, output_index: 0, content_index: 0, transcript: text });
    this.send({ type: 'response.output_item.done', response_id: id, output_index: 0, item });
    this.send({ type: 'response.done', response: { object: 'realtime.response', id, status: 'completed', output: [item], usage } });
  }

  /** Every 5 s of echoed audio becomes one caller turn with a transcript. */
  echoTranscribe() {
    this.echoedFrames = (this.echoedFrames ?? 0) + 1;
    if (this.echoedFrames % 250 !== 0) return;
    const itemId = this.newItemId();
    const secs = (this.echoedFrames / 50).toFixed(0);
    this.send({
      type: 'conversation.item.input_audio_transcription.completed',
      item_id: itemId,
      content_index: 0,
      transcript: `[stand-in] echo: ${secs} s of caller audio so far`,
      usage: { type: 'duration', seconds: 5 },
    });
  }

  echo(payload) {
    if (!this.echoItem) {
      this.echoItem = this.newItemId();
      this.send({
        type: 'response.output_item.added',
        response_id: 'resp_standin_echo',
        output_index: 0,
        item: { id: this.echoItem, object: 'realtime.item', type: 'message', status: 'in_progress', role: 'assistant', content: [] },
      });
    }
    // A delta per 20 ms frame, however many frames the append carried (the bridge sends
    // several at a time, CALLER_AUDIO_CHUNK_MS): what comes back, and what the bench counts,
    // does not change with how the caller's side was sent.
    const frames = payload.length > FRAME_B64 ? splitFrames(payload) : [payload];
    for (const frame of frames) {
      this.ws.send(
        `{"type":"response.output_audio.delta","event_id":"e${++this.eventSeq}","response_id":"resp_standin_echo","item_id":"${this.echoItem}","output_index":0,"content_index":0,"delta":"${frame}"}`,
      );
      this.server.recordEcho(frame);
      this.echoTranscribe();
    }
  }

  // ---- input audio and the VAD ----

  onAppend(ev) {
    const audio = Buffer.from(ev.audio ?? '', 'base64');
    const fmt = this.inputFormat();
    const td = this.turnDetection;
    const thresholdDb = -60 + 50 * (td?.threshold ?? 0.5);
    // 20 ms blocks.
    const bytesPerMs = fmt === 'audio/pcm' ? 48 : 8; // pcm: 24 kHz 16-bit
    const block = 20 * bytesPerMs;
    for (let off = 0; off < audio.length; off += block) {
      const end = Math.min(audio.length, off + block);
      let sum = 0;
      let n = 0;
      if (fmt === 'audio/pcm') {
        for (let i = off; i + 1 < end; i += 2) {
          const v = audio.readInt16LE(i);
          sum += v * v;
          n++;
        }
      } else {
        for (let i = off; i < end; i++) {
          const v = MULAW_DECODE[audio[i]];
          sum += v * v;
          n++;
        }
      }
      const ms = (end - off) / bytesPerMs;
      const startMs = this.inputMs;
      this.inputMs += ms;
      this.bufferMs += ms;
      if (td) this.vad(dbfs(sum, n) > thresholdDb, startMs, ms, td);
    }
  }

  vad(voiced, startMs, ms, td) {
    if (voiced) {
      this.voicedRun += ms;
      this.silentRun = 0;
      this.lastVoiceEndMs = startMs + ms;
      if (!this.speaking && this.voicedRun >= 60) {
        this.speaking = true;
        const onset = startMs + ms - this.voicedRun;
        this.speechStartMs = Math.max(0, onset - (td.prefix_padding_ms ?? 300));
        this.pendingUserItem = this.newItemId();
        this.send({ type: 'input_audio_buffer.speech_started', audio_start_ms: Math.round(this.speechStartMs), item_id: this.pendingUserItem });
        this.server.emit('speech_started', { session: this, audioStartMs: this.speechStartMs });
        if (this.response && td.interrupt_response !== false) this.finishResponse('cancelled', 'turn_detected');
      }
    } else {
      this.voicedRun = 0;
      this.silentRun += ms;
      if (this.speaking && this.silentRun >= (td.silence_duration_ms ?? 500)) {
        this.speaking = false;
        const itemId = this.pendingUserItem;
        const endMs = Math.round(this.lastVoiceEndMs);
        this.send({ type: 'input_audio_buffer.speech_stopped', audio_end_ms: endMs, item_id: itemId });
        const heardMs = this.lastVoiceEndMs - this.speechStartMs;
        this.server.emit('speech_stopped', { session: this, audioEndMs: endMs });
        this.commitUserItem(itemId, heardMs);
        if (td.create_response !== false) this.later(250, () => this.startAnswer(heardMs));
      }
    }
  }

  commitUserItem(itemId, heardMs) {
    const previous = this.lastItemId;
    this.bufferMs = 0;
    this.items.set(itemId, { role: 'user', transcript: null, audioBytes: 0, status: 'completed', heardMs });
    this.lastItemId = itemId;
    const item = { id: itemId, object: 'realtime.item', type: 'message', status: 'completed', role: 'user', content: [{ type: 'input_audio', transcript: null }] };
    this.send({ type: 'input_audio_buffer.committed', previous_item_id: previous, item_id: itemId });
    this.send({ type: 'conversation.item.added', previous_item_id: previous, item });
    this.send({ type: 'conversation.item.done', previous_item_id: previous, item });
    const transcription = this.config.audio?.input?.transcription;
    if (transcription) {
      this.later(400, () => {
        const secs = (heardMs / 1000).toFixed(1);
        const text = `[stand-in] （オフラインの代役サーバーは言葉を認識しません）${secs}秒の発話を受信 — the offline stand-in does not recognise words: ${secs} s of caller speech`;
        const it = this.items.get(itemId);
        if (it) it.transcript = text;
        this.send({ type: 'conversation.item.input_audio_transcription.delta', item_id: itemId, content_index: 0, delta: text });
        this.send({
          type: 'conversation.item.input_audio_transcription.completed',
          item_id: itemId,
          content_index: 0,
          transcript: text,
          usage: { type: 'duration', seconds: Math.round(heardMs / 1000) },
        });
        this.server.emit('heard', { session: this, itemId, text, heardMs, model: transcription.model });
      });
    }
  }

  onCommit(ev) {
    if (this.bufferMs <= 0) return this.error('input_audio_buffer_commit_empty', 'Error committing input audio buffer: buffer too small. Expected at least 100ms of audio, but buffer only has 0.00ms of audio.', null, ev);
    const heard = this.bufferMs;
    // Committed mid-speech (the caller hung up, say): the turn is the item its
    // speech_started named, and the speech is over.
    const itemId = this.speaking ? this.pendingUserItem : this.newItemId();
    this.speaking = false;
    this.commitUserItem(itemId, heard);
  }

  // ---- responses ----

  onResponseCreate(ev) {
    if (this.response) {
      return this.error(
        'conversation_already_has_active_response',
        `Conversation already has an active response in progress: ${this.response.id}. Wait until the response is finished before creating a new one.`,
        null,
        ev,
      );
    }
    if (this.mode === 'echo') return this.echoTurn(ev);
    const first = ![...this.items.values()].some((i) => i.role === 'assistant');
    const instructions = ev.response?.instructions ?? this.config.instructions ?? '';
    if (this.answerKeypad()) return;
    const last = this.items.get(this.lastItemId);
    let text;
    if (last?.role === 'function_call_output') {
      const called = [...this.items.values()].find((i) => i.role === 'function_call' && i.callId === last.callId);
      const output = String(last.output ?? '');
      const shown = output.length > OUTPUT_SHOWN ? `${output.slice(0, OUTPUT_SHOWN)}…` : output;
      text = {
        transfer_call: '[stand-in] 担当者におつなぎします。 (offline stand-in, not OpenAI: the transfer notice)',
        end_call: '[stand-in] お電話ありがとうございました。失礼いたします。 (offline stand-in, not OpenAI: the goodbye)',
      }[called?.name] ?? `[stand-in] ${called?.name ?? 'ツール'} の結果を受け取りました: ${shown} (offline stand-in, not OpenAI: the tool's output)`;
    } else {
      text = first
        ? '[stand-in] お電話ありがとうございます。こちらはオフラインの代役サーバーで、OpenAI ではありません。 (offline stand-in greeting, not OpenAI)'
        : '[stand-in] ご用件を承りました。こちらはオフラインの代役サーバーです。 (offline stand-in reply, not OpenAI)';
    }
    this.startResponse(text, toneSequence(first ? GREETING_NOTES : answerNotes(1000)), { instructions });
  }

  /**
   * Answers a keypad press made since the stand-in's last turn, if there is one (the last
   * key, whether the press came before or after the caller's words): with a call of the
   * agent's tool for that key, or else a reply that says which key came. True when it did.
   */
  answerKeypad() {
    let key = null;
    for (const item of this.items.values()) {
      if (item.role === 'assistant' || item.role === 'function_call') key = null;
      else if (item.role === 'user') key = keypadPress(item.transcript) ?? key;
    }
    if (key === null) return false;
    const tool = KEYPAD_TOOLS[key];
    if (tool && this.hasTool(tool)) {
      this.callFunction(tool, { reason: `[stand-in] the caller pressed ${key}` });
      return true;
    }
    const own = /^[1-9]$/.test(key) ? this.ownTools()[Number(key) - 1] : undefined;
    if (own) {
      this.callFunction(own.name, argumentsFor(own.parameters));
      return true;
    }
    const text = tool
      ? `[stand-in] キー「${key}」を受け取りましたが、この担当者には ${tool} がありません。 (offline stand-in, not OpenAI: key ${key} asks for ${tool}, which this agent does not have)`
      : `[stand-in] キー「${key}」を受け取りました。 (offline stand-in, not OpenAI: key ${key}; 0 asks for transfer_call, # for end_call, 1-9 for the agent's own tools, of which it has ${this.ownTools().length})`;
    this.startResponse(text, toneSequence(answerNotes(1000)), {});
    return true;
  }

  /** The session's function tools other than the built-in ones of KEYPAD_TOOLS, in order. */
  ownTools() {
    const builtIn = new Set(Object.values(KEYPAD_TOOLS));
    return (this.config.tools ?? []).filter((t) => t?.type === 'function' && typeof t.name === 'string' && !builtIn.has(t.name));
  }

  /** True when the session's tools include a function of that name. */
  hasTool(name) {
    return (this.config.tools ?? []).some((t) => t?.type === 'function' && t.name === name);
  }

  /**
   * A response that calls a function, with the events the real API sends for one (protocol.md
   * A4): the item added, its arguments, the item done, response.done. The Worker answers
   * with the function's output and a response.create.
   */
  callFunction(name, args) {
    const id = `resp_standin_${this.index}_${++this.itemSeq}`;
    const itemId = this.newItemId();
    const callId = `call_standin_${this.index}_${this.itemSeq}`;
    const previous = this.lastItemId;
    this.lastItemId = itemId;
    const argText = JSON.stringify(args);
    this.items.set(itemId, { role: 'function_call', name, callId, transcript: '', audioBytes: 0, status: 'completed' });
    const added = { id: itemId, object: 'realtime.item', type: 'function_call', status: 'in_progress', name, call_id: callId, arguments: '' };
    const done = { ...added, status: 'completed', arguments: argText };
    const ids = { response_id: id, item_id: itemId, output_index: 0, call_id: callId };
    this.send({ type: 'response.created', response: this.responseBody(id, 'in_progress', null, []) });
    this.send({ type: 'response.output_item.added', response_id: id, output_index: 0, item: added });
    this.send({ type: 'conversation.item.added', previous_item_id: previous, item: added });
    this.send({ type: 'response.function_call_arguments.delta', ...ids, delta: argText });
    this.send({ type: 'response.function_call_arguments.done', ...ids, name, arguments: argText });
    this.send({ type: 'response.output_item.done', response_id: id, output_index: 0, item: done });
    this.send({ type: 'conversation.item.done', previous_item_id: previous, item: done });
    this.send({ type: 'response.done', response: this.responseBody(id, 'completed', null, [done]) });
    this.server.emit('tool_called', { session: this, name, callId, arguments: argText });
  }

  startAnswer(heardMs) {
    if (this.speaking) return; // the caller started again: wait for the next turn
    if (this.response) this.finishResponse('cancelled', 'turn_detected');
    if (this.answerKeypad()) return;
    const secs = (heardMs / 1000).toFixed(1);
    const text = `[stand-in] ${secs}秒のお話を受け取りました。こちらはオフラインの代役サーバーです。 (offline stand-in, not OpenAI: heard ${secs} s of speech)`;
    this.startResponse(text, toneSequence(answerNotes(heardMs)), {});
  }

  startResponse(text, audio, { instructions }) {
    const id = `resp_standin_${this.index}_${++this.itemSeq}`;
    const itemId = this.newItemId();
    const previous = this.lastItemId;
    this.lastItemId = itemId;
    const chunks = [];
    for (let off = 0; off < audio.length; off += DELTA_BYTES) chunks.push(audio.subarray(off, off + DELTA_BYTES));
    // The transcript arrives in pieces alongside the audio.
    const chars = Array.from(text);
    const pieces = [];
    const per = Math.ceil(chars.length / chunks.length);
    for (let i = 0; i < chunks.length; i++) pieces.push(chars.slice(i * per, (i + 1) * per).join(''));
    const r = { id, itemId, chunks, pieces, next: 0, text, sentText: '', sentBytes: 0, timer: null, instructions };
    this.response = r;
    this.items.set(itemId, { role: 'assistant', transcript: text, audioBytes: 0, status: 'in_progress', truncatedMs: null });
    const item = { id: itemId, object: 'realtime.item', type: 'message', status: 'in_progress', role: 'assistant', content: [] };
    this.send({ type: 'response.created', response: this.responseObject(r, 'in_progress') });
    this.send({
      type: 'rate_limits.updated',
      rate_limits: [
        { name: 'requests', limit: 1000, remaining: 999, reset_seconds: 0.06 },
        { name: 'tokens', limit: 100000, remaining: 99000, reset_seconds: 0.6 },
      ],
    });
    this.send({ type: 'response.output_item.added', response_id: id, output_index: 0, item });
    this.send({ type: 'conversation.item.added', previous_item_id: previous, item });
    this.send({ type: 'response.content_part.added', response_id: id, item_id: itemId, output_index: 0, content_index: 0, part: { type: 'output_audio', transcript: '' } });
    this.server.emit('response_started', { session: this, responseId: id, itemId, text, audioMs: audio.length / BYTES_PER_MS });
    const tick = () => {
      if (this.response !== r) return;
      if (r.next >= r.chunks.length) return this.finishResponse('completed');
      const chunk = r.chunks[r.next];
      const piece = r.pieces[r.next];
      r.next++;
      const ids = { response_id: id, item_id: itemId, output_index: 0, content_index: 0 };
      this.send({ type: 'response.output_audio.delta', ...ids, delta: b64(chunk) });
      r.sentBytes += chunk.length;
      this.items.get(itemId).audioBytes = r.sentBytes;
      if (piece) {
        r.sentText += piece;
        this.send({ type: 'response.output_audio_transcript.delta', ...ids, delta: piece });
      }
      r.timer = this.later(DELTA_INTERVAL_MS, tick);
    };
    r.timer = this.later(60, tick);
  }

  responseObject(r, status, reason) {
    const item = this.items.get(r.itemId);
    const output = status !== 'in_progress'
      ? [{ id: r.itemId, object: 'realtime.item', type: 'message', status: item.status, role: 'assistant', content: [{ type: 'output_audio', transcript: item.transcript }] }]
      : [];
    return this.responseBody(r.id, status, reason, output);
  }

  /** The `response` object of response.created / response.done (protocol.md A4). */
  responseBody(id, status, reason, output) {
    const done = status !== 'in_progress';
    return {
      object: 'realtime.response',
      id,
      status,
      status_details: reason ? { type: status, reason } : null,
      output,
      conversation_id: `conv_standin_${this.index}`,
      output_modalities: ['audio'],
      max_output_tokens: 'inf',
      audio: { output: { format: this.config.audio?.output?.format ?? { type: 'audio/pcmu' }, voice: this.config.audio?.output?.voice ?? 'marin' } },
      usage: done
        ? {
            total_tokens: 0, input_tokens: 0, output_tokens: 0,
            input_token_details: { text_tokens: 0, audio_tokens: 0, image_tokens: 0, cached_tokens: 0, cached_tokens_details: { text_tokens: 0, audio_tokens: 0, image_tokens: 0 } },
            output_token_details: { text_tokens: 0, audio_tokens: 0 },
          }
        : null,
      metadata: { standin: true },
    };
  }

  /** Ends the active response: `completed`, or `cancelled` (turn_detected / client_cancelled). */
  finishResponse(status, reason) {
    const r = this.response;
    if (!r) return;
    this.response = null;
    if (r.timer) {
      clearTimeout(r.timer);
      this.timers.delete(r.timer);
    }
    const item = this.items.get(r.itemId);
    // A cancelled response stops generating: its transcript is what was generated so far.
    if (status !== 'completed') item.transcript = r.sentText;
    item.status = status === 'completed' ? 'completed' : 'incomplete';
    const ids = { response_id: r.id, item_id: r.itemId, output_index: 0, content_index: 0 };
    const finalItem = { id: r.itemId, object: 'realtime.item', type: 'message', status: item.status, role: 'assistant', content: [{ type: 'output_audio', transcript: item.transcript }] };
    this.send({ type: 'response.output_audio.done', ...ids });
    this.send({ type: 'response.output_audio_transcript.done', ...ids, transcript: item.transcript });
    this.send({ type: 'response.content_part.done', ...ids, part: { type: 'output_audio', transcript: item.transcript } });
    this.send({ type: 'response.output_item.done', response_id: r.id, output_index: 0, item: finalItem });
    this.send({ type: 'conversation.item.done', previous_item_id: null, item: finalItem });
    this.send({ type: 'response.done', response: this.responseObject(r, status, reason) });
    this.server.emit('said', { session: this, itemId: r.itemId, text: item.transcript, status, reason, audioMs: r.sentBytes / BYTES_PER_MS });
  }

  onResponseCancel(ev) {
    if (!this.response) return this.error('response_cancel_not_active', 'Cancellation failed: no active response found.', null, ev);
    this.finishResponse('cancelled', 'client_cancelled');
  }

  onItemCreate(ev) {
    const item = ev.item;
    if (!item || !item.type) return this.error('missing_required_parameter', "Missing required parameter: 'item.type'.", 'item.type', ev);
    if (ev.previous_item_id && ev.previous_item_id !== 'root' && !this.items.has(ev.previous_item_id)) {
      return this.error('item_not_found', `Item with item_id '${ev.previous_item_id}' not found.`, 'previous_item_id', ev);
    }
    const id = item.id ?? this.newItemId();
    const text = (item.content ?? []).map((c) => c.text ?? c.transcript ?? '').join('');
    this.items.set(id, { role: item.role ?? item.type, callId: item.call_id, output: item.output, transcript: text, audioBytes: 0, status: 'completed' });
    const previous = this.lastItemId;
    this.lastItemId = id;
    const full = { ...item, id, object: 'realtime.item', status: 'completed' };
    this.send({ type: 'conversation.item.added', previous_item_id: previous, item: full });
    this.send({ type: 'conversation.item.done', previous_item_id: previous, item: full });
  }

  onTruncate(ev) {
    const item = this.items.get(ev.item_id);
    if (!item || item.role !== 'assistant') {
      return this.error('invalid_value', `Item with item_id '${ev.item_id}' not found or not an assistant message.`, 'item_id', ev);
    }
    if (ev.content_index !== 0) return this.error('invalid_value', 'Only content_index 0 can be truncated.', 'content_index', ev);
    const have = Math.floor(item.audioBytes / BYTES_PER_MS);
    const end = ev.audio_end_ms;
    if (typeof end !== 'number' || end < 0) return this.error('missing_required_parameter', "Missing required parameter: 'audio_end_ms'.", 'audio_end_ms', ev);
    if (end > have) {
      return this.error('invalid_value', `Audio content of ${have}ms is already shorter than ${end}ms`, 'audio_end_ms', ev);
    }
    // The unheard part of the transcript goes, as on the real server.
    const chars = Array.from(item.transcript ?? '');
    const total = this.response?.itemId === ev.item_id ? this.response.chunks.reduce((a, c) => a + c.length, 0) / BYTES_PER_MS : have;
    item.transcript = chars.slice(0, Math.round((chars.length * end) / Math.max(1, total))).join('');
    item.truncatedMs = end;
    this.send({ type: 'conversation.item.truncated', item_id: ev.item_id, content_index: 0, audio_end_ms: end });
    this.server.emit('truncated', { session: this, itemId: ev.item_id, audioEndMs: end, text: item.transcript });
  }

  onRetrieve(ev) {
    const item = this.items.get(ev.item_id);
    if (!item) return this.error('item_not_found', `Item with item_id '${ev.item_id}' not found.`, 'item_id', ev);
    const contentType = item.role === 'assistant' ? 'output_audio' : 'input_audio';
    this.send({
      type: 'conversation.item.retrieved',
      item: {
        id: ev.item_id,
        object: 'realtime.item',
        type: 'message',
        status: item.status,
        role: item.role,
        content: [{ type: contentType, transcript: item.transcript }],
      },
    });
  }
}

/**
 * The stand-in server. `listen()` resolves once it accepts connections on 127.0.0.1:port.
 * Events: session, session_updated, speech_started, speech_stopped, heard, response_started,
 * said, tool_called, truncated, error_sent, closed.
 */
export class StandIn extends EventEmitter {
  constructor({ port = DEFAULT_PORT, host = '127.0.0.1', mode = 'conversation', rest = null, handshakeMs = 0, rttMs = 0 } = {}) {
    super();
    this.rest = rest; // a TwilioRest (rest.mjs) served under /twilio, or null
    // The upgrade is answered this long after it came: OpenAI's connect as a Worker sees it
    // (TCP, TLS, the upgrade, the session's creation), for the greeting benchmark.
    this.handshakeMs = handshakeMs;
    // Every client event is handled this long after it came (a round trip to OpenAI).
    this.rttMs = rttMs;
    this.port = port;
    this.host = host;
    this.mode = mode;
    this.sessions = [];
    this.echoes = new Map(); // bench: call index -> Map(seq -> time ms)
    this.http = createServer((req, res) => this.onHttp(req, res));
    this.wss = new WebSocketServer({ noServer: true, perMessageDeflate: false });
    this.http.on('upgrade', (req, socket, head) => {
      if (!req.url.startsWith('/v1/realtime')) {
        socket.end('HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n');
        return;
      }
      // Like the real API: a bearer key (any, here) and a model in the query.
      if (!/^Bearer \S+$/.test(req.headers.authorization ?? '')) {
        socket.end('HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n');
        this.emit('refused', { why: 'no bearer key' });
        return;
      }
      if (!new URL(req.url, 'http://x').searchParams.get('model')) {
        socket.end('HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n');
        this.emit('refused', { why: 'no model' });
        return;
      }
      if (req.headers['openai-beta']) {
        // What the real API does with beta clients since the beta was removed (protocol.md A1).
        this.wss.handleUpgrade(req, socket, head, (ws) => ws.close(4000, 'invalid_request_error.beta_api_shape_disabled'));
        return;
      }
      const accept = () => this.wss.handleUpgrade(req, socket, head, (ws) => this.sessions.push(new Session(this, ws, req)));
      if (this.handshakeMs > 0) setTimeout(accept, this.handshakeMs);
      else accept();
    });
  }

  get url() {
    return `ws://${this.host}:${this.port}/v1/realtime`;
  }

  listen() {
    return new Promise((resolve, reject) => {
      this.http.once('error', reject);
      this.http.listen(this.port, this.host, () => {
        this.http.off('error', reject);
        this.port = this.http.address().port;
        resolve(this);
      });
    });
  }

  close() {
    for (const s of this.sessions) s.ws.terminate();
    this.wss.close();
    return new Promise((resolve) => this.http.close(() => resolve()));
  }

  onHttp(req, res) {
    if (this.rest?.handle(req, res)) return;
    if (req.url === '/healthz') {
      res.writeHead(200, { 'content-type': 'text/plain' });
      return res.end(`stand-in (${this.mode}) ok\n`);
    }
    if (req.url.startsWith('/bench/stats')) {
      const calls = {};
      for (const [call, m] of this.echoes) calls[call] = [...m.entries()];
      const body = JSON.stringify({ now: nowMs(), sessions: this.sessions.length, calls });
      if (req.url.includes('reset=1')) this.echoes.clear();
      res.writeHead(200, { 'content-type': 'application/json' });
      return res.end(body);
    }
    res.writeHead(404, { 'content-type': 'text/plain' });
    res.end('This is the offline stand-in for the OpenAI Realtime API (WebSocket at /v1/realtime).\n');
  }

  /** Bench frames are tagged in their first 9 bytes (see bench/load.mjs); note when each came. */
  recordEcho(payload) {
    const t = nowMs();
    const head = Buffer.from(payload.slice(0, 12), 'base64');
    if (head.length < 9 || head[0] !== 0xa5 || head[7] !== 0x5a) return;
    const call = head.readUInt16BE(1);
    const seq = head.readUInt32BE(3);
    let m = this.echoes.get(call);
    if (!m) this.echoes.set(call, (m = new Map()));
    m.set(seq, t);
  }
}

// ---- run alone ----------------------------------------------------------------------------

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const args = process.argv.slice(2);
  const opt = (name, dflt) => {
    const i = args.indexOf(name);
    return i >= 0 ? args[i + 1] : dflt;
  };
  const mode = opt('--mode', 'conversation');
  const port = Number(opt('--port', DEFAULT_PORT));
  const quiet = args.includes('--quiet');
  const delay = (name) => {
    const ms = Number(opt(name, 0));
    if (!Number.isInteger(ms) || ms < 0 || ms > 10_000) {
      console.error(`stand-in: ${name} must be a whole number of ms from 0 to 10000`);
      process.exit(2);
    }
    return ms;
  };
  const handshakeMs = delay('--handshake-ms');
  const rttMs = delay('--rtt-ms');
  // Twilio's REST part too (rest.mjs), for any call, when the Worker's auth token is known.
  const devVars = fileURLToPath(new URL('../../.dev.vars', import.meta.url));
  const authToken = setting('TWILIO_AUTH_TOKEN', devVars);
  const rest = authToken ? new TwilioRest({ authToken, accountSid: setting('TWILIO_ACCOUNT_SID', devVars), anyCall: true }) : null;
  const s = new StandIn({ port, mode, rest, handshakeMs, rttMs });
  s.listen().then(
    () => {
      console.log(`stand-in Realtime server (${mode}) on ${s.url} — not OpenAI`);
      if (rest) console.log(`Twilio REST (call updates) on http://127.0.0.1:${s.port}${REST_PREFIX}`);
      rest?.on('update', ({ callSid, status, twiml }) => console.log(`Twilio REST: call ${callSid} updated: ${status ? `Status=${status}` : `Twiml=${twiml}`}`));
      rest?.on('refused', ({ status, message }) => console.log(`Twilio REST: refused ${status}: ${message}`));
      if (!quiet) {
        s.on('session', ({ session }) => console.log(`session ${session.index} opened (${session.handshake.path})`));
        s.on('heard', ({ text }) => console.log(`  caller: ${text}`));
        s.on('said', ({ text, status }) => console.log(`  agent:  ${text}${status === 'completed' ? '' : ` (${status})`}`));
        s.on('error_sent', ({ code, message }) => console.log(`  error sent: ${code}: ${message}`));
        s.on('closed', ({ session, code }) => console.log(`session ${session.index} closed (${code})`));
      }
    },
    (e) => {
      console.error(`stand-in: cannot listen on 127.0.0.1:${port}: ${e.message}`);
      process.exit(1);
    },
  );
  const stop = () => s.close().then(() => process.exit(0));
  process.on('SIGINT', stop);
  process.on('SIGTERM', stop);
}
