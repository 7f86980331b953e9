// Browser test of the call-review page (public/), in headless Chromium (Debian's `chromium`
// driven by playwright-core) against the real Worker in `wrangler dev`: sign in with the admin
// token, find the call in the list (statuses in words, times with their zone, a number typed
// the Japanese way), see a late call page dropped after going back to the list, read its
// transcript and events (labels with the raw code as tooltip, DTMF digits, details folded
// open as text, markup in a message shown as text), play its recording and seek by clicking a
// transcript line or Space on it, see the current turn scrolled into view, switch to English
// without losing the playback position, have an expired recording link renewed where the
// recording was (and not past what a new link cures), see an agent's validation error next
// to its field, and sign out, which lets go of the recording. The docs' picture of the call page is taken by call-page-picture.test.mjs,
// of a clean seed.
//
//   node --test tests/ui/        (scripts/ui-test.sh installs Chromium first when missing)

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { launch } from './browser.mjs';
import {
  BROKEN_AGENT, CALL_SID, HAND_VOICE, HAND_VOICE_AGENT, LONG_DURATION_MS, LONG_RECORDING_KEY, LONG_SID, OTHER_SID, RECORDING_KEY,
  SECOND_AGENT, TURNS, UNSTREAMED_TWILIO_S, longWav, sql, testSql, wav,
} from './seed.mjs';
import { scratchDir, seedD1, seedR2, startWorker } from './worker.mjs';

const TOKEN = 'ui-test-admin-token-0123456789';

let worker;
let browser;
let page;
const consoleErrors = [];
const recordingRequests = [];

before(async () => {
  const dir = scratchDir('ui');
  seedD1(dir, `${sql()}\n${testSql()}`);
  seedR2(dir, RECORDING_KEY, wav(), 'audio/wav');
  seedR2(dir, LONG_RECORDING_KEY, longWav(), 'audio/wav');
  worker = await startWorker(dir, { ADMIN_TOKEN: TOKEN });
  browser = await launch();
  page = browser.page;
  page.on('pageerror', (e) => consoleErrors.push(String(e)));
  // What the page's Content-Security-Policy refused, in each document loaded.
  await page.addInitScript(() => {
    window.__csp = [];
    document.addEventListener('securitypolicyviolation', (e) => window.__csp.push(`${e.violatedDirective} ${e.blockedURI}`));
  });
  page.on('request', (r) => {
    if (r.url().includes('/recording')) {
      const headers = r.headers();
      recordingRequests.push({ url: r.url(), range: headers.range, authorization: headers.authorization });
    }
  });
  // Answers like 401 and 400 are expected (and shown by the page); anything else is not.
  page.on('console', (m) => {
    if (m.type() === 'error' && !m.text().startsWith('Failed to load resource')) consoleErrors.push(m.text());
  });
});

/** A request to the admin API from outside the page (another person, or the test reading back). */
const adminApi = (method, path, body) => fetch(`${worker.baseUrl}${path}`, {
  method,
  headers: { Authorization: `Bearer ${TOKEN}`, ...(body ? { 'Content-Type': 'application/json' } : {}) },
  body: body ? JSON.stringify(body) : undefined,
});
const agentOf = async (id) => (await (await adminApi('GET', `/api/admin/agents/${id}`)).json()).agent;

after(async () => {
  await browser?.close();
  await worker?.stop();
});

test('sign in with the admin token (a wrong one is refused)', async () => {
  await page.goto(worker.baseUrl);
  await page.getByRole('heading', { name: 'サインイン' }).waitFor();
  await page.locator('#token').fill('not-the-token');
  await page.getByRole('button', { name: 'サインイン' }).click();
  await page.getByText('トークンが正しくありません。').waitFor();
  await page.locator('#token').fill(TOKEN);
  await page.getByRole('button', { name: 'サインイン' }).click();
  await page.getByRole('heading', { name: '通話' }).waitFor();
  assert.equal(await page.evaluate(() => sessionStorage.getItem('phone-agent-bridge.admin-token')), TOKEN);
});

test('the calls list shows the newest call first, with its figures', async () => {
  const rows = page.locator('tbody tr');
  await rows.first().waitFor();
  assert.equal(await rows.count(), 4);
  const first = await rows.nth(0).innerText();
  // Statuses in the page's language, the raw code kept as the tooltip (for log searches).
  assert.match(first, /完了/);
  assert.doesNotMatch(first, /completed/);
  assert.equal(await rows.nth(0).locator('.badge').getAttribute('title'), 'completed');
  assert.match(first, /\+819012345678/);
  assert.match(first, /\+815012345678/);
  assert.match(first, /0:12/, 'duration');
  assert.match(first, /標準受付/, 'the agent by name');
  assert.match(await rows.nth(1).innerText(), /失敗/);
  // A call never streamed: Twilio's duration, not "—".
  assert.match(await rows.nth(3).innerText(), new RegExp(`0:${UNSTREAMED_TWILIO_S}`));
  // Sizes: none is 0 B, not 1 KiB.
  assert.deepEqual(await page.evaluate(() => [0, 512, 2048, 3 * 1048576].map(fmtBytes)), ['0 B', '512 B', '2 KiB', '3.0 MiB']);
  // Times say which zone they are in (the browser's: Asia/Tokyo here), and so do the date filters.
  assert.match(first, /UTC\+9/);
  assert.match(await page.locator('form.filters').innerText(), /UTC\+9/);
  // Filters go through the API.
  await page.locator('#f-status').selectOption('failed');
  await page.getByRole('button', { name: '絞り込む' }).click();
  await page.waitForFunction(() => document.querySelectorAll('tbody tr').length === 1);
  assert.match(await page.locator('tbody tr').innerText(), /失敗/);
  await page.getByRole('button', { name: 'クリア' }).click();
  await page.waitForFunction(() => document.querySelectorAll('tbody tr').length === 4);
  // A number typed the Japanese way is sent as E.164.
  await page.locator('#f-number').fill('090-1234-5678');
  await page.getByRole('button', { name: '絞り込む' }).click();
  await page.waitForFunction(() => document.querySelectorAll('tbody tr').length === 1);
  assert.match(await page.evaluate(() => location.hash), /number=%2B819012345678/);
  assert.match(await page.locator('tbody tr').innerText(), /\+819012345678/);
  // So is one typed with a Japanese IME, whose "-" is often the long-vowel mark ー.
  await page.getByRole('button', { name: 'クリア' }).click();
  await page.waitForFunction(() => location.hash === '#/calls' && document.querySelectorAll('tbody tr').length === 4);
  await page.locator('#f-number').fill('０９０ー１２３４ー５６７８');
  await page.getByRole('button', { name: '絞り込む' }).click();
  await page.waitForFunction(() => /number=%2B819012345678/.test(location.hash));
  await page.waitForFunction(() => document.querySelectorAll('tbody tr').length === 1);
  // Every dash such input gives.
  const typed = ['090ー1234ー5678', '090－1234－5678', '090‑1234‑5678', '090‐1234‐5678', '090–1234–5678',
    '090—1234—5678', '090―1234―5678', '090‒1234‒5678', '090−1234−5678', '090ｰ1234ｰ5678', '090﹣1234﹣5678',
    '(090) 1234 5678', '+81 90ー1234ー5678'];
  assert.deepEqual(await page.evaluate((xs) => xs.map(normaliseNumber), typed), typed.map(() => '+819012345678'));
  // One the API refuses: its message next to the input, in the page's language.
  await page.locator('#f-number').fill('abc');
  await page.getByRole('button', { name: '絞り込む' }).click();
  const numberErr = page.locator('[data-error-for="number"]');
  await page.waitForFunction(() => document.querySelector('[data-error-for="number"]')?.textContent);
  assert.match(await numberErr.innerText(), /電話番号/);
  await page.getByRole('button', { name: 'クリア' }).click();
  await page.waitForFunction(() => document.querySelectorAll('tbody tr').length === 4);
});

test('a call page answered after the user went back does not replace the list', async () => {
  let release;
  const held = new Promise((r) => { release = r; });
  const detail = `**/api/admin/calls/${CALL_SID}`;
  await page.route(detail, async (route) => { await held; await route.continue(); });
  await page.evaluate((sid) => { location.hash = `#/calls/${sid}`; }, CALL_SID);
  await page.waitForTimeout(300);
  await page.evaluate(() => { location.hash = '#/calls'; });
  await page.waitForFunction(() => document.querySelectorAll('tbody tr').length === 4);
  release();
  await page.waitForTimeout(1500);
  await page.unroute(detail);
  assert.equal(await page.locator('#transcript').count(), 0, 'the late call page was dropped');
  assert.equal(await page.locator('tbody tr').count(), 4);
});

test('one call: transcript, marks, figures, and the recording plays and seeks', async () => {
  await page.locator('tbody tr').first().click();
  await page.waitForURL(`**/#/calls/${CALL_SID}`);
  const lines = page.locator('#transcript .turn');
  await lines.first().waitFor();
  assert.equal(await lines.count(), TURNS.length);
  for (const [seq, role, text] of TURNS) {
    const line = lines.nth(seq);
    assert.match(await line.innerText(), new RegExp(text.slice(0, 8)));
    assert.match(await line.getAttribute('class'), new RegExp(role));
  }
  assert.match(await lines.nth(2).innerText(), /割り込みで中断/);
  const convo = await page.locator('#transcript').innerText();
  assert.match(convo, /割り込み \(中断までに聞こえた長さ 800 ms\)/);
  assert.match(convo, /ツール呼び出し: lookup_reservation/);
  // Event codes in Japanese (the code as the tooltip), DTMF digits inline, an unknown code raw.
  assert.match(convo, /プッシュ操作: 5/);
  assert.match(convo, /AI エラー/);
  assert.match(convo, /AI 再接続中/);
  assert.match(convo, /終話/);
  assert.match(convo, /mystery_event/);
  assert.doesNotMatch(convo, /openai_error|reconnect\b|dtmf/);
  assert.equal(await page.locator('#transcript .sys.dtmf [title="dtmf"]').count(), 1);
  // Details (a tool call's arguments and output, a hang-up's reason, an error's message) fold
  // open, as text.
  const tool = page.locator('#transcript .sys.tool_call details');
  await tool.locator('summary').click();
  const toolText = await tool.innerText();
  assert.match(toolText, /"name": "山田"/);
  assert.match(toolText, /"time": "15:00"/);
  const error = page.locator('#transcript .sys.openai_error details');
  await error.locator('summary').click();
  assert.match(await error.innerText(), /<img src=x onerror="window.__xss=1">/);
  assert.equal(await page.evaluate(() => window.__xss), undefined);
  const hangup = page.locator('#transcript .sys.hangup details');
  await hangup.locator('summary').click();
  assert.match(await hangup.innerText(), /the caller said goodbye/);
  assert.equal(await page.evaluate(() => location.hash), `#/calls/${CALL_SID}`, 'opening details does not navigate');
  assert.equal(await page.locator('.timeline .mark.barge_in').count(), 1);
  assert.equal(await page.locator('.timeline .mark.tool_call').count(), 1);
  const figures = await page.locator('.figures').innerText();
  assert.match(figures, /640 ms/, 'time to first agent audio');
  assert.match(figures, /1234 \/ 567 \/ 1801/, 'tokens');
  assert.match(figures, /文字起こし \(入力 \/ 出力\)\s*210 \/ 48\b/, 'the transcription\'s tokens, apart');
  assert.match(figures, /通話終了 \(電話側\)/, 'end reason');
  assert.equal(await page.locator('.figures [title="twilio_stop"]').count(), 1);
  assert.equal(await page.locator('h1 + p .badge').getAttribute('title'), 'completed');
  // Only status messages are announced, not the whole page.
  assert.equal(await page.locator('main[aria-live]').count(), 0);
  assert.equal(await page.locator('[role="status"][aria-live="polite"]#live').count(), 1);

  // The recording: played from its signed link, streamed by the browser with Range requests
  // that carry no token.
  const audio = page.locator('audio#recording');
  await audio.waitFor();
  await page.waitForFunction(() => {
    const a = document.querySelector('audio#recording');
    return a && /\/recording\?expires=\d+&signature=/.test(a.src) && a.readyState >= 1 && Math.abs(a.duration - 12) < 0.1;
  });
  const fetched = recordingRequests.filter((r) => r.url.includes(`/calls/${CALL_SID}/recording?`));
  assert.ok(fetched.length >= 1, 'the audio element fetched the recording itself');
  assert.ok(fetched.some((r) => r.range), `a Range request: ${JSON.stringify(fetched)}`);
  assert.ok(fetched.every((r) => !r.authorization), 'the link needs no token');
  await page.evaluate(() => {
    const a = document.querySelector('audio#recording');
    window.__played = false;
    a.addEventListener('playing', () => { window.__played = true; });
  });
  // Clicking a transcript line seeks there and plays.
  const [, , , offset] = TURNS[4];
  await lines.nth(4).click();
  await page.waitForFunction(() => window.__played === true);
  await page.waitForFunction((ms) => {
    const a = document.querySelector('audio#recording');
    return !a.paused && a.currentTime > ms / 1000 + 0.3;
  }, offset);
  const t = await audio.evaluate((a) => a.currentTime);
  assert.ok(t >= offset / 1000 && t < 12, `currentTime ${t}`);
  await page.waitForFunction(() => document.querySelector('#transcript .turn.now') !== null);
  assert.match(await page.locator('#transcript .turn.now').innerText(), /山田様/);
  await audio.evaluate((a) => a.pause());
  // Space on a focused turn seeks and plays too.
  await lines.nth(3).focus();
  await page.keyboard.press('Space');
  await page.waitForFunction((ms) => {
    const a = document.querySelector('audio#recording');
    return !a.paused && a.currentTime >= ms / 1000 && a.currentTime < ms / 1000 + 2;
  }, TURNS[3][3]);
  await audio.evaluate((a) => a.pause());
  // While playing, the current turn is scrolled into view (unless the user just scrolled).
  await page.setViewportSize({ width: 1280, height: 400 });
  await page.evaluate(() => window.scrollTo(0, 0));
  await audio.evaluate((a) => { a.currentTime = 8.4; a.play(); });
  await page.waitForFunction(() => {
    const now = document.querySelector('#transcript .turn.now');
    if (!now) return false;
    const r = now.getBoundingClientRect();
    // Within a pixel: scrolled to the nearest edge, a turn's fractional height can leave it
    // a fraction of a pixel past it.
    return /山田様/.test(now.textContent) && r.top >= -1 && r.bottom <= window.innerHeight + 1;
  });
  await audio.evaluate((a) => a.pause());
  await page.setViewportSize({ width: 1280, height: 900 });
  await page.evaluate(() => window.scrollTo(0, 0));
});

test('the English switch relabels the page, keeps the recording playing where it was, and is remembered', async (t) => {
  // Whatever happens here, the tests after this one read the page in Japanese.
  t.after(async () => {
    if (await page.evaluate(() => document.documentElement.lang) === 'ja') return;
    await page.evaluate(() => localStorage.removeItem('phone-agent-bridge.lang'));
    await page.reload();
  });
  await page.locator('audio#recording').evaluate((a) => { a.currentTime = 6; return a.play(); });
  await page.getByRole('button', { name: 'English' }).click();
  await page.getByRole('heading', { name: 'Conversation' }).waitFor();
  await page.waitForFunction(() => {
    const a = document.querySelector('audio#recording');
    return a && a.src && !a.paused && a.currentTime >= 6 && a.currentTime < 9;
  });
  await page.locator('audio#recording').evaluate((a) => a.pause());
  const convo = await page.locator('#transcript').innerText();
  assert.match(convo, /Barge-in \(800 ms heard before the cut\)/);
  assert.match(convo, /Keypad: 5/);
  assert.match(await page.locator('.figures').innerText(), /Ended by the phone side/);
  assert.equal(await page.locator('h1 + p .badge').innerText(), 'Completed');
  assert.equal(await page.evaluate(() => document.documentElement.lang), 'en');
  await page.reload();
  await page.getByRole('heading', { name: 'Conversation' }).waitFor();
  await page.getByRole('button', { name: '日本語' }).click();
  await page.getByRole('heading', { name: '会話' }).waitFor();
});

// ---- an expired recording link ----------------------------------------------------------------
// A recording link lives 6 hours; a page left open longer has its next Range request refused
// (401 link_expired). Here the browser routes such a refusal itself, on LONG_SID, whose
// recording is too long to be buffered whole: a seek past what the browser holds needs a new
// Range request on the page's link, as on a real page left open.

const FAILED = '読み込めませんでした: ページを再読み込みしてください。';
const isLongWav = (url) => url.pathname === `/api/admin/calls/${LONG_SID}/recording`;
const isLongLink = (url) => url.pathname === `/api/admin/calls/${LONG_SID}/recording-link`;
const linkRequests = () => recordingRequests.filter((r) => isLongLink(new URL(r.url))).length;
const player = () => page.locator('audio#recording');
const answer = (route, status, error) => route.fulfill({
  status, contentType: 'application/json', headers: status === 401 ? { 'WWW-Authenticate': 'Bearer' } : {},
  body: JSON.stringify({ error, message: error }),
});

/** LONG_SID's page drawn anew, once the browser has buffered what it will ahead and stopped
 *  loading. Returns the middle (s) of the widest stretch of the recording it does not hold. */
async function openLongCall() {
  await page.goto(`${worker.baseUrl}/#/calls/${LONG_SID}`);
  await page.reload();
  await page.waitForFunction((s) => {
    const a = document.querySelector('audio#recording');
    return a && /\/recording\?expires=\d+&signature=/.test(a.src) && a.readyState >= 1 && Math.abs(a.duration - s) < 0.1
      && a.networkState === HTMLMediaElement.NETWORK_IDLE;
  }, LONG_DURATION_MS / 1000);
  return unbuffered();
}

/** The middle (s) of the widest stretch of the recording the browser does not hold. */
async function unbuffered() {
  const [from, to] = await player().evaluate((a) => {
    let best = [0, 0];
    let from = 0;
    for (let i = 0; i <= a.buffered.length; i++) {
      const to = i < a.buffered.length ? a.buffered.start(i) : a.duration;
      if (to - from > best[1] - best[0]) best = [from, to];
      if (i < a.buffered.length) from = a.buffered.end(i);
    }
    return best;
  });
  assert.ok(to - from > 20, `the browser holds nearly all the recording (${from}–${to} s missing): no Range request to refuse`);
  return Math.round((from + to) / 2);
}

test('a recording left open past its link\'s life gets a new link and goes on where it was, playing or paused', async () => {
  const at = await openLongCall();
  await page.waitForTimeout(1100); // a link asked for in the same second is the same link
  const first = await player().evaluate((a) => a.src);
  const links = linkRequests();
  let refuse = 1;
  const refused = [];
  await page.route(isLongWav, (route) => {
    if (refuse <= 0) return route.continue();
    refuse--;
    refused.push(route.request().headers().range);
    return answer(route, 401, 'link_expired');
  });
  // Playing: seek past what the browser holds, and play.
  await player().evaluate((a, t) => { a.currentTime = t; a.play().catch(() => {}); }, at);
  await page.waitForFunction(({ first, at }) => {
    const a = document.querySelector('audio#recording');
    return a.src !== first && !a.paused && a.currentTime > at + 0.3;
  }, { first, at });
  assert.equal(refused.length, 1);
  assert.match(refused[0], /^bytes=[1-9]\d*-/, 'the refused request was the seek\'s, not the first load\'s');
  assert.equal(linkRequests(), links + 1, 'one new link');
  assert.match(await player().evaluate((a) => a.src), /\/recording\?expires=\d+&signature=/);
  const t = await player().evaluate((a) => a.currentTime);
  assert.ok(t >= at && t < at + 5, `played on from ${at} s: ${t}`);
  assert.equal(await page.locator('#recording-status').count(), 0, 'no error shown');
  await player().evaluate((a) => a.pause());

  // Paused: a seek while paused has its link renewed too, and stays paused there.
  const second = await player().evaluate((a) => a.src);
  const at2 = await unbuffered();
  await page.waitForTimeout(1100);
  refuse = 1;
  await player().evaluate((a, t) => { a.currentTime = t; }, at2);
  await page.waitForFunction(({ second, at }) => {
    const a = document.querySelector('audio#recording');
    return a.src !== second && a.readyState >= 1 && Math.abs(a.currentTime - at) < 0.01;
  }, { second, at: at2 });
  await page.waitForTimeout(500);
  assert.equal(refused.length, 2);
  assert.equal(linkRequests(), links + 2);
  const [paused, t2] = await player().evaluate((a) => [a.paused, a.currentTime]);
  assert.ok(paused, 'still paused');
  assert.ok(Math.abs(t2 - at2) < 0.05, `at ${at2} s: ${t2}`);
  assert.equal(await page.locator('#recording-status').count(), 0, 'no error shown');
  await page.unroute(isLongWav);
});

test('what a new link does not cure still ends in the error message, and a refused token in the sign-in', async () => {
  // The recording gone from storage: one new link, refused too, and the message.
  let at = await openLongCall();
  let links = linkRequests();
  await page.route(isLongWav, (route) => answer(route, 404, 'not_found'));
  await player().evaluate((a, t) => { a.currentTime = t; a.play().catch(() => {}); }, at);
  await page.locator('#recording-status.error').getByText(FAILED).waitFor();
  await page.waitForTimeout(500);
  assert.equal(linkRequests(), links + 1);
  await page.unroute(isLongWav);

  // A link refused at every seek however new: renewed three times in a row, then the message.
  at = await openLongCall();
  links = linkRequests();
  let refused = 0;
  await page.route(isLongWav, (route) => {
    if (/^bytes=0-/.test(route.request().headers().range || 'bytes=0-')) return route.continue();
    refused++;
    return answer(route, 401, 'link_expired');
  });
  await player().evaluate((a, t) => { a.currentTime = t; a.play().catch(() => {}); }, at);
  await page.locator('#recording-status.error').getByText(FAILED).waitFor();
  await page.waitForTimeout(500);
  assert.equal(linkRequests(), links + 3);
  assert.equal(refused, 4);
  await page.unroute(isLongWav);

  // The admin token no longer valid: asking for a new link signs out, as any 401 on it does.
  at = await openLongCall();
  await page.route(isLongWav, (route) => answer(route, 401, 'unauthorized'));
  await page.route(isLongLink, (route) => answer(route, 401, 'unauthorized'));
  await player().evaluate((a, t) => { a.currentTime = t; a.play().catch(() => {}); }, at);
  await page.getByRole('heading', { name: 'サインイン' }).waitFor();
  await page.getByText('もう一度サインインしてください。').waitFor();
  await page.unroute(isLongWav);
  await page.unroute(isLongLink);
  await page.locator('#token').fill(TOKEN);
  await page.getByRole('button', { name: 'サインイン' }).click();
  await page.waitForFunction(() => document.querySelector('audio#recording')?.readyState >= 1);
});

test('agents: API validation messages appear next to the field they name', async () => {
  await page.goto(`${worker.baseUrl}/#/agents`);
  await page.getByRole('cell', { name: 'default', exact: true }).waitFor();
  await page.goto(`${worker.baseUrl}/#/agents/default`);
  const threshold = page.locator('[data-field="turn_detection.threshold"]');
  await threshold.waitFor();
  const voices = await page.locator('[data-field="voice"] option').allInnerTexts();
  assert.deepEqual(voices, ['alloy', 'ash', 'ballad', 'coral', 'echo', 'sage', 'shimmer', 'verse', 'marin', 'cedar']);
  const noise = page.locator('[data-field="noise_reduction"]');
  assert.deepEqual(await noise.locator('option').allInnerTexts(), ['near_field', 'far_field', 'off']);
  assert.equal(await noise.inputValue(), 'near_field');
  await threshold.fill('1.5');
  await page.getByRole('button', { name: '保存' }).click();
  const err = page.locator('[data-error-for="turn_detection.threshold"]');
  await page.waitForFunction(() => document.querySelector('[data-error-for="turn_detection.threshold"]').textContent !== '');
  assert.match(await err.innerText(), /between 0\.0 and 1\.0/);
  // Tools JSON that does not parse is caught before it is sent.
  await threshold.fill('0.6');
  await page.locator('[data-field="tools"]').fill('[{"type": ');
  await page.getByRole('button', { name: '保存' }).click();
  assert.match(await page.locator('[data-error-for="tools"]').innerText(), /JSON/);
  assert.equal(await err.innerText(), '');
  // A fixed form saves, recording off included.
  await page.locator('[data-field="tools"]').fill('[]');
  await page.locator('[data-field="record_calls"]').uncheck();
  await noise.selectOption('far_field');
  await page.getByRole('button', { name: '保存' }).click();
  await page.getByText('保存しました。').waitFor();
  const r = await fetch(`${worker.baseUrl}/api/admin/agents/default`, { headers: { Authorization: `Bearer ${TOKEN}` } });
  const { agent } = await r.json();
  assert.equal(agent.turn_detection.threshold, 0.6);
  assert.equal(agent.record_calls, false);
  assert.equal(agent.noise_reduction, 'far_field');
});

test('agents: a save sends only the fields changed, so someone else\'s change to other fields stays', async () => {
  const puts = [];
  const onRequest = (r) => { if (r.method() === 'PUT' && r.url().includes('/api/admin/agents/')) puts.push(r.postDataJSON()); };
  page.on('request', onRequest);
  await page.goto(`${worker.baseUrl}/#/agents/${SECOND_AGENT}`);
  const name = page.locator('[data-field="name"]');
  await name.waitFor();
  // Someone else changes other fields while the form is open.
  const other = await adminApi('PUT', `/api/admin/agents/${SECOND_AGENT}`,
    { instructions: '別の人が書いた指示', turn_detection: { silence_duration_ms: 900 } });
  assert.equal(other.status, 200);
  await name.fill('予約受付 (改)');
  await page.locator('[data-field="turn_detection.threshold"]').fill('0.7');
  await page.getByRole('button', { name: '保存' }).click();
  await page.getByText('保存しました。').waitFor();
  assert.deepEqual(puts, [{ name: '予約受付 (改)', turn_detection: { threshold: 0.7 } }]);
  let agent = await agentOf(SECOND_AGENT);
  assert.equal(agent.name, '予約受付 (改)');
  assert.equal(agent.turn_detection.threshold, 0.7);
  assert.equal(agent.instructions, '別の人が書いた指示', 'the other change stays');
  assert.equal(agent.turn_detection.silence_duration_ms, 900, 'the other change stays');
  assert.equal(agent.voice, 'cedar');
  // Saved again unchanged: nothing is sent.
  await page.getByRole('button', { name: '保存' }).click();
  await page.getByText('変更はありません。').waitFor();
  assert.equal(puts.length, 1);

  // A stored voice the page does not list is shown, not replaced by the first voice listed,
  // and not sent with a change of other fields (the API, which does not know it either,
  // says so next to the voice).
  puts.length = 0;
  await page.goto(`${worker.baseUrl}/#/agents/${HAND_VOICE_AGENT}`);
  const voice = page.locator('[data-field="voice"]');
  await voice.waitFor();
  assert.equal(await voice.inputValue(), HAND_VOICE);
  await name.fill('手書きの声 (改)');
  await page.getByRole('button', { name: '保存' }).click();
  await page.waitForFunction(() => document.querySelector('[data-error-for="voice"]').textContent !== '');
  assert.deepEqual(puts, [{ name: '手書きの声 (改)' }]);
  agent = await agentOf(HAND_VOICE_AGENT);
  assert.equal(agent.voice, HAND_VOICE);
  assert.equal(agent.name, '手書きの声');
  page.off('request', onRequest);
});

test('agents: a row the API cannot read is listed as such, and its form opens to repair it', async () => {
  await page.goto(`${worker.baseUrl}/#/agents`);
  const row = page.locator('tbody tr', { hasText: BROKEN_AGENT });
  await row.waitFor();
  const listed = await row.innerText();
  assert.match(listed, /壊れた行/);
  assert.match(listed, /保存されている値を読み込めません: tools \(not JSON/, 'which field, and why');
  assert.doesNotMatch(listed, /録音/, 'no settings it does not have');
  await row.getByRole('link').click();
  await page.waitForURL(`**/#/agents/${BROKEN_AGENT}`);
  // The form, on the defaults, the field at fault named next to it.
  const toolsErr = page.locator('[data-error-for="tools"]');
  await toolsErr.waitFor();
  assert.match(await toolsErr.innerText(), /not JSON/);
  assert.match(await page.locator('p.unreadable').innerText(), /「tools」/);
  assert.match(await page.locator('h1').innerText(), /壊れた行/);
  assert.equal(await page.locator('[data-field="voice"]').inputValue(), 'marin');
  assert.equal(await page.locator('[data-field="tools"]').inputValue(), '[]');
  // Saved as it is, the field at fault is sent (with the default shown) and repairs the row;
  // the fields left alone keep what is stored, not the form's defaults.
  const put = page.waitForRequest((r) => r.method() === 'PUT' && r.url().endsWith(`/api/admin/agents/${BROKEN_AGENT}`));
  await page.getByRole('button', { name: '保存' }).click();
  assert.deepEqual((await put).postDataJSON(), { tools: [] });
  await page.getByText('保存しました。').waitFor();
  const agent = await agentOf(BROKEN_AGENT);
  assert.equal(agent.unreadable, undefined);
  assert.deepEqual(agent.tools, []);
  assert.equal(agent.voice, 'sage');
  assert.equal(agent.instructions, '壊れた行の指示');
  // Drawn again from what is stored.
  assert.equal(await page.locator('[data-field="voice"]').inputValue(), 'sage');
  assert.equal(await page.locator('[data-field="instructions"]').inputValue(), '壊れた行の指示');
  assert.equal(await page.locator('p.unreadable').count(), 0);
});

test('number assignments: assign and list', async () => {
  await page.goto(`${worker.baseUrl}/#/numbers`);
  await page.locator('#n-number').fill('03-1234');
  await page.getByRole('button', { name: '割り当て' }).click();
  await page.getByText(/E\.164/).waitFor();
  await page.locator('#n-number').fill('+81312345678');
  await page.getByRole('button', { name: '割り当て' }).click();
  await page.getByRole('cell', { name: '+81312345678' }).waitFor();
});

test('a calls list or recording link the server cannot give shows the failure with its reload button', async () => {
  const isCalls = (url) => url.pathname === '/api/admin/calls';
  await page.route(isCalls, (route) => answer(route, 503, 'database unavailable'));
  await page.goto(`${worker.baseUrl}/#/calls`);
  await page.reload();
  await page.locator('#view .card .error').getByText('読み込めませんでした: database unavailable').waitFor();
  await page.unroute(isCalls);
  await page.locator('#view').getByRole('button', { name: '再読み込み' }).click();
  await page.locator('tbody tr').first().waitFor();
  // The recording's link: the failure and its button where the player goes, the rest of the call page kept.
  const isLink = (url) => url.pathname === `/api/admin/calls/${CALL_SID}/recording-link`;
  await page.route(isLink, (route) => answer(route, 503, 'storage unavailable'));
  await page.evaluate((sid) => { location.hash = `#/calls/${sid}`; }, CALL_SID);
  await page.locator('#view .failed .error').getByText('読み込めませんでした: storage unavailable').waitFor();
  assert.equal(await page.locator('#transcript .turn').count(), TURNS.length);
  await page.unroute(isLink);
  await page.locator('#view .failed').getByRole('button', { name: '再読み込み' }).click();
  await page.waitForFunction(() => document.querySelector('audio#recording')?.readyState >= 1);
  assert.equal(await page.locator('#view .failed').count(), 0);
});

test('agents that cannot be read fail the page with its reload button, and are asked for again', async () => {
  const isAgents = (url) => url.pathname === '/api/admin/agents';
  await page.route(isAgents, (route) => answer(route, 503, 'database unavailable'));
  // Drawn anew, so the page holds no agents from before.
  await page.goto(`${worker.baseUrl}/#/calls`);
  await page.reload();
  await page.locator('#view .card .error').getByText('読み込めませんでした: database unavailable').waitFor();
  await page.unroute(isAgents);
  await page.locator('#view').getByRole('button', { name: '再読み込み' }).click();
  await page.locator('tbody tr').first().waitFor();
  assert.match(await page.locator('tbody tr').first().innerText(), /標準受付/, 'the agent by name: the failed read was not kept');
});

test('a read that stalls is asked again, and one that stalls twice fails the page with its reload button', async () => {
  const isAgents = (url) => url.pathname === '/api/admin/agents';
  await page.goto(`${worker.baseUrl}/#/calls`);
  await page.locator('tbody tr').first().waitFor();
  // The first read of the agents never answers (a stalled connection); the second does.
  let asked = 0;
  await page.route(isAgents, (route) => { asked += 1; if (asked > 1) return route.continue(); });
  await page.reload();
  await page.locator('tbody tr').first().waitFor({ timeout: 30_000 });
  assert.equal(asked, 2);
  assert.match(await page.locator('tbody tr').first().innerText(), /標準受付/);
  await page.unroute(isAgents);
  // Neither answers: the failure, and its button asks again.
  asked = 0;
  await page.route(isAgents, () => { asked += 1; });
  await page.reload();
  await page.locator('#view .card .error').getByText('読み込めませんでした: サーバーから応答がありません').waitFor({ timeout: 40_000 });
  assert.equal(asked, 2);
  await page.unroute(isAgents);
  await page.locator('#view').getByRole('button', { name: '再読み込み' }).click();
  await page.locator('tbody tr').first().waitFor();
});

test('a link that cannot be decoded shows the failure and its reload button, not "loading" for ever', async () => {
  await page.goto(`${worker.baseUrl}/#/calls/%E0`);
  await page.locator('#view .card .error').getByText(/^読み込めませんでした: /).waitFor();
  assert.equal(await page.locator('#view').getByRole('button', { name: '再読み込み' }).count(), 1);
  await page.evaluate(() => { location.hash = '#/calls'; });
  await page.locator('tbody tr').first().waitFor();
});

test('the page is served with its security headers, and works under its Content-Security-Policy', async () => {
  for (const path of ['/', '/app.js', '/app.css']) {
    const r = await fetch(`${worker.baseUrl}${path}`);
    assert.equal(r.status, 200, path);
    assert.equal(r.headers.get('content-security-policy'), "default-src 'self'; frame-ancestors 'none'", path);
    assert.equal(r.headers.get('x-content-type-options'), 'nosniff', path);
    assert.equal(r.headers.get('referrer-policy'), 'no-referrer', path);
  }
  assert.equal((await fetch(`${worker.baseUrl}/_headers`)).status, 404, 'the rules themselves are not served');
  await page.goto(`${worker.baseUrl}/#/calls/${CALL_SID}`);
  await page.reload();
  await page.locator('#transcript .turn').first().waitFor();
  await page.waitForFunction(() => document.querySelector('audio#recording')?.readyState >= 1);
  // The timeline's marks and the legend's colours are styled, though inline styles are refused.
  const mark = page.locator('.timeline .mark.barge_in');
  assert.match(await mark.evaluate((el) => el.style.left), /^[\d.]+%$/);
  assert.ok(await mark.evaluate((el) => el.getBoundingClientRect().left > el.parentElement.getBoundingClientRect().left + 10));
  assert.equal(await page.locator('.legend i').first().evaluate((el) => getComputedStyle(el).backgroundColor), 'rgb(121, 167, 240)');
  assert.deepEqual(await page.evaluate(() => window.__csp), []);
});

test('a call transcribed by a model billed by time shows the seconds transcribed', async () => {
  await page.goto(`${worker.baseUrl}/#/calls/${LONG_SID}`);
  await page.locator('.figures').waitFor();
  assert.match(await page.locator('.figures').innerText(), /文字起こし \(入力 \/ 出力\)\s*0 \/ 0 · 241\.4 秒/);
});

test('no errors in the page, and the other call has no recording', async () => {
  await page.goto(`${worker.baseUrl}/#/calls/${OTHER_SID}`);
  await page.getByText('この通話の録音はありません。').waitFor();
  assert.deepEqual(consoleErrors, []);
});

test('signing out lets go of the recording the call page was streaming', async () => {
  await page.goto(`${worker.baseUrl}/#/calls/${CALL_SID}`);
  await page.waitForFunction(() => {
    const a = document.querySelector('audio#recording');
    return a && /\/recording\?expires=/.test(a.src) && a.readyState >= 1;
  });
  await page.evaluate(() => { window.__recording = document.querySelector('audio#recording'); });
  await page.locator('#signout').click();
  await page.locator('form.signin').waitFor();
  assert.equal(await page.evaluate(() => window.__recording.getAttribute('src')), null, 'the stream is let go');
  assert.equal(await page.evaluate(() => window.__recording.paused), true);
  assert.deepEqual(consoleErrors, []);
});
