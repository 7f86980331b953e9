// The simulator's sound devices: the microphone (the caller's voice, live) and the speaker
// (the agent's voice, as Twilio plays it). Both are outside programs the machine already has,
// found on PATH: sox (`sox -d`, every platform), ALSA's arecord/aplay (Linux) or ffmpeg/ffplay.
// A custom command can stand in for either (--mic-command, --speaker-command).
//
// The microphone program writes raw 8 kHz mono signed 16-bit little-endian PCM on stdout;
// it is cut into 20 ms μ-law frames here. The speaker program reads 8 kHz μ-law on stdin and
// is fed continuously in real time (silence between the agent's turns), so that a `clear`
// cuts the agent off at once instead of after what a pipe had buffered.

import { spawn } from 'node:child_process';
import { EventEmitter } from 'node:events';
import { accessSync, constants, statSync } from 'node:fs';
import { delimiter, join } from 'node:path';

import { FRAME_BYTES, MULAW_SILENCE, mulawEncode } from './audio.mjs';

/** The first directory of PATH holding an executable `name`, as a path; else null. */
export function which(name, path = process.env.PATH ?? '') {
  for (const dir of path.split(delimiter)) {
    if (!dir) continue;
    const p = join(dir, name);
    try {
      if (!statSync(p).isFile()) continue;
      accessSync(p, constants.X_OK);
      return p;
    } catch {
      // not there, or not executable
    }
  }
  return null;
}

/**
 * The programs that can capture the default input device as 8 kHz 16-bit mono PCM, in the
 * order they are tried: `{ name, program, args }`. Small buffers (20–40 ms) keep the added
 * latency near what a phone line has.
 */
export function captureCandidates(platform = process.platform) {
  const ffmpegInput = platform === 'darwin' ? ['-f', 'avfoundation', '-i', ':0'] : ['-f', 'pulse', '-i', 'default'];
  return [
    { name: 'sox', program: 'sox', args: ['-q', '--buffer', '640', '-d', '-t', 'raw', '-r', '8000', '-c', '1', '-b', '16', '-e', 'signed-integer', '-L', '-'] },
    { name: 'arecord', program: 'arecord', args: ['-q', '-t', 'raw', '-f', 'S16_LE', '-r', '8000', '-c', '1', '--buffer-time=80000', '--period-time=20000', '-'] },
    { name: 'ffmpeg', program: 'ffmpeg', args: ['-hide_banner', '-loglevel', 'error', '-fflags', 'nobuffer', ...ffmpegInput, '-ac', '1', '-ar', '8000', '-f', 's16le', '-'] },
  ];
}

/** The programs that can play 8 kHz μ-law from stdin on the default output device. */
export function speakerCandidates() {
  return [
    { name: 'sox', program: 'sox', args: ['-q', '--buffer', '640', '-t', 'raw', '-r', '8000', '-c', '1', '-e', 'mu-law', '-b', '8', '-', '-d'] },
    { name: 'aplay', program: 'aplay', args: ['-q', '-t', 'raw', '-f', 'MU_LAW', '-r', '8000', '-c', '1', '--buffer-time=80000', '-'] },
    { name: 'ffplay', program: 'ffplay', args: ['-hide_banner', '-loglevel', 'error', '-nodisp', '-f', 'mulaw', '-ar', '8000', '-i', '-'] },
  ];
}

/**
 * How to run a device: a custom shell command when given, else the first candidate whose
 * program is on PATH. Returns `{ name, program, args }` or null when there is none.
 */
export function pickDevice(candidates, custom, path = process.env.PATH ?? '') {
  if (custom) return { name: 'custom command', program: '/bin/sh', args: ['-c', custom], custom };
  for (const c of candidates) {
    if (which(c.program, path)) return c;
  }
  return null;
}

const describe = (dev) => (dev.custom ? `\`${dev.custom}\`` : `${dev.program} ${dev.args.join(' ')}`);

/**
 * Starts a device program in a process group of its own: a terminal's Ctrl-C is for the
 * simulator (the caller hangs up), and stopping the group also stops what a custom shell
 * command started.
 */
function start(dev, stdio) {
  // PulseAudio (and PipeWire's pulse server) hand a client ~2 s of audio at a time unless it
  // asks for less; sox and ffmpeg do not ask, so ask for them: 20 ms, a frame.
  const env = { PULSE_LATENCY_MSEC: '20', ...process.env };
  return spawn(dev.program, dev.args, { stdio, detached: true, env });
}

/** Stops a device program and everything in its process group. */
function stop(child) {
  if (child.exitCode !== null || child.signalCode !== null) return;
  try {
    process.kill(-child.pid, 'SIGTERM');
  } catch {
    child.kill('SIGTERM');
  }
}

/** The last lines a program wrote on stderr, kept for the error message. */
function stderrTail(child) {
  let text = '';
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (d) => {
    text = (text + d).slice(-2000);
  });
  return () => text.trim().split('\n').slice(-4).join(' | ');
}

/**
 * The caller's microphone: 20 ms μ-law frames as the capture program delivers them. Emits
 * `end` with a reason when the program stops (unplugged, killed, or a command that ran out).
 * Nothing is dropped: a program that delivers in bursts is caught up with by the sender
 * (frames that are late go at once), as a phone line's jitter buffer would.
 */
export class Microphone extends EventEmitter {
  constructor(child, dev) {
    super();
    this.child = child;
    this.dev = dev;
    this.frames = [];
    this.waiting = null;
    this.rest = Buffer.alloc(0);
    this.captured = 0;
    this.ended = null;
    this.stderr = stderrTail(child);
    child.stdout.on('data', (chunk) => this.#pcm(chunk));
    child.on('error', (e) => this.#end(`cannot run ${describe(dev)}: ${e.message}`));
    child.on('exit', (code, signal) => {
      const how = signal ? `was stopped by ${signal}` : `exited with status ${code}`;
      const err = this.stderr();
      this.#end(`the microphone program (${dev.name}) ${how}${err ? `: ${err}` : ''}`);
    });
  }

  #pcm(chunk) {
    const pcm = this.rest.length ? Buffer.concat([this.rest, chunk]) : chunk;
    const whole = pcm.length - (pcm.length % (FRAME_BYTES * 2));
    for (let off = 0; off < whole; off += FRAME_BYTES * 2) {
      const frame = Buffer.alloc(FRAME_BYTES);
      for (let i = 0; i < FRAME_BYTES; i++) frame[i] = mulawEncode(pcm.readInt16LE(off + 2 * i));
      this.captured++;
      if (this.waiting) {
        const w = this.waiting;
        this.waiting = null;
        w(frame);
        continue;
      }
      this.frames.push(frame);
    }
    this.rest = Buffer.from(pcm.subarray(whole));
    if (this.captured > 0) this.emit('audio');
  }

  #end(reason) {
    if (this.ended) return;
    this.ended = reason;
    if (this.waiting) {
      const w = this.waiting;
      this.waiting = null;
      w(null);
    }
    this.emit('end', reason);
  }

  /** The next frame, or null once the microphone has ended (and nothing is left). */
  next() {
    if (this.frames.length) return Promise.resolve(this.frames.shift());
    if (this.ended) return Promise.resolve(null);
    return new Promise((resolve) => (this.waiting = resolve));
  }

  /** Ends a pending `next()` with null at once (the caller hung up); capture goes on. */
  stopWaiting() {
    if (this.waiting) {
      const w = this.waiting;
      this.waiting = null;
      w(null);
    }
  }

  /** Forgets what was captured so far (before the call was answered). */
  discard() {
    this.frames = [];
  }

  close() {
    stop(this.child);
  }
}

/**
 * Starts the microphone and waits until it delivers audio (a microphone that exists starts
 * within a second or two). Rejects with what the program said when there is no capture
 * program, no input device, or no audio within `timeoutMs`.
 */
export function openMicrophone({ command = null, timeoutMs = 5000, path } = {}) {
  const dev = pickDevice(captureCandidates(), command, path);
  if (!dev) {
    return Promise.reject(
      new Error(
        'no program to capture the microphone was found on PATH (tried sox, arecord, ffmpeg). ' +
          'Install sox (Debian/Ubuntu: apt-get install sox; macOS: brew install sox), or give ' +
          '--mic-command CMD printing raw 8 kHz mono signed 16-bit little-endian PCM on stdout',
      ),
    );
  }
  const child = start(dev, ['ignore', 'pipe', 'pipe']);
  const mic = new Microphone(child, dev);
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      mic.close();
      reject(new Error(`no audio from the microphone within ${timeoutMs / 1000} s (${describe(dev)}${mic.stderr() ? `: ${mic.stderr()}` : ''})`));
    }, timeoutMs);
    mic.once('audio', () => {
      clearTimeout(timer);
      resolve(mic);
    });
    mic.once('end', (reason) => {
      clearTimeout(timer);
      if (mic.captured === 0) reject(new Error(`no microphone could be opened: ${reason}`));
    });
  });
}

/**
 * The caller's speaker: the agent's audio as it becomes audible (`play`), written to the
 * player program in real time; silence fills the gaps so the device never runs dry. A
 * speaker program that fails is reported once (`failed`) and the call goes on without it.
 */
export class Speaker extends EventEmitter {
  constructor(child, dev, nowMs) {
    super();
    this.child = child;
    this.dev = dev;
    this.nowMs = nowMs;
    this.pending = [];
    this.pendingBytes = 0;
    this.startedAt = null;
    this.written = 0;
    this.broken = null;
    this.stderr = stderrTail(child);
    const fail = (why) => {
      if (this.broken) return;
      this.broken = why;
      clearInterval(this.timer);
      this.emit('failed', why);
    };
    child.on('error', (e) => fail(`cannot run ${describe(dev)}: ${e.message}`));
    child.stdin.on('error', (e) => fail(`the speaker program stopped reading (${e.code ?? e.message})${this.stderr() ? `: ${this.stderr()}` : ''}`));
    child.on('exit', (code, signal) => {
      if (!this.closing) fail(`the speaker program (${dev.name}) ${signal ? `was stopped by ${signal}` : `exited with status ${code}`}${this.stderr() ? `: ${this.stderr()}` : ''}`);
    });
    this.timer = setInterval(() => this.#feed(), 10);
  }

  /** μ-law bytes the caller now hears. */
  play(bytes) {
    if (this.broken) return;
    this.pending.push(Buffer.from(bytes));
    this.pendingBytes += bytes.length;
  }

  #feed() {
    const now = this.nowMs();
    if (this.startedAt === null) this.startedAt = now;
    const due = Math.floor((now - this.startedAt) * 8) - this.written;
    if (due < FRAME_BYTES / 2) return;
    const out = Buffer.alloc(due, MULAW_SILENCE);
    let o = 0;
    while (o < due && this.pending.length) {
      const head = this.pending[0];
      const n = Math.min(head.length, due - o);
      head.copy(out, o, 0, n);
      o += n;
      this.pendingBytes -= n;
      if (n === head.length) this.pending.shift();
      else this.pending[0] = head.subarray(n);
    }
    this.written += due;
    if (!this.broken) this.child.stdin.write(out);
  }

  close() {
    this.closing = true;
    clearInterval(this.timer);
    if (this.broken) return;
    this.#feed();
    this.child.stdin.end();
    // Let the device play out what it holds, then make sure the program is gone.
    setTimeout(() => stop(this.child), 1000).unref();
  }
}

/** Starts the speaker program, or returns `{ error }` saying why there is none. */
export function openSpeaker({ command = null, nowMs, path } = {}) {
  const dev = pickDevice(speakerCandidates(), command, path);
  if (!dev) {
    return { error: 'no program to play audio was found on PATH (tried sox, aplay, ffplay); install sox to hear the agent' };
  }
  const child = start(dev, ['pipe', 'ignore', 'pipe']);
  return { speaker: new Speaker(child, dev, nowMs), dev };
}

/**
 * The keys typed during a call (--mic): each of 0-9, * and # goes to `onKey`, anything else
 * is ignored. On a terminal they are read one at a time, unechoed (raw mode, where Ctrl-C
 * comes as a byte: it goes to `onCtrlC`, as the signal would); piped in, as they come.
 * Returns what stops the reading (and gives the terminal back as it was).
 */
export function readKeypad(onKey, onCtrlC, stdin = process.stdin) {
  const raw = Boolean(stdin.isTTY) && typeof stdin.setRawMode === 'function';
  if (raw) stdin.setRawMode(true);
  const onData = (chunk) => {
    for (const ch of chunk.toString('latin1')) {
      if (ch === '\x03') onCtrlC();
      else if (/^[0-9*#]$/.test(ch)) onKey(ch);
    }
  };
  const ignore = () => {};
  stdin.on('data', onData);
  stdin.on('error', ignore);
  stdin.resume();
  return () => {
    stdin.off('data', onData);
    stdin.off('error', ignore);
    if (raw) stdin.setRawMode(false);
    stdin.pause();
  };
}
