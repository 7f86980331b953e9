// The simulator reads TWILIO_AUTH_TOKEN and ADMIN_TOKEN from .dev.vars as wrangler does
// (scripts/sim/twilio.mjs parseDotenv): checked case by case, and against wrangler's own
// reader of .dev.vars (the installed wrangler's unstable_getVarsForDev).
//
//   node --test tests/sim/

import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';

import { parseDotenv, setting } from '../../scripts/sim/twilio.mjs';

const FILE = [
  'TWILIO_AUTH_TOKEN="quoted-token" # the primary token',
  "ADMIN_TOKEN='single' #comment",
  'PLAIN=plain value # comment',
  'HASH=abc#def',
  'EMPTY=',
  'EMPTY_COMMENT= # nothing',
  'export EXPORTED = spaced value   ',
  'COLON: colon value',
  'NEWLINES="line1\\nline2"',
  "LITERAL='line1\\nline2'",
  'ESCAPED="a \\"q\\" b"',
  'MULTI="first',
  'second"',
  'BACKTICK=`back # tick`',
  'UNTERMINATED="open',
  'AFTER=after',
  '# COMMENTED=no',
  '   INDENTED=yes',
  'JUNK="x" junk',
  'dotted.key-name=ok',
  'not an assignment',
  'TWICE=first',
  'TWICE=second',
  'URL=https://example.com/a?b=c',
  'CRLF=windows\r',
].join('\n');

test('quoted values may carry a comment; unquoted values end at #', () => {
  const v = parseDotenv(FILE);
  assert.equal(v.TWILIO_AUTH_TOKEN, 'quoted-token');
  assert.equal(v.ADMIN_TOKEN, 'single');
  assert.equal(v.PLAIN, 'plain value');
  assert.equal(v.HASH, 'abc');
  assert.equal(v.EMPTY, '');
  assert.equal(v.EMPTY_COMMENT, '');
  assert.equal(v.EXPORTED, 'spaced value');
  assert.equal(v.COLON, 'colon value');
  assert.equal(v.NEWLINES, 'line1\nline2');
  assert.equal(v.LITERAL, 'line1\\nline2');
  assert.equal(v.ESCAPED, 'a \\"q\\" b');
  assert.equal(v.MULTI, 'first\nsecond');
  assert.equal(v.BACKTICK, 'back # tick');
  assert.equal(v.AFTER, 'after');
  assert.equal(v.COMMENTED, undefined);
  assert.equal(v.INDENTED, 'yes');
  assert.equal(v['dotted.key-name'], 'ok');
  assert.equal(v.TWICE, 'second');
  assert.equal(v.URL, 'https://example.com/a?b=c');
  assert.equal(v.CRLF, 'windows');
});

test('every value is the one wrangler gives the Worker', () => {
  const dir = mkdtempSync(join(tmpdir(), 'sim-dotenv-test-'));
  try {
    writeFileSync(join(dir, '.dev.vars'), FILE);
    const require = createRequire(import.meta.url);
    const wrangler = require('wrangler');
    const vars = wrangler.unstable_getVarsForDev(join(dir, 'wrangler.toml'), undefined, {}, undefined, true);
    const theirs = Object.fromEntries(Object.entries(vars).map(([k, b]) => [k, b.value]));
    assert.ok(Object.keys(theirs).length >= 20, JSON.stringify(theirs));
    assert.deepEqual(parseDotenv(FILE), theirs);

    // And setting() reads it, the environment first.
    const saved = process.env.TWILIO_AUTH_TOKEN;
    delete process.env.TWILIO_AUTH_TOKEN;
    try {
      assert.equal(setting('TWILIO_AUTH_TOKEN', join(dir, '.dev.vars')), 'quoted-token');
      process.env.TWILIO_AUTH_TOKEN = 'from-env';
      assert.equal(setting('TWILIO_AUTH_TOKEN', join(dir, '.dev.vars')), 'from-env');
    } finally {
      if (saved === undefined) delete process.env.TWILIO_AUTH_TOKEN;
      else process.env.TWILIO_AUTH_TOKEN = saved;
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
