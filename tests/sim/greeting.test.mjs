// Unit tests of the greeting benchmark's arguments and figures (bench/greeting.mjs); the
// benchmark itself runs in scripts/bench.sh against real Workers.
//
//   node --test tests/sim/

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { parseArgs, summarize } from '../../bench/greeting.mjs';

test('parseArgs reads targets in order, the token, calls and the gap', () => {
  const o = parseArgs(['--target', 'a=http://127.0.0.1:1/', '--target', 'b=http://127.0.0.1:2', '--auth-token', 't', '--calls', '3', '--gap-ms', '0']);
  assert.deepEqual(o.targets, [{ name: 'a', url: 'http://127.0.0.1:1' }, { name: 'b', url: 'http://127.0.0.1:2' }]);
  assert.equal(o.authToken, 't');
  assert.equal(o.calls, 3);
  assert.equal(o.gapMs, 0);
});

test('parseArgs refuses what it cannot run, saying what is wrong', () => {
  assert.throws(() => parseArgs(['--auth-token', 't']), /--target/);
  assert.throws(() => parseArgs(['--target', 'a=http://x']), /--auth-token/);
  assert.throws(() => parseArgs(['--target', 'http://x', '--auth-token', 't']), /NAME=URL/);
  assert.throws(() => parseArgs(['--target', 'a=http://x', '--auth-token', 't', '--calls', '0']), /--calls/);
  assert.throws(() => parseArgs(['--target', 'a=http://x', '--auth-token', 't', '--gap-ms', '-5']), /--gap-ms/);
  assert.throws(() => parseArgs(['--target', 'a=http://x', '--auth-token']), /needs a value/);
  assert.throws(() => parseArgs(['--bogus']), /unknown option/);
});

test('summarize gives the lower middle as p50, with min and max; nothing gives NaN', () => {
  assert.deepEqual(summarize([30, 10, 20]), { n: 3, p50: 20, min: 10, max: 30 });
  assert.deepEqual(summarize([40, 10, 30, 20]), { n: 4, p50: 20, min: 10, max: 40 });
  const none = summarize([]);
  assert.equal(none.n, 0);
  assert.ok(Number.isNaN(none.p50));
});
