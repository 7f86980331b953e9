// Starts the built Worker under `wrangler dev` for the browser tests, on a state directory of
// its own (local D1 migrated from migrations/, local R2), like tests/support/worker.rs does for
// the Rust end-to-end tests. wrangler and workerd run in their own process group, which
// stop() takes down, and so does this process ending: on exit, and on SIGINT (Ctrl-C) or
// SIGTERM, which Node would otherwise die of without an 'exit' event (then exiting 130 or 143).

import { execFileSync, spawn } from 'node:child_process';
import { mkdirSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../..');
const ENV = { ...process.env, CI: 'true', WRANGLER_SEND_METRICS: 'false', NO_COLOR: '1', FORCE_COLOR: '0' };

/** Process groups of the `wrangler dev`s still running. */
const groups = new Set();
let guarded = false;

function killGroups(signal) {
  for (const pgid of groups) {
    try { process.kill(-pgid, signal); } catch { /* gone */ }
  }
}

/** Once per process: take every group down when this process ends, however it ends. */
function guardGroups() {
  if (guarded) return;
  guarded = true;
  process.on('exit', () => killGroups('SIGKILL'));
  for (const [signal, code] of [['SIGINT', 130], ['SIGTERM', 143]]) {
    process.once(signal, () => {
      killGroups('SIGKILL');
      process.exit(code);
    });
  }
}

/** A port that was free a moment ago. */
export function freePort() {
  return new Promise((ok, fail) => {
    const s = createServer();
    s.once('error', fail);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => ok(port));
    });
  });
}

function wrangler(args, logPath) {
  try {
    return execFileSync('npx', ['wrangler', ...args], { cwd: ROOT, env: ENV, stdio: ['ignore', 'pipe', 'pipe'] }).toString();
  } catch (e) {
    const out = `${e.stdout || ''}${e.stderr || ''}`;
    if (logPath) writeFileSync(logPath, out, { flag: 'a' });
    throw new Error(`wrangler ${args.slice(0, 3).join(' ')} failed:\n${out.slice(-4000)}`);
  }
}

/** A scratch directory under target/tmp (kept for a look after a failure). */
export function scratchDir(label) {
  const dir = join(ROOT, 'target', 'tmp', `${label}-${process.pid}-${Date.now()}`);
  mkdirSync(join(dir, 'state'), { recursive: true });
  return dir;
}

/** Migrations, then `sql` (a file of statements) on the local D1 of `dir`. */
export function seedD1(dir, sql) {
  const state = join(dir, 'state');
  wrangler(['d1', 'migrations', 'apply', 'DB', '--local', '--persist-to', state]);
  const file = join(dir, 'seed.sql');
  writeFileSync(file, sql);
  wrangler(['d1', 'execute', 'DB', '--local', '--persist-to', state, '--file', file]);
}

/** Puts `bytes` in the local RECORDINGS bucket at `key`. */
export function seedR2(dir, key, bytes, contentType) {
  const file = join(dir, 'object.bin');
  writeFileSync(file, bytes);
  wrangler(['r2', 'object', 'put', `phone-agent-bridge-recordings/${key}`, '--local', '--persist-to', join(dir, 'state'),
    '--file', file, '--content-type', contentType]);
}

/**
 * The repository's wrangler.toml for a Worker served from `dir`: without its [build] table,
 * so that wrangler neither rebuilds nor restarts the Worker when it sees src/ change (it has
 * restarted one mid-test for no change at all, and a page reloading then never loads), and
 * with its paths made absolute, since wrangler reads them from where the file is.
 */
function configFor(dir) {
  const out = [];
  let skipping = false;
  for (const line of readFileSync(join(ROOT, 'wrangler.toml'), 'utf8').split('\n')) {
    const t = line.trim();
    if (t.startsWith('[')) skipping = t === '[build]';
    if (skipping) continue;
    const path = /^(main|directory|migrations_dir)\s*=\s*"([^"]+)"\s*$/.exec(t);
    out.push(path ? `${path[1]} = ${JSON.stringify(join(ROOT, path[2]))}` : line);
  }
  const file = join(dir, 'wrangler.toml');
  writeFileSync(file, out.join('\n'));
  return file;
}

/**
 * `wrangler dev` on `dir`'s state with `vars`; resolves once GET /healthz answers 200.
 * Returns { baseUrl, logPath, log(), stop() }.
 */
export async function startWorker(dir, vars) {
  const port = await freePort();
  let inspector = await freePort();
  while (inspector === port) inspector = await freePort();
  const logPath = join(dir, 'wrangler.log');
  const out = openSync(logPath, 'a');
  const args = ['wrangler', 'dev', '-c', configFor(dir), '--ip', '127.0.0.1', '--port', String(port), '--inspector-port', String(inspector),
    '--persist-to', join(dir, 'state'), '--show-interactive-dev-session=false'];
  for (const [k, v] of Object.entries(vars)) args.push('--var', `${k}:${v}`);
  guardGroups();
  const child = spawn('npx', args, { cwd: ROOT, env: ENV, stdio: ['ignore', out, out], detached: true });
  groups.add(child.pid);
  let exited = null;
  child.on('exit', (code, signal) => { exited = { code, signal }; });
  const kill = (signal) => { try { process.kill(-child.pid, signal); } catch { /* gone */ } };
  const log = () => { try { return readFileSync(logPath, 'utf8'); } catch { return ''; } };
  const stop = async () => {
    kill('SIGTERM');
    for (let i = 0; i < 30 && !exited; i++) await new Promise((r) => setTimeout(r, 100));
    kill('SIGKILL');
    groups.delete(child.pid);
  };
  const baseUrl = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + 300_000;
  while (Date.now() < deadline) {
    if (exited) throw new Error(`wrangler dev exited (${JSON.stringify(exited)}):\n${log().slice(-4000)}`);
    try {
      const r = await fetch(`${baseUrl}/healthz`);
      if (r.status === 200) return { baseUrl, logPath, log, stop };
    } catch { /* not yet */ }
    await new Promise((r) => setTimeout(r, 500));
  }
  await stop();
  throw new Error(`wrangler dev did not answer /healthz:\n${log().slice(-4000)}`);
}
