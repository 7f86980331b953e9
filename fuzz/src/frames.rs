//! The wire formats on their own: both peers' parsers on arbitrary text, the frames and
//! client events the bridge writes from arbitrary ids, and the base64 check the relay
//! relies on to copy audio into JSON unescaped.

use arbitrary::Arbitrary;
use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use phone_agent_bridge::audio::base64_decoded_len;
use phone_agent_bridge::config::Agent;
use phone_agent_bridge::ids::{CallSid, StreamSid};
use phone_agent_bridge::store::iso_time;
use phone_agent_bridge::{openai, twilio};
use serde_json::Value;

#[derive(Arbitrary, Debug)]
pub struct FrameInput {
    pub text: String,
    pub sid: String,
    pub name: String,
    pub ms: u64,
    pub audio: Vec<u8>,
}

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("invariant violated: not JSON ({e}): {s}"))
}

pub fn run(f: &FrameInput) {
    // Parsers: any text is a frame or an error, never a panic; errors print.
    match twilio::parse(&f.text) {
        Ok(twilio::Inbound::Media(m)) => {
            let v = json(&f.text);
            assert_eq!(v["media"]["payload"].as_str(), Some(&*m.payload));
        }
        Ok(_) => {}
        Err(e) => drop(e.to_string()),
    }
    match openai::parse(&f.text) {
        Ok(openai::ServerEvent::AudioDelta { item_id, delta, .. }) => {
            let v = json(&f.text);
            assert_eq!(v["delta"].as_str(), Some(&*delta));
            assert_eq!(v["item_id"].as_str(), Some(&*item_id));
        }
        Ok(_) => {}
        Err(e) => drop(e.to_string()),
    }

    // base64: what the check accepts is JSON-safe and decodes (leniently about the unused
    // trailing bits) to the length it claims; whatever a strict decoder accepts, it accepts.
    let lenient = GeneralPurpose::new(
        &alphabet::STANDARD,
        GeneralPurposeConfig::new()
            .with_decode_allow_trailing_bits(true)
            .with_decode_padding_mode(DecodePaddingMode::RequireCanonical),
    );
    match base64_decoded_len(&f.text) {
        Some(n) => {
            assert_eq!(
                serde_json::to_string(&f.text).unwrap(),
                format!("\"{}\"", f.text),
                "accepted base64 needs JSON escaping"
            );
            let decoded = lenient
                .decode(&f.text)
                .unwrap_or_else(|e| panic!("accepted {:?} that does not decode: {e}", f.text));
            assert_eq!(decoded.len(), n, "decoded length of {:?}", f.text);
        }
        None => assert!(
            STANDARD.decode(&f.text).is_err(),
            "refused valid base64 {:?}",
            f.text
        ),
    }
    let b64 = STANDARD.encode(&f.audio);
    assert_eq!(base64_decoded_len(&b64), Some(f.audio.len()));

    // What the bridge writes is JSON carrying the values given, however odd.
    let w = twilio::Writer::new(&StreamSid(f.sid.clone()));
    let v = json(&w.media(&b64));
    assert_eq!(v["event"], "media");
    assert_eq!(v["streamSid"], f.sid.as_str());
    assert_eq!(v["media"]["payload"], b64.as_str());
    let v = json(&w.mark(&f.name));
    assert_eq!(v["mark"]["name"], f.name.as_str());
    assert_eq!(v["streamSid"], f.sid.as_str());
    let v = json(&w.clear());
    assert_eq!(v["event"], "clear");
    let v = json(&openai::input_audio_append(&b64));
    assert_eq!(v["audio"], b64.as_str());
    let v = json(&openai::truncate(&f.name, f.ms));
    assert_eq!(v["item_id"], f.name.as_str());
    assert_eq!(v["audio_end_ms"], f.ms);
    let v = json(&openai::retrieve(&f.name));
    assert_eq!(v["item_id"], f.name.as_str());
    let agent = Agent {
        greeting: f.text.clone(),
        instructions: f.name.clone(),
        model: f.sid.clone(),
        ..Agent::default()
    };
    let v = json(&openai::session_update(&agent));
    assert_eq!(v["session"]["model"], f.sid.as_str());
    // The greeting follows the agent's own instructions (a response's replace the
    // session's); with no greeting, the session's stand.
    let v = json(&openai::greeting_response(&agent));
    let (own, greeting) = (f.name.trim(), f.text.trim());
    if greeting.is_empty() {
        assert!(v.get("response").is_none(), "{v}");
    } else if own.is_empty() {
        assert_eq!(v["response"]["instructions"], greeting);
    } else {
        assert_eq!(
            v["response"]["instructions"],
            format!("{own}\n\n{greeting}")
        );
    }

    // Ids and times.
    if let Some(sid) = CallSid::parse(&f.text) {
        assert!(sid.as_str().bytes().all(|b| b.is_ascii_alphanumeric()));
    }
    let t = iso_time(f.ms);
    if f.ms < 253_402_300_800_000 {
        // Up to 9999-12-31: fixed width, as SQLite's date functions expect.
        assert_eq!(t.len(), 24, "{t}");
    }
}
