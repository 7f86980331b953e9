// How long a caller waits for the agent's first words: from the voice webhook's POST to the
// first agent audio on the Media Stream, for each target, as Twilio would see it. Behind the
// stand-in run with --handshake-ms (OpenAI's connect as a Worker sees it: TCP, TLS, the
// upgrade, the session's creation), with the stream opened --gap-ms after the webhook was
// answered (Twilio's own time to connect the stream), the targets show what the bridge
// overlaps: run with the Realtime socket opened at the webhook (OPENAI_PREOPEN_SECONDS, the
// default) and without it (0), side by side in one run.
//
// Calls go one at a time, the targets taking turns (A B A B …), so that both see the
// machine alike; each call: the signed webhook, --gap-ms, the stream's `connected` and
// `start`, then the wait for the first `media` frame (the greeting), then `stop`. It prints
// each target's p50, min and max, and each p50's difference from the first target's. It
// asserts nothing about time: a call that never hears the greeting is counted and reported.
//
//   node bench/greeting.mjs --target with=http://127.0.0.1:8787 --target without=http://127.0.0.1:8788 \
//     --auth-token TOKEN [--calls 10] [--gap-ms 300] [--json out.json]

import { writeFileSync } from 'node:fs';

import { TwilioFrames, nowMs, openMediaStream, parseTwiml, postVoiceWebhook, sid, voiceParams } from '../scripts/sim/twilio.mjs';

/** The first audio must come within this long, or the call counts as failed. */
const GREETING_LIMIT_MS = 15_000;

export function parseArgs(argv) {
  const o = { targets: [], authToken: null, calls: 10, gapMs: 300, json: null };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const v = () => {
      if (i + 1 >= argv.length) throw new Error(`${a} needs a value`);
      return argv[++i];
    };
    if (a === '--target') {
      const t = v();
      const eq = t.indexOf('=');
      if (eq < 1) throw new Error(`--target wants NAME=URL, got ${t}`);
      o.targets.push({ name: t.slice(0, eq), url: t.slice(eq + 1).replace(/\/+$/, '') });
    } else if (a === '--auth-token') o.authToken = v();
    else if (a === '--calls') o.calls = Number(v());
    else if (a === '--gap-ms') o.gapMs = Number(v());
    else if (a === '--json') o.json = v();
    else throw new Error(`unknown option ${a}`);
  }
  if (o.targets.length === 0) throw new Error('give at least one --target NAME=URL');
  if (!o.authToken) throw new Error('--auth-token is required (the Worker\'s TWILIO_AUTH_TOKEN)');
  if (!Number.isInteger(o.calls) || o.calls < 1 || o.calls > 1000) throw new Error('--calls must be 1..1000');
  if (!Number.isInteger(o.gapMs) || o.gapMs < 0 || o.gapMs > 10_000) throw new Error('--gap-ms must be 0..10000');
  return o;
}

/** p50 (the lower middle for an even count), min and max of `values`; NaN when empty. */
export function summarize(values) {
  const s = [...values].sort((a, b) => a - b);
  if (s.length === 0) return { n: 0, p50: NaN, min: NaN, max: NaN };
  return { n: s.length, p50: s[Math.floor((s.length - 1) / 2)], min: s[0], max: s[s.length - 1] };
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** One call against `url`: ms from the webhook's POST to its answer and to the first audio. */
async function greetingCall(url, authToken, gapMs) {
  const callSid = sid('CA');
  const accountSid = sid('AC');
  const params = voiceParams({ callSid, accountSid, from: '+819012345678', to: '+815012345678' });
  const t0 = nowMs();
  const reply = await postVoiceWebhook(`${url}/api/twilio/voice`, authToken, params);
  const answered = nowMs();
  const twiml = parseTwiml(reply.body);
  if (reply.status !== 200 || !twiml.streamUrl) {
    throw new Error(`the webhook was not answered with a stream: HTTP ${reply.status} ${reply.body.slice(0, 200)}`);
  }
  await sleep(gapMs);
  const ws = await openMediaStream(twiml.streamUrl, authToken);
  const frames = new TwilioFrames({ accountSid, callSid, streamSid: sid('MZ') });
  try {
    const heard = new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no agent audio within ${GREETING_LIMIT_MS} ms`)), GREETING_LIMIT_MS);
      ws.on('message', (data) => {
        let frame;
        try {
          frame = JSON.parse(data.toString());
        } catch {
          return;
        }
        if (frame.event === 'media') {
          clearTimeout(timer);
          resolve(nowMs());
        }
      });
      ws.once('close', () => {
        clearTimeout(timer);
        reject(new Error('the stream closed before any agent audio'));
      });
    });
    ws.send(frames.connected());
    ws.send(frames.start(twiml.parameters));
    const firstAudio = await heard;
    return { webhookMs: answered - t0, greetingMs: firstAudio - t0 };
  } finally {
    if (ws.readyState === ws.OPEN) {
      ws.send(frames.stop());
      ws.close();
    }
  }
}

async function main() {
  let o;
  try {
    o = parseArgs(process.argv.slice(2));
  } catch (e) {
    console.error(`greeting: ${e.message}`);
    process.exit(2);
  }
  const results = Object.fromEntries(o.targets.map((t) => [t.name, { greeting: [], webhook: [], failed: [] }]));
  // One call each first, not counted: each Worker's first call compiles and warms up.
  for (const t of o.targets) await greetingCall(t.url, o.authToken, o.gapMs).catch(() => {});
  for (let i = 0; i < o.calls; i++) {
    for (const t of o.targets) {
      const r = results[t.name];
      try {
        const { webhookMs, greetingMs } = await greetingCall(t.url, o.authToken, o.gapMs);
        r.webhook.push(webhookMs);
        r.greeting.push(greetingMs);
      } catch (e) {
        r.failed.push(e.message);
      }
      await sleep(200); // the call's end, out of the next one's way
    }
  }
  const first = summarize(results[o.targets[0].name].greeting).p50;
  const f0 = (x) => (Number.isFinite(x) ? x.toFixed(0) : '-');
  console.log(`greeting: ${o.calls} calls per target, one at a time, the stream opened ${o.gapMs} ms after the webhook's answer`);
  console.log(`${'target'.padEnd(24)} ${'webhook→first audio p50 / min / max (ms)'.padEnd(44)} ${'vs first'.padEnd(10)} ${'webhook p50'.padEnd(12)} failed`);
  const out = {};
  for (const t of o.targets) {
    const r = results[t.name];
    const g = summarize(r.greeting);
    const w = summarize(r.webhook);
    out[t.name] = { greeting: g, webhook: w, failed: r.failed };
    const diff = t === o.targets[0] ? '' : `${g.p50 - first >= 0 ? '+' : ''}${f0(g.p50 - first)}`;
    console.log(`${t.name.padEnd(24)} ${`${f0(g.p50)} / ${f0(g.min)} / ${f0(g.max)}`.padEnd(44)} ${diff.padEnd(10)} ${f0(w.p50).padEnd(12)} ${r.failed.length}`);
    for (const why of new Set(r.failed)) console.log(`  failed: ${why}`);
  }
  if (o.json) writeFileSync(o.json, JSON.stringify({ gapMs: o.gapMs, calls: o.calls, targets: out }, null, 2));
}

if (import.meta.url === `file://${process.argv[1]}`) await main();
