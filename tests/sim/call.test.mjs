// Tests of the call simulator (scripts/call.mjs) run as a program against small stand-ins
// for the Worker: how it ends when the Worker does not behave.
//
//   node --test tests/sim/

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { encodeWav16 } from '../../scripts/sim/audio.mjs';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../..');

/** A port nobody listens on right now. */
async function freePort() {
  const s = createServer();
  await new Promise((r) => s.listen(0, '127.0.0.1', r));
  const { port } = s.address();
  await new Promise((r) => s.close(r));
  return port;
}

/** Serves `handler` on 127.0.0.1; resolves to `{ url, close }`. */
async function serve(handler) {
  const s = createServer(handler);
  await new Promise((r) => s.listen(0, '127.0.0.1', r));
  return {
    url: `http://127.0.0.1:${s.address().port}`,
    server: s,
    close: () => {
      s.closeAllConnections();
      return new Promise((r) => s.close(r));
    },
  };
}

/** Runs `node scripts/call.mjs ARGS` with a scratch directory; `{ code, stdout, stderr, ms }`. */
async function call(args, env = {}) {
  const dir = mkdtempSync(join(tmpdir(), 'sim-call-test-'));
  try {
    const audio = join(dir, 'caller.wav');
    writeFileSync(audio, encodeWav16([new Int16Array(8000)], 8000));
    const started = Date.now();
    const child = spawn(
      process.execPath,
      ['scripts/call.mjs', '--audio', audio, '--out', join(dir, 'agent.wav'), '--dev-vars', join(dir, 'none'),
        '--standin-port', String(await freePort()), ...args],
      { cwd: ROOT, env: { ...process.env, INIT_CWD: '', TWILIO_AUTH_TOKEN: 'tok-call-test', ADMIN_TOKEN: '', PUBLIC_BASE_URL: '', ...env } },
    );
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (c) => (stdout += c));
    child.stderr.on('data', (c) => (stderr += c));
    const code = await new Promise((r) => child.on('close', r));
    return { code, stdout, stderr, ms: Date.now() - started };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

test('a voice webhook that never answers fails the call after Twilio\'s 15 s, exit 2', async () => {
  const worker = await serve((req, res) => {
    if (req.url === '/healthz') return res.end('ok');
    // The voice webhook: never answered.
  });
  try {
    const r = await call(['--url', worker.url]);
    assert.equal(r.code, 2, r.stdout + r.stderr);
    assert.match(r.stderr, /call failed: the voice webhook did not answer within 15 s/);
    assert.doesNotMatch(r.stderr, /\n\s+at /, 'no stack trace');
    assert.ok(r.ms >= 14_500 && r.ms < 25_000, `took ${r.ms} ms`);
  } finally {
    await worker.close();
  }
});

test('a Worker that dies after /healthz fails the call clearly, exit 2', async () => {
  let worker;
  worker = await serve((req, res) => {
    if (req.url === '/healthz') return res.end('ok');
    req.socket.destroy(); // the Worker went away mid-request
  });
  try {
    const r = await call(['--url', worker.url]);
    assert.equal(r.code, 2, r.stdout + r.stderr);
    assert.match(r.stderr, /call failed: the voice webhook got no answer .*answered \/healthz, then stopped answering/);
    assert.doesNotMatch(r.stderr, /\n\s+at /, 'no stack trace');
  } finally {
    await worker.close();
  }
});

/** Reads a form body. */
const formOf = (req) =>
  new Promise((resolve) => {
    let body = '';
    req.on('data', (c) => (body += c));
    req.on('end', () => resolve([...new URLSearchParams(body)]));
  });

test('a failed call still gets Twilio\'s signed status callback, CallStatus=completed', async () => {
  const seen = [];
  const worker = await serve(async (req, res) => {
    if (req.url === '/healthz') return res.end('ok');
    const form = await formOf(req);
    seen.push({ path: req.url, form, sig: req.headers['x-twilio-signature'] });
    if (req.url === '/api/twilio/voice') {
      res.writeHead(503);
      return res.end('busy');
    }
    res.writeHead(204);
    res.end();
  });
  try {
    const r = await call(['--url', worker.url]);
    assert.equal(r.code, 2, r.stdout + r.stderr);
    assert.match(r.stderr, /call failed: voice webhook answered HTTP 503/);
    assert.deepEqual(seen.map((s) => s.path), ['/api/twilio/voice', '/api/twilio/status']);
    const [voice, status] = seen;
    const get = (f, k) => f.find(([n]) => n === k)?.[1];
    assert.equal(get(status.form, 'CallStatus'), 'completed');
    assert.match(get(status.form, 'CallDuration'), /^\d+$/);
    for (const k of ['CallSid', 'AccountSid', 'From', 'To', 'Direction']) assert.equal(get(status.form, k), get(voice.form, k), k);
    // Signed as Twilio signs it, with the same token as the voice webhook.
    const { signature } = await import('../../scripts/sim/twilio.mjs');
    assert.equal(status.sig, signature('tok-call-test', `${worker.url}/api/twilio/status`, status.form));
    assert.match(r.stdout, /status callback \(CallStatus=completed, CallDuration=\d+\) answered HTTP 204/);
  } finally {
    await worker.close();
  }
});

test('with PUBLIC_BASE_URL, webhooks and the stream are signed over it and sent to --url', async () => {
  const { signature } = await import('../../scripts/sim/twilio.mjs');
  const { WebSocketServer } = await import('ws');
  const PUBLIC = 'https://bridge.example.jp/phone';
  const seen = [];
  const worker = await serve(async (req, res) => {
    if (req.url === '/healthz') return res.end('ok');
    const form = await formOf(req);
    seen.push({ path: req.url, sig: req.headers['x-twilio-signature'], ok: req.headers['x-twilio-signature'] === signature('tok-call-test', `${PUBLIC}${req.url}`, form) });
    if (req.url === '/api/twilio/voice') {
      const sid = form.find(([k]) => k === 'CallSid')[1];
      res.writeHead(200, { 'content-type': 'text/xml' });
      return res.end(`<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url="wss://bridge.example.jp/phone/media-stream/${sid}"/></Connect><Say>Sorry.</Say></Response>`);
    }
    res.writeHead(204);
    res.end();
  });
  // The stream: verified as the Worker verifies it, then ended at once by the "Worker".
  const wss = new WebSocketServer({ noServer: true });
  const server = worker.server;
  server.on('upgrade', (req, socket, head) => {
    const signedOver = `wss://bridge.example.jp/phone${req.url}`;
    seen.push({ path: req.url, ok: req.headers['x-twilio-signature'] === signature('tok-call-test', signedOver, []) });
    wss.handleUpgrade(req, socket, head, (ws) => ws.close(1011, 'agent unavailable'));
  });
  try {
    // The environment's PUBLIC_BASE_URL, written http:// with a trailing /: read as the
    // Worker reads it (https for a host that is not this machine).
    const r = await call(['--url', worker.url], { PUBLIC_BASE_URL: 'http://bridge.example.jp/phone/' });
    assert.equal(r.code, 2, r.stdout + r.stderr);
    assert.match(r.stdout, /PUBLIC_BASE_URL=https:\/\/bridge\.example\.jp\/phone: webhooks and the stream are signed over it/);
    assert.deepEqual(seen.map((s) => s.path.replace(/CA[0-9a-f]{32}/, 'CA…')), ['/api/twilio/voice', '/media-stream/CA…', '/api/twilio/status']);
    assert.ok(seen.every((s) => s.ok), JSON.stringify(seen));
  } finally {
    wss.close();
    await worker.close();
  }
});

test("PUBLIC_BASE_URL is read from the environment, .dev.vars, then wrangler.toml's [vars]", async () => {
  const { publicBaseUrl } = await import('../../scripts/sim/twilio.mjs');
  const dir = mkdtempSync(join(tmpdir(), 'sim-public-test-'));
  const saved = process.env.PUBLIC_BASE_URL;
  delete process.env.PUBLIC_BASE_URL;
  try {
    const toml = join(dir, 'wrangler.toml');
    const devVars = join(dir, '.dev.vars');
    writeFileSync(toml, 'name = "x"\n[vars]\nOTHER = "1"\nPUBLIC_BASE_URL = "https://toml.example.jp/"\n\n[assets]\ndirectory = "public"\n');
    assert.deepEqual(publicBaseUrl(devVars, toml), { url: 'https://toml.example.jp' });
    writeFileSync(devVars, 'PUBLIC_BASE_URL="http://127.0.0.1:8787" # local\n');
    assert.deepEqual(publicBaseUrl(devVars, toml), { url: 'http://127.0.0.1:8787' });
    process.env.PUBLIC_BASE_URL = 'https://env.example.jp/a?b';
    assert.equal(publicBaseUrl(devVars, toml).url, null);
    assert.match(publicBaseUrl(devVars, toml).invalid, /without a query/);
    writeFileSync(toml, '[vars]\nPUBLIC_BASE_URL = ""\n');
    writeFileSync(devVars, '');
    delete process.env.PUBLIC_BASE_URL;
    assert.deepEqual(publicBaseUrl(devVars, toml), { url: null });
  } finally {
    if (saved === undefined) delete process.env.PUBLIC_BASE_URL;
    else process.env.PUBLIC_BASE_URL = saved;
    rmSync(dir, { recursive: true, force: true });
  }
});

test('--press sends each key as a dtmf message between media frames, at its time on the frames\' clock', async () => {
  const { WebSocketServer } = await import('ws');
  const worker = await serve(async (req, res) => {
    if (req.url === '/healthz') return res.end('ok');
    const form = await formOf(req);
    if (req.url === '/api/twilio/voice') {
      const sid = form.find(([k]) => k === 'CallSid')[1];
      res.writeHead(200, { 'content-type': 'text/xml' });
      return res.end(`<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url="ws://127.0.0.1:${worker.server.address().port}/api/twilio/media-stream/${sid}"/></Connect></Response>`);
    }
    res.writeHead(204);
    res.end();
  });
  // The stream: every message Twilio sent, in order, until its stop.
  const messages = [];
  const wss = new WebSocketServer({ noServer: true });
  worker.server.on('upgrade', (req, socket, head) =>
    wss.handleUpgrade(req, socket, head, (ws) =>
      ws.on('message', (data) => {
        const m = JSON.parse(data.toString());
        messages.push(m);
        // A word from the agent, so the call is not one without agent audio.
        if (m.event === 'start') ws.send(JSON.stringify({ event: 'media', streamSid: m.streamSid, media: { payload: Buffer.alloc(160, 0x7f).toString('base64') } }));
        if (m.event === 'stop') ws.close(1000);
      }),
    ),
  );
  try {
    // 1 s of caller audio from the first frame on: 1 and 2 from 0.2 s, 500 ms apart; # once
    // the audio has ended (50 frames).
    const r = await call(['--url', worker.url, '--lead-in', '0', '--tail', '1', '--max-tail', '2', '--press', '12@0.2', '--press', '#']);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    const streamSid = messages.find((m) => m.event === 'start').streamSid;
    const dtmf = messages.filter((m) => m.event === 'dtmf');
    assert.deepEqual(dtmf.map((m) => m.dtmf), ['1', '2', '#'].map((digit) => ({ track: 'inbound_track', digit })));
    for (const m of dtmf) assert.equal(m.streamSid, streamSid);
    const framesBefore = dtmf.map((m) => messages.slice(0, messages.indexOf(m)).filter((x) => x.event === 'media').length);
    assert.deepEqual(framesBefore, [10, 35, 50]);
    // Numbered in one sequence with the media.
    const seqs = messages.filter((m) => m.sequenceNumber !== undefined).map((m) => Number(m.sequenceNumber));
    assert.deepEqual(seqs, seqs.map((_, k) => seqs[0] + k));
    assert.match(r.stdout, /caller presses # on the keypad \(Twilio: dtmf\)/);
    assert.match(r.stdout, /keypad: 3 key\(s\) pressed\n/);
  } finally {
    wss.close();
    await worker.close();
  }
});

test('--press refuses what is not keys, and a press with --mic needs its time', async () => {
  for (const [args, said] of [
    [['--press', '0x'], /--press takes keys \(0-9, \*, #\), optionally @seconds/],
    [['--press', '0@soon'], /--press takes keys/],
    [['--mic', '--press', '0'], /--press with --mic needs @S/],
  ]) {
    const r = await call(args);
    assert.equal(r.code, 1, r.stdout + r.stderr);
    assert.match(r.stderr, said);
  }
});
