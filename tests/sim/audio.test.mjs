// Unit tests of the call simulator's audio (scripts/sim/audio.mjs) and of its part of
// Twilio's playback (scripts/sim/twilio.mjs Player): the WAV files a user may pass, the
// resampling to 8 kHz, G.711 μ-law, and marks echoed only once their audio has played.
//
//   node --test tests/sim/        (scripts/test.sh runs it)

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { RATE, decodeWav, goertzel, mulawDecode, mulawEncode, mulawToInt16, resample, wavToMulaw8k } from '../../scripts/sim/audio.mjs';
import { Player } from '../../scripts/sim/twilio.mjs';

/** `seconds` of a `hz` sine at `rate`, amplitude 0.5, one Float64Array. */
function sine(hz, rate, seconds) {
  return Float64Array.from({ length: Math.round(rate * seconds) }, (_, i) => 0.5 * Math.sin((2 * Math.PI * hz * i) / rate));
}

const chunk = (id, body) => {
  const head = Buffer.alloc(8);
  head.write(id, 0, 'ascii');
  head.writeUInt32LE(body.length, 4);
  return Buffer.concat([head, body, body.length & 1 ? Buffer.alloc(1) : Buffer.alloc(0)]);
};

/**
 * A WAV file of `channels` (arrays of samples in [-1, 1]) written as `kind`: pcm8, pcm16,
 * pcm24, pcm32, float32, float64; `extensible` wraps the format in WAVE_FORMAT_EXTENSIBLE;
 * `before` chunks go between fmt and data.
 */
function wav(channels, rate, kind, { extensible = false, before = [] } = {}) {
  const [tag, bits] = {
    pcm8: [1, 8], pcm16: [1, 16], pcm24: [1, 24], pcm32: [1, 32], float32: [3, 32], float64: [3, 64],
  }[kind];
  const bytes = bits / 8;
  const n = channels[0].length;
  const data = Buffer.alloc(n * channels.length * bytes);
  for (let i = 0; i < n; i++) {
    channels.forEach((ch, c) => {
      const o = (i * channels.length + c) * bytes;
      const v = ch[i];
      if (kind === 'pcm8') data[o] = Math.round(v * 127) + 128;
      else if (kind === 'pcm16') data.writeInt16LE(Math.round(v * 32767), o);
      else if (kind === 'pcm24') data.writeIntLE(Math.round(v * 8388607), o, 3);
      else if (kind === 'pcm32') data.writeInt32LE(Math.round(v * 2147483647), o);
      else if (kind === 'float32') data.writeFloatLE(v, o);
      else data.writeDoubleLE(v, o);
    });
  }
  const fmt = Buffer.alloc(extensible ? 40 : 16);
  fmt.writeUInt16LE(extensible ? 0xfffe : tag, 0);
  fmt.writeUInt16LE(channels.length, 2);
  fmt.writeUInt32LE(rate, 4);
  fmt.writeUInt32LE(rate * channels.length * bytes, 8);
  fmt.writeUInt16LE(channels.length * bytes, 12);
  fmt.writeUInt16LE(bits, 14);
  if (extensible) {
    fmt.writeUInt16LE(22, 16);
    fmt.writeUInt16LE(bits, 18);
    fmt.writeUInt32LE(3, 20); // channel mask
    fmt.writeUInt16LE(tag, 24); // SubFormat GUID, first two bytes
  }
  const body = Buffer.concat([Buffer.from('WAVE'), chunk('fmt ', fmt), ...before, chunk('data', data)]);
  return Buffer.concat([Buffer.from('RIFF'), Buffer.from(Uint32Array.of(body.length).buffer), body]);
}

/** Power of `hz` over power of everything, in the 8 kHz μ-law a file becomes. */
function share(mulaw, hz) {
  const pcm = mulawToInt16(mulaw);
  let total = 0;
  for (const v of pcm) total += (v / 32768) ** 2;
  // goertzel's power is that of a sine's amplitude; a sine of amplitude a has mean square a²/2.
  return (goertzel(pcm, hz) * 2) / (total / pcm.length);
}

test('every common WAV sample format reads back as the same sound', () => {
  const tone = sine(1000, 16000, 0.25);
  for (const kind of ['pcm8', 'pcm16', 'pcm24', 'pcm32', 'float32', 'float64']) {
    for (const extensible of [false, true]) {
      const w = decodeWav(wav([tone], 16000, kind, { extensible }));
      assert.equal(w.sampleRate, 16000, kind);
      assert.equal(w.samples[0].length, tone.length, kind);
      const tolerance = kind === 'pcm8' ? 0.01 : 1e-4;
      for (const i of [0, 17, 1234, tone.length - 1]) {
        assert.ok(Math.abs(w.samples[0][i] - tone[i]) < tolerance, `${kind}${extensible ? ' (extensible)' : ''} sample ${i}`);
      }
    }
  }
});

test('other chunks before the data, empty or odd-sized, are skipped', () => {
  const tone = sine(440, 8000, 0.1);
  const before = [chunk('LIST', Buffer.from('INFOISFT\x05\x00\x00\x00test\x00')), chunk('JUNK', Buffer.alloc(0)), chunk('odd ', Buffer.alloc(3))];
  const w = decodeWav(wav([tone], 8000, 'pcm16', { before }));
  assert.equal(w.samples[0].length, tone.length);
  // A streaming writer's data chunk whose size was left at 0 runs to the end of the file.
  const file = wav([tone], 8000, 'pcm16');
  file.writeUInt32LE(0, file.indexOf('data') + 4);
  assert.equal(decodeWav(file).samples[0].length, tone.length);
  assert.throws(() => decodeWav(Buffer.from('RIFX0000WAVE')), /not a RIFF\/WAVE/);
});

test('44.1 and 48 kHz stereo files become 8 kHz mono, with what a phone cannot carry filtered out', () => {
  for (const rate of [44100, 48000, 22050, 16000]) {
    const speech = sine(1000, rate, 1);
    const alias = sine(6500, rate, 1); // above 4 kHz: would fold to 1.5 kHz without a filter
    const { mulaw, seconds } = wavToMulaw8k(wav([speech, alias], rate, 'pcm16'));
    assert.ok(Math.abs(seconds - 1) < 1e-3, `${rate}: ${seconds}`);
    assert.ok(Math.abs(mulaw.length - RATE) <= 1, `${rate}: ${mulaw.length} bytes for 1 s`);
    // Each channel is half the mix: the 1 kHz tone carries (nearly) all that is left.
    assert.ok(share(mulaw, 1000) > 0.9, `${rate}: 1 kHz share ${share(mulaw, 1000)}`);
    assert.ok(share(mulaw, 1500) < 1e-3, `${rate}: aliased 6.5 kHz at 1.5 kHz ${share(mulaw, 1500)}`);
  }
  // Resampling keeps the length in time.
  assert.equal(resample(new Float64Array(48000), 48000, 8000).length, 8000);
});

test('G.711 μ-law: the standard values, and decode(encode(x)) stays within the step', () => {
  assert.equal(mulawEncode(0), 0xff);
  assert.equal(mulawEncode(-1), 0x7f);
  assert.equal(mulawEncode(32767), 0x80);
  assert.equal(mulawEncode(-32768), 0x00);
  assert.equal(mulawDecode(0x80), 32124);
  assert.equal(mulawDecode(0xff), 0);
  for (let x = -32000; x <= 32000; x += 97) {
    const y = mulawDecode(mulawEncode(x));
    // μ-law's step is 2^(exponent+3): at most 1/16 of the magnitude, and 8 near zero.
    assert.ok(Math.abs(y - x) <= Math.max(8, Math.abs(x) / 16), `${x} -> ${y}`);
  }
});

test("Twilio's playback: marks are echoed once the audio before them has played, or by a clear", () => {
  const echoed = [];
  const played = [];
  const p = new Player({ onMark: (name, wasPlayed) => echoed.push([name, wasPlayed]), onPlayed: (b) => played.push(b.length) });
  p.media(Buffer.alloc(800), 0); // 100 ms
  p.mark('m0', 0);
  p.media(Buffer.alloc(800), 0);
  p.mark('m1', 0);
  p.advance(99);
  assert.deepEqual(echoed, [], 'nothing has played to m0 yet');
  p.advance(100);
  assert.deepEqual(echoed, [['m0', true]]);
  assert.ok(p.busy());
  // The caller barges in 50 ms into the second chunk: Twilio keeps what played, drops the
  // rest, and echoes the marks it flushed.
  assert.deepEqual(p.clear(150), ['m1']);
  assert.deepEqual(echoed, [['m0', true], ['m1', false]]);
  assert.equal(p.playedBytes, 800 + 400);
  assert.equal(p.discardedBytes, 400);
  assert.ok(!p.busy());
});

test("Twilio's playback: the piece playing when the call ends is kept as far as it played", () => {
  const echoed = [];
  const played = [];
  const p = new Player({ onMark: (name) => echoed.push(name), onPlayed: (b, at) => played.push([b.length, at]) });
  p.media(Buffer.alloc(800), 0); // 100 ms
  p.mark('m0', 0);
  p.media(Buffer.alloc(1600), 0); // 200 ms, from 100 ms on
  p.mark('m1', 0);
  // The caller hangs up 50 ms into the second piece.
  p.hangUp(150);
  assert.deepEqual(played, [[800, 0], [400, 100]], 'the played 50 ms of the second piece is kept');
  assert.equal(p.playedBytes, 1200);
  assert.equal(p.unplayedBytes, 1200);
  assert.equal(p.discardedBytes, 0, 'not a clear');
  assert.deepEqual(echoed, ['m0'], 'no mark is echoed after the stop');
  assert.ok(!p.busy());
  // Nothing more plays after the stop.
  p.media(Buffer.alloc(800), 200);
  p.mark('m2', 200);
  p.advance(1000);
  assert.deepEqual(played, [[800, 0], [400, 100]]);
  assert.equal(p.unplayedBytes, 2000);
  assert.deepEqual(echoed, ['m0']);
});
