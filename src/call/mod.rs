//! The call machine: everything one phone call decides, with no I/O, no clock and no
//! platform types (sans-IO, after quinn-proto and str0m).
//!
//! The shell feeds it what arrived with [`Call::handle`], stamped with the time, then
//! drains [`Call::poll_action`] until it returns `None` and carries each action out, and
//! calls `handle(Input::Timeout, now)` when [`Call::poll_timeout`] comes due. Bad frames
//! from either peer are logged, counted and dropped; they never end the call.

mod control;
mod fallback;
mod playback;
mod record;
mod transcript;

pub use playback::{Cut, Echo, Playback, MARK_EVERY_BYTES, MARK_EVERY_MS};
pub use transcript::{Conversation, Entry};

use crate::audio::{base64_decoded_len, bytes_to_ms};
use crate::config::Agent;
use crate::ids::{CallSid, ItemId, Millis, StreamSid};
use crate::openai::{self, ServerEvent};
use crate::store::{EventKind, Record};
use crate::tools::CallContext;
use crate::twilio::{self, Inbound};
use crate::{http, twilio::RestConfig};
use serde_json::{json, Value};
use std::collections::{BTreeMap, VecDeque};

/// How long the OpenAI session may take to be ready before the call is given up.
pub const SESSION_SETUP_TIMEOUT: Millis = Millis(10_000);
/// Caller audio held while the OpenAI session is not ready: 15 s.
pub const MAX_PENDING_INPUT_BYTES: u64 = 15_000 * crate::audio::BYTES_PER_MS;
/// Caller audio held while Twilio's `start` has not arrived: 2 s. Twilio sends `start`
/// right after `connected`, so any held at all is a peer out of order.
pub const MAX_EARLY_INPUT_BYTES: u64 = 2_000 * crate::audio::BYTES_PER_MS;
/// Agent audio held while Twilio's `start` has not arrived: 30 s.
pub const MAX_HELD_OUTPUT_BYTES: u64 = 30_000 * crate::audio::BYTES_PER_MS;
/// Caller audio goes to OpenAI this much at a time unless `CALLER_AUDIO_CHUNK_MS` says
/// otherwise: two of Twilio's 20 ms frames per `input_audio_buffer.append`. Every message
/// costs the Worker a WebSocket send (the largest item in its CPU profile) whatever it
/// holds: half the appends cost 6–15% less CPU while calls stream, for a frame held back
/// 20 ms before it goes, 10 ms on average (README, Benchmarks). Turn detection waits for
/// hundreds of ms of silence, so it does not notice; 20 sends every frame as it comes.
pub const CALLER_CHUNK_DEFAULT_MS: u64 = 40;
/// The chunk sizes `CALLER_AUDIO_CHUNK_MS` may set (ms): from one Twilio frame up to 100,
/// past which the wait would be heard in how fast the agent reacts.
pub const CALLER_CHUNK_MS_RANGE: (u64, u64) = (20, 100);
/// Largest frame accepted from either peer; Twilio frames are ~250 bytes and Realtime
/// deltas a few KiB, so anything this large is a fault.
pub const MAX_FRAME_BYTES: usize = 1 << 20;
/// How long the end of a call the caller left (Twilio's `stop`) is put off while the
/// transcription of their last turn is still to come: it usually comes within a second of
/// the turn, and without it the call's record would end on the agent answering nothing.
pub const TRANSCRIPT_TAIL: Millis = Millis(3_000);
/// An agent turn with more than this (ms) of its audio unconfirmed when the call ends was
/// not heard to its end (see `cut_turns_heard_in_part`).
pub const UNHEARD_TAIL_MS: u64 = 1_000;

/// Something that arrived for the call.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    TwilioText(&'a str),
    TwilioBinary {
        len: usize,
    },
    TwilioClosed {
        code: u16,
        reason: &'a str,
    },
    OpenAiOpened,
    /// The Realtime socket opened, one the shell opened ahead of the call's stream and on
    /// which it sent, as it opened, what [`ahead_of_stream`] gave: the session's
    /// configuration is on its way already, and is not sent again.
    OpenAiOpenedConfigured,
    OpenAiConnectFailed {
        reason: &'a str,
        /// The HTTP status of a refused upgrade; `None` when no HTTP answer came.
        status: Option<u16>,
    },
    OpenAiText(&'a str),
    OpenAiBinary {
        len: usize,
    },
    OpenAiClosed {
        code: u16,
        reason: &'a str,
    },
    /// An HTTP request from `Action::Http` finished.
    HttpDone {
        id: u64,
        outcome: &'a http::Outcome,
    },
    /// The time given by `poll_timeout` has come.
    Timeout,
}

/// What the shell sends on a Realtime socket it opens for a call ahead of the call's stream
/// (as the voice webhook registers the call), as soon as it opens: the session's
/// configuration, the same the machine sends on [`Input::OpenAiOpened`], so that
/// `session.updated` is on its way before the stream is. The socket is handed to the machine
/// with [`Input::OpenAiOpenedConfigured`]; what came on it meanwhile follows, in order.
/// Nothing else goes ahead: the greeting waits for the stream (see `maybe_greet`).
pub fn ahead_of_stream(agent: &Agent) -> Vec<String> {
    vec![openai::session_update(agent)]
}

/// How much a log line matters, least first. `Debug` is the detail of every turn (speech
/// started, transcripts' lengths, responses created); the shell prints it only when asked
/// (`LOG_LEVEL=debug`): every line costs CPU where logs are collected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

impl std::str::FromStr for Level {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        match s.to_ascii_lowercase().as_str() {
            "debug" => Ok(Level::Debug),
            "info" => Ok(Level::Info),
            "warn" | "warning" => Ok(Level::Warn),
            "error" => Ok(Level::Error),
            _ => Err(()),
        }
    }
}

/// Something the shell must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Open the Realtime WebSocket for this model.
    ConnectOpenAi {
        model: String,
    },
    SendTwilio(String),
    SendOpenAi(String),
    CloseOpenAi {
        code: u16,
        reason: String,
    },
    /// Close Twilio's socket; Twilio then runs the TwiML after `</Connect>`.
    CloseTwilio {
        code: u16,
        reason: String,
    },
    /// One structured log line (JSON), never holding audio or secrets.
    Log {
        level: Level,
        line: String,
    },
    /// Write this to the call's record (durably, off the audio path).
    Persist(Record),
    /// Make this request without blocking the call; answer with `Input::HttpDone`.
    Http {
        id: u64,
        request: http::Request,
    },
    /// The call is over; what it leaves for the record.
    Ended(Box<Summary>),
    /// The next stereo μ-law of the call's recording (see `crate::recording`), in order.
    RecordingData(Vec<u8>),
    /// The recording is complete: `duration_ms` long. Comes before the call's end record.
    RecordingDone {
        duration_ms: u64,
    },
}

/// Why the call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// Twilio sent `stop`: the caller hung up or the call was redirected.
    TwilioStop,
    TwilioSocketClosed {
        code: u16,
    },
    OpenAiClosed {
        code: u16,
        reason: String,
    },
    OpenAiConnectFailed {
        reason: String,
    },
    SessionSetupTimeout,
    /// The Realtime server rejected our session configuration.
    SessionRejected {
        reason: String,
    },
    /// The agent hung up (the `end_call` tool, a time limit or a silent line).
    AgentHangup {
        why: String,
    },
    /// Twilio refused our hang-up or transfer; the caller gets the fallback TwiML.
    CallControlFailed {
        what: String,
    },
    /// The call was handed to a person.
    Transferred {
        to: String,
    },
    /// The agent's responses failed (`response.done` with status `failed`: out of quota,
    /// rate-limited, or failing again when asked again): the caller was handed to the
    /// fallback, or the call ended without the agent's last words.
    ResponseFailed {
        error: String,
    },
    /// The agent failed for good (`cause`: its responses, or its session with no new one)
    /// while the call was ending, before its goodbye or transfer notice was said: the call
    /// ended as planned (`then`, the label and particulars of that ending) without those
    /// words. Labelled as its cause.
    FailedWhileEnding {
        cause: Box<EndReason>,
        then: String,
    },
}

impl EndReason {
    /// Every label [`EndReason::label`] gives (the review page names each).
    pub const LABELS: [&'static str; 10] = [
        "twilio_stop",
        "twilio_socket_closed",
        "openai_closed",
        "openai_connect_failed",
        "openai_session_timeout",
        "openai_session_rejected",
        "agent_hangup",
        "transferred",
        "call_control_failed",
        "openai_response_failed",
    ];

    /// Short stable label, for storage and logs.
    pub fn label(&self) -> &'static str {
        match self {
            EndReason::TwilioStop => "twilio_stop",
            EndReason::TwilioSocketClosed { .. } => "twilio_socket_closed",
            EndReason::OpenAiClosed { .. } => "openai_closed",
            EndReason::OpenAiConnectFailed { .. } => "openai_connect_failed",
            EndReason::SessionSetupTimeout => "openai_session_timeout",
            EndReason::SessionRejected { .. } => "openai_session_rejected",
            EndReason::AgentHangup { .. } => "agent_hangup",
            EndReason::Transferred { .. } => "transferred",
            EndReason::CallControlFailed { .. } => "call_control_failed",
            EndReason::ResponseFailed { .. } => "openai_response_failed",
            EndReason::FailedWhileEnding { cause, .. } => cause.label(),
        }
    }

    /// True when the call ended because the agent side failed, not because of the caller.
    pub fn is_failure(&self) -> bool {
        !matches!(
            self,
            EndReason::TwilioStop
                | EndReason::TwilioSocketClosed { .. }
                | EndReason::AgentHangup { .. }
                | EndReason::Transferred { .. }
        )
    }

    /// The particulars, in words, for the call's record (`calls.end_detail`).
    pub fn detail_text(&self) -> Option<String> {
        match self {
            EndReason::TwilioSocketClosed { code } => {
                Some(format!("Twilio closed the stream ({code})"))
            }
            EndReason::OpenAiClosed { code, reason } if reason.is_empty() => {
                Some(format!("closed with code {code}"))
            }
            EndReason::OpenAiClosed { code, reason } => {
                Some(format!("closed with code {code}: {reason}"))
            }
            EndReason::OpenAiConnectFailed { reason } | EndReason::SessionRejected { reason } => {
                Some(reason.clone())
            }
            EndReason::SessionSetupTimeout => Some(format!(
                "no usable session within {} s",
                SESSION_SETUP_TIMEOUT.0 / 1000
            )),
            EndReason::AgentHangup { why } => Some(why.clone()),
            EndReason::Transferred { to } => Some(to.clone()),
            EndReason::CallControlFailed { what } => Some(what.clone()),
            EndReason::ResponseFailed { error } => Some(error.clone()),
            EndReason::FailedWhileEnding { cause, then } => Some(format!(
                "{}; then {then}",
                cause
                    .detail_text()
                    .unwrap_or_else(|| cause.label().to_owned())
            )),
            EndReason::TwilioStop => None,
        }
    }

    fn detail(&self) -> Value {
        match self {
            EndReason::TwilioSocketClosed { code } => json!({ "code": code }),
            EndReason::OpenAiClosed { code, reason } => json!({ "code": code, "reason": reason }),
            EndReason::OpenAiConnectFailed { reason } | EndReason::SessionRejected { reason } => {
                json!({ "reason": reason })
            }
            EndReason::AgentHangup { why } => json!({ "why": why }),
            EndReason::Transferred { to } => json!({ "to": to }),
            EndReason::CallControlFailed { what } => json!({ "what": what }),
            EndReason::ResponseFailed { error } => json!({ "error": error }),
            EndReason::FailedWhileEnding { cause, then } => {
                let mut detail = match cause.detail() {
                    Value::Object(fields) => Value::Object(fields),
                    _ => json!({}),
                };
                detail["then"] = json!(then);
                detail
            }
            _ => Value::Null,
        }
    }
}

/// Counters kept per call.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    pub caller_frames: u64,
    pub caller_bytes: u64,
    pub agent_frames: u64,
    pub agent_bytes: u64,
    pub barge_ins: u64,
    pub responses: u64,
    pub tokens: openai::Usage,
    /// What transcribing the caller cost, apart from `tokens`.
    pub transcription: openai::TranscriptionUsage,
    /// Dropped input by reason.
    pub dropped: BTreeMap<&'static str, u64>,
    /// From Twilio's `start` to the first agent audio sent to Twilio.
    pub first_audio_ms: Option<u64>,
}

/// What an ended call leaves for the record.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub call_sid: CallSid,
    pub stream_sid: Option<StreamSid>,
    pub session_id: Option<String>,
    pub reason: EndReason,
    pub started_at: Option<Millis>,
    pub ended_at: Millis,
    pub stats: Stats,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upstream {
    Connecting,
    /// Socket open, `session.update` sent, waiting for `session.updated`.
    Configuring,
    /// `session.updated` confirmed μ-law both ways: audio may flow.
    Ready,
    Closed,
}

struct Stream {
    sid: StreamSid,
    writer: twilio::Writer,
    started_at: Millis,
}

/// Everything a call is set up with.
#[derive(Debug, Clone)]
pub struct Setup {
    pub context: CallContext,
    pub agent: Agent,
    pub twilio_rest: RestConfig,
    /// Silence on both sides this long makes the agent check in; as long again ends the call.
    pub idle_timeout: Millis,
    /// Caller audio goes to OpenAI this much at a time (see [`CALLER_CHUNK_DEFAULT_MS`]).
    pub caller_chunk: Millis,
    /// What Twilio is redirected to when the agent side fails (see `fallback`).
    pub fallback_twiml: String,
    /// The `<Dial action>` of a transfer: where Twilio asks what to do with the caller once
    /// the person's line has ended (see `webhook::transfer_result`).
    pub transfer_action: String,
}

pub struct Call {
    sid: CallSid,
    agent: Agent,
    context: CallContext,
    twilio_rest: RestConfig,
    control: control::State,
    upstream: Upstream,
    stream: Option<Stream>,
    session_id: Option<String>,
    greeted: bool,
    response_active: bool,
    /// Caller audio (already-built append events, with their bytes and Twilio frames)
    /// waiting for the session to be ready.
    pending_input: VecDeque<(String, u64, u64)>,
    pending_input_bytes: u64,
    /// Caller μ-law gathered for the next append, while the session is ready (see
    /// [`CALLER_CHUNK_DEFAULT_MS`]), and how much makes one.
    caller_chunk: Vec<u8>,
    caller_chunk_frames: u64,
    caller_chunk_bytes: usize,
    /// Where on the caller's audio (ms from the stream start) the current session's input
    /// begins: its `audio_start_ms` count from there (a reconnected session's from where it
    /// took over, not from the stream start).
    session_audio_from_ms: u64,
    /// Caller media payloads (and their timestamps) that came before Twilio's `start`,
    /// replayed when it comes.
    early_input: VecDeque<(String, Option<u64>)>,
    early_input_bytes: u64,
    /// Agent audio waiting for Twilio's `start`.
    held_output: VecDeque<(ItemId, String, u64)>,
    held_output_bytes: u64,
    playback: Playback,
    conversation: Conversation,
    event_seq: u64,
    session_recorded: bool,
    setup_deadline: Option<Millis>,
    ended: Option<EndReason>,
    stats: Stats,
    actions: VecDeque<Action>,
    /// The call's recording, from the stream start, when the agent records calls.
    recorder: Option<crate::recording::Recorder>,
    fallback_twiml: String,
    transfer_action: String,
    /// Set once the agent side failed for good and the caller is being handed over.
    fallback: Option<fallback::Failing>,
    /// Twilio's socket has closed.
    twilio_gone: bool,
    /// Until when (in samples, 8 per ms, from the stream start) the agent audio sent so far
    /// keeps Twilio playing: when the next piece will start to be heard.
    agent_queued_until: u64,
    /// The call's end, put off for the caller's last transcript ([`TRANSCRIPT_TAIL`]): why
    /// and when it ended, and how long the transcript is waited for.
    tail: Option<(EndReason, Millis, Millis)>,
    /// The item whose audio was last sent: its later deltas need no transcript lookup.
    audio_item: Option<ItemId>,
    /// The time of the input being handled.
    now: Millis,
}

impl Call {
    /// A call whose Twilio socket has just been accepted. Asks at once for the OpenAI
    /// socket, so the session is being set up while Twilio sends `connected` and `start`.
    pub fn new(setup: Setup, now: Millis) -> Self {
        let Setup {
            context,
            agent,
            twilio_rest,
            idle_timeout,
            caller_chunk,
            fallback_twiml,
            transfer_action,
        } = setup;
        let mut call = Self {
            sid: CallSid::new(context.call_sid.clone()),
            context,
            twilio_rest,
            control: control::State::new(idle_timeout),
            upstream: Upstream::Connecting,
            stream: None,
            session_id: None,
            greeted: false,
            response_active: false,
            pending_input: VecDeque::new(),
            pending_input_bytes: 0,
            caller_chunk: Vec::new(),
            caller_chunk_frames: 0,
            caller_chunk_bytes: (caller_chunk.0 * crate::audio::BYTES_PER_MS) as usize,
            session_audio_from_ms: 0,
            early_input: VecDeque::new(),
            early_input_bytes: 0,
            held_output: VecDeque::new(),
            held_output_bytes: 0,
            playback: Playback::default(),
            conversation: Conversation::default(),
            event_seq: 0,
            session_recorded: false,
            setup_deadline: Some(now + SESSION_SETUP_TIMEOUT),
            ended: None,
            stats: Stats::default(),
            actions: VecDeque::new(),
            recorder: None,
            fallback_twiml,
            transfer_action,
            fallback: None,
            twilio_gone: false,
            agent_queued_until: 0,
            tail: None,
            audio_item: None,
            now,
            agent,
        };
        call.actions.push_back(Action::ConnectOpenAi {
            model: call.agent.model.clone(),
        });
        call.log(
            Level::Info,
            "call.accepted",
            json!({ "model": call.agent.model }),
        );
        call
    }

    pub fn sid(&self) -> &CallSid {
        &self.sid
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn end_reason(&self) -> Option<&EndReason> {
        self.ended.as_ref()
    }

    pub fn is_ended(&self) -> bool {
        self.ended.is_some()
    }

    /// The next action to carry out, in order.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When the shell must next call `handle(Input::Timeout, now)`.
    pub fn poll_timeout(&self) -> Option<Millis> {
        if self.ended.is_some() {
            return None;
        }
        if let Some((_, _, deadline)) = &self.tail {
            return Some(*deadline);
        }
        if let Some(d) = self.fallback_deadline() {
            return Some(d);
        }
        [
            self.setup_deadline,
            self.control_deadline(),
            self.reconnect_due(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    pub fn handle(&mut self, input: Input<'_>, now: Millis) {
        self.now = now;
        self.dispatch(input, now);
        // Agent audio left unmarked too long (its stream paused) is marked now, so what
        // played is confirmed; caller frames come every 20 ms, so this runs often enough.
        if self.ended.is_none() && self.tail.is_none() {
            if let Some(mark) = self.playback.stale_mark(now) {
                self.send_mark(&mark);
            }
        }
        // The recording's clock stops with Twilio's end: in the transcript tail nothing more
        // is handed out, and the call's end completes it as of then.
        if self.tail.is_none() {
            self.record_settled(now);
        }
    }

    fn dispatch(&mut self, input: Input<'_>, now: Millis) {
        if self.ended.is_some() {
            // Late frames after the end (the other socket is closing) are expected.
            return;
        }
        if self.tail.is_some() {
            return self.dispatch_in_tail(input, now);
        }
        match input {
            Input::TwilioText(text) => self.on_twilio_text(text, now),
            Input::TwilioBinary { len } => {
                self.drop_input("twilio_binary_frame", json!({ "len": len }))
            }
            Input::TwilioClosed { code, reason } => {
                self.log(
                    Level::Info,
                    "twilio.closed",
                    json!({ "code": code, "reason": reason }),
                );
                self.twilio_gone = true;
                // A close without `stop` after our hang-up or transfer is still ours.
                let reason = self
                    .failed_reason(now)
                    .or_else(|| self.control_end_reason(now))
                    .unwrap_or(EndReason::TwilioSocketClosed { code });
                self.end_after_transcript(reason, now);
            }
            Input::OpenAiOpened => self.on_openai_opened(true),
            Input::OpenAiOpenedConfigured => self.on_openai_opened(false),
            Input::OpenAiConnectFailed { reason, status } => {
                self.log(
                    Level::Error,
                    "openai.connect_failed",
                    json!({ "reason": reason, "status": status }),
                );
                // No socket came of it: nothing to close.
                self.upstream = Upstream::Closed;
                // A refused key or a wrong URL stays refused: no point in trying again.
                let lasting = matches!(status, Some(400 | 401 | 403 | 404));
                let failure = EndReason::OpenAiConnectFailed {
                    reason: reason.to_owned(),
                };
                if !lasting && self.try_reconnect(now, &failure) {
                    return;
                }
                self.fail(failure, now);
            }
            Input::OpenAiText(text) => self.on_openai_text(text, now),
            // No session is open to have sent it (see `on_openai_text`).
            Input::OpenAiBinary { .. } if !self.session_open() => {}
            Input::OpenAiBinary { len } => {
                self.drop_input("openai_binary_frame", json!({ "len": len }))
            }
            Input::OpenAiClosed { code, reason } => {
                self.log(
                    Level::Warn,
                    "openai.closed",
                    json!({ "code": code, "reason": reason }),
                );
                self.upstream = Upstream::Closed;
                let failure = EndReason::OpenAiClosed {
                    code,
                    reason: reason.to_owned(),
                };
                if self.try_reconnect(now, &failure) {
                    return;
                }
                self.fail(failure, now);
            }
            Input::HttpDone { id, outcome } => {
                if !self.on_fallback_http_done(id, outcome, now) {
                    self.on_http_done(id, outcome, now);
                }
            }
            Input::Timeout => {
                if self.failing() {
                    return self.on_fallback_timer(now);
                }
                self.on_reconnect_timer(now);
                if self.setup_deadline.is_some_and(|d| now >= d) {
                    self.log(
                        Level::Error,
                        "openai.session_timeout",
                        json!({ "waited_ms": SESSION_SETUP_TIMEOUT.0 }),
                    );
                    // Give up on the socket that never became ready (open, or still
                    // connecting) before asking for another: one OpenAI socket at a time,
                    // so nothing late from the old one is taken for the new session's.
                    if self.upstream != Upstream::Closed {
                        self.upstream = Upstream::Closed;
                        self.actions.push_back(Action::CloseOpenAi {
                            code: 1000,
                            reason: "session setup timed out".into(),
                        });
                    }
                    if self.try_reconnect(now, &EndReason::SessionSetupTimeout) {
                        return;
                    }
                    self.fail(EndReason::SessionSetupTimeout, now);
                    return;
                }
                self.on_control_timer(now);
            }
        }
    }

    // ---- Twilio side ----

    fn on_twilio_text(&mut self, text: &str, now: Millis) {
        if text.len() > MAX_FRAME_BYTES {
            return self.drop_input("twilio_oversized_frame", json!({ "len": text.len() }));
        }
        let frame = match twilio::parse(text) {
            Ok(f) => f,
            Err(e) => {
                return self.drop_input("twilio_malformed_frame", json!({ "error": e.to_string() }))
            }
        };
        match frame {
            Inbound::Connected => self.log(Level::Debug, "twilio.connected", Value::Null),
            Inbound::Start(start) => self.on_start(start, now),
            Inbound::Media(media) => self.on_caller_audio(&media.payload, media.timestamp, now),
            Inbound::Mark { name } => match self.playback.echoed(&name, now) {
                Echo::Played { .. } => self.on_played(now),
                Echo::Flushed => {}
                Echo::Unknown => self.drop_input("twilio_unknown_mark", json!({ "name": name })),
            },
            Inbound::Dtmf { digit } => self.on_dtmf(&digit, now),
            Inbound::Stop => {
                self.log(Level::Info, "twilio.stop", Value::Null);
                let reason = self
                    .failed_reason(now)
                    .or_else(|| self.control_end_reason(now))
                    .unwrap_or(EndReason::TwilioStop);
                self.end_after_transcript(reason, now);
            }
            Inbound::Unknown { event } => {
                self.drop_input("twilio_unknown_event", json!({ "event": event }))
            }
        }
    }

    fn on_start(&mut self, start: twilio::Start, now: Millis) {
        if self.stream.is_some() {
            return self.drop_input(
                "twilio_second_start",
                json!({ "stream_sid": start.stream_sid }),
            );
        }
        if start.call_sid != self.sid {
            // The socket was routed here by the CallSid in its URL; a start naming another
            // call is not ours to serve.
            return self.drop_input(
                "twilio_start_for_other_call",
                json!({ "start_call_sid": start.call_sid }),
            );
        }
        if start.encoding != "audio/x-mulaw" || start.sample_rate != 8000 {
            self.log(
                Level::Warn,
                "twilio.unexpected_media_format",
                json!({ "encoding": start.encoding, "sample_rate": start.sample_rate }),
            );
        }
        self.log(
            Level::Info,
            "twilio.start",
            json!({ "stream_sid": start.stream_sid, "account_sid": start.account_sid }),
        );
        self.actions
            .push_back(Action::Persist(Record::CallConnected {
                call_sid: self.sid.0.clone(),
                stream_sid: start.stream_sid.0.clone(),
                at_ms: now.0,
            }));
        self.stream = Some(Stream {
            writer: twilio::Writer::new(&start.stream_sid),
            sid: start.stream_sid,
            started_at: now,
        });
        self.control_stream_started(now);
        self.recording_started();
        // Agent audio that came before we knew where to send it.
        let held = std::mem::take(&mut self.held_output);
        self.held_output_bytes = 0;
        for (item, payload, bytes) in held {
            self.send_agent_audio(item.as_str(), &payload, bytes, now);
        }
        // Caller audio that came before the stream's `start`, in the order it came.
        let early = std::mem::take(&mut self.early_input);
        self.early_input_bytes = 0;
        for (payload, timestamp) in early {
            self.on_caller_audio(&payload, timestamp, now);
        }
        self.maybe_greet();
    }

    /// Media before `start` (protocol.md: buffer frames until `start`): held, at most
    /// [`MAX_EARLY_INPUT_BYTES`], the oldest dropped and counted past that.
    fn hold_early_input(&mut self, payload: &str, timestamp: Option<u64>) {
        let Some(bytes) = base64_decoded_len(payload) else {
            return self.drop_input("twilio_invalid_base64", json!({ "len": payload.len() }));
        };
        self.early_input.push_back((payload.to_owned(), timestamp));
        self.early_input_bytes += bytes as u64;
        while self.early_input_bytes > MAX_EARLY_INPUT_BYTES {
            let (dropped, _) = self.early_input.pop_front().expect("bytes imply frames");
            self.early_input_bytes -= base64_decoded_len(&dropped).unwrap_or(0) as u64;
            self.drop_input("twilio_media_before_start", Value::Null);
        }
    }

    /// A caller frame, stamped by Twilio `timestamp` ms into its stream when it was.
    fn on_caller_audio(&mut self, payload: &str, timestamp: Option<u64>, now: Millis) {
        if self.stream.is_none() {
            return self.hold_early_input(payload, timestamp);
        }
        let Some(bytes) = base64_decoded_len(payload) else {
            return self.drop_input("twilio_invalid_base64", json!({ "len": payload.len() }));
        };
        let bytes = bytes as u64;
        self.stats.caller_frames += 1;
        self.stats.caller_bytes += bytes;
        self.record_caller(payload, timestamp, now);
        if self.failing() {
            // No session will hear it; the recording keeps it.
            return;
        }
        if self.upstream == Upstream::Ready {
            return self.relay_caller_audio(payload, bytes);
        }
        // The session the chunk was gathered for is gone: it goes first to the next one.
        self.release_caller_chunk();
        let event = openai::input_audio_append(payload);
        self.pending_input.push_back((event, bytes, 1));
        self.pending_input_bytes += bytes;
        let mut overflow = 0u64;
        while self.pending_input_bytes > MAX_PENDING_INPUT_BYTES {
            let (_, b, frames) = self.pending_input.pop_front().expect("bytes imply frames");
            self.pending_input_bytes -= b;
            overflow += frames;
        }
        if overflow > 0 {
            *self
                .stats
                .dropped
                .entry("caller_audio_overflow")
                .or_default() += overflow;
            self.log(
                Level::Warn,
                "bridge.caller_audio_overflow",
                json!({ "frames": overflow, "held_ms": bytes_to_ms(self.pending_input_bytes) }),
            );
        }
    }

    /// A caller frame (`bytes` of μ-law, its payload checked) for the ready session: sent at
    /// once, as it came, when it fills a chunk by itself (every frame, at 20 ms); else
    /// gathered until a chunk is full.
    fn relay_caller_audio(&mut self, payload: &str, bytes: u64) {
        if self.caller_chunk.is_empty() && bytes >= self.caller_chunk_bytes as u64 {
            let event = openai::input_audio_append(payload);
            self.actions.push_back(Action::SendOpenAi(event));
            return;
        }
        if !crate::audio::base64_decode_into(payload, &mut self.caller_chunk) {
            // Checked by `base64_decoded_len` already; counted as any payload that is not base64.
            return self.drop_input("twilio_invalid_base64", json!({ "len": payload.len() }));
        }
        self.caller_chunk_frames += 1;
        if self.caller_chunk.len() >= self.caller_chunk_bytes {
            self.release_caller_chunk();
        }
    }

    /// Sends the caller audio gathered so far to the session when it is ready, else holds it
    /// for the next one ([`Call::hold_caller_chunk`]).
    fn release_caller_chunk(&mut self) {
        if self.upstream != Upstream::Ready {
            return self.hold_caller_chunk();
        }
        if let Some((event, _, _)) = self.take_caller_chunk() {
            self.actions.push_back(Action::SendOpenAi(event));
        }
    }

    /// The caller audio gathered for a session that went away, ahead of the audio held for
    /// the next one: it is older, and never reached the one it was gathered for.
    fn hold_caller_chunk(&mut self) {
        if let Some((event, bytes, frames)) = self.take_caller_chunk() {
            self.pending_input.push_front((event, bytes, frames));
            self.pending_input_bytes += bytes;
        }
    }

    /// The append of the caller audio gathered so far, with its bytes and frames; the
    /// gathering starts again.
    fn take_caller_chunk(&mut self) -> Option<(String, u64, u64)> {
        if self.caller_chunk.is_empty() {
            return None;
        }
        let event = openai::input_audio_append_bytes(&self.caller_chunk);
        let bytes = self.caller_chunk.len() as u64;
        self.caller_chunk.clear();
        Some((event, bytes, std::mem::take(&mut self.caller_chunk_frames)))
    }

    /// Every other event for OpenAI goes after the caller audio that came before it, as it
    /// would had that audio been sent as it came: a commit covers all of it, and the server
    /// hears the caller and our events in the order they happened.
    pub(super) fn send_openai(&mut self, event: String) {
        self.release_caller_chunk();
        self.actions.push_back(Action::SendOpenAi(event));
    }

    // ---- OpenAI side ----

    /// A Realtime socket opened; `configure`: the session's configuration goes now (it went
    /// as the socket opened when the shell opened it ahead of the stream).
    fn on_openai_opened(&mut self, configure: bool) {
        if self.upstream == Upstream::Closed {
            // A connect we gave up on while it was on its way: let it go.
            self.actions.push_back(Action::CloseOpenAi {
                code: 1000,
                reason: "no longer wanted".into(),
            });
            return;
        }
        if self.upstream != Upstream::Connecting {
            return;
        }
        self.log(
            Level::Debug,
            "openai.connected",
            json!({ "configured_ahead": !configure }),
        );
        self.upstream = Upstream::Configuring;
        if configure {
            self.send_openai(openai::session_update(&self.agent));
        }
    }

    /// A Realtime socket is open (configuring or ready). Frames read while none is are left
    /// over from one already closed or given up on (the fallback, a reconnect), and change
    /// nothing.
    fn session_open(&self) -> bool {
        matches!(self.upstream, Upstream::Configuring | Upstream::Ready)
    }

    fn on_openai_text(&mut self, text: &str, now: Millis) {
        if let Some(event) = self.read_openai(text) {
            self.on_openai_event(event, now);
        }
    }

    /// A frame of the session, parsed; `None` when there is no session to read it for, or it
    /// is too large or malformed (dropped and counted).
    fn read_openai<'a>(&mut self, text: &'a str) -> Option<ServerEvent<'a>> {
        if !self.session_open() {
            return None;
        }
        if text.len() > MAX_FRAME_BYTES {
            self.drop_input("openai_oversized_frame", json!({ "len": text.len() }));
            return None;
        }
        match openai::parse(text) {
            Ok(e) => Some(e),
            Err(e) => {
                self.drop_input("openai_malformed_event", json!({ "error": e.to_string() }));
                None
            }
        }
    }

    fn on_openai_event(&mut self, event: ServerEvent<'_>, now: Millis) {
        match event {
            ServerEvent::SessionCreated(s) => {
                self.session_id = s.id.clone();
                self.record_session();
                self.log(
                    Level::Debug,
                    "openai.session.created",
                    json!({ "session_id": s.id, "model": s.model }),
                );
            }
            ServerEvent::SessionUpdated(s) => self.on_session_updated(s, now),
            ServerEvent::Error(err) => {
                self.log(
                    Level::Error,
                    "openai.error",
                    json!({
                        "type": err.kind, "code": err.code, "message": err.message,
                        "param": err.param, "event_id": err.event_id,
                    }),
                );
                self.event(
                    now,
                    EventKind::OpenAiError,
                    json!({ "type": err.kind, "code": err.code, "message": err.message, "param": err.param }),
                );
                let asked_response = matches!(
                    err.event_id.as_deref(),
                    Some(openai::RESPONSE_EVENT_ID | openai::GREETING_EVENT_ID)
                );
                if let Some(id) = err.event_id.as_deref() {
                    self.item_refused(id);
                }
                match err.code.as_deref() {
                    Some("session_expired") => return self.on_session_expired(now),
                    Some("conversation_already_has_active_response") => self.on_response_refused(),
                    _ if asked_response => self.on_response_failed(now),
                    _ => {}
                }
                let ours = err.event_id.as_deref() == Some("evt_bridge_session_update");
                if ours && self.upstream != Upstream::Ready {
                    // The session keeps its defaults (24 kHz PCM out): unusable for a phone.
                    let reason = err.code.or(err.message).unwrap_or_else(|| "error".into());
                    self.fail(EndReason::SessionRejected { reason }, now);
                }
            }
            ServerEvent::SpeechStarted {
                item_id,
                audio_start_ms,
            } => {
                self.log(
                    Level::Debug,
                    "openai.speech_started",
                    json!({ "item_id": item_id, "audio_start_ms": audio_start_ms }),
                );
                self.activity(now);
                self.caller_turn_started(now);
                if let (Some(id), Some(ms)) = (&item_id, audio_start_ms) {
                    let at = self.session_audio_from_ms + ms;
                    self.conversation.speech_started(&ItemId(id.clone()), at);
                }
                if self.caller_spoke(now) {
                    return;
                }
                self.barge_in(now);
                // A `clear` leaves nothing to play: an ending that waited for it goes on.
                self.check_drained(now);
            }
            ServerEvent::SpeechStopped {
                item_id,
                audio_end_ms,
            } => {
                self.activity(now);
                self.caller_turn_stopped(now);
                self.log(
                    Level::Debug,
                    "openai.speech_stopped",
                    json!({ "item_id": item_id, "audio_end_ms": audio_end_ms }),
                )
            }
            ServerEvent::Committed { item_id } => {
                self.log(
                    Level::Debug,
                    "openai.input_committed",
                    json!({ "item_id": item_id }),
                );
                self.caller_turn_committed(item_id.as_deref(), now);
                if let Some(id) = item_id {
                    let at = self.offset(now);
                    self.conversation.added(&ItemId(id), Some("user"), at);
                }
            }
            ServerEvent::ItemAdded {
                item_id,
                role,
                ours,
            } => {
                if ours {
                    // Not the caller's words nor the agent's: no part of the transcript.
                    self.item_confirmed(&item_id);
                } else {
                    let at = self.offset(now);
                    self.conversation
                        .added(&ItemId(item_id), role.as_deref(), at);
                }
            }
            ServerEvent::AudioTranscriptDelta { item_id, delta } => {
                if let Some(id) = item_id {
                    let at = self.offset(now);
                    self.conversation.agent_delta(&ItemId(id), &delta, at);
                }
            }
            ServerEvent::ItemRetrieved {
                item_id,
                transcript,
            } => {
                let entry = self
                    .conversation
                    .retrieved(&ItemId(item_id), transcript.as_deref());
                self.write_entry(entry);
            }
            ServerEvent::ResponseCreated { response_id } => {
                self.response_active = true;
                self.on_response_created(response_id.as_deref(), now);
                self.log(
                    Level::Debug,
                    "openai.response.created",
                    json!({ "response_id": response_id }),
                );
            }
            ServerEvent::AudioDelta {
                item_id,
                delta,
                response_id,
            } => {
                if self.silenced(response_id.as_deref()) {
                    return self.drop_input("agent_audio_after_goodbye", Value::Null);
                }
                if self.talked_over(response_id.as_deref()) {
                    // Still on its way when the caller began to speak (none of it had come,
                    // so no barge-in cut it): not played over them.
                    return self.drop_input("openai_audio_after_barge_in", Value::Null);
                }
                self.on_agent_audio(&item_id, &delta, now)
            }
            ServerEvent::AudioDone { item_id } => {
                if let Some(id) = item_id {
                    if let Some(mark) = self.playback.audio_done(&ItemId(id)) {
                        self.send_mark(&mark);
                    }
                }
            }
            ServerEvent::AudioTranscriptDone {
                item_id,
                response_id,
                transcript,
            } => {
                if self.silenced(response_id.as_deref()) {
                    // Words of the response cancelled over a goodbye: never played, so not
                    // what the agent said to the caller.
                    return self.drop_input(
                        "agent_transcript_after_goodbye",
                        json!({ "chars": transcript.chars().count() }),
                    );
                }
                self.log(
                    Level::Debug,
                    "openai.agent_transcript",
                    json!({ "item_id": item_id, "chars": transcript.chars().count() }),
                );
                if let Some(id) = item_id {
                    let id = ItemId(id);
                    if self.talked_over(response_id.as_deref())
                        && !self.conversation.agent_audio_sent(&id)
                    {
                        // Words of a response the caller spoke over before any of its
                        // audio went out: never heard, so not what the agent said.
                        return self.drop_input(
                            "agent_transcript_after_barge_in",
                            json!({ "chars": transcript.chars().count() }),
                        );
                    }
                    let at = self.offset(now);
                    let entry = self.conversation.agent_text(&id, &transcript, at);
                    self.write_entry(entry);
                }
            }
            ServerEvent::InputTranscriptionCompleted {
                item_id,
                transcript,
                usage,
            } => {
                self.stats.transcription.add(usage);
                self.log(
                    Level::Debug,
                    "openai.caller_transcript",
                    json!({ "item_id": item_id, "chars": transcript.chars().count() }),
                );
                self.caller_turn_transcribed(item_id.as_deref());
                if let Some(id) = item_id {
                    let at = self.offset(now);
                    let entry = self.conversation.caller_text(&ItemId(id), &transcript, at);
                    self.write_entry(entry);
                }
            }
            ServerEvent::InputTranscriptionFailed { item_id, error } => {
                self.log(
                    Level::Warn,
                    "openai.caller_transcription_failed",
                    json!({ "item_id": item_id, "code": error.code, "message": error.message }),
                );
                self.event(
                    now,
                    EventKind::TranscriptionFailed,
                    json!({ "item_id": item_id, "code": error.code, "message": error.message }),
                );
                self.caller_turn_transcribed(item_id.as_deref());
                // The turn keeps its place in the record, saying it could not be
                // transcribed: else the agent's reply would follow nothing.
                if let Some(id) = item_id {
                    let at = self.offset(now);
                    let text = self.untranscribed_turn_text();
                    let entry = self.conversation.caller_text(&ItemId(id), text, at);
                    self.write_entry(entry);
                }
            }
            ServerEvent::ItemTruncated {
                item_id,
                audio_end_ms,
            } => self.log(
                Level::Info,
                "openai.item_truncated",
                json!({ "item_id": item_id, "audio_end_ms": audio_end_ms }),
            ),
            ServerEvent::ResponseDone(r) => {
                self.response_active = false;
                self.stats.responses += 1;
                let u = r.usage;
                // The counts are the server's: absurd ones must not overflow (a panic in
                // debug builds, a wrapped total in release).
                let t = &mut self.stats.tokens;
                t.total_tokens = t.total_tokens.saturating_add(u.total_tokens);
                t.input_tokens = t.input_tokens.saturating_add(u.input_tokens);
                t.output_tokens = t.output_tokens.saturating_add(u.output_tokens);
                // A response that failed or stopped short is worth a look at the default level.
                let level = match r.status.as_deref() {
                    Some("failed" | "incomplete") => Level::Warn,
                    _ => Level::Info,
                };
                self.log(
                    level,
                    "openai.response.done",
                    json!({
                        "response_id": r.id, "status": r.status, "reason": r.status_reason,
                        "error": r.status_error.as_ref().map(openai::ResponseError::text),
                        "usage": { "total_tokens": u.total_tokens, "input_tokens": u.input_tokens,
                                   "output_tokens": u.output_tokens },
                    }),
                );
                self.on_response_done(&r, now);
            }
            ServerEvent::RateLimitsUpdated(limits) => {
                let limits: Vec<Value> = limits
                    .iter()
                    .map(|l| json!({ "name": l.name, "limit": l.limit, "remaining": l.remaining, "reset_seconds": l.reset_seconds }))
                    .collect();
                self.log(
                    Level::Debug,
                    "openai.rate_limits",
                    json!({ "rate_limits": limits }),
                );
            }
            ServerEvent::FunctionCall {
                response_id,
                call_id,
                name,
                arguments,
            } => self.on_function_call(response_id.as_deref(), call_id, name, arguments, now),
            ServerEvent::Other { kind } => {
                if !openai::UNUSED_EVENTS.contains(&kind.as_str()) {
                    self.drop_input("openai_unknown_event", json!({ "type": kind }));
                }
            }
        }
    }

    fn on_session_updated(&mut self, s: openai::SessionInfo, now: Millis) {
        self.log(
            Level::Info,
            "openai.session.updated",
            json!({
                "session_id": s.id, "input_format": s.input_format,
                "output_format": s.output_format, "voice": s.voice,
            }),
        );
        if s.id.is_some() {
            self.session_id = s.id.clone();
            self.record_session();
        }
        let pcmu = |f: &Option<String>| f.as_deref() == Some("audio/pcmu");
        if !(pcmu(&s.output_format) && pcmu(&s.input_format)) {
            let reason = format!(
                "session formats in={:?} out={:?}, need audio/pcmu",
                s.input_format, s.output_format
            );
            if self.upstream == Upstream::Ready {
                // A later update that lost μ-law would make everything after it noise.
                self.log(
                    Level::Error,
                    "openai.session_format_lost",
                    json!({ "reason": reason }),
                );
            }
            return self.fail(EndReason::SessionRejected { reason }, now);
        }
        if self.upstream == Upstream::Ready || self.session_unwanted(now) {
            return;
        }
        // Audio gathered for a session that went away goes to this one, before what was
        // held while none was ready.
        self.hold_caller_chunk();
        self.upstream = Upstream::Ready;
        self.setup_deadline = None;
        // Greeting first: were buffered caller speech to trigger a VAD response first,
        // our response.create would meet an active response.
        self.maybe_greet();
        // After a reconnect: the conversation so far, before any new caller audio.
        self.on_session_ready(now);
        // The session hears the held audio first: it begins where that began.
        self.session_audio_from_ms =
            bytes_to_ms(self.stats.caller_bytes - self.pending_input_bytes);
        self.pending_input_bytes = 0;
        for (event, _, _) in std::mem::take(&mut self.pending_input) {
            self.actions.push_back(Action::SendOpenAi(event));
        }
    }

    fn maybe_greet(&mut self) {
        if self.greeted || self.upstream != Upstream::Ready || self.stream.is_none() {
            return;
        }
        self.greeted = true;
        self.greeting_sent();
        self.log(Level::Debug, "bridge.greeting_requested", Value::Null);
        self.send_openai(openai::greeting_response(&self.agent));
    }

    fn on_agent_audio(&mut self, item: &str, delta: &str, now: Millis) {
        if self.upstream != Upstream::Ready {
            // Before μ-law is confirmed this is 24 kHz PCM: noise on a phone line.
            return self.drop_input("openai_audio_before_session_ready", Value::Null);
        }
        if self.playback.is_cut(item) {
            return self.drop_input("openai_audio_after_barge_in", Value::Null);
        }
        let Some(bytes) = base64_decoded_len(delta) else {
            return self.drop_input("openai_invalid_base64", json!({ "len": delta.len() }));
        };
        let bytes = bytes as u64;
        self.playback.received(item, bytes);
        if self.response_active {
            self.response_spoke();
        }
        if self.stream.is_some() {
            return self.send_agent_audio(item, delta, bytes, now);
        }
        self.held_output
            .push_back((ItemId::from(item), delta.to_owned(), bytes));
        self.held_output_bytes += bytes;
        while self.held_output_bytes > MAX_HELD_OUTPUT_BYTES {
            let (_, _, b) = self.held_output.pop_front().expect("bytes imply frames");
            self.held_output_bytes -= b;
            *self
                .stats
                .dropped
                .entry("agent_audio_overflow")
                .or_default() += 1;
        }
    }

    fn send_agent_audio(&mut self, item: &str, payload: &str, bytes: u64, now: Millis) {
        let Some(stream) = &self.stream else { return };
        let at = now.saturating_sub(stream.started_at).0;
        if self.stats.first_audio_ms.is_none() {
            let ms = at;
            self.stats.first_audio_ms = Some(ms);
            self.log(
                Level::Info,
                "bridge.first_agent_audio",
                json!({ "ms_from_start": ms }),
            );
        }
        if self.audio_item.as_ref().is_none_or(|a| a.as_str() != item) {
            let id = ItemId::from(item);
            // The turn's place on the recording: when it is heard, after any audio still
            // queued ahead of it (a filler before a tool's answer), not when it was sent.
            let plays_at = self.agent_plays_at(at);
            self.conversation.agent_audio_started(&id, plays_at);
            self.audio_item = Some(id);
        }
        self.record_agent(payload, bytes, at);
        if let Some(mark) = self.playback.before_send(item) {
            self.send_mark(&mark);
        }
        let stream = self.stream.as_ref().expect("checked above");
        self.actions
            .push_back(Action::SendTwilio(stream.writer.media(payload)));
        if let Some(mark) = self.playback.sent(item, bytes, now) {
            self.send_mark(&mark);
        }
        self.stats.agent_frames += 1;
        self.stats.agent_bytes += bytes;
        self.agent_audio_activity(now, bytes);
    }

    fn send_mark(&mut self, name: &str) {
        if let Some(stream) = &self.stream {
            self.actions
                .push_back(Action::SendTwilio(stream.writer.mark(name)));
        }
    }

    /// The caller started talking. If agent audio is still unheard, stop it at Twilio
    /// first (what the caller notices), then tell OpenAI how much was really heard.
    fn barge_in(&mut self, now: Millis) {
        // Audio whose mark has not come back but which has played by the reckoning (it
        // ended long enough ago) is not cut: nothing is left to clear.
        if !self.playback.unheard(now) {
            return;
        }
        let unconfirmed_ms = self.playback.unconfirmed_ms();
        if let Some(stream) = &self.stream {
            self.actions
                .push_back(Action::SendTwilio(stream.writer.clear()));
            self.record_clear(now);
        }
        let cuts = self.playback.barge_in(now);
        // Audio held for a stream that has not started belongs to the cut items.
        self.held_output.clear();
        self.held_output_bytes = 0;
        self.stats.barge_ins += 1;
        for cut in &cuts {
            if !cut.orphaned {
                self.send_openai(openai::truncate(cut.item.as_str(), cut.audio_end_ms));
            }
            if cut.audio_end_ms > 0 && !cut.orphaned {
                // The truncated item's transcript is what the caller heard.
                self.send_openai(openai::retrieve(cut.item.as_str()));
            }
            let at = self.offset(now);
            let entry =
                self.conversation
                    .agent_cut(&cut.item, cut.audio_end_ms, cut.received_ms, at);
            self.write_entry(entry);
            self.event(
                now,
                EventKind::BargeIn,
                json!({ "item_id": cut.item, "audio_end_ms": cut.audio_end_ms, "received_ms": cut.received_ms }),
            );
        }
        let cuts: Vec<Value> = cuts
            .iter()
            .map(|c| json!({ "item_id": c.item, "audio_end_ms": c.audio_end_ms }))
            .collect();
        self.log(
            Level::Info,
            "bridge.barge_in",
            json!({ "cuts": cuts, "unconfirmed_ms": unconfirmed_ms }),
        );
    }

    // ---- the end ----

    /// Twilio's side is over (`stop`, or its socket closed): the call ends, once the
    /// transcription of the caller's last turn has come, when one is still to come from a
    /// session that is up, or [`TRANSCRIPT_TAIL`] has passed. A caller who hung up while
    /// speaking (or before the server committed their turn) has their words so far
    /// committed, so that they are transcribed too. Meanwhile nothing but that turn and its
    /// transcription is heard (see `dispatch_in_tail`). The call ends as of `now`.
    fn end_after_transcript(&mut self, reason: EndReason, now: Millis) {
        // The caller's last words are all the session hears of them.
        if self.upstream == Upstream::Ready {
            self.release_caller_chunk();
        }
        let uncommitted = self.control_turn_uncommitted();
        if reason.is_failure()
            || self.upstream != Upstream::Ready
            || (self.control_untranscribed().is_none() && !uncommitted)
        {
            return self.end(reason, now);
        }
        if uncommitted {
            self.send_openai(openai::input_audio_commit());
        }
        self.log(
            Level::Debug,
            "call.awaiting_caller_transcript",
            json!({ "item_id": self.control_untranscribed(), "committing": uncommitted }),
        );
        self.tail = Some((reason, now, now + TRANSCRIPT_TAIL));
    }

    /// The call is over but for the caller's last transcript: that transcription (or its
    /// failure) is taken and ends the call, once the turn asked to be committed at the
    /// hang-up is (or its commit was refused); so do the session's close and the deadline.
    /// Everything else is over with the call: a response the server starts to answer the
    /// turn is not heard, nor a tool it calls run.
    fn dispatch_in_tail(&mut self, input: Input<'_>, now: Millis) {
        let done = match input {
            Input::OpenAiText(text) => {
                // The rest is over with the call (a response to the turn, its audio).
                match self.read_openai(text) {
                    Some(
                        event @ (ServerEvent::InputTranscriptionCompleted { .. }
                        | ServerEvent::InputTranscriptionFailed { .. }
                        | ServerEvent::Committed { .. }),
                    ) => self.on_openai_event(event, now),
                    Some(ServerEvent::Error(err))
                        if err.event_id.as_deref() == Some(openai::FINAL_COMMIT_EVENT_ID) =>
                    {
                        self.log(
                            Level::Debug,
                            "openai.final_commit_refused",
                            json!({ "code": err.code, "message": err.message }),
                        );
                        self.final_commit_refused();
                    }
                    _ => {}
                }
                self.control_untranscribed().is_none() && !self.control_turn_uncommitted()
            }
            Input::OpenAiClosed { .. } => {
                self.upstream = Upstream::Closed;
                true
            }
            Input::TwilioClosed { .. } => {
                self.twilio_gone = true;
                false
            }
            Input::Timeout => self.tail.as_ref().is_some_and(|(_, _, d)| now >= *d),
            _ => false,
        };
        if done {
            let (reason, at, _) = self.tail.take().expect("in the tail");
            if self.control_untranscribed().is_some() || self.control_turn_uncommitted() {
                self.log(
                    Level::Warn,
                    "call.caller_transcript_missing",
                    json!({ "item_id": self.control_untranscribed(),
                            "uncommitted": self.control_turn_uncommitted(),
                            "waited_ms": now.saturating_sub(at).0 }),
                );
            }
            self.end(reason, at);
        }
    }

    fn end(&mut self, reason: EndReason, now: Millis) {
        if self.ended.is_some() {
            return;
        }
        if self.upstream != Upstream::Closed {
            self.upstream = Upstream::Closed;
            self.actions.push_back(Action::CloseOpenAi {
                code: 1000,
                reason: "call ended".into(),
            });
        }
        if self.twilio_gone {
            // Nothing to close.
        } else if reason.is_failure() {
            // Closing the stream makes Twilio play the TwiML after </Connect> (the apology
            // and transfer), so the caller is not left in silence.
            self.actions.push_back(Action::CloseTwilio {
                code: 1011,
                reason: "agent unavailable".into(),
            });
        } else {
            self.actions.push_back(Action::CloseTwilio {
                code: 1000,
                reason: "stream stopped".into(),
            });
        }
        self.setup_deadline = None;
        // Ended as planned (a hang-up, the caller's) after the agent's responses failed for
        // good: recorded as the failure it was. (The stream closes as planned all the same.)
        let reason = self.with_agent_failure(reason);
        // Webhook tools still running: recorded now, as their answers will find no call.
        self.tools_unanswered(now);
        // A reply the caller hung up on (or the call otherwise ended in): what played.
        self.write_unfinished_agent_turns(|played, _| played, now);
        self.cut_turns_heard_in_part(now);
        // Media held for a `start` that never came is lost with the call: counted.
        for _ in std::mem::take(&mut self.early_input) {
            self.drop_input("twilio_media_before_start", Value::Null);
        }
        self.early_input_bytes = 0;
        let level = if reason.is_failure() {
            Level::Error
        } else {
            Level::Info
        };
        let dropped: BTreeMap<&str, u64> = self.stats.dropped.clone();
        self.log(
            level,
            "call.ended",
            json!({
                "reason": reason.label(), "detail": reason.detail(),
                "caller_frames": self.stats.caller_frames, "agent_frames": self.stats.agent_frames,
                "barge_ins": self.stats.barge_ins, "first_audio_ms": self.stats.first_audio_ms,
                "total_tokens": self.stats.tokens.total_tokens, "dropped": dropped,
            }),
        );
        if !self.stats.dropped.is_empty() {
            let dropped = json!(self.stats.dropped);
            self.event(now, EventKind::DroppedInput, dropped);
        }
        self.record_end(now);
        let started = self.stream.as_ref().map(|s| s.started_at);
        self.actions.push_back(Action::Persist(Record::CallEnded {
            call_sid: self.sid.0.clone(),
            at_ms: now.0,
            duration_ms: started.map(|s| now.saturating_sub(s).0),
            end_reason: reason.label().to_owned(),
            end_detail: reason.detail_text(),
            failed: reason.is_failure(),
            input_tokens: self.stats.tokens.input_tokens,
            output_tokens: self.stats.tokens.output_tokens,
            total_tokens: self.stats.tokens.total_tokens,
            first_audio_ms: self.stats.first_audio_ms,
            barge_ins: self.stats.barge_ins,
            transcription: self.stats.transcription,
            presumed: false,
        }));
        self.ended = Some(reason.clone());
        self.actions.push_back(Action::Ended(Box::new(Summary {
            call_sid: self.sid.clone(),
            stream_sid: self.stream.as_ref().map(|s| s.sid.clone()),
            session_id: self.session_id.clone(),
            reason,
            started_at: self.stream.as_ref().map(|s| s.started_at),
            ended_at: now,
            stats: self.stats.clone(),
        })));
    }

    // ---- the record ----

    /// Milliseconds from the stream start (0 before it).
    fn offset(&self, now: Millis) -> u64 {
        self.stream
            .as_ref()
            .map(|s| now.saturating_sub(s.started_at).0)
            .unwrap_or(0)
    }

    fn record_session(&mut self) {
        if self.session_recorded {
            return;
        }
        if let Some(id) = &self.session_id {
            self.session_recorded = true;
            self.actions.push_back(Action::Persist(Record::SessionId {
                call_sid: self.sid.0.clone(),
                session_id: id.clone(),
            }));
        }
    }

    /// Agent turns the caller heard some of whose full transcript will not come (their
    /// session was lost, or the call ended, before it did): written with the share of their
    /// text that matches `heard` (of the ms played, sent) of the audio received, as cut.
    fn write_unfinished_agent_turns(&mut self, heard: impl Fn(u64, u64) -> u64, now: Millis) {
        let at = self.offset(now);
        for (id, played, sent, received) in self.playback.sent_items(now) {
            if self.conversation.agent_unwritten(&id) {
                let heard = heard(played, sent);
                let entry = self.conversation.agent_cut(&id, heard, received, at);
                self.write_entry(entry);
            }
        }
    }

    /// At the call's end, an agent turn already written whole whose audio had more than
    /// [`UNHEARD_TAIL_MS`] still to play (the caller hung up on it, or it was queued behind
    /// one they did) is rewritten as heard: what had played by the end (confirmed, or
    /// reckoned since the last echo), marked cut. A turn that had all but finished stays
    /// whole: the reckoning runs behind the truth by an echo's way back.
    fn cut_turns_heard_in_part(&mut self, now: Millis) {
        let at = self.offset(now);
        for (id, played, _, received) in self.playback.sent_items(now) {
            if received > played + UNHEARD_TAIL_MS && self.conversation.agent_written_whole(&id) {
                let entry = self.conversation.agent_cut(&id, played, received, at);
                self.write_entry(entry);
            }
        }
    }

    fn write_entry(&mut self, entry: Option<Entry>) {
        let Some(e) = entry else { return };
        self.remember_transcript(e.seq, e.role, &e.text);
        self.actions.push_back(Action::Persist(Record::Transcript {
            call_sid: self.sid.0.clone(),
            seq: e.seq,
            role: e.role,
            text: e.text,
            offset_ms: e.offset_ms,
            item_id: Some(e.item_id.0),
            interrupted: e.interrupted,
        }));
    }

    /// Appends one entry to the call's event log.
    fn event(&mut self, now: Millis, kind: EventKind, detail: Value) {
        let seq = self.event_seq;
        self.event_seq += 1;
        let record = kind.record(&self.sid.0, seq, now.0, detail);
        self.actions.push_back(Action::Persist(record));
    }

    // ---- logging ----

    fn drop_input(&mut self, reason: &'static str, detail: Value) {
        let n = self.stats.dropped.entry(reason).or_default();
        *n += 1;
        let count = *n;
        // A peer spraying bad frames must not flood the log: first ten, then every 100th.
        if count <= 10 || count.is_multiple_of(100) {
            self.log(
                Level::Warn,
                "bridge.dropped",
                json!({ "reason": reason, "count": count, "detail": detail }),
            );
        }
    }

    fn log(&mut self, level: Level, event: &str, fields: Value) {
        let mut line = serde_json::Map::new();
        line.insert("call_sid".into(), json!(self.sid));
        line.insert("event".into(), json!(event));
        if let Value::Object(fields) = fields {
            line.extend(fields);
        }
        self.actions.push_back(Action::Log {
            level,
            line: Value::Object(line).to_string(),
        });
    }
}

#[cfg(test)]
mod tests;
