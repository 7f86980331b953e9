// Tests of the simulator's keyboard keypad (scripts/sim/devices.mjs readKeypad): the keys a
// caller types during a --mic call, from a terminal or a pipe.
//
//   node --test tests/sim/

import assert from 'node:assert/strict';
import { PassThrough } from 'node:stream';
import { test } from 'node:test';

import { readKeypad } from '../../scripts/sim/devices.mjs';

/** Lets the stream deliver what was written. */
const settle = () => new Promise((r) => setImmediate(r));

test('piped keys: each of 0-9, * and # is pressed, in order; the rest is ignored; Ctrl-C hangs up', async () => {
  const stdin = new PassThrough();
  const keys = [];
  let ctrlC = 0;
  const stop = readKeypad((k) => keys.push(k), () => ctrlC++, stdin);
  stdin.write('1a#\n');
  stdin.write(Buffer.from('*9 x0'));
  await settle();
  assert.deepEqual(keys, ['1', '#', '*', '9', '0']);
  assert.equal(ctrlC, 0);
  stdin.write('\x03');
  await settle();
  assert.equal(ctrlC, 1, 'Ctrl-C as a byte');
  stop();
  stdin.write('5');
  await settle();
  assert.deepEqual(keys, ['1', '#', '*', '9', '0'], 'nothing is read once stopped');
  assert.equal(stdin.listenerCount('data'), 0);
  assert.ok(stdin.isPaused(), 'stdin is let go, so the program can exit');
});

test('on a terminal, keys are read raw (one at a time, unechoed) and the terminal is given back', async () => {
  const stdin = new PassThrough();
  const modes = [];
  stdin.isTTY = true;
  stdin.setRawMode = (on) => {
    modes.push(on);
    return stdin;
  };
  const keys = [];
  const stop = readKeypad((k) => keys.push(k), () => {}, stdin);
  assert.deepEqual(modes, [true]);
  stdin.write('0');
  await settle();
  assert.deepEqual(keys, ['0']);
  stop();
  assert.deepEqual(modes, [true, false]);
});
