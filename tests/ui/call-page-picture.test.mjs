// The docs' picture of the call page (docs/call-page.png, shown in README.md and
// docs/call-review.md), taken in headless Chromium of the realistic Japanese seed alone
// (tests/ui/seed.mjs sql()), on a Worker and local D1 of its own: none of the rows the other
// browser test adds (markup in messages, unknown events, failures) can be in it. Every run
// saves it to target/ui/call-page.png; the docs' copy is refreshed on purpose, with
// CALL_PAGE_SCREENSHOT=docs/call-page.png bash scripts/ui-test.sh.

import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { after, before, test } from 'node:test';

import { launch } from './browser.mjs';
import { CALL_SID, RECORDING_KEY, TURNS, sql, wav } from './seed.mjs';
import { ROOT, scratchDir, seedD1, seedR2, startWorker } from './worker.mjs';

const TOKEN = 'ui-test-admin-token-0123456789';
const SCREENSHOT = process.env.CALL_PAGE_SCREENSHOT
  ? resolve(ROOT, process.env.CALL_PAGE_SCREENSHOT)
  : join(ROOT, 'target', 'ui', 'call-page.png');

let worker;
let browser;

before(async () => {
  const dir = scratchDir('ui-picture');
  seedD1(dir, sql());
  seedR2(dir, RECORDING_KEY, wav(), 'audio/wav');
  worker = await startWorker(dir, { ADMIN_TOKEN: TOKEN });
  browser = await launch();
});

after(async () => {
  await browser?.close();
  await worker?.stop();
});

test('the call page, as the docs show it', async () => {
  const { page } = browser;
  await page.goto(worker.baseUrl);
  await page.locator('#token').fill(TOKEN);
  await page.getByRole('button', { name: 'サインイン' }).click();
  await page.locator('tbody tr').first().click();
  await page.waitForURL(`**/#/calls/${CALL_SID}`);
  await page.waitForFunction(() => document.querySelector('audio#recording')?.readyState >= 1);
  // Played from the last turn (a click on it), then paused a little into it.
  const [, , , offset] = TURNS[4];
  await page.locator('#transcript .turn').nth(4).click();
  await page.waitForFunction((ms) => {
    const a = document.querySelector('audio#recording');
    return !a.paused && a.currentTime > ms / 1000 + 0.3 && document.querySelector('#transcript .turn.now');
  }, offset);
  await page.locator('audio#recording').evaluate((a) => a.pause());
  await page.evaluate(() => window.scrollTo(0, 0));
  const text = await page.locator('main').innerText();
  assert.match(text, /会話/);
  assert.doesNotMatch(text, /<img|onerror|mystery_event|AI エラー|再接続/, 'nothing but the realistic seed');
  mkdirSync(dirname(SCREENSHOT), { recursive: true });
  await page.screenshot({ path: SCREENSHOT, fullPage: true });
});
