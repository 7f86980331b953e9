//! Call control: tools the model calls, responses asked for on the caller's behalf (tool
//! results, DTMF, check-ins), ending the call (hang-up, transfer, time limits, a silent
//! line) and keeping the call alive across a lost or expired Realtime session.

use super::{Action, Call, EndReason, Level, Upstream};
use crate::audio::bytes_to_ms;
use crate::http;
use crate::ids::Millis;
use crate::openai;
use crate::store::{EventKind, Role};
use crate::tools::{self, Tool};
use crate::twilio;
use crate::twiml;
use serde_json::{json, Value};
use std::collections::{BTreeMap, VecDeque};

/// How long the goodbye (or transfer notice) may take before the call is ended anyway.
pub const GOODBYE_TIMEOUT: Millis = Millis(20_000);
/// How long a finished goodbye may take to finish playing.
pub const DRAIN_TIMEOUT: Millis = Millis(15_000);
/// A hang-up or transfer that Twilio's REST API could not take for a passing reason (no
/// answer in time, 429, 5xx) is asked again after these waits before the caller is handed
/// to the fallback: the goodbye has been said, and the apology would contradict it.
const FINISH_RETRY_DELAYS: [Millis; 2] = [Millis(1_000), Millis(3_000)];
/// A lost Realtime session must be back within this long, or the caller gets the fallback.
pub const RECONNECT_WINDOW: Millis = Millis(8_000);
pub const MAX_RECONNECTS: u32 = 3;
/// Wait before each new attempt (the first is at once): a refusing or rate-limiting server
/// gets a moment, and the attempts still fit well inside the window.
const RECONNECT_DELAYS: [Millis; MAX_RECONNECTS as usize] = [Millis(0), Millis(500), Millis(1_500)];
/// The agent is told to wrap up this long before the call's time limit…
pub const WRAP_UP_BEFORE: Millis = Millis(30_000);

/// …or half the limit before, when that is sooner: a call limited to 30 s is told half-way
/// through, not as its greeting starts.
pub fn wrap_up_before(max_call_seconds: u32) -> Millis {
    Millis(WRAP_UP_BEFORE.0.min(u64::from(max_call_seconds) * 1000 / 2))
}
/// A response that failed for a passing reason (a server error) is asked for again after
/// this pause…
pub const RESPONSE_RETRY_DELAY: Millis = Millis(1_000);
/// …once: this many failed in a row, with none completed between, and the agent is taken
/// to be unable to speak (the caller gets the fallback).
pub const MAX_FAILED_RESPONSES: u32 = 2;
/// A response asked for while the caller speaks waits for the end of their turn, but no
/// longer than this from the start of their speech (speech that never stops is a noisy
/// line more than a caller).
pub const SPEECH_HOLD_LIMIT: Millis = Millis(15_000);
/// A caller who is speaking keeps the line from going idle (no check-in, no idle goodbye
/// over their words), but no longer than this from the start of their speech: a real turn
/// ends well within it (server VAD ends it at the first pause; semantic VAD decides within
/// 8 s of one), so speech that has not stopped by then is a noisy line or a lost
/// `speech_stopped`, and the idle clock runs from here. Longer than [`SPEECH_HOLD_LIMIT`]
/// (after which a held response may go out over such speech): a check-in asks whether
/// anyone is there, which a long turn answers.
pub const SPEECH_IDLE_LIMIT: Millis = Millis(60_000);
/// Once the caller stops (server VAD), the server's own response to their turn is awaited
/// this long; when none comes (speech too short to be a turn is not committed, or the
/// session does not answer turns by itself), the response held goes out.
pub const TURN_RESPONSE_WAIT: Millis = Millis(1_500);
/// The same with semantic VAD, which may wait up to 4 s (`eagerness` auto) after the
/// caller stops before it takes the turn as ended.
pub const SEMANTIC_TURN_RESPONSE_WAIT: Millis = Millis(5_000);
/// An item of ours the server has not confirmed this long after it was sent will not be
/// (the server refused it with an `error`): it no longer holds back a response.
pub const ITEM_CONFIRM_WAIT: Millis = Millis(5_000);
/// How many of the items of ours it confirmed last are remembered, to tell a second
/// confirmation of one from that of the next.
const RECENT_CONFIRMED: usize = 8;
/// A new session is told the results of at most this many of the call's latest tools.
pub const MAX_SEEDED_TOOL_RESULTS: usize = 20;

/// What the bridge tells the model on the caller's behalf, as system messages in the
/// conversation (never as a response's `instructions`, which would replace the agent's own
/// for that response). In Japanese for a Japanese agent, in English for any other: the agent's
/// instructions say which language it speaks to the caller.
struct Notes {
    wrap_up: &'static str,
    check_in: &'static str,
    idle_goodbye: &'static str,
    /// The caller spoke while the agent was ending the call: it goes on.
    not_ended: &'static str,
    not_transferred: &'static str,
    /// What `end_call` and `transfer_call` ask the model to say, told again to a new
    /// session when the old one was lost before saying it (the tool output went with it).
    say_goodbye: &'static str,
    announce_transfer: &'static str,
    /// The session was lost before the caller's last words were transcribed: the new one
    /// never heard them.
    ask_again: &'static str,
    /// Written in the record for a caller's turn whose transcription failed: they said
    /// something there, and the reviewer can play it from the recording.
    untranscribed_turn: &'static str,
}

const JAPANESE: Notes = Notes {
    wrap_up: "通話の制限時間がまもなく終わります。お客様に丁寧にその旨をお伝えし、会話を締めくくってください。",
    check_in: "お客様がしばらく無言です。まだお電話がつながっているか、短く丁寧に確認してください。",
    idle_goodbye: "お客様からの応答がないため、丁寧にお礼を述べて、お電話を終了する旨を短くお伝えしてください。",
    not_ended: "お客様が話し始めたため、通話は終了していません。お客様のお話を伺ってください。それでも通話を終える場合は、あらためて end_call を呼んでください。",
    not_transferred: "お客様が話し始めたため、転送はまだ行われていません。お客様のお話を伺ってください。それでも転送する場合は、あらためて transfer_call を呼んでください。",
    say_goodbye: "お客様に短く丁寧にお別れのご挨拶をしてください。話し終えると通話は終了します。",
    announce_transfer: "これから担当者に電話を転送することを、お客様に一文で短くお伝えください。",
    ask_again: "接続が一時的に途切れたため、お客様の直前のお話を聞き取れていません。お待たせしたことをお詫びし、恐れ入りますがもう一度お話しいただけるよう、短くお願いしてください。",
    untranscribed_turn: "（文字起こしできませんでした）",
};

const ENGLISH: Notes = Notes {
    wrap_up: "The call's time limit is almost up. Politely tell the caller so and bring the conversation to a close.",
    check_in: "The caller has been silent for a while. Briefly and politely check whether they are still on the line.",
    idle_goodbye: "The caller is not answering. Thank them politely and say briefly that you are ending the call.",
    not_ended: "The caller started speaking, so the call was not ended. Listen to the caller. If the call should still end, call end_call again.",
    not_transferred: "The caller started speaking, so the call was not transferred. Listen to the caller. If they should still be transferred, call transfer_call again.",
    say_goodbye: "Say a brief, polite goodbye now. The call ends when you finish speaking.",
    announce_transfer: "Tell the caller in one short sentence that you are transferring them to a staff member now.",
    ask_again: "The connection dropped for a moment and the caller's last words were not heard. Apologise for the wait and briefly ask them to say it again.",
    untranscribed_turn: "(could not be transcribed)",
};

impl Call {
    fn notes(&self) -> &'static Notes {
        if self.agent.language.trim().eq_ignore_ascii_case("ja") {
            &JAPANESE
        } else {
            &ENGLISH
        }
    }

    /// What a new session is told of the reply the lost one was saying: cut off, and
    /// what of it the caller heard (the audio already sent still plays), so it goes on
    /// from there rather than repeat or skip it.
    fn cut_off_note(&self, heard: &str) -> String {
        let ja = std::ptr::eq(self.notes(), &JAPANESE);
        match (ja, heard.is_empty()) {
            (true, false) => format!("接続が切れたため、あなたの直前の応答は途中で途切れました。お客様に聞こえたのは「{heard}」までです。同じことは繰り返さず、その続きからお話しください。"),
            (true, true) => "接続が切れたため、あなたの直前の応答は途中で途切れ、お客様には一部しか聞こえていません。簡潔に言い直してください。".to_owned(),
            (false, false) => format!("The connection dropped and your last reply was cut off. The caller heard it up to: \"{heard}\". Do not repeat that; go on from there."),
            (false, true) => "The connection dropped and your last reply was cut off; the caller heard only part of it. Say it again briefly.".to_owned(),
        }
    }

    /// A keypad press, as the model reads it.
    fn dtmf_note(&self, digit: &str) -> String {
        if std::ptr::eq(self.notes(), &JAPANESE) {
            format!("（お客様が電話のキーパッドで「{digit}」を押しました）")
        } else {
            format!("(The caller pressed \"{digit}\" on the phone's keypad.)")
        }
    }

    /// Adds a system message to the conversation, when a session is there to take it.
    fn tell_model(&mut self, text: &str) {
        if self.upstream == Upstream::Ready {
            self.add_item(|id| openai::text_item("system", text, Some(id)));
        }
    }

    /// Sends a `conversation.item.create` (made by `make` with its `event_id`) of an item the
    /// server confirms as ours (`ServerEvent::ItemAdded::ours`), and counts it unconfirmed
    /// until it does, or refuses it.
    fn add_item(&mut self, make: impl FnOnce(&str) -> String) {
        let c = &mut self.control;
        let n = c.next_item;
        c.next_item += 1;
        let event = make(&format!("{}{n}", openai::ITEM_EVENT_ID));
        c.unconfirmed.push_back((n, self.now));
        self.send_openai(event);
    }

    /// The server confirmed an item of ours: the oldest sent (it handles them in the order
    /// sent). A second confirmation of the same item (`conversation.item.created` beside
    /// `.added`) is not another.
    pub(super) fn item_confirmed(&mut self, item_id: &str) {
        let c = &mut self.control;
        if c.confirmed.iter().any(|id| id == item_id) {
            return;
        }
        if c.confirmed.len() == RECENT_CONFIRMED {
            c.confirmed.pop_front();
        }
        c.confirmed.push_back(item_id.to_owned());
        c.unconfirmed.pop_front();
    }

    /// The server refused the item sent with `event_id` (an `error` naming it): it will not
    /// be confirmed.
    pub(super) fn item_refused(&mut self, event_id: &str) {
        let n = event_id
            .strip_prefix(openai::ITEM_EVENT_ID)
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(n) = n {
            self.control.unconfirmed.retain(|(sent, _)| *sent != n);
        }
    }

    /// How many items of ours the server has not confirmed yet, forgetting those it will
    /// not confirm.
    fn unconfirmed_items(&mut self, now: Millis) -> usize {
        let c = &mut self.control;
        let before = c.unconfirmed.len();
        c.unconfirmed
            .retain(|(_, sent)| now.saturating_sub(*sent) < ITEM_CONFIRM_WAIT);
        if c.unconfirmed.len() < before {
            let forgotten = before - c.unconfirmed.len();
            self.log(
                Level::Warn,
                "openai.items_unconfirmed",
                json!({ "items": forgotten }),
            );
        }
        self.control.unconfirmed.len()
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Finish {
    Hangup { why: String },
    Transfer { to: String },
}

#[derive(Debug, Clone, PartialEq)]
enum Phase {
    /// Waiting for the response that says goodbye (or announces the transfer).
    Goodbye {
        requested: bool,
        response: Option<String>,
    },
    /// The goodbye is done; waiting for Twilio to finish playing it.
    Draining,
    /// The REST request is out.
    Requested { id: u64 },
    /// The last request failed for a passing reason; the next goes at the deadline.
    /// `refused`: Twilio answered it (429, 5xx), so it did nothing; else no answer came,
    /// and it may have acted.
    Retrying { refused: bool },
}

impl Phase {
    /// Twilio has been asked (it may have acted even when its answer did not arrive).
    fn asked(&self) -> bool {
        matches!(self, Phase::Requested { .. } | Phase::Retrying { .. })
    }

    /// Twilio may have carried the request out: one is on its way, or went unanswered.
    fn may_have_acted(&self) -> bool {
        matches!(
            self,
            Phase::Requested { .. } | Phase::Retrying { refused: false }
        )
    }
}

#[derive(Debug, Clone)]
struct Ending {
    finish: Finish,
    phase: Phase,
    deadline: Option<Millis>,
    /// The caller speaking before the call is handed to Twilio calls it off (the agent's
    /// own hang-up or transfer, a silent line); a time limit's end stands.
    caller_can_stop: bool,
    /// REST requests made for it so far.
    attempts: u32,
    /// What the model was asked to say (a note), for a new session should the old one be
    /// lost before saying it.
    ask: Option<&'static str>,
}

#[derive(Debug, Clone)]
struct PendingTool {
    call_id: String,
    name: String,
    arguments: Value,
    started: Millis,
    timeout_ms: u64,
    /// Called in a session since lost: the new one has no call to attach an output to.
    session_lost: bool,
}

/// A finished tool call, as the model and the event log see it.
struct ToolResult<'a> {
    call_id: &'a str,
    name: &'a str,
    arguments: Value,
    ok: bool,
    output: &'a str,
    took: Millis,
}

#[derive(Debug, Clone)]
struct Reconnect {
    /// What lost the session in the first place: the call's end reason if none comes back.
    cause: EndReason,
    started: Millis,
    attempts: u32,
    /// The next attempt waits for this moment.
    connect_at: Option<Millis>,
}

#[derive(Debug)]
pub(super) struct State {
    idle_timeout: Millis,
    pending_tools: BTreeMap<u64, PendingTool>,
    next_http: u64,
    /// A response to ask for as soon as none is active.
    wanted: bool,
    /// Each item of ours not yet confirmed by the server (its number, and when it was
    /// sent), oldest first: a response the server creates before confirming one has not
    /// seen it.
    unconfirmed: VecDeque<(u64, Millis)>,
    /// The number of our next item (its `event_id`).
    next_item: u64,
    /// The server's ids of the items of ours it confirmed last.
    confirmed: VecDeque<String>,
    /// We sent `response.create` and have not seen `response.created` yet.
    awaiting_created: bool,
    /// That `response.create` was the greeting's: refused because the caller's own turn
    /// already has a response, it is not asked for again.
    awaiting_greeting: bool,
    /// The greeting has been asked for, and no agent audio has reached the caller nor
    /// has any response finished since: lost with its session, it is asked for again.
    greeting_unheard: bool,
    /// A response was asked for or is under way, and has neither finished nor been talked
    /// over by the caller (the server cancels it then, and answers their turn instead).
    /// Lost with the session, it is asked of the next one. The caller's turn committed
    /// counts as asking (server VAD answers it, `create_response`).
    reply_owed: bool,
    /// The caller's last turn, committed and not yet transcribed: a session lost now takes
    /// those words with it, and the next one is seeded without them.
    untranscribed: Option<String>,
    /// The caller is speaking (speech started, not yet stopped), since this moment: a
    /// session lost now takes the start of their words with it, and the line is not idle
    /// (see [`SPEECH_IDLE_LIMIT`]).
    caller_speaking: Option<Millis>,
    /// The caller's speech started and is not yet a committed turn (still under way, or
    /// stopped with the commit to come): a session lost now takes those words with it.
    turn_uncommitted: bool,
    /// The caller's turn is under way, or has just ended and the server's own response to
    /// it (`create_response`) is to come: a response asked for meanwhile is held, not sent
    /// over their words nor beside that response, at most until this moment.
    turn_hold: Option<Millis>,
    /// The response in progress, and whether it has produced audio yet.
    response: Option<String>,
    response_spoke: bool,
    /// A response started once nothing more was wanted of the agent (see
    /// `ending_needs_no_agent`): the server's answer to the caller's "はい" over a goodbye
    /// said in full, or one asked for just before the time limit's end came. Cancelled, and
    /// none of its audio is played.
    silenced: Option<String>,
    /// The response the caller talked over (speech started while it was under way): the
    /// server cancels it (`interrupt_response`) but still reports the function calls it had
    /// begun (`response.function_call_arguments.done` comes for interrupted and cancelled
    /// responses too), and those are not run.
    interrupted: Option<String>,
    ending: Option<Ending>,
    /// Set once the REST request that ends the call succeeded.
    finished: Option<EndReason>,
    last_activity: Option<Millis>,
    checked_in: bool,
    wrap_up_sent: bool,
    /// The wrap-up fell due while no session was ready to hear it.
    wrap_up_unsaid: bool,
    call_deadline: Option<Millis>,
    reconnect: Option<Reconnect>,
    /// Final transcript text by conversation position, to seed a new session.
    transcript: BTreeMap<u64, (Role, String)>,
    /// The results of the call's tools by conversation position, as notes to seed a new
    /// session with: a lost session takes its function call outputs with it.
    tool_results: BTreeMap<u64, String>,
    /// Notes for a session being set up after a loss: results of tools called in the lost
    /// one, what of a reply cut short the caller heard.
    late_notes: Vec<String>,
    /// The response that is the greeting (asked again with the greeting's instructions,
    /// should it fail).
    greeting_response: Option<String>,
    /// Responses failed in a row (`response.done` with status `failed`), none completed since.
    failed_responses: u32,
    /// A failed response is asked for again at this moment (unless another is asked for or
    /// started first)…
    retry_at: Option<Millis>,
    /// …and it was the greeting.
    retry_greeting: bool,
    /// The next `response.create` asks for the greeting (its instructions).
    greet_again: bool,
    /// The agent failed for good while the call was ending (its responses, or its session
    /// with no new one): however the call then ends, its record says it failed, and why.
    agent_failure: Option<EndReason>,
}

impl State {
    pub fn new(idle_timeout: Millis) -> Self {
        Self {
            idle_timeout,
            pending_tools: BTreeMap::new(),
            next_http: 0,
            wanted: false,
            unconfirmed: VecDeque::new(),
            next_item: 0,
            confirmed: VecDeque::new(),
            awaiting_created: false,
            awaiting_greeting: false,
            greeting_unheard: false,
            reply_owed: false,
            untranscribed: None,
            caller_speaking: None,
            turn_uncommitted: false,
            turn_hold: None,
            response: None,
            response_spoke: false,
            silenced: None,
            interrupted: None,
            ending: None,
            finished: None,
            last_activity: None,
            checked_in: false,
            wrap_up_sent: false,
            wrap_up_unsaid: false,
            call_deadline: None,
            reconnect: None,
            transcript: BTreeMap::new(),
            tool_results: BTreeMap::new(),
            late_notes: Vec::new(),
            greeting_response: None,
            failed_responses: 0,
            retry_at: None,
            retry_greeting: false,
            greet_again: false,
            agent_failure: None,
        }
    }
}

impl Call {
    // ---- hooks called by the machine ----

    pub(super) fn control_stream_started(&mut self, now: Millis) {
        self.control.last_activity = Some(now);
        self.control.call_deadline =
            Some(now + Millis(u64::from(self.agent.max_call_seconds) * 1000));
    }

    /// The caller said or pressed something: the line is not idle, and a check-in has
    /// been answered.
    pub(super) fn activity(&mut self, now: Millis) {
        self.busy(now);
        self.control.checked_in = false;
    }

    /// The agent or a tool did something: the idle clock starts again (but a check-in
    /// the caller has not answered still counts).
    fn busy(&mut self, now: Millis) {
        let c = &mut self.control;
        c.last_activity = Some(c.last_activity.map_or(now, |t| t.max(now)));
    }

    /// Agent audio of `bytes` was sent: the line is busy until it has played.
    pub(super) fn agent_audio_activity(&mut self, now: Millis, bytes: u64) {
        let c = &mut self.control;
        c.greeting_unheard = false;
        let base = c.last_activity.map_or(now, |t| t.max(now));
        c.last_activity = Some(base + Millis(bytes_to_ms(bytes)));
    }

    pub(super) fn remember_transcript(&mut self, seq: u64, role: Role, text: &str) {
        if text.is_empty() {
            // A turn cut before any of it was heard: not part of the conversation.
            self.control.transcript.remove(&seq);
            return;
        }
        self.control.transcript.insert(seq, (role, text.to_owned()));
    }

    /// Why the call ends when Twilio stops the stream: the agent's own hang-up or
    /// transfer when that is what we asked for, even if Twilio's answer has not come yet
    /// (its `stop` can overtake the REST response).
    pub(super) fn control_end_reason(&mut self, now: Millis) -> Option<EndReason> {
        if let Some(done) = &self.control.finished {
            return Some(done.clone());
        }
        let ending = self.control.ending.clone()?;
        let (kind, reason) = Self::finish_reason(&ending.finish);
        if ending.phase == (Phase::Retrying { refused: true }) {
            // Twilio refused the last request and the call ended before the next: not
            // carried out (the caller hung up while waiting to be put through, say).
            self.event(
                now,
                kind,
                json!({ "ok": false, "twilio": "refused; the call ended before it was asked again",
                        "reason": reason.detail(), "attempts": ending.attempts }),
            );
            self.control.ending = None;
            return None;
        }
        if !ending.phase.may_have_acted() {
            return None;
        }
        self.event(
            now,
            kind,
            json!({ "ok": true, "twilio": "stream stopped before the REST answer", "reason": reason.detail() }),
        );
        self.control.ending = None;
        Some(reason)
    }

    fn finish_reason(finish: &Finish) -> (EventKind, EndReason) {
        match finish {
            Finish::Hangup { why } => (
                EventKind::Hangup,
                EndReason::AgentHangup { why: why.clone() },
            ),
            Finish::Transfer { to } => (
                EventKind::Transfer,
                EndReason::Transferred { to: to.clone() },
            ),
        }
    }

    fn wrap_up_before(&self) -> Millis {
        wrap_up_before(self.agent.max_call_seconds)
    }

    fn say_wrap_up(&mut self) {
        if !self.control.wrap_up_unsaid || self.upstream != Upstream::Ready {
            return;
        }
        self.control.wrap_up_unsaid = false;
        self.tell_model(self.notes().wrap_up);
        self.request_response();
    }

    /// The next moment the control timers want (`on_control_timer`). The shell asks after
    /// every event, so this allocates nothing.
    pub(super) fn control_deadline(&self) -> Option<Millis> {
        let c = &self.control;
        let earliest = |a: Option<Millis>, b: Option<Millis>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let mut next = c.retry_at;
        if c.wanted {
            next = earliest(next, c.turn_hold);
        }
        if let Some(e) = &c.ending {
            return earliest(next, e.deadline);
        }
        if let Some(end) = c.call_deadline {
            next = earliest(next, Some(end));
            if !c.wrap_up_sent {
                next = earliest(next, Some(end.saturating_sub(self.wrap_up_before())));
            }
        }
        if self.line_can_idle() {
            if let Some(t) = self.idle_since() {
                next = earliest(next, Some(t + c.idle_timeout));
            }
        }
        next
    }

    /// Where the line's silence counts from: the last activity, or while the caller is
    /// speaking, no earlier than [`SPEECH_IDLE_LIMIT`] after their speech started (their
    /// speech is activity, up to that bound).
    fn idle_since(&self) -> Option<Millis> {
        let c = &self.control;
        let last = c.last_activity?;
        Some(match c.caller_speaking {
            Some(since) => last.max(since + SPEECH_IDLE_LIMIT),
            None => last,
        })
    }

    /// Idle time counts only while nobody (agent or a tool) has the floor; a caller who is
    /// speaking holds it off too (see `idle_since`).
    fn line_can_idle(&self) -> bool {
        self.upstream == Upstream::Ready
            && self.stream.is_some()
            && !self.response_active
            && !self.control.awaiting_created
            && self.control.pending_tools.is_empty()
            && self.control.ending.is_none()
    }

    pub(super) fn on_control_timer(&mut self, now: Millis) {
        if self.control.retry_at.is_some_and(|t| now >= t) {
            self.control.retry_at = None;
            self.control.greet_again = std::mem::take(&mut self.control.retry_greeting);
            self.log(
                Level::Warn,
                "control.response_asked_again",
                json!({ "greeting": self.control.greet_again }),
            );
            self.request_response();
        }
        if self.control.turn_hold.is_some_and(|t| now >= t) {
            self.control.turn_hold = None;
            if self.control.wanted {
                // No response of the server's own came of the caller's words.
                self.log(Level::Info, "control.held_response_released", Value::Null);
                self.flush_response();
            }
        }
        if let Some(e) = &self.control.ending {
            if e.deadline.is_some_and(|d| now >= d) {
                if !matches!(e.phase, Phase::Retrying { .. }) {
                    self.log(
                        Level::Warn,
                        "control.ending_timeout",
                        json!({ "phase": format!("{:?}", e.phase) }),
                    );
                }
                self.perform_finish(now);
            }
            return;
        }
        if let Some(end) = self.control.call_deadline {
            if now >= end {
                self.log(Level::Info, "control.max_duration", Value::Null);
                self.event(
                    now,
                    EventKind::MaxDuration,
                    json!({ "max_call_seconds": self.agent.max_call_seconds }),
                );
                self.start_ending(
                    Finish::Hangup {
                        why: "max_duration".into(),
                    },
                    Phase::Draining,
                    false,
                    None,
                    now,
                );
                self.check_drained(now);
                return;
            }
            if !self.control.wrap_up_sent && now >= end.saturating_sub(self.wrap_up_before()) {
                self.control.wrap_up_sent = true;
                self.event(now, EventKind::WrapUp, Value::Null);
                // Not ready yet (still connecting, or reconnecting): said once it is.
                self.control.wrap_up_unsaid = true;
                self.say_wrap_up();
            }
        }
        let idle_due = self
            .idle_since()
            .is_some_and(|t| now >= t + self.control.idle_timeout);
        if self.line_can_idle() && idle_due {
            if !self.control.checked_in {
                self.control.checked_in = true;
                self.control.last_activity = Some(now);
                self.event(now, EventKind::IdleCheckIn, Value::Null);
                self.tell_model(self.notes().check_in);
                self.request_response();
            } else {
                self.event(now, EventKind::IdleHangup, Value::Null);
                self.start_ending(
                    Finish::Hangup { why: "idle".into() },
                    Phase::Goodbye {
                        requested: false,
                        response: None,
                    },
                    true,
                    Some(self.notes().idle_goodbye),
                    now,
                );
                self.tell_model(self.notes().idle_goodbye);
                self.request_response();
            }
        }
    }

    // ---- responses ----

    /// Asks for a response as soon as the model is free: never while one is active or
    /// while a tool is still running (`conversation_already_has_active_response`), nor
    /// while the caller is speaking (it would talk over them, and their turn would get a
    /// second answer: the server's own, once it ends, answers what was asked for too). What
    /// the model should say comes before, as a message in the conversation.
    pub(super) fn request_response(&mut self) {
        self.control.wanted = true;
        self.flush_response();
    }

    fn flush_response(&mut self) {
        let c = &self.control;
        if !c.wanted
            || self.response_active
            || c.awaiting_created
            || !c.pending_tools.is_empty()
            || c.turn_hold.is_some()
            || self.upstream != Upstream::Ready
        {
            return;
        }
        if self.ending_needs_no_agent() {
            // The goodbye has been said, the time limit's end has come, or the call is
            // being hung up or put through: the agent says nothing more (a tool's late
            // answer, say, would have it talk past the limit or over the transfer).
            self.control.wanted = false;
            return;
        }
        self.control.wanted = false;
        // Whatever a failed response was to be asked again for, this one is it.
        self.control.retry_at = None;
        self.control.retry_greeting = false;
        if std::mem::take(&mut self.control.greet_again) {
            // The greeting failed: asked again as it was first asked.
            self.greeting_sent();
            self.send_openai(openai::greeting_response(&self.agent));
        } else {
            self.send_openai(openai::response_create());
            self.control.awaiting_created = true;
            self.control.reply_owed = true;
            self.control.awaiting_greeting = false;
        }
        if let Some(Ending {
            phase: Phase::Goodbye { requested, .. },
            ..
        }) = &mut self.control.ending
        {
            *requested = true;
        }
    }

    /// The greeting is a response like any other for the gate.
    pub(super) fn greeting_sent(&mut self) {
        self.control.awaiting_created = true;
        self.control.awaiting_greeting = true;
        self.control.greeting_unheard = true;
        self.control.reply_owed = true;
    }

    /// The caller started speaking: the server cancels a response under way
    /// (`interrupt_response`) and answers their turn once it ends.
    pub(super) fn caller_turn_started(&mut self, now: Millis) {
        if self.response_active && self.control.response.is_some() {
            self.control.interrupted = self.control.response.clone();
        }
        if self.control.reply_owed {
            // The server cancels what was to answer the caller, or under way. Their words
            // are answered by the server's own response once their turn ends; a response
            // is held over it in case none comes (a cough, a noise too short to be a turn):
            // the agent is not left silent, and goes on from where it was cut.
            self.control.wanted = true;
        }
        self.control.reply_owed = false;
        self.control.caller_speaking = Some(now);
        self.control.turn_uncommitted = true;
        self.control.turn_hold = Some(now + SPEECH_HOLD_LIMIT);
    }

    /// The server heard the caller stop: its response to their turn is to come.
    pub(super) fn caller_turn_stopped(&mut self, now: Millis) {
        self.control.caller_speaking = None;
        self.control.turn_hold = Some(now + self.turn_response_wait());
    }

    /// The caller's turn is in the conversation: the server answers it (`create_response`),
    /// and its transcript is to come.
    pub(super) fn caller_turn_committed(&mut self, item_id: Option<&str>, now: Millis) {
        self.control.reply_owed = true;
        self.control.caller_speaking = None;
        self.control.turn_uncommitted = false;
        self.control.untranscribed = item_id.map(str::to_owned);
        self.control.turn_hold = Some(now + self.turn_response_wait());
    }

    /// How long after the caller stops the server's own response to their turn may take.
    fn turn_response_wait(&self) -> Millis {
        if self.agent.turn_detection.kind == "semantic_vad" {
            SEMANTIC_TURN_RESPONSE_WAIT
        } else {
            TURN_RESPONSE_WAIT
        }
    }

    /// What the record says for a caller's turn whose transcription failed.
    pub(super) fn untranscribed_turn_text(&self) -> &'static str {
        self.notes().untranscribed_turn
    }

    /// The caller's last turn, committed and its transcription still to come.
    pub(super) fn control_untranscribed(&self) -> Option<&str> {
        self.control.untranscribed.as_deref()
    }

    /// The caller's speech started and is not yet a committed turn.
    pub(super) fn control_turn_uncommitted(&self) -> bool {
        self.control.turn_uncommitted
    }

    /// The commit asked for at the hang-up was refused (the buffer was empty: the server
    /// had committed the turn itself): no turn is to come of it.
    pub(super) fn final_commit_refused(&mut self) {
        self.control.turn_uncommitted = false;
    }

    /// The transcription of a caller's turn came: a new session is seeded with it. (One that
    /// failed leaves the words out of the seed all the same.)
    pub(super) fn caller_turn_transcribed(&mut self, item_id: Option<&str>) {
        if self.control.untranscribed.as_deref() == item_id {
            self.control.untranscribed = None;
        }
    }

    pub(super) fn on_response_created(&mut self, response_id: Option<&str>, now: Millis) {
        if self.control.awaiting_created && self.control.awaiting_greeting {
            self.control.greeting_response = response_id.map(str::to_owned);
        }
        // The server's own answer to the caller's turn (not one we asked for).
        let answers_turn =
            !self.control.awaiting_created && self.control.turn_hold.take().is_some();
        let unseen = self.unconfirmed_items(now);
        // A response under way: a failed one is not asked for again besides.
        self.control.retry_at = None;
        self.control.retry_greeting = false;
        self.control.awaiting_created = false;
        self.control.reply_owed = true;
        if answers_turn {
            // Their turn has ended. One of ours (a held response let out over speech that
            // goes on past SPEECH_HOLD_LIMIT) says nothing of that: the caller may still be
            // speaking, which keeps the line from going idle.
            self.control.caller_speaking = None;
            self.control.turn_uncommitted = false;
        }
        self.control.response = response_id.map(str::to_owned);
        self.control.response_spoke = false;
        if let (Some(id), true) = (response_id, self.ending_needs_no_agent()) {
            // The server answering the caller's words over the goodbye, or a response asked
            // for just before the time limit's end: the call ends as planned.
            self.log(
                Level::Info,
                "control.response_after_goodbye_cancelled",
                json!({ "response_id": id }),
            );
            self.send_openai(openai::response_cancel(id));
            self.control.silenced = Some(id.to_owned());
            return;
        }
        if answers_turn && self.control.wanted && unseen > 0 {
            // Created before the server had what the held response is for (a tool's output
            // sent as the caller's turn ended): that goes out once this one is done.
            self.log(
                Level::Info,
                "control.held_response_follows",
                json!({ "response_id": response_id, "unseen_items": unseen }),
            );
        } else if answers_turn && self.control.wanted {
            // It sees everything added to the conversation while the caller spoke (a tool's
            // output, a note, a key pressed): it is the response that was held, not one more.
            self.log(
                Level::Debug,
                "control.held_response_taken_by_server",
                json!({ "response_id": response_id }),
            );
            self.control.wanted = false;
            self.control.greet_again = false;
            if let Some(Ending {
                phase: Phase::Goodbye { requested, .. },
                ..
            }) = &mut self.control.ending
            {
                *requested = true;
            }
        }
        if let Some(Ending {
            phase:
                Phase::Goodbye {
                    requested: true,
                    response,
                },
            ..
        }) = &mut self.control.ending
        {
            if response.is_none() {
                *response = response_id.map(str::to_owned);
            }
        }
    }

    /// Agent audio of the response in progress arrived.
    pub(super) fn response_spoke(&mut self) {
        self.control.response_spoke = true;
    }

    pub(super) fn on_response_done(&mut self, r: &openai::ResponseInfo, now: Millis) {
        let response_id = r.id.as_deref();
        let owed = self.control.reply_owed;
        let greeting =
            response_id.is_some() && self.control.greeting_response.as_deref() == response_id;
        let spoke = self.control.response_spoke;
        let failed = r.status.as_deref() == Some("failed") && !self.silenced(response_id);
        self.busy(now);
        self.control.response = None;
        self.control.response_spoke = false;
        if response_id.is_some() && self.control.interrupted.as_deref() == response_id {
            // Its calls have all been reported (they come before its `response.done`).
            self.control.interrupted = None;
        }
        self.control.greeting_unheard = false;
        self.control.reply_owed = false;
        if greeting {
            self.control.greeting_response = None;
        }
        match r.status.as_deref() {
            Some("completed") => {
                self.control.failed_responses = 0;
                // Answered: the model has its own answer to go on, even were the question lost.
                self.control.untranscribed = None;
            }
            Some("incomplete") => {
                self.control.untranscribed = None;
                // Cut short by a limit of its own (max_output_tokens, content_filter): the
                // service works, so the call goes on; the record shows what happened.
                self.event(
                    now,
                    EventKind::ResponseIncomplete,
                    json!({ "response_id": response_id, "reason": r.status_reason }),
                );
            }
            _ => {}
        }
        if failed && self.response_failed(r, owed, greeting, spoke, now) {
            return;
        }
        let goodbye_done = matches!(
            &self.control.ending,
            Some(Ending { phase: Phase::Goodbye { response: Some(id), .. }, .. })
                if Some(id.as_str()) == response_id
        );
        if goodbye_done {
            let e = self.control.ending.as_mut().expect("matched");
            e.phase = Phase::Draining;
            e.deadline = Some(now + DRAIN_TIMEOUT);
            self.check_drained(now);
        }
        self.flush_response();
    }

    /// A response failed (`status: failed`). For a passing reason (a server error), one the
    /// caller is owed (the greeting, an answer, a check-in, the goodbye) is asked for again
    /// once, shortly. Out of quota or rate-limited, or failing again, the agent cannot
    /// speak: rather than leave the caller in silence, the call is handed to the fallback
    /// as when the session is lost for good; or, when it is already ending (the goodbye or
    /// the transfer notice failed), it ends at once without those words. Either way its
    /// record says it failed, and why. True when the call is being handed over or ended.
    fn response_failed(
        &mut self,
        r: &openai::ResponseInfo,
        owed: bool,
        greeting: bool,
        spoke: bool,
        now: Millis,
    ) -> bool {
        let error = r.status_error.clone().unwrap_or_default();
        self.control.failed_responses += 1;
        let in_a_row = self.control.failed_responses;
        let for_good = error.is_out_of_quota() || in_a_row >= MAX_FAILED_RESPONSES;
        let is_goodbye = matches!(
            &self.control.ending,
            Some(Ending { phase: Phase::Goodbye { response: Some(id), .. }, .. })
                if r.id.as_deref() == Some(id.as_str())
        );
        // A goodbye heard in part stands as said, as when its session is lost.
        let ask_again = !for_good && (owed || greeting || is_goodbye) && !(is_goodbye && spoke);
        let then = match (for_good, self.control.ending.is_some()) {
            (true, false) => "fallback",
            (true, true) => "end_as_planned",
            (false, _) if ask_again => "ask_again",
            (false, _) => "none",
        };
        let detail = json!({
            "response_id": r.id, "type": error.kind, "code": error.code, "message": error.message,
            "failed_in_a_row": in_a_row, "then": then,
        });
        self.log(
            if for_good { Level::Error } else { Level::Warn },
            "control.response_failed",
            detail.clone(),
        );
        self.event(now, EventKind::ResponseFailed, detail);
        if !for_good {
            if ask_again {
                self.control.retry_at = Some(now + RESPONSE_RETRY_DELAY);
                self.control.retry_greeting = greeting;
                if let (true, Some(e)) = (is_goodbye, &mut self.control.ending) {
                    // The response asked for again is the goodbye.
                    e.phase = Phase::Goodbye {
                        requested: false,
                        response: None,
                    };
                }
            }
            return false;
        }
        let failure = EndReason::ResponseFailed {
            error: error.text(),
        };
        self.control.agent_failure = Some(failure.clone());
        self.control.retry_at = None;
        self.control.wanted = false;
        if self.control.ending.is_some() {
            // The goodbye (or the transfer notice), if still to be said, will not be: the
            // call ends without it.
            if self.ending_goes_ahead_unsaid(&failure, now) {
                self.check_drained(now);
            }
            return true;
        }
        self.fail(failure, now);
        true
    }

    /// The end reason to record: a call that ended as planned after the agent's responses
    /// failed for good ended for that failure.
    pub(super) fn with_agent_failure(&self, reason: EndReason) -> EndReason {
        match &self.control.agent_failure {
            Some(failure) if !reason.is_failure() => {
                let then = match reason.detail_text() {
                    Some(d) => format!("{}: {d}", reason.label()),
                    None => reason.label().to_owned(),
                };
                EndReason::FailedWhileEnding {
                    cause: Box::new(failure.clone()),
                    then,
                }
            }
            _ => reason,
        }
    }

    /// Our `response.create` met an active response: ask again when it is done (but for
    /// the greeting: the response already there answers the caller).
    pub(super) fn on_response_refused(&mut self) {
        self.control.awaiting_created = false;
        if std::mem::take(&mut self.control.awaiting_greeting) {
            self.control.greeting_unheard = false;
        } else {
            self.control.wanted = true;
        }
    }

    /// Our `response.create` was refused for another reason (an `error` naming it): asking
    /// again would be refused again. The gate opens for what comes next, and a goodbye that
    /// will not be said no longer holds up the end of the call.
    pub(super) fn on_response_failed(&mut self, now: Millis) {
        self.control.awaiting_created = false;
        self.control.greeting_unheard = false;
        self.control.reply_owed = false;
        if let Some(e) = &mut self.control.ending {
            if matches!(
                e.phase,
                Phase::Goodbye {
                    requested: true,
                    response: None
                }
            ) {
                e.phase = Phase::Draining;
                e.deadline = Some(now + DRAIN_TIMEOUT);
                self.check_drained(now);
            }
        }
        self.flush_response();
    }

    /// Twilio confirmed some agent audio played.
    pub(super) fn on_played(&mut self, now: Millis) {
        self.check_drained(now);
    }

    // ---- tools ----

    pub(super) fn on_function_call(
        &mut self,
        response_id: Option<&str>,
        call_id: String,
        name: String,
        arguments: String,
        now: Millis,
    ) {
        if self.silenced(response_id) {
            // Called by the response cancelled over the goodbye (or past the time limit's
            // end): nothing of it was played, so nobody heard, let alone confirmed, what it
            // would do. Not run (a webhook would act on it) and not answered (nothing more
            // is asked of the agent now).
            return self.drop_input(
                "function_call_after_goodbye",
                json!({ "name": name, "call_id": call_id }),
            );
        }
        if self.talked_over(response_id) {
            return self.tool_not_run(call_id, name, arguments, now);
        }
        self.busy(now);
        let args: Result<Value, _> = if arguments.trim().is_empty() {
            Ok(json!({}))
        } else {
            serde_json::from_str(&arguments)
        };
        let Ok(args) = args else {
            let output = json!({ "error": "arguments are not valid JSON" }).to_string();
            return self.tool_done(
                ToolResult {
                    call_id: &call_id,
                    name: &name,
                    arguments: json!(arguments),
                    ok: false,
                    output: &output,
                    took: Millis(0),
                },
                now,
            );
        };
        self.log(
            Level::Info,
            "tool.call",
            json!({ "name": name, "call_id": call_id }),
        );
        match tools::resolve(&self.agent.tools, &name) {
            None => {
                let output = json!({ "error": format!("no tool named {name}") }).to_string();
                self.tool_done(
                    ToolResult {
                        call_id: &call_id,
                        name: &name,
                        arguments: args,
                        ok: false,
                        output: &output,
                        took: Millis(0),
                    },
                    now,
                );
            }
            Some(Tool::EndCall) => {
                let why = args["reason"].as_str().unwrap_or("end_call").to_owned();
                let instruction =
                    "Say a brief, polite goodbye now. The call ends when you finish speaking.";
                self.finish_with_words(
                    Finish::Hangup { why },
                    instruction,
                    &call_id,
                    &name,
                    args,
                    now,
                );
            }
            Some(Tool::TransferCall) => match self.agent.transfer_number.clone() {
                None => {
                    let output = json!({
                        "ok": false,
                        "error": "No transfer number is configured; offer to take a message instead.",
                    })
                    .to_string();
                    self.tool_done(
                        ToolResult {
                            call_id: &call_id,
                            name: &name,
                            arguments: args,
                            ok: false,
                            output: &output,
                            took: Millis(0),
                        },
                        now,
                    );
                }
                Some(to) => {
                    let instruction = "Tell the caller in one short sentence that you are transferring them to a staff member now.";
                    self.finish_with_words(
                        Finish::Transfer { to },
                        instruction,
                        &call_id,
                        &name,
                        args,
                        now,
                    );
                }
            },
            Some(Tool::Webhook {
                name: tool_name,
                url,
                timeout_ms,
            }) => {
                let secret = self.agent.tool_secret.as_ref().map(|s| s.expose());
                let request = tools::webhook_request(
                    &tools::WebhookCall {
                        url: &url,
                        timeout_ms,
                        tool: &tool_name,
                        arguments: &args,
                        call_id: &call_id,
                        sent_at_ms: now.0,
                    },
                    &self.context,
                    secret,
                );
                let id = self.next_http_id();
                self.control.pending_tools.insert(
                    id,
                    PendingTool {
                        call_id,
                        name: tool_name,
                        arguments: args,
                        started: now,
                        timeout_ms,
                        session_lost: false,
                    },
                );
                self.actions.push_back(Action::Http { id, request });
            }
        }
    }

    /// A function call of a response the caller talked over, reported after they started
    /// speaking, with its arguments as far as they got (often none). The caller did not let
    /// the agent finish, so what it was about to do is not done: no hang-up or transfer on
    /// a caller mid-sentence, no webhook acting on it. The call is answered all the same,
    /// so that the conversation holds no call without an output, and a response is asked
    /// for as for any tool's result: held while the caller speaks, it is the server's own
    /// answer to their turn; when none comes (noise the server never commits or answers),
    /// it goes out once the wait for one is over, rather than leave the line silent. The
    /// model can call the tool again.
    fn tool_not_run(&mut self, call_id: String, name: String, arguments: String, now: Millis) {
        *self
            .stats
            .dropped
            .entry("function_call_interrupted")
            .or_default() += 1;
        self.log(
            Level::Info,
            "tool.not_run",
            json!({ "name": name, "call_id": call_id, "why": "caller_interrupted" }),
        );
        let output = json!({
            "ok": false,
            "error": "Not run: the caller started speaking before this call was complete. Listen to the caller; call the tool again if it is still wanted.",
        })
        .to_string();
        if self.upstream == Upstream::Ready && !self.ending_needs_no_agent() {
            self.add_item(|id| openai::function_call_output(&call_id, &output, Some(id)));
        }
        let arguments = serde_json::from_str(&arguments).unwrap_or(Value::String(arguments));
        let r = ToolResult {
            call_id: &call_id,
            name: &name,
            arguments,
            ok: false,
            output: &output,
            took: Millis(0),
        };
        self.tool_event(&r, false, now);
        self.request_response();
    }

    /// A built-in tool that ends the call: the agent says its piece (goodbye, or the
    /// transfer notice), then the call is hung up or transferred once that has played.
    /// Said once: when the response that called the tool has already spoken (the tools'
    /// descriptions ask for the goodbye first), its audio is the piece; otherwise the tool
    /// output asks for it (`instruction`) and the response that follows is the piece. The
    /// ending is set before the tool output, so that response is recognised as it.
    fn finish_with_words(
        &mut self,
        finish: Finish,
        instruction: &str,
        call_id: &str,
        name: &str,
        args: Value,
        now: Millis,
    ) {
        let spoken = self.response_active && self.control.response_spoke;
        if let Some(e) = &self.control.ending {
            let other_kind = std::mem::discriminant(&e.finish) != std::mem::discriminant(&finish);
            if other_kind && !matches!(e.phase, Phase::Goodbye { .. }) {
                // Its words said (or Twilio asked): the call goes as it was going.
                let what = match &e.finish {
                    Finish::Hangup { .. } => "hung up",
                    Finish::Transfer { .. } => "transferred",
                };
                let output = json!({
                    "ok": false,
                    "error": format!("Not done: the call is already being {what}."),
                })
                .to_string();
                let result = ToolResult {
                    call_id,
                    name,
                    arguments: args,
                    ok: false,
                    output: &output,
                    took: Millis(0),
                };
                return self.tool_output(result, now);
            }
        }
        if let Some(e) = &mut self.control.ending {
            // Already ending (the idle goodbye, say), and the response meant to say its words
            // calls the tool instead, saying nothing: asked for them below, the words are
            // the next response's, not left unsaid when this one is done.
            let meant = matches!(&e.phase, Phase::Goodbye { response, .. }
                if response.is_none() || *response == self.control.response);
            if !spoken && meant {
                e.phase = Phase::Goodbye {
                    requested: false,
                    response: None,
                };
            }
        }
        let phase = Phase::Goodbye {
            requested: spoken,
            response: if spoken {
                self.control.response.clone()
            } else {
                None
            },
        };
        let ask = match finish {
            Finish::Hangup { .. } => self.notes().say_goodbye,
            Finish::Transfer { .. } => self.notes().announce_transfer,
        };
        match &mut self.control.ending {
            // The other way of ending, asked for before its words were said (a transfer
            // the caller asks for as the idle goodbye starts, say): the agent's latest
            // word is what happens, and its words are the ones to say.
            Some(e) if std::mem::discriminant(&e.finish) != std::mem::discriminant(&finish) => {
                let from = format!("{:?}", e.finish);
                e.finish = finish;
                e.phase = phase;
                e.ask = Some(ask);
                if e.caller_can_stop {
                    e.deadline = Some(now + GOODBYE_TIMEOUT);
                }
                let to = format!("{:?}", e.finish);
                self.log(
                    Level::Info,
                    "control.ending_changed",
                    json!({ "from": from, "to": to }),
                );
            }
            _ => self.start_ending(finish, phase, true, Some(ask), now),
        }
        let output = if spoken {
            json!({ "ok": true, "instruction": "Done. Say nothing more: the call continues as announced once what you said has played." })
        } else {
            json!({ "ok": true, "instruction": instruction })
        }
        .to_string();
        let result = ToolResult {
            call_id,
            name,
            arguments: args,
            ok: true,
            output: &output,
            took: Millis(0),
        };
        if spoken {
            self.tool_output(result, now);
        } else {
            self.tool_done(result, now);
        }
    }

    pub(super) fn next_http_id(&mut self) -> u64 {
        let id = self.control.next_http;
        self.control.next_http += 1;
        id
    }

    /// Gives the model a tool's result, records it, and asks for the model's answer.
    fn tool_done(&mut self, r: ToolResult<'_>, now: Millis) {
        self.tool_output(r, now);
        self.request_response();
    }

    /// Gives the model a tool's result and records it.
    fn tool_output(&mut self, r: ToolResult<'_>, now: Millis) {
        if self.upstream == Upstream::Ready && !self.ending_needs_no_agent() {
            // (Once nothing more is wanted of the agent, the result is only recorded.)
            self.add_item(|id| openai::function_call_output(r.call_id, r.output, Some(id)));
            if self.control.ending.is_none() {
                // (An ending's own tools: what they ask is told again by the ending.)
                let note = self.tool_result_note(&r);
                self.remember_tool_result(note);
            }
        }
        self.tool_event(&r, false, now);
    }

    /// A tool's result as a note: for a session that has no function call to give it to.
    fn tool_result_note(&self, r: &ToolResult<'_>) -> String {
        let shown: String = r.output.chars().take(4000).collect();
        if std::ptr::eq(self.notes(), &JAPANESE) {
            format!(
                "この通話で先に呼び出したツール「{}」の結果です: {shown}",
                r.name
            )
        } else {
            format!(
                "The result of the tool \"{}\", called earlier in this call: {shown}",
                r.name
            )
        }
    }

    /// Keeps a tool's result, in the conversation's order, for any later session.
    fn remember_tool_result(&mut self, note: String) {
        let seq = self.conversation.place();
        let kept = &mut self.control.tool_results;
        kept.insert(seq, note);
        while kept.len() > MAX_SEEDED_TOOL_RESULTS {
            kept.pop_first();
        }
    }

    fn tool_event(&mut self, r: &ToolResult<'_>, session_lost: bool, now: Millis) {
        let detail = Self::tool_detail(r, session_lost);
        self.event(now, EventKind::ToolCall, detail);
    }

    fn tool_detail(r: &ToolResult<'_>, session_lost: bool) -> Value {
        let shown: String = r.output.chars().take(2000).collect();
        let mut detail = json!({
            "name": r.name, "call_id": r.call_id, "arguments": r.arguments, "ok": r.ok,
            "output": shown, "duration_ms": r.took.0,
        });
        if session_lost {
            detail["after_reconnect"] = json!(true);
        }
        detail
    }

    /// The call is ending with webhook tools still running: their answers will find no
    /// call. Each is recorded now, with what it was asked, since the webhook may well have
    /// acted (a booking made) although nobody heard the outcome.
    pub(super) fn tools_unanswered(&mut self, now: Millis) {
        let output = json!({ "error": "the call ended before the tool answered" }).to_string();
        for tool in std::mem::take(&mut self.control.pending_tools).into_values() {
            let took = now.saturating_sub(tool.started);
            self.log(
                Level::Warn,
                "tool.unanswered",
                json!({ "name": tool.name, "call_id": tool.call_id, "waited_ms": took.0 }),
            );
            let r = ToolResult {
                call_id: &tool.call_id,
                name: &tool.name,
                arguments: tool.arguments.clone(),
                ok: false,
                output: &output,
                took,
            };
            let mut detail = Self::tool_detail(&r, tool.session_lost);
            detail["answered"] = json!(false);
            self.event(now, EventKind::ToolCall, detail);
        }
    }

    /// A tool called in a session since lost has answered: the new session has no function
    /// call to give the output to, so the result goes in as a note (at once, or in the seed
    /// of the session being set up), and the model answers the caller with it instead of
    /// leaving them waiting.
    fn tool_done_after_reconnect(&mut self, r: ToolResult<'_>, now: Millis) {
        self.tool_event(&r, true, now);
        if self.ending_needs_no_agent() {
            return;
        }
        let note = self.tool_result_note(&r);
        if self.upstream == Upstream::Ready {
            self.tell_model(&note);
        }
        self.remember_tool_result(note);
        self.request_response();
    }

    pub(super) fn on_http_done(&mut self, id: u64, outcome: &http::Outcome, now: Millis) {
        if let Some(tool) = self.control.pending_tools.remove(&id) {
            let (ok, output) = tools::webhook_output(outcome, tool.timeout_ms);
            let took = now.saturating_sub(tool.started);
            self.log(
                if ok { Level::Info } else { Level::Warn },
                "tool.done",
                json!({ "name": tool.name, "ok": ok, "duration_ms": took.0 }),
            );
            self.busy(now);
            let result = ToolResult {
                call_id: &tool.call_id,
                name: &tool.name,
                arguments: tool.arguments,
                ok,
                output: &output,
                took,
            };
            if tool.session_lost {
                return self.tool_done_after_reconnect(result, now);
            }
            return self.tool_done(result, now);
        }
        let is_finish = matches!(
            &self.control.ending,
            Some(Ending { phase: Phase::Requested { id: r }, .. }) if *r == id
        );
        if !is_finish {
            // A result for a session we have since replaced, or already given up on.
            return;
        }
        let ending = self.control.ending.clone().expect("matched");
        let ok = matches!(outcome, http::Outcome::Response { status, .. } if (200..300).contains(status));
        let passing = match outcome {
            http::Outcome::Response { status, .. } => *status == 429 || *status >= 500,
            http::Outcome::Failed { .. } => true,
        };
        let (kind, reason) = Self::finish_reason(&ending.finish);
        let status = match outcome {
            http::Outcome::Response { status, .. } => json!(status),
            http::Outcome::Failed { reason } => json!(reason),
        };
        let retry_in = FINISH_RETRY_DELAYS.get(ending.attempts as usize - 1);
        if let (false, true, Some(&delay)) = (ok, passing, retry_in) {
            self.log(
                Level::Warn,
                "control.twilio_rest_retry",
                json!({ "kind": kind, "outcome": status, "attempt": ending.attempts, "delay_ms": delay.0 }),
            );
            let e = self.control.ending.as_mut().expect("matched");
            e.phase = Phase::Retrying {
                refused: matches!(outcome, http::Outcome::Response { .. }),
            };
            e.deadline = Some(now + delay);
            return;
        }
        self.event(
            now,
            kind,
            json!({ "ok": ok, "twilio": status, "reason": reason.detail(), "attempts": ending.attempts }),
        );
        if ok {
            // Twilio now sends `stop`; the call ends with this reason then.
            self.control.finished = Some(reason);
        } else {
            self.log(
                Level::Error,
                "control.twilio_rest_failed",
                json!({ "kind": kind, "outcome": status }),
            );
            // Closing the stream makes Twilio run the TwiML after </Connect>: the apology
            // and, when configured, the fallback number.
            self.end(
                EndReason::CallControlFailed {
                    what: format!("{kind} refused by Twilio: {status}"),
                },
                now,
            );
        }
    }

    // ---- DTMF ----

    pub(super) fn on_dtmf(&mut self, digit: &str, now: Millis) {
        let digit: String = digit.chars().take(4).collect();
        self.log(Level::Info, "twilio.dtmf", json!({ "digit": digit }));
        self.event(now, EventKind::Dtmf, json!({ "digit": digit }));
        self.activity(now);
        let text = self.dtmf_note(&digit);
        // Kept in the conversation's order: a session not ready yet (the first, or one
        // replacing a lost one) is seeded with it, and so is any later one.
        let seq = self.conversation.place();
        self.remember_transcript(seq, Role::Caller, &text);
        if self.upstream == Upstream::Ready {
            self.add_item(|id| openai::text_item("user", &text, Some(id)));
        }
        self.request_response();
    }

    // ---- ending ----

    fn start_ending(
        &mut self,
        finish: Finish,
        phase: Phase,
        caller_can_stop: bool,
        ask: Option<&'static str>,
        now: Millis,
    ) {
        if self.control.ending.is_some() {
            return;
        }
        let deadline = match phase {
            Phase::Goodbye { .. } => now + GOODBYE_TIMEOUT,
            _ => now + DRAIN_TIMEOUT,
        };
        self.log(
            Level::Info,
            "control.ending",
            json!({ "finish": format!("{finish:?}") }),
        );
        self.control.ending = Some(Ending {
            finish,
            phase,
            deadline: Some(deadline),
            caller_can_stop,
            attempts: 0,
            ask,
        });
    }

    /// The agent's goodbye (or transfer notice) has been said in full and the call ends once
    /// it has played, or Twilio has already been asked to end it.
    fn goodbye_said(&self) -> bool {
        self.control
            .ending
            .as_ref()
            .is_some_and(|e| e.phase.asked() || (e.caller_can_stop && e.phase == Phase::Draining))
    }

    /// The response the caller started speaking over while it was under way: the server
    /// cancels it (`interrupt_response`), and nothing more of it is for the caller.
    pub(super) fn talked_over(&self, response_id: Option<&str>) -> bool {
        response_id.is_some() && self.control.interrupted.as_deref() == response_id
    }

    /// Audio of a response cancelled because nothing more was wanted of the agent (the
    /// goodbye said, the time limit's end come): not played.
    pub(super) fn silenced(&self, response_id: Option<&str>) -> bool {
        self.control.silenced.is_some() && self.control.silenced.as_deref() == response_id
    }

    /// The caller started speaking; true when the agent's words go on playing regardless.
    ///
    /// While the agent is still saying goodbye (or announcing a transfer), the caller is
    /// there and wants to go on: the ending is called off before it reaches Twilio, and the
    /// model is told, so that it listens and can end or transfer again when that is still
    /// wanted. Once the goodbye has been said in full, words over it ("はい、ありがとう
    /// ございました", as callers do) do not cut it: it plays out and the call ends.
    pub(super) fn caller_spoke(&mut self, now: Millis) -> bool {
        if self.goodbye_said() {
            self.log(
                Level::Info,
                "control.caller_spoke_over_goodbye",
                Value::Null,
            );
            return true;
        }
        let Some(e) = &self.control.ending else {
            return false;
        };
        if !e.caller_can_stop {
            return false;
        }
        let e = self.control.ending.take().expect("checked");
        if matches!(
            e.phase,
            Phase::Goodbye {
                requested: false,
                ..
            }
        ) {
            // The goodbye asked for and not yet started is no longer wanted.
            self.control.wanted = false;
        }
        let (kind, note) = match e.finish {
            Finish::Hangup { .. } => ("hangup", self.notes().not_ended),
            Finish::Transfer { .. } => ("transfer", self.notes().not_transferred),
        };
        self.log(
            Level::Info,
            "control.ending_called_off",
            json!({ "finish": kind, "phase": format!("{:?}", e.phase) }),
        );
        self.event(
            now,
            EventKind::EndingCalledOff,
            json!({ "finish": kind, "why": "the caller spoke" }),
        );
        self.tell_model(note);
        false
    }

    pub(super) fn check_drained(&mut self, now: Millis) {
        let draining = matches!(
            self.control.ending,
            Some(Ending {
                phase: Phase::Draining,
                ..
            })
        );
        if draining && !self.playback.outstanding() {
            self.perform_finish(now);
        }
    }

    /// Hangs up or redirects the call through Twilio REST.
    fn perform_finish(&mut self, _now: Millis) {
        if self.failing() {
            // The caller is already on the way to the fallback.
            return;
        }
        let Some(ending) = self.control.ending.clone() else {
            return;
        };
        if matches!(ending.phase, Phase::Requested { .. }) {
            return;
        }
        let account_sid = self.context.account_sid.clone();
        let request = match &ending.finish {
            Finish::Hangup { .. } => twilio::update_call(
                &self.twilio_rest,
                &account_sid,
                &self.context.call_sid,
                &[("Status", "completed")],
            ),
            Finish::Transfer { to } => {
                let twiml = twiml::transfer(to, &self.transfer_action);
                twilio::update_call(
                    &self.twilio_rest,
                    &account_sid,
                    &self.context.call_sid,
                    &[("Twiml", &twiml)],
                )
            }
        };
        let id = self.next_http_id();
        let e = self.control.ending.as_mut().expect("cloned above");
        e.phase = Phase::Requested { id };
        e.deadline = None;
        e.attempts += 1;
        self.actions.push_back(Action::Http { id, request });
    }

    // ---- a lost or expired session ----

    /// Opens a new Realtime session after losing one; false when the window has passed, or
    /// when the call's ending needs no session (see `ending_needs_no_agent`).
    pub(super) fn try_reconnect(&mut self, now: Millis, failure: &EndReason) -> bool {
        if self.ended.is_some() || self.failing() {
            return false;
        }
        if self.control.reconnect.is_none() {
            // A goodbye heard in part stands as said: the ending may need no session now.
            self.ending_lost(now);
        }
        if self.ending_needs_no_agent() {
            // Its words are said: a new session would cost one and serve nothing, and its
            // failure must not hand the caller to the fallback (see `fail`).
            return false;
        }
        let why = failure
            .detail_text()
            .unwrap_or_else(|| failure.label().to_owned());
        // Later attempts of the same loss find nothing more under way.
        let lost_now = self.control.reconnect.is_none();
        let r = self.control.reconnect.get_or_insert_with(|| Reconnect {
            cause: failure.clone(),
            started: now,
            attempts: 0,
            connect_at: None,
        });
        let window_end = r.started + RECONNECT_WINDOW;
        if r.attempts >= MAX_RECONNECTS || now >= window_end {
            return false;
        }
        let delay = RECONNECT_DELAYS[r.attempts as usize];
        r.attempts += 1;
        let attempt = r.attempts;
        self.log(
            Level::Warn,
            "openai.reconnecting",
            json!({ "attempt": attempt, "why": why, "delay_ms": delay.0 }),
        );
        self.event(
            now,
            EventKind::Reconnect,
            json!({ "attempt": attempt, "why": why, "delay_ms": delay.0 }),
        );
        self.setup_deadline = Some(window_end.min(now + super::SESSION_SETUP_TIMEOUT));
        // The old session's items, responses and tool calls are gone with it; what it said
        // and Twilio still plays can still be cleared by a barge-in. A reply under way will
        // not get its transcript: what was sent of it is written (it plays out).
        self.write_unfinished_agent_turns(|_, sent| sent, now);
        if let Some(mark) = self.playback.orphan_items() {
            self.send_mark(&mark);
        }
        self.held_output.clear();
        self.held_output_bytes = 0;
        if lost_now {
            self.reply_lost();
            if self.control.caller_speaking.is_none() {
                // A turn the lost session was to answer is the new one's to answer
                // (`reply_lost`); speech under way still holds a response (see below).
                self.control.turn_hold = None;
            }
            self.speech_lost();
        }
        self.response_active = false;
        self.control.awaiting_created = false;
        self.control.response = None;
        self.control.response_spoke = false;
        self.control.interrupted = None;
        // A tool still running answers into the next session (see tool_done_after_reconnect).
        for tool in self.control.pending_tools.values_mut() {
            tool.session_lost = true;
        }
        if delay == Millis(0) {
            self.connect_again();
        } else if let Some(r) = &mut self.control.reconnect {
            // No socket until then.
            self.upstream = Upstream::Closed;
            r.connect_at = Some(now + delay);
        }
        true
    }

    /// The session was lost while the agent was to say its goodbye (or transfer notice).
    /// Heard in part or in full, it stands as said: the call ends once what was sent has
    /// played, and no new session is wanted. Not started, the new session is asked for it
    /// (see `on_session_ready`).
    fn ending_lost(&mut self, now: Millis) {
        let spoke = self.response_active && self.control.response_spoke;
        let current = self.control.response.clone();
        let Some(e) = &mut self.control.ending else {
            return;
        };
        let Phase::Goodbye { response, .. } = &e.phase else {
            // Done, or with Twilio: nothing more to say.
            return;
        };
        if spoke && response.is_some() && *response == current {
            e.phase = Phase::Draining;
            e.deadline = Some(now + DRAIN_TIMEOUT);
            self.check_drained(now);
            return;
        }
        e.phase = Phase::Goodbye {
            requested: false,
            response: None,
        };
        // The new session gets as long as the first one had.
        e.deadline = Some(now + GOODBYE_TIMEOUT);
        self.control.wanted = true;
    }

    /// The agent failed for good (`cause`: its session lost with no new one, its responses
    /// failing) while the goodbye or transfer notice is still to be said (asked for, or
    /// started and nothing of it heard): the hang-up or transfer goes ahead without it once
    /// what was sent has played (see `check_drained`), as when the words do not come in time
    /// (`GOODBYE_TIMEOUT`); the call's record is the failure, then that ending. True when so.
    pub(super) fn ending_goes_ahead_unsaid(&mut self, cause: &EndReason, now: Millis) -> bool {
        let Some(e) = &mut self.control.ending else {
            return false;
        };
        if !matches!(e.phase, Phase::Goodbye { .. }) {
            return false;
        }
        e.phase = Phase::Draining;
        e.deadline = Some(now + DRAIN_TIMEOUT);
        self.control.wanted = false;
        // The caller missed the agent's last words: the call's record says what lost it.
        self.control
            .agent_failure
            .get_or_insert_with(|| cause.clone());
        true
    }

    /// The session was lost owing the caller a response (`reply_owed`): none will come of
    /// it, so the new session is asked once ready. The greeting again if none of it
    /// reached the caller; a reply cut short is taken up where the caller stopped hearing
    /// it; one nothing was heard of is simply asked for again. (An ending has its own way
    /// on.)
    fn reply_lost(&mut self) {
        if !self.control.reply_owed || self.control.ending.is_some() {
            return;
        }
        if self.control.greeting_unheard {
            // `maybe_greet` asks for it once the new session is ready.
            self.greeted = false;
            return;
        }
        let spoken = self.audio_item.as_ref().filter(|id| {
            self.response_active && self.control.response_spoke && !self.playback.is_cut(id)
        });
        if let Some(id) = spoken {
            let note = self.cut_off_note(self.conversation.text(id));
            self.control.late_notes.push(note);
        } else if self.control.untranscribed.take().is_some() {
            // The new session is seeded without the caller's last words: rather than answer
            // what it never heard, the agent asks for them again.
            self.control
                .late_notes
                .push(self.notes().ask_again.to_owned());
        }
        self.control.wanted = true;
    }

    /// The session was lost while the caller was speaking, or once they had stopped and
    /// before their turn was committed: the new one hears only the rest of their words
    /// (held, then sent), if any. The model is told it missed them, so its answer asks for
    /// them rather than guess. A response is held, not sent over the caller: the new
    /// session's answer to the rest of their turn takes it; if it hears no more (they had
    /// finished), it goes out after the turn wait, or at once when they had stopped.
    fn speech_lost(&mut self) {
        let speaking = self.control.caller_speaking.take().is_some();
        if std::mem::take(&mut self.control.turn_uncommitted) || speaking {
            let ask = self.notes().ask_again.to_owned();
            if !self.control.late_notes.contains(&ask) {
                self.control.late_notes.push(ask);
            }
            // Held over the rest of their turn, which the new session answers; should it
            // hear none (they had finished), this goes out, rather than leave them waiting.
            self.control.wanted = true;
        }
    }

    fn connect_again(&mut self) {
        self.upstream = Upstream::Connecting;
        // What the lost session had not confirmed, the new one will not.
        self.control.unconfirmed.clear();
        self.actions.push_back(Action::ConnectOpenAi {
            model: self.agent.model.clone(),
        });
    }

    /// When a delayed reconnect attempt is due.
    pub(super) fn reconnect_due(&self) -> Option<Millis> {
        self.control.reconnect.as_ref().and_then(|r| r.connect_at)
    }

    pub(super) fn on_reconnect_timer(&mut self, now: Millis) {
        let settled = self.ending_needs_no_agent();
        let Some(r) = &mut self.control.reconnect else {
            return;
        };
        if r.connect_at.is_some_and(|t| now >= t) {
            r.connect_at = None;
            if settled {
                // The ending's words were said while this attempt waited (the time limit's
                // end, say): the session is given up on, and the ending goes ahead.
                let cause = r.cause.clone();
                return self.fail(cause, now);
            }
            self.connect_again();
        }
    }

    /// Gives up on replacing the session; returns what lost it in the first place.
    pub(super) fn cancel_reconnect(&mut self) -> Option<EndReason> {
        self.control.reconnect.take().map(|r| r.cause)
    }

    /// The call's ending needs nothing more of the agent: its words have been said (or will
    /// not be) and what was sent is playing out before the hang-up or transfer (`Draining`),
    /// or Twilio has already been asked for it.
    pub(super) fn ending_needs_no_agent(&self) -> bool {
        self.control_asked_twilio()
            || matches!(
                self.control.ending,
                Some(Ending {
                    phase: Phase::Draining,
                    ..
                })
            )
    }

    /// A hang-up or transfer request has gone to Twilio (or already succeeded).
    pub(super) fn control_asked_twilio(&self) -> bool {
        self.control.finished.is_some()
            || self
                .control
                .ending
                .as_ref()
                .is_some_and(|e| e.phase.asked())
    }

    /// `session_expired`: leave the old session at once rather than wait for its close.
    pub(super) fn on_session_expired(&mut self, now: Millis) {
        if !matches!(self.upstream, Upstream::Configuring | Upstream::Ready) {
            // No session is open to expire.
            return;
        }
        self.actions.push_back(Action::CloseOpenAi {
            code: 1000,
            reason: "session expired".into(),
        });
        self.upstream = Upstream::Closed;
        let failure = EndReason::OpenAiClosed {
            code: 1000,
            reason: "session_expired".into(),
        };
        if !self.try_reconnect(now, &failure) {
            self.fail(failure, now);
        }
    }

    /// A session has come up (its `session.updated`) when the call's ending needs nothing
    /// more of the agent (see `ending_needs_no_agent`): a reconnect already on its way when
    /// the time limit's end came, say. It is not used: no seed, no response (the agent
    /// would talk past the end, and the hang-up would wait for it), but closed, and the loss
    /// it was to make up for is logged as one while the call ends. True when so.
    pub(super) fn session_unwanted(&mut self, now: Millis) -> bool {
        if !self.ending_needs_no_agent() {
            return false;
        }
        self.log(
            Level::Info,
            "openai.session_not_used",
            json!({ "why": "the call is ending" }),
        );
        self.upstream = Upstream::Closed;
        self.setup_deadline = None;
        self.actions.push_back(Action::CloseOpenAi {
            code: 1000,
            reason: "the call is ending".into(),
        });
        if let Some(r) = &self.control.reconnect {
            let cause = r.cause.clone();
            // The ending goes ahead as planned (see `fail`).
            self.fail(cause, now);
        }
        true
    }

    /// A session is ready: seed it with the conversation so far (after a reconnect; for
    /// the first session, the keys pressed before it was ready).
    pub(super) fn on_session_ready(&mut self, now: Millis) {
        // The line could not idle without a session: the silence counts from here, not
        // from before a reconnect's gap (a check-in the moment the new one is up).
        self.busy(now);
        let seeded = self.seed_session();
        if let Some(r) = self.control.reconnect.take() {
            for note in std::mem::take(&mut self.control.late_notes) {
                self.tell_model(&note);
            }
            let unsaid = match &self.control.ending {
                Some(Ending {
                    phase:
                        Phase::Goodbye {
                            requested: false, ..
                        },
                    ask,
                    ..
                }) => *ask,
                _ => None,
            };
            if let Some(ask) = unsaid {
                // What to say was in the lost session (a tool output, a note): told again.
                self.tell_model(ask);
            }
            self.event(
                now,
                EventKind::Reconnected,
                // The call's row keeps the first session's id; each new one is named here.
                json!({ "attempts": r.attempts, "gap_ms": now.saturating_sub(r.started).0,
                        "seeded_items": seeded, "session_id": self.session_id }),
            );
            self.log(
                Level::Info,
                "openai.reconnected",
                json!({ "attempts": r.attempts, "gap_ms": now.saturating_sub(r.started).0 }),
            );
        }
        if let Some(t) = self.control.turn_hold {
            // The caller was speaking when the last session was lost: the new one hears the
            // rest of their words at once (held, then sent), and answers their turn; if it
            // hears none, what was held goes out shortly.
            self.control.turn_hold = Some(t.min(now + self.turn_response_wait()));
        }
        self.say_wrap_up();
        self.flush_response();
    }

    /// Sends the conversation remembered so far to the new session, the results of its
    /// tools among them; returns how many items.
    fn seed_session(&mut self) -> usize {
        let c = &self.control;
        let said = c.transcript.iter().map(|(seq, (role, text))| {
            let role = match role {
                Role::Caller => "user",
                Role::Agent => "assistant",
            };
            (*seq, role, text)
        });
        let results = c.tool_results.iter().map(|(seq, n)| (*seq, "system", n));
        let mut items: Vec<(u64, &'static str, &String)> = said.chain(results).collect();
        items.sort_by_key(|(seq, ..)| *seq);
        let items: Vec<(&'static str, String)> = items
            .into_iter()
            .map(|(_, role, text)| (role, text.clone()))
            .collect();
        let seeded = items.len();
        for (role, text) in items {
            if role == "assistant" {
                // Not told from the model's own items when confirmed: not waited for.
                let item = openai::text_item(role, &text, None);
                self.send_openai(item);
            } else {
                self.add_item(|id| openai::text_item(role, &text, Some(id)));
            }
        }
        seeded
    }
}
