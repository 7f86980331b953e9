#!/usr/bin/env node
// Where a Worker's CPU goes: a V8 CPU profile of a Worker in `wrangler dev`, taken through
// its inspector (`wrangler dev --inspector-port P`), summarised by self time. Used by the
// load benchmark (`bench/load.mjs --profile NAME=PORT`, `bash scripts/bench.sh --profile`:
// the streaming window of the first round) and on its own:
//
//   node bench/profile.mjs --inspector NAME=PORT [--inspector NAME=PORT …]
//     [--after S] [--seconds S] [--interval-us 100] [--top 25] [--out DIR]
//
// Waits --after seconds, then samples every named Worker for --seconds at once (V8's sampling
// profiler on the Worker's isolate), writes NAME.cpuprofile files (open them in Chrome's
// DevTools, Performance tab) to --out, and prints for each Worker the share of its busy
// samples by kind (its JavaScript, its wasm, workerd's built-ins such as WebSocket.send,
// garbage collection, workerd's own work outside JS) and the top functions by self time,
// with the source line of the JavaScript ones (a bundle's functions are mostly anonymous).
// Only the Worker's isolate is seen: local D1 and R2 run in other isolates of the same
// workerd process, whose CPU the load benchmark counts but this profile does not. The
// sampler runs on a busy machine and takes far fewer samples than asked: read the shares,
// not the counts. Prints figures, asserts nothing.

import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';

import WebSocket from 'ws';

function parseArgs(argv) {
  const o = { targets: [], after: 0, seconds: 15, intervalUs: 100, top: 25, out: null };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const v = () => argv[++i];
    switch (a) {
      case '--inspector': {
        const [name, port] = v().split('=');
        o.targets.push({ name, port: Number(port) });
        break;
      }
      case '--after': o.after = Number(v()); break;
      case '--seconds': o.seconds = Number(v()); break;
      case '--interval-us': o.intervalUs = Number(v()); break;
      case '--top': o.top = Number(v()); break;
      case '--out': o.out = v(); break;
      default: throw new Error(`unknown option ${a}`);
    }
  }
  if (!o.targets.length) throw new Error('need --inspector NAME=PORT');
  return o;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A DevTools-protocol session with the Worker behind an inspector port. */
async function connect(port) {
  const list = await (await fetch(`http://127.0.0.1:${port}/json`)).json();
  const target = list.find((t) => t.webSocketDebuggerUrl) ?? list[0];
  if (!target?.webSocketDebuggerUrl) throw new Error(`no debuggable target on :${port}`);
  const ws = new WebSocket(target.webSocketDebuggerUrl, { perMessageDeflate: false, maxPayload: 1 << 30 });
  await new Promise((resolve, reject) => {
    ws.once('open', resolve);
    ws.once('error', reject);
  });
  let id = 0;
  const waiting = new Map();
  ws.on('message', (data) => {
    const m = JSON.parse(data.toString());
    if (m.id !== undefined && waiting.has(m.id)) {
      const { resolve, reject } = waiting.get(m.id);
      waiting.delete(m.id);
      if (m.error) reject(new Error(`${m.error.message} (${m.error.code})`));
      else resolve(m.result);
    }
  });
  const send = (method, params = {}) =>
    new Promise((resolve, reject) => {
      const n = ++id;
      waiting.set(n, { resolve, reject });
      ws.send(JSON.stringify({ id: n, method, params }));
    });
  return { send, close: () => ws.close(), title: target.title ?? target.id };
}

/** The kind of a profile node, by its function and script. */
function kind(node) {
  const { functionName: fn, url } = node.callFrame;
  if (fn === '(idle)') return 'idle';
  if (fn === '(garbage collector)') return 'garbage collector';
  if (fn === '(program)') return 'workerd and V8, outside any JS (program)';
  if (fn === '(root)') return 'root';
  if (url.startsWith('wasm://') || /^\$?wasm-function/.test(fn) || url.endsWith('.wasm')) return 'wasm';
  if (!url) return 'built-ins (workerd/V8 natives called from JS)';
  return 'JavaScript';
}

/** What a bundle's anonymous function is: its source line near the column, from V8. */
async function snippets(session, profile, ids) {
  const byId = new Map(profile.nodes.map((n) => [n.id, n]));
  const sources = new Map();
  const out = new Map();
  await session.send('Debugger.enable').catch(() => null);
  for (const id of ids) {
    const f = byId.get(id).callFrame;
    if (!f.scriptId || f.scriptId === '0' || f.lineNumber < 0) continue;
    if (!sources.has(f.scriptId)) {
      const r = await session.send('Debugger.getScriptSource', { scriptId: f.scriptId }).catch(() => null);
      sources.set(f.scriptId, r?.scriptSource?.split('\n') ?? null);
    }
    const lines = sources.get(f.scriptId);
    const line = lines?.[f.lineNumber];
    if (line === undefined) continue;
    // The function's head and its first two lines of body: enough to tell the glue apart.
    const head = line.slice(Math.max(0, f.columnNumber - 20), f.columnNumber + 100).trim();
    const body = lines.slice(f.lineNumber + 1, f.lineNumber + 3).map((l) => l.trim().slice(0, 80));
    out.set(id, [head, ...body].join(' ⏎ '));
  }
  await session.send('Debugger.disable').catch(() => null);
  return out;
}

function summarise(name, profile, top, source = new Map()) {
  const self = new Map(); // node id -> samples
  for (const s of profile.samples) self.set(s, (self.get(s) ?? 0) + 1);
  const byId = new Map(profile.nodes.map((n) => [n.id, n]));
  const total = profile.samples.length;
  const busy = [...self].filter(([id]) => byId.get(id).callFrame.functionName !== '(idle)').reduce((a, [, n]) => a + n, 0);
  const kinds = new Map();
  const fns = new Map();
  for (const [id, n] of self) {
    const node = byId.get(id);
    const k = kind(node);
    kinds.set(k, (kinds.get(k) ?? 0) + n);
    if (k === 'idle') continue;
    const f = node.callFrame;
    const where = f.url ? `; ${f.url.split('/').pop()}${f.lineNumber >= 0 && k !== 'wasm' ? `:${f.lineNumber + 1}:${f.columnNumber + 1}` : ''}` : '';
    const src = source.get(id) ? `\n             ${source.get(id)}` : '';
    const key = `${f.functionName || '(anonymous)'}  [${k}${where}]${src}`;
    fns.set(key, (fns.get(key) ?? 0) + n);
  }
  const pct = (n, of) => `${((100 * n) / of).toFixed(1).padStart(5)}%`;
  const lines = [];
  lines.push(`${name}: ${total} samples, ${busy} busy (${pct(busy, total)} of the time on the isolate's thread)`);
  lines.push('  by kind (share of busy samples):');
  for (const [k, n] of [...kinds].filter(([k]) => k !== 'idle').sort((a, b) => b[1] - a[1])) lines.push(`    ${pct(n, busy)}  ${k}`);
  lines.push(`  top ${top} functions by self time (share of busy samples):`);
  for (const [f, n] of [...fns].sort((a, b) => b[1] - a[1]).slice(0, top)) lines.push(`    ${pct(n, busy)}  ${f}`);
  return lines.join('\n');
}

/**
 * A profiler attached to one Worker's inspector. `start()` begins sampling; `stop()` ends it
 * and resolves to the summary text, writing NAME.cpuprofile to `out` when given.
 */
export async function attach({ name, port, intervalUs = 100, top = 25, out = null }) {
  const s = await connect(port);
  await s.send('Profiler.enable');
  await s.send('Profiler.setSamplingInterval', { interval: intervalUs });
  return {
    name,
    start: () => s.send('Profiler.start'),
    async stop() {
      const { profile } = await s.send('Profiler.stop');
      if (out) {
        mkdirSync(out, { recursive: true });
        writeFileSync(join(out, `${name}.cpuprofile`), JSON.stringify(profile));
      }
      // The source of the JavaScript functions with the most self time (a bundle's
      // functions are minified or anonymous, so a name alone rarely says which).
      const self = new Map();
      for (const id of profile.samples) self.set(id, (self.get(id) ?? 0) + 1);
      const byId = new Map(profile.nodes.map((n) => [n.id, n]));
      const js = [...self]
        .filter(([id]) => kind(byId.get(id)) === 'JavaScript')
        .sort((a, b) => b[1] - a[1])
        .slice(0, 8)
        .map(([id]) => id);
      const source = await snippets(s, profile, js);
      s.close();
      return summarise(name, profile, top, source);
    },
  };
}

async function main() {
  const opt = parseArgs(process.argv.slice(2));
  const profilers = [];
  for (const t of opt.targets) profilers.push(await attach({ ...t, intervalUs: opt.intervalUs, top: opt.top, out: opt.out }));
  await sleep(opt.after * 1000);
  await Promise.all(profilers.map((p) => p.start()));
  console.error(`profiling ${profilers.map((p) => p.name).join(', ')} for ${opt.seconds} s (every ${opt.intervalUs} µs)`);
  await sleep(opt.seconds * 1000);
  for (const text of await Promise.all(profilers.map((p) => p.stop()))) console.log(`${text}\n`);
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  main().catch((e) => {
    console.error(`profile: ${e.message}`);
    process.exit(1);
  });
}
