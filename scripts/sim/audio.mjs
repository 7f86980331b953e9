// Audio for the call simulator: WAV in and out, downmix, resampling to 8 kHz, G.711 μ-law,
// and the stand-in's recognisable tones. Plain JavaScript, no dependencies.

export const RATE = 8000; // Twilio Media Streams: μ-law, 8 kHz, mono
export const FRAME_BYTES = 160; // 20 ms
export const BYTES_PER_MS = 8;

// ---- WAV -----------------------------------------------------------------------------------

const WAVE_FORMAT = { PCM: 1, FLOAT: 3, ALAW: 6, MULAW: 7, EXTENSIBLE: 0xfffe };

/**
 * Decodes a RIFF/WAVE file: PCM 8/16/24/32-bit, IEEE float 32/64-bit, A-law, μ-law, plain
 * or WAVE_FORMAT_EXTENSIBLE, any rate and channel count. Returns
 * `{ sampleRate, channels, bitsPerSample, format, samples }` where `samples` is one
 * Float32Array per channel, in [-1, 1].
 */
export function decodeWav(buf) {
  if (buf.length < 12 || buf.toString('ascii', 0, 4) !== 'RIFF' || buf.toString('ascii', 8, 12) !== 'WAVE') {
    throw new Error('not a RIFF/WAVE file');
  }
  let fmt = null;
  let data = null;
  let off = 12;
  while (off + 8 <= buf.length) {
    const id = buf.toString('ascii', off, off + 4);
    let size = buf.readUInt32LE(off + 4);
    const body = off + 8;
    // Streamed writers leave 0 or 0xFFFFFFFF in the data chunk's size: take what is there.
    // Any other chunk may be empty, and one that runs past the end is cut there.
    if ((size === 0 && id === 'data') || body + size > buf.length) size = buf.length - body;
    if (id === 'fmt ') {
      let format = buf.readUInt16LE(body);
      const channels = buf.readUInt16LE(body + 2);
      const sampleRate = buf.readUInt32LE(body + 4);
      const blockAlign = buf.readUInt16LE(body + 12);
      const bitsPerSample = buf.readUInt16LE(body + 14);
      if (format === WAVE_FORMAT.EXTENSIBLE && size >= 40) {
        format = buf.readUInt16LE(body + 24); // first two bytes of the SubFormat GUID
      }
      fmt = { format, channels, sampleRate, blockAlign, bitsPerSample };
    } else if (id === 'data') {
      data = buf.subarray(body, body + size);
      if (fmt) break;
    }
    off = body + size + (size & 1);
  }
  if (!fmt) throw new Error('WAV has no fmt chunk');
  if (!data) throw new Error('WAV has no data chunk');
  const { format, channels, sampleRate, bitsPerSample } = fmt;
  if (!channels || !sampleRate) throw new Error('WAV fmt chunk has no channels or rate');
  const bytes = Math.ceil(bitsPerSample / 8);
  const blockAlign = fmt.blockAlign || bytes * channels;
  const frames = Math.floor(data.length / blockAlign);
  const out = Array.from({ length: channels }, () => new Float32Array(frames));
  let read;
  if (format === WAVE_FORMAT.PCM) {
    if (bytes === 1) read = (o) => (data[o] - 128) / 128; // 8-bit PCM is unsigned
    else if (bytes === 2) read = (o) => data.readInt16LE(o) / 32768;
    else if (bytes === 3) read = (o) => data.readIntLE(o, 3) / 8388608;
    else if (bytes === 4) read = (o) => data.readInt32LE(o) / 2147483648;
    else throw new Error(`unsupported PCM sample size: ${bitsPerSample} bits`);
  } else if (format === WAVE_FORMAT.FLOAT) {
    if (bytes === 4) read = (o) => data.readFloatLE(o);
    else if (bytes === 8) read = (o) => data.readDoubleLE(o);
    else throw new Error(`unsupported float sample size: ${bitsPerSample} bits`);
  } else if (format === WAVE_FORMAT.MULAW && bytes === 1) {
    read = (o) => MULAW_DECODE[data[o]] / 32768;
  } else if (format === WAVE_FORMAT.ALAW && bytes === 1) {
    read = (o) => alawDecode(data[o]) / 32768;
  } else {
    throw new Error(`unsupported WAV format tag ${format} (${bitsPerSample} bits)`);
  }
  for (let i = 0; i < frames; i++) {
    const base = i * blockAlign;
    for (let c = 0; c < channels; c++) {
      const v = read(base + c * bytes);
      out[c][i] = v > 1 ? 1 : v < -1 ? -1 : v;
    }
  }
  return { sampleRate, channels, bitsPerSample, format, samples: out };
}

/** A 16-bit PCM mono or multi-channel WAV file from Int16Arrays (one per channel). */
export function encodeWav16(channels, sampleRate) {
  const n = channels[0].length;
  const ch = channels.length;
  const dataBytes = n * ch * 2;
  const buf = Buffer.alloc(44 + dataBytes);
  buf.write('RIFF', 0, 'ascii');
  buf.writeUInt32LE(36 + dataBytes, 4);
  buf.write('WAVE', 8, 'ascii');
  buf.write('fmt ', 12, 'ascii');
  buf.writeUInt32LE(16, 16);
  buf.writeUInt16LE(1, 20);
  buf.writeUInt16LE(ch, 22);
  buf.writeUInt32LE(sampleRate, 24);
  buf.writeUInt32LE(sampleRate * ch * 2, 28);
  buf.writeUInt16LE(ch * 2, 32);
  buf.writeUInt16LE(16, 34);
  buf.write('data', 36, 'ascii');
  buf.writeUInt32LE(dataBytes, 40);
  let o = 44;
  for (let i = 0; i < n; i++) {
    for (let c = 0; c < ch; c++) {
      buf.writeInt16LE(channels[c][i], o);
      o += 2;
    }
  }
  return buf;
}

/** Average of all channels. */
export function downmix(samples) {
  if (samples.length === 1) return samples[0];
  const n = samples[0].length;
  const out = new Float32Array(n);
  for (const ch of samples) for (let i = 0; i < n; i++) out[i] += ch[i];
  for (let i = 0; i < n; i++) out[i] /= samples.length;
  return out;
}

// ---- resampling ----------------------------------------------------------------------------

function bessel0(x) {
  // Modified Bessel function of the first kind, order 0 (series), for the Kaiser window.
  let sum = 1;
  let term = 1;
  const q = (x * x) / 4;
  for (let k = 1; k < 50; k++) {
    term *= q / (k * k);
    sum += term;
    if (term < 1e-12 * sum) break;
  }
  return sum;
}

/**
 * Band-limited resampling by windowed-sinc interpolation (Kaiser window, beta 8.6, 24 zero
 * crossings each side). The low-pass sits at 0.45 × the lower of the two rates (3.6 kHz
 * for 8 kHz output), so nothing above the new Nyquist folds back into the band.
 */
export function resample(x, fromRate, toRate) {
  if (fromRate === toRate) return Float32Array.from(x);
  const ratio = toRate / fromRate;
  const cutoff = 0.9 * Math.min(1, ratio); // fraction of the input Nyquist
  const zeroCrossings = 24;
  const halfWidth = zeroCrossings / cutoff; // in input samples
  const beta = 8.6;
  const i0beta = bessel0(beta);
  // Tabulated kernel (linear interpolation between 512 points per input sample).
  const perSample = 512;
  const tableLen = Math.ceil(halfWidth * perSample) + 2;
  const table = new Float64Array(tableLen);
  for (let i = 0; i < tableLen; i++) {
    const t = i / perSample; // distance in input samples
    if (t >= halfWidth) break;
    const arg = Math.PI * t * cutoff;
    const sinc = t === 0 ? 1 : Math.sin(arg) / arg;
    const r = t / halfWidth;
    const w = bessel0(beta * Math.sqrt(Math.max(0, 1 - r * r))) / i0beta;
    table[i] = cutoff * sinc * w;
  }
  const kernel = (t) => {
    const a = Math.abs(t) * perSample;
    const i = Math.floor(a);
    if (i + 1 >= tableLen) return 0;
    const f = a - i;
    return table[i] * (1 - f) + table[i + 1] * f;
  };
  const outLen = Math.floor(x.length * ratio);
  const out = new Float32Array(outLen);
  const reach = Math.ceil(halfWidth);
  for (let n = 0; n < outLen; n++) {
    const t = n / ratio; // position in input samples
    const centre = Math.floor(t);
    let acc = 0;
    const lo = Math.max(0, centre - reach + 1);
    const hi = Math.min(x.length - 1, centre + reach);
    for (let k = lo; k <= hi; k++) acc += x[k] * kernel(t - k);
    out[n] = acc;
  }
  return out;
}

// ---- G.711 μ-law ---------------------------------------------------------------------------

const BIAS = 0x84;
const CLIP = 32635;

/** Standard G.711 μ-law encoding of one 16-bit linear sample. */
export function mulawEncode(sample) {
  let s = sample | 0;
  const sign = s < 0 ? 0x80 : 0;
  if (s < 0) s = -s;
  if (s > CLIP) s = CLIP;
  s += BIAS;
  let exponent = 7;
  for (let mask = 0x4000; (s & mask) === 0 && exponent > 0; mask >>= 1) exponent--;
  const mantissa = (s >> (exponent + 3)) & 0x0f;
  return ~(sign | (exponent << 4) | mantissa) & 0xff;
}

/** Standard G.711 μ-law decoding of one byte to a 16-bit linear sample. */
export function mulawDecode(byte) {
  const u = ~byte & 0xff;
  const sign = u & 0x80;
  const exponent = (u >> 4) & 0x07;
  const mantissa = u & 0x0f;
  const magnitude = (((mantissa << 3) + BIAS) << exponent) - BIAS;
  return sign ? -magnitude : magnitude;
}

export const MULAW_DECODE = Int16Array.from({ length: 256 }, (_, b) => mulawDecode(b));
/** μ-law of digital silence (0): 0xFF. */
export const MULAW_SILENCE = mulawEncode(0);

function alawDecode(byte) {
  const a = byte ^ 0x55;
  const sign = a & 0x80;
  const exponent = (a >> 4) & 0x07;
  const mantissa = a & 0x0f;
  let magnitude = exponent === 0 ? (mantissa << 4) + 8 : ((mantissa << 4) + 0x108) << (exponent - 1);
  return sign ? magnitude : -magnitude;
}

/** Float samples in [-1, 1] to μ-law bytes. */
export function floatToMulaw(x) {
  const out = Buffer.alloc(x.length);
  for (let i = 0; i < x.length; i++) {
    const v = Math.max(-1, Math.min(1, x[i]));
    out[i] = mulawEncode(Math.round(v * 32767));
  }
  return out;
}

/** μ-law bytes to 16-bit linear samples. */
export function mulawToInt16(bytes) {
  const out = new Int16Array(bytes.length);
  for (let i = 0; i < bytes.length; i++) out[i] = MULAW_DECODE[bytes[i]];
  return out;
}

/** Root mean square of μ-law bytes, in dBFS (-inf for digital silence). */
export function mulawDbfs(bytes, start = 0, end = bytes.length) {
  let sum = 0;
  for (let i = start; i < end; i++) {
    const v = MULAW_DECODE[bytes[i]];
    sum += v * v;
  }
  const n = end - start;
  if (n <= 0 || sum === 0) return -Infinity;
  return 10 * Math.log10(sum / n / (32768 * 32768));
}

/** A WAV file (any format above) as 8 kHz μ-law bytes, plus what it was. */
export function wavToMulaw8k(buf) {
  const wav = decodeWav(buf);
  const mono = downmix(wav.samples);
  const x = resample(mono, wav.sampleRate, RATE);
  return { mulaw: floatToMulaw(x), source: wav, seconds: mono.length / wav.sampleRate };
}

// ---- the stand-in's tones ------------------------------------------------------------------

/**
 * μ-law audio of a sequence of tones `[{ hz, ms }]` (hz 0 = silence), with 5 ms fades so
 * the notes do not click. Amplitude about -12 dBFS.
 */
export function toneSequence(notes, amplitude = 0.25) {
  const total = notes.reduce((a, n) => a + Math.round((n.ms * RATE) / 1000), 0);
  const x = new Float32Array(total);
  let o = 0;
  for (const { hz, ms } of notes) {
    const len = Math.round((ms * RATE) / 1000);
    const fade = Math.min(40, len >> 1);
    for (let i = 0; i < len; i++) {
      if (!hz) continue;
      const env = Math.min(1, i / fade, (len - 1 - i) / fade);
      x[o + i] = amplitude * env * Math.sin((2 * Math.PI * hz * i) / RATE);
    }
    o += len;
  }
  return floatToMulaw(x);
}

/** Power of `hz` in 16-bit samples (Goertzel), normalised by length; for tests. */
export function goertzel(samples, hz, rate = RATE) {
  const k = (2 * Math.PI * hz) / rate;
  const coeff = 2 * Math.cos(k);
  let s1 = 0;
  let s2 = 0;
  for (let i = 0; i < samples.length; i++) {
    const s0 = samples[i] / 32768 + coeff * s1 - s2;
    s2 = s1;
    s1 = s0;
  }
  const power = s1 * s1 + s2 * s2 - coeff * s1 * s2;
  return power / (samples.length * samples.length);
}
