// Call review: calls, their transcripts and recordings, agents and number assignments, on
// top of the admin API (/api/admin/). Plain JavaScript, no framework. The admin token is
// kept in sessionStorage (gone with the tab) and sent as a bearer token; the recording plays
// from a signed, expiring link to it that the token fetches, streamed with Range requests.
'use strict';

const TOKEN_KEY = 'phone-agent-bridge.admin-token';
const LANG_KEY = 'phone-agent-bridge.lang';
// The GA Realtime voices and turn-detection types (config.rs VOICES, TURN_DETECTION_TYPES).
const VOICES = ['alloy', 'ash', 'ballad', 'coral', 'echo', 'sage', 'shimmer', 'verse', 'marin', 'cedar'];
// Input noise reduction (config.rs NOISE_REDUCTIONS): near_field for a handset at the ear.
const NOISE_REDUCTIONS = ['near_field', 'far_field', 'off'];
const TURN_TYPES = ['server_vad', 'semantic_vad'];
const STATUSES = ['ringing', 'in-progress', 'completed', 'failed', 'busy', 'no-answer', 'canceled'];

const I18N = {
  ja: {
    brand: '通話レビュー', nav_calls: '通話', nav_agents: 'エージェント', nav_numbers: '電話番号',
    sign_out: 'サインアウト', sign_in: 'サインイン', token: '管理トークン (ADMIN_TOKEN)',
    sign_in_help: 'トークンはこのタブを閉じると消去されます。',
    bad_token: 'トークンが正しくありません。', session_expired: 'もう一度サインインしてください。',
    loading: '読み込み中…', failed: '読み込めませんでした', retry: '再読み込み', reload_hint: 'ページを再読み込みしてください。',
    no_answer: 'サーバーから応答がありません',
    calls: '通話', status: '状態', agent: 'エージェント', from: '発信元', to: '着信先',
    started: '開始時刻', duration: '通話時間', barge_ins: '割り込み', any: 'すべて',
    number: '電話番号', date_from: '開始日', date_to: '終了日', filter: '絞り込む', clear: 'クリア',
    next: '次のページ', first: '最初のページ', no_calls: '通話はありません。',
    recording: '録音', no_recording: 'この通話の録音はありません。', load_recording: '録音を読み込み中…',
    transcript: '会話', no_transcript: '会話の記録はありません。', caller: 'お客様', agent_role: 'エージェント',
    interrupted: '割り込みで中断', figures: '通話の数値', first_audio: '最初の応答まで',
    tokens: 'トークン (入力 / 出力 / 合計)', transcription: '文字起こし (入力 / 出力)',
    end_reason: '終了理由', twilio_duration: 'Twilio 通話時間',
    recording_size: '録音サイズ', timeline: 'タイムライン', ev_barge_in: '割り込み', ev_tool_call: 'ツール呼び出し',
    ev_other: 'その他のイベント', back: '← 通話一覧', call_not_found: '通話が見つかりません。',
    agents: 'エージェント', new_agent: '新しいエージェント', edit_agent: 'エージェントの編集', name: '名前',
    default: '標準', voice: '声', model: 'モデル', language: '言語', record_calls: '通話を録音する',
    noise_reduction: 'ノイズ抑制 (near_field: 受話器, far_field: スピーカー, off: なし)',
    recording_on: '録音する', recording_off: '録音しない', instructions: '指示 (instructions)',
    greeting: '最初の挨拶の指示', transcription_model: '文字起こしモデル', turn_detection: 'ターン検出',
    td_type: '種類', td_threshold: 'しきい値 (0–1)', td_silence: '無音判定 (ms)', td_prefix: '前置き (ms)',
    tools: 'ツール (JSON 配列)', transfer_number: '転送先番号 (E.164)', max_call_seconds: '最大通話時間 (秒)',
    tool_secret: 'ツール署名キー (16 文字以上、書き込み専用)', tool_secret_set: '設定済み。空欄なら変更しません。',
    is_default: '標準エージェントにする', save: '保存', saved: '保存しました。', no_changes: '変更はありません。', cancel: '戻る',
    tools_not_json: 'JSON として読めません: ', tools_not_array: 'JSON の配列にしてください。',
    numbers: '電話番号の割り当て', assign: '割り当て', unassign: '解除', assigned: '割り当て日時',
    no_numbers: '割り当てはありません。既定のエージェントが応答します。', confirm_unassign: 'この番号の割り当てを解除しますか？',
    barge_heard: '中断までに聞こえた長さ {ms} ms', details: '詳細', tz_note: '時刻の表示',
    bad_number: '電話番号は +81 で始まる形式 (E.164) か、090-1234-5678 のように入力してください。',
    bad_from: '開始日が正しくありません。', bad_to: '終了日が正しくないか、開始日より前です。',
    bad_status: '状態が正しくありません。', bad_cursor: 'ページの位置が無効です。最初のページから開き直してください。',
    ms: 'ms', sec: '秒', yes: 'はい', no: 'いいえ', created: '作成日時', updated: '更新日時',
    unreadable: '保存されている値を読み込めません',
    unreadable_form: '保存されている「{field}」が読み込めません ({message})。各項目は既定値で表示しています。この項目の値を保存すると直ります。変更しない項目は保存されている値のままです。',
  },
  en: {
    brand: 'Call review', nav_calls: 'Calls', nav_agents: 'Agents', nav_numbers: 'Numbers',
    sign_out: 'Sign out', sign_in: 'Sign in', token: 'Admin token (ADMIN_TOKEN)',
    sign_in_help: 'The token is forgotten when this tab closes.',
    bad_token: 'That token is not valid.', session_expired: 'Please sign in again.',
    loading: 'Loading…', failed: 'Could not load', retry: 'Reload', reload_hint: 'reload the page.',
    no_answer: 'the server did not answer',
    calls: 'Calls', status: 'Status', agent: 'Agent', from: 'From', to: 'To',
    started: 'Started', duration: 'Duration', barge_ins: 'Barge-ins', any: 'Any',
    number: 'Number', date_from: 'From date', date_to: 'To date', filter: 'Filter', clear: 'Clear',
    next: 'Next page', first: 'First page', no_calls: 'No calls.',
    recording: 'Recording', no_recording: 'This call has no recording.', load_recording: 'Loading the recording…',
    transcript: 'Conversation', no_transcript: 'Nothing was transcribed.', caller: 'Caller', agent_role: 'Agent',
    interrupted: 'cut by a barge-in', figures: 'Figures', first_audio: 'Time to first agent audio',
    tokens: 'Tokens (in / out / total)', transcription: 'Transcription tokens (in / out)',
    end_reason: 'End reason', twilio_duration: 'Twilio duration',
    recording_size: 'Recording size', timeline: 'Timeline', ev_barge_in: 'Barge-in', ev_tool_call: 'Tool call',
    ev_other: 'Other event', back: '← Calls', call_not_found: 'No such call.',
    agents: 'Agents', new_agent: 'New agent', edit_agent: 'Edit agent', name: 'Name',
    default: 'Default', voice: 'Voice', model: 'Model', language: 'Language', record_calls: 'Record calls',
    noise_reduction: 'Noise reduction (near_field: handset, far_field: speakerphone, off: none)',
    recording_on: 'Recorded', recording_off: 'Not recorded', instructions: 'Instructions',
    greeting: 'Greeting instructions', transcription_model: 'Transcription model', turn_detection: 'Turn detection',
    td_type: 'Type', td_threshold: 'Threshold (0–1)', td_silence: 'Silence (ms)', td_prefix: 'Prefix padding (ms)',
    tools: 'Tools (JSON array)', transfer_number: 'Transfer number (E.164)', max_call_seconds: 'Max call length (s)',
    tool_secret: 'Tool signing key (16+ characters, write-only)', tool_secret_set: 'Set. Leave empty to keep it.',
    is_default: 'Default agent', save: 'Save', saved: 'Saved.', no_changes: 'Nothing has changed.', cancel: 'Back',
    tools_not_json: 'Not JSON: ', tools_not_array: 'Must be a JSON array.',
    numbers: 'Number assignments', assign: 'Assign', unassign: 'Unassign', assigned: 'Assigned',
    no_numbers: 'No assignments: the default agent answers every number.', confirm_unassign: 'Unassign this number?',
    barge_heard: '{ms} ms heard before the cut', details: 'Details', tz_note: 'Times shown in',
    bad_number: 'Enter the number as +81… (E.164), or like 090-1234-5678.',
    bad_from: 'The from date is not valid.', bad_to: 'The to date is not valid, or is before the from date.',
    bad_status: 'Not a known status.', bad_cursor: 'That page position is no longer valid: open the first page again.',
    ms: 'ms', sec: 's', yes: 'yes', no: 'no', created: 'Created', updated: 'Updated',
    unreadable: 'The stored value cannot be read',
    unreadable_form: 'The stored "{field}" cannot be read ({message}). The form shows the defaults: saving a value for that field repairs it; the fields left as they are keep what is stored.',
  },
};

// Labels of the codes the API returns: call statuses (admin::CALL_STATUSES, Twilio's), end
// reasons (EndReason::LABELS in src/call/mod.rs and the constants in src/webhook.rs) and event
// types (store::EventKind); tests/review_labels.rs fails on a code missing here in either
// language. The raw code stays as the label's tooltip so it can be searched for in logs; a
// code not listed here is shown raw.
const CODES = {
  ja: {
    status: {
      ringing: '呼び出し中', 'in-progress': '通話中', completed: '完了', failed: '失敗', busy: '話し中',
      'no-answer': '応答なし', canceled: 'キャンセル',
    },
    end: {
      twilio_stop: '通話終了 (電話側)', twilio_socket_closed: '電話側の接続が切断', openai_closed: 'AI との接続が切断',
      openai_connect_failed: 'AI に接続できず', openai_session_timeout: 'AI の準備がタイムアウト',
      openai_session_rejected: 'AI がセッション設定を拒否', agent_hangup: 'エージェントが終話', transferred: '転送',
      call_control_failed: '終話・転送の操作に失敗', bridge_restarted: 'ブリッジ再起動で中断',
      fallback_only: 'フォールバックのみで応答', openai_url_invalid: 'AI の接続先 URL が不正 (フォールバックが応答)', not_registered: '通話を登録できず (フォールバックが応答)',
      stream_never_connected: '音声ストリームが接続されず', openai_response_failed: 'AI が応答を生成できず',
    },
    event: {
      barge_in: '割り込み', tool_call: 'ツール呼び出し', dtmf: 'プッシュ操作', hangup: '終話', transfer: '転送',
      transfer_result: '転送の結果', reconnect: 'AI 再接続中', reconnected: 'AI 再接続完了', openai_error: 'AI エラー',
      transcription_failed: '文字起こし失敗', fallback: 'フォールバック', fallback_redirect: 'フォールバックへ切り替え',
      dropped_input: '破棄した入力', max_duration: '最大通話時間に到達', wrap_up: '終了の予告',
      idle_check_in: '無音のため呼びかけ', idle_hangup: '無音のため終話', ending_called_off: '終話を取りやめ',
      response_failed: 'AI の応答が失敗', response_incomplete: 'AI の応答が途中で終了',
    },
    key: {
      arguments: '引数', output: '結果', error: 'エラー', message: 'メッセージ', reason: '理由', why: '理由',
      after_reconnect: '再接続後の結果', code: 'コード', type: '種類', param: 'パラメーター', twilio: 'Twilio の応答',
      ok: '成功', attempt: '試行', attempts: '試行回数', delay_ms: '待ち時間 (ms)', gap_ms: '中断時間 (ms)',
      session_id: 'セッション ID', detail: '詳細', last_failure: '直前の失敗', answered: '応答あり',
      dial_call_status: '転送先の状態', dial_call_duration_s: '転送先の通話時間 (秒)', finish: '操作',
      max_call_seconds: '最大通話時間 (秒)', item_id: 'アイテム ID', call_id: '呼び出し ID',
      response_id: '応答 ID', failed_in_a_row: '連続失敗回数', then: 'その後の対応',
    },
  },
  en: {
    status: {
      ringing: 'Ringing', 'in-progress': 'In progress', completed: 'Completed', failed: 'Failed', busy: 'Busy',
      'no-answer': 'No answer', canceled: 'Canceled',
    },
    end: {
      twilio_stop: 'Ended by the phone side', twilio_socket_closed: 'Phone connection closed',
      openai_closed: 'AI connection closed', openai_connect_failed: 'Could not connect to the AI',
      openai_session_timeout: 'AI session setup timed out', openai_session_rejected: 'AI rejected the session setup',
      agent_hangup: 'Agent hung up', transferred: 'Transferred', call_control_failed: 'Hang-up or transfer failed',
      bridge_restarted: 'Cut by a bridge restart', fallback_only: 'Answered by the fallback only',
      openai_url_invalid: 'AI endpoint URL invalid (the fallback answered)',
      not_registered: 'Not registered (the fallback answered)', stream_never_connected: 'Media stream never connected',
      openai_response_failed: 'AI could not produce responses',
    },
    event: {
      barge_in: 'Barge-in', tool_call: 'Tool call', dtmf: 'Keypad', hangup: 'Hang-up', transfer: 'Transfer',
      transfer_result: 'Transfer result', reconnect: 'Reconnecting to the AI', reconnected: 'Reconnected to the AI',
      openai_error: 'AI error', transcription_failed: 'Transcription failed', fallback: 'Fallback',
      fallback_redirect: 'Switched to the fallback', dropped_input: 'Dropped input', max_duration: 'Max call length reached',
      wrap_up: 'Wrap-up warning', idle_check_in: 'Silence check-in', idle_hangup: 'Hung up after silence',
      ending_called_off: 'Ending called off', response_failed: 'AI response failed',
      response_incomplete: 'AI response cut short',
    },
    key: {
      arguments: 'Arguments', output: 'Output', error: 'Error', message: 'Message', reason: 'Reason', why: 'Reason',
      after_reconnect: 'Result after a reconnect', code: 'Code', type: 'Type', param: 'Parameter', twilio: 'Twilio answer',
      ok: 'Succeeded', attempt: 'Attempt', attempts: 'Attempts', delay_ms: 'Delay (ms)', gap_ms: 'Gap (ms)',
      session_id: 'Session ID', detail: 'Detail', last_failure: 'Last failure', answered: 'Answered',
      dial_call_status: 'Transfer status', dial_call_duration_s: 'Transfer duration (s)', finish: 'Action',
      max_call_seconds: 'Max call length (s)', item_id: 'Item ID', call_id: 'Call ID',
      response_id: 'Response ID', failed_in_a_row: 'Failures in a row', then: 'Then',
    },
  },
};
/** The label of `code` in the table `kind` (status, end, event, key), or the code itself. */
const codeText = (kind, code) => CODES[lang][kind][code] ?? CODES.ja[kind][code] ?? code;
/** An element showing the label of `code`, with the raw code as its tooltip. */
const codeLabel = (kind, code, cls) => h('span', { class: cls, title: code }, codeText(kind, code));

let lang = localStorage.getItem(LANG_KEY) === 'en' ? 'en' : 'ja';
const t = (key) => I18N[lang][key] ?? I18N.ja[key] ?? key;
const token = () => sessionStorage.getItem(TOKEN_KEY);
const $view = () => document.getElementById('view');
let cleanup = []; // run before the next view renders (the recording's stream)
// Each render gets the next number; a render whose number is no longer the latest (the user
// went elsewhere while its requests were out) drops what it fetched instead of showing it.
let renderSeq = 0;
const stale = (seq) => seq !== renderSeq;
let resume = null; // { hash, time, playing } of the recording when the language was switched

// ---- DOM -----------------------------------------------------------------------------------------

/** An element: attributes (on* are listeners) and children (strings become text, never HTML).
 *  `style` is set through the CSSOM: the page's Content-Security-Policy (public/_headers)
 *  refuses inline style attributes. */
function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (k === 'style') el.style.cssText = v;
    else if (k in el && typeof v !== 'string') el[k] = v;
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const kid of kids.flat()) {
    if (kid === undefined || kid === null || kid === false) continue;
    el.append(kid instanceof Node ? kid : String(kid));
  }
  return el;
}

function show(...nodes) {
  $view().replaceChildren(...nodes);
}

/** Says `message` through the page's one live region (#live): status messages only, so a
 *  screen reader is not read the whole page each time a view is drawn. */
function announce(message) {
  const live = document.getElementById('live');
  if (live) live.textContent = message || '';
}

// ---- formatting ----------------------------------------------------------------------------------

const locale = () => (lang === 'ja' ? 'ja-JP' : 'en-GB');
/** The browser's UTC offset on `d` (its time zone, daylight saving included): "UTC+9", "UTC-4:30", "UTC". */
function zoneOf(d = new Date()) {
  const off = -d.getTimezoneOffset();
  if (off === 0) return 'UTC';
  const m = Math.abs(off) % 60;
  return `UTC${off > 0 ? '+' : '-'}${Math.floor(Math.abs(off) / 60)}${m ? `:${String(m).padStart(2, '0')}` : ''}`;
}
/** The browser's time zone, named: "Asia/Tokyo (UTC+9)". */
function zoneName() {
  const name = Intl.DateTimeFormat().resolvedOptions().timeZone;
  return name ? `${name} (${zoneOf()})` : zoneOf();
}
/** A time in the browser's zone, the zone said: "2026/11/20 10:30:00 UTC+9". */
function fmtTime(iso) {
  if (!iso) return '—';
  const d = new Date(iso);
  if (isNaN(d)) return iso;
  return `${d.toLocaleString(locale(), { dateStyle: 'medium', timeStyle: 'medium' })} ${zoneOf(d)}`;
}
function fmtDuration(ms) {
  if (ms === null || ms === undefined) return '—';
  const s = Math.round(ms / 1000);
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, '0')}`;
}
function fmtOffset(ms) {
  const tenths = Math.floor((ms || 0) / 100);
  const s = Math.floor(tenths / 10);
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, '0')}.${tenths % 10}`;
}
function fmtBytes(n) {
  if (n === null || n === undefined) return '—';
  if (n < 1024) return `${n} B`;
  return n >= 1048576 ? `${(n / 1048576).toFixed(1)} MiB` : `${Math.round(n / 1024)} KiB`;
}
const dash = (v) => (v === null || v === undefined || v === '' ? '—' : v);

// ---- API -----------------------------------------------------------------------------------------

class Unauthorized extends Error {}

/** A read with no whole answer after this long (a stalled connection) is given up and asked
 *  again, once: reading twice is harmless. A second stall fails the view with its reload
 *  button rather than leave it "loading" for ever. Writes wait as long as they take. */
const STALLED_READ_MS = 10000;

async function api(path, { method = 'GET', body } = {}) {
  const headers = { Authorization: `Bearer ${token()}` };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const read = method === 'GET';
  for (let attempt = 1; ; attempt++) {
    const stall = new AbortController();
    const timer = read ? setTimeout(() => stall.abort(), STALLED_READ_MS) : undefined;
    try {
      const res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), signal: stall.signal });
      if (res.status === 401) {
        signOut(t('session_expired'));
        throw new Unauthorized();
      }
      const text = await res.text();
      let data = null;
      try { data = text ? JSON.parse(text) : null; } catch { data = { message: text }; }
      return { status: res.status, ok: res.ok, data };
    } catch (e) {
      if (!stall.signal.aborted || e instanceof Unauthorized) throw e;
      if (attempt >= 2) throw new Error(t('no_answer'));
    } finally {
      clearTimeout(timer);
    }
  }
}

let agentNames = null;
/** The agents by id, kept once read (`refresh` reads them again). A failed read throws (the
 *  view shows failure() and its reload button) and keeps nothing, so the next view asks again. */
async function agentsById(refresh = false) {
  if (!agentNames || refresh) {
    const r = await api('/api/admin/agents');
    if (!r.ok) throw new Error(r.data?.message || r.status);
    agentNames = new Map((r.data?.agents || []).map((a) => [a.id, a]));
  }
  return agentNames;
}

/** Shows `err` and a reload button that runs `again`: as the view, or in `where` (the part
 *  of the view that failed, the rest staying). */
function failure(err, again, seq, where) {
  if (err instanceof Unauthorized || stale(seq)) return;
  const message = `${t('failed')}: ${err.message || err}`;
  announce(message);
  const box = h('div', { class: where ? 'failed' : 'card' },
    h('p', { class: 'error' }, message),
    h('button', { type: 'button', onclick: again }, t('retry')));
  if (where) where.replaceChildren(box);
  else show(box);
}

// ---- session -------------------------------------------------------------------------------------

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  agentNames = null;
  renderSignIn(message);
}

function renderSignIn(message) {
  renderSeq++; // whatever was loading is not shown over the sign-in form
  leaveView(); // signing out (or the session expiring) lets go of the recording too
  chrome(false);
  const input = h('input', { type: 'password', id: 'token', name: 'token', autocomplete: 'current-password', required: true });
  const msg = h('p', { class: 'error', role: 'alert' }, message || '');
  const form = h('form', {
    class: 'card signin',
    onsubmit: async (e) => {
      e.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, input.value.trim());
      const r = await fetch('/api/admin/agents', { headers: { Authorization: `Bearer ${token()}` } }).catch(() => null);
      if (!r || r.status === 401) {
        sessionStorage.removeItem(TOKEN_KEY);
        msg.textContent = r ? t('bad_token') : t('failed');
        return;
      }
      if (!location.hash || location.hash === '#/') location.hash = '#/calls';
      route();
    },
  },
  h('h1', {}, t('sign_in')),
  h('label', { for: 'token' }, t('token')), input,
  h('p', { class: 'muted' }, t('sign_in_help')), msg,
  h('button', { class: 'primary', type: 'submit' }, t('sign_in')));
  show(form);
  input.focus();
}

/** Header state: nav and sign-out only when signed in; labels in the current language. */
function chrome(signedIn, section) {
  document.documentElement.lang = lang;
  document.title = t('brand');
  document.getElementById('nav').hidden = !signedIn;
  document.getElementById('signout').hidden = !signedIn;
  for (const el of document.querySelectorAll('[data-i18n]')) el.textContent = t(el.dataset.i18n);
  for (const a of document.querySelectorAll('[data-nav]')) a.classList.toggle('on', a.dataset.nav === section);
  const toggle = document.getElementById('lang');
  toggle.textContent = lang === 'ja' ? 'English' : '日本語';
  toggle.lang = lang === 'ja' ? 'en' : 'ja';
}

// ---- router --------------------------------------------------------------------------------------

/** Runs what the view on screen set up to undo when it goes (the recording's stream). */
function leaveView() {
  for (const f of cleanup.splice(0)) f();
}

function route() {
  leaveView();
  if (!token()) return renderSignIn();
  const seq = ++renderSeq;
  const again = () => route();
  // A link that cannot be read (`#/calls/%E0` throws in decodeURIComponent) fails here, before
  // any view's promise: shown as a failure like the view's own, not left on "loading".
  let view;
  try {
    view = draw(seq);
  } catch (e) {
    view = Promise.reject(e);
  }
  view.catch((e) => failure(e, again, seq));
}

/** Draws the view the hash names; returns its promise. Throws on a hash it cannot decode. */
function draw(seq) {
  const [path, query] = location.hash.replace(/^#/, '').split('?');
  const params = new URLSearchParams(query || '');
  const section = path.split('/').filter(Boolean)[0] || 'calls';
  chrome(true, section);
  show(h('p', { class: 'muted' }, t('loading')));
  announce(t('loading'));
  const parts = path.split('/').filter(Boolean).map(decodeURIComponent);
  if (section === 'calls' && parts[1]) return renderCall(seq, parts[1]);
  if (section === 'agents' && parts[1]) return renderAgentForm(seq, parts[1] === 'new' ? null : parts[1]);
  if (section === 'agents') return renderAgents(seq);
  if (section === 'numbers') return renderNumbers(seq);
  return renderCalls(seq, params);
}

// ---- calls ---------------------------------------------------------------------------------------

/** What is typed between a number's digits: spaces, parentheses, and hyphens and dashes of
 *  every kind, the long-vowel mark a Japanese IME often gives for "-" (ー, ｰ) included
 *  (‐‑‒–—―, −, ⁃, －, ﹣, ﹘; NFKC already turns some of them into others). */
const NUMBER_SEPARATORS = /[\s()\-\u2010-\u2015\u2043\u2212\u30FC\uFE58\uFE63\uFF0D\uFF70]/g;

/** A phone number as typed by Japanese staff (090-1111-2222, 090ー1111ー2222, 03 1234 5678,
 *  full-width digits) in E.164: a 0-prefixed national number becomes +81 without the 0; an
 *  international one loses its spaces and dashes; anything else is left for the API to judge. */
function normaliseNumber(value) {
  const typed = value.normalize('NFKC').trim();
  const compact = typed.replace(NUMBER_SEPARATORS, '');
  if (/^0\d{9,10}$/.test(compact)) return `+81${compact.slice(1)}`;
  if (/^\+\d+$/.test(compact)) return compact;
  return typed;
}

/** A day picked in the browser is the viewer's own day: its start (or, with `endOfDay`, its
 *  last millisecond) as an ISO time with the browser's UTC offset on that day. */
function localDayBound(day, endOfDay) {
  const d = new Date(`${day}T00:00:00`);
  if (isNaN(d)) return day;
  if (endOfDay) d.setHours(23, 59, 59, 999);
  const pad = (n, w = 2) => String(n).padStart(w, '0');
  const off = -d.getTimezoneOffset();
  const tz = `${off >= 0 ? '+' : '-'}${pad(Math.floor(Math.abs(off) / 60))}:${pad(Math.abs(off) % 60)}`;
  return `${day}T${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}${tz}`;
}

async function renderCalls(seq, params) {
  const q = new URLSearchParams();
  for (const k of ['status', 'number', 'cursor']) if (params.get(k)) q.set(k, params.get(k));
  if (params.get('from')) q.set('from', localDayBound(params.get('from'), false));
  if (params.get('to')) q.set('to', localDayBound(params.get('to'), true));
  q.set('limit', '25');
  const [r, agents] = await Promise.all([api(`/api/admin/calls?${q}`), agentsById()]);
  if (stale(seq)) return;
  // A date is a day in the browser's zone (localDayBound): the zone is said next to it. A
  // filter the API refused has its message (in the page's language) under it.
  const errFor = {};
  const field = (name, el) => h('div', {},
    h('label', { for: `f-${name}` }, name === 'from' || name === 'to' ? `${t(`date_${name}`)} (${zoneOf()})` : t(name)), el,
    errFor[name] = h('p', { class: 'err', 'data-error-for': name }));
  const status = h('select', { id: 'f-status', name: 'status' }, h('option', { value: '' }, t('any')),
    STATUSES.map((s) => h('option', { value: s, title: s, selected: params.get('status') === s }, codeText('status', s))));
  const number = h('input', { id: 'f-number', name: 'number', type: 'text', placeholder: '090-1234-5678', value: params.get('number') || '' });
  const from = h('input', { id: 'f-from', name: 'from', type: 'date', value: params.get('from') || '' });
  const to = h('input', { id: 'f-to', name: 'to', type: 'date', value: params.get('to') || '' });
  const filters = h('form', {
    class: 'card filters',
    onsubmit: (e) => {
      e.preventDefault();
      const next = new URLSearchParams();
      for (const el of [status, number, from, to]) if (el.value.trim()) next.set(el.name, el.value.trim());
      if (next.get('number')) next.set('number', normaliseNumber(next.get('number')));
      location.hash = `#/calls?${next}`;
    },
  }, field('status', status), field('number', number), field('from', from), field('to', to),
  h('div', {}, h('button', { class: 'primary', type: 'submit' }, t('filter'))),
  h('div', {}, h('button', { type: 'button', onclick: () => { location.hash = '#/calls'; } }, t('clear'))),
  h('p', { class: 'muted tz' }, `${t('tz_note')}: ${zoneName()}`));
  // A refusal naming no filter (a 5xx) is the view's failure, with its reload button.
  if (!r.ok && !r.data?.field) throw new Error(r.data?.message || r.status);
  if (!r.ok) {
    const f = r.data?.field;
    const general = h('p', { class: 'error' });
    const box = errFor[f] || general;
    // The API's own (English) message stays as the tooltip, for support.
    box.textContent = I18N.ja[`bad_${f}`] ? t(`bad_${f}`) : r.data?.message || String(r.status);
    if (r.data?.message) box.title = r.data.message;
    show(h('h1', {}, t('calls')), filters, general);
    announce(box.textContent);
    return;
  }
  const rows = r.data.calls.map((c) => h('tr', {
    class: 'link',
    onclick: () => { location.hash = `#/calls/${encodeURIComponent(c.call_sid)}`; },
  },
  h('td', {}, h('a', { href: `#/calls/${encodeURIComponent(c.call_sid)}` }, fmtTime(c.started_at))),
  h('td', {}, codeLabel('status', c.status, `badge ${c.status}`)),
  h('td', {}, agents.get(c.agent_id)?.name || dash(c.agent_id)),
  h('td', {}, dash(c.from_number)), h('td', {}, dash(c.to_number)),
  // A call never streamed (the fallback answered, say) has no stream duration: Twilio's.
  h('td', { class: 'num' }, fmtDuration(c.duration_ms ?? (typeof c.twilio_duration_s === 'number' ? c.twilio_duration_s * 1000 : null))),
  h('td', { class: 'num' }, c.barge_ins ?? 0),
  h('td', {}, c.recording_key ? '🎧' : '')));
  const table = rows.length
    ? h('table', {}, h('thead', {}, h('tr', {}, h('th', {}, `${t('started')} (${zoneOf()})`), h('th', {}, t('status')), h('th', {}, t('agent')),
      h('th', {}, t('from')), h('th', {}, t('to')), h('th', { class: 'num' }, t('duration')),
      h('th', { class: 'num' }, t('barge_ins')), h('th', {}, h('span', { title: t('recording') }, '')))), h('tbody', {}, rows))
    : h('p', { class: 'muted' }, t('no_calls'));
  const base = new URLSearchParams(params);
  base.delete('cursor');
  const pager = h('div', { class: 'pager' },
    params.get('cursor') && h('button', { onclick: () => { location.hash = `#/calls?${base}`; } }, t('first')),
    r.data.next_cursor && h('button', {
      onclick: () => { const n = new URLSearchParams(base); n.set('cursor', r.data.next_cursor); location.hash = `#/calls?${n}`; },
    }, t('next')));
  show(h('h1', {}, t('calls')), filters, table, pager);
}

/** Milliseconds from the stream start (connected_at) of an event's ISO time. */
function eventOffset(call, ev) {
  const base = Date.parse(call.connected_at || call.started_at);
  const at = Date.parse(ev.at);
  return isNaN(base) || isNaN(at) ? null : Math.max(0, at - base);
}

/** An event's one-line label: its type's label, and what matters most of its detail. */
function eventLabel(ev) {
  const d = ev.detail || {};
  const name = codeText('event', ev.type);
  if (ev.type === 'barge_in') return `${name} (${t('barge_heard').replace('{ms}', d.audio_end_ms ?? '?')})`;
  if (ev.type === 'tool_call') return `${name}: ${d.name ?? '?'} ${d.ok === false ? '✗' : '✓'} (${d.duration_ms ?? '?'} ${t('ms')})`;
  if (ev.type === 'dtmf') return `${name}: ${d.digit ?? '?'}`;
  if (ev.type === 'response_failed') return `${name}: ${d.code ?? d.type ?? '?'}`;
  if (ev.type === 'response_incomplete') return `${name}: ${d.reason ?? '?'}`;
  return name;
}

/** Detail keys the one-line label already shows (or that say nothing to a reviewer). */
const SHOWN_KEYS = { barge_in: ['audio_end_ms'], tool_call: ['name', 'ok', 'duration_ms'], dtmf: ['digit'] };

/** A value of an event's detail as text: JSON (a tool's arguments and output) pretty-printed. */
function detailText(v) {
  if (typeof v === 'string') {
    try {
      const parsed = JSON.parse(v);
      if (parsed && typeof parsed === 'object') return JSON.stringify(parsed, null, 2);
    } catch { /* plain text */ }
    return v;
  }
  if (typeof v === 'boolean') return v ? t('yes') : t('no');
  return typeof v === 'object' ? JSON.stringify(v, null, 2) : String(v);
}

/** The rest of an event's detail (a tool call's arguments, output and error, a hang-up's
 *  reason, an error's message), folded in a <details>; text nodes only. */
function eventDetails(ev) {
  const d = ev.detail && typeof ev.detail === 'object' ? ev.detail : {};
  const skip = SHOWN_KEYS[ev.type] || [];
  const rows = [];
  for (const [k, v] of Object.entries(d)) {
    if (skip.includes(k) || v === null || v === undefined || v === '') continue;
    rows.push(h('dt', { title: k }, codeText('key', k)), h('dd', {}, h('pre', {}, detailText(v))));
    // A tool's failure is in its output's `error`: named on its own.
    if (ev.type === 'tool_call' && k === 'output') {
      try {
        const err = JSON.parse(v)?.error;
        if (err) rows.push(h('dt', { title: 'error' }, codeText('key', 'error')), h('dd', { class: 'error' }, h('pre', {}, detailText(err))));
      } catch { /* not JSON */ }
    }
  }
  if (!rows.length) return null;
  return h('details', {}, h('summary', {}, t('details')), h('dl', { class: 'ev-detail' }, rows));
}

async function renderCall(seq, sid) {
  const [r, agents] = await Promise.all([api(`/api/admin/calls/${encodeURIComponent(sid)}`), agentsById()]);
  if (stale(seq)) return;
  const back = h('p', {}, h('a', { href: '#/calls' }, t('back')));
  if (r.status === 404) return show(back, h('p', { class: 'error' }, t('call_not_found')));
  if (!r.ok) throw new Error(r.data?.message || r.status);
  const { call, events } = r.data;
  // A turn cut before the caller heard any of it is kept empty (and interrupted): not a turn
  // to show; its barge-in still is.
  const transcript = r.data.transcript.filter((e) => e.text);
  const audio = h('audio', { controls: true, preload: 'auto', id: 'recording' });
  const audioBox = h('div', {}, h('p', { class: 'muted', id: 'recording-status' }, call.recording_key ? t('load_recording') : t('no_recording')));
  const total = call.recording_duration_ms || call.duration_ms || 0;

  // The timeline: transcript turns, barge-ins and tool calls, and a playhead.
  const timeline = h('div', { class: 'timeline', title: t('timeline') });
  const head = h('div', { class: 'head', style: 'left:0' });
  const pos = (ms) => `${total ? Math.min(100, (100 * ms) / total) : 0}%`;
  const seek = (ms) => {
    if (!audio.src) return;
    audio.currentTime = ms / 1000;
    audio.play().catch(() => {});
  };
  const items = [];
  for (const e of transcript) {
    items.push({ at: e.offset_ms, kind: e.role, entry: e });
    timeline.append(h('span', { class: `mark ${e.role}`, style: `left:${pos(e.offset_ms)}`, title: `${fmtOffset(e.offset_ms)} ${e.text}` }));
  }
  for (const ev of events) {
    const at = eventOffset(call, ev);
    if (at === null || ev.type === 'dropped_input') continue;
    const kind = ev.type === 'barge_in' || ev.type === 'tool_call' ? ev.type : 'other';
    items.push({ at, kind: 'event', ev, cls: kind });
    timeline.append(h('span', { class: `mark ${kind}`, style: `left:${pos(at)}`, title: `${fmtOffset(at)} ${eventLabel(ev)} [${ev.type}]` }));
  }
  timeline.append(head);
  timeline.addEventListener('click', (e) => {
    const rect = timeline.getBoundingClientRect();
    seek(((e.clientX - rect.left) / rect.width) * total);
  });
  // At the same moment an event (a barge-in) comes before the turn it opened.
  items.sort((a, b) => a.at - b.at || (b.kind === 'event') - (a.kind === 'event'));

  const turns = [];
  const convo = h('div', { class: 'convo', id: 'transcript' }, items.map((it) => {
    if (it.kind === 'event') {
      // Clicking the line seeks; opening its details does not.
      return h('div', { class: `sys ${it.cls} ${it.ev.type}` },
        h('span', { class: 'at', title: it.ev.type, onclick: () => seek(it.at) }, `${fmtOffset(it.at)} · ${eventLabel(it.ev)}`),
        eventDetails(it.ev));
    }
    const e = it.entry;
    const el = h('div', {
      class: `turn ${e.role}`, 'data-offset-ms': e.offset_ms, tabindex: 0, role: 'button',
      onclick: () => seek(e.offset_ms),
      onkeydown: (k) => {
        if (k.key !== 'Enter' && k.key !== ' ') return;
        k.preventDefault(); // Space would scroll the page
        seek(e.offset_ms);
      },
    },
    h('div', { class: 'meta' }, h('span', {}, fmtOffset(e.offset_ms)), h('span', {}, e.role === 'caller' ? t('caller') : t('agent_role')),
      e.interrupted && h('span', { class: 'cut' }, t('interrupted'))),
    h('div', { class: 'text' }, e.text));
    turns.push({ at: e.offset_ms, el });
    return el;
  }));
  // While it plays, the current turn is scrolled into view, unless the user scrolled in the
  // last few seconds (wheel, touch or scrolling keys): then the page stays where they put it.
  let userScrolledAt = 0;
  const scrolled = () => { userScrolledAt = Date.now(); };
  const scrollKey = (k) => {
    if (['PageUp', 'PageDown', 'Home', 'End', 'ArrowUp', 'ArrowDown', ' '].includes(k.key) && !k.target.closest?.('.turn, audio, input, select, textarea')) scrolled();
  };
  window.addEventListener('wheel', scrolled, { passive: true });
  window.addEventListener('touchmove', scrolled, { passive: true });
  window.addEventListener('keydown', scrollKey);
  cleanup.push(() => {
    window.removeEventListener('wheel', scrolled);
    window.removeEventListener('touchmove', scrolled);
    window.removeEventListener('keydown', scrollKey);
  });
  let shown = null; // the turn last scrolled to; a seek or a new start scrolls to it again
  const rescroll = () => { shown = null; };
  audio.addEventListener('seeked', rescroll);
  audio.addEventListener('play', rescroll);
  audio.addEventListener('timeupdate', () => {
    const ms = audio.currentTime * 1000;
    head.style.left = pos(ms);
    let current = null;
    for (const turn of turns) if (turn.at <= ms) current = turn;
    for (const turn of turns) turn.el.classList.toggle('now', turn === current);
    if (current && current !== shown && !audio.paused && Date.now() - userScrolledAt > 4000) {
      shown = current;
      const smooth = !matchMedia('(prefers-reduced-motion: reduce)').matches;
      current.el.scrollIntoView({ block: 'nearest', behavior: smooth ? 'smooth' : 'auto' });
    }
  });

  const fig = (label, value) => h('div', {}, h('dt', {}, label), h('dd', {}, value));
  const agent = agents.get(call.agent_id);
  show(
    back,
    h('h1', {}, `${dash(call.from_number)} → ${dash(call.to_number)}`),
    h('p', { class: 'muted' }, codeLabel('status', call.status, `badge ${call.status}`), ' ', fmtTime(call.started_at), ' · ',
      agent ? h('a', { href: `#/agents/${encodeURIComponent(agent.id)}` }, agent.name || agent.id) : dash(call.agent_id), ' · ', call.call_sid),
    h('section', { class: 'card' }, h('h2', {}, t('recording')), audioBox, timeline,
      h('div', { class: 'legend' },
        h('span', {}, h('i', { style: 'background:#79a7f0' }), t('caller')),
        h('span', {}, h('i', { style: 'background:#6fbf73' }), t('agent_role')),
        h('span', {}, h('i', { style: 'background:var(--barge)' }), t('ev_barge_in')),
        h('span', {}, h('i', { style: 'background:var(--tool)' }), t('ev_tool_call')),
        h('span', {}, h('i', { style: 'background:#8c959f' }), t('ev_other')))),
    h('section', { class: 'card' }, h('h2', {}, t('figures')), h('dl', { class: 'figures' },
      fig(t('duration'), fmtDuration(call.duration_ms)),
      fig(t('first_audio'), call.first_audio_ms === null || call.first_audio_ms === undefined ? '—' : `${call.first_audio_ms} ${t('ms')}`),
      fig(t('tokens'), `${call.input_tokens ?? 0} / ${call.output_tokens ?? 0} / ${call.total_tokens ?? 0}`),
      fig(t('transcription'), fmtTranscription(call)),
      fig(t('end_reason'), call.end_reason ? [codeLabel('end', call.end_reason), call.end_detail && ` (${call.end_detail})`] : dash(call.end_detail)),
      fig(t('barge_ins'), call.barge_ins ?? 0),
      fig(t('twilio_duration'), call.twilio_duration_s === null || call.twilio_duration_s === undefined ? '—' : `${call.twilio_duration_s} ${t('sec')}`),
      fig(t('recording_size'), fmtBytes(call.recording_bytes)))),
    h('section', { class: 'card' }, h('h2', {}, t('transcript')),
      transcript.length ? convo : h('p', { class: 'muted' }, t('no_transcript'))),
  );

  if (call.recording_key) await playRecording(seq, sid, audio, audioBox);
}

/** What transcribing the caller cost, billed apart from the session's tokens: tokens, and the
 *  audio's length for a model billed by time (whisper-1). */
function fmtTranscription(call) {
  const tokens = `${call.transcription_input_tokens ?? 0} / ${call.transcription_output_tokens ?? 0}`;
  const ms = call.transcription_audio_ms ?? 0;
  return ms > 0 ? `${tokens} · ${(ms / 1000).toFixed(1)} ${t('sec')}` : tokens;
}

// A recording's link is renewed at most this many times in a row, a renewal counting as in a
// row when the player fails again within RENEW_WINDOW_MS of the last one.
const RENEW_TRIES = 3;
const RENEW_WINDOW_MS = 60_000;

/** Plays the call's recording in `audio`. <audio src> cannot send the bearer token: the page
 *  asks for a signed link to this recording (`{url, expires_at}`), which the browser then
 *  streams with Range requests (no download of the whole WAV). The link expires (6 hours):
 *  on a page left open longer the next Range request is refused (401 link_expired), which
 *  the element reports only as an error. So when a link that had loaded (or is past its
 *  `expires_at`) fails, the page asks for a new one and carries on from the same position,
 *  playing or paused as it was, at most RENEW_TRIES times in a row. A link that never
 *  loaded, a recording gone from storage, or anything else a new link does not cure ends
 *  in the error message; a refused admin token signs out (api()). */
async function playRecording(seq, sid, audio, audioBox) {
  const path = `/api/admin/calls/${encodeURIComponent(sid)}/recording-link`;
  const link = await api(path);
  if (stale(seq)) return; // navigated away (or switched language) meanwhile
  const status = document.getElementById('recording-status');
  if (!status) return;
  let failed = false; // the error message is shown: no more renewals
  const fail = (message) => {
    failed = true;
    audioBox.replaceChildren(audio, h('p', { class: 'error', id: 'recording-status' }, message));
  };
  /** A link refused: none to be had (404) is said; anything else (a 5xx) is shown with a
   *  reload button, which draws the page again and carries on from `at` ({time, playing}). */
  const refused = (r, at) => {
    if (r.status === 404) {
      if (at) fail(t('no_recording'));
      else status.textContent = t('no_recording');
      return;
    }
    failed = true;
    failure(new Error(r.data?.message || r.status), () => {
      resume = at ? { hash: location.hash, ...at } : null;
      route();
    }, seq, audioBox);
  };
  if (!link.ok) return refused(link);
  let expiresAt = Infinity; // of the link in use, in ms
  let loaded = false; // whether the link in use got as far as the recording's metadata
  let wantPlay = false; // playing, or asked to play (the element pauses on an error)
  let renewing = false;
  let renewals = 0;
  let renewedAt = -Infinity;
  /** Plays from `data` (a recording-link answer): at `time` seconds, playing if `playing`. */
  const use = (data, time, playing) => {
    loaded = false;
    expiresAt = Date.parse(data.expires_at) || Infinity;
    audio.src = data.url;
    if (time || playing) {
      audio.addEventListener('loadedmetadata', () => {
        if (time) audio.currentTime = time;
        if (playing) audio.play().catch(() => {});
      }, { once: true });
    }
  };
  audio.addEventListener('loadedmetadata', () => { loaded = true; });
  audio.addEventListener('play', () => { wantPlay = true; });
  audio.addEventListener('pause', () => { wantPlay = false; });
  audio.addEventListener('error', async () => {
    if (stale(seq) || renewing || failed || !audio.getAttribute('src')) return;
    if (Date.now() - renewedAt > RENEW_WINDOW_MS) renewals = 0;
    if (!(loaded || Date.now() >= expiresAt) || renewals >= RENEW_TRIES) {
      fail(`${t('failed')}: ${t('reload_hint')}`);
      return;
    }
    renewals++;
    renewedAt = Date.now();
    const time = audio.currentTime;
    const playing = wantPlay;
    renewing = true;
    let r;
    try {
      r = await api(path);
    } catch (e) {
      if (e instanceof Unauthorized) return; // api() showed the sign-in form
      r = null; // offline
    } finally {
      renewing = false;
    }
    if (stale(seq)) return;
    if (!r) fail(`${t('failed')}: ${t('reload_hint')}`);
    else if (!r.ok) refused(r, { time, playing });
    else use(r.data, time, playing);
  });
  // The language switch redraws the page: the recording carries on where it was.
  const carryOn = resume && resume.hash === location.hash ? resume : null;
  resume = null;
  use(link.data, carryOn?.time, carryOn?.playing);
  // Leaving the page stops the stream.
  cleanup.push(() => { audio.pause(); audio.removeAttribute('src'); audio.load(); });
  audioBox.replaceChildren(audio);
}

// ---- agents --------------------------------------------------------------------------------------

async function renderAgents(seq) {
  const agents = [...(await agentsById(true)).values()];
  if (stale(seq)) return;
  // A stored row the API cannot read comes as {id, name, is_default, unreadable: {field,
  // message}}: it says so, naming the field, in place of the settings it does not have.
  const rows = agents.map((a) => h('tr', { class: 'link', onclick: () => { location.hash = `#/agents/${encodeURIComponent(a.id)}`; } },
    h('td', {}, h('a', { href: `#/agents/${encodeURIComponent(a.id)}` }, a.name || a.id), a.is_default && ' ', a.is_default && h('span', { class: 'badge' }, t('default'))),
    h('td', {}, a.id),
    a.unreadable
      ? h('td', { colspan: 5, class: 'error unreadable' }, `${t('unreadable')}: ${a.unreadable.field} (${a.unreadable.message})`)
      : [h('td', {}, a.voice), h('td', {}, a.model), h('td', {}, a.language),
        h('td', {}, a.record_calls ? t('recording_on') : t('recording_off')), h('td', {}, fmtTime(a.updated_at))]));
  show(h('h1', {}, t('agents')),
    h('p', {}, h('button', { class: 'primary', onclick: () => { location.hash = '#/agents/new'; } }, t('new_agent'))),
    h('table', {}, h('thead', {}, h('tr', {}, [t('name'), 'ID', t('voice'), t('model'), t('language'), t('recording'), t('updated')].map((x) => h('th', {}, x)))),
      h('tbody', {}, rows)));
}

/** One labelled input whose API field name (`field`) is where a 400's message is shown. */
function field(name, label, input, { wide = false, help } = {}) {
  input.id = input.id || `a-${name.replace(/\W/g, '-')}`;
  input.dataset.field = name;
  return h('div', { class: `field${wide ? ' wide' : ''}`, 'data-field-box': name },
    input.type === 'checkbox' ? h('label', { class: 'check' }, input, label) : [h('label', { for: input.id }, label), input],
    help && h('p', { class: 'muted' }, help),
    h('p', { class: 'err', 'data-error-for': name, role: 'alert' }));
}

// Set when a save repaired an unreadable agent, which is then drawn anew from what is stored.
let repairedAgent = false;

async function renderAgentForm(seq, id) {
  let unreadable = null;
  let a = {
    name: '', instructions: '', greeting: '', voice: 'marin', model: 'gpt-realtime', language: 'ja',
    transcription_model: 'gpt-4o-transcribe',
    turn_detection: { type: 'server_vad', threshold: 0.5, silence_duration_ms: 500, prefix_padding_ms: 300 },
    tools: [], transfer_number: null, max_call_seconds: 1800, is_default: false, record_calls: true, tool_secret_set: false,
    noise_reduction: 'near_field',
  };
  if (id) {
    const r = await api(`/api/admin/agents/${encodeURIComponent(id)}`);
    if (stale(seq)) return;
    if (!r.ok) throw new Error(r.data?.message || r.status);
    // A row the API cannot read comes as {id, name, is_default, unreadable: {field, message}}:
    // the form opens on the defaults, the field at fault named, so that saving a value for
    // it repairs the row (the fields left as they are keep what is stored).
    a = { ...a, ...r.data.agent };
    unreadable = r.data.agent.unreadable || null;
  }
  const text = (v) => h('input', { type: 'text', value: v ?? '' });
  const num = (v, step) => h('input', { type: 'number', value: v ?? '', step: step || '1' });
  // A stored value not among the options (a voice newer than this page's list, or one
  // written by hand) is kept as one, so that saving other fields does not change it.
  const select = (options, v) => h('select', {},
    (v && !options.includes(v) ? [...options, v] : options).map((o) => h('option', { value: o, selected: o === v }, o)));
  const inputs = {
    name: text(a.name),
    voice: select(VOICES, a.voice),
    noise_reduction: select(NOISE_REDUCTIONS, a.noise_reduction),
    model: text(a.model),
    language: text(a.language),
    transcription_model: text(a.transcription_model),
    instructions: h('textarea', { rows: 6 }, a.instructions),
    greeting: h('textarea', { rows: 3 }, a.greeting),
    'turn_detection.type': select(TURN_TYPES, a.turn_detection.type),
    'turn_detection.threshold': num(a.turn_detection.threshold, '0.05'),
    'turn_detection.silence_duration_ms': num(a.turn_detection.silence_duration_ms),
    'turn_detection.prefix_padding_ms': num(a.turn_detection.prefix_padding_ms),
    tools: h('textarea', { rows: 8, spellcheck: 'false' }, JSON.stringify(a.tools, null, 2)),
    transfer_number: text(a.transfer_number),
    max_call_seconds: num(a.max_call_seconds),
    tool_secret: h('input', { type: 'password', value: '', autocomplete: 'new-password' }),
    record_calls: h('input', { type: 'checkbox', checked: a.record_calls !== false }),
    is_default: h('input', { type: 'checkbox', checked: !!a.is_default }),
  };
  if (id) inputs.id = h('input', { type: 'text', value: a.id, disabled: true });
  const general = h('p', { class: 'error', role: 'alert' });
  const done = h('span', { class: 'muted', role: 'status' }, repairedAgent && t('saved'));
  repairedAgent = false;
  const form = h('form', { class: 'card', novalidate: true, onsubmit: (e) => { e.preventDefault(); save(); } },
    h('div', { class: 'grid2' },
      field('name', t('name'), inputs.name),
      id ? field('id', 'ID', inputs.id) : h('div'),
      field('voice', t('voice'), inputs.voice),
      field('model', t('model'), inputs.model),
      field('language', t('language'), inputs.language),
      field('transcription_model', t('transcription_model'), inputs.transcription_model),
      field('noise_reduction', t('noise_reduction'), inputs.noise_reduction),
      h('div'),
      field('instructions', t('instructions'), inputs.instructions, { wide: true }),
      field('greeting', t('greeting'), inputs.greeting, { wide: true }),
      h('h2', { class: 'wide' }, t('turn_detection')),
      field('turn_detection.type', t('td_type'), inputs['turn_detection.type']),
      field('turn_detection.threshold', t('td_threshold'), inputs['turn_detection.threshold']),
      field('turn_detection.silence_duration_ms', t('td_silence'), inputs['turn_detection.silence_duration_ms']),
      field('turn_detection.prefix_padding_ms', t('td_prefix'), inputs['turn_detection.prefix_padding_ms']),
      field('tools', t('tools'), inputs.tools, { wide: true }),
      field('transfer_number', t('transfer_number'), inputs.transfer_number),
      field('max_call_seconds', t('max_call_seconds'), inputs.max_call_seconds),
      field('tool_secret', t('tool_secret'), inputs.tool_secret, { help: a.tool_secret_set ? t('tool_secret_set') : null }),
      h('div'),
      field('record_calls', t('record_calls'), inputs.record_calls),
      field('is_default', t('is_default'), inputs.is_default)),
    general,
    h('div', { class: 'actions' }, h('button', { class: 'primary', type: 'submit' }, t('save')),
      h('a', { href: '#/agents' }, t('cancel')), done));

  function clearErrors() {
    general.textContent = '';
    done.textContent = '';
    for (const p of form.querySelectorAll('[data-error-for]')) p.textContent = '';
    for (const b of form.querySelectorAll('.field.bad')) b.classList.remove('bad');
  }
  /** Shows `message` next to the field the API named (or its nearest parent field). */
  function showError(name, message) {
    let key = name;
    while (key && !form.querySelector(`[data-error-for="${CSS.escape(key)}"]`)) key = key.includes('.') ? key.slice(0, key.lastIndexOf('.')) : '';
    const p = key && form.querySelector(`[data-error-for="${CSS.escape(key)}"]`);
    if (!p) { general.textContent = `${name}: ${message}`; return; }
    p.textContent = message;
    p.closest('.field').classList.add('bad');
    form.querySelector(`[data-field="${CSS.escape(key)}"]`)?.focus();
  }
  const number = (el) => (el.value.trim() === '' ? el.value : Number(el.value));

  /** The form's values in the API's shape (the write-only tool_secret aside), or null once
   *  an error is shown (tools that are not a JSON array). */
  function values() {
    let tools;
    try {
      tools = JSON.parse(inputs.tools.value || '[]');
    } catch (e) {
      showError('tools', t('tools_not_json') + e.message);
      return null;
    }
    if (!Array.isArray(tools)) {
      showError('tools', t('tools_not_array'));
      return null;
    }
    return {
      name: inputs.name.value, instructions: inputs.instructions.value, greeting: inputs.greeting.value,
      voice: inputs.voice.value, model: inputs.model.value, language: inputs.language.value,
      transcription_model: inputs.transcription_model.value, noise_reduction: inputs.noise_reduction.value,
      turn_detection: {
        type: inputs['turn_detection.type'].value, threshold: number(inputs['turn_detection.threshold']),
        silence_duration_ms: number(inputs['turn_detection.silence_duration_ms']),
        prefix_padding_ms: number(inputs['turn_detection.prefix_padding_ms']),
      },
      tools, transfer_number: inputs.transfer_number.value.trim() || null,
      max_call_seconds: number(inputs.max_call_seconds),
      record_calls: inputs.record_calls.checked, is_default: inputs.is_default.checked,
    };
  }
  // What the form showed when drawn (then what it last saved). An edit sends only the fields
  // that differ from it (inside turn_detection too): the API changes only the fields given,
  // so another person's change to other fields meanwhile is not undone.
  let shown = null;
  // Sent whatever they hold: an unreadable row's field at fault (the API refuses a PUT that
  // does not give it), and any field a refusal named since (a row may have more than one).
  const mustSend = new Set(unreadable ? [unreadable.field] : []);
  const same = (x, y) => JSON.stringify(x) === JSON.stringify(y);
  function changes(now) {
    const body = {};
    for (const [k, v] of Object.entries(now)) {
      if (k !== 'turn_detection') {
        if (mustSend.has(k) || !same(v, shown[k])) body[k] = v;
        continue;
      }
      const td = Object.fromEntries(Object.entries(v)
        .filter(([f, x]) => mustSend.has(`turn_detection.${f}`) || !same(x, shown.turn_detection[f])));
      if (Object.keys(td).length) body.turn_detection = td;
    }
    return body;
  }

  async function save() {
    clearErrors();
    const now = values();
    if (!now) return;
    const body = id ? changes(now) : { ...now };
    if (!id && !now.greeting.trim()) delete body.greeting;
    if (inputs.tool_secret.value) body.tool_secret = inputs.tool_secret.value;
    if (id && !Object.keys(body).length) {
      done.textContent = t('no_changes');
      return;
    }
    const r = id
      ? await api(`/api/admin/agents/${encodeURIComponent(id)}`, { method: 'PUT', body })
      : await api('/api/admin/agents', { method: 'POST', body });
    if (!r.ok) {
      if (r.data?.field) {
        mustSend.add(r.data.field);
        return showError(r.data.field, r.data.message);
      }
      general.textContent = r.data?.message || String(r.status);
      return;
    }
    agentNames = null;
    if (!id) { location.hash = `#/agents/${encodeURIComponent(r.data.agent.id)}`; return; }
    if (unreadable) {
      repairedAgent = true;
      route();
      return;
    }
    shown = now;
    done.textContent = t('saved');
  }
  shown = values();

  show(h('p', {}, h('a', { href: '#/agents' }, `← ${t('agents')}`)), h('h1', {}, id ? `${t('edit_agent')}: ${a.name || a.id}` : t('new_agent')),
    h('div', {}, unreadable && h('p', { class: 'error unreadable' },
      t('unreadable_form').replace('{field}', unreadable.field).replace('{message}', unreadable.message))),
    form);
  if (unreadable) showError(unreadable.field, `${t('unreadable')}: ${unreadable.message}`);
}

// ---- numbers -------------------------------------------------------------------------------------

async function renderNumbers(seq) {
  const [r, agents] = await Promise.all([api('/api/admin/numbers'), agentsById(true)]);
  if (stale(seq)) return;
  if (!r.ok) throw new Error(r.data?.message || r.status);
  const rows = r.data.numbers.map((n) => h('tr', {},
    h('td', {}, n.number),
    h('td', {}, h('a', { href: `#/agents/${encodeURIComponent(n.agent_id)}` }, n.agent_name || n.agent_id)),
    h('td', {}, fmtTime(n.created_at)),
    h('td', {}, h('button', {
      onclick: async () => {
        if (!confirm(t('confirm_unassign'))) return;
        const d = await api(`/api/admin/numbers/${encodeURIComponent(n.number)}`, { method: 'DELETE' });
        if (d.ok) route(); else alert(d.data?.message || d.status);
      },
    }, t('unassign')))));
  const number = h('input', { type: 'text', id: 'n-number', placeholder: '+81312345678', 'data-field': 'number' });
  const agent = h('select', { id: 'n-agent', 'data-field': 'agent_id' },
    [...agents.values()].map((a) => h('option', { value: a.id }, a.name ? `${a.name} (${a.id})` : a.id)));
  const errs = { number: h('p', { class: 'error' }), agent_id: h('p', { class: 'error' }) };
  const general = h('p', { class: 'error' });
  const form = h('form', {
    class: 'card filters',
    onsubmit: async (e) => {
      e.preventDefault();
      for (const p of [...Object.values(errs), general]) p.textContent = '';
      const value = normaliseNumber(number.value);
      if (!value) { errs.number.textContent = '+81312345678'; return; }
      const d = await api(`/api/admin/numbers/${encodeURIComponent(value)}`, { method: 'PUT', body: { agent_id: agent.value } });
      if (d.ok) return route();
      const box = errs[d.data?.field] || general;
      box.textContent = d.data?.field === 'number' ? t('bad_number') : d.data?.message || d.status;
      if (d.data?.message) box.title = d.data.message;
    },
  },
  h('div', {}, h('label', { for: 'n-number' }, t('number')), number, errs.number),
  h('div', {}, h('label', { for: 'n-agent' }, t('agent')), agent, errs.agent_id),
  h('div', {}, h('button', { class: 'primary', type: 'submit' }, t('assign'))), general);
  show(h('h1', {}, t('numbers')), form,
    rows.length
      ? h('table', {}, h('thead', {}, h('tr', {}, [t('number'), t('agent'), t('assigned'), ''].map((x) => h('th', {}, x)))), h('tbody', {}, rows))
      : h('p', { class: 'muted' }, t('no_numbers')));
}

// ---- start ---------------------------------------------------------------------------------------

document.getElementById('lang').addEventListener('click', () => {
  // The page is drawn again in the other language: the recording carries on where it was.
  const a = document.getElementById('recording');
  resume = a && a.currentSrc ? { hash: location.hash, time: a.currentTime, playing: !a.paused } : null;
  lang = lang === 'ja' ? 'en' : 'ja';
  localStorage.setItem(LANG_KEY, lang);
  route();
});
document.getElementById('signout').addEventListener('click', () => signOut());
window.addEventListener('hashchange', route);
route();
