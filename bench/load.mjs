#!/usr/bin/env node
// Load benchmark driver: N simultaneous simulated calls with real-time audio both ways
// against one or more Workers in `wrangler dev`, with the stand-in Realtime server in echo
// mode behind them (scripts/sim/standin.mjs --mode echo). Loopback only; bounded in calls and
// time; stops by itself. Prints figures, asserts nothing.
//
//   node bench/load.mjs --standin http://127.0.0.1:PORT \
//     --target floor=http://127.0.0.1:8801 --pid floor=<wrangler pid> \
//     --target bridge=http://127.0.0.1:8802 --pid bridge=<wrangler pid> \
//     [--calls 20] [--seconds 30] [--rounds 2] [--together] [--auth-token T]
//     [--clk-tck 100] [--json out.json] [--profile NAME=INSPECTOR_PORT] [--profile-out DIR]
//     [--also-against NAME]   (CPU ratios to that target too, e.g. the Rust floor)
//
// Each round runs the targets one after the other (A B B A order over rounds), or with
// --together all at once, --calls each, in the same seconds: the shared machine's changes
// in load then fall on every target alike, and the ratios of CPU between targets hold still
// from round to round (each target needs its own Worker process, its own --pid).
//
// Each call: the signed voice webhook, the <Stream> socket with the signed upgrade,
// `connected`, `start`, then one 20 ms μ-law frame every 20 ms for --seconds, paced on the
// monotonic clock, and silence after those until their echoes are back (then `stop`).
// Every frame is tagged in its first 9 bytes (0xA5, call u16, seq u32, 0x5A, 0xFF) and the
// rest is a tone. The stand-in stamps each tagged append when it
// arrives and sends it straight back as an audio delta (one per frame, however many frames
// an append held); the driver stamps the frame when it
// sends it and when its echo comes back as Twilio media. All stamps are CLOCK_MONOTONIC
// (process.hrtime), shared by the processes of the machine. Twilio's playback is played as
// in the simulator: media queued at 8 bytes/ms, marks echoed when played.
//
// Figures per target:
//   - call set-up: from the stream's `start` to the first frame back from the agent side;
//   - one-way latency through the Worker, caller→agent (driver send → stand-in receive) and
//     agent→caller (stand-in send → driver receive), p50/p99/max, over every frame sent
//     after the call's first echo came back (before that, caller audio is held while the
//     upstream session is set up, by design);
//   - frames sent/received/lost each way;
//   - CPU seconds of the target's workerd processes (utime+stime from /proc/<pid>/stat of
//     every workerd descended from the given wrangler pid), per call-minute of audio; split
//     into the rate while every call is streaming (the cost of a longer call) and what each
//     call costs beyond that (set-up and teardown: webhook, session, records, recording);
//   - with --admin NAME=TOKEN (a bridge): after each run (outside the CPU window), how many
//     calls have transcript rows in D1, read back through the admin API
//     (GET /api/admin/calls/{CallSid}), waiting up to 60 s for the outbox to copy them.
//
// --profile NAME=PORT (the target's `wrangler dev --inspector-port`) also takes a V8 CPU
// profile of that Worker during the first round's all-calls-streaming window and prints
// where its time went (bench/profile.mjs); --profile-out keeps the .cpuprofile files.
//
// --check turns the figures into a verdict for the test command (scripts/load-test.sh):
// exit status 1 when a call failed, a frame was lost either way, or a call checked with
// --admin has no transcript rows. Nothing about time is ever asserted.

import { readFileSync, readdirSync, writeFileSync } from 'node:fs';

import { FRAME_BYTES, MULAW_SILENCE, toneSequence } from '../scripts/sim/audio.mjs';
import { attach as attachProfiler } from './profile.mjs';
import { Player, TwilioFrames, nowMs, openMediaStream, parseTwiml, postVoiceWebhook, sid, voiceParams } from '../scripts/sim/twilio.mjs';

function parseArgs(argv) {
  const o = { targets: [], pids: {}, calls: 20, seconds: 30, authToken: 'bench-twilio-token', clkTck: 100, json: null, standin: null, rampMs: 1000, rounds: 2, standinPid: null, to: {}, admin: {}, check: false, warmup: true, together: false, profile: {}, profileOut: null, alsoAgainst: null };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const v = () => argv[++i];
    switch (a) {
      case '--target': {
        const [name, url] = v().split(/=(.*)/s);
        o.targets.push({ name, url: url.replace(/\/+$/, '') });
        break;
      }
      case '--pid': {
        const [name, pid] = v().split('=');
        o.pids[name] = Number(pid);
        break;
      }
      case '--calls': o.calls = Number(v()); break;
      case '--seconds': o.seconds = Number(v()); break;
      case '--auth-token': o.authToken = v(); break;
      case '--clk-tck': o.clkTck = Number(v()); break;
      case '--json': o.json = v(); break;
      case '--standin': o.standin = v().replace(/\/+$/, ''); break;
      case '--ramp-ms': o.rampMs = Number(v()); break;
      case '--rounds': o.rounds = Number(v()); break;
      case '--standin-pid': o.standinPid = Number(v()); break;
      case '--to': {
        const [name, number] = v().split('=');
        o.to[name] = number;
        break;
      }
      case '--admin': {
        const [name, token] = v().split(/=(.*)/s);
        o.admin[name] = token;
        break;
      }
      case '--check': o.check = true; break;
      case '--no-warmup': o.warmup = false; break;
      case '--together': o.together = true; break;
      case '--profile': {
        const [name, port] = v().split('=');
        o.profile[name] = Number(port);
        break;
      }
      case '--profile-out': o.profileOut = v(); break;
      case '--also-against': o.alsoAgainst = v(); break;
      default: throw new Error(`unknown option ${a}`);
    }
  }
  if (!o.targets.length || !o.standin) throw new Error('need --standin and at least one --target');
  if (!(o.calls >= 1 && o.calls <= 1000)) throw new Error('--calls must be 1..1000');
  if (!(o.seconds >= 2 && o.seconds <= 600)) throw new Error('--seconds must be 2..600');
  if (!(o.rounds >= 1 && o.rounds <= 10)) throw new Error('--rounds must be 1..10');
  const pids = o.targets.map((t) => o.pids[t.name]).filter((p) => p !== undefined);
  if (o.together && new Set(pids).size !== pids.length) {
    throw new Error('--together needs a Worker process per target: two targets share a --pid, so their CPU could not be told apart');
  }
  return o;
}

// ---- CPU of workerd processes ---------------------------------------------------------------

function procTable() {
  const procs = [];
  for (const d of readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const stat = readFileSync(`/proc/${d}/stat`, 'utf8');
      const close = stat.lastIndexOf(')');
      const comm = stat.slice(stat.indexOf('(') + 1, close);
      const f = stat.slice(close + 2).split(' '); // f[0] = state (field 3)
      procs.push({ pid: Number(d), comm, ppid: Number(f[1]), utime: Number(f[11]), stime: Number(f[12]) });
    } catch {
      // gone
    }
  }
  return procs;
}

/** CPU ticks of every process below `rootPid`, split into workerd and the rest. */
function cpuTicks(rootPid) {
  const procs = procTable();
  const children = new Map();
  for (const p of procs) {
    if (!children.has(p.ppid)) children.set(p.ppid, []);
    children.get(p.ppid).push(p);
  }
  const out = { workerd: 0, other: 0, workerdPids: [] };
  const walk = (pid) => {
    for (const c of children.get(pid) ?? []) {
      if (c.comm.startsWith('workerd')) {
        out.workerd += c.utime + c.stime;
        out.workerdPids.push(c.pid);
      } else {
        out.other += c.utime + c.stime;
      }
      walk(c.pid);
    }
  };
  const root = procs.find((p) => p.pid === rootPid);
  if (root) out.other += root.utime + root.stime;
  walk(rootPid);
  return out;
}

// ---- one call -------------------------------------------------------------------------------

const TONE = toneSequence([{ hz: 697, ms: 20 }], 0.2); // 160 bytes

/** A 20 ms frame of silence, untagged: what the line carries once the tagged audio is done. */
const SILENT_FRAME = Buffer.alloc(FRAME_BYTES, MULAW_SILENCE).toString('base64');

function taggedFrame(callIdx, seq) {
  const b = Buffer.from(TONE);
  b[0] = 0xa5;
  b.writeUInt16BE(callIdx, 1);
  b.writeUInt32BE(seq, 3);
  b[7] = 0x5a;
  b[8] = 0xff;
  return b.toString('base64');
}

function readTag(payload) {
  const h = Buffer.from(payload.slice(0, 12), 'base64');
  if (h.length < 9 || h[0] !== 0xa5 || h[7] !== 0x5a) return null;
  return { call: h.readUInt16BE(1), seq: h.readUInt32BE(3) };
}

class BenchCall {
  constructor(idx, target, opt) {
    this.idx = idx;
    this.target = target;
    this.opt = opt;
    this.total = Math.round((opt.seconds * 1000) / 20);
    this.sentAt = new Float64Array(this.total).fill(NaN);
    this.echoAt = new Float64Array(this.total).fill(NaN);
    this.nextSeq = 0;
    this.silentFrames = 0;
    this.received = 0;
    this.foreign = 0;
    this.marks = 0;
    this.clears = 0;
    this.state = 'new';
    this.error = null;
    this.ids = { callSid: sid('CA'), accountSid: sid('AC'), streamSid: sid('MZ') };
    this.frames = new TwilioFrames(this.ids);
    this.player = new Player({ onMark: (name) => this.send(this.frames.mark(name)) });
  }

  send(text) {
    if (this.ws && this.ws.readyState === this.ws.OPEN) this.ws.send(text);
  }

  async start() {
    try {
      const hook = await postVoiceWebhook(
        `${this.target.url}/api/twilio/voice`,
        this.opt.authToken,
        voiceParams({ ...this.ids, from: '+819012340000', to: this.opt.to[this.target.name] ?? '+815012345678' }),
      );
      if (hook.status !== 200) throw new Error(`webhook HTTP ${hook.status}: ${hook.body.slice(0, 200)}`);
      const twiml = parseTwiml(hook.body);
      if (!twiml.streamUrl) throw new Error('no <Stream> in the TwiML');
      this.ws = await openMediaStream(twiml.streamUrl, this.opt.authToken);
      this.ws.on('message', (data) => this.onMessage(data));
      this.closed = new Promise((resolve) => this.ws.on('close', (code) => resolve(code)));
      this.ws.on('close', () => {
        if (this.state !== 'stopping') this.fail(`the Worker closed the stream early (${this.nextSeq}/${this.total} frames sent)`);
        this.state = 'closed';
      });
      this.ws.on('error', (e) => this.fail(`socket: ${e.message}`));
      this.send(this.frames.connected());
      this.send(this.frames.start(twiml.parameters));
      this.t0 = nowMs();
      this.state = 'streaming';
    } catch (e) {
      this.fail(e.message);
    }
  }

  fail(msg) {
    if (!this.error) this.error = msg;
    if (this.state !== 'closed') this.state = 'failed';
  }

  onMessage(data) {
    const now = nowMs();
    const text = data.toString();
    if (text.startsWith('{"event":"media"') || text.includes('"event":"media"')) {
      const m = /"payload":"([^"]*)"/.exec(text);
      if (!m) return;
      const tag = readTag(m[1]);
      if (!tag || tag.call !== this.idx || tag.seq >= this.total) {
        this.foreign++;
      } else if (Number.isNaN(this.echoAt[tag.seq])) {
        this.echoAt[tag.seq] = now;
        this.received++;
        if (this.firstEchoAt === undefined) this.firstEchoAt = now;
      }
      this.player.media(Buffer.from(m[1], 'base64'), now);
      return;
    }
    let f;
    try {
      f = JSON.parse(text);
    } catch {
      return;
    }
    if (f.event === 'mark') {
      this.marks++;
      this.player.mark(f.mark?.name ?? '', now);
    } else if (f.event === 'clear') {
      this.clears++;
      this.player.clear(now);
    }
  }

  /** Sends every frame that is due; returns true while the call needs more ticks. */
  tick(now) {
    if (this.state !== 'streaming') return false;
    while (this.nextSeq < this.total && this.t0 + 20 * this.nextSeq <= now) {
      const payload = taggedFrame(this.idx, this.nextSeq);
      this.sentAt[this.nextSeq] = nowMs();
      this.send(this.frames.media(payload));
      this.nextSeq++;
    }
    // Twilio goes on sending the caller's line until the call ends, so the last frames are
    // followed by silence (untagged) while their echoes are awaited: a bridge that sends
    // caller audio a chunk at a time completes the chunk then, as on a real call.
    while (this.nextSeq >= this.total && this.t0 + 20 * (this.nextSeq + this.silentFrames) <= now) {
      this.send(this.frames.media(SILENT_FRAME));
      this.silentFrames++;
    }
    this.player.advance(now);
    if (this.nextSeq >= this.total && this.lastFrameAt === undefined) this.lastFrameAt = now;
    return true;
  }

  async finish() {
    // Let the last echoes come back, then hang up like Twilio. Up to 10 s: a frame is lost
    // when it never comes back, not when it is late. At 100 calls the calls that are done
    // tear down at once (recordings uploaded, records written) in the isolate that still
    // serves the others, which can hold their last frames up for seconds; a bridge that
    // sends caller audio two frames at a time sends the last one only with the next frame.
    const deadline = nowMs() + 10_000;
    while (this.state === 'streaming' && this.received < this.nextSeq && nowMs() < deadline) await sleep(20);
    if (this.state === 'streaming') {
      this.state = 'stopping';
      this.send(this.frames.stop());
      await Promise.race([this.closed, sleep(5000)]);
      if (this.ws.readyState !== this.ws.CLOSED) this.ws.terminate();
    }
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ---- one target --------------------------------------------------------------------------------

function pct(sorted, p) {
  if (!sorted.length) return NaN;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[i];
}

/** Transcript rows per call, read back through the admin API; waits (up to `waitMs`) for
 * the calls' outboxes to reach D1. Returns { checked, withRows, rows, missing: [CallSid] }. */
async function transcriptRows(target, token, calls, waitMs = 60_000) {
  const pending = new Map(calls.filter((c) => c.state !== 'new').map((c) => [c.ids.callSid, c]));
  const checked = pending.size;
  let rows = 0;
  const deadline = nowMs() + waitMs;
  for (;;) {
    const sids = [...pending.keys()];
    for (let i = 0; i < sids.length; i += 10) {
      await Promise.all(
        sids.slice(i, i + 10).map(async (callSid) => {
          try {
            const r = await fetch(`${target.url}/api/admin/calls/${callSid}`, { headers: { authorization: `Bearer ${token}` } });
            if (r.status !== 200) return;
            const n = (await r.json()).transcript?.length ?? 0;
            if (n > 0) {
              rows += n;
              pending.delete(callSid);
            }
          } catch {
            // not there yet
          }
        }),
      );
    }
    if (!pending.size || nowMs() > deadline) break;
    await sleep(2000);
  }
  return { checked, withRows: checked - pending.size, rows, missing: [...pending.keys()] };
}

/** One round against one target. */
async function runTarget(target, opt, profilers = {}) {
  await fetch(`${opt.standin}/bench/stats?reset=1`).then((r) => r.text());
  const run = await drive(target, opt, 0, profilers[target.name]);
  return collect(run, await fetch(`${opt.standin}/bench/stats?reset=1`).then((r) => r.json()), opt);
}

/**
 * One round against every target at once (`--together`): each target gets its own `calls`
 * (numbered apart, so the stand-in tells them apart) over the same seconds, so a change in
 * the machine's load falls on all of them alike and the ratios between them hold still.
 */
async function runTogether(targets, opt, profilers = {}) {
  await fetch(`${opt.standin}/bench/stats?reset=1`).then((r) => r.text());
  const runs = await Promise.all(targets.map((t, k) => drive(t, opt, k * opt.calls, profilers[t.name])));
  const stats = await fetch(`${opt.standin}/bench/stats?reset=1`).then((r) => r.json());
  return Promise.all(runs.map((run) => collect(run, stats, opt)));
}

/** Places a target's calls, streams them to the end and takes its CPU figures (and, given a
 * profiler, its CPU profile while every call streams). */
async function drive(target, opt, idxBase, profiler = null) {
  const pid = opt.pids[target.name];
  const calls = Array.from({ length: opt.calls }, (_, i) => new BenchCall(idxBase + i, target, opt));
  const cpu0 = pid ? cpuTicks(pid) : null;
  const gen0 = { self: process.cpuUsage(), standin: opt.standinPid ? cpuTicks(opt.standinPid).other : NaN };
  const wall0 = nowMs();
  const hardDeadline = wall0 + (opt.seconds + 90) * 1000;

  // Start the calls spread over the ramp, so their frames interleave as real calls' do.
  const starts = calls.map((c, i) => sleep((i * opt.rampMs) / opt.calls).then(() => c.start()));
  const ticker = setInterval(() => {
    const now = nowMs();
    for (const c of calls) c.tick(now);
  }, 2);
  await Promise.all(starts);
  const steadyWindow = pid ? measureSteady(calls, pid, opt, profiler) : Promise.resolve(null);
  // Wait until every call has sent all its frames (or failed).
  while (calls.some((c) => c.state === 'streaming' && c.nextSeq < c.total) && nowMs() < hardDeadline) await sleep(50);
  await Promise.all(calls.map((c) => c.finish()));
  clearInterval(ticker);
  for (const c of calls) if (c.ws && c.ws.readyState !== c.ws.CLOSED) c.ws.terminate();
  await sleep(1000); // let workerd finish the calls' teardown (records, closes)
  const cpu1 = pid ? cpuTicks(pid) : null;
  const steady = await steadyWindow;
  const self = process.cpuUsage(gen0.self);
  const generatorSeconds = (self.user + self.system) / 1e6 + (opt.standinPid ? (cpuTicks(opt.standinPid).other - gen0.standin) / opt.clkTck : 0);
  const wall = (nowMs() - wall0) / 1000;
  return { target, calls, cpu0, cpu1, steady, generatorSeconds, wall, wall0 };
}

/** A driven round's figures, with the stand-in's receive times. */
async function collect({ target, calls, cpu0, cpu1, steady, generatorSeconds, wall, wall0 }, stats, opt) {
  const transcripts = opt.admin[target.name] ? await transcriptRows(target, opt.admin[target.name], calls) : null;
  const up = []; // caller→agent latencies, ms
  const down = []; // agent→caller
  const setupUp = [];
  const setupMs = []; // stream start → first echo back, per call
  let sentUp = 0;
  let recvUp = 0;
  let recvDown = 0;
  let okCalls = 0;
  const errors = [];
  for (const c of calls) {
    if (c.error) errors.push(c.error);
    else okCalls++;
    if (c.firstEchoAt !== undefined) setupMs.push(c.firstEchoAt - c.t0);
    // Steady state: frames sent once the path works both ways (after the first echo came
    // back). Before that the bridges hold caller audio while the upstream session is set up.
    const steadyFrom = c.firstEchoAt ?? Infinity;
    for (let s = 0; s < c.nextSeq; s++) {
      sentUp++;
      const a = c.sentAt[s];
      const b = standinAt(stats, c, s);
      const d = c.echoAt[s];
      const steady = a > steadyFrom;
      if (!Number.isNaN(b)) {
        recvUp++;
        (steady ? up : setupUp).push(b - a);
        if (!Number.isNaN(d)) {
          recvDown++;
          if (steady) down.push(d - b);
        }
      }
    }
  }
  up.sort((a, b) => a - b);
  down.sort((a, b) => a - b);
  setupUp.sort((a, b) => a - b);
  setupMs.sort((a, b) => a - b);
  const cpuS = cpu0 && cpu1 ? (cpu1.workerd - cpu0.workerd) / opt.clkTck : NaN;
  const otherS = cpu0 && cpu1 ? (cpu1.other - cpu0.other) / opt.clkTck : NaN;
  // The worst latency in each second of the run (by send time), to spot stalls.
  const worstBySecond = [];
  for (const c of calls) {
    for (let s = 0; s < c.nextSeq; s++) {
      const sec = Math.floor((c.sentAt[s] - wall0) / 1000);
      const b = standinAt(stats, c, s);
      if (Number.isNaN(b) || sec < 0) continue;
      worstBySecond[sec] = Math.max(worstBySecond[sec] ?? 0, b - c.sentAt[s]);
    }
  }
  return {
    target: target.name,
    calls: opt.calls,
    okCalls,
    errors: [...new Set(errors)],
    seconds: opt.seconds,
    wallSeconds: wall,
    up,
    down,
    setupUp,
    setupMs,
    sentUp,
    recvUp,
    recvDown,
    marks: calls.reduce((a, c) => a + c.marks, 0),
    clears: calls.reduce((a, c) => a + c.clears, 0),
    workerdSeconds: cpuS,
    steady,
    wranglerSeconds: otherS,
    generatorSeconds,
    workerdPids: cpu1?.workerdPids ?? [],
    transcripts,
    worstUpBySecond: worstBySecond.map((x) => Math.round((x ?? 0) * 100) / 100),
  };
}

/**
 * CPU of the target's workerd processes while every call is streaming: from when each has
 * had its first echo back (set-up done) to a second before the first call's audio ends
 * (teardown not begun). `null` when that window is under 3 s or a call failed in it.
 */
async function measureSteady(calls, pid, opt, profiler = null) {
  const live = () => calls.filter((c) => c.state === 'streaming');
  const deadline = nowMs() + (opt.seconds + 10) * 1000;
  while (live().some((c) => c.firstEchoAt === undefined) && nowMs() < deadline) await sleep(20);
  const from = nowMs() + 500;
  const to = Math.min(...calls.map((c) => (c.t0 ?? -Infinity) + opt.seconds * 1000)) - 1000;
  if (!(to - from >= 3000) || live().length !== calls.length) return null;
  await sleep(from - nowMs());
  const a = cpuTicks(pid);
  const ta = nowMs();
  const profiling = profiler ? profiler.start().then(() => true, (e) => (process.stderr.write(`    profile: ${e.message}\n`), false)) : null;
  await sleep(to - nowMs());
  const b = cpuTicks(pid);
  const tb = nowMs();
  if (profiling && (await profiling)) {
    profiler.text = await profiler.stop().catch((e) => `${profiler.name}: the profile failed: ${e.message}`);
  }
  if (live().length !== calls.length) return null;
  return { workerdSeconds: (b.workerd - a.workerd) / opt.clkTck, callMinutes: (calls.length * (tb - ta)) / 60000 };
}

function standinAt(stats, c, s) {
  if (!c._standin) {
    c._standin = new Float64Array(c.total).fill(NaN);
    for (const [seq, t] of stats.calls[c.idx] ?? []) if (seq < c.total) c._standin[seq] = t;
  }
  return c._standin[s];
}

/** One target's figures over all its rounds. */
function pool(name, url, runs, opt) {
  const up = runs.flatMap((r) => r.up).sort((a, b) => a - b);
  const down = runs.flatMap((r) => r.down).sort((a, b) => a - b);
  const setupUp = runs.flatMap((r) => r.setupUp).sort((a, b) => a - b);
  const setupMs = runs.flatMap((r) => r.setupMs).sort((a, b) => a - b);
  const sum = (f) => runs.reduce((a, r) => a + f(r), 0);
  const okCalls = sum((r) => r.okCalls);
  const cpuS = sum((r) => r.workerdSeconds);
  const callMinutes = (okCalls * opt.seconds) / 60;
  return {
    target: name,
    url,
    rounds: runs.length,
    calls: sum((r) => r.calls),
    okCalls,
    errors: [...new Set(runs.flatMap((r) => r.errors))].slice(0, 5),
    seconds: opt.seconds,
    up: { sent: sum((r) => r.sentUp), received: sum((r) => r.recvUp), lost: sum((r) => r.sentUp - r.recvUp), p50: pct(up, 50), p99: pct(up, 99), max: up[up.length - 1] ?? NaN, setupP99: pct(setupUp, 99) },
    down: { sent: sum((r) => r.recvUp), received: sum((r) => r.recvDown), lost: sum((r) => r.recvUp - r.recvDown), p50: pct(down, 50), p99: pct(down, 99), max: down[down.length - 1] ?? NaN },
    setup: { p50: pct(setupMs, 50), max: setupMs[setupMs.length - 1] ?? NaN },
    marks: sum((r) => r.marks),
    clears: sum((r) => r.clears),
    transcripts: runs.every((r) => r.transcripts)
      ? { checked: sum((r) => r.transcripts.checked), withRows: sum((r) => r.transcripts.withRows), rows: sum((r) => r.transcripts.rows), missing: runs.flatMap((r) => r.transcripts.missing) }
      : null,
    cpu: {
      workerdSeconds: cpuS,
      wranglerSeconds: sum((r) => r.wranglerSeconds),
      generatorSeconds: sum((r) => r.generatorSeconds),
      wallSeconds: sum((r) => r.wallSeconds),
      perCallMinute: cpuS / callMinutes,
      perRound: runs.map((r) => r.workerdSeconds / ((r.okCalls * opt.seconds) / 60)),
      // While every call streams: the cost of a call-minute once the call is up…
      steadyPerRound: runs.map((r) => (r.steady ? r.steady.workerdSeconds / r.steady.callMinutes : NaN)),
      // …and what each call costs beyond that (set-up and teardown: webhook, session,
      // records, recording upload), in ms: the run's CPU less its audio at the steady rate.
      fixedMsPerRound: runs.map((r) =>
        r.steady ? (1000 * (r.workerdSeconds - (r.steady.workerdSeconds / r.steady.callMinutes) * ((r.okCalls * opt.seconds) / 60))) / r.okCalls : NaN,
      ),
    },
    runs: runs.map((r) => ({ wallSeconds: r.wallSeconds, okCalls: r.okCalls, workerdSeconds: r.workerdSeconds, workerdPids: r.workerdPids, worstUpBySecond: r.worstUpBySecond })),
  };
}

// ---- report ----------------------------------------------------------------------------------

const median = (sorted) => (sorted.length % 2 ? sorted[(sorted.length - 1) / 2] : (sorted[sorted.length / 2 - 1] + sorted[sorted.length / 2]) / 2);
const f2 = (x) => (Number.isFinite(x) ? x.toFixed(2) : '-');
const f3 = (x) => (Number.isFinite(x) ? x.toFixed(3) : '-');

/** The figures side by side, with ratios to the first target; with `alsoAgainst` (a target's
 * name, e.g. the Rust floor) the CPU's ratios to that target too, round by round. */
export function table(results, alsoAgainst = null) {
  const base = results[0];
  const others = results.slice(1);
  const rows = [];
  const row = (label, fn, ratio = null) => {
    const ratios = others.map((r) => {
      if (!ratio) return '';
      const a = ratio(r);
      const b = ratio(base);
      return Number.isFinite(a) && Number.isFinite(b) && b > 0 ? `${(a / b).toFixed(2)}×` : '-';
    });
    rows.push([label, ...results.map(fn), ...ratios]);
  };
  row('calls completed', (r) => `${r.okCalls}/${r.calls}`);
  row('call set-up p50 (ms)', (r) => f2(r.setup.p50), (r) => r.setup.p50);
  row('call set-up max (ms)', (r) => f2(r.setup.max), (r) => r.setup.max);
  row('caller→agent latency p50 (ms)', (r) => f2(r.up.p50), (r) => r.up.p50);
  row('caller→agent latency p99 (ms)', (r) => f2(r.up.p99), (r) => r.up.p99);
  row('caller→agent latency max (ms)', (r) => f2(r.up.max), (r) => r.up.max);
  row('agent→caller latency p50 (ms)', (r) => f2(r.down.p50), (r) => r.down.p50);
  row('agent→caller latency p99 (ms)', (r) => f2(r.down.p99), (r) => r.down.p99);
  row('agent→caller latency max (ms)', (r) => f2(r.down.max), (r) => r.down.max);
  row('caller→agent frames sent/recv/lost', (r) => `${r.up.sent}/${r.up.received}/${r.up.lost}`);
  row('agent→caller frames sent/recv/lost', (r) => `${r.down.sent}/${r.down.received}/${r.down.lost}`);
  row('marks sent to the caller side', (r) => String(r.marks));
  if (results.some((r) => r.transcripts)) {
    row('calls with transcript rows in D1', (r) => (r.transcripts ? `${r.transcripts.withRows}/${r.transcripts.checked}` : '-'));
  }
  row('workerd CPU s per call-minute', (r) => f3(r.cpu.perCallMinute), (r) => r.cpu.perCallMinute);
  row('workerd CPU s total', (r) => f2(r.cpu.workerdSeconds), (r) => r.cpu.workerdSeconds);
  const medianOf = (xs) => {
    const ok = xs.filter(Number.isFinite).sort((a, b) => a - b);
    return ok.length ? median(ok) : NaN;
  };
  row('  of which, all calls streaming: s per call-minute', (r) => f3(medianOf(r.cpu.steadyPerRound)), (r) => medianOf(r.cpu.steadyPerRound));
  row('  and per call, set-up + teardown (ms)', (r) => f2(medianOf(r.cpu.fixedMsPerRound)), (r) => medianOf(r.cpu.fixedMsPerRound));
  row('load generator CPU (cores busy)', (r) => f2(r.cpu.generatorSeconds / r.cpu.wallSeconds));
  row('workerd CPU (cores busy)', (r) => f2(r.cpu.workerdSeconds / r.cpu.wallSeconds));
  if (results.some((r) => r.cpu.perRound?.length > 1)) {
    row('  per round (s per call-minute)', (r) => r.cpu.perRound.map(f3).join(' '));
    // Round i of each target ran next to round i of the floor (A B B A order, or in the same
    // seconds with --together): the median of those ratios is the figure least moved by a
    // noisy machine, and their spread shows how much the machine moved them.
    const ratiosTo = (r, key) => r.cpu[key].map((x, i) => x / base.cpu[key][i]);
    row('  ratio to the first target, each round', (r) => ratiosTo(r, 'perRound').map((x) => (Number.isFinite(x) ? `${x.toFixed(2)}×` : '-')).join(' '));
    row('  ratio to the first target, median of rounds', (r) => {
      const ratios = ratiosTo(r, 'perRound').filter(Number.isFinite).sort((a, b) => a - b);
      return ratios.length ? `${median(ratios).toFixed(2)}×` : '-';
    });
    row('  the same while all calls stream, each round', (r) => ratiosTo(r, 'steadyPerRound').map((x) => (Number.isFinite(x) ? `${x.toFixed(2)}×` : '-')).join(' '));
    row('  CPU s per call-minute, median of rounds', (r) => f3(median([...r.cpu.perRound].sort((a, b) => a - b))));
    const second = results.find((r) => r.target === alsoAgainst);
    if (second) {
      const against = (r, key) => {
        const ratios = r.cpu[key].map((x, i) => x / second.cpu[key][i]).filter(Number.isFinite);
        return ratios.length ? ratios.map((x) => `${x.toFixed(2)}×`).join(' ') : '-';
      };
      row(`  ratio to ${second.target}, each round`, (r) => against(r, 'perRound'));
      row(`  the same while all calls stream, ratio to ${second.target}`, (r) => against(r, 'steadyPerRound'));
    }
  }
  const header = ['', ...results.map((r) => r.target), ...others.map((r) => `${r.target} / ${base.target}`)];
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => String(r[i]).length)));
  const line = (cells) => cells.map((c, i) => (i === 0 ? String(c).padEnd(widths[i]) : String(c).padStart(widths[i]))).join('  ');
  return [line(header), ...rows.map(line)].join('\n');
}

/** A round's figures, as it ends (stderr). */
function report(r) {
  process.stderr.write(
    `    ${r.okCalls}/${r.calls} calls ok in ${r.wallSeconds.toFixed(1)} s; workerd CPU ${f2(r.workerdSeconds)} s ` +
      `(pids ${r.workerdPids.join(',') || 'none found'}), wrangler/node ${f2(r.wranglerSeconds)} s; ` +
      `caller→agent p99 ${f2(pct(r.up, 99))} ms, agent→caller p99 ${f2(pct(r.down, 99))} ms\n`,
  );
  for (const e of r.errors.slice(0, 5)) process.stderr.write(`    error: ${e}\n`);
  if (r.transcripts) {
    process.stderr.write(`    transcript rows in D1: ${r.transcripts.withRows}/${r.transcripts.checked} calls have rows (${r.transcripts.rows} rows)\n`);
  }
}

async function main() {
  const opt = parseArgs(process.argv.slice(2));
  const runs = new Map(opt.targets.map((t) => [t.name, []]));
  for (const t of opt.warmup ? opt.targets : []) {
    // Warm-up (not counted): the first calls pay for compiling the Worker and creating
    // the first Durable Objects.
    // Enough calls for V8 to compile the hot code with its optimizing tier, which a run
    // after a short warm-up still paid for in the middle of its figures.
    const warm = { ...opt, calls: Math.min(10, opt.calls), seconds: 6, rampMs: 300 };
    process.stderr.write(`==> load: warm-up of ${t.name} (${warm.calls} calls × ${warm.seconds} s, not counted)\n`);
    const w = await runTarget(t, warm);
    if (w.okCalls === 0) process.stderr.write(`    warm-up failed: ${w.errors.join('; ')}\n`);
  }
  // Profiles of the first round's streaming window: attached now, past the warm-up.
  const profilers = {};
  for (const [name, port] of Object.entries(opt.profile)) {
    try {
      profilers[name] = await attachProfiler({ name, port, out: opt.profileOut });
    } catch (e) {
      process.stderr.write(`    profile of ${name}: cannot attach to the inspector on :${port}: ${e.message}\n`);
    }
  }
  // Rounds in A B B A … order, so drift in the machine's load falls on every target alike;
  // or, with --together, every target in the same seconds.
  for (let round = 0; round < opt.rounds; round++) {
    const profiling = round === 0 ? profilers : {};
    const order = round % 2 === 0 ? opt.targets : [...opt.targets].reverse();
    if (opt.together) {
      const names = opt.targets.map((t) => t.name).join(', ');
      process.stderr.write(`==> load round ${round + 1}/${opt.rounds}: ${opt.calls} calls × ${opt.seconds} s against each of ${names}, at once\n`);
      for (const r of await runTogether(opt.targets, opt, profiling)) {
        process.stderr.write(`    ${r.target}:\n`);
        report(r);
        runs.get(r.target).push(r);
      }
      await sleep(1000);
      continue;
    }
    for (const t of order) {
      process.stderr.write(`==> load round ${round + 1}/${opt.rounds}: ${opt.calls} calls × ${opt.seconds} s against ${t.name} (${t.url})\n`);
      const r = await runTarget(t, opt, profiling);
      report(r);
      runs.get(t.name).push(r);
      await sleep(1000);
    }
  }
  const results = opt.targets.map((t) => pool(t.name, t.url, runs.get(t.name), opt));
  const rounds = opt.rounds > 1 ? `, ${opt.rounds} rounds each (pooled)` : '';
  const together = opt.together ? ` per target, all targets at once (${opt.calls * opt.targets.length} calls in all)` : '';
  console.log(`load: ${opt.calls} simultaneous calls × ${opt.seconds} s${together}${rounds}; real-time 20 ms μ-law frames both ways, stand-in echoing (loopback)`);
  console.log(table(results, opt.alsoAgainst));
  const profiled = Object.values(profilers).filter((p) => p.text);
  if (profiled.length) {
    console.log(`\nCPU profiles of the first round, while every call streamed (V8 samples of each Worker's isolate; shares of its busy samples)${opt.profileOut ? `; .cpuprofile files in ${opt.profileOut}` : ''}:`);
    for (const p of profiled) console.log(`${p.text}\n`);
  }
  if (opt.json) writeFileSync(opt.json, JSON.stringify({ options: { calls: opt.calls, seconds: opt.seconds, rounds: opt.rounds }, results }, null, 2));
  if (opt.check) {
    const problems = [];
    for (const r of results) {
      if (r.okCalls !== r.calls) problems.push(`${r.target}: ${r.calls - r.okCalls} of ${r.calls} calls failed (${r.errors.join('; ')})`);
      if (r.up.lost) problems.push(`${r.target}: ${r.up.lost} caller→agent frames lost`);
      if (r.down.lost) problems.push(`${r.target}: ${r.down.lost} agent→caller frames lost`);
      if (r.transcripts && r.transcripts.withRows !== r.calls) {
        problems.push(`${r.target}: ${r.calls - r.transcripts.withRows} of ${r.calls} calls have no transcript rows in D1 (${r.transcripts.missing.slice(0, 5).join(', ')})`);
      }
    }
    if (problems.length) {
      for (const p of problems) console.error(`FAIL ${p}`);
      process.exitCode = 1;
    } else {
      console.log('check: every call completed, no frame lost either way, every checked call has transcript rows');
    }
  }
}

main().then(
  () => process.exit(process.exitCode ?? 0),
  (e) => {
    console.error(e?.stack ?? String(e));
    process.exit(1);
  },
);
