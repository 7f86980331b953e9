// Call review: calls, their transcripts and recordings, agents and number assignments, on
// top of the admin API (/api/admin/). Plain JavaScript, no framework. The admin token is
// kept in sessionStorage (gone with the tab) and sent as a bearer token; the recording plays
// from a signed, expiring link to it that the token fetches, streamed with Range requests.
'use strict';

const TOKEN_KEY = 'phone-agent-bridge.admin-token';
const LANG_KEY = 'phone-agent-bridge.lang';
// The GA Realtime voices and turn-detection types (config.rs VOICES, TURN_DETECTION_TYPES).
const VOICES = ['alloy', 'ash', 'ballad', 'coral', 'echo', 'sage', 'shimmer', 'verse', 'marin', 'cedar'];
const TURN_TYPES = ['server_vad', 'semantic_vad'];
const STATUSES = ['ringing', 'in-progress', 'completed', 'failed', 'busy', 'no-answer', 'canceled'];

const I18N = {
  ja: {
    brand: '通話レビュー', nav_calls: '通話', nav_agents: 'エージェント', nav_numbers: '電話番号',
    sign_out: 'サインアウト', sign_in: 'サインイン', token: '管理トークン (ADMIN_TOKEN)',
    sign_in_help: 'トークンはこのタブを閉じると消去されます。',
    bad_token: 'トークンが正しくありません。', session_expired: 'もう一度サインインしてください。',
    loading: '読み込み中…', failed: '読み込めませんでした', retry: '再読み込み', reload_hint: 'ページを再読み込みしてください。',
    calls: '通話', status: '状態', agent: 'エージェント', from: '発信元', to: '着信先',
    started: '開始時刻', duration: '通話時間', barge_ins: '割り込み', any: 'すべて',
    number: '電話番号', date_from: '開始日', date_to: '終了日', filter: '絞り込む', clear: 'クリア',
    next: '次のページ', first: '最初のページ', no_calls: '通話はありません。',
    recording: '録音', no_recording: 'この通話の録音はありません。', load_recording: '録音を読み込み中…',
    transcript: '会話', no_transcript: '会話の記録はありません。', caller: 'お客様', agent_role: 'エージェント',
    interrupted: '割り込みで中断', figures: '通話の数値', first_audio: '最初の応答まで',
    tokens: 'トークン (入力 / 出力 / 合計)', end_reason: '終了理由', twilio_duration: 'Twilio 通話時間',
    recording_size: '録音サイズ', timeline: 'タイムライン', ev_barge_in: '割り込み', ev_tool_call: 'ツール呼び出し',
    ev_other: 'その他のイベント', back: '← 通話一覧', call_not_found: '通話が見つかりません。',
    agents: 'エージェント', new_agent: '新しいエージェント', edit_agent: 'エージェントの編集', name: '名前',
    default: '標準', voice: '声', model: 'モデル', language: '言語', record_calls: '通話を録音する',
    recording_on: '録音する', recording_off: '録音しない', instructions: '指示 (instructions)',
    greeting: '最初の挨拶の指示', transcription_model: '文字起こしモデル', turn_detection: 'ターン検出',
    td_type: '種類', td_threshold: 'しきい値 (0–1)', td_silence: '無音判定 (ms)', td_prefix: '前置き (ms)',
    tools: 'ツール (JSON 配列)', transfer_number: '転送先番号 (E.164)', max_call_seconds: '最大通話時間 (秒)',
    tool_secret: 'ツール署名キー (16 文字以上、書き込み専用)', tool_secret_set: '設定済み。空欄なら変更しません。',
    is_default: '標準エージェントにする', save: '保存', saved: '保存しました。', cancel: '戻る',
    tools_not_json: 'JSON として読めません: ', tools_not_array: 'JSON の配列にしてください。',
    numbers: '電話番号の割り当て', assign: '割り当て', unassign: '解除', assigned: '割り当て日時',
    no_numbers: '割り当てはありません。既定のエージェントが応答します。', confirm_unassign: 'この番号の割り当てを解除しますか？',
    ms: 'ms', sec: '秒', yes: 'はい', no: 'いいえ', created: '作成日時', updated: '更新日時',
  },
  en: {
    brand: 'Call review', nav_calls: 'Calls', nav_agents: 'Agents', nav_numbers: 'Numbers',
    sign_out: 'Sign out', sign_in: 'Sign in', token: 'Admin token (ADMIN_TOKEN)',
    sign_in_help: 'The token is forgotten when this tab closes.',
    bad_token: 'That token is not valid.', session_expired: 'Please sign in again.',
    loading: 'Loading…', failed: 'Could not load', retry: 'Reload', reload_hint: 'reload the page.',
    calls: 'Calls', status: 'Status', agent: 'Agent', from: 'From', to: 'To',
    started: 'Started', duration: 'Duration', barge_ins: 'Barge-ins', any: 'Any',
    number: 'Number', date_from: 'From date', date_to: 'To date', filter: 'Filter', clear: 'Clear',
    next: 'Next page', first: 'First page', no_calls: 'No calls.',
    recording: 'Recording', no_recording: 'This call has no recording.', load_recording: 'Loading the recording…',
    transcript: 'Conversation', no_transcript: 'Nothing was transcribed.', caller: 'Caller', agent_role: 'Agent',
    interrupted: 'cut by a barge-in', figures: 'Figures', first_audio: 'Time to first agent audio',
    tokens: 'Tokens (in / out / total)', end_reason: 'End reason', twilio_duration: 'Twilio duration',
    recording_size: 'Recording size', timeline: 'Timeline', ev_barge_in: 'Barge-in', ev_tool_call: 'Tool call',
    ev_other: 'Other event', back: '← Calls', call_not_found: 'No such call.',
    agents: 'Agents', new_agent: 'New agent', edit_agent: 'Edit agent', name: 'Name',
    default: 'Default', voice: 'Voice', model: 'Model', language: 'Language', record_calls: 'Record calls',
    recording_on: 'Recorded', recording_off: 'Not recorded', instructions: 'Instructions',
    greeting: 'Greeting instructions', transcription_model: 'Transcription model', turn_detection: 'Turn detection',
    td_type: 'Type', td_threshold: 'Threshold (0–1)', td_silence: 'Silence (ms)', td_prefix: 'Prefix padding (ms)',
    tools: 'Tools (JSON array)', transfer_number: 'Transfer number (E.164)', max_call_seconds: 'Max call length (s)',
    tool_secret: 'Tool signing key (16+ characters, write-only)', tool_secret_set: 'Set. Leave empty to keep it.',
    is_default: 'Default agent', save: 'Save', saved: 'Saved.', cancel: 'Back',
    tools_not_json: 'Not JSON: ', tools_not_array: 'Must be a JSON array.',
    numbers: 'Number assignments', assign: 'Assign', unassign: 'Unassign', assigned: 'Assigned',
    no_numbers: 'No assignments: the default agent answers every number.', confirm_unassign: 'Unassign this number?',
    ms: 'ms', sec: 's', yes: 'yes', no: 'no', created: 'Created', updated: 'Updated',
  },
};

let lang = localStorage.getItem(LANG_KEY) === 'en' ? 'en' : 'ja';
const t = (key) => I18N[lang][key] ?? I18N.ja[key] ?? key;
const token = () => sessionStorage.getItem(TOKEN_KEY);
const $view = () => document.getElementById('view');
let cleanup = []; // run before the next view renders (the recording's stream)

// ---- DOM -----------------------------------------------------------------------------------------

/** An element: attributes (on* are listeners) and children (strings become text, never HTML). */
function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
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

// ---- formatting ----------------------------------------------------------------------------------

const locale = () => (lang === 'ja' ? 'ja-JP' : 'en-GB');
function fmtTime(iso) {
  if (!iso) return '—';
  const d = new Date(iso);
  return isNaN(d) ? iso : d.toLocaleString(locale(), { dateStyle: 'medium', timeStyle: 'medium' });
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
  return n >= 1048576 ? `${(n / 1048576).toFixed(1)} MiB` : `${Math.max(1, Math.round(n / 1024))} KiB`;
}
const dash = (v) => (v === null || v === undefined || v === '' ? '—' : v);

// ---- API -----------------------------------------------------------------------------------------

class Unauthorized extends Error {}

async function api(path, { method = 'GET', body } = {}) {
  const headers = { Authorization: `Bearer ${token()}` };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (res.status === 401) {
    signOut(t('session_expired'));
    throw new Unauthorized();
  }
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = { message: text }; }
  return { status: res.status, ok: res.ok, data };
}

let agentNames = null;
async function agentsById(refresh = false) {
  if (!agentNames || refresh) {
    const r = await api('/api/admin/agents');
    agentNames = new Map((r.data?.agents || []).map((a) => [a.id, a]));
  }
  return agentNames;
}

function failure(err, again) {
  if (err instanceof Unauthorized) return;
  show(h('div', { class: 'card' },
    h('p', { class: 'error' }, `${t('failed')}: ${err.message || err}`),
    h('button', { onclick: again }, t('retry'))));
}

// ---- session -------------------------------------------------------------------------------------

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  agentNames = null;
  renderSignIn(message);
}

function renderSignIn(message) {
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

function route() {
  for (const f of cleanup.splice(0)) f();
  if (!token()) return renderSignIn();
  const [path, query] = location.hash.replace(/^#/, '').split('?');
  const params = new URLSearchParams(query || '');
  const parts = path.split('/').filter(Boolean).map(decodeURIComponent);
  const section = parts[0] || 'calls';
  chrome(true, section);
  show(h('p', { class: 'muted' }, t('loading')));
  const again = () => route();
  let view;
  if (section === 'calls' && parts[1]) view = renderCall(parts[1]);
  else if (section === 'agents' && parts[1]) view = renderAgentForm(parts[1] === 'new' ? null : parts[1]);
  else if (section === 'agents') view = renderAgents();
  else if (section === 'numbers') view = renderNumbers();
  else view = renderCalls(params);
  view.catch((e) => failure(e, again));
}

// ---- calls ---------------------------------------------------------------------------------------

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

async function renderCalls(params) {
  const q = new URLSearchParams();
  for (const k of ['status', 'number', 'cursor']) if (params.get(k)) q.set(k, params.get(k));
  if (params.get('from')) q.set('from', localDayBound(params.get('from'), false));
  if (params.get('to')) q.set('to', localDayBound(params.get('to'), true));
  q.set('limit', '25');
  const [r, agents] = await Promise.all([api(`/api/admin/calls?${q}`), agentsById()]);
  const field = (name, el) => h('div', {}, h('label', { for: `f-${name}` }, t(name === 'from' ? 'date_from' : name === 'to' ? 'date_to' : name)), el);
  const status = h('select', { id: 'f-status', name: 'status' }, h('option', { value: '' }, t('any')),
    STATUSES.map((s) => h('option', { value: s, selected: params.get('status') === s }, s)));
  const number = h('input', { id: 'f-number', name: 'number', type: 'text', placeholder: '+81…', value: params.get('number') || '' });
  const from = h('input', { id: 'f-from', name: 'from', type: 'date', value: params.get('from') || '' });
  const to = h('input', { id: 'f-to', name: 'to', type: 'date', value: params.get('to') || '' });
  const filters = h('form', {
    class: 'card filters',
    onsubmit: (e) => {
      e.preventDefault();
      const next = new URLSearchParams();
      for (const el of [status, number, from, to]) if (el.value.trim()) next.set(el.name, el.value.trim());
      location.hash = `#/calls?${next}`;
    },
  }, field('status', status), field('number', number), field('from', from), field('to', to),
  h('div', {}, h('button', { class: 'primary', type: 'submit' }, t('filter'))),
  h('div', {}, h('button', { type: 'button', onclick: () => { location.hash = '#/calls'; } }, t('clear'))));
  if (!r.ok) {
    const msg = r.data?.field ? `${r.data.field}: ${r.data.message}` : r.data?.message;
    return show(h('h1', {}, t('calls')), filters, h('p', { class: 'error' }, msg || r.status));
  }
  const rows = r.data.calls.map((c) => h('tr', {
    class: 'link',
    onclick: () => { location.hash = `#/calls/${encodeURIComponent(c.call_sid)}`; },
  },
  h('td', {}, h('a', { href: `#/calls/${encodeURIComponent(c.call_sid)}` }, fmtTime(c.started_at))),
  h('td', {}, h('span', { class: `badge ${c.status}` }, c.status)),
  h('td', {}, agents.get(c.agent_id)?.name || dash(c.agent_id)),
  h('td', {}, dash(c.from_number)), h('td', {}, dash(c.to_number)),
  h('td', { class: 'num' }, fmtDuration(c.duration_ms)),
  h('td', { class: 'num' }, c.barge_ins ?? 0),
  h('td', {}, c.recording_key ? '🎧' : '')));
  const table = rows.length
    ? h('table', {}, h('thead', {}, h('tr', {}, h('th', {}, t('started')), h('th', {}, t('status')), h('th', {}, t('agent')),
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

function eventLabel(ev) {
  const d = ev.detail || {};
  if (ev.type === 'barge_in') return `${t('ev_barge_in')} (${d.audio_end_ms ?? '?'} ${t('ms')})`;
  if (ev.type === 'tool_call') return `${t('ev_tool_call')}: ${d.name ?? '?'} ${d.ok === false ? '✗' : '✓'} (${d.duration_ms ?? '?'} ${t('ms')})`;
  return ev.type;
}

async function renderCall(sid) {
  const [r, agents] = await Promise.all([api(`/api/admin/calls/${encodeURIComponent(sid)}`), agentsById()]);
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
    timeline.append(h('span', { class: `mark ${kind}`, style: `left:${pos(at)}`, title: `${fmtOffset(at)} ${eventLabel(ev)}` }));
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
      return h('div', { class: `sys ${it.cls}`, onclick: () => seek(it.at) }, `${fmtOffset(it.at)} · ${eventLabel(it.ev)}`);
    }
    const e = it.entry;
    const el = h('div', {
      class: `turn ${e.role}`, 'data-offset-ms': e.offset_ms, tabindex: 0, role: 'button',
      onclick: () => seek(e.offset_ms),
      onkeydown: (k) => { if (k.key === 'Enter') seek(e.offset_ms); },
    },
    h('div', { class: 'meta' }, h('span', {}, fmtOffset(e.offset_ms)), h('span', {}, e.role === 'caller' ? t('caller') : t('agent_role')),
      e.interrupted && h('span', { class: 'cut' }, t('interrupted'))),
    h('div', { class: 'text' }, e.text));
    turns.push({ at: e.offset_ms, el });
    return el;
  }));
  audio.addEventListener('timeupdate', () => {
    const ms = audio.currentTime * 1000;
    head.style.left = pos(ms);
    let current = null;
    for (const turn of turns) if (turn.at <= ms) current = turn;
    for (const turn of turns) turn.el.classList.toggle('now', turn === current);
  });

  const fig = (label, value) => h('div', {}, h('dt', {}, label), h('dd', {}, value));
  const agent = agents.get(call.agent_id);
  show(
    back,
    h('h1', {}, `${dash(call.from_number)} → ${dash(call.to_number)}`),
    h('p', { class: 'muted' }, h('span', { class: `badge ${call.status}` }, call.status), ' ', fmtTime(call.started_at), ' · ',
      agent ? h('a', { href: `#/agents/${encodeURIComponent(agent.id)}` }, agent.name) : dash(call.agent_id), ' · ', call.call_sid),
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
      fig(t('end_reason'), call.end_detail ? `${dash(call.end_reason)} (${call.end_detail})` : dash(call.end_reason)),
      fig(t('barge_ins'), call.barge_ins ?? 0),
      fig(t('twilio_duration'), call.twilio_duration_s === null || call.twilio_duration_s === undefined ? '—' : `${call.twilio_duration_s} ${t('sec')}`),
      fig(t('recording_size'), fmtBytes(call.recording_bytes)))),
    h('section', { class: 'card' }, h('h2', {}, t('transcript')),
      transcript.length ? convo : h('p', { class: 'muted' }, t('no_transcript'))),
  );

  if (call.recording_key) {
    // <audio src> cannot send the bearer token: ask for a signed link to this recording,
    // which the browser then streams with Range requests (no download of the whole WAV).
    const link = await api(`/api/admin/calls/${encodeURIComponent(sid)}/recording-link`);
    const status = document.getElementById('recording-status');
    if (!status) return; // navigated away meanwhile
    if (!link.ok) {
      status.textContent = link.status === 404 ? t('no_recording') : `${t('failed')} (${link.status})`;
      return;
    }
    audio.addEventListener('error', () => {
      audioBox.replaceChildren(audio, h('p', { class: 'error', id: 'recording-status' }, `${t('failed')}: ${t('reload_hint')}`));
    }, { once: true });
    audio.src = link.data.url;
    // Leaving the page stops the stream.
    cleanup.push(() => { audio.pause(); audio.removeAttribute('src'); audio.load(); });
    audioBox.replaceChildren(audio);
  }
}

// ---- agents --------------------------------------------------------------------------------------

async function renderAgents() {
  const agents = [...(await agentsById(true)).values()];
  const rows = agents.map((a) => h('tr', { class: 'link', onclick: () => { location.hash = `#/agents/${encodeURIComponent(a.id)}`; } },
    h('td', {}, h('a', { href: `#/agents/${encodeURIComponent(a.id)}` }, a.name), a.is_default && ' ', a.is_default && h('span', { class: 'badge' }, t('default'))),
    h('td', {}, a.id), h('td', {}, a.voice), h('td', {}, a.model), h('td', {}, a.language),
    h('td', {}, a.record_calls ? t('recording_on') : t('recording_off')), h('td', {}, fmtTime(a.updated_at))));
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

async function renderAgentForm(id) {
  let a = {
    name: '', instructions: '', greeting: '', voice: 'marin', model: 'gpt-realtime', language: 'ja',
    transcription_model: 'gpt-4o-transcribe',
    turn_detection: { type: 'server_vad', threshold: 0.5, silence_duration_ms: 500, prefix_padding_ms: 300 },
    tools: [], transfer_number: null, max_call_seconds: 1800, is_default: false, record_calls: true, tool_secret_set: false,
  };
  if (id) {
    const r = await api(`/api/admin/agents/${encodeURIComponent(id)}`);
    if (!r.ok) throw new Error(r.data?.message || r.status);
    a = r.data.agent;
  }
  const text = (v) => h('input', { type: 'text', value: v ?? '' });
  const num = (v, step) => h('input', { type: 'number', value: v ?? '', step: step || '1' });
  const select = (options, v) => h('select', {}, options.map((o) => h('option', { value: o, selected: o === v }, o)));
  const inputs = {
    name: text(a.name),
    voice: select(VOICES, a.voice),
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
  const done = h('span', { class: 'muted', role: 'status' });
  const form = h('form', { class: 'card', novalidate: true, onsubmit: (e) => { e.preventDefault(); save(); } },
    h('div', { class: 'grid2' },
      field('name', t('name'), inputs.name),
      id ? field('id', 'ID', inputs.id) : h('div'),
      field('voice', t('voice'), inputs.voice),
      field('model', t('model'), inputs.model),
      field('language', t('language'), inputs.language),
      field('transcription_model', t('transcription_model'), inputs.transcription_model),
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

  async function save() {
    clearErrors();
    let tools;
    try {
      tools = JSON.parse(inputs.tools.value || '[]');
    } catch (e) {
      return showError('tools', t('tools_not_json') + e.message);
    }
    if (!Array.isArray(tools)) return showError('tools', t('tools_not_array'));
    const body = {
      name: inputs.name.value, instructions: inputs.instructions.value, voice: inputs.voice.value,
      model: inputs.model.value, language: inputs.language.value, transcription_model: inputs.transcription_model.value,
      turn_detection: {
        type: inputs['turn_detection.type'].value, threshold: number(inputs['turn_detection.threshold']),
        silence_duration_ms: number(inputs['turn_detection.silence_duration_ms']),
        prefix_padding_ms: number(inputs['turn_detection.prefix_padding_ms']),
      },
      tools, transfer_number: inputs.transfer_number.value.trim() || null,
      max_call_seconds: number(inputs.max_call_seconds),
      record_calls: inputs.record_calls.checked, is_default: inputs.is_default.checked,
    };
    if (inputs.greeting.value.trim() || id) body.greeting = inputs.greeting.value;
    if (inputs.tool_secret.value) body.tool_secret = inputs.tool_secret.value;
    const r = id
      ? await api(`/api/admin/agents/${encodeURIComponent(id)}`, { method: 'PUT', body })
      : await api('/api/admin/agents', { method: 'POST', body });
    if (!r.ok) {
      if (r.data?.field) return showError(r.data.field, r.data.message);
      general.textContent = r.data?.message || String(r.status);
      return;
    }
    agentNames = null;
    if (!id) { location.hash = `#/agents/${encodeURIComponent(r.data.agent.id)}`; return; }
    done.textContent = t('saved');
  }

  show(h('p', {}, h('a', { href: '#/agents' }, `← ${t('agents')}`)), h('h1', {}, id ? `${t('edit_agent')}: ${a.name}` : t('new_agent')), form);
}

// ---- numbers -------------------------------------------------------------------------------------

async function renderNumbers() {
  const [r, agents] = await Promise.all([api('/api/admin/numbers'), agentsById(true)]);
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
    [...agents.values()].map((a) => h('option', { value: a.id }, `${a.name} (${a.id})`)));
  const errs = { number: h('p', { class: 'error' }), agent_id: h('p', { class: 'error' }) };
  const general = h('p', { class: 'error' });
  const form = h('form', {
    class: 'card filters',
    onsubmit: async (e) => {
      e.preventDefault();
      for (const p of [...Object.values(errs), general]) p.textContent = '';
      const value = number.value.trim();
      if (!value) { errs.number.textContent = '+81312345678'; return; }
      const d = await api(`/api/admin/numbers/${encodeURIComponent(value)}`, { method: 'PUT', body: { agent_id: agent.value } });
      if (d.ok) return route();
      (errs[d.data?.field] || general).textContent = d.data?.message || d.status;
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
  lang = lang === 'ja' ? 'en' : 'ja';
  localStorage.setItem(LANG_KEY, lang);
  route();
});
document.getElementById('signout').addEventListener('click', () => signOut());
window.addEventListener('hashchange', route);
route();
