// Twilio's side of a call, as the simulator and the load benchmark play it: the signed voice
// webhook, the TwiML answer, the Media Streams WebSocket and Twilio's playback buffer.
// See shared protocol.md B1–B5.

import { createHmac, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import WebSocket from 'ws';

import { BYTES_PER_MS } from './audio.mjs';

// ---- settings ------------------------------------------------------------------------------

/**
 * One assignment of a .dev.vars / .env file, as wrangler reads .dev.vars (the `dotenv` 16
 * parser, no variable expansion): `[export ]KEY=value` or `KEY: value`, keys of letters,
 * digits, `_`, `.`, `-`. A value in '…', "…" or `…` runs to the closing quote (across lines
 * too) and may be followed by `# comment`; only "…" turns \n and \r into line breaks, and
 * nothing else is unescaped. A value without quotes ends at the first `#` (a comment) and is
 * trimmed. A line that is none of these (a comment, a stray word) is skipped; a later
 * assignment of a key wins.
 */
const DOTENV_ASSIGNMENT =
  /^\s*(?:export\s+)?([\w.-]+)(?:\s*=\s*?|:\s+?)(\s*'(?:\\'|[^'])*'|\s*"(?:\\"|[^"])*"|\s*`(?:\\`|[^`])*`|[^#\r\n]+)?\s*(?:#.*)?$/gm;

/** KEY=value pairs of a .dev.vars / .env file, as wrangler reads them (see above). */
export function parseDotenv(text) {
  const out = {};
  const src = text.replace(/\r\n?/g, '\n');
  for (const m of src.matchAll(DOTENV_ASSIGNMENT)) {
    let v = (m[2] ?? '').trim();
    const quote = v[0];
    const unquoted = /^(['"`])([\s\S]*)\1$/.exec(v);
    if (unquoted) v = unquoted[2];
    if (quote === '"') v = v.replace(/\\n/g, '\n').replace(/\\r/g, '\r');
    out[m[1]] = v;
  }
  return out;
}

/**
 * The Worker's PUBLIC_BASE_URL as it reads it (src/config.rs): from the environment, else
 * .dev.vars, else wrangler.toml's [vars]; without a trailing `/`, and `https` for plain
 * `http` on a host that is not this machine. `{ url }`, `{ url: null }` when unset, or
 * `{ url: null, invalid }` when the Worker would set it aside.
 */
export function publicBaseUrl(devVarsPath, wranglerTomlPath) {
  let v = setting('PUBLIC_BASE_URL', devVarsPath);
  if (v === undefined) {
    try {
      const toml = readFileSync(wranglerTomlPath, 'utf8');
      const vars = /^\[vars\][^\S\n]*$([\s\S]*?)(?=^\s*\[|(?![\s\S]))/m.exec(toml)?.[1] ?? '';
      const m = /^\s*PUBLIC_BASE_URL\s*=\s*(?:"([^"]*)"|'([^']*)')/m.exec(vars);
      if (m) v = m[1] ?? m[2];
    } catch {
      // no wrangler.toml: unset
    }
  }
  v = (v ?? '').trim();
  if (!v) return { url: null };
  const m = /^(https?):\/\/([^/?#\s]+)([^?#\s]*)$/.exec(v);
  if (!m) return { url: null, invalid: `${JSON.stringify(v)} is not an http(s) base URL without a query` };
  const host = m[2].replace(/^.*@/, '').replace(/:\d+$/, '').replace(/^\[(.*)\]$/, '$1');
  const loopback = /^(localhost|127(\.\d+){3}|::1)$/i.test(host);
  const scheme = m[1] === 'http' && !loopback ? 'https' : m[1];
  return { url: `${scheme}://${m[2]}${m[3]}`.replace(/\/+$/, '') };
}

/** A setting from the environment, else from .dev.vars (the Worker's local secrets). */
export function setting(name, devVarsPath) {
  if (process.env[name] !== undefined && process.env[name] !== '') return process.env[name];
  try {
    return parseDotenv(readFileSync(devVarsPath, 'utf8'))[name];
  } catch {
    return undefined;
  }
}

// ---- ids -----------------------------------------------------------------------------------

/** `prefix` + 32 hex digits, like Twilio's sids. */
export function sid(prefix) {
  return prefix + randomBytes(16).toString('hex');
}

// ---- request signing (protocol.md B5) ------------------------------------------------------

function codePointCompare(a, b) {
  const x = Array.from(a);
  const y = Array.from(b);
  for (let i = 0; i < Math.min(x.length, y.length); i++) {
    const d = x[i].codePointAt(0) - y[i].codePointAt(0);
    if (d) return d;
  }
  return x.length - y.length;
}

/**
 * X-Twilio-Signature: base64(HMAC-SHA1(authToken, url + name1 + value1 + …)) over the unique
 * parameter names in code-point order, each followed by its unique values in order.
 */
export function signature(authToken, url, params = []) {
  const byName = new Map();
  for (const [k, v] of params) {
    if (!byName.has(k)) byName.set(k, new Set());
    byName.get(k).add(v);
  }
  let s = url;
  for (const name of [...byName.keys()].sort(codePointCompare)) {
    for (const value of [...byName.get(name)].sort(codePointCompare)) s += name + value;
  }
  return createHmac('sha1', Buffer.from(authToken, 'utf8')).update(Buffer.from(s, 'utf8')).digest('base64');
}

// ---- the voice webhook ---------------------------------------------------------------------

/** The form Twilio posts for an incoming call. */
export function voiceParams({ callSid, accountSid, from, to }) {
  return [
    ['AccountSid', accountSid],
    ['ApiVersion', '2010-04-01'],
    ['CallSid', callSid],
    ['CallStatus', 'ringing'],
    ['Called', to],
    ['Caller', from],
    ['Direction', 'inbound'],
    ['From', from],
    ['FromCountry', 'JP'],
    ['To', to],
    ['ToCountry', 'JP'],
  ];
}

/** How long Twilio waits for the voice webhook's answer before it gives up on the call. */
export const VOICE_WEBHOOK_TIMEOUT_MS = 15_000;

/**
 * The form of Twilio's status callback at the end of a call (protocol.md C2): the call's
 * parameters with `CallStatus` (completed), `CallDuration` (seconds), `Duration` (billed
 * minutes), `Timestamp`, `CallbackSource` and `SequenceNumber`.
 */
export function statusParams(call, { status = 'completed', durationS }) {
  return [
    ...voiceParams(call).filter(([k]) => k !== 'CallStatus'),
    ['CallStatus', status],
    ['CallDuration', String(durationS)],
    ['Duration', String(Math.max(1, Math.ceil(durationS / 60)))],
    ['Timestamp', new Date().toUTCString().replace('GMT', '+0000')],
    ['CallbackSource', 'call-progress-events'],
    ['SequenceNumber', '0'],
  ];
}

/**
 * POSTs a signed webhook (the voice webhook, the status callback) to `url`, signed over
 * `signedUrl` (the URL Twilio was given, on PUBLIC_BASE_URL; `url` itself by default);
 * resolves to `{ status, body }`.
 */
export async function postVoiceWebhook(url, authToken, params, timeoutMs = VOICE_WEBHOOK_TIMEOUT_MS, signedUrl = url) {
  const body = new URLSearchParams(params).toString();
  const res = await fetch(url, {
    method: 'POST',
    headers: {
      'Content-Type': 'application/x-www-form-urlencoded',
      'X-Twilio-Signature': signature(authToken, signedUrl, params),
      'User-Agent': 'TwilioProxy/1.1 (phone-agent-bridge call simulator)',
    },
    body,
    signal: AbortSignal.timeout(timeoutMs),
  });
  return { status: res.status, body: await res.text() };
}

function xmlUnescape(s) {
  return s.replace(/&(lt|gt|amp|quot|apos|#x[0-9a-fA-F]+|#[0-9]+);/g, (_, e) => {
    switch (e) {
      case 'lt': return '<';
      case 'gt': return '>';
      case 'amp': return '&';
      case 'quot': return '"';
      case 'apos': return "'";
      default:
        return String.fromCodePoint(e[1] === 'x' ? parseInt(e.slice(2), 16) : parseInt(e.slice(1), 10));
    }
  });
}

function attrs(tag) {
  const out = {};
  for (const m of tag.matchAll(/([A-Za-z_:][-A-Za-z0-9_:.]*)\s*=\s*("([^"]*)"|'([^']*)')/g)) {
    out[m[1]] = xmlUnescape(m[3] ?? m[4]);
  }
  return out;
}

/**
 * What the simulator needs from the TwiML answer: the `<Connect><Stream url>`, its
 * `<Parameter>`s, and what Twilio would do after the stream (`<Say>` text, `<Dial>` number).
 */
export function parseTwiml(xml) {
  const streamTag = /<Stream\b([^>]*?)\/?>/.exec(xml);
  const params = [];
  if (streamTag) {
    const streamBody = /<Stream\b[^>]*>([\s\S]*?)<\/Stream>/.exec(xml);
    for (const m of (streamBody ? streamBody[1] : '').matchAll(/<Parameter\b([^>]*?)\/?>/g)) {
      const a = attrs(m[1]);
      if (a.name !== undefined) params.push([a.name, a.value ?? '']);
    }
  }
  const says = [...xml.matchAll(/<Say\b[^>]*>([\s\S]*?)<\/Say>/g)].map((m) => xmlUnescape(m[1]));
  const dials = [...xml.matchAll(/<Dial\b[^>]*>([\s\S]*?)<\/Dial>/g)].map((m) => xmlUnescape(m[1]).trim());
  return {
    streamUrl: streamTag ? attrs(streamTag[1]).url : undefined,
    parameters: params,
    says,
    dials,
  };
}

// ---- Twilio's playback buffer --------------------------------------------------------------

/**
 * Twilio's outbound audio queue, played in real time at 8 bytes/ms. A mark is echoed once
 * everything queued before it has played; `clear` empties the queue and echoes every pending
 * mark at once. The owner calls `advance(now)` often (a timer) and before each new frame.
 * `onPlayed(bytes, atMs)` receives each played piece with the time it started playing, once
 * it has played (or been cut by `clear`); `onAudible(bytes)` receives the same audio as it
 * plays, in the pieces that became audible since the last `advance` (for a live speaker);
 * `onMark(name, played)` each echo.
 */
export class Player {
  constructor({ onPlayed = () => {}, onAudible = () => {}, onMark = () => {} } = {}) {
    this.queue = []; // { audio: Buffer, offset, heard } | { mark: string }
    this.headStarted = null; // when the audio at the head started (ms); null when idle
    this.onPlayed = onPlayed;
    this.onAudible = onAudible;
    this.onMark = onMark;
    this.playedBytes = 0;
    this.discardedBytes = 0;
    this.queuedBytes = 0;
    this.unplayedBytes = 0;
    this.ended = false;
    this.lastAudioAt = null;
  }

  /** True while audio is queued. */
  busy() {
    return this.queuedBytes > 0;
  }

  media(bytes, now) {
    if (this.ended) {
      this.unplayedBytes += bytes.length;
      return;
    }
    this.advance(now);
    this.queue.push({ audio: bytes, offset: 0, heard: 0 });
    this.queuedBytes += bytes.length;
    this.lastAudioAt = now;
    this.advance(now);
  }

  mark(name, now) {
    if (this.ended) return;
    this.advance(now);
    this.queue.push({ mark: name });
    this.advance(now);
  }

  /** Empties the queue; returns the marks flushed (already echoed). */
  clear(now) {
    this.advance(now);
    const flushed = [];
    for (const q of this.queue) {
      if (q.mark !== undefined) flushed.push(q.mark);
    }
    this.#keepPlayedHead(now);
    for (const q of this.queue) if (q.audio) this.discardedBytes += q.audio.length - q.offset;
    this.#empty();
    for (const m of flushed) this.onMark(m, false);
    return flushed;
  }

  /**
   * The call ended (Twilio's `stop`): what played of the piece playing now is kept, as a
   * `clear` keeps it; the rest is never played (`unplayedBytes`) and no mark is echoed.
   * Audio that comes later is not played either.
   */
  hangUp(now) {
    this.advance(now);
    this.#keepPlayedHead(now);
    for (const q of this.queue) if (q.audio) this.unplayedBytes += q.audio.length - q.offset;
    this.#empty();
    this.ended = true;
  }

  /** The partly played head: hands on what of it has played by `now`. */
  #keepPlayedHead(now) {
    const head = this.queue.find((q) => q.audio);
    if (head && this.headStarted !== null && head === this.queue[0]) {
      const played = Math.min(head.audio.length - head.offset, Math.floor((now - this.headStarted) * BYTES_PER_MS));
      if (played > 0) {
        this.#audible(head, head.offset + played);
        this.onPlayed(head.audio.subarray(head.offset, head.offset + played), this.headStarted);
        this.playedBytes += played;
        head.offset += played;
      }
    }
  }

  #empty() {
    this.queue = [];
    this.queuedBytes = 0;
    this.headStarted = null;
  }

  /** Plays everything due by `now` (ms). */
  advance(now) {
    while (this.queue.length) {
      const head = this.queue[0];
      if (head.mark !== undefined) {
        this.queue.shift();
        this.onMark(head.mark, true);
        continue;
      }
      if (this.headStarted === null) this.headStarted = now;
      const left = head.audio.length - head.offset;
      const end = this.headStarted + left / BYTES_PER_MS;
      if (end > now) {
        this.#audible(head, head.offset + Math.floor((now - this.headStarted) * BYTES_PER_MS));
        break;
      }
      this.#audible(head, head.audio.length);
      this.onPlayed(head.audio.subarray(head.offset), this.headStarted);
      this.playedBytes += left;
      this.queuedBytes -= head.audio.length;
      this.queue.shift();
      this.headStarted = end;
    }
    if (!this.queue.length) this.headStarted = null;
  }

  /** Hands `onAudible` the part of `head` up to `upTo` it has not had yet. */
  #audible(head, upTo) {
    if (upTo > head.heard) {
      this.onAudible(head.audio.subarray(head.heard, upTo));
      head.heard = upTo;
    }
  }
}

// ---- the media stream ----------------------------------------------------------------------

/**
 * Opens the `<Stream url>` WebSocket with X-Twilio-Signature (signed over the URL with no
 * parameters, protocol.md B5). Resolves to the open socket; rejects with the HTTP status
 * when the upgrade is refused.
 */
export function openMediaStream(url, authToken, timeoutMs = 30_000, signedUrl = url) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, {
      headers: { 'X-Twilio-Signature': signature(authToken, signedUrl, []) },
      handshakeTimeout: timeoutMs,
      perMessageDeflate: false,
    });
    ws.once('open', () => resolve(ws));
    ws.once('unexpected-response', (_req, res) => {
      let body = '';
      res.on('data', (c) => (body += c));
      res.on('end', () => reject(new Error(`media stream upgrade refused: HTTP ${res.statusCode} ${body.trim()}`)));
    });
    ws.once('error', (e) => reject(e));
  });
}

/** Frames Twilio sends, with string `sequenceNumber`s from 1 (`connected` has none). */
export class TwilioFrames {
  constructor({ accountSid, callSid, streamSid }) {
    Object.assign(this, { accountSid, callSid, streamSid });
    this.seq = 0;
    this.chunk = 0;
  }

  connected() {
    return JSON.stringify({ event: 'connected', protocol: 'Call', version: '1.0.0' });
  }

  start(customParameters) {
    return JSON.stringify({
      event: 'start',
      sequenceNumber: String(++this.seq),
      start: {
        accountSid: this.accountSid,
        streamSid: this.streamSid,
        callSid: this.callSid,
        tracks: ['inbound'],
        mediaFormat: { encoding: 'audio/x-mulaw', sampleRate: 8000, channels: 1 },
        customParameters: Object.fromEntries(customParameters),
      },
      streamSid: this.streamSid,
    });
  }

  /** One inbound media frame; `timestamp` is ms of audio since the stream start. */
  media(payloadBase64) {
    const chunk = ++this.chunk;
    return JSON.stringify({
      event: 'media',
      sequenceNumber: String(++this.seq),
      media: { track: 'inbound', chunk: String(chunk), timestamp: String((chunk - 1) * 20), payload: payloadBase64 },
      streamSid: this.streamSid,
    });
  }

  mark(name) {
    return JSON.stringify({ event: 'mark', sequenceNumber: String(++this.seq), streamSid: this.streamSid, mark: { name } });
  }

  /** A keypad press on the caller's phone (bidirectional streams only, protocol.md B1). */
  dtmf(digit) {
    return JSON.stringify({ event: 'dtmf', streamSid: this.streamSid, sequenceNumber: String(++this.seq), dtmf: { track: 'inbound_track', digit } });
  }

  stop() {
    return JSON.stringify({
      event: 'stop',
      sequenceNumber: String(++this.seq),
      stop: { accountSid: this.accountSid, callSid: this.callSid },
      streamSid: this.streamSid,
    });
  }
}

/** Milliseconds on the monotonic clock (shared by all processes on the machine). */
export function nowMs() {
  return Number(process.hrtime.bigint()) / 1e6;
}
