//! OpenAI Realtime API (GA) wire format over WebSocket: the server events the bridge reads
//! and the client events it writes. See protocol.md A2–A5. Beta event names that some
//! live models still emit are accepted as aliases (protocol.md D3.9).

use crate::config::Agent;
pub use crate::store::TranscriptionUsage;
use crate::twilio::Text;
use serde::Deserialize;
use serde_json::{json, Value};
use std::borrow::Cow;

/// A server event, parsed to the parts the bridge uses. Audio borrows from the text.
#[derive(Debug, PartialEq)]
pub enum ServerEvent<'a> {
    SessionCreated(SessionInfo),
    SessionUpdated(SessionInfo),
    Error(ErrorInfo),
    SpeechStarted {
        item_id: Option<String>,
        audio_start_ms: Option<u64>,
    },
    SpeechStopped {
        item_id: Option<String>,
        audio_end_ms: Option<u64>,
    },
    Committed {
        item_id: Option<String>,
    },
    ResponseCreated {
        response_id: Option<String>,
    },
    /// A conversation item came to be: `conversation.item.added` (or the beta
    /// `conversation.item.created`), `input_audio_buffer.committed` or
    /// `response.output_item.added`. Items are numbered in the order they appear.
    ItemAdded {
        item_id: String,
        /// `user`, `assistant` or `system`, for message items.
        role: Option<String>,
        /// The server confirming an item of ours (`conversation.item.create`): a function
        /// call's output, a system message, or a user message of text. The server makes
        /// none of those itself (the caller's words are `input_audio`).
        ours: bool,
    },
    AudioTranscriptDelta {
        item_id: Option<String>,
        delta: String,
    },
    /// `conversation.item.retrieved`: the item as the server now holds it (after a truncate,
    /// its transcript ends where the caller stopped hearing it).
    ItemRetrieved {
        item_id: String,
        transcript: Option<String>,
    },
    /// Borrowed from the event's text, ids and audio alike: the machine compares the ids
    /// with the item it is playing and relays the audio, allocating nothing for either.
    AudioDelta {
        response_id: Option<Cow<'a, str>>,
        item_id: Cow<'a, str>,
        delta: Cow<'a, str>,
    },
    AudioDone {
        item_id: Option<String>,
    },
    AudioTranscriptDone {
        item_id: Option<String>,
        response_id: Option<String>,
        transcript: String,
    },
    InputTranscriptionCompleted {
        item_id: Option<String>,
        transcript: String,
        /// What this transcription cost; zeros when the event did not say.
        usage: TranscriptionUsage,
    },
    InputTranscriptionFailed {
        item_id: Option<String>,
        error: ErrorInfo,
    },
    ItemTruncated {
        item_id: Option<String>,
        audio_end_ms: Option<u64>,
    },
    ResponseDone(ResponseInfo),
    RateLimitsUpdated(Vec<RateLimit>),
    /// The model called a function: `response.function_call_arguments.done`. Also sent for
    /// a response that is interrupted, incomplete or cancelled (openai-python
    /// `response_function_call_arguments_done_event.py`), with the arguments as far as they
    /// got, possibly none: a call is not necessarily one the model finished.
    FunctionCall {
        /// The response that called it (one cancelled unheard, or talked over by the
        /// caller, does not get its calls run).
        response_id: Option<String>,
        call_id: String,
        name: String,
        /// JSON text, as the model wrote it (may be invalid JSON).
        arguments: String,
    },
    /// Any other well-formed event; carried by name so it can be counted.
    Other {
        kind: String,
    },
}

/// Server events the bridge has no use for: per-item and per-part bookkeeping, text output,
/// argument deltas (a call is taken whole from `.done`), transcription deltas, events of the
/// WebRTC/SIP and MCP paths, and the beta names of those. Any other type is one this bridge
/// does not know (a new or renamed event, which can mean a call goes silent): the call counts
/// and logs it.
pub const UNUSED_EVENTS: &[&str] = &[
    "input_audio_buffer.cleared",
    "input_audio_buffer.timeout_triggered",
    "input_audio_buffer.dtmf_event_received",
    "conversation.created",
    "conversation.item.done",
    "conversation.item.deleted",
    "conversation.item.input_audio_transcription.delta",
    "conversation.item.input_audio_transcription.segment",
    "response.output_item.done",
    "response.content_part.added",
    "response.content_part.done",
    "response.output_text.delta",
    "response.output_text.done",
    "response.text.delta",
    "response.text.done",
    "response.function_call_arguments.delta",
    "output_audio_buffer.started",
    "output_audio_buffer.stopped",
    "output_audio_buffer.cleared",
    "mcp_list_tools.in_progress",
    "mcp_list_tools.completed",
    "mcp_list_tools.failed",
    "response.mcp_call_arguments.delta",
    "response.mcp_call_arguments.done",
    "response.mcp_call.in_progress",
    "response.mcp_call.completed",
    "response.mcp_call.failed",
];

/// The parts of a session config the bridge checks after `session.updated`.
#[derive(Debug, PartialEq, Clone, Default)]
pub struct SessionInfo {
    pub id: Option<String>,
    pub model: Option<String>,
    pub input_format: Option<String>,
    pub output_format: Option<String>,
    pub voice: Option<String>,
}

#[derive(Debug, PartialEq, Clone, Default, Deserialize)]
pub struct ErrorInfo {
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub param: Option<String>,
    #[serde(default)]
    pub event_id: Option<String>,
}

#[derive(Debug, PartialEq, Clone, Default)]
pub struct ResponseInfo {
    pub id: Option<String>,
    pub status: Option<String>,
    pub status_reason: Option<String>,
    /// `status_details.error` of a failed response.
    pub status_error: Option<ResponseError>,
    pub usage: Usage,
}

/// Why a response failed: `response.status_details.error` (protocol.md A4), which has the
/// shape of an `error` event's error (without its `param` and `event_id`).
pub type ResponseError = ErrorInfo;

impl ErrorInfo {
    /// `type: code` (or whichever of them there is), for logs and the call's record.
    pub fn text(&self) -> String {
        let kind = self.kind.as_deref().unwrap_or("");
        let code = self.code.as_deref().unwrap_or("");
        match (kind.is_empty(), code.is_empty()) {
            (false, false) if kind == code => kind.to_owned(),
            (false, false) => format!("{kind}: {code}"),
            (false, true) => kind.to_owned(),
            (true, false) => code.to_owned(),
            (true, true) => self
                .message
                .as_deref()
                .unwrap_or("unknown error")
                .chars()
                .take(200)
                .collect(),
        }
    }

    /// The organisation is out of quota: the next response would fail the same way, so
    /// asking again only prolongs the caller's silence. (A rate limit can clear within
    /// seconds: that failure is asked again once, as a server error is.)
    pub fn is_out_of_quota(&self) -> bool {
        [&self.kind, &self.code]
            .into_iter()
            .flatten()
            .any(|c| c == "insufficient_quota")
    }
}

/// A transcription's `usage`: `{"type": "tokens", "input_tokens", "output_tokens", …}` for
/// the models billed by tokens, `{"type": "duration", "seconds"}` for those billed by time.
/// Anything else, or a field missing or not a number, counts as nothing.
fn transcription_usage(usage: &Value) -> TranscriptionUsage {
    let number = |key: &str| usage.get(key).and_then(Value::as_f64).filter(|n| *n >= 0.0);
    let whole = |key: &str| number(key).map_or(0, |n| n as u64);
    match usage.get("type").and_then(Value::as_str) {
        Some("tokens") => TranscriptionUsage {
            input_tokens: whole("input_tokens"),
            output_tokens: whole("output_tokens"),
            audio_ms: 0,
        },
        Some("duration") => TranscriptionUsage {
            audio_ms: number("seconds").map_or(0, |s| (s * 1000.0).round() as u64),
            ..TranscriptionUsage::default()
        },
        _ => TranscriptionUsage::default(),
    }
}

#[derive(Debug, PartialEq, Clone, Copy, Default, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub total_tokens: u64,
    #[serde(default)]
    pub input_tokens: u64,
    #[serde(default)]
    pub output_tokens: u64,
}

#[derive(Debug, PartialEq, Clone, Deserialize)]
pub struct RateLimit {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub limit: Option<f64>,
    #[serde(default)]
    pub remaining: Option<f64>,
    #[serde(default)]
    pub reset_seconds: Option<f64>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ParseError {
    #[error("not JSON or not a Realtime event: {0}")]
    Json(String),
    #[error("`{event}` event is missing `{field}`")]
    Missing {
        event: &'static str,
        field: &'static str,
    },
}

// One flat shape for all events: serde reads only the fields named here and borrows the
// audio delta out of the text.
#[derive(Deserialize)]
struct RawEvent<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    delta: Option<Text<'a>>,
    // Borrowed: an audio delta's ids are compared, not kept (see `ServerEvent::AudioDelta`).
    #[serde(default, borrow)]
    item_id: Option<Text<'a>>,
    #[serde(default, borrow)]
    response_id: Option<Text<'a>>,
    #[serde(default)]
    audio_start_ms: Option<u64>,
    #[serde(default)]
    audio_end_ms: Option<u64>,
    #[serde(default)]
    transcript: Option<String>,
    #[serde(default)]
    session: Option<Value>,
    #[serde(default)]
    error: Option<ErrorInfo>,
    #[serde(default)]
    response: Option<RawResponse>,
    #[serde(default)]
    rate_limits: Option<Vec<RateLimit>>,
    #[serde(default)]
    item: Option<RawItem>,
    #[serde(default)]
    call_id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
    /// A transcription's usage, read leniently (see [`transcription_usage`]): a shape this
    /// bridge does not know must not cost the caller's words.
    #[serde(default)]
    usage: Option<Value>,
}

#[derive(Deserialize)]
struct RawItem {
    #[serde(default)]
    id: Option<String>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    content: Vec<RawContent>,
}

impl RawItem {
    /// An item only a client creates (see `ServerEvent::ItemAdded::ours`).
    fn is_ours(&self) -> bool {
        match (self.kind.as_deref(), self.role.as_deref()) {
            (Some("function_call_output"), _) => true,
            (Some("message"), Some("system")) => true,
            (Some("message"), Some("user")) => self
                .content
                .iter()
                .any(|c| c.kind.as_deref() == Some("input_text")),
            _ => false,
        }
    }
}

#[derive(Deserialize)]
struct RawContent {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    transcript: Option<String>,
}

#[derive(Deserialize)]
struct RawResponse {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    status_details: Option<Value>,
    #[serde(default)]
    usage: Option<Usage>,
}

fn session_info(v: &Value) -> SessionInfo {
    let s = |p: &str| v.pointer(p).and_then(Value::as_str).map(str::to_owned);
    SessionInfo {
        id: s("/id"),
        model: s("/model"),
        input_format: s("/audio/input/format/type"),
        output_format: s("/audio/output/format/type"),
        voice: s("/audio/output/voice"),
    }
}

fn owned(id: Option<Text<'_>>) -> Option<String> {
    id.map(|t| t.0.into_owned())
}

/// Parses one text frame from the Realtime server.
pub fn parse(text: &str) -> Result<ServerEvent<'_>, ParseError> {
    let mut raw: RawEvent<'_> =
        serde_json::from_str(text).map_err(|e| ParseError::Json(e.to_string()))?;
    let missing = |event, field| ParseError::Missing { event, field };
    Ok(match raw.kind.as_ref() {
        "session.created" | "session.updated" => {
            let info = session_info(&raw.session.ok_or(missing("session", "session"))?);
            if raw.kind == "session.created" {
                ServerEvent::SessionCreated(info)
            } else {
                ServerEvent::SessionUpdated(info)
            }
        }
        "error" => ServerEvent::Error(raw.error.unwrap_or_default()),
        "input_audio_buffer.speech_started" => ServerEvent::SpeechStarted {
            item_id: owned(raw.item_id),
            audio_start_ms: raw.audio_start_ms,
        },
        "input_audio_buffer.speech_stopped" => ServerEvent::SpeechStopped {
            item_id: owned(raw.item_id),
            audio_end_ms: raw.audio_end_ms,
        },
        "input_audio_buffer.committed" => ServerEvent::Committed {
            item_id: owned(raw.item_id),
        },
        "conversation.item.added" | "conversation.item.created" | "response.output_item.added" => {
            let item = raw.item.ok_or(missing("conversation.item.added", "item"))?;
            let ours = raw.kind != "response.output_item.added" && item.is_ours();
            ServerEvent::ItemAdded {
                item_id: item
                    .id
                    .ok_or(missing("conversation.item.added", "item.id"))?,
                role: item.role,
                ours,
            }
        }
        "conversation.item.retrieved" => {
            let item = raw
                .item
                .ok_or(missing("conversation.item.retrieved", "item"))?;
            ServerEvent::ItemRetrieved {
                item_id: item
                    .id
                    .ok_or(missing("conversation.item.retrieved", "item.id"))?,
                transcript: item.content.into_iter().find_map(|c| c.transcript),
            }
        }
        "response.output_audio_transcript.delta" | "response.audio_transcript.delta" => {
            ServerEvent::AudioTranscriptDelta {
                item_id: owned(raw.item_id),
                delta: raw.delta.map(|d| d.0.into_owned()).unwrap_or_default(),
            }
        }
        "response.created" => ServerEvent::ResponseCreated {
            response_id: raw.response.and_then(|r| r.id),
        },
        "response.output_audio.delta" | "response.audio.delta" => ServerEvent::AudioDelta {
            response_id: raw.response_id.take().map(|t| t.0),
            item_id: raw
                .item_id
                .take()
                .ok_or(missing("response.output_audio.delta", "item_id"))?
                .0,
            delta: raw
                .delta
                .ok_or(missing("response.output_audio.delta", "delta"))?
                .0,
        },
        "response.output_audio.done" | "response.audio.done" => ServerEvent::AudioDone {
            item_id: owned(raw.item_id),
        },
        "response.output_audio_transcript.done" | "response.audio_transcript.done" => {
            ServerEvent::AudioTranscriptDone {
                item_id: owned(raw.item_id),
                response_id: owned(raw.response_id),
                transcript: raw.transcript.unwrap_or_default(),
            }
        }
        "conversation.item.input_audio_transcription.completed" => {
            ServerEvent::InputTranscriptionCompleted {
                item_id: owned(raw.item_id),
                transcript: raw.transcript.unwrap_or_default(),
                usage: raw
                    .usage
                    .as_ref()
                    .map(transcription_usage)
                    .unwrap_or_default(),
            }
        }
        "conversation.item.input_audio_transcription.failed" => {
            ServerEvent::InputTranscriptionFailed {
                item_id: owned(raw.item_id),
                error: raw.error.unwrap_or_default(),
            }
        }
        "conversation.item.truncated" => ServerEvent::ItemTruncated {
            item_id: owned(raw.item_id),
            audio_end_ms: raw.audio_end_ms,
        },
        "response.function_call_arguments.done" => {
            let e = "response.function_call_arguments.done";
            ServerEvent::FunctionCall {
                response_id: owned(raw.response_id),
                call_id: raw.call_id.ok_or(missing(e, "call_id"))?,
                name: raw.name.ok_or(missing(e, "name"))?,
                arguments: raw.arguments.unwrap_or_default(),
            }
        }
        "response.done" => {
            let r = raw.response.ok_or(missing("response.done", "response"))?;
            ServerEvent::ResponseDone(ResponseInfo {
                id: r.id,
                status: r.status,
                status_reason: r
                    .status_details
                    .as_ref()
                    .and_then(|d| d.get("reason"))
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                status_error: r
                    .status_details
                    .as_ref()
                    .and_then(|d| d.get("error"))
                    .filter(|e| !e.is_null())
                    .map(|e| {
                        serde_json::from_value(e.clone()).unwrap_or_else(|_| ResponseError {
                            message: Some(e.to_string().chars().take(200).collect()),
                            ..ResponseError::default()
                        })
                    }),
                usage: r.usage.unwrap_or_default(),
            })
        }
        "rate_limits.updated" => {
            ServerEvent::RateLimitsUpdated(raw.rate_limits.unwrap_or_default())
        }
        other => ServerEvent::Other {
            kind: other.chars().take(80).collect(),
        },
    })
}

/// The GA `session.update` for a phone call: μ-law both ways (no transcoding), server VAD
/// that interrupts the response when the caller talks, and caller transcription.
pub fn session_update(agent: &Agent) -> String {
    let td = &agent.turn_detection;
    let turn_detection = if td.kind == "semantic_vad" {
        json!({ "type": "semantic_vad", "create_response": true, "interrupt_response": true })
    } else {
        json!({
            "type": "server_vad",
            "threshold": td.threshold,
            "prefix_padding_ms": td.prefix_padding_ms,
            "silence_duration_ms": td.silence_duration_ms,
            "create_response": true,
            "interrupt_response": true,
        })
    };
    // Only the fields the Realtime API knows: it rejects a whole update for one unknown key.
    let tools = crate::tools::realtime_definitions(&agent.tools);
    let noise_reduction = match agent.noise_reduction.as_str() {
        "off" => Value::Null,
        kind => json!({ "type": kind }),
    };
    json!({
        "type": "session.update",
        "event_id": "evt_bridge_session_update",
        "session": {
            "type": "realtime",
            "model": agent.model,
            "output_modalities": ["audio"],
            "instructions": agent.instructions,
            "audio": {
                "input": {
                    "format": { "type": "audio/pcmu" },
                    "transcription": {
                        "model": agent.transcription_model,
                        "language": agent.language,
                    },
                    "noise_reduction": noise_reduction,
                    "turn_detection": turn_detection,
                },
                "output": {
                    "format": { "type": "audio/pcmu" },
                    "voice": agent.voice,
                },
            },
            "tools": tools,
            "tool_choice": "auto",
        },
    })
    .to_string()
}

/// Asks for the agent's first words. A response's `instructions` replace the session's for
/// that response, so the greeting comes after the agent's own instructions (who it is, the
/// business's name), not instead of them; with no greeting, the session's are used as they are.
pub fn greeting_response(agent: &Agent) -> String {
    let greeting = agent.greeting.trim();
    if greeting.is_empty() {
        return json!({ "type": "response.create", "event_id": GREETING_EVENT_ID }).to_string();
    }
    let instructions = match agent.instructions.trim() {
        "" => greeting.to_owned(),
        own => format!("{own}\n\n{greeting}"),
    };
    json!({
        "type": "response.create",
        "event_id": GREETING_EVENT_ID,
        "response": { "instructions": instructions },
    })
    .to_string()
}

/// The `event_id` of the greeting's `response.create`, echoed in an `error` it causes.
pub const GREETING_EVENT_ID: &str = "evt_bridge_greeting";
/// The `event_id` of every other `response.create` of ours.
pub const RESPONSE_EVENT_ID: &str = "evt_bridge_response";

/// Asks for a response under the session's own instructions (what it should be about is
/// already in the conversation).
pub fn response_create() -> String {
    json!({ "type": "response.create", "event_id": RESPONSE_EVENT_ID }).to_string()
}

/// The `event_id`s of our `conversation.item.create`s start so, then count: an `error` the
/// server answers one with names it.
pub const ITEM_EVENT_ID: &str = "evt_bridge_item_";

/// `conversation.item.create` of `item`, with our `event_id` when it has one.
fn item_create(item: Value, event_id: Option<&str>) -> String {
    let mut event = json!({ "type": "conversation.item.create", "item": item });
    if let Some(id) = event_id {
        event["event_id"] = json!(id);
    }
    event.to_string()
}

/// The result of a function call, for the model to read.
pub fn function_call_output(call_id: &str, output: &str, event_id: Option<&str>) -> String {
    item_create(
        json!({ "type": "function_call_output", "call_id": call_id, "output": output }),
        event_id,
    )
}

/// A text message added to the conversation. `role` is `user`, `system` or `assistant`
/// (assistant text uses the `output_text` content type; audio cannot be created).
pub fn text_item(role: &str, text: &str, event_id: Option<&str>) -> String {
    let content_type = if role == "assistant" {
        "output_text"
    } else {
        "input_text"
    };
    item_create(
        json!({ "type": "message", "role": role,
                "content": [{ "type": content_type, "text": text }] }),
        event_id,
    )
}

/// An append up to its audio (built by hand: it goes once per caller frame or chunk).
const APPEND_HEAD: &str = r#"{"type":"input_audio_buffer.append","audio":""#;

/// `audio` must already be checked base64, so it is copied without escaping.
pub fn input_audio_append(audio: &str) -> String {
    let mut s = String::with_capacity(APPEND_HEAD.len() + audio.len() + 2);
    s.push_str(APPEND_HEAD);
    s.push_str(audio);
    s.push_str("\"}");
    s
}

/// [`input_audio_append`] of μ-law bytes (several frames gathered into one append).
pub fn input_audio_append_bytes(audio: &[u8]) -> String {
    use base64::Engine as _;
    let mut s = String::with_capacity(APPEND_HEAD.len() + audio.len().div_ceil(3) * 4 + 2);
    s.push_str(APPEND_HEAD);
    base64::engine::general_purpose::STANDARD.encode_string(audio, &mut s);
    s.push_str("\"}");
    s
}

/// The `event_id` of the commit sent when the caller hangs up mid-turn: an error about it
/// (`input_audio_buffer_commit_empty`: the server had just committed the turn itself) is
/// told from others by it.
pub const FINAL_COMMIT_EVENT_ID: &str = "evt_bridge_final_commit";

/// Makes the caller's audio so far a turn, answered by `input_audio_buffer.committed` (and,
/// as any turn, its transcription).
pub fn input_audio_commit() -> String {
    json!({ "type": "input_audio_buffer.commit", "event_id": FINAL_COMMIT_EVENT_ID }).to_string()
}

/// Asks for an item as the server holds it, answered by `conversation.item.retrieved`.
pub fn retrieve(item_id: &str) -> String {
    json!({ "type": "conversation.item.retrieve", "item_id": item_id }).to_string()
}

/// Stops a response the server started by itself; answered by its `response.done` with
/// `status:"cancelled"`.
pub fn response_cancel(response_id: &str) -> String {
    json!({ "type": "response.cancel", "response_id": response_id }).to_string()
}

pub fn truncate(item_id: &str, audio_end_ms: u64) -> String {
    json!({
        "type": "conversation.item.truncate",
        "item_id": item_id,
        "content_index": 0,
        "audio_end_ms": audio_end_ms,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_append_of_bytes_is_the_append_of_their_base64() {
        use base64::Engine as _;
        let audio: Vec<u8> = (0..=255).collect();
        let b64 = base64::engine::general_purpose::STANDARD.encode(&audio);
        assert_eq!(input_audio_append_bytes(&audio), input_audio_append(&b64));
        assert_eq!(
            input_audio_append_bytes(&[]),
            r#"{"type":"input_audio_buffer.append","audio":""}"#
        );
    }

    #[test]
    fn session_update_has_the_ga_shape_and_no_beta_fields() {
        let v: Value = serde_json::from_str(&session_update(&Agent::default())).unwrap();
        assert_eq!(v["type"], "session.update");
        let s = &v["session"];
        assert_eq!(s["type"], "realtime");
        assert_eq!(s["model"], "gpt-realtime");
        assert_eq!(s["output_modalities"], json!(["audio"]));
        assert_eq!(s["audio"]["input"]["format"], json!({"type":"audio/pcmu"}));
        assert_eq!(s["audio"]["output"]["format"], json!({"type":"audio/pcmu"}));
        assert_eq!(s["audio"]["input"]["turn_detection"]["type"], "server_vad");
        assert_eq!(s["audio"]["input"]["transcription"]["language"], "ja");
        assert_eq!(s["audio"]["output"]["voice"], "marin");
        // A phone held to the ear: near-field noise reduction, unless the agent says otherwise.
        assert_eq!(
            s["audio"]["input"]["noise_reduction"],
            json!({"type":"near_field"})
        );
        for (setting, sent) in [
            ("far_field", json!({"type":"far_field"})),
            ("off", Value::Null),
        ] {
            let agent = Agent {
                noise_reduction: setting.into(),
                ..Agent::default()
            };
            let v: Value = serde_json::from_str(&session_update(&agent)).unwrap();
            assert_eq!(v["session"]["audio"]["input"]["noise_reduction"], sent);
        }
        for beta in [
            "modalities",
            "voice",
            "input_audio_format",
            "output_audio_format",
            "input_audio_transcription",
            "turn_detection",
            "temperature",
        ] {
            assert!(s.get(beta).is_none(), "beta field {beta} present");
        }
    }

    #[test]
    fn client_events_are_valid_json() {
        let v: Value = serde_json::from_str(&input_audio_append("AAAA")).unwrap();
        assert_eq!(
            v,
            json!({"type":"input_audio_buffer.append","audio":"AAAA"})
        );
        let v: Value = serde_json::from_str(&truncate("item_\"1", 1500)).unwrap();
        assert_eq!(
            v,
            json!({"type":"conversation.item.truncate","item_id":"item_\"1","content_index":0,"audio_end_ms":1500})
        );
        let v: Value = serde_json::from_str(&greeting_response(&Agent::default())).unwrap();
        assert_eq!(v["type"], "response.create");
        assert!(v["response"]["instructions"]
            .as_str()
            .unwrap()
            .contains("ご用件"));
    }

    #[test]
    fn the_greeting_keeps_the_agent_s_own_instructions() {
        let greeting = |instructions: &str, greeting: &str| -> Value {
            let agent = Agent {
                instructions: instructions.into(),
                greeting: greeting.into(),
                ..Agent::default()
            };
            serde_json::from_str(&greeting_response(&agent)).unwrap()
        };
        // A response's instructions replace the session's: the business's name must be in them.
        let v = greeting(
            "あなたは山田歯科の受付です。",
            "医院名を名乗ってご用件を伺ってください。",
        );
        assert_eq!(
            v["response"]["instructions"],
            "あなたは山田歯科の受付です。\n\n医院名を名乗ってご用件を伺ってください。"
        );
        assert_eq!(v["event_id"], GREETING_EVENT_ID);
        // No instructions of its own: the greeting alone.
        let v = greeting("  ", "Say hello.");
        assert_eq!(v["response"]["instructions"], "Say hello.");
        // No greeting: the session's instructions as they are, not replaced by nothing.
        let v = greeting("You are the front desk.", " \n");
        assert_eq!(
            v,
            json!({"type": "response.create", "event_id": GREETING_EVENT_ID})
        );
    }

    #[test]
    fn parses_session_updated_formats() {
        let e = parse(r#"{"type":"session.updated","event_id":"e","session":{"id":"sess_1","type":"realtime","model":"gpt-realtime","audio":{"input":{"format":{"type":"audio/pcmu"}},"output":{"format":{"type":"audio/pcmu"},"voice":"marin"}}}}"#).unwrap();
        assert_eq!(
            e,
            ServerEvent::SessionUpdated(SessionInfo {
                id: Some("sess_1".into()),
                model: Some("gpt-realtime".into()),
                input_format: Some("audio/pcmu".into()),
                output_format: Some("audio/pcmu".into()),
                voice: Some("marin".into()),
            })
        );
    }

    #[test]
    fn parses_audio_delta_in_ga_and_beta_names() {
        for name in ["response.output_audio.delta", "response.audio.delta"] {
            let text = format!(
                r#"{{"type":"{name}","event_id":"e","response_id":"resp_1","item_id":"item_1","output_index":0,"content_index":0,"delta":"AAAA"}}"#
            );
            let ServerEvent::AudioDelta {
                item_id,
                delta,
                response_id,
            } = parse(&text).unwrap()
            else {
                panic!("{name}")
            };
            assert_eq!(item_id, "item_1");
            assert_eq!(response_id.as_deref(), Some("resp_1"));
            assert_eq!(delta, "AAAA");
            assert!(matches!(delta, Cow::Borrowed(_)), "audio is not copied");
            assert!(
                matches!(
                    (item_id, response_id),
                    (Cow::Borrowed(_), Some(Cow::Borrowed(_)))
                ),
                "nor are the ids"
            );
        }
    }

    #[test]
    fn parses_error_response_done_and_rate_limits() {
        let e = parse(r#"{"event_id":"event_890","type":"error","error":{"type":"invalid_request_error","code":"invalid_event","message":"The 'type' field is missing.","param":null,"event_id":"event_567"}}"#).unwrap();
        let ServerEvent::Error(err) = e else { panic!() };
        assert_eq!(err.code.as_deref(), Some("invalid_event"));
        assert_eq!(err.event_id.as_deref(), Some("event_567"));

        let e = parse(r#"{"type":"response.done","response":{"id":"resp_1","status":"cancelled","status_details":{"type":"cancelled","reason":"turn_detected"},"usage":{"total_tokens":253,"input_tokens":132,"output_tokens":121}}}"#).unwrap();
        let ServerEvent::ResponseDone(r) = e else {
            panic!()
        };
        assert_eq!(r.status.as_deref(), Some("cancelled"));
        assert_eq!(r.status_reason.as_deref(), Some("turn_detected"));
        assert_eq!(r.usage.total_tokens, 253);

        let e = parse(r#"{"type":"rate_limits.updated","rate_limits":[{"name":"requests","limit":1000,"remaining":999,"reset_seconds":60}]}"#).unwrap();
        let ServerEvent::RateLimitsUpdated(l) = e else {
            panic!()
        };
        assert_eq!(l[0].name, "requests");
    }

    #[test]
    fn tells_the_confirmation_of_our_items_from_the_servers_own() {
        let ours = |text: &str| match parse(text).unwrap() {
            ServerEvent::ItemAdded { ours, .. } => ours,
            e => panic!("{e:?}"),
        };
        // What `function_call_output` and `text_item` create, confirmed (GA and beta names).
        assert!(ours(
            r#"{"type":"conversation.item.added","previous_item_id":"item_1","item":{"id":"item_2","type":"function_call_output","call_id":"call_1","output":"{}"}}"#
        ));
        assert!(ours(
            r#"{"type":"conversation.item.created","item":{"id":"item_2","type":"message","role":"system","content":[{"type":"input_text","text":"note"}]}}"#
        ));
        assert!(ours(
            r#"{"type":"conversation.item.added","item":{"id":"item_2","type":"message","role":"user","status":"completed","content":[{"type":"input_text","text":"(pressed 1)"}]}}"#
        ));
        // The caller's committed audio, the model's own items, and an assistant message.
        assert!(!ours(
            r#"{"type":"conversation.item.added","item":{"id":"item_3","type":"message","role":"user","status":"completed","content":[{"type":"input_audio","transcript":null}]}}"#
        ));
        assert!(!ours(
            r#"{"type":"conversation.item.added","item":{"id":"item_3","type":"message","role":"user","content":[]}}"#
        ));
        assert!(!ours(
            r#"{"type":"conversation.item.added","item":{"id":"item_4","type":"function_call","call_id":"call_2","name":"lookup","arguments":""}}"#
        ));
        assert!(!ours(
            r#"{"type":"conversation.item.added","item":{"id":"item_4","type":"message","role":"assistant","status":"in_progress","content":[]}}"#
        ));
        // The same kinds of item, as a response's output, are not a confirmation.
        assert!(!ours(
            r#"{"type":"response.output_item.added","response_id":"r","output_index":0,"item":{"id":"item_5","type":"message","role":"system","content":[{"type":"input_text","text":"x"}]}}"#
        ));
    }

    #[test]
    fn parses_items_and_transcripts() {
        for text in [
            r#"{"type":"conversation.item.added","previous_item_id":null,"item":{"id":"item_1","type":"message","role":"user","status":"completed","content":[]}}"#,
            r#"{"type":"conversation.item.created","item":{"id":"item_1","type":"message","role":"user"}}"#,
        ] {
            assert_eq!(
                parse(text).unwrap(),
                ServerEvent::ItemAdded {
                    item_id: "item_1".into(),
                    role: Some("user".into()),
                    ours: false,
                }
            );
        }
        let e = parse(r#"{"type":"response.output_item.added","response_id":"r","output_index":0,"item":{"id":"item_2","type":"message","role":"assistant","status":"in_progress","content":[]}}"#).unwrap();
        assert_eq!(
            e,
            ServerEvent::ItemAdded {
                item_id: "item_2".into(),
                role: Some("assistant".into()),
                ours: false,
            }
        );
        let e = parse(r#"{"type":"conversation.item.retrieved","item":{"id":"item_2","type":"message","role":"assistant","content":[{"type":"output_audio","transcript":"こんにちは","audio":"AAAA"}]}}"#).unwrap();
        assert_eq!(
            e,
            ServerEvent::ItemRetrieved {
                item_id: "item_2".into(),
                transcript: Some("こんにちは".into())
            }
        );
        let e = parse(r#"{"type":"response.output_audio_transcript.delta","item_id":"item_2","delta":"こん"}"#).unwrap();
        assert_eq!(
            e,
            ServerEvent::AudioTranscriptDelta {
                item_id: Some("item_2".into()),
                delta: "こん".into()
            }
        );
    }

    #[test]
    fn parses_function_calls_and_builds_outputs() {
        let e = parse(r#"{"event_id":"event_5556","type":"response.function_call_arguments.done","response_id":"resp_002","item_id":"fc_001","output_index":0,"call_id":"call_001","name":"get_weather","arguments":"{\"location\": \"San Francisco\"}"}"#).unwrap();
        assert_eq!(
            e,
            ServerEvent::FunctionCall {
                response_id: Some("resp_002".into()),
                call_id: "call_001".into(),
                name: "get_weather".into(),
                arguments: "{\"location\": \"San Francisco\"}".into()
            }
        );
        let v: Value =
            serde_json::from_str(&function_call_output("call_001", "{\"ok\":true}", None)).unwrap();
        assert_eq!(
            v,
            json!({"type":"conversation.item.create","item":{"type":"function_call_output","call_id":"call_001","output":"{\"ok\":true}"}})
        );
        let v: Value = serde_json::from_str(&function_call_output(
            "call_1",
            "{}",
            Some("evt_bridge_item_3"),
        ))
        .unwrap();
        assert_eq!(v["event_id"], "evt_bridge_item_3");
        let v: Value = serde_json::from_str(&text_item("assistant", "はい", None)).unwrap();
        assert_eq!(
            v["item"]["content"][0],
            json!({"type":"output_text","text":"はい"})
        );
        let v: Value = serde_json::from_str(&text_item("user", "5", Some("e"))).unwrap();
        assert_eq!(v["item"]["content"][0]["type"], "input_text");
        assert_eq!(v["event_id"], "e");
        let v: Value = serde_json::from_str(&response_create()).unwrap();
        assert_eq!(
            v,
            json!({"type":"response.create","event_id":"evt_bridge_response"})
        );
    }

    #[test]
    fn malformed_events_are_errors() {
        assert!(parse("{").is_err());
        assert!(parse(r#"{"event":"x"}"#).is_err());
        assert!(parse(r#"{"type":"response.output_audio.delta","item_id":"i"}"#).is_err());
        assert!(parse(r#"{"type":"conversation.item.added","item":{}}"#).is_err());
        assert_eq!(
            parse(r#"{"type":"conversation.item.done","item":{}}"#).unwrap(),
            ServerEvent::Other {
                kind: "conversation.item.done".into()
            }
        );
    }
}
