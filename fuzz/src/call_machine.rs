//! The call machine driven by an arbitrary sequence of what its shell can hand it: frames
//! of both peers (well-formed ones built from fuzzed fields, and raw fuzzed text), binary
//! frames, closes, the OpenAI socket opening or failing, timeouts and the clock moving.
//!
//! After every input the harness drains every action and checks what must always hold, from
//! its own independent reading of the inputs (serde_json values, not the core's parsers):
//! see [`Harness`] for the list.

use crate::text::Text;
use arbitrary::Arbitrary;
use base64::Engine;
use phone_agent_bridge::audio::{base64_decoded_len, bytes_to_ms};
use phone_agent_bridge::call::{
    ahead_of_stream, Action, Call, EndReason, Input, Setup, Summary, MARK_EVERY_BYTES,
    MARK_EVERY_MS, MAX_FRAME_BYTES, TRANSCRIPT_TAIL,
};
use phone_agent_bridge::config::{is_e164, realtime_model_problem, Agent, Secret};
use phone_agent_bridge::http::{Outcome, Request};
use phone_agent_bridge::ids::Millis;
use phone_agent_bridge::recording;
use phone_agent_bridge::store::Record;
use phone_agent_bridge::tools::{self, CallContext};
use phone_agent_bridge::twilio::RestConfig;
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::OnceLock;

pub const CALL_SID: &str = "CA00000000000000000000000000000001";
pub const STREAM_SID: &str = "MZ00000000000000000000000000000001";
pub const ACCOUNT_SID: &str = "AC00000000000000000000000000000001";
const REST_BASE: &str = "https://api.twilio.test";
const REST_TOKEN: &str = "rest-token";
const TOOL_URL: &str = "https://tools.example.jp/lookup";
const FALLBACK_TWIML: &str = "<Response><Say>sorry</Say></Response>";
/// How many cut items the core remembers, to drop their late audio (a private constant of
/// the core's playback clock, mirrored here).
const CUT_MEMORY: u64 = 16;
/// Longest sequence run per input, so one input stays fast.
const MAX_OPS: usize = 512;
/// Largest audio chunk built from fields (2 s of μ-law): enough to overflow the held
/// buffers (15 s and 30 s) within a few dozen chunks.
const MAX_AUDIO_BYTES: usize = 16_000;
/// How far the clock of a recorded call may run.
const RECORDED_CLOCK_MS: u64 = 12_000;
const ITEMS: [&str; 6] = ["item_0", "item_1", "item_2", "item_3", "item_4", "item_5"];

/// The bit of [`Scenario::record`] that says the call's first socket was opened ahead of
/// the stream: its `OpenAiOpened` is handed to the call as `OpenAiOpenedConfigured`. The
/// corpus replay runs every input with it set and cleared, so inputs committed before it
/// was read still mean what they meant.
pub const PREOPENED: u8 = 0b1_0000;

#[derive(Arbitrary, Debug, Clone, Serialize)]
pub struct Scenario {
    /// Epoch ms of the call's start (kept below 2^53, the range of a JS `Date.now()`).
    pub start_ms: u64,
    pub agent: AgentChoice,
    /// Silence before the agent checks in: 5 s plus this many seconds.
    pub idle_s: u8,
    /// Whether the agent records calls (one value in four). A recording costs work per
    /// millisecond of call, so a recorded call's clock is kept within [`RECORDED_CLOCK_MS`]
    /// (past the recorder's chunk, jitter and look-ahead bounds) to keep inputs fast; an
    /// unrecorded one may run for days. Bits 2 and 3 pick how much caller audio goes to
    /// OpenAI at a time (`CALLER_AUDIO_CHUNK_MS`): 20, 40, 60 or 100 ms. Bit 4
    /// ([`PREOPENED`]): the call's first socket was opened ahead of the stream, and what
    /// `call::ahead_of_stream` gives went on it as it opened (`OPENAI_PREOPEN_SECONDS`).
    pub record: u8,
    pub ops: Vec<Op>,
}

#[derive(Arbitrary, Debug, Clone, Serialize)]
pub enum AgentChoice {
    Default,
    Custom {
        model: Text,
        greeting: Text,
        semantic_vad: bool,
        /// Bit 0 `end_call`, 1 `transfer_call`, 2 the `lookup` webhook, 3 `slow` (1 ms).
        tools: u8,
        transfer_to: Option<Text>,
        tool_secret: Option<Text>,
        /// 30 s plus this many seconds (the validated range is 30 to 14400).
        max_call_s: u16,
    },
}

#[derive(Arbitrary, Debug, Clone, Serialize)]
pub enum Op {
    Twilio(TwilioFrame),
    OpenAi(OpenAiEvent),
    TwilioRaw(Text),
    OpenAiRaw(Text),
    TwilioBinary(u16),
    OpenAiBinary(u16),
    /// A text frame just over the size bound; `u8` is how far over.
    TwilioOversized(u8),
    OpenAiOversized(u8),
    TwilioClosed {
        code: u16,
        reason: Text,
    },
    OpenAiClosed {
        code: u16,
        reason: Text,
    },
    OpenAiOpened,
    /// A failed connect, with the HTTP status of a refused upgrade (if any).
    OpenAiConnectFailed(Text, Option<u16>),
    /// The answer to one of the HTTP requests asked for (`pick` chooses which; a stale or
    /// unknown id when none is out).
    HttpDone {
        pick: u8,
        ok: bool,
        status: u16,
        body: Text,
        failed: bool,
    },
    /// `handle(Timeout)` at the current time, due or not.
    Timeout,
    /// Moves the clock to `poll_timeout()` (if any) and fires it, as the shell's alarm does.
    TimeoutWhenDue,
    Advance(u16),
    AdvanceLong(u32),
    /// The clock stepping back (the core must only ever use saturating differences).
    Back(u16),
}

#[derive(Arbitrary, Debug, Clone, Serialize)]
pub enum TwilioFrame {
    Connected,
    Start {
        stream: Sid,
        other_call: Option<Text>,
        /// `streamSid` only at the top level, as some frames put it.
        sid_outside: bool,
        no_call_sid: bool,
        encoding: Option<Text>,
        sample_rate: Option<u32>,
        params: Vec<(Text, Text)>,
    },
    Media {
        payload: Payload,
        track: Option<Text>,
        timestamp: Option<Text>,
    },
    /// Twilio's echo of a mark.
    Mark(MarkName),
    Dtmf(Text),
    Stop,
    Unknown(Text),
    /// A frame with its required part missing.
    Incomplete(u8),
}

#[derive(Arbitrary, Debug, Clone, Serialize)]
pub enum Sid {
    Usual,
    Other(Text),
}

#[derive(Arbitrary, Debug, Clone, Serialize)]
pub enum MarkName {
    /// The oldest mark sent and not yet echoed (Twilio's normal echo).
    Next,
    /// One of the marks sent, counted back from the latest.
    Sent(u8),
    Numbered(u64),
    Raw(Text),
}

#[derive(Arbitrary, Debug, Clone, Serialize)]
pub enum Payload {
    /// Valid base64 of `len` bytes (capped) of a pattern.
    Audio {
        len: u16,
        seed: u8,
    },
    /// Valid base64 written with JSON escapes (`\/`, `\u0041`), so it cannot be borrowed.
    Escaped {
        len: u16,
        seed: u8,
    },
    Raw(Text),
}

#[derive(Arbitrary, Debug, Clone, Serialize)]
pub enum Item {
    Pool(u8),
    Raw(Text),
}

#[derive(Arbitrary, Debug, Clone, Serialize)]
pub enum Format {
    Pcmu,
    Pcm,
    Pcma,
    Missing,
    Raw(Text),
}

#[derive(Arbitrary, Debug, Clone, Serialize)]
pub enum Role {
    User,
    Assistant,
    System,
    Missing,
    Raw(Text),
}

#[derive(Arbitrary, Debug, Clone, Serialize)]
pub enum OpenAiEvent {
    SessionCreated {
        id: Option<Text>,
    },
    SessionUpdated {
        id: Option<Text>,
        input: Format,
        output: Format,
    },
    Error {
        code: ErrorCode,
        message: Option<Text>,
        /// Names our `session.update` as the failed event.
        ours: bool,
    },
    SpeechStarted {
        item: Option<Item>,
        audio_start_ms: Option<u64>,
    },
    SpeechStopped {
        item: Option<Item>,
        audio_end_ms: Option<u64>,
    },
    Committed {
        item: Option<Item>,
    },
    ItemAdded {
        /// added, created (beta) or response.output_item.added.
        name: u8,
        item: Item,
        role: Role,
    },
    ItemRetrieved {
        item: Item,
        transcript: Option<Text>,
    },
    TranscriptDelta {
        beta: bool,
        item: Option<Item>,
        delta: Text,
    },
    TranscriptDone {
        beta: bool,
        item: Option<Item>,
        transcript: Text,
    },
    AudioDelta {
        beta: bool,
        item: Item,
        payload: Payload,
    },
    AudioDone {
        beta: bool,
        item: Option<Item>,
    },
    InputTranscription {
        item: Option<Item>,
        transcript: Text,
    },
    InputTranscriptionFailed {
        item: Option<Item>,
        code: Option<Text>,
    },
    Truncated {
        item: Option<Item>,
        audio_end_ms: Option<u64>,
    },
    ResponseCreated {
        id: Option<Text>,
    },
    ResponseDone {
        id: Option<Text>,
        status: Option<Text>,
        reason: Option<Text>,
        usage: Option<(u64, u64, u64)>,
    },
    RateLimits(Vec<(Text, Option<f64>)>),
    FunctionCall {
        call_id: Text,
        name: ToolName,
        arguments: Arguments,
    },
    Other(Text),
}

#[derive(Arbitrary, Debug, Clone, Serialize)]
pub enum ErrorCode {
    SessionExpired,
    ActiveResponse,
    Other(Option<Text>),
    /// The refusal of the commit the core asks for when the caller hangs up mid-turn.
    CommitEmpty,
}

#[derive(Arbitrary, Debug, Clone, Serialize)]
pub enum ToolName {
    EndCall,
    TransferCall,
    Lookup,
    Slow,
    Raw(Text),
}

#[derive(Arbitrary, Debug, Clone, Serialize)]
pub enum Arguments {
    Empty,
    Object(Vec<(Text, Text)>),
    Raw(Text),
}

// ---- building frames from fields ----

fn audio_b64(len: u16, seed: u8) -> String {
    let n = usize::from(len) % (MAX_AUDIO_BYTES + 1);
    let bytes: Vec<u8> = (0..n)
        .map(|i| seed.wrapping_add((i as u8).wrapping_mul(31)))
        .collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The payload's JSON value, and the escaped spelling of it to splice into the text.
fn payload(p: &Payload) -> (String, Option<String>) {
    match p {
        Payload::Audio { len, seed } => (audio_b64(*len, *seed), None),
        Payload::Escaped { len, seed } => {
            let b = audio_b64(*len, *seed);
            let mut escaped = String::new();
            for (i, c) in b.chars().enumerate() {
                match c {
                    '/' => escaped.push_str("\\/"),
                    c if i == 0 => escaped.push_str(&format!("\\u{:04x}", c as u32)),
                    c => escaped.push(c),
                }
            }
            (b, Some(escaped))
        }
        Payload::Raw(s) => (s.0.clone(), None),
    }
}

/// Serializes `v`, then writes the payload `plain` in its escaped spelling. Base64 needs no
/// JSON escaping, so the plain form appears verbatim exactly where the payload is.
fn splice(v: Value, plain: &str, escaped: Option<String>) -> String {
    let text = v.to_string();
    match escaped {
        Some(e) if !plain.is_empty() => {
            text.replacen(&format!("\"{plain}\""), &format!("\"{e}\""), 1)
        }
        _ => text,
    }
}

fn item(i: &Item) -> String {
    match i {
        Item::Pool(n) => ITEMS[usize::from(*n) % ITEMS.len()].to_owned(),
        Item::Raw(s) => s.0.clone(),
    }
}

fn opt_item(i: &Option<Item>) -> Value {
    i.as_ref().map(item).map_or(Value::Null, Value::String)
}

fn format(f: &Format) -> Option<String> {
    match f {
        Format::Pcmu => Some("audio/pcmu".into()),
        Format::Pcm => Some("audio/pcm".into()),
        Format::Pcma => Some("audio/pcma".into()),
        Format::Missing => None,
        Format::Raw(s) => Some(s.0.clone()),
    }
}

fn format_obj(f: &Format) -> Value {
    match format(f) {
        Some(t) if matches!(f, Format::Pcm) => json!({ "type": t, "rate": 24000 }),
        Some(t) => json!({ "type": t }),
        None => json!({}),
    }
}

/// One well-formed frame named `event`, keeping only the fields that are set.
fn obj(pairs: Vec<(&str, Value)>) -> Value {
    Value::Object(
        pairs
            .into_iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
    )
}

fn twilio_text(f: &TwilioFrame, marks: &[String], next_echo: usize) -> String {
    match f {
        TwilioFrame::Connected => {
            json!({"event":"connected","protocol":"Call","version":"1.0.0"}).to_string()
        }
        TwilioFrame::Start {
            stream,
            other_call,
            sid_outside,
            no_call_sid,
            encoding,
            sample_rate,
            params,
        } => {
            let stream = match stream {
                Sid::Usual => STREAM_SID.to_owned(),
                Sid::Other(s) => s.0.clone(),
            };
            let call = other_call.as_ref().map_or(CALL_SID, |c| &c.0);
            let mut format = serde_json::Map::new();
            format.insert(
                "encoding".into(),
                json!(encoding.as_deref().unwrap_or("audio/x-mulaw")),
            );
            format.insert("sampleRate".into(), json!(sample_rate.unwrap_or(8000)));
            format.insert("channels".into(), json!(1));
            let params: serde_json::Map<String, Value> = params
                .iter()
                .map(|(k, v)| (k.0.clone(), json!(v)))
                .collect();
            let mut start = serde_json::Map::new();
            start.insert("accountSid".into(), json!("AC1"));
            if !sid_outside {
                start.insert("streamSid".into(), json!(stream));
            }
            if !no_call_sid {
                start.insert("callSid".into(), json!(call));
            }
            start.insert("tracks".into(), json!(["inbound"]));
            start.insert("mediaFormat".into(), Value::Object(format));
            start.insert("customParameters".into(), Value::Object(params));
            json!({"event":"start","sequenceNumber":"1","start":start,"streamSid":stream})
                .to_string()
        }
        TwilioFrame::Media {
            payload: p,
            track,
            timestamp,
        } => {
            let (plain, escaped) = payload(p);
            let media = obj(vec![
                ("track", json!(track.as_deref().unwrap_or("inbound"))),
                ("chunk", json!("1")),
                (
                    "timestamp",
                    timestamp.as_ref().map_or(Value::Null, |t| json!(t)),
                ),
                ("payload", json!(plain)),
            ]);
            splice(
                json!({"event":"media","sequenceNumber":"2","media":media,"streamSid":STREAM_SID}),
                &plain,
                escaped,
            )
        }
        TwilioFrame::Mark(name) => {
            let name = match name {
                MarkName::Next => marks.get(next_echo).cloned().unwrap_or_else(|| "m0".into()),
                MarkName::Sent(back) if !marks.is_empty() => {
                    marks[marks.len() - 1 - usize::from(*back) % marks.len()].clone()
                }
                MarkName::Sent(_) => "m0".into(),
                MarkName::Numbered(n) => format!("m{n}"),
                MarkName::Raw(s) => s.0.clone(),
            };
            json!({"event":"mark","sequenceNumber":"3","streamSid":STREAM_SID,"mark":{"name":name}})
                .to_string()
        }
        TwilioFrame::Dtmf(digit) => json!({"event":"dtmf","streamSid":STREAM_SID,
            "dtmf":{"track":"inbound_track","digit":digit}})
        .to_string(),
        TwilioFrame::Stop => json!({"event":"stop","sequenceNumber":"5","streamSid":STREAM_SID,
            "stop":{"accountSid":"AC1","callSid":CALL_SID}})
        .to_string(),
        TwilioFrame::Unknown(event) => json!({"event":event,"streamSid":STREAM_SID}).to_string(),
        TwilioFrame::Incomplete(n) => match n % 6 {
            0 => r#"{"event":"start"}"#,
            1 => r#"{"event":"start","start":{"streamSid":"MZ1"}}"#,
            2 => r#"{"event":"media","media":{}}"#,
            3 => r#"{"event":"mark","mark":{}}"#,
            4 => r#"{"event":"dtmf"}"#,
            _ => r#"{"streamSid":"MZ1"}"#,
        }
        .to_owned(),
    }
}

fn openai_text(e: &OpenAiEvent) -> String {
    let ga = |beta: bool, ga: &'static str, old: &'static str| if beta { old } else { ga };
    let v = match e {
        OpenAiEvent::SessionCreated { id } => json!({"type":"session.created","event_id":"e",
            "session":obj(vec![("id", json!(id)), ("type", json!("realtime")), ("model", json!("gpt-realtime"))])}),
        OpenAiEvent::SessionUpdated { id, input, output } => json!({"type":"session.updated",
            "event_id":"e","session":obj(vec![("id", json!(id)), ("type", json!("realtime")),
            ("audio", json!({"input":{"format":format_obj(input)},
                "output":{"format":format_obj(output),"voice":"marin"}}))])}),
        OpenAiEvent::Error {
            code,
            message,
            ours,
        } => json!({"type":"error","event_id":"e","error":obj(vec![
        ("type", json!("invalid_request_error")), ("code", match code {
            ErrorCode::SessionExpired => json!("session_expired"),
            ErrorCode::ActiveResponse => json!("conversation_already_has_active_response"),
            ErrorCode::Other(c) => json!(c),
            ErrorCode::CommitEmpty => json!("input_audio_buffer_commit_empty"),
        }),
        ("message", json!(message)),
        ("event_id", match (code, ours) {
            (ErrorCode::CommitEmpty, _) => json!("evt_bridge_final_commit"),
            (_, true) => json!("evt_bridge_session_update"),
            (_, false) => Value::Null,
        })])}),
        OpenAiEvent::SpeechStarted {
            item: i,
            audio_start_ms,
        } => obj(vec![
            ("type", json!("input_audio_buffer.speech_started")),
            ("item_id", opt_item(i)),
            ("audio_start_ms", json!(audio_start_ms)),
        ]),
        OpenAiEvent::SpeechStopped {
            item: i,
            audio_end_ms,
        } => obj(vec![
            ("type", json!("input_audio_buffer.speech_stopped")),
            ("item_id", opt_item(i)),
            ("audio_end_ms", json!(audio_end_ms)),
        ]),
        OpenAiEvent::Committed { item: i } => obj(vec![
            ("type", json!("input_audio_buffer.committed")),
            ("previous_item_id", Value::Null),
            ("item_id", opt_item(i)),
        ]),
        OpenAiEvent::ItemAdded {
            name,
            item: i,
            role,
        } => {
            let kind = [
                "conversation.item.added",
                "conversation.item.created",
                "response.output_item.added",
            ][usize::from(*name) % 3];
            let role = match role {
                Role::User => json!("user"),
                Role::Assistant => json!("assistant"),
                Role::System => json!("system"),
                Role::Missing => Value::Null,
                Role::Raw(s) => json!(s),
            };
            json!({"type":kind,"item":obj(vec![("id", json!(item(i))), ("type", json!("message")),
                ("role", role), ("content", json!([]))])})
        }
        OpenAiEvent::ItemRetrieved {
            item: i,
            transcript,
        } => json!({"type":"conversation.item.retrieved","item":{"id":item(i),"type":"message",
            "role":"assistant","content":[obj(vec![("type", json!("output_audio")),
            ("transcript", json!(transcript))])]}}),
        OpenAiEvent::TranscriptDelta {
            beta,
            item: i,
            delta,
        } => obj(vec![
            (
                "type",
                json!(ga(
                    *beta,
                    "response.output_audio_transcript.delta",
                    "response.audio_transcript.delta"
                )),
            ),
            ("item_id", opt_item(i)),
            ("delta", json!(delta)),
        ]),
        OpenAiEvent::TranscriptDone {
            beta,
            item: i,
            transcript,
        } => obj(vec![
            (
                "type",
                json!(ga(
                    *beta,
                    "response.output_audio_transcript.done",
                    "response.audio_transcript.done"
                )),
            ),
            ("item_id", opt_item(i)),
            ("transcript", json!(transcript)),
        ]),
        OpenAiEvent::AudioDelta {
            beta,
            item: i,
            payload: p,
        } => {
            let (plain, escaped) = payload(p);
            let kind = ga(*beta, "response.output_audio.delta", "response.audio.delta");
            return splice(
                json!({"type":kind,"event_id":"e","response_id":"resp_1","item_id":item(i),
                    "output_index":0,"content_index":0,"delta":plain}),
                &plain,
                escaped,
            );
        }
        OpenAiEvent::AudioDone { beta, item: i } => obj(vec![
            (
                "type",
                json!(ga(
                    *beta,
                    "response.output_audio.done",
                    "response.audio.done"
                )),
            ),
            ("item_id", opt_item(i)),
        ]),
        OpenAiEvent::InputTranscription {
            item: i,
            transcript,
        } => obj(vec![
            (
                "type",
                json!("conversation.item.input_audio_transcription.completed"),
            ),
            ("item_id", opt_item(i)),
            ("content_index", json!(0)),
            ("transcript", json!(transcript)),
        ]),
        OpenAiEvent::InputTranscriptionFailed { item: i, code } => obj(vec![
            (
                "type",
                json!("conversation.item.input_audio_transcription.failed"),
            ),
            ("item_id", opt_item(i)),
            (
                "error",
                obj(vec![
                    ("type", json!("transcription_error")),
                    ("code", json!(code)),
                ]),
            ),
        ]),
        OpenAiEvent::Truncated {
            item: i,
            audio_end_ms,
        } => obj(vec![
            ("type", json!("conversation.item.truncated")),
            ("item_id", opt_item(i)),
            ("content_index", json!(0)),
            ("audio_end_ms", json!(audio_end_ms)),
        ]),
        OpenAiEvent::ResponseCreated { id } => {
            json!({"type":"response.created","response":obj(vec![("id", json!(id)), ("status", json!("in_progress"))])})
        }
        OpenAiEvent::ResponseDone {
            id,
            status,
            reason,
            usage,
        } => json!({"type":"response.done","response":obj(vec![
            ("id", json!(id)), ("status", json!(status)),
            ("status_details", obj(vec![("type", json!(status)), ("reason", json!(reason))])),
            ("usage", usage.map_or(Value::Null, |(t, i, o)|
                json!({"total_tokens":t,"input_tokens":i,"output_tokens":o}))),
        ])}),
        OpenAiEvent::RateLimits(limits) => json!({"type":"rate_limits.updated","rate_limits":
            limits.iter().map(|(n, l)| json!({"name":n,"limit":l,"remaining":l,"reset_seconds":1.5}))
            .collect::<Vec<_>>()}),
        OpenAiEvent::FunctionCall {
            call_id,
            name,
            arguments,
        } => {
            let name = match name {
                ToolName::EndCall => "end_call".to_owned(),
                ToolName::TransferCall => "transfer_call".to_owned(),
                ToolName::Lookup => "lookup".to_owned(),
                ToolName::Slow => "slow".to_owned(),
                ToolName::Raw(s) => s.0.clone(),
            };
            let arguments = match arguments {
                Arguments::Empty => String::new(),
                Arguments::Object(pairs) => {
                    Value::Object(pairs.iter().map(|(k, v)| (k.0.clone(), json!(v))).collect())
                        .to_string()
                }
                Arguments::Raw(s) => s.0.clone(),
            };
            json!({"type":"response.function_call_arguments.done","event_id":"e",
                "response_id":"resp_1","item_id":"fc_1","output_index":0,
                "call_id":call_id,"name":name,"arguments":arguments})
        }
        OpenAiEvent::Other(kind) => json!({"type":kind,"event_id":"e"}),
    };
    v.to_string()
}

/// A text frame of `MAX_FRAME_BYTES + 1 + extra` bytes (the tail of a huge JSON frame).
fn oversized(extra: u8) -> &'static str {
    static BIG: OnceLock<String> = OnceLock::new();
    let big = BIG.get_or_init(|| {
        let mut s = String::from(r#"{"event":"media","type":"x","pad":""#);
        s.extend(std::iter::repeat_n('a', MAX_FRAME_BYTES + 300));
        s.push_str("\"}");
        s
    });
    &big[big.len() - (MAX_FRAME_BYTES + 1 + usize::from(extra))..]
}

// ---- the harness ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Socket {
    /// Asked for, not yet open.
    Connecting,
    Open,
    /// Closed by either side, or never opened.
    Gone,
}

/// Which peer's text an input was, read independently of the core.
enum Read {
    /// A Twilio frame parsed as JSON.
    Twilio(Value),
    OpenAi(Value),
    Other,
}

impl Read {
    fn is(&self, name: &str) -> bool {
        match self {
            Read::Twilio(v) => v["event"].as_str() == Some(name),
            Read::OpenAi(v) => v["type"].as_str() == Some(name),
            Read::Other => false,
        }
    }
}

#[derive(Debug, Clone)]
struct SentMark {
    name: String,
    item: String,
    /// Bytes of the item sent to Twilio, all told, once the chunk before this mark was.
    sent_after: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HttpKind {
    Tool,
    Rest,
}

/// The agent's configuration as the harness needs it.
struct Config {
    tools: u8,
    transfer_to: Option<String>,
    tool_secret: Option<String>,
}

/// Drives one [`Call`] as its shell would and checks, after every input:
///
/// - every `SendTwilio`/`SendOpenAi` is valid JSON of a kind the bridge sends; every log
///   line is a JSON object naming the call; every record names the call and turns into
///   statements;
/// - nothing goes to Twilio before an accepted `start` (the `CallConnected` record) of this
///   call, and everything sent there names that stream;
/// - agent audio reaches Twilio only after a `session.updated` with `audio/pcmu` both ways
///   in the current session, exactly as OpenAI sent it (same payload, same item, in order,
///   marks after it at least every `MARK_EVERY_BYTES` of audio and `MARK_EVERY_MS` of
///   time); audio accepted before `start` is flushed in order
///   when it comes, less what the bound, a barge-in or a reconnect dropped; audio of an item
///   cut by a barge-in is not played while the core still remembers the cut;
/// - caller audio reaches OpenAI exactly as Twilio sent it, in order, less the oldest
///   frames dropped by the bound, and only into a ready session;
/// - a truncate's `audio_end_ms` never exceeds what of that item was sent to Twilio, nor
///   what Twilio confirmed played by echoing a mark plus the time since playback was last
///   known (an echo or a clear); a `clear` precedes it when the stream
///   is live; a retrieve of the same item follows it exactly when `audio_end_ms > 0`;
/// - one OpenAI socket at a time: `ConnectOpenAi` only when none is open or being opened;
///   the first event on each socket is `session.update`, and (while the shell keeps its
///   side of the contract: OpenAI frames only on an open socket) nothing is sent to a
///   socket that is not open; everything but `session.update` waits for the session to
///   be ready;
/// - the greeting is asked for once (again only in a new session after a loss before any
///   agent audio reached Twilio since it was asked), only with both the stream and the session ready; no
///   other `response.create` while a response is active, one is awaited, or a tool runs;
/// - HTTP requests have unique ids; a tool's request goes to its URL with the call's
///   context, signed with the agent's secret over the exact body when it has one; at most
///   one Twilio REST request (hang-up or transfer) per call, to this call's resource, and
///   a transfer's TwiML is well-formed and dials the configured number;
/// - a mark Twilio echoes that we sent is never counted unknown, and one counted unknown
///   was never sent;
/// - only a `stop`, a close, a failed connect, a timeout, a session rejection or expiry, or
///   a failed REST request ends a call: bad input never does;
/// - the end happens once: `CallEnded` then `Ended` last; the sockets are closed as the
///   reason requires; nothing at all follows, and `poll_timeout` is `None`;
/// - a `Timeout` before `poll_timeout` does nothing; timeouts at one instant settle (the
///   shell's timer loop cannot spin);
/// - the summary agrees with what was seen: frames and bytes relayed, barge-ins, stream
///   and timestamps, stats.
pub struct Harness {
    call: Call,
    config: Config,
    now: Millis,
    openai: Socket,
    /// The shell's contract held so far (OpenAI frames only while its socket is open).
    contract: bool,
    ended: bool,
    closed_twilio: bool,
    stream_sid: Option<String>,
    /// The current session confirmed μ-law both ways.
    pcmu_seen: bool,
    session_update_sent: bool,
    /// What went ahead on the first socket as it opened, while it is still to open (see
    /// [`PREOPENED`]); gone once it opened, failed, or another connect was asked for.
    ahead: Option<Vec<String>>,
    greeted: bool,
    response_active: bool,
    response_awaited: bool,
    /// Agent audio accepted before `start`: (item, payload).
    held: VecDeque<(String, String)>,
    /// Caller audio accepted and not yet sent to OpenAI, a frame (μ-law) at a time.
    caller: VecDeque<Vec<u8>>,
    marks: Vec<SentMark>,
    /// Index of the first mark not yet echoed.
    next_echo: usize,
    sent: HashMap<String, u64>,
    confirmed: HashMap<String, u64>,
    /// When playback was last known for certain (a mark's echo, or a clear): between
    /// echoes the core reckons it on the clock, never faster than 1 ms a ms since then.
    known_at: Millis,
    /// Item -> the number of cuts before its latest cut.
    cut_at: HashMap<String, u64>,
    cuts: u64,
    barge_ins: u64,
    /// Items of sessions since replaced: what of them was sent and not confirmed played may
    /// still be playing at Twilio, so a barge-in clears it (with nothing to truncate).
    orphans: Vec<String>,
    agent_frames: u64,
    /// `agent_frames` when the greeting was asked for: none of it was heard while no agent
    /// audio has gone to Twilio since (audio held from before `start` goes before it).
    agent_frames_at_greeting: u64,
    agent_bytes: u64,
    event_seq: u64,
    session_recorded: bool,
    /// HTTP requests out and not yet answered.
    http: BTreeMap<u64, HttpKind>,
    http_ids: BTreeSet<u64>,
    /// Tool requests of the current session still running.
    tools_running: BTreeSet<u64>,
    rest_requests: u32,
    rest_body: Option<String>,
    /// Stereo PCM bytes of the recording handed out so far, and whether it is complete.
    recorded: u64,
    recording_done: bool,
    /// The furthest the stream clock has been (ms from `start`).
    max_offset: u64,
    started_at: Option<Millis>,
    clock_limit: u64,
    /// The end reason the fallback redirect was started for (`call.fallback`).
    failing: Option<String>,
    /// Agent audio sent with no mark after it yet: its item, bytes and when it began.
    unmarked: Option<(String, u64, Millis)>,
    /// The core has closed its OpenAI socket and asked for no other since.
    core_closed_openai: bool,
    /// Twilio's side ended (`stop`, or its socket closed) at this time, and the call waits
    /// for the caller's last transcript before it ends (the core's transcript tail).
    tail_at: Option<Millis>,
    /// Twilio's socket has closed (the input said so): nothing is left to close.
    twilio_gone: bool,
    /// The core asked for the caller's words so far to be committed at Twilio's end.
    final_commit: bool,
}

/// A `mark` sent to Twilio.
fn is_mark(a: &Action) -> bool {
    matches!(a, Action::SendTwilio(s)
        if serde_json::from_str::<Value>(s).is_ok_and(|v| v["event"] == "mark"))
}

fn fail(msg: impl AsRef<str>) -> ! {
    panic!("invariant violated: {}", msg.as_ref())
}

macro_rules! check {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            fail(format!($($fmt)+));
        }
    };
}

/// Milestones reached, counted only when [`count_milestones`] turned counting on (a
/// corpus report uses it to see what the seeds reach).
static COUNTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static MILESTONES: std::sync::Mutex<BTreeMap<&'static str, u64>> =
    std::sync::Mutex::new(BTreeMap::new());

fn milestone(name: &'static str) {
    if COUNTING.load(std::sync::atomic::Ordering::Relaxed) {
        *MILESTONES.lock().unwrap().entry(name).or_default() += 1;
    }
}

/// Turns milestone counting on and returns the counts so far.
pub fn count_milestones() -> BTreeMap<&'static str, u64> {
    COUNTING.store(true, std::sync::atomic::Ordering::Relaxed);
    MILESTONES.lock().unwrap().clone()
}

/// Actions as a panic message shows them: recording chunks by their size only.
fn brief(actions: &[Action]) -> String {
    let parts: Vec<String> = actions
        .iter()
        .map(|a| match a {
            Action::RecordingData(pcm) => format!("RecordingData({} bytes)", pcm.len()),
            other => format!("{other:?}"),
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str)
}

fn tool_list(bits: u8) -> Vec<Value> {
    let mut tools = Vec::new();
    if bits & 1 != 0 {
        tools.push(json!({"type": "end_call"}));
    }
    if bits & 2 != 0 {
        tools.push(json!({"type": "transfer_call"}));
    }
    if bits & 4 != 0 {
        tools.push(
            json!({"type": "function", "name": "lookup", "description": "d",
            "parameters": {"type": "object"}, "url": TOOL_URL}),
        );
    }
    if bits & 8 != 0 {
        tools.push(json!({"type": "function", "name": "slow", "url": TOOL_URL, "timeout_ms": 1}));
    }
    tools
}

/// What the harness does with each input besides handing it over.
struct Step<'a> {
    input: Input<'a>,
    read: Read,
    changes: Changes,
}

impl Step<'_> {
    /// Twilio's side ends with this step: its `stop`, or its socket closing.
    fn twilio_end(&self) -> bool {
        self.read.is("stop") || matches!(self.input, Input::TwilioClosed { .. })
    }
}

impl Harness {
    pub fn new(s: &Scenario) -> Self {
        let now = Millis(s.start_ms & ((1 << 53) - 1));
        let record = s.record.is_multiple_of(4);
        let mut agent = Agent {
            record_calls: record,
            ..Agent::default()
        };
        let mut config = Config {
            tools: 0,
            transfer_to: None,
            tool_secret: None,
        };
        if let AgentChoice::Custom {
            model,
            greeting,
            semantic_vad,
            tools,
            transfer_to,
            tool_secret,
            max_call_s,
        } = &s.agent
        {
            // Agents are validated before a call uses them (`Agent::validate`): keep to
            // what passes, with the fuzzed value wherever it does (a model must name a
            // Realtime model: fuzzed text that does not is tried as the suffix of one).
            for fuzzed in [model.0.clone(), format!("gpt-realtime-{}", model.0)] {
                if realtime_model_problem(&fuzzed).is_none() {
                    agent.model = fuzzed;
                    break;
                }
            }
            agent.greeting = greeting.0.clone();
            if *semantic_vad {
                agent.turn_detection.kind = "semantic_vad".into();
            }
            agent.tools = tool_list(*tools);
            agent.transfer_number = transfer_to.as_ref().map(|n| {
                if is_e164(n) {
                    n.0.clone()
                } else {
                    "+81312345678".to_owned()
                }
            });
            agent.tool_secret = tool_secret.clone().map(|t| Secret::new(t.0));
            agent.max_call_seconds = 30 + u32::from(*max_call_s) % (4 * 3600 - 29);
            config = Config {
                tools: *tools,
                transfer_to: agent.transfer_number.clone(),
                tool_secret: tool_secret.clone().map(String::from),
            };
        }
        if let Err(e) = agent.validate() {
            fail(format!(
                "the harness built an agent no call could have: {e}"
            ));
        }
        let model = agent.model.clone();
        let ahead = (s.record & PREOPENED != 0).then(|| ahead_of_stream(&agent));
        let setup = Setup {
            context: CallContext {
                call_sid: CALL_SID.into(),
                account_sid: ACCOUNT_SID.into(),
                from: "+819012345678".into(),
                to: "+815012345678".into(),
                agent_id: agent.id.clone(),
            },
            agent,
            twilio_rest: RestConfig {
                base_url: REST_BASE.into(),
                account_sid: String::new(),
                auth_token: Secret::new(REST_TOKEN),
            },
            idle_timeout: Millis(5_000 + u64::from(s.idle_s) * 1000),
            caller_chunk: Millis([20, 40, 60, 100][usize::from(s.record >> 2) & 3]),
            fallback_twiml: FALLBACK_TWIML.into(),
            transfer_action: "https://bridge.example/api/twilio/transfer-result".into(),
        };
        let mut call = Call::new(setup, now);
        let first = call.poll_action();
        check!(
            first == Some(Action::ConnectOpenAi { model }),
            "a new call first asks for the OpenAI socket: {first:?}"
        );
        let mut h = Harness {
            call,
            config,
            now,
            openai: Socket::Connecting,
            contract: true,
            ended: false,
            closed_twilio: false,
            stream_sid: None,
            pcmu_seen: false,
            session_update_sent: false,
            ahead,
            greeted: false,
            response_active: false,
            response_awaited: false,
            held: VecDeque::new(),
            caller: VecDeque::new(),
            marks: Vec::new(),
            next_echo: 0,
            sent: HashMap::new(),
            confirmed: HashMap::new(),
            known_at: Millis::ZERO,
            cut_at: HashMap::new(),
            cuts: 0,
            barge_ins: 0,
            orphans: Vec::new(),
            agent_frames: 0,
            agent_frames_at_greeting: 0,
            agent_bytes: 0,
            event_seq: 0,
            session_recorded: false,
            http: BTreeMap::new(),
            http_ids: BTreeSet::new(),
            tools_running: BTreeSet::new(),
            rest_requests: 0,
            rest_body: None,
            recorded: 0,
            recording_done: false,
            max_offset: 0,
            started_at: None,
            clock_limit: now.0 + if record { RECORDED_CLOCK_MS } else { 1 << 40 },
            failing: None,
            core_closed_openai: false,
            unmarked: None,
            tail_at: None,
            final_commit: false,
            twilio_gone: false,
        };
        let rest = h.drain();
        let step = Step {
            input: Input::Timeout,
            read: Read::Other,
            changes: Changes::default(),
        };
        h.check_actions(&rest, &step);
        h
    }

    pub fn run(s: &Scenario) {
        let mut h = Harness::new(s);
        for op in s.ops.iter().take(MAX_OPS) {
            h.step(op);
        }
        // Every sequence ends with the caller's socket closing, so the end is checked too.
        h.feed(Input::TwilioClosed {
            code: 1000,
            reason: "",
        });
        // Waiting for the caller's last transcript: it ends by the tail's deadline.
        if let Some(at) = h.tail_at.filter(|_| !h.ended) {
            h.now = at + TRANSCRIPT_TAIL;
            h.feed(Input::Timeout);
        }
        check!(h.ended, "a call whose Twilio socket closed has ended");
    }

    pub fn step(&mut self, op: &Op) {
        match op {
            Op::Twilio(f) => {
                let names: Vec<String> = self.marks.iter().map(|m| m.name.clone()).collect();
                let text = twilio_text(f, &names, self.next_echo);
                self.feed(Input::TwilioText(&text));
            }
            Op::OpenAi(e) => {
                let text = openai_text(e);
                self.feed(Input::OpenAiText(&text));
            }
            Op::TwilioRaw(s) => self.feed(Input::TwilioText(s)),
            Op::OpenAiRaw(s) => self.feed(Input::OpenAiText(s)),
            Op::TwilioBinary(n) => self.feed(Input::TwilioBinary {
                len: usize::from(*n),
            }),
            Op::OpenAiBinary(n) => self.feed(Input::OpenAiBinary {
                len: usize::from(*n),
            }),
            Op::TwilioOversized(n) => self.feed(Input::TwilioText(oversized(*n))),
            Op::OpenAiOversized(n) => self.feed(Input::OpenAiText(oversized(*n))),
            Op::TwilioClosed { code, reason } => self.feed(Input::TwilioClosed {
                code: *code,
                reason,
            }),
            Op::OpenAiClosed { code, reason } => self.feed(Input::OpenAiClosed {
                code: *code,
                reason,
            }),
            Op::OpenAiOpened => match self.ahead.take() {
                Some(ahead) if self.openai == Socket::Connecting => {
                    self.sent_ahead(&ahead);
                    self.feed(Input::OpenAiOpenedConfigured)
                }
                _ => self.feed(Input::OpenAiOpened),
            },
            Op::OpenAiConnectFailed(reason, status) => {
                // The shell's next connect is its own.
                self.ahead = None;
                self.feed(Input::OpenAiConnectFailed {
                    reason,
                    status: *status,
                })
            }
            Op::HttpDone {
                pick,
                ok,
                status,
                body,
                failed,
            } => {
                let ids: Vec<u64> = self.http.keys().copied().collect();
                let id = if ids.is_empty() {
                    u64::from(*pick)
                } else {
                    ids[usize::from(*pick) % ids.len()]
                };
                let outcome = if *failed {
                    Outcome::Failed {
                        reason: body.0.clone(),
                    }
                } else {
                    Outcome::Response {
                        status: if *ok { 200 } else { *status },
                        body: body.0.clone(),
                    }
                };
                self.feed(Input::HttpDone {
                    id,
                    outcome: &outcome,
                });
            }
            Op::Timeout => self.fire(),
            Op::TimeoutWhenDue => {
                if let Some(at) = self.call.poll_timeout() {
                    if at > self.now {
                        self.advance(at.0 - self.now.0);
                    }
                    self.fire();
                }
            }
            Op::Advance(ms) => self.advance(u64::from(*ms)),
            Op::AdvanceLong(ms) => self.advance(u64::from(*ms)),
            Op::Back(ms) => self.now = self.now.saturating_sub(Millis(u64::from(*ms))),
        }
    }

    fn advance(&mut self, ms: u64) {
        self.now = Millis((self.now.0 + ms).min(self.clock_limit));
    }

    /// A `Timeout` now; when it was due, the shell's timer fires again while the next one
    /// is due at once, which must stop: the timer loop cannot spin.
    fn fire(&mut self) {
        for _ in 0..8 {
            self.feed(Input::Timeout);
            match self.call.poll_timeout() {
                Some(at) if at <= self.now => continue,
                _ => return,
            }
        }
        fail(format!(
            "the timer is due again and again at {:?}: {:?}",
            self.now,
            self.call.poll_timeout()
        ));
    }

    fn drain(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        while let Some(a) = self.call.poll_action() {
            out.push(a);
            check!(out.len() < 1_000_000, "the action queue never ends");
        }
        out
    }

    /// The next chunk of the recording was handed out.
    fn recording_data(&mut self, pcm: &[u8]) {
        check!(
            self.stream_sid.is_some(),
            "recording before the stream started"
        );
        check!(!self.recording_done, "recording data after it was complete");
        check!(!pcm.is_empty(), "an empty recording chunk");
        check!(
            (pcm.len() as u64).is_multiple_of(recording::FRAME_BYTES),
            "a recording chunk of {} bytes splits a stereo frame",
            pcm.len()
        );
        self.recorded += pcm.len() as u64;
    }

    /// A mark went to Twilio: it confirms, once echoed, the unmarked audio before it.
    fn sent_mark(&mut self, v: &Value) {
        check!(
            self.stream_sid.is_some()
                && v["streamSid"] == self.stream_sid.as_deref().unwrap_or_default(),
            "a mark with the wrong streamSid, or before start: {v}"
        );
        let name =
            str_at(v, "/mark/name").unwrap_or_else(|| fail(format!("mark without a name: {v}")));
        check!(
            !self.marks.iter().any(|m| m.name == name),
            "mark name {name:?} reused"
        );
        let Some((item, _, _)) = self.unmarked.take() else {
            fail(format!("a mark with no unmarked audio before it: {v}"))
        };
        self.marks.push(SentMark {
            name: name.to_owned(),
            sent_after: self.sent.get(&item).copied().unwrap_or(0),
            item,
        });
    }

    /// Hands one input to the call and checks everything it did.
    pub fn feed(&mut self, input: Input<'_>) {
        // The shell's side of the contract: OpenAI frames only while its socket is open.
        let (allowed, next) = match input {
            Input::OpenAiOpened | Input::OpenAiOpenedConfigured => {
                (self.openai == Socket::Connecting, Socket::Open)
            }
            Input::OpenAiConnectFailed { .. } => (self.openai == Socket::Connecting, Socket::Gone),
            Input::OpenAiText(_) | Input::OpenAiBinary { .. } => {
                (self.openai == Socket::Open, self.openai)
            }
            Input::OpenAiClosed { .. } => (self.openai == Socket::Open, Socket::Gone),
            _ => (true, self.openai),
        };
        if !allowed {
            self.contract = false;
        }
        let read = match input {
            // Frames over the bound are dropped unread: no need to read them either.
            Input::TwilioText(t) | Input::OpenAiText(t) if t.len() > MAX_FRAME_BYTES => Read::Other,
            Input::TwilioText(t) => serde_json::from_str(t).map_or(Read::Other, Read::Twilio),
            Input::OpenAiText(t) => serde_json::from_str(t).map_or(Read::Other, Read::OpenAi),
            _ => Read::Other,
        };
        let dropped_before = self.call.stats().dropped.clone();
        let due = self.call.poll_timeout();
        let was_ended = self.ended;
        if matches!(input, Input::TwilioClosed { .. }) {
            self.twilio_gone = true;
        }

        self.call.handle(input, self.now);
        let actions = self.drain();

        if was_ended {
            check!(
                actions.is_empty(),
                "nothing follows the end, yet {input:?} gave {}",
                brief(&actions)
            );
            check!(
                self.call.poll_timeout().is_none(),
                "an ended call has no timeout"
            );
            return;
        }
        if let Some(at) = self.tail_at {
            if !actions.iter().any(|a| matches!(a, Action::Ended(_))) {
                // Over but for the caller's last transcript: nothing happens but its record
                // (a transcript row, or a failed transcription's event and row).
                for a in &actions {
                    match a {
                        Action::Persist(Record::Event { seq, .. }) => {
                            check!(*seq == self.event_seq, "event seq in the tail");
                            self.event_seq += 1;
                        }
                        Action::Persist(Record::Transcript { .. }) | Action::Log { .. } => {}
                        other => fail(format!(
                            "in the transcript tail, {input:?} did {}",
                            brief(std::slice::from_ref(other))
                        )),
                    }
                }
                check!(
                    self.call.poll_timeout() == Some(at + TRANSCRIPT_TAIL),
                    "the tail's deadline"
                );
                if allowed {
                    self.openai = next;
                }
                return;
            }
        }
        if self.openai != Socket::Open
            && matches!(input, Input::OpenAiText(_) | Input::OpenAiBinary { .. })
        {
            // No socket is open (closed, given up on, or not open yet): whatever the shell
            // hands over against its contract changes nothing (but time: a stale mark, the
            // recording).
            check!(
                actions
                    .iter()
                    .all(|a| matches!(a, Action::RecordingData(_)) || is_mark(a)),
                "an OpenAI frame with no socket open did something: {}",
                brief(&actions)
            );
            for a in &actions {
                if let Action::SendTwilio(s) = a {
                    self.sent_mark(&serde_json::from_str(s).expect("checked"));
                }
            }
            check!(
                dropped_before == self.call.stats().dropped,
                "an OpenAI frame with no socket open was counted"
            );
            // The recording settles with the clock on any input.
            for a in &actions {
                if let Action::RecordingData(pcm) = a {
                    self.recording_data(pcm);
                }
            }
            if allowed {
                self.openai = next;
            }
            return;
        }
        if matches!(input, Input::Timeout) && due.is_none_or(|d| self.now < d) {
            // The recording settles with the clock on any input, and audio unmarked for
            // 100 ms is marked; nothing else may happen.
            check!(
                actions
                    .iter()
                    .all(|a| matches!(a, Action::RecordingData(_)) || is_mark(a)),
                "a Timeout before poll_timeout ({due:?}, now {:?}) does nothing: {}",
                self.now,
                brief(&actions)
            );
        }
        if allowed {
            self.openai = next;
        }
        if matches!(
            input,
            Input::OpenAiClosed { .. } | Input::OpenAiConnectFailed { .. }
        ) {
            // The server closed it, or it never opened: the core has nothing left to close,
            // and reads nothing more from it (even when the shell broke its contract).
            self.core_closed_openai = true;
            self.openai = Socket::Gone;
        }
        if let Input::HttpDone { id, .. } = input {
            self.http.remove(&id);
            self.tools_running.remove(&id);
        }
        let changes = Changes::new(&dropped_before, &self.call.stats().dropped);
        let step = Step {
            input,
            read,
            changes,
        };
        let twilio_end = step.twilio_end();
        self.before_actions(&step);
        self.check_actions(&actions, &step);
        if twilio_end && !self.ended && self.tail_at.is_none() {
            // Twilio's side is over and the call did not end: the core waits for the
            // caller's last transcript, and says when it stops waiting.
            check!(
                self.call.poll_timeout() == Some(self.now + TRANSCRIPT_TAIL),
                "a call waiting for its last transcript after {input:?} wakes at the tail's end"
            );
            self.tail_at = Some(self.now);
        }
        if self.ended {
            check!(
                self.call.poll_timeout().is_none(),
                "an ended call has no timeout"
            );
        }
    }

    /// What an accepted input changes in the harness's own picture of the call.
    fn before_actions(&mut self, step: &Step<'_>) {
        let ch = &step.changes;
        // The core accepted an input when it dropped nothing but to a buffer bound (media
        // before `start` is held until it comes, to a bound of its own).
        let accepted = !ch.any_except(&[
            "agent_audio_overflow",
            "caller_audio_overflow",
            "twilio_media_before_start",
        ]);
        match &step.read {
            Read::Twilio(v) if accepted && v["event"] == "media" => {
                if let Some(p) = str_at(v, "/media/payload") {
                    let mut frame = Vec::new();
                    check!(
                        phone_agent_bridge::audio::base64_decode_into(p, &mut frame),
                        "caller audio accepted that is not base64"
                    );
                    self.caller.push_back(frame);
                }
            }
            Read::Twilio(v) if v["event"] == "mark" => {
                if let Some(name) = str_at(v, "/mark/name") {
                    let pos = self.marks.iter().position(|m| m.name == name);
                    if ch.get("twilio_unknown_mark") > 0 {
                        check!(
                            pos.is_none(),
                            "mark {name:?} was sent, yet its echo was counted unknown"
                        );
                    }
                    if let (Some(pos), true) = (pos, accepted) {
                        // Twilio plays in order: this echo confirms every mark before it.
                        for m in &self.marks[..=pos] {
                            let c = self.confirmed.entry(m.item.clone()).or_default();
                            *c = (*c).max(m.sent_after);
                        }
                        self.next_echo = self.next_echo.max(pos + 1);
                        self.known_at = self.now;
                        milestone("mark echoed");
                    }
                }
            }
            Read::OpenAi(v) if accepted => {
                let kind = v["type"].as_str().unwrap_or_default();
                match kind {
                    "session.updated"
                        if str_at(v, "/session/audio/input/format/type") == Some("audio/pcmu")
                            && str_at(v, "/session/audio/output/format/type")
                                == Some("audio/pcmu") =>
                    {
                        self.pcmu_seen = true
                    }
                    "response.created" => {
                        self.response_active = true;
                        self.response_awaited = false;
                    }
                    "response.done" => self.response_active = false,
                    "error"
                        if str_at(v, "/error/code")
                            == Some("conversation_already_has_active_response") =>
                    {
                        self.response_awaited = false
                    }
                    "response.output_audio.delta" | "response.audio.delta" => {
                        if let (Some(i), Some(d), None) =
                            (v["item_id"].as_str(), v["delta"].as_str(), &self.stream_sid)
                        {
                            self.held.push_back((i.to_owned(), d.to_owned()));
                        }
                    }
                    _ => {}
                }
            }
            _ => {}
        }
        let early = ch.get("twilio_media_before_start");
        check!(
            early == 0 || self.stream_sid.is_none(),
            "caller audio dropped as before start after start"
        );
        for _ in 0..early + ch.get("caller_audio_overflow") {
            check!(
                self.caller.pop_front().is_some(),
                "caller audio dropped by the bound that was never held"
            );
        }
        for _ in 0..ch.get("agent_audio_overflow") {
            check!(
                self.held.pop_front().is_some(),
                "agent audio dropped by the bound that was never held"
            );
        }
    }

    /// The agent audio this input was, when the core accepted it.
    fn accepted_delta(step: &Step<'_>) -> Option<(String, String)> {
        let Read::OpenAi(v) = &step.read else {
            return None;
        };
        if !matches!(
            v["type"].as_str(),
            Some("response.output_audio.delta" | "response.audio.delta")
        ) || step
            .changes
            .any_except(&["agent_audio_overflow", "caller_audio_overflow"])
        {
            return None;
        }
        Some((
            v["item_id"].as_str()?.to_owned(),
            v["delta"].as_str()?.to_owned(),
        ))
    }

    fn check_actions(&mut self, actions: &[Action], step: &Step<'_>) {
        let input = &step.input;
        let delta = Self::accepted_delta(step);
        let is_start = actions
            .iter()
            .any(|a| matches!(a, Action::Persist(Record::CallConnected { .. })));
        let mut medias = 0usize;
        let mut cleared = false;
        let mut truncated = false;
        let mut expect_retrieve: Option<String> = None;
        let mut closed_openai = 0;
        let mut close_twilio: Option<u16> = None;
        let mut call_ended_record = false;
        let mut ended: Option<&Summary> = None;
        let mut recording_chunk = false;
        let mut reconnect_after_close = false;
        let closed_before = self.core_closed_openai;
        let mut close_explained = false;

        for (idx, a) in actions.iter().enumerate() {
            check!(
                ended.is_none(),
                "{} after Ended",
                brief(std::slice::from_ref(a))
            );
            if let Some(item) = expect_retrieve.take() {
                let ok = matches!(a, Action::SendOpenAi(s)
                    if serde_json::from_str::<Value>(s).is_ok_and(|v|
                        v["type"] == "conversation.item.retrieve" && v["item_id"] == item.as_str()));
                check!(
                    ok,
                    "a truncate after audio was heard is followed by a retrieve of {item:?}: {}",
                    brief(std::slice::from_ref(a))
                );
                continue;
            }
            match a {
                Action::ConnectOpenAi { .. } => {
                    if self.contract {
                        check!(
                            self.openai == Socket::Gone,
                            "a second OpenAI socket asked for while one is {:?} (on {input:?})",
                            self.openai
                        );
                    }
                    check!(
                        matches!(
                            input,
                            Input::OpenAiClosed { .. }
                                | Input::OpenAiConnectFailed { .. }
                                | Input::Timeout
                        ) || step.read.is("error"),
                        "a reconnect on {input:?}"
                    );
                    milestone("reconnect");
                    for (item, sent) in &self.sent {
                        let heard = self.confirmed.get(item).copied().unwrap_or(0);
                        if heard < *sent && !self.cut_at.contains_key(item) {
                            self.orphans.push(item.clone());
                        }
                    }
                    // A new session: everything of the old one is gone.
                    reconnect_after_close = closed_openai > 0;
                    self.core_closed_openai = false;
                    self.openai = Socket::Connecting;
                    self.pcmu_seen = false;
                    self.session_update_sent = false;
                    self.ahead = None;
                    self.response_active = false;
                    self.response_awaited = false;
                    // A greeting lost before any of it reached the caller is asked again.
                    if self.agent_frames == self.agent_frames_at_greeting {
                        self.greeted = false;
                    }
                    self.tools_running.clear();
                    self.held.clear();
                }
                Action::SendTwilio(s) => {
                    check!(!self.closed_twilio, "SendTwilio after CloseTwilio");
                    let v: Value = serde_json::from_str(s)
                        .unwrap_or_else(|e| fail(format!("SendTwilio is not JSON ({e}): {s}")));
                    let Some(sid) = &self.stream_sid else {
                        fail(format!("sent to Twilio before start: {s}"))
                    };
                    check!(v["streamSid"] == sid.as_str(), "wrong streamSid: {s}");
                    match v["event"].as_str() {
                        Some("media") => {
                            let p = str_at(&v, "/media/payload")
                                .unwrap_or_else(|| fail(format!("media without payload: {s}")));
                            let bytes = base64_decoded_len(p)
                                .unwrap_or_else(|| fail(format!("media payload not base64: {s}")))
                                as u64;
                            check!(
                                self.pcmu_seen,
                                "agent audio before a μ-law session.updated (on {input:?})"
                            );
                            let item = if is_start {
                                let Some((item, held)) = self.held.pop_front() else {
                                    fail(format!("media at start that was never held: {s}"))
                                };
                                check!(held == p, "held audio flushed out of order or changed");
                                item
                            } else {
                                let Some((item, d)) = &delta else {
                                    fail(format!("media not in answer to agent audio: {input:?}"))
                                };
                                check!(medias == 0, "one delta, one media chunk");
                                check!(d == p, "agent audio changed on the way");
                                item.clone()
                            };
                            if let Some(&c) = self.cut_at.get(&item) {
                                check!(
                                    self.cuts - c > CUT_MEMORY,
                                    "audio of {item:?} played after a barge-in cut it"
                                );
                            }
                            milestone(if is_start {
                                "agent audio flushed at start"
                            } else {
                                "agent audio relayed"
                            });
                            medias += 1;
                            *self.sent.entry(item.clone()).or_default() += bytes;
                            self.agent_frames += 1;
                            self.agent_bytes += bytes;
                            // A mark names one item: another's unmarked audio is marked first.
                            match &mut self.unmarked {
                                Some((other, n, _)) => {
                                    check!(
                                        *other == item,
                                        "audio of {item:?} while {other:?}'s is unmarked"
                                    );
                                    *n += bytes;
                                }
                                None => self.unmarked = Some((item, bytes, self.now)),
                            }
                        }
                        Some("mark") => self.sent_mark(&v),
                        Some("clear") => {
                            check!(!cleared, "one clear per barge-in");
                            cleared = true;
                            // What was unmarked is cut, not marked.
                            self.unmarked = None;
                        }
                        other => fail(format!("unexpected Twilio event {other:?}: {s}")),
                    }
                }
                Action::SendOpenAi(s) => self.check_send_openai(
                    s,
                    step,
                    &mut SendState {
                        cleared,
                        medias,
                        truncated: &mut truncated,
                        expect_retrieve: &mut expect_retrieve,
                    },
                ),
                Action::CloseOpenAi { code, .. } => {
                    check!(*code == 1000, "CloseOpenAi code {code}");
                    closed_openai += 1;
                    self.core_closed_openai = true;
                    self.openai = Socket::Gone;
                }
                Action::CloseTwilio { code, .. } => {
                    check!(!self.closed_twilio, "Twilio closed twice");
                    self.closed_twilio = true;
                    close_twilio = Some(*code);
                }
                Action::Log { line, .. } => {
                    let v: Value = serde_json::from_str(line)
                        .unwrap_or_else(|e| fail(format!("log line not JSON ({e}): {line}")));
                    check!(v["call_sid"] == CALL_SID, "log line names the call: {line}");
                    check!(v["event"].is_string(), "log line has an event: {line}");
                    match v["event"].as_str() {
                        Some("call.fallback") => {
                            check!(self.failing.is_none(), "a second fallback");
                            check!(
                                matches!(
                                    input,
                                    Input::OpenAiClosed { .. }
                                        | Input::OpenAiConnectFailed { .. }
                                        | Input::Timeout
                                ) || step.read.is("error")
                                    || step.read.is("session.updated"),
                                "the agent side cannot fail on {input:?}"
                            );
                            let reason = v["reason"].as_str().unwrap_or_default().to_owned();
                            self.failing = Some(reason);
                            close_explained = true;
                            milestone("fallback");
                        }
                        Some("call.agent_lost_while_finishing") => close_explained = true,
                        // The old session's audio still plays at Twilio: what of it is
                        // unmarked is marked next (and checked as any mark is).
                        Some("openai.reconnecting") if v["delay_ms"].as_u64() == Some(0) => {}
                        // A new attempt after a pause: the close is followed by a timer.
                        Some("openai.reconnecting") if v["delay_ms"].as_u64() > Some(0) => {
                            check!(
                                self.call.poll_timeout().is_some(),
                                "a delayed reconnect without a timer"
                            );
                            close_explained = true;
                        }
                        _ => {}
                    }
                }
                Action::Http { id, request } => self.check_http(*id, request),
                Action::RecordingData(pcm) => {
                    self.recording_data(pcm);
                    recording_chunk = true;
                }
                Action::RecordingDone { duration_ms } => {
                    check!(!self.recording_done, "the recording completed twice");
                    check!(self.stream_sid.is_some(), "a recording without a stream");
                    check!(
                        matches!(actions.get(idx + 1..), Some(rest) if rest.iter().any(|a|
                            matches!(a, Action::Persist(Record::CallEnded { .. })))),
                        "the recording completes only as the call ends, before its record"
                    );
                    check!(
                        self.recorded / recording::BYTES_PER_MS == *duration_ms,
                        "recording of {duration_ms} ms holds {} bytes",
                        self.recorded
                    );
                    self.recording_done = true;
                    milestone("recording done");
                }
                Action::Persist(r) => {
                    check!(r.call_sid() == CALL_SID, "record names the call: {r:?}");
                    // What the shell does with it: must not panic either.
                    let stmts = r.statements(self.now.0);
                    check!(!stmts.is_empty(), "a call record writes something: {r:?}");
                    match r {
                        Record::CallConnected {
                            stream_sid, at_ms, ..
                        } => {
                            check!(*at_ms == self.now.0, "connected at the time of start");
                            self.started_at = Some(Millis(*at_ms));
                            check!(self.stream_sid.is_none(), "two streams started");
                            let Read::Twilio(v) = &step.read else {
                                fail(format!("a stream started on {input:?}"))
                            };
                            let want =
                                str_at(v, "/start/streamSid").or_else(|| str_at(v, "/streamSid"));
                            check!(
                                want == Some(stream_sid.as_str()),
                                "stream sid {stream_sid:?} vs {v}"
                            );
                            check!(
                                str_at(v, "/start/callSid") == Some(CALL_SID),
                                "a start for another call was taken"
                            );
                            self.stream_sid = Some(stream_sid.clone());
                        }
                        Record::SessionId { .. } => {
                            check!(!self.session_recorded, "session id recorded twice");
                            self.session_recorded = true;
                        }
                        Record::Event { seq, .. } => {
                            check!(
                                *seq == self.event_seq,
                                "event seq {seq}, want {}",
                                self.event_seq
                            );
                            self.event_seq += 1;
                        }
                        Record::CallEnded {
                            failed,
                            end_reason,
                            barge_ins,
                            ..
                        } => {
                            check!(!call_ended_record, "CallEnded twice");
                            call_ended_record = true;
                            check!(*barge_ins == self.barge_ins, "barge_ins in CallEnded");
                            let next = actions.get(idx + 1);
                            let Some(Action::Ended(s)) = next else {
                                fail(format!(
                                    "CallEnded is followed by Ended: {}",
                                    brief(next.map(std::slice::from_ref).unwrap_or_default())
                                ))
                            };
                            check!(s.reason.label() == end_reason, "end reasons agree");
                            check!(s.reason.is_failure() == *failed, "failed flag");
                        }
                        Record::CallRinging { .. } | Record::TwilioStatus { .. } => {
                            fail(format!("the call machine wrote {r:?}"))
                        }
                        _ => {}
                    }
                }
                Action::Ended(s) => {
                    check!(call_ended_record, "Ended without the CallEnded record");
                    check!(idx == actions.len() - 1, "Ended is the last action");
                    ended = Some(s);
                }
            }
        }
        // Marks are batched, but bounded: under 500 ms of audio waits for one, and after any
        // input (caller frames come every 20 ms) none has waited 500 ms, while the call is
        // live (once Twilio's side is over, waiting for the caller's last transcript, no
        // mark could come back).
        let twilio_over = self.tail_at.is_some() || step.twilio_end();
        if let (Some((item, bytes, since)), false) =
            (&self.unmarked, self.call.is_ended() || twilio_over)
        {
            check!(
                *bytes < MARK_EVERY_BYTES,
                "{bytes} bytes of {item:?} sent without a mark"
            );
            check!(
                self.now < *since + MARK_EVERY_MS,
                "audio of {item:?} unmarked since {since:?}, at {:?}",
                self.now
            );
        }
        if let Some(at) = self.started_at {
            self.max_offset = self.max_offset.max(self.now.saturating_sub(at).0);
        }
        if recording_chunk && ended.is_none() {
            // Only what can no longer change is handed out: nothing past the clock.
            check!(
                self.recorded <= self.max_offset * recording::BYTES_PER_MS,
                "{} bytes recorded {} ms into the stream",
                self.recorded,
                self.max_offset
            );
        }
        check!(
            expect_retrieve.is_none(),
            "truncate not followed by its retrieve"
        );
        if delta.is_some() && self.stream_sid.is_some() && !is_start {
            check!(
                medias == 1,
                "accepted agent audio on a live stream is sent at once"
            );
        }
        if is_start {
            check!(
                self.held.is_empty(),
                "audio held before start is all flushed when it comes ({} left)",
                self.held.len()
            );
        }
        if truncated {
            // The barge-in discarded whatever was held for the cut items.
            self.held.clear();
        }
        if cleared && !truncated {
            // Only the audio of a replaced session was playing: nothing to truncate.
            let playing = self.orphans.iter().any(|i| {
                self.confirmed.get(i).copied().unwrap_or(0) < self.sent.get(i).copied().unwrap_or(0)
            });
            check!(playing, "a clear only for a barge-in");
            self.barge_ins += 1;
            milestone("barge-in over a replaced session's audio");
        }
        if cleared {
            self.orphans.clear();
            self.known_at = self.now;
        }
        let stats = self.call.stats();
        check!(
            stats.agent_frames == self.agent_frames,
            "agent_frames {} vs {} seen",
            stats.agent_frames,
            self.agent_frames
        );
        check!(stats.barge_ins == self.barge_ins, "barge_ins");
        match ended {
            None => {
                check!(!call_ended_record, "CallEnded without Ended");
                check!(!self.call.is_ended(), "ended without an Ended action");
                check!(
                    close_twilio.is_none(),
                    "Twilio closed while the call goes on"
                );
                if closed_openai > 0 {
                    // Only to replace the session (expired, or never ready) by a new one,
                    // to give up on it, or to let go of a socket no longer wanted.
                    check!(
                        closed_openai == 1
                            && (reconnect_after_close
                                || close_explained
                                || matches!(
                                    input,
                                    Input::OpenAiOpened | Input::OpenAiOpenedConfigured
                                )),
                        "OpenAI closed mid-call on {input:?} without a new socket"
                    );
                }
            }
            Some(s) => {
                milestone(s.reason.label());
                self.ended = true;
                self.check_end(
                    s,
                    step,
                    closed_openai + u32::from(closed_before),
                    close_twilio,
                );
            }
        }
    }

    /// A `session.update` on the current socket (`v`, read from `s`): the only one on it,
    /// asking for μ-law both ways.
    fn session_update(&mut self, v: &Value, s: &str) {
        check!(
            !self.session_update_sent,
            "session.update twice on one socket"
        );
        check!(
            str_at(v, "/session/audio/output/format/type") == Some("audio/pcmu")
                && str_at(v, "/session/audio/input/format/type") == Some("audio/pcmu"),
            "session.update asks for μ-law: {s}"
        );
        self.session_update_sent = true;
    }

    /// What the shell sent on the first socket as it opened, ahead of the stream: the
    /// session's configuration, and nothing else (the greeting waits for the stream).
    fn sent_ahead(&mut self, ahead: &[String]) {
        check!(
            ahead.len() == 1,
            "one message goes ahead of the stream: {ahead:?}"
        );
        for s in ahead {
            let v: Value = serde_json::from_str(s)
                .unwrap_or_else(|e| fail(format!("what goes ahead is not JSON ({e}): {s}")));
            check!(
                v["type"] == "session.update",
                "only the configuration goes ahead of the stream: {s}"
            );
            self.session_update(&v, s);
        }
        milestone("session configured ahead");
    }

    fn check_send_openai(&mut self, s: &str, step: &Step<'_>, st: &mut SendState<'_>) {
        let input = &step.input;
        let v: Value = serde_json::from_str(s)
            .unwrap_or_else(|e| fail(format!("SendOpenAi is not JSON ({e}): {s}")));
        if self.contract {
            check!(
                self.openai == Socket::Open,
                "sent to OpenAI while its socket is {:?}: {s}",
                self.openai
            );
        }
        let kind = v["type"].as_str().unwrap_or_default();
        if kind == "session.update" {
            check!(
                matches!(input, Input::OpenAiOpened),
                "session.update on {input:?}"
            );
            return self.session_update(&v, s);
        }
        if self.contract {
            check!(
                self.session_update_sent,
                "the first event on a socket is session.update: {s}"
            );
        }
        check!(
            self.pcmu_seen,
            "{kind} before the session is ready (on {input:?})"
        );
        match kind {
            "response.create" => {
                if v["event_id"] == "evt_bridge_greeting" {
                    check!(!self.greeted, "the greeting is asked for once");
                    check!(
                        self.stream_sid.is_some(),
                        "greeting before the stream started"
                    );
                    self.greeted = true;
                    self.agent_frames_at_greeting = self.agent_frames;
                    milestone("greeting");
                } else {
                    milestone("response.create (control)");
                    check!(
                        !self.response_active && !self.response_awaited,
                        "response.create while a response is {} (on {input:?})",
                        if self.response_active {
                            "active"
                        } else {
                            "awaited"
                        }
                    );
                    check!(
                        self.tools_running.is_empty(),
                        "response.create while a tool runs"
                    );
                }
                self.response_awaited = true;
            }
            "input_audio_buffer.append" => {
                let audio = v["audio"].as_str().unwrap_or_default();
                check!(
                    base64_decoded_len(audio).is_some(),
                    "append not base64: {s}"
                );
                // Whole frames, in the order they came: one or several in an append.
                let mut sent = Vec::new();
                check!(
                    phone_agent_bridge::audio::base64_decode_into(audio, &mut sent),
                    "append not base64: {s}"
                );
                let (mut frames, mut count) = (Vec::new(), 0);
                while frames.len() < sent.len() {
                    let Some(front) = self.caller.pop_front() else {
                        fail(format!("caller audio sent that Twilio never sent: {s}"))
                    };
                    frames.extend(front);
                    count += 1;
                }
                check!(
                    frames == sent,
                    "caller audio out of order, changed or cut mid-frame"
                );
                milestone(if count > 1 {
                    "caller audio relayed, frames gathered"
                } else {
                    "caller audio relayed"
                });
            }
            "conversation.item.truncate" => {
                let item = v["item_id"]
                    .as_str()
                    .unwrap_or_else(|| fail(format!("truncate without item: {s}")))
                    .to_owned();
                let end = v["audio_end_ms"]
                    .as_u64()
                    .unwrap_or_else(|| fail(format!("truncate without ms: {s}")));
                check!(v["content_index"] == 0, "{s}");
                let sent_ms = bytes_to_ms(self.sent.get(&item).copied().unwrap_or(0));
                let heard_ms = bytes_to_ms(self.confirmed.get(&item).copied().unwrap_or(0));
                let since = self.now.saturating_sub(self.known_at).0;
                check!(
                    end <= sent_ms,
                    "truncate of {item:?} at {end} ms, past the {sent_ms} ms sent"
                );
                check!(
                    end <= heard_ms + since,
                    "truncate of {item:?} at {end} ms, past the {heard_ms} ms confirmed played \
                     {since} ms ago"
                );
                check!(
                    st.cleared || self.stream_sid.is_none(),
                    "a barge-in clears Twilio before it truncates"
                );
                check!(st.medias == 0, "no audio sent in the barge-in that cut it");
                if !*st.truncated {
                    self.barge_ins += 1;
                    *st.truncated = true;
                }
                self.cut_at.insert(item.clone(), self.cuts);
                self.cuts += 1;
                milestone(if end > 0 {
                    "truncate after audio heard"
                } else {
                    "truncate at 0"
                });
                if end > 0 {
                    *st.expect_retrieve = Some(item);
                }
            }
            "conversation.item.create" => {
                let t = str_at(&v, "/item/type").unwrap_or_default();
                check!(
                    t == "message" || t == "function_call_output",
                    "item of type {t:?}: {s}"
                );
                milestone(if t == "message" {
                    "text item"
                } else {
                    "function_call_output"
                });
            }
            "conversation.item.retrieve" => {
                fail(format!("a retrieve not right after its truncate: {s}"))
            }
            "input_audio_buffer.commit" => {
                // The caller's words so far, when they hang up mid-turn: once, as Twilio's
                // side ends, into a ready session.
                check!(
                    step.twilio_end(),
                    "a commit other than at Twilio's end: {s}"
                );
                check!(
                    v["event_id"] == "evt_bridge_final_commit",
                    "the final commit names itself: {s}"
                );
                check!(!self.final_commit, "one final commit per call");
                self.final_commit = true;
                milestone("caller's words committed at the hang-up");
            }
            "response.cancel" => {
                // Only a response the server started after the goodbye was said.
                check!(
                    v["response_id"].is_string(),
                    "cancel names no response: {s}"
                );
                milestone("response after the goodbye cancelled");
            }
            other => fail(format!("unexpected OpenAI event {other:?}: {s}")),
        }
    }

    fn check_http(&mut self, id: u64, r: &Request) {
        check!(self.http_ids.insert(id), "HTTP id {id} reused");
        check!(r.method == "POST", "{r:?}");
        if r.url == TOOL_URL {
            let v: Value = serde_json::from_str(&r.body)
                .unwrap_or_else(|e| fail(format!("tool body not JSON ({e}): {}", r.body)));
            check!(v["call"]["call_sid"] == CALL_SID, "tool body: {}", r.body);
            check!(
                matches!(v["tool"].as_str(), Some("lookup") if self.config.tools & 4 != 0)
                    || matches!(v["tool"].as_str(), Some("slow") if self.config.tools & 8 != 0),
                "a tool that is not configured ran: {}",
                r.body
            );
            check!(
                v["arguments"].is_object() || !v["arguments"].is_null(),
                "{}",
                r.body
            );
            let want = self
                .config
                .tool_secret
                .as_deref()
                .filter(|s| !s.is_empty())
                .map(|s| tools::signature(s, &r.body));
            check!(
                r.header(tools::SIGNATURE_HEADER).map(str::to_owned) == want,
                "tool request signature"
            );
            milestone("tool webhook request");
            self.http.insert(id, HttpKind::Tool);
            self.tools_running.insert(id);
            return;
        }
        check!(
            r.url == format!("{REST_BASE}/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/{CALL_SID}.json"),
            "HTTP to {}",
            r.url
        );
        self.rest_requests += 1;
        // A hang-up or transfer that failed for a passing reason is asked again, the same
        // request, at most three times in all, never while the last is still out.
        check!(
            !self.http.values().any(|k| *k == HttpKind::Rest),
            "a Twilio REST request while one is out"
        );
        match &self.rest_body {
            None => self.rest_body = Some(r.body.clone()),
            Some(first) => {
                check!(*first == r.body, "a different second Twilio REST request");
                check!(self.rest_requests <= 3, "a fourth Twilio REST request");
                milestone("REST retried");
            }
        }
        let form: Vec<(String, String)> = form_urlencoded::parse(r.body.as_bytes())
            .into_owned()
            .collect();
        match form.as_slice() {
            [(k, v)] if k == "Status" && v == "completed" => {}
            [(k, v)] if k == "Twiml" && v == FALLBACK_TWIML => {
                check!(
                    self.failing.is_some(),
                    "the fallback TwiML without a failure"
                );
            }
            [(k, v)] if k == "Twiml" => {
                crate::webhook::check_xml(v);
                let to = self
                    .config
                    .transfer_to
                    .as_deref()
                    .unwrap_or_else(|| fail("a transfer without a number"));
                check!(
                    v.contains(
                        "<Dial action=\"https://bridge.example/api/twilio/transfer-result\""
                    ),
                    "transfer TwiML dials {to:?} and asks what next: {v}"
                );
            }
            other => fail(format!("Twilio REST form {other:?}")),
        }
        milestone(if self.failing.is_some() {
            "REST fallback"
        } else if r.body.starts_with("Twiml") {
            "REST transfer"
        } else {
            "REST hang-up"
        });
        self.http.insert(id, HttpKind::Rest);
    }

    fn check_end(
        &self,
        s: &Summary,
        step: &Step<'_>,
        closed_openai: u32,
        close_twilio: Option<u16>,
    ) {
        let input = &step.input;
        check!(self.call.is_ended(), "Ended but not is_ended()");
        check!(self.call.end_reason() == Some(&s.reason), "end_reason()");
        check!(s.call_sid.as_str() == CALL_SID, "summary call sid");
        check!(
            s.ended_at == self.tail_at.unwrap_or(self.now),
            "ended_at is the time of the last input (or of Twilio's end, after the tail)"
        );
        check!(
            s.stream_sid.as_ref().map(|x| x.0.as_str()) == self.stream_sid.as_deref(),
            "summary stream sid"
        );
        check!(
            s.started_at.is_some() == self.stream_sid.is_some(),
            "started_at"
        );
        check!(
            &s.stats == self.call.stats(),
            "summary stats are the call's"
        );
        check!(s.stats.agent_frames == self.agent_frames, "agent frames");
        check!(s.stats.agent_bytes == self.agent_bytes, "agent bytes");
        check!(
            s.stats.first_audio_ms.is_some() == (self.agent_frames > 0),
            "first_audio_ms"
        );
        // What ended it: only these inputs may.
        let rest_end = match &s.reason {
            EndReason::AgentHangup { .. } | EndReason::Transferred { .. } => true,
            // Ended as planned after the agent side failed (its words unsaid): the hang-up
            // or transfer still went to Twilio, and ends the call the same way.
            EndReason::FailedWhileEnding { then, .. } => {
                then.starts_with("agent_hangup") || then.starts_with("transferred")
            }
            _ => false,
        };
        let agent_failure = matches!(
            s.reason,
            EndReason::OpenAiClosed { .. }
                | EndReason::OpenAiConnectFailed { .. }
                | EndReason::SessionSetupTimeout
                | EndReason::SessionRejected { .. }
        );
        // An agent-side failure first redirects the caller to the fallback; the call ends
        // when Twilio stops the stream, or the redirect fails or takes too long.
        let ok = match (&s.reason, input) {
            // After the transcript tail: its transcription, the session's close, or its
            // deadline ends the call as Twilio's end would have.
            _ if self.tail_at.is_some() => {
                !s.reason.is_failure()
                    && match input {
                        Input::OpenAiText(_) | Input::OpenAiClosed { .. } => true,
                        Input::Timeout => self
                            .tail_at
                            .is_some_and(|at| self.now >= at + TRANSCRIPT_TAIL),
                        _ => false,
                    }
            }
            // Twilio's end while the call was ending after the agent side failed (its
            // words unsaid, and what it had said still playing): recorded as that failure,
            // then Twilio's end.
            (EndReason::FailedWhileEnding { then, .. }, Input::TwilioText(_))
                if then.starts_with("twilio_stop") =>
            {
                step.read.is("stop")
            }
            (EndReason::FailedWhileEnding { then, .. }, Input::TwilioClosed { code, .. })
                if then.starts_with("twilio_socket_closed") =>
            {
                then.ends_with(&format!("({code})"))
            }
            _ if agent_failure => {
                check!(
                    self.failing.as_deref() == Some(s.reason.label()),
                    "{:?} ended the call, but the fallback was for {:?}",
                    s.reason,
                    self.failing
                );
                matches!(
                    input,
                    Input::TwilioClosed { .. } | Input::HttpDone { .. } | Input::Timeout
                ) || step.read.is("stop")
            }
            _ if self.failing.is_some() => false,
            (EndReason::TwilioStop, Input::TwilioText(_)) => step.read.is("stop"),
            (_, Input::TwilioText(_)) if rest_end => step.read.is("stop"),
            // Twilio closing the socket without a `stop` after our hang-up or transfer
            // request went out: still the agent's own end.
            (_, Input::TwilioClosed { .. }) if rest_end => self.rest_requests > 0,
            (_, Input::HttpDone { .. }) => {
                rest_end || matches!(s.reason, EndReason::CallControlFailed { .. })
            }
            (EndReason::TwilioSocketClosed { code }, Input::TwilioClosed { code: c, .. }) => {
                code == c
            }
            _ => false,
        };
        check!(ok, "{:?} cannot end a call with {:?}", input, s.reason);
        // `closed_openai` counts the socket as closed before this input too (the core gave
        // up on the session earlier, or the server closed it): closed exactly once in all.
        check!(
            closed_openai == 1,
            "OpenAI socket closed {closed_openai} times at the end on {input:?}"
        );
        let want = match s.reason {
            _ if matches!(input, Input::TwilioClosed { .. }) || self.twilio_gone => None,
            // Ended as planned after the agent side failed: the stream closes as planned.
            EndReason::FailedWhileEnding { .. } if rest_end => Some(1000),
            ref r if r.is_failure() => Some(1011),
            _ => Some(1000),
        };
        check!(
            close_twilio == want,
            "Twilio closed with {close_twilio:?} for {:?}",
            s.reason
        );
    }
}

/// What the sends of one input have done so far.
struct SendState<'a> {
    cleared: bool,
    medias: usize,
    truncated: &'a mut bool,
    expect_retrieve: &'a mut Option<String>,
}

/// The drop counters an input moved.
#[derive(Default)]
struct Changes(BTreeMap<&'static str, u64>);

impl Changes {
    fn new(before: &BTreeMap<&'static str, u64>, after: &BTreeMap<&'static str, u64>) -> Self {
        let mut out = BTreeMap::new();
        for (k, v) in after {
            let b = before.get(k).copied().unwrap_or(0);
            check!(*v >= b, "drop counter {k} went down");
            if *v > b {
                out.insert(*k, v - b);
            }
        }
        check!(
            before.keys().all(|k| after.contains_key(k)),
            "a drop counter vanished"
        );
        Changes(out)
    }

    fn get(&self, k: &str) -> u64 {
        self.0.get(k).copied().unwrap_or(0)
    }

    fn any_except(&self, keys: &[&str]) -> bool {
        self.0.keys().any(|k| !keys.contains(k))
    }
}
