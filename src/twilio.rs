//! Twilio Media Streams wire format (bidirectional `<Connect><Stream>`): parsing the frames
//! Twilio sends and writing the ones we send back. See protocol.md B1–B3.

use crate::ids::{CallSid, StreamSid};
use serde::Deserialize;
use std::borrow::Cow;
use std::collections::BTreeMap;

/// A frame from Twilio, parsed. Audio payloads borrow from the frame text.
#[derive(Debug, PartialEq)]
pub enum Inbound<'a> {
    Connected,
    Start(Start),
    Media(Media<'a>),
    /// Borrowed: an echo (one per 100 ms of agent audio) is looked up, not kept.
    Mark {
        name: Cow<'a, str>,
    },
    Dtmf {
        digit: String,
    },
    Stop,
    /// A well-formed frame whose `event` we do not handle.
    Unknown {
        event: String,
    },
}

#[derive(Debug, PartialEq, Clone)]
pub struct Start {
    pub stream_sid: StreamSid,
    pub call_sid: CallSid,
    pub account_sid: String,
    pub custom_parameters: BTreeMap<String, String>,
    pub encoding: String,
    pub sample_rate: u32,
}

#[derive(Debug, PartialEq)]
pub struct Media<'a> {
    /// Base64 μ-law, exactly as Twilio sent it.
    pub payload: Cow<'a, str>,
    pub track: Option<Cow<'a, str>>,
    /// Presentation timestamp in ms from the stream start, when Twilio gave one.
    pub timestamp: Option<u64>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ParseError {
    #[error("not JSON or not a Twilio frame: {0}")]
    Json(String),
    #[error("`{event}` frame is missing `{field}`")]
    Missing {
        event: &'static str,
        field: &'static str,
    },
}

// One flat shape for every frame: serde borrows the payload straight out of the text,
// which an internally tagged enum could not do.
#[derive(Deserialize)]
struct RawFrame<'a> {
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(default, rename = "streamSid", borrow)]
    stream_sid: Option<Text<'a>>,
    #[serde(default, borrow)]
    media: Option<RawMedia<'a>>,
    #[serde(default)]
    start: Option<RawStart>,
    #[serde(default, borrow)]
    mark: Option<RawMark<'a>>,
    #[serde(default)]
    dtmf: Option<RawDtmf>,
}

#[derive(Deserialize)]
struct RawMedia<'a> {
    #[serde(default, borrow)]
    payload: Option<Text<'a>>,
    #[serde(default, borrow)]
    track: Option<Text<'a>>,
    #[serde(default, borrow)]
    timestamp: Option<Text<'a>>,
}

/// A string that borrows from the frame unless it holds JSON escapes. (serde borrows a
/// bare `Cow<str>` field but not one inside an `Option`; this wrapper makes it do so.)
#[derive(Deserialize)]
pub(crate) struct Text<'a>(#[serde(borrow)] pub(crate) Cow<'a, str>);

#[derive(Deserialize)]
struct RawStart {
    #[serde(rename = "streamSid")]
    stream_sid: Option<String>,
    #[serde(rename = "callSid")]
    call_sid: Option<String>,
    #[serde(default, rename = "accountSid")]
    account_sid: Option<String>,
    #[serde(default, rename = "customParameters")]
    custom_parameters: Option<BTreeMap<String, serde_json::Value>>,
    #[serde(default, rename = "mediaFormat")]
    media_format: Option<RawMediaFormat>,
}

#[derive(Deserialize)]
struct RawMediaFormat {
    #[serde(default)]
    encoding: Option<String>,
    #[serde(default, rename = "sampleRate")]
    sample_rate: Option<u32>,
}

#[derive(Deserialize)]
struct RawMark<'a> {
    #[serde(default, borrow)]
    name: Option<Text<'a>>,
}

#[derive(Deserialize)]
struct RawDtmf {
    digit: Option<String>,
}

/// Parses one text frame from Twilio.
pub fn parse(text: &str) -> Result<Inbound<'_>, ParseError> {
    let raw: RawFrame<'_> =
        serde_json::from_str(text).map_err(|e| ParseError::Json(e.to_string()))?;
    let missing = |event, field| ParseError::Missing { event, field };
    Ok(match raw.event.as_ref() {
        "connected" => Inbound::Connected,
        "start" => {
            let s = raw.start.ok_or(missing("start", "start"))?;
            let stream_sid = s
                .stream_sid
                .or_else(|| raw.stream_sid.map(|t| t.0.into_owned()))
                .ok_or(missing("start", "streamSid"))?;
            let call_sid = s.call_sid.ok_or(missing("start", "callSid"))?;
            let format = s.media_format;
            Inbound::Start(Start {
                stream_sid: StreamSid(stream_sid),
                call_sid: CallSid(call_sid),
                account_sid: s.account_sid.unwrap_or_default(),
                custom_parameters: s
                    .custom_parameters
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| match v {
                        serde_json::Value::String(s) => (k, s),
                        other => (k, other.to_string()),
                    })
                    .collect(),
                encoding: format
                    .as_ref()
                    .and_then(|f| f.encoding.clone())
                    .unwrap_or_else(|| "audio/x-mulaw".into()),
                sample_rate: format.and_then(|f| f.sample_rate).unwrap_or(8000),
            })
        }
        "media" => {
            let m = raw.media.ok_or(missing("media", "media"))?;
            Inbound::Media(Media {
                payload: m.payload.ok_or(missing("media", "payload"))?.0,
                track: m.track.map(|t| t.0),
                timestamp: m.timestamp.and_then(|t| t.0.parse().ok()),
            })
        }
        "mark" => Inbound::Mark {
            name: raw
                .mark
                .and_then(|m| m.name)
                .ok_or(missing("mark", "name"))?
                .0,
        },
        "dtmf" => Inbound::Dtmf {
            digit: raw
                .dtmf
                .and_then(|d| d.digit)
                .ok_or(missing("dtmf", "digit"))?,
        },
        "stop" => Inbound::Stop,
        other => Inbound::Unknown {
            event: other.chars().take(64).collect(),
        },
    })
}

/// Writes the frames we send to one stream. The stream sid is escaped once, up front, so
/// the per-frame work on the audio path is a couple of string copies.
#[derive(Debug, Clone)]
pub struct Writer {
    media_prefix: String,
    mark_prefix: String,
    clear: String,
}

impl Writer {
    pub fn new(stream_sid: &StreamSid) -> Self {
        let sid = serde_json::to_string(stream_sid.as_str()).expect("strings serialize");
        Self {
            media_prefix: format!(r#"{{"event":"media","streamSid":{sid},"media":{{"payload":""#),
            mark_prefix: format!(r#"{{"event":"mark","streamSid":{sid},"mark":{{"name":"#),
            clear: format!(r#"{{"event":"clear","streamSid":{sid}}}"#),
        }
    }

    /// `payload` must be base64 (checked by the caller), so it needs no JSON escaping.
    pub fn media(&self, payload: &str) -> String {
        let mut s = String::with_capacity(self.media_prefix.len() + payload.len() + 3);
        s.push_str(&self.media_prefix);
        s.push_str(payload);
        s.push_str("\"}}");
        s
    }

    /// One allocation for a name of ours (`m17`: nothing to escape); any other is escaped.
    pub fn mark(&self, name: &str) -> String {
        if !name.bytes().all(|b| b.is_ascii_alphanumeric()) {
            let name = serde_json::to_string(name).expect("strings serialize");
            return format!("{}{}}}}}", self.mark_prefix, name);
        }
        let mut s = String::with_capacity(self.mark_prefix.len() + name.len() + 4);
        s.push_str(&self.mark_prefix);
        s.push('"');
        s.push_str(name);
        s.push_str("\"}}");
        s
    }

    pub fn clear(&self) -> String {
        self.clear.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const START: &str = r#"{"event":"start","sequenceNumber":"1",
 "start":{"accountSid":"ACXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX","streamSid":"MZ1","callSid":"CA1","tracks":["inbound"],
  "mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1},
  "customParameters":{"From":"+8190","To":"+8150"}},
 "streamSid":"MZ1"}"#;

    #[test]
    fn parses_start_with_custom_parameters() {
        let Inbound::Start(s) = parse(START).unwrap() else {
            panic!()
        };
        assert_eq!(s.stream_sid.as_str(), "MZ1");
        assert_eq!(s.call_sid.as_str(), "CA1");
        assert_eq!(s.custom_parameters["From"], "+8190");
        assert_eq!(s.sample_rate, 8000);
    }

    #[test]
    fn parses_media_borrowing_the_payload() {
        let text = r#"{"event":"media","sequenceNumber":"4","media":{"track":"inbound","chunk":"2","timestamp":"5","payload":"no+JhoaJjpzS"},"streamSid":"MZ1"}"#;
        let Inbound::Media(m) = parse(text).unwrap() else {
            panic!()
        };
        assert_eq!(m.payload, "no+JhoaJjpzS");
        assert!(matches!(m.payload, Cow::Borrowed(_)));
        assert_eq!(m.timestamp, Some(5));
    }

    #[test]
    fn parses_mark_dtmf_stop_connected_unknown() {
        assert_eq!(
            parse(r#"{"event":"mark","streamSid":"MZ1","mark":{"name":"m1"}}"#).unwrap(),
            Inbound::Mark { name: "m1".into() }
        );
        assert_eq!(
            parse(r#"{"event":"dtmf","dtmf":{"track":"inbound_track","digit":"5"}}"#).unwrap(),
            Inbound::Dtmf { digit: "5".into() }
        );
        assert_eq!(
            parse(r#"{"event":"stop","stop":{}}"#).unwrap(),
            Inbound::Stop
        );
        assert_eq!(
            parse(r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#).unwrap(),
            Inbound::Connected
        );
        assert_eq!(
            parse(r#"{"event":"surprise"}"#).unwrap(),
            Inbound::Unknown {
                event: "surprise".into()
            }
        );
    }

    #[test]
    fn marks_and_their_echoes_borrow_and_escape_what_needs_it() {
        let w = Writer::new(&StreamSid::from("MZ\"1"));
        for name in ["m17", "a \"quoted\" name", "名前"] {
            let frame = w.mark(name);
            let v: serde_json::Value = serde_json::from_str(&frame).unwrap();
            assert_eq!(v["event"], "mark");
            assert_eq!(v["streamSid"], "MZ\"1");
            assert_eq!(v["mark"]["name"], name, "{frame}");
        }
        let Inbound::Mark { name } =
            parse(r#"{"event":"mark","streamSid":"MZ1","mark":{"name":"m17"}}"#).unwrap()
        else {
            panic!("a mark");
        };
        assert!(matches!(name, Cow::Borrowed("m17")));
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        assert!(matches!(parse("not json"), Err(ParseError::Json(_))));
        assert!(matches!(
            parse(r#"{"no":"event"}"#),
            Err(ParseError::Json(_))
        ));
        assert_eq!(
            parse(r#"{"event":"media","media":{}}"#),
            Err(ParseError::Missing {
                event: "media",
                field: "payload"
            })
        );
        assert!(parse(r#"{"event":"start"}"#).is_err());
        assert!(parse(r#"{"event":"mark","mark":{}}"#).is_err());
    }

    #[test]
    fn writer_produces_valid_frames() {
        let w = Writer::new(&StreamSid("MZ\"odd".into()));
        let v: serde_json::Value = serde_json::from_str(&w.media("AAAA")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"event":"media","streamSid":"MZ\"odd","media":{"payload":"AAAA"}})
        );
        let v: serde_json::Value = serde_json::from_str(&w.mark("m7")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"event":"mark","streamSid":"MZ\"odd","mark":{"name":"m7"}})
        );
        let v: serde_json::Value = serde_json::from_str(&w.clear()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"event":"clear","streamSid":"MZ\"odd"})
        );
    }
}

/// How to reach Twilio's REST API for call control.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RestConfig {
    /// `https://api.twilio.com`, or a fake's address in tests.
    pub base_url: String,
    /// Basic-auth username; the call's own AccountSid when empty.
    pub account_sid: String,
    pub auth_token: crate::config::Secret,
}

/// `POST /2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}.json` (protocol.md C3): hang up
/// with `Status=completed`, or redirect with `Twiml=…`.
pub fn update_call(
    rest: &RestConfig,
    account_sid: &str,
    call_sid: &str,
    form: &[(&str, &str)],
) -> crate::http::Request {
    use base64::Engine;
    let user = if rest.account_sid.is_empty() {
        account_sid
    } else {
        &rest.account_sid
    };
    let basic = base64::engine::general_purpose::STANDARD
        .encode(format!("{user}:{}", rest.auth_token.expose()));
    crate::http::Request {
        method: "POST".into(),
        url: format!(
            "{}/2010-04-01/Accounts/{account_sid}/Calls/{call_sid}.json",
            rest.base_url.trim_end_matches('/')
        ),
        headers: vec![
            ("Authorization".into(), format!("Basic {basic}")),
            (
                "Content-Type".into(),
                "application/x-www-form-urlencoded".into(),
            ),
        ],
        body: crate::http::form(form),
        timeout_ms: 10_000,
    }
}

#[cfg(test)]
mod rest_tests {
    use super::*;

    #[test]
    fn hangup_request_matches_the_call_resource() {
        let rest = RestConfig {
            base_url: "https://api.twilio.com/".into(),
            account_sid: String::new(),
            auth_token: crate::config::Secret::new("tok"),
        };
        let r = update_call(&rest, "AC1", "CA1", &[("Status", "completed")]);
        assert_eq!(r.method, "POST");
        assert_eq!(
            r.url,
            "https://api.twilio.com/2010-04-01/Accounts/AC1/Calls/CA1.json"
        );
        assert_eq!(r.body, "Status=completed");
        // base64("AC1:tok")
        assert_eq!(r.header("authorization"), Some("Basic QUMxOnRvaw=="));
        let r = update_call(
            &rest,
            "AC1",
            "CA1",
            &[("Twiml", "<Response><Dial>+81</Dial></Response>")],
        );
        assert_eq!(
            r.body,
            "Twiml=%3CResponse%3E%3CDial%3E%2B81%3C%2FDial%3E%3C%2FResponse%3E"
        );
    }
}
