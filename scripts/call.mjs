#!/usr/bin/env node
// Call simulator: places a phone call against the local Worker exactly as Twilio does, with
// no phone. See `node scripts/call.mjs --help`.
//
//   npm run call -- --audio samples/caller-ja.wav [--offline] [--out agent.wav]
//   npm run call -- --mic [--offline]          (talk into the microphone, hear the agent)
//
// 1. POSTs the voice webhook (form params of an incoming call) signed with X-Twilio-Signature
//    (HMAC-SHA1 with TWILIO_AUTH_TOKEN from the environment or .dev.vars, protocol.md B5).
// 2. Opens the <Stream url> of the TwiML answer with the signed header and speaks Media
//    Streams: connected, start (customParameters = the <Parameter>s), real-time paced 20 ms
//    μ-law media frames (the WAV file, resampled to 8 kHz, or the microphone), silence, stop.
// 3. Plays Twilio's part for the agent's audio: queued and played at 8 bytes/ms, marks
//    echoed when played, `clear` flushes and echoes pending marks. What was played is
//    written to --out (16-bit PCM WAV, 8 kHz) and, with --mic or --speaker, played on the
//    speaker as it plays (a `clear` cuts it off there too).
// 4. Plays Twilio's REST API for the Worker's call updates (scripts/sim/rest.mjs): the
//    agent's hang-up or transfer stops the stream as Twilio does. At the end it posts the
//    signed status callback (CallStatus=completed, CallDuration).
// 5. Prints the transcript: with --offline, what the local stand-in Realtime server heard and
//    said as it happens; otherwise the Worker's stored transcript (admin API, ADMIN_TOKEN),
//    polled during the call and printed in full at the end.

import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { setTimeout as delay } from 'node:timers/promises';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

import { FRAME_BYTES, MULAW_SILENCE, encodeWav16, mulawToInt16, wavToMulaw8k } from './sim/audio.mjs';
import { openMicrophone, openSpeaker, readKeypad } from './sim/devices.mjs';
import { REST_PREFIX, TwilioRest } from './sim/rest.mjs';
import { DEFAULT_PORT, StandIn } from './sim/standin.mjs';
import { Player, TwilioFrames, VOICE_WEBHOOK_TIMEOUT_MS, nowMs, openMediaStream, parseTwiml, postVoiceWebhook, publicBaseUrl, setting, sid, statusParams, voiceParams } from './sim/twilio.mjs';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');

const HELP = `Call simulator: a phone call to the local Worker, played exactly as Twilio would.

usage: npm run call -- --audio FILE.wav [options]
       npm run call -- --mic [options]
       node scripts/call.mjs --audio FILE.wav [options]

  --audio FILE        what the caller says: a WAV file of any common rate, channel count and
                      sample format (PCM 8/16/24/32-bit, float, μ-law, A-law); resampled to
                      8 kHz μ-law. Default: samples/caller-ja.wav
  --mic               the caller talks into the microphone instead, live, until Ctrl-C (or
                      --duration); the agent is heard on the speaker. Captured with sox,
                      arecord or ffmpeg, whichever is on PATH (the default input device).
                      Wear headphones: the agent's voice picked up by the microphone would
                      interrupt it (a barge-in). Keys 0-9, * and # typed during the call
                      (or piped in) are pressed on the phone's keypad (Twilio's dtmf)
  --mic-command CMD   capture with this shell command instead: it must print raw 8 kHz
                      mono signed 16-bit little-endian PCM on stdout, e.g.
                      "sox -q -d -t raw -r 8000 -c 1 -b 16 -e signed-integer -L -"
  --duration S        with --mic: hang up after S seconds (default: at Ctrl-C)
  --speaker           play the agent's audio on the speaker (the default with --mic), with
                      sox, aplay or ffplay
  --no-speaker        do not (the agent's audio still goes to --out)
  --speaker-command CMD  play with this shell command instead: it reads raw 8 kHz μ-law on
                      stdin, in real time
  --offline           start the local stand-in Realtime server (not OpenAI) on 127.0.0.1:PORT;
                      the Worker must point at it: start it with \`npm run dev:offline\`
  --standin-port N    port of the stand-in (default ${DEFAULT_PORT}); it also plays Twilio's REST
                      API (the agent's hang-up, transfer) under /twilio, for a Worker started
                      with TWILIO_API_BASE_URL=http://127.0.0.1:N/twilio (npm run dev:offline);
                      without --offline that REST part alone, when the port is free
  --out FILE          the agent's audio as the caller heard it (default agent.wav)
  --recording FILE    also write both sides as a stereo WAV (left caller, right agent)
  --url URL           the Worker (default http://127.0.0.1:8787)
  --from NUMBER       caller number (default +819012345678)
  --to NUMBER         called number; picks the agent (default +815012345678)
  --press KEYS[@S]    the caller presses these keys (0-9, *, #) on the phone's keypad, one
                      every 0.5 s (Twilio's dtmf messages): S seconds after they start
                      speaking, or once their audio has ended when no @S is given; may be
                      given more than once. With --mic, @S is needed (seconds after the
                      microphone goes live), or type the keys during the call. The offline
                      stand-in cannot understand words:
                      0 makes it call the agent's transfer_call, # its end_call,
                      1-9 the agent's own (webhook) tools, in the order listed
  --lead-in S|auto    when the caller speaks: S seconds into the agent's greeting (from its
                      first audio), 0 at once, or auto = once the greeting has played; at
                      most 10 s of silence before. 1 makes the caller talk over the
                      greeting as it plays (a barge-in). Default auto
  --tail S            silence after the caller's audio, at least (default 3); the call goes on
                      while the agent is still answering, up to --max-tail (default 30)
  --dev-vars FILE     where TWILIO_AUTH_TOKEN and ADMIN_TOKEN are read when not in the
                      environment (default .dev.vars)
  --quiet             print only the transcript and the summary
  -h, --help          this text

Ctrl-C hangs up (Twilio's stop); a second Ctrl-C quits at once.
Exit status: 0 call completed; 1 usage or setup error (no microphone, no Worker); 2 the call
failed (webhook refused or unanswered within 15 s as Twilio waits, stream refused or ended by
the Worker, no agent audio).`;

function parseArgs(argv) {
  const o = {
    audio: join(ROOT, 'samples/caller-ja.wav'),
    offline: false,
    standinPort: DEFAULT_PORT,
    out: userPath('agent.wav'),
    recording: null,
    url: 'http://127.0.0.1:8787',
    from: '+819012345678',
    to: '+815012345678',
    leadIn: 'auto',
    tail: 3,
    maxTail: 30,
    devVars: join(ROOT, '.dev.vars'),
    quiet: false,
    mic: false,
    micCommand: null,
    duration: null,
    speaker: null, // null: on with --mic, off otherwise
    speakerCommand: null,
    presses: [], // { keys, atS: seconds after the caller starts speaking, or null: after their audio }
  };
  const need = (i, name) => {
    if (i + 1 >= argv.length) throw new Error(`${name} needs a value`);
    return argv[i + 1];
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const [flag, inline] = a.startsWith('--') && a.includes('=') ? [a.slice(0, a.indexOf('=')), a.slice(a.indexOf('=') + 1)] : [a, undefined];
    const val = () => (inline !== undefined ? inline : need(i++, flag));
    switch (flag) {
      case '-h': case '--help': o.help = true; break;
      case '--audio': o.audio = userPath(val()); o.audioGiven = true; break;
      case '--offline': o.offline = true; break;
      case '--standin-port': o.standinPort = Number(val()); break;
      case '--out': o.out = userPath(val()); break;
      case '--recording': o.recording = userPath(val()); break;
      case '--url': o.url = val().replace(/\/+$/, ''); break;
      case '--from': o.from = val(); break;
      case '--to': o.to = val(); break;
      case '--lead-in': o.leadIn = val(); break;
      case '--tail': o.tail = Number(val()); break;
      case '--max-tail': o.maxTail = Number(val()); break;
      case '--dev-vars': o.devVars = userPath(val()); break;
      case '--quiet': o.quiet = true; break;
      case '--mic': case '--microphone': o.mic = true; break;
      case '--mic-command': o.mic = true; o.micCommand = val(); break;
      case '--duration': o.duration = Number(val()); break;
      case '--speaker': o.speaker = true; break;
      case '--no-speaker': o.speaker = false; break;
      case '--speaker-command': o.speaker = true; o.speakerCommand = val(); break;
      case '--press': {
        const v = val();
        const m = /^([0-9*#]+)(?:@(\d+(?:\.\d+)?))?$/.exec(v);
        if (!m) throw new Error(`--press takes keys (0-9, *, #), optionally @seconds, e.g. --press 0 or --press 12#@4; got ${v}`);
        o.presses.push({ keys: m[1], atS: m[2] === undefined ? null : Number(m[2]) });
        break;
      }
      default: throw new Error(`unknown option ${a} (see --help)`);
    }
  }
  if (o.leadIn !== 'auto' && !(Number(o.leadIn) >= 0)) throw new Error('--lead-in takes seconds or auto');
  if (!(o.tail >= 0) || !(o.maxTail >= o.tail)) throw new Error('--tail/--max-tail must be seconds, max ≥ tail');
  if (!(o.standinPort > 0 && o.standinPort < 65536)) throw new Error('--standin-port must be a port number');
  if (o.duration !== null && !(o.duration > 0)) throw new Error('--duration takes seconds');
  if (o.duration !== null && !o.mic) throw new Error('--duration is for --mic (a WAV file ends by itself)');
  if (o.mic && o.presses.some((p) => p.atS === null)) throw new Error('--press with --mic needs @S (seconds after the microphone goes live)');
  if (o.audioGiven && o.mic) throw new Error('give --audio or --mic, not both');
  if (o.speaker === null) o.speaker = o.mic;
  return o;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, Math.max(0, ms)));

/** Waits `ms`, or less if `signal` aborts (its listener goes with the timer). */
const sleepUnless = (ms, signal) => delay(Math.max(0, ms), undefined, { signal }).catch(() => {});

/** A path the user gave, against the directory they ran the command in (`npm run` itself
 * runs in the project's root and says where it was started in INIT_CWD). */
const userPath = (p) => resolve(process.env.INIT_CWD || process.cwd(), p);

class CallFailed extends Error {}

async function main() {
  let opt;
  try {
    opt = parseArgs(process.argv.slice(2));
  } catch (e) {
    console.error(`call: ${e.message}`);
    return 1;
  }
  if (opt.help) {
    console.log(HELP);
    return 0;
  }
  const info = (...a) => opt.quiet || console.log(...a);

  // ---- settings and audio ----
  const authToken = setting('TWILIO_AUTH_TOKEN', opt.devVars);
  const adminToken = setting('ADMIN_TOKEN', opt.devVars);
  const accountSid = setting('TWILIO_ACCOUNT_SID', opt.devVars);
  // Twilio signs over the URLs it was given: on PUBLIC_BASE_URL when the Worker has one.
  const pub = publicBaseUrl(opt.devVars, join(ROOT, 'wrangler.toml'));
  if (pub.invalid) info(`PUBLIC_BASE_URL ${pub.invalid}: the Worker sets it aside, so the simulator signs over --url`);
  opt.publicBase = pub.url;
  if (!authToken) {
    console.error(`call: TWILIO_AUTH_TOKEN is not set (environment or ${opt.devVars}); the Worker refuses unsigned webhooks.`);
    return 1;
  }
  let caller = null;
  let mic = null;
  if (opt.mic) {
    try {
      mic = await openMicrophone({ command: opt.micCommand });
    } catch (e) {
      console.error(`call: ${e.message}`);
      return 1;
    }
    info(`caller audio: the microphone (${opt.micCommand ? `\`${opt.micCommand}\`` : mic.dev.name}) → live 8 kHz μ-law; Ctrl-C hangs up. Wear headphones.`);
  } else {
    try {
      caller = wavToMulaw8k(readFileSync(opt.audio));
    } catch (e) {
      console.error(`call: cannot read ${opt.audio}: ${e.message}`);
      return 1;
    }
    const src = caller.source;
    info(`caller audio: ${opt.audio} (${src.sampleRate} Hz, ${src.channels} ch, ${src.bitsPerSample}-bit) → ${caller.seconds.toFixed(2)} s of 8 kHz μ-law`);
  }
  try {
    return await run(opt, { authToken, adminToken, accountSid, caller, mic, info });
  } finally {
    mic?.close();
  }
}

async function run(opt, { authToken, adminToken, accountSid, caller, mic, info }) {

  // Is the Worker there?
  try {
    const r = await fetch(`${opt.url}/healthz`, { signal: AbortSignal.timeout(5000) });
    if (!r.ok) throw new Error(`GET /healthz answered ${r.status}`);
  } catch (e) {
    console.error(`call: the Worker does not answer at ${opt.url} (${e.cause?.code ?? e.message}).`);
    console.error(opt.offline ? '      Start it first:  npm run dev:offline' : '      Start it first:  npm run dev');
    return 1;
  }

  // ---- the stand-in ----
  let standin = null;
  let t0 = null; // stream start, ms (monotonic)
  const stamp = () => (t0 === null ? '  --- ' : `${((nowMs() - t0) / 1000).toFixed(1).padStart(5)}s`);
  const say = (who, text) => console.log(`[${stamp()}] ${who.padEnd(6)} ${text}`);
  const state = { standinSessions: 0, agentAudioBytes: 0, responsesPending: 0, standinSpeaking: false };
  // Twilio's REST API (hang-up, transfer), served on the stand-in's port under /twilio.
  const rest = new TwilioRest({ authToken, accountSid });
  const restUrl = `http://127.0.0.1:${opt.standinPort}${REST_PREFIX}`;
  let restServer = null;
  if (opt.offline) {
    standin = new StandIn({ port: opt.standinPort, mode: 'conversation', rest });
    try {
      await standin.listen();
    } catch (e) {
      console.error(`call: cannot start the stand-in on 127.0.0.1:${opt.standinPort}: ${e.message}`);
      console.error('      Is another simulator running? Pick another port with --standin-port (and start the Worker to match).');
      return 1;
    }
    info(`stand-in Realtime server (offline, NOT OpenAI) listening on ${standin.url}`);
    info(`Twilio's REST API (the agent's hang-up and transfer) played at ${restUrl}`);
    standin.on('session', () => {
      state.standinSessions++;
      info(`[${stamp()}] the Worker connected to the stand-in`);
    });
    standin.on('session_updated', ({ config }) => {
      const a = config.audio ?? {};
      info(
        `[${stamp()}] stand-in session: in=${a.input?.format?.type} out=${a.output?.format?.type} voice=${a.output?.voice} ` +
          `turn_detection=${a.input?.turn_detection?.type ?? 'none'} transcription=${a.input?.transcription?.model ?? 'off'}`,
      );
    });
    standin.on('speech_started', () => info(`[${stamp()}] (stand-in VAD: caller speech started)`));
    standin.on('speech_stopped', () => info(`[${stamp()}] (stand-in VAD: caller speech stopped)`));
    standin.on('heard', ({ text }) => say('caller', text));
    standin.on('response_started', ({ text }) => {
      state.responsesPending++;
      say('agent', text);
    });
    standin.on('said', ({ status, reason, text }) => {
      state.responsesPending = Math.max(0, state.responsesPending - 1);
      if (status !== 'completed') say('agent', `(response ${status}${reason ? `: ${reason}` : ''}; generated so far: "${text}")`);
    });
    standin.on('tool_called', ({ name, arguments: args }) => say('agent', `(calls the tool ${name} ${args})`));
    standin.on('truncated', ({ audioEndMs, text }) => say('agent', `(cut by the caller after ${audioEndMs} ms; heard: "${text}")`));
    standin.on('error_sent', ({ code, message }) => info(`[${stamp()}] stand-in sent an error: ${code}: ${message}`));
  } else {
    // With the real API the REST part is served alone, when the port is free; the Worker
    // uses it when started with TWILIO_API_BASE_URL set to it.
    restServer = createServer((req, res) => {
      if (!rest.handle(req, res)) {
        res.writeHead(404, { 'content-type': 'text/plain' });
        res.end(`the call simulator serves Twilio's REST API under ${REST_PREFIX} only\n`);
      }
    });
    try {
      await new Promise((resolve, reject) => {
        restServer.once('error', reject);
        restServer.listen(opt.standinPort, '127.0.0.1', resolve);
      });
      info(`Twilio's REST API (the agent's hang-up and transfer) played at ${restUrl} (used when the Worker has TWILIO_API_BASE_URL=${restUrl})`);
    } catch (e) {
      restServer = null;
      info(`Twilio's REST API is not played (127.0.0.1:${opt.standinPort}: ${e.code ?? e.message}): the agent's hang-up or transfer goes wherever the Worker's TWILIO_API_BASE_URL says`);
    }
  }
  rest.on('refused', ({ status, code, message }) =>
    console.log(`[${stamp()}] Twilio REST: refused the Worker's call update: HTTP ${status} (${code}) ${message}`),
  );

  const ids = { callSid: sid('CA'), accountSid: sid('AC'), streamSid: sid('MZ') };
  // Twilio's status callback once the call is over (its stream ended, or it failed),
  // signed as the voice webhook is, to the path the Worker serves for it.
  let calledAt = null; // Date.now() when the voice webhook went out
  let statusSent = false;
  const statusCallback = async () => {
    if (statusSent || calledAt === null) return;
    statusSent = true;
    const durationS = Math.max(0, Math.round((Date.now() - calledAt) / 1000));
    const url = `${opt.url}/api/twilio/status`;
    const params = statusParams({ ...ids, from: opt.from, to: opt.to }, { durationS });
    try {
      // Twilio would wait 15 s; the call's outcome does not hang on it, so 5 s here.
      const r = await postVoiceWebhook(url, authToken, params, 5000, `${opt.publicBase ?? opt.url}/api/twilio/status`);
      const ok = r.status >= 200 && r.status < 300;
      const line = `Twilio: status callback (CallStatus=completed, CallDuration=${durationS}) answered HTTP ${r.status}${ok ? '' : `: ${r.body.trim().slice(0, 200)}`}`;
      ok ? info(line) : console.log(line);
    } catch (e) {
      console.log(`Twilio: status callback to ${url} got no answer (${e?.name === 'TimeoutError' ? 'timed out' : e?.cause?.code ?? e?.message})`);
    }
  };
  let exit = 0;
  try {
    exit = await placeCall(opt, {
      authToken, adminToken, caller, mic, ids, standin, rest, restUrl, state, info, say, statusCallback,
      setT0: (t) => (t0 = t),
      called: () => (calledAt = Date.now()),
    });
  } catch (e) {
    if (e instanceof CallFailed) {
      console.error(`call failed: ${e.message}`);
      await statusCallback();
      exit = 2;
    } else {
      throw e;
    }
  } finally {
    if (standin) await standin.close();
    if (restServer) await new Promise((r) => restServer.close(() => r()));
  }
  return exit;
}

async function placeCall(opt, ctx) {
  const { authToken, adminToken, caller, mic, ids, standin, rest, restUrl, state, info, say, statusCallback } = ctx;

  // ---- the voice webhook ----
  const voiceUrl = `${opt.url}/api/twilio/voice`;
  info(`call ${ids.callSid}: ${opt.from} → ${opt.to}`);
  rest.expect(ids);
  // Twilio posts to the public URL and signs over it; the simulator posts to --url.
  const signedBase = opt.publicBase ?? opt.url;
  if (opt.publicBase) info(`PUBLIC_BASE_URL=${opt.publicBase}: webhooks and the stream are signed over it, and sent to ${opt.url}`);
  let hook;
  ctx.called();
  try {
    hook = await postVoiceWebhook(voiceUrl, authToken, voiceParams({ ...ids, from: opt.from, to: opt.to }), undefined, `${signedBase}/api/twilio/voice`);
  } catch (e) {
    if (e?.name === 'TimeoutError') {
      throw new CallFailed(
        `the voice webhook did not answer within ${VOICE_WEBHOOK_TIMEOUT_MS / 1000} s: Twilio gives up then and ` +
          'the caller hears "an application error has occurred" (is the Worker stuck? see its log)',
      );
    }
    const why = e?.cause?.code ?? e?.cause?.message ?? e?.message ?? String(e);
    throw new CallFailed(
      `the voice webhook got no answer (${why}): the Worker at ${opt.url} answered /healthz, then stopped answering ` +
        '(did it crash or restart? see its log)',
    );
  }
  if (hook.status !== 200) {
    throw new CallFailed(`voice webhook answered HTTP ${hook.status}: ${hook.body.trim().slice(0, 300)}`);
  }
  const twiml = parseTwiml(hook.body);
  if (!twiml.streamUrl) {
    info(
      'the Worker answered without a media stream: FALLBACK_ONLY is on, or the signature did not verify ' +
        '(twilio.voice_unverified in its log: is TWILIO_AUTH_TOKEN the one the Worker uses? the simulator ' +
        'reads the environment, then .dev.vars. And is PUBLIC_BASE_URL the same for both? it signs over ' +
        `${signedBase}/api/twilio/voice, reading PUBLIC_BASE_URL from the environment, .dev.vars, then ` +
        "wrangler.toml's [vars]; a --var given to wrangler dev it cannot see). Twilio would now:",
    );
    for (const s of twiml.says) info(`  <Say> ${s}`);
    for (const d of twiml.dials) info(`  <Dial> ${d}`);
    throw new CallFailed('no <Connect><Stream> in the TwiML answer');
  }
  info(`TwiML: <Stream url="${twiml.streamUrl}"> with ${twiml.parameters.map(([k, v]) => `${k}=${v}`).join(', ') || 'no parameters'}`);

  // ---- the media stream ----
  // On PUBLIC_BASE_URL the <Stream url> is the public one: signed over as written, opened
  // on --url at the same path under it.
  let connectUrl = twiml.streamUrl;
  if (opt.publicBase) {
    const wsBase = opt.publicBase.replace(/^http/, 'ws');
    if (twiml.streamUrl.startsWith(`${wsBase}/`)) connectUrl = opt.url.replace(/^http/, 'ws') + twiml.streamUrl.slice(wsBase.length);
  }
  let ws;
  try {
    ws = await openMediaStream(connectUrl, authToken, undefined, twiml.streamUrl);
  } catch (e) {
    throw new CallFailed(e.message);
  }
  const frames = new TwilioFrames(ids);
  const t0 = nowMs();
  ctx.setT0(t0);
  const agentTimeline = { buf: Buffer.alloc(8000 * 60, MULAW_SILENCE), end: 0 };
  const put = (bytes, atMs) => {
    const pos = Math.max(0, Math.round((atMs - t0) * 8));
    const need = pos + bytes.length;
    if (need > agentTimeline.buf.length) {
      const bigger = Buffer.alloc(Math.max(need, agentTimeline.buf.length * 2), MULAW_SILENCE);
      agentTimeline.buf.copy(bigger);
      agentTimeline.buf = bigger;
    }
    bytes.copy(agentTimeline.buf, pos);
    agentTimeline.end = Math.max(agentTimeline.end, need);
  };
  const stats = { sent: 0, media: 0, marks: 0, echoedPlayed: 0, echoedFlushed: 0, clears: 0, presses: 0, problems: [] };
  // Twilio sends nothing after its `stop`: no marks echoed, no more audio played.
  let stopped = false;
  const send = (text) => {
    if (!stopped && ws.readyState === ws.OPEN) ws.send(text);
  };
  let speaker = null;
  if (opt.speaker) {
    const s = openSpeaker({ command: opt.speakerCommand, nowMs });
    if (s.error) {
      info(`speaker: ${s.error}; the agent's audio goes to ${opt.out} only`);
    } else {
      speaker = s.speaker;
      info(`speaker: ${opt.speakerCommand ? `\`${opt.speakerCommand}\`` : s.dev.name} plays the agent's audio as Twilio plays it`);
      speaker.on('failed', (why) => info(`speaker: ${why}; going on without it (the agent's audio still goes to ${opt.out})`));
    }
  }
  const player = new Player({
    onPlayed: put,
    onAudible: (bytes) => speaker?.play(bytes),
    onMark: (name, played) => {
      played ? stats.echoedPlayed++ : stats.echoedFlushed++;
      send(frames.mark(name));
    },
  });
  const ticker = setInterval(() => player.advance(nowMs()), 5);
  let closed = null;
  const closedPromise = new Promise((resolve) =>
    ws.on('close', (code, reason) => {
      closed = { code, reason: reason.toString(), at: nowMs() };
      resolve(closed);
    }),
  );
  ws.on('message', (data) => {
    const now = nowMs();
    let f;
    try {
      f = JSON.parse(data.toString());
    } catch {
      stats.problems.push('non-JSON frame from the Worker');
      return;
    }
    if (f.streamSid !== ids.streamSid) stats.problems.push(`${f.event} frame with streamSid ${f.streamSid}`);
    switch (f.event) {
      case 'media': {
        const bytes = Buffer.from(f.media?.payload ?? '', 'base64');
        stats.media++;
        state.agentAudioBytes += bytes.length;
        player.media(bytes, now);
        break;
      }
      case 'mark':
        stats.marks++;
        player.mark(f.mark?.name ?? '', now);
        break;
      case 'clear': {
        stats.clears++;
        const before = player.discardedBytes;
        const flushed = player.clear(now);
        info(`[${((now - t0) / 1000).toFixed(1).padStart(5)}s] Twilio: clear (barge-in) — ${((player.discardedBytes - before) / 8).toFixed(0)} ms of agent audio dropped, ${flushed.length} marks echoed`);
        break;
      }
      default:
        stats.problems.push(`unexpected event ${JSON.stringify(f.event)} from the Worker`);
    }
  });
  ws.on('error', (e) => stats.problems.push(`socket error: ${e.message}`));

  // Ctrl-C: the caller hangs up (Twilio's stop, and the call's results as usual). It cuts
  // short the wait for the next frame (an abortable timer, or the microphone's pending read).
  const hangingUp = new AbortController();
  let hungUpByCaller = false;
  const onSigint = () => {
    if (hungUpByCaller) process.exit(130);
    hungUpByCaller = true;
    console.error('\n(Ctrl-C: the caller hangs up; press it again to quit at once)');
    hangingUp.abort();
    mic?.stopWaiting();
  };
  process.on('SIGINT', onSigint);

  // The agent ends the call through Twilio's REST API: Twilio stops the stream as it does
  // when the caller hangs up (a hang-up), or after it (a transfer: the new TwiML's <Dial>).
  let agentEnded = null;
  rest.on('update', (u) => {
    if (u.callSid !== ids.callSid || agentEnded) return;
    const at = `[${((nowMs() - t0) / 1000).toFixed(1).padStart(5)}s]`;
    if (u.status === 'completed') {
      agentEnded = { what: 'the agent hung up' };
      info(`${at} Twilio REST: Status=completed — the agent hung up`);
    } else if (u.twiml !== undefined) {
      const t = parseTwiml(u.twiml);
      agentEnded = t.dials.length
        ? { what: `the agent transferred the call to ${t.dials.join(', ')}`, says: t.says, dials: t.dials }
        : { what: 'the agent redirected the call to new TwiML', says: t.says, dials: [] };
      info(`${at} Twilio REST: new TwiML — ${agentEnded.what}`);
      for (const x of t.says) info(`  <Say> ${x}`);
      for (const d of t.dials) info(`  <Dial> ${d} (Twilio would dial this number now)`);
    } else {
      agentEnded = { what: `the agent redirected the call to ${u.url}` };
      info(`${at} Twilio REST: Url=${u.url} — ${agentEnded.what}`);
    }
    hangingUp.abort();
    mic?.stopWaiting();
  });

  send(frames.connected());
  send(frames.start(twiml.parameters));

  // Live transcript from the Worker's store (real OpenAI): poll the admin API.
  const printed = new Set();
  const printEntries = (entries) => {
    for (const e of entries) {
      const key = `${e.seq}:${e.text}`;
      if (printed.has(key)) continue;
      printed.add(key);
      const who = e.role === 'agent' ? 'agent' : 'caller';
      console.log(`[${(e.offset_ms / 1000).toFixed(1).padStart(5)}s] ${who.padEnd(6)} ${e.text}${e.interrupted ? '  (interrupted)' : ''}`);
    }
  };
  let polling = null;
  if (!standin && adminToken) {
    polling = setInterval(async () => {
      const d = await fetchCall(opt.url, adminToken, ids.callSid).catch(() => null);
      if (d?.transcript) printEntries(d.transcript);
    }, 1500);
  }

  // ---- the caller's audio, paced in real time ----
  const silence = Buffer.alloc(FRAME_BYTES, MULAW_SILENCE);
  let i = 0;
  // Keypad presses (--press), on the frames' clock: each key is a dtmf message between two
  // media frames, as Twilio sends them, one key every 500 ms (25 frames).
  const presses = []; // { at: frames sent before it, key }, in order
  let lastPressAt = null;
  const schedulePresses = (afterAudio) => {
    for (const p of opt.presses) {
      if ((p.atS === null) !== afterAudio) continue;
      const base = i + (p.atS === null ? 0 : Math.round(p.atS * 50));
      [...p.keys].forEach((key, k) => presses.push({ at: base + k * 25, key }));
    }
    presses.sort((a, b) => a.at - b.at);
  };
  const sendFrame = async (frame) => {
    await sleepUnless(t0 + 20 * i - nowMs(), hangingUp.signal);
    if (closed || hungUpByCaller || agentEnded) return false;
    // The keys due once `i` frames have gone, before the next.
    while (presses.length && presses[0].at <= i) {
      const { key } = presses.shift();
      send(frames.dtmf(key));
      stats.presses++;
      lastPressAt = nowMs();
      info(`[${((lastPressAt - t0) / 1000).toFixed(1).padStart(5)}s] caller presses ${key} on the keypad (Twilio: dtmf)`);
    }
    send(frames.media(frame.toString('base64')));
    stats.sent++;
    i++;
    return true;
  };
  const callerTimeline = [];
  const agentQuiet = (ms) =>
    !player.busy() && state.responsesPending === 0 && (player.lastAudioAt === null || nowMs() - player.lastAudioAt >= ms);

  const speaking = () => !closed && !hungUpByCaller && !agentEnded;
  if (mic) {
    // The microphone, live from the answer on (a phone line carries the greeting's silence
    // too): what it captured while the call was being set up is not sent.
    mic.discard();
    info(`[${((nowMs() - t0) / 1000).toFixed(1).padStart(5)}s] the microphone is live${opt.duration ? ` for ${opt.duration} s` : ''}; keys 0-9, * and # are pressed on the keypad; Ctrl-C hangs up`);
    schedulePresses(false);
    // A key typed goes before the next frame; keys typed together, 100 ms (5 frames) apart.
    let typedAt = -Infinity;
    const stopKeys = readKeypad((key) => {
      typedAt = Math.max(i, typedAt + 5);
      presses.push({ at: typedAt, key });
      presses.sort((a, b) => a.at - b.at);
    }, onSigint);
    try {
      while (speaking() && !(opt.duration && i * 20 >= opt.duration * 1000)) {
        const frame = await mic.next();
        if (!frame || !(await sendFrame(frame))) break;
        callerTimeline.push(frame);
      }
    } finally {
      stopKeys();
    }
    if (mic.ended && !closed && !agentEnded) info(`[${((nowMs() - t0) / 1000).toFixed(1).padStart(5)}s] ${mic.ended}: the caller hangs up`);
  }

  // Lead-in: silence while the greeting plays (auto), or for a time into it (counted from
  // its first audio, however long the agent takes to start), at most 10 s in all.
  const leadInMs = opt.leadIn === 'auto' ? null : Number(opt.leadIn) * 1000;
  let greetingFrom = null; // the frame count when the agent's first audio had come
  while (caller && speaking() && leadInMs !== 0) {
    const elapsed = i * 20;
    if (greetingFrom === null && state.agentAudioBytes > 0) greetingFrom = i;
    const intoGreeting = greetingFrom === null ? 0 : (i - greetingFrom) * 20;
    if (elapsed >= 10_000) break;
    if (leadInMs !== null ? greetingFrom !== null && intoGreeting >= leadInMs : elapsed >= 1000 && greetingFrom !== null && agentQuiet(600)) break;
    if (!(await sendFrame(silence))) break;
    callerTimeline.push(silence);
  }
  if (caller && speaking()) info(`[${((nowMs() - t0) / 1000).toFixed(1).padStart(5)}s] caller starts speaking (${caller.seconds.toFixed(1)} s)`);
  if (caller) schedulePresses(false);
  for (let off = 0; caller && off < caller.mulaw.length && speaking(); off += FRAME_BYTES) {
    let frame = caller.mulaw.subarray(off, off + FRAME_BYTES);
    if (frame.length < FRAME_BYTES) frame = Buffer.concat([frame, silence.subarray(frame.length)]);
    if (!(await sendFrame(frame))) break;
    callerTimeline.push(frame);
  }
  // Tail: silence while the agent answers. The stand-in says when its responses are done;
  // the real API is only seen through the Worker, so there the agent must have been heard
  // after the caller's last words (it can take a few seconds to start) before the caller
  // hangs up, or --max-tail pass.
  const tailStart = i;
  const callerDoneAt = nowMs();
  if (caller) schedulePresses(true);
  const answered = () => standin || (player.lastAudioAt ?? -Infinity) > callerDoneAt;
  // The agent's answer to the last key press has had time to start.
  const pressesDone = () => presses.length === 0 && (lastPressAt === null || nowMs() - lastPressAt >= 1500);
  while (caller && speaking()) {
    const tailMs = (i - tailStart) * 20;
    if (tailMs >= opt.maxTail * 1000) break;
    if (tailMs >= opt.tail * 1000 && agentQuiet(1500) && answered() && pressesDone()) break;
    if (!(await sendFrame(silence))) break;
    callerTimeline.push(silence);
  }

  let endedByWorker = closed;
  // The call is over: what played of the piece playing now goes to the WAV too.
  player.hangUp(nowMs());
  clearInterval(ticker);
  if (!closed) {
    send(frames.stop());
    stopped = true;
    info(`[${((nowMs() - t0) / 1000).toFixed(1).padStart(5)}s] Twilio: stop (${agentEnded ? agentEnded.what : 'the caller hung up'})`);
    await Promise.race([closedPromise, sleep(5000)]);
    if (!closed) ws.close(1000, 'call ended');
  }
  stopped = true;
  process.off('SIGINT', onSigint);
  if (polling) clearInterval(polling);
  speaker?.close();
  await statusCallback();

  // ---- results ----
  const played = agentTimeline.buf.subarray(0, agentTimeline.end);
  const outPath = resolve(opt.out);
  mkdirSync(dirname(outPath), { recursive: true });
  writeFileSync(outPath, encodeWav16([mulawToInt16(played)], 8000));
  if (opt.recording) {
    const callerBytes = Buffer.concat(callerTimeline);
    const n = Math.max(callerBytes.length, played.length);
    const left = new Int16Array(n);
    const right = new Int16Array(n);
    left.set(mulawToInt16(callerBytes));
    right.set(mulawToInt16(played));
    const recPath = resolve(opt.recording);
    mkdirSync(dirname(recPath), { recursive: true });
    writeFileSync(recPath, encodeWav16([left, right], 8000));
    info(`recording (left caller, right agent): ${recPath}`);
  }
  const secs = (b) => (b / 8000).toFixed(2);
  info('');
  info(`call summary: ${stats.sent} media frames sent (${secs(stats.sent * FRAME_BYTES)} s); agent audio received ${secs(state.agentAudioBytes)} s in ${stats.media} frames, played ${secs(player.playedBytes)} s, dropped by clear ${secs(player.discardedBytes)} s${player.unplayedBytes ? `, unplayed at the end of the call ${secs(player.unplayedBytes)} s` : ''}`);
  info(`              marks: ${stats.marks} received, ${stats.echoedPlayed} echoed as played, ${stats.echoedFlushed} flushed by ${stats.clears} clear(s)`);
  if (opt.presses.length || stats.presses) info(`              keypad: ${stats.presses} key(s) pressed${presses.length ? `, ${presses.length} not pressed (the call ended first)` : ''}`);
  if (mic) info(`              microphone: ${secs(mic.captured * FRAME_BYTES)} s captured (from before the answer on)`);
  if (speaker) info(`              speaker: ${secs(speaker.written)} s played${speaker.broken ? ` until it failed (${speaker.broken})` : ''}`);
  info(`agent audio written to ${outPath} (8 kHz 16-bit PCM, ${secs(played.length)} s, silence where the agent was not speaking)`);
  if (stats.problems.length) info(`protocol problems: ${[...new Set(stats.problems)].join('; ')}`);

  // The stored transcript.
  let stored = null;
  if (adminToken) {
    const detail = await waitForEnded(opt.url, adminToken, ids.callSid);
    stored = detail?.call ?? null;
    if (detail) {
      const c = detail.call ?? {};
      console.log(`\nstored call record: status=${c.status} end_reason=${c.end_reason} duration_ms=${c.duration_ms} first_audio_ms=${c.first_audio_ms} barge_ins=${c.barge_ins}`);
      console.log(`  tokens: session ${c.input_tokens ?? 0} in / ${c.output_tokens ?? 0} out; transcription ${c.transcription_input_tokens ?? 0} in / ${c.transcription_output_tokens ?? 0} out, ${((c.transcription_audio_ms ?? 0) / 1000).toFixed(1)} s of audio`);
      console.log('stored transcript (GET /api/admin/calls/' + ids.callSid + '):');
      if (!detail.transcript?.length) console.log('  (empty)');
      for (const e of detail.transcript ?? []) {
        console.log(`  [${(e.offset_ms / 1000).toFixed(1).padStart(5)}s] ${(e.role === 'agent' ? 'agent' : 'caller').padEnd(6)} ${e.text}${e.interrupted ? '  (interrupted)' : ''}`);
      }
    } else {
      console.log(`\n(could not read the stored call from the admin API; is ADMIN_TOKEN the Worker's?)`);
    }
  } else {
    console.log('\n(ADMIN_TOKEN not set: the stored transcript is not shown)');
  }

  if (endedByWorker) {
    const why = endedByWorker.code === 1011 ? 'the agent is unavailable' : `close ${endedByWorker.code} ${endedByWorker.reason}`;
    const then = [...twiml.says.map((s) => `<Say> ${s}`), ...twiml.dials.map((d) => `<Dial> ${d}`)];
    console.log(`\nthe Worker ended the stream before the caller hung up (${why}); Twilio would now run the TwiML after <Connect>:`);
    for (const t of then) console.log(`  ${t}`);
    if (stored?.end_reason === 'call_control_failed') {
      console.log(`  (the agent's hang-up or transfer through Twilio's REST API failed: ${stored.end_detail ?? 'see the Worker log'}.`);
      console.log(`   In a simulated call that API is the simulator's: start the Worker with --var TWILIO_API_BASE_URL:${restUrl}`);
      console.log('   (`npm run dev:offline` does), or the request goes to api.twilio.com with the made-up sids of this call)');
    } else if (!standin) {
      console.log('  (the Worker could not use OpenAI. With the dummy OPENAI_API_KEY of .dev.vars.example this is expected:');
      console.log('   put a real key in .dev.vars, or run offline: `npm run dev:offline` and `npm run call -- --offline`)');
    }
    else if (ctx.state.standinSessions === 0) console.log('  (the Worker never reached the stand-in: start it with `npm run dev:offline`)');
    return 2;
  }
  if (standin && state.standinSessions === 0 && state.agentAudioBytes > 0) {
    // --offline, yet the call went on without the stand-in: the Worker talks to another
    // Realtime server, most likely the real OpenAI API, on the key in its .dev.vars.
    const bar = '!'.repeat(78);
    console.log(`\n${bar}`);
    console.log('!! --offline, but the Worker NEVER connected to the stand-in at ' + standin.url);
    console.log(`!! The agent's ${secs(state.agentAudioBytes)} s of audio came from elsewhere: most likely the REAL OpenAI Realtime API`);
    console.log('!! (the Worker was started with `npm run dev`, and with a real OPENAI_API_KEY this call was billed).');
    console.log('!! For an offline call start it with `npm run dev:offline` (OPENAI_REALTIME_URL=' + standin.url + ').');
    console.log(bar);
    return 2;
  }
  if (state.agentAudioBytes === 0) {
    const hint = standin && state.standinSessions === 0
      ? ' — the Worker never connected to the stand-in: it must be started with `npm run dev:offline` (OPENAI_REALTIME_URL=' + standin.url + ')'
      : '';
    console.log(`\nno agent audio was received${hint}`);
    return 2;
  }
  if (agentEnded) {
    console.log(`\n${agentEnded.what} (Twilio's REST API, played by the simulator); the call is over`);
  }
  return 0;
}

async function fetchCall(url, adminToken, callSid) {
  const r = await fetch(`${url}/api/admin/calls/${callSid}`, {
    headers: { Authorization: `Bearer ${adminToken}` },
    signal: AbortSignal.timeout(5000),
  });
  if (!r.ok) return null;
  return r.json();
}

/** The stored call once it has ended (the record is written off the audio path). */
async function waitForEnded(url, adminToken, callSid) {
  let last = null;
  for (let k = 0; k < 20; k++) {
    last = (await fetchCall(url, adminToken, callSid).catch(() => null)) ?? last;
    if (last?.call?.ended_at) {
      // Transcript rows may trail the end row by a moment.
      await sleep(500);
      return (await fetchCall(url, adminToken, callSid).catch(() => null)) ?? last;
    }
    await sleep(500);
  }
  return last;
}

main().then(
  (code) => process.exit(code),
  (e) => {
    console.error(e?.stack ?? String(e));
    process.exit(1);
  },
);
