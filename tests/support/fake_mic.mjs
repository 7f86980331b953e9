#!/usr/bin/env node
// A stand-in microphone for the simulator's tests (`--mic-command`): prints what a capture
// program prints for a caller in a quiet room who says one thing: raw 8 kHz mono signed
// 16-bit little-endian PCM, in real time, 40 ms at a time: LEAD seconds of silence, the WAV
// file (resampled to 8 kHz), then silence until it is stopped.
//
//   node tests/support/fake_mic.mjs FILE.wav [LEAD]

import { readFileSync } from 'node:fs';

import { decodeWav, downmix, resample } from '../../scripts/sim/audio.mjs';

const [file, lead = '0'] = process.argv.slice(2);
const wav = decodeWav(readFileSync(file));
const speech = resample(downmix(wav.samples), wav.sampleRate, 8000);
const leadSamples = Math.round(Number(lead) * 8000);
const CHUNK = 320; // samples: 40 ms

const start = performance.now();
let sent = 0;
process.stdout.on('error', () => process.exit(0)); // the reader went away
const tick = () => {
  const due = Math.floor(((performance.now() - start) / 1000) * 8000);
  while (sent + CHUNK <= due) {
    const out = Buffer.alloc(CHUNK * 2);
    for (let i = 0; i < CHUNK; i++) {
      const k = sent + i - leadSamples;
      const v = k >= 0 && k < speech.length ? speech[k] : 0;
      out.writeInt16LE(Math.max(-32768, Math.min(32767, Math.round(v * 32767))), 2 * i);
    }
    process.stdout.write(out);
    sent += CHUNK;
  }
};
setInterval(tick, 10);
process.on('SIGTERM', () => process.exit(0));
