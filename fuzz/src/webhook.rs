//! Twilio's HTTP side: a form body, a signature and a URL through the voice webhook and
//! the status callback; the TwiML answered must be well-formed XML, and the stream URL in
//! it must be one our own upgrade check accepts once Twilio signs it.

use arbitrary::Arbitrary;
use phone_agent_bridge::config::{Bridge, Secret};
use phone_agent_bridge::ids::CallSid;
use phone_agent_bridge::store::Record;
use phone_agent_bridge::webhook::{self, Refusal, STREAM_PATH_PREFIX};
use phone_agent_bridge::{signature, twiml};
use quick_xml::escape::resolve_predefined_entity;
use quick_xml::events::Event;
use quick_xml::Reader;

#[derive(Arbitrary, Debug)]
pub struct WebhookInput {
    pub token: String,
    pub public_base: Option<String>,
    pub use_realtime: bool,
    pub fallback_message: String,
    pub dial: Option<String>,
    pub url: Url,
    pub body: Body,
    pub sign: Sign,
    /// The status callback instead of the voice webhook.
    pub status: bool,
    pub now_ms: u64,
}

#[derive(Arbitrary, Debug)]
pub enum Url {
    Parts {
        https: bool,
        host: String,
        port: Option<u16>,
        path: String,
        query: Option<String>,
    },
    Raw(String),
}

#[derive(Arbitrary, Debug)]
pub enum Body {
    Form {
        call_sid: Option<String>,
        status: Option<String>,
        duration: Option<String>,
        from: String,
        extra: Vec<(String, String)>,
    },
    Raw(String),
}

#[derive(Arbitrary, Debug)]
pub enum Sign {
    /// Twilio's signature of the request.
    Valid,
    /// The valid signature with one character changed.
    Mutated {
        at: u8,
        to: u8,
    },
    Raw(String),
    Missing,
}

fn url(u: &Url) -> String {
    match u {
        Url::Parts {
            https,
            host,
            port,
            path,
            query,
        } => {
            let scheme = if *https { "https" } else { "http" };
            // A host as a parsed request URL can hold it (printable ASCII); the TwiML
            // drops characters XML cannot carry, so others could not round-trip anyway.
            let host: String = host
                .chars()
                .filter(|c| c.is_ascii_graphic() && !matches!(c, '/' | '?' | '#' | '\\'))
                .collect();
            let host = if host.is_empty() { "h".into() } else { host };
            let port = port.map(|p| format!(":{p}")).unwrap_or_default();
            let query = query.as_ref().map(|q| format!("?{q}")).unwrap_or_default();
            format!("{scheme}://{host}{port}{}{query}", webhook_path(path))
        }
        Url::Raw(s) => s.clone(),
    }
}

fn webhook_path(p: &str) -> String {
    let p: String = p.chars().filter(|c| !matches!(c, '?' | '#')).collect();
    format!("/{p}")
}

fn body(b: &Body) -> String {
    match b {
        Body::Form {
            call_sid,
            status,
            duration,
            from,
            extra,
        } => {
            let mut s = form_urlencoded::Serializer::new(String::new());
            if let Some(c) = call_sid {
                s.append_pair("CallSid", c);
            }
            if let Some(c) = status {
                s.append_pair("CallStatus", c);
            }
            if let Some(d) = duration {
                s.append_pair("CallDuration", d);
            }
            s.append_pair("From", from);
            s.append_pair("To", "+815012345678");
            for (k, v) in extra {
                s.append_pair(k, v);
            }
            s.finish()
        }
        Body::Raw(s) => s.clone(),
    }
}

/// Checks `xml` is a well-formed document (matching tags, only predefined entities, no
/// character XML cannot carry) and returns the `url` of its `<Stream>`, unescaped.
pub fn check_xml(xml: &str) -> Option<String> {
    for c in xml.chars() {
        let ok = match c {
            '\t' | '\n' | '\r' => true,
            '\u{FFFE}' | '\u{FFFF}' => false,
            c => c >= ' ',
        };
        assert!(ok, "invariant violated: TwiML holds {c:?}: {xml}");
    }
    let mut reader = Reader::from_str(xml);
    reader.config_mut().check_end_names = true;
    let mut depth = 0usize;
    let mut stream_url = None;
    loop {
        let event = reader
            .read_event()
            .unwrap_or_else(|e| panic!("invariant violated: TwiML not well-formed ({e}): {xml}"));
        let opens = matches!(event, Event::Start(_));
        match event {
            Event::Decl(_) => assert_eq!(depth, 0),
            Event::Start(e) | Event::Empty(e) => {
                for a in e.attributes() {
                    let a = a.unwrap_or_else(|err| {
                        panic!("invariant violated: bad attribute ({err}): {xml}")
                    });
                    let value = a.unescape_value().unwrap_or_else(|err| {
                        panic!("invariant violated: attribute ({err}): {xml}")
                    });
                    if e.name().as_ref() == b"Stream" && a.key.as_ref() == b"url" {
                        stream_url = Some(value.into_owned());
                    }
                }
                if opens {
                    depth += 1;
                }
            }
            Event::End(_) => {
                assert!(depth > 0, "invariant violated: unbalanced TwiML: {xml}");
                depth -= 1;
            }
            Event::Text(t) => {
                assert!(
                    depth > 0,
                    "invariant violated: text outside the root: {xml}"
                );
                t.decode().expect("UTF-8");
            }
            Event::GeneralRef(r) => {
                if r.resolve_char_ref()
                    .unwrap_or_else(|e| panic!("invariant violated: char ref ({e}): {xml}"))
                    .is_none()
                {
                    let name = r.decode().expect("UTF-8");
                    assert!(
                        resolve_predefined_entity(&name).is_some(),
                        "invariant violated: entity {name:?} in {xml}"
                    );
                }
            }
            Event::Eof => break,
            other => panic!("invariant violated: unexpected {other:?} in {xml}"),
        }
    }
    assert_eq!(depth, 0, "invariant violated: unclosed TwiML: {xml}");
    stream_url
}

pub fn run(w: &WebhookInput) {
    let mut config = Bridge::from_lookup(|_| None);
    config.twilio_auth_token = Secret::new(w.token.clone());
    // PUBLIC_BASE_URL is the operator's `https://host`: printable ASCII.
    config.public_base_url = w
        .public_base
        .as_ref()
        .map(|b| b.chars().filter(char::is_ascii_graphic).collect());
    config.fallback_only = !w.use_realtime;
    config.fallback_message = w.fallback_message.clone();
    config.fallback_dial_number = w.dial.clone();

    let request_url = url(&w.url);
    let body = body(&w.body);
    let params: Vec<(String, String)> = form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    // Without a public base URL, and with a URL as a browser would write it, what Twilio
    // signed is the request URL itself.
    let plain = config.public_base_url.is_none() && matches!(w.url, Url::Parts { .. });
    let valid = signature::compute(&w.token, &request_url, &params);
    let sig = match &w.sign {
        Sign::Valid => Some(valid.clone()),
        Sign::Mutated { at, to } => {
            let mut b = valid.clone().into_bytes();
            let i = usize::from(*at) % (b.len() - 1); // not the padding
            let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
            let c = alphabet[usize::from(*to) % 64];
            b[i] = if b[i] == c {
                alphabet[(usize::from(*to) + 1) % 64]
            } else {
                c
            };
            Some(String::from_utf8(b).expect("ASCII"))
        }
        Sign::Raw(s) => Some(s.clone()),
        Sign::Missing => None,
    };
    let forged = matches!(w.sign, Sign::Mutated { .. } | Sign::Raw(_) | Sign::Missing)
        && sig.as_deref().map(str::trim) != Some(valid.as_str());

    if w.status {
        let r = webhook::status_callback(&config, &request_url, sig.as_deref(), &body, w.now_ms);
        check_refusal(&r, w, forged, plain);
        if let Ok(record) = &r {
            let Record::TwilioStatus { call_sid, .. } = record else {
                panic!("invariant violated: status callback gave {record:?}")
            };
            assert!(CallSid::parse(call_sid).is_some());
            let _ = record.statements(w.now_ms);
        }
        return;
    }
    let r = webhook::answer_voice(&config, &request_url, sig.as_deref(), &body);
    check_refusal(&r, w, forged, plain);
    if let Err(why) = &r {
        // Not verified: the fallback alone, never a stream; only a malformed request is refused.
        match webhook::unverified_voice(&config, &request_url, &body, why.clone()) {
            Some(u) => assert_eq!(
                check_xml(&u.twiml),
                None,
                "invariant violated: an unverified webhook was offered a stream"
            ),
            None => assert!(
                matches!(why, Refusal::BadRequest(_)),
                "invariant violated: {why:?} refused rather than answered with the fallback"
            ),
        }
    }
    let Ok(answer) = r else { return };
    // An agent whose transfer number is anything at all.
    let agent = phone_agent_bridge::config::Agent {
        transfer_number: w.public_base.clone(),
        ..Default::default()
    };
    let twiml = answer.twiml(&config, &agent);
    let stream = check_xml(&twiml);
    assert_eq!(answer.streams(), w.use_realtime);
    assert_eq!(stream.is_some(), answer.streams(), "{twiml}");
    if let Some(stream) = stream {
        // Twilio signs the upgrade over the URL exactly as we wrote it: our own check of
        // that upgrade, arriving at the same origin, must accept it.
        assert!(stream.ends_with(&format!("{STREAM_PATH_PREFIX}{}", answer.call.call_sid)));
        let upgrade_sig = signature::compute(&w.token, &stream, &[]);
        let upgrade = webhook::verify_stream_upgrade(
            &config,
            &request_url,
            Some(&upgrade_sig),
            &answer.call.call_sid,
        );
        assert_eq!(
            upgrade,
            Ok(()),
            "invariant violated: our stream URL {stream:?} fails our own upgrade check"
        );
        let other = CallSid::new(format!("{}0", answer.call.call_sid));
        assert!(
            webhook::verify_stream_upgrade(&config, &request_url, Some(&upgrade_sig), &other)
                .is_err(),
            "invariant violated: one call's upgrade signature opened another's stream"
        );
    }
    // The TwiML builders on their own, with anything in them.
    let any = w.public_base.as_deref().unwrap_or("ja-JP");
    check_xml(&twiml::fallback(
        &twiml::Apology {
            message: &w.fallback_message,
            language: any,
            voice: any,
        },
        w.dial.as_deref(),
        Some(&w.fallback_message),
    ));
    check_xml(&webhook::fallback_twiml(&config, &agent, Some(any)));
    let params: Vec<(&str, &str)> = params
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    check_xml(&twiml::connect_stream(&request_url, &params));
}

fn check_refusal<T: std::fmt::Debug>(
    r: &Result<T, Refusal>,
    w: &WebhookInput,
    forged: bool,
    plain: bool,
) {
    if let Err(e) = r {
        let _ = (e.to_string(), e.status());
    }
    if w.token.is_empty() {
        assert_eq!(
            r.as_ref().err(),
            Some(&Refusal::NoAuthToken),
            "invariant violated: no token must refuse everything"
        );
        return;
    }
    if forged {
        assert!(
            matches!(
                r,
                Err(Refusal::BadSignature | Refusal::Unsigned | Refusal::BadRequest(_))
            ),
            "invariant violated: a forged or missing signature was accepted: {r:?}"
        );
    }
    if matches!(w.sign, Sign::Valid) && plain {
        assert!(
            !matches!(r, Err(Refusal::BadSignature | Refusal::Unsigned)),
            "invariant violated: Twilio's own signature was refused: {r:?}"
        );
    }
}
