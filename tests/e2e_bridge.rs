//! End-to-end tests of the real Worker (`wrangler dev`) between a fake Twilio and a fake
//! OpenAI Realtime server, over real HTTP and WebSockets on 127.0.0.1.
//!
//! What reached each peer is asserted byte-exact; timing is never asserted, only order.
//! All tests share one Worker (started on first use, see `support::harness`).

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::fake_openai::{self as oai, SessionScript};
use support::fake_twilio::{self as tw, CallIds, ConnectError, MediaStream};
use support::{harness, ok, tagged_chunks, CallSpec, OPENAI_API_KEY, SOON, TWILIO_AUTH_TOKEN};

/// Long enough for a Worker to have done something it should not do (negative checks).
const QUIET: Duration = Duration::from_secs(2);
/// How long the preopen harness holds a socket opened at the webhook for its stream.
const PREOPEN_HOLD: Duration = Duration::from_secs(8);

fn b64(bytes: &[u8]) -> String {
    oai::b64(bytes)
}

fn unb64(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .unwrap_or_else(|e| panic!("not base64 ({e}): {s}"))
}

fn expect_refused(what: &str, r: Result<MediaStream, ConnectError>) -> u16 {
    match r {
        Err(ConnectError::Refused { status, .. }) => {
            assert_ne!(status, 101, "{what}");
            status
        }
        Err(ConnectError::Other(e)) => panic!("{what}: expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("{what}: the Worker accepted the WebSocket upgrade"),
    }
}

// ---- voice webhook ------------------------------------------------------------------------------

/// Posts a voice webhook with a signature that is not Twilio's; returns the answer.
async fn post_badly_signed_voice_webhook(h: &support::Harness, from: &str) -> tw::HttpReply {
    let params = tw::voice_params(&CallIds::new(), from, "+81312345678");
    tw::post_form(&h.voice_url(), &params, Some("bm90LWEtc2lnbmF0dXJl"))
        .await
        .unwrap()
}

/// The answer to a voice webhook that could not be verified: the fallback, with no stream
/// (a refusal would be Twilio's "application error" to the caller).
fn assert_fallback_without_stream(what: &str, reply: &tw::HttpReply) {
    assert_eq!(reply.status, 200, "{what}: {}", reply.body);
    assert!(
        reply.body.starts_with("<Response><Say ") && !reply.body.contains("<Stream"),
        "{what}: {}",
        reply.body
    );
}

/// The `event` of every line of the Worker's log that names `call_sid`, in order.
fn logged_events(log: &str, call_sid: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains(call_sid))
        .filter_map(|l| {
            Some(
                l.split(r#""event":""#)
                    .nth(1)?
                    .split('"')
                    .next()?
                    .to_owned(),
            )
        })
        .collect()
}

/// The line of `event` the Worker logged for `call_sid`, once wrangler printed it (it prints
/// a Worker's lines as they come, some time after what they tell of).
async fn logged_line(h: &support::Harness, call_sid: &str, event: &str) -> String {
    let deadline = Instant::now() + SOON;
    let wanted = format!(r#""event":"{event}""#);
    loop {
        let log = h.worker.log();
        if let Some(line) = log
            .lines()
            .find(|l| l.contains(call_sid) && l.contains(&wanted))
        {
            return line.to_owned();
        }
        if Instant::now() > deadline {
            panic!(
                "no {event} line for {call_sid} within {SOON:?}\n{}",
                h.worker.log_tail(40)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn voice_webhook_answers_twiml_connecting_a_stream_for_this_call_with_escaped_parameters() {
    let h = harness().await;
    let ids = CallIds::new();
    let from = r#"client:Tom&Jerry <"O'Brien">"#;
    let to = "+81312345678";
    let params = tw::voice_params(&ids, from, to);
    let url = h.voice_url();
    let sig = tw::sign(TWILIO_AUTH_TOKEN, &url, &params);
    let reply = tw::post_form(&url, &params, Some(&sig)).await.unwrap();

    assert_eq!(reply.status, 200, "body: {}", reply.body);
    let ct = reply.content_type.clone().unwrap_or_default();
    assert!(
        ct.to_ascii_lowercase().starts_with("text/xml"),
        "Content-Type should be text/xml, got {ct:?}"
    );
    let twiml = tw::parse_twiml(&reply.body).unwrap_or_else(|e| panic!("{e}\n{}", reply.body));
    assert_eq!(
        twiml.element_paths.first().map(String::as_str),
        Some("Response"),
        "root element; body: {}",
        reply.body
    );
    assert_eq!(
        twiml.stream_url,
        h.expected_stream_url(&ids.call_sid),
        "body: {}",
        reply.body
    );
    assert_eq!(
        twiml.parameter("From"),
        Some(from),
        "From must round-trip; body: {}",
        reply.body
    );
    assert_eq!(twiml.parameter("To"), Some(to), "body: {}", reply.body);
    // The markup characters of the caller id must have been escaped, not passed through.
    assert!(
        !reply.body.contains("Tom&Jerry"),
        "raw '&' in TwiML: {}",
        reply.body
    );
    assert!(
        !reply.body.contains(r#"<"O'Brien">"#),
        "raw '<' in TwiML: {}",
        reply.body
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_number_whose_webhook_is_set_to_get_is_answered_the_same() {
    let h = harness().await;
    let ids = CallIds::new();
    let params = tw::voice_params(&ids, "+15551230009", "+81312345678");
    let (url, reply) = tw::get_query(&h.voice_url(), &params, TWILIO_AUTH_TOKEN)
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "GET {url}: {}", reply.body);
    let twiml = tw::parse_twiml(&reply.body).unwrap_or_else(|e| panic!("{e}\n{}", reply.body));
    assert_eq!(twiml.stream_url, h.expected_stream_url(&ids.call_sid));
    assert_eq!(twiml.parameter("From"), Some("+15551230009"));
    // Signed as a POST would be (parameters appended), it is not Twilio's signature.
    let wrong = tw::sign(TWILIO_AUTH_TOKEN, &url, &params);
    let client = reqwest::Client::new();
    let r = client
        .get(&url)
        .header("X-Twilio-Signature", wrong)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let body = r.text().await.unwrap();
    assert!(!body.contains("<Stream"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn voice_webhook_with_missing_or_wrong_signature_gets_the_fallback_and_no_stream() {
    let h = harness().await;
    let ids = CallIds::new();
    let params = tw::voice_params(&ids, "+15551230002", "+81312345678");
    let url = h.voice_url();

    let unsigned = tw::post_form(&url, &params, None).await.unwrap();
    assert_fallback_without_stream("unsigned webhook", &unsigned);

    let wrong_token = tw::sign("not-the-auth-token", &url, &params);
    let wrong = tw::post_form(&url, &params, Some(&wrong_token))
        .await
        .unwrap();
    assert_fallback_without_stream("signature with another token", &wrong);

    // A valid signature of other parameters (a tampered From) must not pass either.
    let mut tampered = params.clone();
    for (k, v) in tampered.iter_mut() {
        if k == "From" {
            *v = "+15559999999".into();
        }
    }
    let tampered_reply = tw::post_form(
        &url,
        &tampered,
        Some(&tw::sign(TWILIO_AUTH_TOKEN, &url, &params)),
    )
    .await
    .unwrap();
    assert_fallback_without_stream("tampered form", &tampered_reply);

    // And an unverified call gets no media stream later.
    let stream_url = h.expected_stream_url(&ids.call_sid);
    let claim = h.openai.claim(SessionScript::new()).await;
    let r = MediaStream::connect(
        &stream_url,
        Some(&tw::sign(TWILIO_AUTH_TOKEN, &stream_url, &[])),
    )
    .await;
    expect_refused("media stream of a call whose webhooks were all refused", r);
    ok(h, claim.expect_no_connection(QUIET).await);
}

// ---- media stream admission -------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn media_stream_without_prior_voice_webhook_is_refused_and_opens_no_openai_session() {
    let h = harness().await;
    let ids = CallIds::new();
    let url = h.expected_stream_url(&ids.call_sid);
    let sig = tw::sign(TWILIO_AUTH_TOKEN, &url, &[]);
    let claim = h.openai.claim(SessionScript::new()).await;
    let status = expect_refused(
        "signed media stream for a CallSid that had no voice webhook",
        MediaStream::connect(&url, Some(&sig)).await,
    );
    assert_eq!(status, 404, "media stream without webhook");
    ok(h, claim.expect_no_connection(QUIET).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn unsigned_or_wrongly_signed_stream_upgrade_is_refused_but_signed_one_accepted() {
    let h = harness().await;
    let ids = CallIds::new();
    let twiml = h.answer_call(&ids, "+15551230003", "+81312345678").await;

    let claim = h.openai.claim(SessionScript::new()).await;
    expect_refused(
        "unsigned upgrade",
        MediaStream::connect(&twiml.stream_url, None).await,
    );
    let wrong = tw::sign("not-the-auth-token", &twiml.stream_url, &[]);
    expect_refused(
        "upgrade signed with another token",
        MediaStream::connect(&twiml.stream_url, Some(&wrong)).await,
    );
    let other_url = tw::sign(TWILIO_AUTH_TOKEN, &h.expected_stream_url("CA0000"), &[]);
    expect_refused(
        "upgrade carrying the signature of another url",
        MediaStream::connect(&twiml.stream_url, Some(&other_url)).await,
    );
    ok(h, claim.expect_no_connection(QUIET).await);
    drop(claim);

    // The refusals were about the signature: the properly signed upgrade works.
    let claim = h.openai.claim(SessionScript::new()).await;
    let stream = h.open_stream(&twiml).await;
    stream.send_connected();
    stream.send_start(&ids, &twiml.parameters);
    let session = ok(h, claim.session(SOON).await);
    drop(claim);
    stream.send_stop(&ids);
    ok(h, session.wait_closed(SOON).await);
}

/// A Worker at the default `CALLER_AUDIO_CHUNK_MS` (40 ms: the harness's 20 set aside).
async fn chunked_harness() -> &'static support::Harness {
    static HARNESS: tokio::sync::OnceCell<Result<support::Harness, String>> =
        tokio::sync::OnceCell::const_new();
    support::shared_harness(&HARNESS, "e2e-bridge-caller-chunks", || {
        vec![("CALLER_AUDIO_CHUNK_MS".into(), String::new())]
    })
    .await
}

/// As shipped, the caller's 20 ms frames go to OpenAI two to an append (half the messages
/// for the Worker to send), whole and in order; the frame waiting for its pair when the
/// caller hangs up is sent before the session closes. The caller speaks once the session
/// is up (the greeting asked for), so no frame is held and every append but the last is a
/// pair: frames held during the set-up go one to an append, and how many are held depends
/// on timing (`caller_audio_reaches_openai_unchanged_complete_in_order_even_before_openai_is_up`).
#[tokio::test(flavor = "multi_thread")]
async fn by_default_caller_audio_reaches_openai_two_frames_to_an_append_complete_in_order() {
    let h = chunked_harness().await;
    let frames = 101; // odd: the last frame is still waiting for its pair at the hang-up
    let audio: Vec<u8> = tagged_chunks(0x52, frames, tw::FRAME_BYTES).concat();
    let call = h.start_call(CallSpec::default()).await;
    ok(h, call.openai.wait_event("response.create", SOON).await);
    let sent = call.twilio.play_caller_audio(audio.clone()).await.unwrap();
    assert_eq!(sent.len(), frames);
    let appended = |events: &[oai::ClientEvent]| -> Vec<Vec<u8>> {
        events
            .iter()
            .filter(|e| e.event_type() == "input_audio_buffer.append")
            .map(|e| unb64(e.event["audio"].as_str().unwrap_or_default()))
            .collect()
    };
    let before_end = (frames - 1) * tw::FRAME_BYTES;
    let chunks = ok(
        h,
        call.openai
            .wait_until("all but the last frame appended", SOON, |v| {
                let chunks = appended(v.received);
                (chunks.iter().map(Vec::len).sum::<usize>() >= before_end).then_some(chunks)
            })
            .await,
    );
    assert_eq!(
        chunks.concat(),
        audio[..before_end],
        "whole frames, in order, and the last one not yet sent"
    );
    assert!(
        chunks.iter().all(|c| c.len() == 2 * tw::FRAME_BYTES),
        "two frames to every append: {:?}",
        chunks.iter().map(Vec::len).collect::<Vec<_>>()
    );

    call.twilio.send_stop(&call.ids);
    ok(h, call.openai.wait_closed(SOON).await);
    let chunks = appended(&call.openai.received());
    assert_eq!(
        chunks.concat(),
        audio,
        "the last frame too, before the session closed"
    );
    assert_eq!(
        chunks.last().map(Vec::len),
        Some(tw::FRAME_BYTES),
        "the last frame by itself"
    );
}

/// A Worker reached through a proxy (`PUBLIC_BASE_URL`) that serves it under a path and
/// passes requests on without it, with its own Worker.
async fn proxied_harness() -> &'static support::Harness {
    static HARNESS: tokio::sync::OnceCell<Result<support::Harness, String>> =
        tokio::sync::OnceCell::const_new();
    support::shared_harness(&HARNESS, "e2e-bridge-public-base-url", || {
        vec![("PUBLIC_BASE_URL".into(), PUBLIC.into())]
    })
    .await
}

const PUBLIC: &str = "https://phone.example.jp/line";

/// Twilio signs the URL it called, the public one with the proxy's path: every check is
/// against that, and the URLs the TwiML gives Twilio (the stream, the transfer's Dial action)
/// are on it too.
#[tokio::test(flavor = "multi_thread")]
async fn behind_a_proxy_signatures_are_checked_against_public_base_url_and_twiml_points_there() {
    let h = proxied_harness().await;
    let ids = CallIds::new();
    let params = tw::voice_params(&ids, "+15551230021", "+81312345678");
    let public_voice = format!("{PUBLIC}/api/twilio/voice");
    // Signed for the address the Worker itself sees: not what Twilio signs, not verified.
    let local_sig = tw::sign(TWILIO_AUTH_TOKEN, &h.voice_url(), &params);
    let reply = tw::post_form(&h.voice_url(), &params, Some(&local_sig))
        .await
        .unwrap();
    assert_fallback_without_stream("signed for the local address", &reply);
    let sig = tw::sign(TWILIO_AUTH_TOKEN, &public_voice, &params);
    let reply = tw::post_form(&h.voice_url(), &params, Some(&sig))
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    let twiml = tw::parse_twiml(&reply.body).unwrap_or_else(|e| panic!("{e}: {}", reply.body));
    let public_stream = format!(
        "wss://phone.example.jp/line/api/twilio/media-stream/{}",
        ids.call_sid
    );
    assert_eq!(twiml.stream_url, public_stream);

    // Twilio opens the stream at the public URL, signed for it; the proxy passes it on.
    let local_stream = public_stream.replace(
        "wss://phone.example.jp/line",
        &h.base_url().replacen("http", "ws", 1),
    );
    let local_sig = tw::sign(TWILIO_AUTH_TOKEN, &local_stream, &[]);
    expect_refused(
        "upgrade signed for the local address",
        MediaStream::connect(&local_stream, Some(&local_sig)).await,
    );
    let claim = h.openai.claim(SessionScript::new()).await;
    let sig = tw::sign(TWILIO_AUTH_TOKEN, &public_stream, &[]);
    let stream = MediaStream::connect(&local_stream, Some(&sig))
        .await
        .unwrap_or_else(|e| panic!("the upgrade signed for the public URL: {e:?}"));
    stream.send_connected();
    stream.send_start(&ids, &twiml.parameters);
    let session = ok(h, claim.session(SOON).await);
    drop(claim);

    // The transfer's Dial action (where Twilio reports a transfer's outcome) is checked the
    // same way.
    let local_action = format!("{}/api/twilio/transfer-result", h.base_url());
    let public_action = format!("{PUBLIC}/api/twilio/transfer-result");
    let mut result = tw::voice_params(&ids, "+15551230021", "+81312345678");
    result.push(("DialCallStatus".into(), "completed".into()));
    result.push(("DialCallDuration".into(), "42".into()));
    let local_sig = tw::sign(TWILIO_AUTH_TOKEN, &local_action, &result);
    let reply = tw::post_form(&local_action, &result, Some(&local_sig))
        .await
        .unwrap();
    assert_eq!(reply.status, 403, "{}", reply.body);
    let sig = tw::sign(TWILIO_AUTH_TOKEN, &public_action, &result);
    let reply = tw::post_form(&local_action, &result, Some(&sig))
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(reply.body.contains("<Hangup/>"), "{}", reply.body);

    stream.send_stop(&ids);
    ok(h, session.wait_closed(SOON).await);
}

// ---- the OpenAI side ------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn openai_handshake_is_ga_with_bearer_key_and_session_update_asks_for_pcmu_realtime_ja() {
    let h = harness().await;
    let call = h.start_call(CallSpec::default()).await;
    let hs = &call.openai.handshake;

    assert_eq!(hs.path, "/v1/realtime");
    assert_eq!(hs.query.as_deref(), Some("model=gpt-realtime"));
    assert_eq!(
        hs.header_values("authorization"),
        vec![format!("Bearer {OPENAI_API_KEY}").as_str()],
        "Authorization header"
    );
    assert!(
        hs.header_values("openai-beta").is_empty(),
        "GA must not send OpenAI-Beta: {:?}",
        hs.header_values("openai-beta")
    );

    let update = ok(h, call.openai.wait_event("session.update", SOON).await);
    let first = call.openai.received()[0].clone();
    assert_eq!(
        first.event_type(),
        "session.update",
        "the first client event must configure the session"
    );
    let s = &update.event["session"];
    assert_eq!(s["type"], json!("realtime"), "session.type; got {s}");
    assert_eq!(s["output_modalities"], json!(["audio"]), "got {s}");
    assert_eq!(
        s["audio"]["input"]["format"],
        json!({"type": "audio/pcmu"}),
        "got {s}"
    );
    assert_eq!(
        s["audio"]["output"]["format"],
        json!({"type": "audio/pcmu"}),
        "got {s}"
    );
    assert_eq!(
        s["audio"]["input"]["turn_detection"]["type"],
        json!("server_vad"),
        "got {s}"
    );
    assert_eq!(
        s["audio"]["input"]["transcription"]["language"],
        json!("ja"),
        "got {s}"
    );
    let voice = s["audio"]["output"]["voice"]
        .as_str()
        .unwrap_or_else(|| panic!("audio.output.voice; got {s}"));
    assert!(
        ["alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar"]
            .contains(&voice),
        "audio.output.voice {voice:?}"
    );
    let instructions = s["instructions"]
        .as_str()
        .unwrap_or_else(|| panic!("instructions; got {s}"));
    assert!(!instructions.trim().is_empty(), "instructions are empty");
    if let Some(model) = s.get("model") {
        assert_eq!(model, &json!("gpt-realtime"), "session.model");
    }
    for beta in [
        "modalities",
        "voice",
        "input_audio_format",
        "output_audio_format",
        "input_audio_transcription",
        "input_audio_noise_reduction",
        "turn_detection",
        "temperature",
        "max_response_output_tokens",
    ] {
        assert!(
            s.get(beta).is_none(),
            "beta field session.{beta} in a GA session.update: {s}"
        );
    }

    // The fake answered like the real server would: merged config, no error.
    ok(
        h,
        call.openai
            .wait_until("the fake's answer to session.update", SOON, |v| {
                v.sent
                    .iter()
                    .any(|(_, e)| e["type"] == "session.updated" || e["type"] == "error")
                    .then_some(())
            })
            .await,
    );
    let sent = call.openai.sent();
    assert!(
        sent.iter().all(|(_, e)| e["type"] != "error"),
        "the fake OpenAI rejected something: {:?}",
        sent.iter()
            .filter(|(_, e)| e["type"] == "error")
            .collect::<Vec<_>>()
    );
    assert_eq!(
        call.openai.effective_session()["audio"]["output"]["format"]["type"],
        json!("audio/pcmu")
    );

    call.twilio.send_stop(&call.ids);
    ok(h, call.openai.wait_closed(SOON).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn greeting_follows_start_and_its_audio_reaches_twilio_byte_exact_with_a_mark_per_500_ms() {
    let h = harness().await;
    // Distinct, known bytes and uneven sizes.
    let chunks: Vec<Vec<u8>> = [2400usize, 1600, 333, 3667, 160, 1000]
        .iter()
        .enumerate()
        .map(|(i, &len)| tagged_chunks(0xA0 + i as u8, 1, len).remove(0))
        .collect();
    let script = SessionScript::new().once(
        "response.create",
        oai::full_response(
            "resp_greet",
            "item_greet",
            &chunks,
            "お電話ありがとうございます。",
        ),
    );

    let ids = CallIds::new();
    let twiml = h.answer_call(&ids, "+15551230004", "+81312345678").await;
    let claim = h.openai.claim(script).await;
    let twilio = h.open_stream(&twiml).await;
    twilio.send_connected();

    // If the Worker opens its OpenAI session before `start`, it must not greet before `start`.
    if let Ok(session) = claim.session(Duration::from_secs(3)).await {
        ok(h, session.wait_sent("session.updated", SOON).await);
        tokio::time::sleep(QUIET).await;
        assert!(
            session.received_of_type("response.create").is_empty(),
            "response.create before Twilio's start"
        );
    }
    let start_sent = Instant::now();
    twilio.send_start(&ids, &twiml.parameters);
    let session = ok(h, claim.session(SOON).await);
    drop(claim);

    let create = ok(h, session.wait_event("response.create", SOON).await);
    assert!(create.at >= start_sent, "response.create before start");
    let update_pos = session
        .received()
        .iter()
        .position(|e| e.event_type() == "session.update");
    let create_pos = session
        .received()
        .iter()
        .position(|e| e.event_type() == "response.create");
    assert!(
        update_pos < create_pos,
        "response.create before session.update"
    );
    assert_eq!(
        session.received_of_type("response.create").len(),
        1,
        "one greeting"
    );

    let log = ok(
        h,
        twilio
            .wait_until("all greeting audio", SOON, |l| {
                (l.media.len() >= chunks.len()).then(|| l.clone())
            })
            .await,
    );
    let payloads: Vec<String> = log.media.iter().map(|m| m.payload.clone()).collect();
    let expected: Vec<String> = chunks.iter().map(|c| b64(c)).collect();
    assert_eq!(
        payloads, expected,
        "media payloads must be the deltas, unchanged and in order"
    );
    assert_eq!(log.media_bytes(), chunks.concat());
    // Marks are batched (one per 500 ms of audio, the rest when the item's audio is done):
    // 2400 + 1600 | 333 + 3667 | 160 + 1000, each run of media followed by its mark.
    let log = ok(
        h,
        twilio
            .wait_until("the mark after the last media", SOON, |l| {
                (l.marks.len() >= 3).then(|| l.clone())
            })
            .await,
    );
    let events: Vec<String> = log
        .frames
        .iter()
        .filter_map(|(_, f)| match f["event"].as_str() {
            Some("media") => Some("media".to_owned()),
            Some("mark") => {
                assert!(
                    f["mark"]["name"].as_str().is_some_and(|n| !n.is_empty()),
                    "mark without a name: {f}"
                );
                Some("mark".to_owned())
            }
            _ => None,
        })
        .collect();
    let expected = [
        "media", "media", "mark", "media", "media", "mark", "media", "media", "mark",
    ];
    assert_eq!(events, expected, "media and marks in this order");

    // Twilio plays it all and echoes every mark.
    let log = ok(
        h,
        twilio
            .wait_until("every mark echoed as played", SOON, |l| {
                (l.played_echoes() >= 3).then(|| l.clone())
            })
            .await,
    );
    let names: Vec<&String> = log.marks.iter().map(|m| &m.name).collect();
    let mut unique = names.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), names.len(), "mark names repeat: {names:?}");
    assert!(log.clears.is_empty(), "unexpected clear");
    assert!(
        log.problems.is_empty(),
        "Twilio protocol problems: {:?}",
        log.problems
    );

    twilio.send_stop(&ids);
    ok(h, session.wait_closed(SOON).await);
}

/// A Worker as shipped as to the Realtime socket: opened at the voice webhook (held 8 s
/// here, 10 by default: long enough for a loaded machine to open the stream after the
/// tests' 2 s of quiet). Every test on it claims its session before it posts the webhook.
async fn preopen_harness() -> &'static support::Harness {
    static HARNESS: tokio::sync::OnceCell<Result<support::Harness, String>> =
        tokio::sync::OnceCell::const_new();
    support::shared_harness(&HARNESS, "e2e-bridge-preopen", || {
        vec![(
            "OPENAI_PREOPEN_SECONDS".into(),
            PREOPEN_HOLD.as_secs().to_string(),
        )]
    })
    .await
}

/// The greeting of the preopen tests: two chunks of known audio.
fn preopen_greeting(tag: u8) -> (SessionScript, Vec<Vec<u8>>) {
    let chunks = tagged_chunks(tag, 2, 800);
    let script = SessionScript::new().once(
        "response.create",
        oai::full_response(
            "resp_pre",
            "item_pre",
            &chunks,
            "お電話ありがとうございます。",
        ),
    );
    (script, chunks)
}

/// Opens the stream of a call whose webhook was answered with `twiml`, sends `connected`
/// and `start`, and waits for the greeting's audio (`chunks`) to reach Twilio, unchanged.
async fn stream_and_hear_greeting(
    h: &support::Harness,
    ids: &CallIds,
    twiml: &tw::Twiml,
    chunks: &[Vec<u8>],
) -> MediaStream {
    let twilio = h.open_stream(twiml).await;
    twilio.send_connected();
    twilio.send_start(ids, &twiml.parameters);
    let heard = ok(
        h,
        twilio
            .wait_until("the greeting's audio", SOON, |l| {
                (l.media.len() >= chunks.len()).then(|| l.media_bytes())
            })
            .await,
    );
    assert_eq!(heard, chunks.concat(), "the greeting's audio, unchanged");
    twilio
}

/// The session was configured once, then asked for the greeting: its first two events.
fn assert_configured_then_greeted(session: &oai::Session, what: &str) {
    let types = session.received_types();
    assert_eq!(
        types.iter().take(2).map(String::as_str).collect::<Vec<_>>(),
        ["session.update", "response.create"],
        "{what}: {types:?}"
    );
}

/// The end of a preopen test's call: one connection to the fake during `claim` (no second
/// connect), then the caller hangs up and the Worker closes the session.
async fn one_connection_then_hang_up(
    h: &support::Harness,
    claim: oai::Claim,
    twilio: &MediaStream,
    ids: &CallIds,
    session: &oai::Session,
) {
    assert_eq!(claim.connections(), 1, "one connection for the call");
    drop(claim);
    twilio.send_stop(ids);
    ok(h, session.wait_closed(SOON).await);
}

/// As shipped, the Realtime socket is opened as the voice webhook is answered, before
/// Twilio opens the media stream, and the session is configured on it at once: its
/// `session.update` is answered while the caller's stream is still to come, and nothing
/// else goes before the stream. The stream's call takes it: one connection, configured once,
/// the greeting heard.
#[tokio::test(flavor = "multi_thread")]
async fn the_realtime_socket_opened_at_the_webhook_serves_the_stream_that_follows() {
    let h = preopen_harness().await;
    let (script, chunks) = preopen_greeting(0x61);
    let claim = h.openai.claim(script).await;
    let ids = CallIds::new();
    let twiml = h.answer_call(&ids, "+819012340061", "+81501234061").await;
    // No stream yet: the session opens all the same, and is configured.
    let session = ok(h, claim.session(SOON).await);
    assert_eq!(
        session.handshake.header("authorization"),
        Some(format!("Bearer {OPENAI_API_KEY}").as_str())
    );
    let update = ok(h, session.wait_event("session.update", SOON).await);
    assert_eq!(
        update.event["session"]["audio"]["output"]["format"]["type"],
        "audio/pcmu"
    );
    ok(h, session.wait_sent("session.updated", SOON).await);
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        session.received_types(),
        ["session.update"],
        "nothing but the session's configuration before the call's stream is there"
    );

    let twilio = stream_and_hear_greeting(h, &ids, &twiml, &chunks).await;
    assert_configured_then_greeted(
        &session,
        "configured once, then the greeting asked for, on the socket opened at the webhook",
    );
    one_connection_then_hang_up(h, claim, &twilio, &ids, &session).await;
    let line = logged_line(h, &ids.call_sid, "openai.preopened").await;
    assert!(line.contains(r#""waited":false"#), "{line}");
}

/// A stream that comes while the socket opened at the webhook is still connecting waits for
/// that connect rather than opening a second one.
#[tokio::test(flavor = "multi_thread")]
async fn a_stream_that_comes_while_the_webhooks_socket_is_connecting_waits_for_it() {
    let h = preopen_harness().await;
    let (script, chunks) = preopen_greeting(0x62);
    // The handshake is answered 4 s after the Worker asked for it: the stream is there
    // well before that.
    let claim = h
        .openai
        .claim(script.handshake_delay(Duration::from_secs(4)))
        .await;
    let ids = CallIds::new();
    let twiml = h.answer_call(&ids, "+819012340062", "+81501234062").await;
    let twilio = stream_and_hear_greeting(h, &ids, &twiml, &chunks).await;
    let session = ok(h, claim.session(SOON).await);
    assert_configured_then_greeted(&session, "configured once, then the greeting");
    one_connection_then_hang_up(h, claim, &twilio, &ids, &session).await;
    let line = logged_line(h, &ids.call_sid, "openai.preopened").await;
    assert!(line.contains(r#""waited":true"#), "{line}");
}

/// The socket opened at the webhook for `ids`' call is closed (`within`) normally with
/// nothing sent on it but the session's configuration; the log line that says why.
async fn closed_unused(
    h: &support::Harness,
    session: &oai::Session,
    ids: &CallIds,
    within: Duration,
) -> String {
    let closed = ok(h, session.wait_closed(within).await);
    assert_eq!(
        closed.close_frame.map(|(code, _)| code),
        Some(1000),
        "closed normally"
    );
    assert_eq!(session.received_types(), ["session.update"]);
    logged_line(h, &ids.call_sid, "openai.preopened_unused").await
}

/// No stream comes for the call (the caller hung up, or Twilio could not reach the Worker):
/// the socket opened at the webhook is closed once its hold (`OPENAI_PREOPEN_SECONDS`) is
/// over, with nothing sent on it but the session's configuration (no greeting, nothing
/// billed), and the log says why.
#[tokio::test(flavor = "multi_thread")]
async fn a_socket_opened_at_the_webhook_is_closed_unused_when_no_stream_comes() {
    let h = preopen_harness().await;
    let claim = h.openai.claim(SessionScript::new()).await;
    let ids = CallIds::new();
    h.answer_call(&ids, "+819012340063", "+81501234063").await;
    let session = ok(h, claim.session(SOON).await);
    drop(claim);
    let line = closed_unused(h, &session, &ids, PREOPEN_HOLD + SOON).await;
    let held = format!(r#""held_ms":{}"#, PREOPEN_HOLD.as_millis());
    assert!(line.contains(&held), "{line}");
}

/// Twilio's final status callback for a call whose stream never came (the caller hung up
/// while Twilio connected it) closes the socket opened at its webhook then, not at the end
/// of its hold.
#[tokio::test(flavor = "multi_thread")]
async fn a_socket_opened_at_the_webhook_is_closed_when_twilio_says_the_call_is_over() {
    let h = preopen_harness().await;
    let claim = h.openai.claim(SessionScript::new()).await;
    let ids = CallIds::new();
    let (from, to) = ("+819012340066", "+81501234066");
    h.answer_call(&ids, from, to).await;
    let session = ok(h, claim.session(SOON).await);
    drop(claim);
    ok(h, session.wait_sent("session.updated", SOON).await);
    let r = h
        .post_status(&tw::status_params(&ids, from, to, "completed", 2, Some(1)))
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let line = closed_unused(h, &session, &ids, SOON).await;
    assert!(
        line.contains("the call ended before its media stream came"),
        "closed by the status callback, not the hold: {line}"
    );
}

/// The socket opened at the webhook is of no use to the stream when OpenAI refused it or
/// closed it while it waited: the stream's call connects again, and is served.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_or_closed_socket_from_the_webhook_is_replaced_by_a_new_connect() {
    let h = preopen_harness().await;
    // Refused: 503 to the upgrade at the webhook.
    let refusing = h
        .openai
        .claim(SessionScript::new().refuse_upgrades(503))
        .await;
    let ids = CallIds::new();
    let twiml = h.answer_call(&ids, "+819012340064", "+81501234064").await;
    ok(h, refusing.wait_refused(1, SOON).await);
    drop(refusing);
    // Once the Worker has seen the refusal: a stream that came before would wait for the
    // connect, and be handed its failure (see the connecting case above).
    let line = logged_line(h, &ids.call_sid, "openai.preopen_failed").await;
    assert!(line.contains(r#""status":503"#), "{line}");
    let (script, chunks) = preopen_greeting(0x64);
    let claim = h.openai.claim(script).await;
    let twilio = stream_and_hear_greeting(h, &ids, &twiml, &chunks).await;
    let session = ok(h, claim.session(SOON).await);
    assert_configured_then_greeted(&session, "the new socket is configured by the call");
    one_connection_then_hang_up(h, claim, &twilio, &ids, &session).await;

    // Closed by OpenAI while it waited for the stream.
    let first = h.openai.claim(SessionScript::new()).await;
    let ids = CallIds::new();
    let twiml = h.answer_call(&ids, "+819012340065", "+81501234065").await;
    let early = ok(h, first.session(SOON).await);
    ok(h, early.wait_event("session.update", SOON).await);
    early.close_with(1011, "server error");
    ok(h, early.wait_closed(SOON).await);
    drop(first);
    // Once the Worker has seen the close: else the stream would take the socket, and the
    // call would reconnect as for any session OpenAI closes.
    let line = logged_line(h, &ids.call_sid, "openai.preopen_closed").await;
    assert!(line.contains(r#""code":1011"#), "{line}");
    let (script, chunks) = preopen_greeting(0x65);
    let claim = h.openai.claim(script).await;
    let twilio = stream_and_hear_greeting(h, &ids, &twiml, &chunks).await;
    let session = ok(h, claim.session(SOON).await);
    assert_eq!(
        early.received_types(),
        ["session.update"],
        "nothing but its configuration went on the closed socket"
    );
    assert_configured_then_greeted(&session, "the new socket is configured by the call");
    one_connection_then_hang_up(h, claim, &twilio, &ids, &session).await;
}

/// A caller who hangs up while the Realtime session is still being opened: the session that
/// opens after the call ended is closed at once, with nothing sent on it, rather than left
/// open at OpenAI with nothing to end it.
#[tokio::test(flavor = "multi_thread")]
async fn a_session_that_opens_after_the_caller_hung_up_is_closed_unused() {
    let h = harness().await;
    let ids = CallIds::new();
    let params = tw::voice_params(&ids, "+819012340031", "+81501234031");
    let url = h.voice_url();
    let sig = tw::sign(TWILIO_AUTH_TOKEN, &url, &params);
    let reply = tw::post_form(&url, &params, Some(&sig)).await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    let twiml = tw::parse_twiml(&reply.body).unwrap_or_else(|e| panic!("{e}: {}", reply.body));

    // The Realtime handshake is answered 4 s after the Worker asked for it…
    let claim = h
        .openai
        .claim(SessionScript::new().handshake_delay(Duration::from_secs(4)))
        .await;
    let sig = tw::sign(TWILIO_AUTH_TOKEN, &twiml.stream_url, &[]);
    let stream = MediaStream::connect(&twiml.stream_url, Some(&sig))
        .await
        .unwrap_or_else(|e| panic!("upgrade: {e:?}"));
    stream.send_connected();
    stream.send_start(&ids, &twiml.parameters);
    // …and the caller is gone before that.
    stream.send_stop(&ids);
    let session = ok(h, claim.session(SOON).await);
    ok(h, session.wait_closed(SOON).await);
    assert_eq!(
        session.received_types(),
        Vec::<String>::new(),
        "nothing is sent on a session opened for a call that has ended"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn caller_audio_reaches_openai_unchanged_complete_in_order_even_before_openai_is_up() {
    let h = harness().await;
    let frames = 150; // 3 s of 20 ms frames
    let audio: Vec<u8> = tagged_chunks(0x51, frames, tw::FRAME_BYTES).concat();
    let call = h
        .start_call(CallSpec {
            // The Worker's OpenAI socket opens ~1 s after the caller started talking.
            script: SessionScript::new().handshake_delay(Duration::from_secs(1)),
            caller_audio: Some(audio.clone()),
            ..CallSpec::default()
        })
        .await;
    let sent = call.caller_audio.unwrap().await.unwrap();
    assert_eq!(sent.len(), frames);

    let appends = ok(
        h,
        call.openai
            .wait_events("input_audio_buffer.append", frames, SOON)
            .await,
    );
    let got: Vec<String> = appends
        .iter()
        .map(|e| e.event["audio"].as_str().unwrap_or_default().to_string())
        .collect();
    let first_bad = got.iter().zip(&sent).position(|(a, b)| a != b);
    assert!(
        first_bad.is_none(),
        "append #{:?} differs from the Twilio payload sent at that position",
        first_bad
    );
    assert_eq!(
        got, sent,
        "appends must carry the Twilio payloads unchanged, in order"
    );
    let bytes: Vec<u8> = got.iter().flat_map(|a| unb64(a)).collect();
    assert_eq!(bytes, audio, "concatenated appended audio");
    for e in &appends {
        let keys: Vec<&String> = e.event.as_object().unwrap().keys().collect();
        assert!(
            keys.iter()
                .all(|k| ["type", "audio", "event_id"].contains(&k.as_str())),
            "unexpected fields in {}",
            e.event
        );
    }
    let received = call.openai.received();
    let update_pos = received
        .iter()
        .position(|e| e.event_type() == "session.update");
    let first_append = received
        .iter()
        .position(|e| e.event_type() == "input_audio_buffer.append");
    assert!(
        update_pos < first_append,
        "audio appended before session.update configured pcmu"
    );

    // The scenario really covered audio sent before the OpenAI socket was open.
    let early = call
        .twilio
        .log()
        .sent
        .iter()
        .filter(|(at, f)| f["event"] == "media" && *at < call.openai.connected_at)
        .count();
    assert!(
        early > 0,
        "no caller frame was sent before the OpenAI session opened"
    );
    eprintln!("{early} caller frames were sent before the OpenAI socket opened");

    // Nothing more than what was sent.
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        call.openai
            .received_of_type("input_audio_buffer.append")
            .len(),
        frames
    );

    call.twilio.send_stop(&call.ids);
    ok(h, call.openai.wait_closed(SOON).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn model_audio_is_held_back_and_no_greeting_requested_until_session_updated_confirms_pcmu() {
    let h = harness().await;
    let call = h
        .start_call(CallSpec {
            script: SessionScript::new().without_session_updated(),
            ..CallSpec::default()
        })
        .await;
    let update = ok(h, call.openai.wait_event("session.update", SOON).await);

    // Unconfirmed session: audio the model sends must not reach Twilio.
    let early = tagged_chunks(0xD1, 3, 400);
    call.openai.send_all(oai::full_response(
        "resp_early",
        "item_early",
        &early,
        "early",
    ));
    tokio::time::sleep(QUIET).await;
    assert!(
        call.twilio.log().media.is_empty(),
        "audio forwarded before session.updated"
    );
    assert!(
        call.openai.received_of_type("response.create").is_empty(),
        "greeting requested before session.updated"
    );

    // Confirm exactly what was asked for: now the greeting comes, and its audio plays.
    call.openai.send_session_updated(&update.event["session"]);
    ok(h, call.openai.wait_event("response.create", SOON).await);
    let greeting = tagged_chunks(0xD2, 2, 400);
    call.openai.send_all(oai::full_response(
        "resp_greet",
        "item_greet",
        &greeting,
        "hello",
    ));
    let log = ok(
        h,
        call.twilio
            .wait_until("the greeting audio", SOON, |l| {
                (l.media.len() >= 2).then(|| l.clone())
            })
            .await,
    );
    assert_eq!(
        log.media_bytes(),
        greeting.concat(),
        "only the audio after session.updated"
    );

    call.twilio.send_stop(&call.ids);
    ok(h, call.openai.wait_closed(SOON).await);
}

// ---- barge-in ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn barge_in_clears_then_truncates_at_the_ms_heard_and_drops_rest_of_item() {
    let h = harness().await;
    let call = h.start_call(CallSpec::default()).await;
    let (oa, twilio) = (&call.openai, &call.twilio);
    ok(h, oa.wait_event("response.create", SOON).await);

    // A long greeting: 30 × 200 ms (1600 bytes), sent at once like the real API does; 6 s,
    // so that it is still playing when the interruption is handled on a loaded machine.
    let (resp, item) = ("resp_long", "item_long");
    let chunks = tagged_chunks(0xB1, 30, 1600);
    oa.send_all(oai::response_start(resp, item));
    for c in &chunks {
        oa.send(oai::audio_delta(resp, item, c));
    }

    // Marks go every 500 ms of audio: after the 3rd chunk (600 ms), the 6th, the 9th…
    // Interrupt 300 ms after the first echo, between echoes.
    ok(
        h,
        twilio
            .wait_until("a mark played", SOON, |l| {
                (l.played_echoes() >= 1).then_some(())
            })
            .await,
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let speech_at = Instant::now();
    oa.send(oai::speech_started(3000, "item_caller_1"));

    let truncate = ok(h, oa.wait_event("conversation.item.truncate", SOON).await);
    let log = ok(
        h,
        twilio
            .wait_until("a clear", SOON, |l| {
                (!l.clears.is_empty()).then(|| l.clone())
            })
            .await,
    );
    let clear = &log.clears[0];
    let clear_frame = &log.frames[clear.frame_index].1;
    assert_eq!(
        clear_frame["streamSid"],
        json!(call.ids.stream_sid),
        "clear frame {clear_frame}"
    );
    assert!(clear.at >= speech_at);

    let t = &truncate.event;
    assert_eq!(t["item_id"], json!(item), "truncate {t}");
    assert_eq!(t["content_index"], json!(0), "truncate {t}");
    // What the caller heard: more than the marks echoed before the caller spoke confirmed
    // (playback is reckoned on the clock since), and never more than Twilio had played
    // when the clear reached it.
    let confirmed = log
        .echoes
        .iter()
        .filter(|e| e.played && e.at <= speech_at)
        .map(|e| e.played_ms)
        .fold(0.0, f64::max);
    let end = t["audio_end_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("audio_end_ms missing: {t}"));
    assert!(
        (end as f64) > confirmed && (end as f64) <= clear.played_ms,
        "audio_end_ms {end}: {confirmed} ms confirmed before the caller spoke, {} ms played \
         when the clear came",
        clear.played_ms
    );
    // Clear first, then truncate (the call machine's order, unit-tested in
    // `barge_in_clears_twilio_then_truncates_at_the_ms_played`). They travel on two sockets,
    // one through wrangler's front end, read on two runtimes: allow for a loaded machine.
    assert!(
        clear.at <= truncate.at + Duration::from_millis(500),
        "truncate reached OpenAI {:?} before the clear reached Twilio",
        clear.at - truncate.at
    );
    assert_eq!(
        log.media_bytes(),
        chunks.concat(),
        "all 30 chunks were forwarded before the interruption"
    );

    // The model's late deltas of the interrupted item never reach Twilio; a new response does.
    let late = tagged_chunks(0xEE, 3, 1600);
    for c in &late {
        oa.send(oai::audio_delta(resp, item, c));
    }
    oa.send_all(oai::response_finish(resp, item, "interrupted", "cancelled"));
    let next = tagged_chunks(0xC1, 2, 800);
    oa.send_all(oai::full_response("resp_next", "item_next", &next, "はい"));
    let log = ok(
        h,
        twilio
            .wait_until("the next response's audio", SOON, |l| {
                (l.media_bytes().len() >= chunks.concat().len() + next.concat().len())
                    .then(|| l.clone())
            })
            .await,
    );
    let after_clear: Vec<u8> = log
        .media
        .iter()
        .filter(|m| m.frame_index > clear.frame_index)
        .flat_map(|m| m.bytes.clone())
        .collect();
    assert_eq!(
        after_clear,
        next.concat(),
        "after the clear only the next response may play (late deltas of {item} must be dropped)"
    );
    assert_eq!(
        oa.received_of_type("conversation.item.truncate").len(),
        1,
        "one truncate"
    );
    assert!(
        oa.sent().iter().all(|(_, e)| e["type"] != "error"),
        "the fake OpenAI answered an error: {:?}",
        oa.sent()
            .iter()
            .filter(|(_, e)| e["type"] == "error")
            .collect::<Vec<_>>()
    );
    assert!(
        log.problems.is_empty(),
        "Twilio protocol problems: {:?}",
        log.problems
    );

    call.twilio.send_stop(&call.ids);
    ok(h, oa.wait_closed(SOON).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn speech_started_without_outstanding_agent_audio_sends_neither_clear_nor_truncate() {
    let h = harness().await;
    let call = h.start_call(CallSpec::default()).await;
    let (oa, twilio) = (&call.openai, &call.twilio);
    ok(h, oa.wait_event("response.create", SOON).await);

    // 1. Before the agent said anything.
    oa.send(oai::speech_started(500, "item_caller_1"));

    // 2. After a short answer played completely (its mark echoed as played: 2 × 50 ms
    // share one).
    let short = tagged_chunks(0x71, 2, 400);
    oa.send_all(oai::full_response(
        "resp_short",
        "item_short",
        &short,
        "はい",
    ));
    ok(
        h,
        twilio
            .wait_until("its mark played", SOON, |l| {
                (l.played_echoes() >= 1).then_some(())
            })
            .await,
    );
    // The echoes travel to the Worker on the Twilio socket, speech_started on the OpenAI one:
    // give the echoes a head start.
    tokio::time::sleep(QUIET).await;
    oa.send(oai::speech_started(2500, "item_caller_2"));

    // Sync point: the Worker handles OpenAI events in order, so once this later audio reaches
    // Twilio, both speech_started events have been handled.
    let marker = tagged_chunks(0x72, 1, 160);
    oa.send_all(oai::full_response(
        "resp_after",
        "item_after",
        &marker,
        "ok",
    ));
    let log = ok(
        h,
        twilio
            .wait_until(
                "the audio sent after the speech_started events",
                SOON,
                |l| (l.media.len() >= 3).then(|| l.clone()),
            )
            .await,
    );
    assert_eq!(
        log.media_bytes(),
        [short.concat(), marker.concat()].concat()
    );
    assert!(
        log.clears.is_empty(),
        "clear sent with nothing playing: {:?}",
        log.clears
    );
    tokio::time::sleep(QUIET).await;
    assert!(
        oa.received_of_type("conversation.item.truncate").is_empty(),
        "truncate sent with nothing playing: {:?}",
        oa.received_of_type("conversation.item.truncate")
    );
    assert!(twilio.log().clears.is_empty());

    call.twilio.send_stop(&call.ids);
    ok(h, oa.wait_closed(SOON).await);
}

// ---- end of call ----------------------------------------------------------------------------------

/// The alarm the call's Durable Object has set (ms since the epoch), or None, read from its
/// local storage (`_cf_METADATA` row 1, in nanoseconds).
fn call_object_alarm(h: &support::Harness, call_sid: &str) -> Option<i64> {
    h.call_object_db(call_sid)
        .query_row("SELECT value FROM _cf_METADATA WHERE key = 1", [], |r| {
            r.get::<_, Option<i64>>(0)
        })
        .ok()
        .flatten()
        .map(|ns| ns / 1_000_000)
}

#[tokio::test(flavor = "multi_thread")]
async fn twilio_stop_closes_the_openai_socket_and_the_call_object_stops_its_watch() {
    let h = harness().await;
    let call = h.start_call(CallSpec::default()).await;
    ok(h, call.openai.wait_event("session.update", SOON).await);
    assert!(call.openai.closed().is_none());
    // While the stream runs, the object's watch alarm is set, about a minute ahead.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let alarm = call_object_alarm(h, &call.ids.call_sid).expect("the watch alarm while live");
    assert!(
        (now_ms + 30_000..now_ms + 61_000).contains(&alarm),
        "alarm at {alarm}, now {now_ms}"
    );
    call.twilio.send_stop(&call.ids);
    let closed = ok(h, call.openai.wait_closed(SOON).await);
    eprintln!("OpenAI socket closed after stop: {closed:?}");
    // Once the call's records are in D1, the alarm goes: no wake-up a minute later.
    let deadline = Instant::now() + SOON;
    while call_object_alarm(h, &call.ids.call_sid).is_some() {
        assert!(
            Instant::now() < deadline,
            "the call object's alarm is still set after the call ended:\n{}",
            h.worker.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn twilio_socket_close_without_stop_closes_the_openai_socket() {
    let h = harness().await;
    let call = h.start_call(CallSpec::default()).await;
    ok(h, call.openai.wait_event("session.update", SOON).await);
    call.twilio.close();
    let closed = ok(h, call.openai.wait_closed(SOON).await);
    eprintln!("OpenAI socket closed after the Twilio socket closed: {closed:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn twilio_connection_lost_without_close_frame_closes_the_openai_socket() {
    let h = harness().await;
    let call = h.start_call(CallSpec::default()).await;
    ok(h, call.openai.wait_event("session.update", SOON).await);
    call.twilio.abort();
    let closed = ok(h, call.openai.wait_closed(SOON).await);
    eprintln!("OpenAI socket closed after the Twilio connection was lost: {closed:?}");
}

// ---- secrets ----------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn secrets_never_appear_in_the_worker_log() {
    let h = harness().await;
    // Exercise every path that touches a secret: signed and unverified webhooks, a refused
    // and an accepted upgrade, the OpenAI handshake, audio both ways, barge-in, stop.
    assert_fallback_without_stream(
        "badly signed",
        &post_badly_signed_voice_webhook(h, "+15551230009").await,
    );
    let ids = CallIds::new();
    {
        // Under a claim, so that a Worker that wrongly connects cannot hand its OpenAI session
        // to another test.
        let claim = h.openai.claim(SessionScript::new()).await;
        let _ = MediaStream::connect(&h.expected_stream_url(&ids.call_sid), None).await;
        let _ = claim.expect_no_connection(Duration::from_millis(500)).await;
    }

    // 6 s: still playing when the interruption is handled on a loaded machine.
    let greeting = tagged_chunks(0x91, 30, 1600);
    let call = h
        .start_call(CallSpec {
            script: SessionScript::new().once(
                "response.create",
                oai::full_response("resp_s", "item_s", &greeting, "こんにちは"),
            ),
            caller_audio: Some(tagged_chunks(0x92, 25, tw::FRAME_BYTES).concat()),
            ..CallSpec::default()
        })
        .await;
    ok(
        h,
        call.twilio
            .wait_until("a mark played", SOON, |l| {
                (l.played_echoes() >= 1).then_some(())
            })
            .await,
    );
    call.openai.send(oai::speech_started(400, "item_caller"));
    let _ = call
        .openai
        .wait_event("conversation.item.truncate", SOON)
        .await;
    call.caller_audio.unwrap().await.unwrap();
    ok(
        h,
        call.openai
            .wait_events("input_audio_buffer.append", 25, SOON)
            .await,
    );
    call.twilio.send_stop(&call.ids);
    ok(h, call.openai.wait_closed(SOON).await);
    // The last of the call's lines: the log is whole once it is there.
    logged_line(h, &call.ids.call_sid, "call.ended").await;

    h.assert_log_clean(&[OPENAI_API_KEY, TWILIO_AUTH_TOKEN, "SECRET"]);

    // At the default LOG_LEVEL (info) the call's milestones are printed and the detail of
    // each turn (here the caller's speech) is not.
    let events = logged_events(&h.worker.log(), &call.ids.call_sid);
    for milestone in [
        "call.accepted",
        "twilio.start",
        "bridge.barge_in",
        "call.ended",
    ] {
        assert!(
            events.iter().any(|e| e == milestone),
            "{milestone} missing: {events:?}"
        );
    }
    for detail in [
        "twilio.connected",
        "openai.connected",
        "openai.speech_started",
    ] {
        assert!(
            !events.iter().any(|e| e == detail),
            "{detail} printed at info: {events:?}"
        );
    }
}

// ---- log level --------------------------------------------------------------------------------------

/// A Worker of its own, with `LOG_LEVEL=warn`.
async fn warn_level_harness() -> &'static support::Harness {
    static HARNESS: tokio::sync::OnceCell<Result<support::Harness, String>> =
        tokio::sync::OnceCell::const_new();
    support::shared_harness(&HARNESS, "e2e-bridge-warn", || {
        vec![("LOG_LEVEL".into(), "warn".into())]
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn at_log_level_warn_neither_the_worker_nor_the_call_prints_info_lines() {
    let h = warn_level_harness().await;
    // An unverified webhook is an error: it is still printed.
    assert_fallback_without_stream(
        "badly signed",
        &post_badly_signed_voice_webhook(h, "+15551230010").await,
    );

    let call = h.start_call(CallSpec::default()).await;
    ok(h, call.openai.wait_event("session.update", SOON).await);
    call.twilio.send_stop(&call.ids);
    ok(h, call.openai.wait_closed(SOON).await);
    tokio::time::sleep(Duration::from_secs(1)).await; // let the last log lines land

    let log = h.worker.log();
    let ours: Vec<&str> = log.lines().filter(|l| l.contains(r#""event":""#)).collect();
    assert!(
        ours.iter()
            .any(|l| l.contains(r#""event":"twilio.voice_unverified""#)
                && l.contains(r#""level":"error""#)),
        "the unverified webhook's error is missing:\n{}",
        h.worker.log_tail(40)
    );
    // The call ran and printed none of its info lines:
    // neither the Worker's (`twilio.voice`) nor the call machine's milestones.
    let printed = logged_events(&log, &call.ids.call_sid);
    for info in [
        "twilio.voice",
        "call.accepted",
        "twilio.start",
        "call.ended",
    ] {
        assert!(
            !printed.iter().any(|e| e == info),
            "{info} printed at LOG_LEVEL=warn: {printed:?}"
        );
    }
    assert!(
        !ours.iter().any(|l| l.contains(r#""level":"info""#)),
        "an info line at LOG_LEVEL=warn:\n{}",
        ours.join("\n")
    );
}
