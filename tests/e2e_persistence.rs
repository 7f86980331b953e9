//! End-to-end tests of what calls leave in D1 (issue 3): the real Worker in `wrangler dev` with
//! a local D1 migrated from `migrations/`, between the fake Twilio and the fake OpenAI, over
//! real sockets. Everything is read back through the admin API (`GET /api/admin/calls/{sid}`),
//! polling, because the Worker writes to D1 in the background (the call object's outbox).
//!
//! One Worker (with `ADMIN_TOKEN`) is shared by the tests of this binary; the fault-injection
//! test starts a second one of its own with `FAULT_INJECT_D1_FAILURES`. Each test uses its own
//! CallSids and numbers, so they can run in parallel.
//!
//! Where the order of two things matters the tests wait for an observed event, never a fixed
//! time: a mark echoed by the fake Twilio, a caller frame that came out at the fake OpenAI
//! (proof that the Worker has handled every Twilio frame before it), a row in D1.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use support::admin::Admin;
use support::fake_openai::{self as oai, Session, SessionScript};
use support::fake_twilio::{self as tw, CallIds, MediaStream};
use support::{ok, tagged_chunks, CallSpec, Harness, SOON};

/// The admin bearer token of the Workers under test; it must never reach the log.
const ADMIN_TOKEN: &str = "admin-e2e-persist-SECRET-321";
/// D1 writes are asynchronous and, after a failure, retried with backoff: be generous.
const D1_DEADLINE: Duration = Duration::from_secs(90);

async fn harness() -> &'static Harness {
    static HARNESS: tokio::sync::OnceCell<Result<Harness, String>> =
        tokio::sync::OnceCell::const_new();
    support::shared_harness(&HARNESS, "e2e-persistence", || {
        vec![("ADMIN_TOKEN".into(), ADMIN_TOKEN.into())]
    })
    .await
}

fn admin(h: &Harness) -> Admin {
    Admin::new(&h.base_url(), ADMIN_TOKEN)
}

/// Proof that the Worker has handled every frame Twilio sent so far (mark echoes included):
/// one caller `media` frame of recognizable audio is sent and must come out at OpenAI as an
/// `input_audio_buffer.append`. The Worker handles one socket's frames in order.
async fn sync_twilio(h: &Harness, twilio: &MediaStream, oa: &Session, tag: u8) {
    let payload = twilio.send_media(&tagged_chunks(tag, 1, tw::FRAME_BYTES)[0]);
    wait_appended(h, oa, &payload).await;
}

/// Waits until the greeting has played: its mark echoed by the fake Twilio.
async fn greeting_played(h: &Harness, twilio: &MediaStream) {
    ok(
        h,
        twilio
            .wait_until("the greeting to play", SOON, |l| {
                (l.played_echoes() >= 1).then_some(())
            })
            .await,
    );
}

/// Wait until the caller audio `payload` has been appended at OpenAI.
async fn wait_appended(h: &Harness, oa: &Session, payload: &str) {
    ok(
        h,
        oa.wait_until("a caller frame to be appended", SOON, |v| {
            v.received
                .iter()
                .any(|e| {
                    e.event_type() == "input_audio_buffer.append" && e.event["audio"] == payload
                })
                .then_some(())
        })
        .await,
    );
}

/// The caller talks for `frames` × 20 ms (paced in real time); returns when the last frame
/// has been appended at OpenAI.
async fn caller_talks(h: &Harness, twilio: &MediaStream, oa: &Session, tag: u8, frames: usize) {
    let audio = tagged_chunks(tag, frames, tw::FRAME_BYTES).concat();
    let sent = twilio.play_caller_audio(audio).await.unwrap();
    wait_appended(h, oa, sent.last().expect("frames sent")).await;
}

/// Milliseconds since the Unix epoch of a stored time (`YYYY-MM-DDTHH:MM:SS.mmmZ`).
/// The row of a call answered with the fallback, once it says why.
async fn fallback_row(h: &Harness, admin: &Admin, ids: &CallIds) -> Value {
    ok(
        h,
        admin
            .wait_call(&ids.call_sid, "the fallback call's row", D1_DEADLINE, |d| {
                d["call"]["end_reason"].is_string()
            })
            .await,
    )
}

/// Twilio's final status (`completed`, `duration_s` billed) posted, and the row once it has it.
async fn completed(
    h: &Harness,
    admin: &Admin,
    ids: &CallIds,
    (from, to): (&str, &str),
    duration_s: u64,
) -> Value {
    let r = h
        .post_status(&tw::status_params(
            ids,
            from,
            to,
            "completed",
            2,
            Some(duration_s),
        ))
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    ok(
        h,
        admin
            .wait_call(&ids.call_sid, "the final status", D1_DEADLINE, |d| {
                d["call"]["status"] == "completed"
            })
            .await,
    )
}

fn iso_ms(v: &Value) -> i64 {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("time {v} is not a string"));
    assert!(
        s.len() == 24 && s.ends_with('Z') && &s[10..11] == "T",
        "time {s:?} is not YYYY-MM-DDTHH:MM:SS.mmmZ"
    );
    let n = |r: std::ops::Range<usize>| -> i64 {
        s[r].parse()
            .unwrap_or_else(|_| panic!("time {s:?} is not YYYY-MM-DDTHH:MM:SS.mmmZ"))
    };
    let (y, m, d) = (n(0..4), n(5..7), n(8..10));
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    (((days * 24 + n(11..13)) * 60 + n(14..16)) * 60 + n(17..19)) * 1000 + n(20..23)
}

/// Only these keys of a row, for comparisons with a readable diff.
fn project(row: &Value, keys: &[&str]) -> Value {
    let mut out = Map::new();
    for k in keys {
        out.insert((*k).to_owned(), row.get(*k).cloned().unwrap_or(Value::Null));
    }
    Value::Object(out)
}

fn entries(detail: &Value) -> &Vec<Value> {
    detail["transcript"]
        .as_array()
        .unwrap_or_else(|| panic!("no transcript array: {detail}"))
}

fn events(detail: &Value) -> &Vec<Value> {
    detail["events"]
        .as_array()
        .unwrap_or_else(|| panic!("no events array: {detail}"))
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap()
}

/// The checks every complete call's row must pass: times present and ordered, the duration
/// from the stream start to the end, the first agent audio within it.
fn check_call_times(c: &Value) -> (i64, i64, i64, i64) {
    let (started, connected, ended) = (
        iso_ms(&c["started_at"]),
        iso_ms(&c["connected_at"]),
        iso_ms(&c["ended_at"]),
    );
    assert!(
        started <= connected && connected <= ended,
        "times out of order: {}",
        pretty(c)
    );
    let duration = c["duration_ms"]
        .as_i64()
        .unwrap_or_else(|| panic!("duration_ms missing: {}", pretty(c)));
    assert_eq!(
        duration,
        ended - connected,
        "duration_ms is the time from the stream start (connected_at) to the end (ended_at): {}",
        pretty(c)
    );
    let first_audio = c["first_audio_ms"]
        .as_i64()
        .unwrap_or_else(|| panic!("first_audio_ms missing: {}", pretty(c)));
    assert!(
        (0..=duration).contains(&first_audio),
        "first_audio_ms {first_audio} outside the call's {duration} ms"
    );
    (started, connected, ended, duration)
}

#[test]
fn stored_times_parse() {
    for ms in [0u64, 951_782_400_000, 1_795_311_122_123] {
        let iso = phone_agent_bridge::store::iso_time(ms);
        assert_eq!(iso_ms(&json!(iso)), ms as i64, "{iso}");
    }
}

// ---- 1. a complete call with a barge-in ---------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_call_with_a_barge_in_leaves_exactly_its_rows_in_conversation_order() {
    let h = harness().await;
    let admin = admin(h);
    let (from, to) = ("+15551230101", "+81312345678");
    let (greet_resp, greet_item) = ("resp_greet", "item_greet");
    let (reply_resp, reply_item) = ("resp_reply", "item_reply");
    let (caller_item, caller2_item) = ("item_caller_1", "item_caller_2");

    const GREETING: [&str; 2] = ["お電話ありがとうございます。", "ご用件をどうぞ。"];
    const CALLER_SAID: &str = "予約をお願いしたいのですが。";
    // Ten 200 ms chunks of reply audio, each with three characters of its transcript.
    const REPLY: [&str; 10] = [
        "はい、",
        "ご予約",
        "ですね",
        "。何名",
        "様でい",
        "らっし",
        "ゃいま",
        "すか。",
        "お日に",
        "ちは？",
    ];
    // What the server's truncated item says was heard. The Worker's own estimate (the share of
    // the text matching the share of audio played, 3 characters per 200 ms) always has a
    // multiple of 3 characters, so this 10-character text can only come from the server.
    const HEARD: &str = "はい、ご予約ですね。";
    assert_ne!(HEARD.chars().count() % 3, 0);
    let greeting_text = GREETING.concat();
    let reply_text = REPLY.concat();

    let greeting_audio = tagged_chunks(0x31, 2, 800);
    let mut greeting = oai::response_start(greet_resp, greet_item);
    greeting.extend(oai::audio_with_transcript(
        greet_resp,
        greet_item,
        &greeting_audio,
        &GREETING,
    ));
    greeting.extend(oai::with_usage(
        oai::response_finish(greet_resp, greet_item, &greeting_text, "completed"),
        100,
        20,
    ));
    let script = SessionScript::new()
        .once("response.create", greeting)
        .answer_retrieve(reply_item, HEARD);

    // Webhook (signed) → stream → connected + start.
    let call = h
        .start_call(CallSpec {
            from: from.into(),
            to: to.into(),
            script,
            caller_audio: None,
        })
        .await;
    let (oa, twilio, sid) = (&call.openai, &call.twilio, call.ids.call_sid.as_str());
    let t0 = call.start_sent_at;
    // The fake sends session.created as soon as the socket is up, which can be just after
    // start_call returns: wait for it rather than read it.
    let created = ok(
        h,
        oa.wait_until("session.created sent", SOON, |v| {
            v.sent.first().map(|(_, e)| e.clone())
        })
        .await,
    );
    let created = &created;
    assert_eq!(created["type"], "session.created");
    let session_id = created["session"]["id"].as_str().unwrap().to_owned();

    // The greeting plays out completely (its mark echoed: 200 ms of audio), and the Worker
    // has seen the echo.
    let greet_request = ok(h, oa.wait_event("response.create", SOON).await);
    ok(
        h,
        twilio
            .wait_until("the greeting to play (its mark echoed)", SOON, |l| {
                (l.played_echoes() >= 1).then_some(())
            })
            .await,
    );
    sync_twilio(h, twilio, oa, 0x41).await;

    // The caller speaks (500 ms) and the turn is committed as a user item.
    let caller_start_ms = t0.elapsed().as_millis() as u64;
    oa.send(oai::speech_started(caller_start_ms, caller_item));
    caller_talks(h, twilio, oa, 0x42, 25).await;
    oa.send_all(oai::caller_turn_end(
        caller_item,
        Some(greet_item),
        caller_start_ms + 500,
    ));
    oa.send(oai::caller_transcription_delta(caller_item, "予約を"));

    // The reply starts before the caller's transcription is complete: 6 s of audio, still
    // playing when the interruption is handled on a loaded machine.
    let reply_audio = tagged_chunks(0x51, 30, 1600);
    oa.send_all(oai::response_start(reply_resp, reply_item));
    oa.send_all(oai::audio_with_transcript(
        reply_resp,
        reply_item,
        &reply_audio,
        &REPLY,
    ));

    // The caller talks over the reply once its first mark has played (3 of its 30 chunks:
    // marks go every 500 ms of audio), after the greeting's.
    ok(
        h,
        twilio
            .wait_until("a mark of the reply echoed as played", SOON, |l| {
                (l.played_echoes() >= 2).then_some(())
            })
            .await,
    );
    sync_twilio(h, twilio, oa, 0x43).await;
    let barge_at = Instant::now();
    let barge_ms = t0.elapsed().as_millis() as u64;
    oa.send(oai::speech_started(barge_ms, caller2_item));
    // interrupt_response: the server cancels the reply itself.
    oa.send_all(oai::with_usage(
        oai::response_finish(reply_resp, reply_item, &reply_text, "cancelled"),
        300,
        45,
    ));

    // Twilio clear, truncate, retrieve (answered with HEARD by the script).
    let truncate = ok(h, oa.wait_event("conversation.item.truncate", SOON).await);
    let retrieve = ok(h, oa.wait_event("conversation.item.retrieve", SOON).await);
    let tlog = ok(
        h,
        twilio
            .wait_until("a clear", SOON, |l| {
                (!l.clears.is_empty()).then(|| l.clone())
            })
            .await,
    );
    let clear = &tlog.clears[0];
    // What of the reply played (the greeting's 200 ms came first): at least what was
    // confirmed when the caller spoke, at most what had played when the clear came.
    let greeting_ms = 200.0;
    let confirmed = tlog
        .echoes
        .iter()
        .filter(|e| e.played && e.at <= barge_at)
        .map(|e| e.played_ms)
        .fold(0.0, f64::max)
        - greeting_ms;
    let played = clear.played_ms - greeting_ms;
    assert_eq!(truncate.event["item_id"], reply_item, "{}", truncate.event);
    let audio_end_ms = truncate.event["audio_end_ms"].as_u64().unwrap();
    assert!(
        (audio_end_ms as f64) >= confirmed && (audio_end_ms as f64) <= played,
        "truncate at {audio_end_ms} ms; {confirmed} ms of the reply were confirmed played \
         when the caller spoke, {played} ms when the clear came"
    );
    assert_eq!(retrieve.event["item_id"], reply_item, "{}", retrieve.event);

    // The cut turn lands with the server's text while the caller's words are still unknown.
    let detail = ok(
        h,
        admin
            .wait_call(
                sid,
                "the agent's cut turn with the retrieved text",
                D1_DEADLINE,
                |d| {
                    entries(d)
                        .iter()
                        .any(|e| e["item_id"] == reply_item && e["text"] == HEARD)
                },
            )
            .await,
    );
    let items: Vec<&Value> = entries(&detail).iter().map(|e| &e["item_id"]).collect();
    assert_eq!(
        items,
        [greet_item, reply_item],
        "before the caller's transcription: {}",
        pretty(&detail)
    );

    // The caller's transcription arrives last, and goes in its place in the conversation.
    oa.send(oai::caller_transcription_completed(
        caller_item,
        CALLER_SAID,
    ));
    ok(
        h,
        admin
            .wait_call(sid, "the caller's transcript", D1_DEADLINE, |d| {
                entries(d).iter().any(|e| e["item_id"] == caller_item)
            })
            .await,
    );

    // Twilio stops the stream; the call ends.
    let stop_sent = Instant::now();
    call.twilio.send_stop(&call.ids);
    let closed = ok(h, oa.wait_closed(SOON).await);
    let detail = ok(
        h,
        admin
            .wait_call(sid, "the call's end", D1_DEADLINE, |d| {
                d["call"]["ended_at"].is_string() && d["call"]["end_reason"].is_string()
            })
            .await,
    );
    eprintln!("call detail:\n{}", pretty(&detail));

    // The calls row.
    let c = &detail["call"];
    let keys = [
        "call_sid",
        "account_sid",
        "from_number",
        "to_number",
        "direction",
        "agent_id",
        "status",
        "stream_sid",
        "openai_session_id",
        "end_reason",
        "input_tokens",
        "output_tokens",
        "total_tokens",
        "transcription_input_tokens",
        "transcription_output_tokens",
        "transcription_audio_ms",
        "barge_ins",
        "twilio_duration_s",
    ];
    assert_eq!(
        project(c, &keys),
        project(
            &json!({
                "call_sid": sid, "account_sid": call.ids.account_sid, "from_number": from,
                "to_number": to, "direction": "inbound", "agent_id": "default",
                "status": "completed", "stream_sid": call.ids.stream_sid,
                "openai_session_id": session_id, "end_reason": "twilio_stop",
                "input_tokens": 400, "output_tokens": 65, "total_tokens": 465,
                // The one transcription's, apart from the session's.
                "transcription_input_tokens": 17, "transcription_output_tokens": 9,
                "transcription_audio_ms": 0,
                "barge_ins": 1, "twilio_duration_s": null,
            }),
            &keys
        ),
        "calls row: {}",
        pretty(c)
    );
    let (_, connected, ended, duration) = check_call_times(c);
    // Plausible: the Worker had `start` before it asked for the greeting and saw `stop` before
    // it closed the OpenAI socket (10 ms of slack for the two clocks' rounding).
    let at_least = stop_sent.duration_since(greet_request.at).as_millis() as i64;
    let at_most = closed.at.duration_since(t0).as_millis() as i64;
    assert!(
        at_least - 10 <= duration && duration <= at_most + 10,
        "duration_ms {duration} not within what the test saw ({at_least}..={at_most} ms)"
    );

    // The transcript: exactly three turns, in conversation order (not arrival order).
    let t = entries(&detail);
    assert_eq!(t.len(), 3, "transcript: {}", pretty(&detail["transcript"]));
    let seqs: Vec<i64> = t.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "seq not increasing: {seqs:?}"
    );
    let keys = ["role", "text", "item_id", "interrupted"];
    let got: Vec<Value> = t.iter().map(|e| project(e, &keys)).collect();
    assert_eq!(
        got,
        vec![
            json!({"role": "agent", "text": greeting_text, "item_id": greet_item, "interrupted": false}),
            json!({"role": "caller", "text": CALLER_SAID, "item_id": caller_item, "interrupted": false}),
            json!({"role": "agent", "text": HEARD, "item_id": reply_item, "interrupted": true}),
        ]
    );
    let offsets: Vec<i64> = t.iter().map(|e| e["offset_ms"].as_i64().unwrap()).collect();
    assert_eq!(
        offsets[0],
        c["first_audio_ms"].as_i64().unwrap(),
        "the greeting began with the first agent audio"
    );
    assert_eq!(
        offsets[1], caller_start_ms as i64,
        "the caller's turn began at its speech_started audio_start_ms"
    );
    assert!(
        offsets[0] < offsets[1] && offsets[1] <= offsets[2] && offsets[2] <= duration,
        "offsets {offsets:?} not in conversation order within the {duration} ms call"
    );

    // The events: one barge-in, at the cut item and where it was cut; nothing went wrong.
    let ev = events(&detail);
    let barge_ins: Vec<&Value> = ev.iter().filter(|e| e["type"] == "barge_in").collect();
    assert_eq!(barge_ins.len(), 1, "events: {}", pretty(&detail["events"]));
    let b = barge_ins[0];
    assert_eq!(b["detail"]["item_id"], reply_item, "{b}");
    assert_eq!(b["detail"]["audio_end_ms"], audio_end_ms, "{b}");
    assert!(
        (connected..=ended).contains(&iso_ms(&b["at"])),
        "barge_in at {} outside the call",
        b["at"]
    );
    for bad in ["openai_error", "transcription_failed", "dropped_input"] {
        assert!(
            ev.iter().all(|e| e["type"] != bad),
            "unexpected {bad} event: {}",
            pretty(&detail["events"])
        );
    }
    let seqs: Vec<i64> = ev.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "event seqs {seqs:?}");

    // The fake OpenAI never had to answer with an error (e.g. a truncate past the audio),
    // but for the commit of the caller's speech over the reply at the hang-up: too little
    // of it had come since their last turn for a turn of its own.
    let errors: Vec<Value> = oa
        .sent()
        .into_iter()
        .map(|(_, e)| e)
        .filter(|e| {
            e["type"] == "error"
                && !(e["error"]["event_id"] == "evt_bridge_final_commit"
                    && e["error"]["code"] == "input_audio_buffer_commit_empty")
        })
        .collect();
    assert!(
        errors.is_empty(),
        "the fake OpenAI answered errors: {errors:?}"
    );
}

// ---- 2. the status callback --------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_call_answered_with_the_fallback_only_is_recorded_with_why() {
    static HARNESS: tokio::sync::OnceCell<Result<Harness, String>> =
        tokio::sync::OnceCell::const_new();
    let h = support::shared_harness(&HARNESS, "e2e-persistence-fallback-only", || {
        vec![
            ("ADMIN_TOKEN".into(), ADMIN_TOKEN.into()),
            ("FALLBACK_ONLY".into(), "true".into()),
        ]
    })
    .await;
    let admin = admin(h);
    let ids = CallIds::new();
    let (from, to) = ("+15551230301", "+81312345678");
    let reply = h.post_voice(&ids, from, to).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(!reply.body.contains("<Stream"), "{}", reply.body);
    assert!(
        reply
            .body
            .contains(r#"<Say language="ja-JP" voice="Polly.Mizuki">"#),
        "{}",
        reply.body
    );
    // The call is in D1 with its numbers and why the agent did not take it…
    let detail = fallback_row(h, &admin, &ids).await;
    assert_eq!(
        project(
            &detail["call"],
            &[
                "end_reason",
                "from_number",
                "to_number",
                "agent_id",
                "ended_at"
            ]
        ),
        json!({"end_reason": "fallback_only", "from_number": from, "to_number": to,
               "agent_id": "default", "ended_at": null}),
        "{}",
        pretty(&detail)
    );
    // …and Twilio's final status dates its end.
    let detail = completed(h, &admin, &ids, (from, to), 9).await;
    assert!(
        detail["call"]["ended_at"].is_string(),
        "{}",
        pretty(&detail)
    );
    assert_eq!(detail["call"]["twilio_duration_s"], 9);
}

/// A Worker of its own (`what`, for the message should it not start), with the admin token
/// and `settings`.
async fn own_worker(label: &str, what: &str, settings: &[(&str, &str)]) -> Harness {
    let mut vars = vec![("ADMIN_TOKEN".to_owned(), ADMIN_TOKEN.to_owned())];
    vars.extend(settings.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Harness::start(label, vars)
        .await
        .unwrap_or_else(|e| panic!("{what} did not start:\n{e}"))
}

/// `FALLBACK_ONLY` is switched on during incidents, when D1 may well be failing too: the row
/// of a call answered with the fallback is kept by the call's object until D1 takes it, and
/// the answer to Twilio does not wait for it.
#[tokio::test(flavor = "multi_thread")]
async fn a_fallback_only_call_is_recorded_once_failing_d1_recovers() {
    // A Worker of its own: the first 3 D1 writes of each call fail.
    let h = own_worker(
        "e2e-persistence-fallback-only-d1-faults",
        "the faulty fallback-only Worker",
        &[("FALLBACK_ONLY", "true"), ("FAULT_INJECT_D1_FAILURES", "3")],
    )
    .await;
    let h = &h;
    let admin = admin(h);
    let ids = CallIds::new();
    let (from, to) = ("+15551230303", "+81312345678");
    let sent = Instant::now();
    let reply = h.post_voice(&ids, from, to).await;
    let took = sent.elapsed();
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(!reply.body.contains("<Stream"), "{}", reply.body);
    assert!(reply.body.contains("<Say "), "{}", reply.body);
    assert!(took < Duration::from_secs(5), "the fallback took {took:?}");
    // The first write failed and the retries come after 0.5 s, 1 s and 2 s of backoff:
    // within 1.5 s of the webhook D1 cannot have the row yet.
    let early = admin.call(&ids.call_sid).await.unwrap();
    if sent.elapsed() < Duration::from_millis(1500) {
        assert_eq!(
            early, None,
            "the row was in D1 despite the injected failures"
        );
    }
    let detail = fallback_row(h, &admin, &ids).await;
    assert_eq!(
        project(
            &detail["call"],
            &[
                "end_reason",
                "from_number",
                "to_number",
                "agent_id",
                "status"
            ]
        ),
        json!({"end_reason": "fallback_only", "from_number": from, "to_number": to,
               "agent_id": "default", "status": "ringing"}),
        "{}",
        pretty(&detail)
    );
    let detail = completed(h, &admin, &ids, (from, to), 7).await;
    assert_eq!(detail["call"]["end_reason"], "fallback_only");
    assert_eq!(detail["call"]["twilio_duration_s"], 7);
}

/// A call handed to its agent whose Media Stream never connected (here: never opened) reads
/// as what it was once Twilio reports its end, not as a plain completed call; a late
/// upgrade is refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_call_whose_stream_never_connected_is_recorded_with_why() {
    let h = harness().await;
    let admin = admin(h);
    let ids = CallIds::new();
    let (from, to) = ("+15551230302", "+81312345678");
    let twiml = h.answer_call(&ids, from, to).await;
    let r = h
        .post_status(&tw::status_params(&ids, from, to, "completed", 2, Some(25)))
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let detail = ok(
        h,
        admin
            .wait_call(&ids.call_sid, "the call's end", D1_DEADLINE, |d| {
                d["call"]["end_reason"].is_string()
            })
            .await,
    );
    assert_eq!(
        project(
            &detail["call"],
            &["status", "end_reason", "end_detail", "twilio_duration_s"]
        ),
        json!({"status": "failed", "end_reason": "stream_never_connected",
               "end_detail": "Twilio reported the call completed after 25 s and its Media Stream never connected",
               "twilio_duration_s": 25}),
        "{}",
        pretty(&detail)
    );
    assert!(
        detail["call"]["ended_at"].is_string(),
        "{}",
        pretty(&detail)
    );
    let sig = tw::sign(support::TWILIO_AUTH_TOKEN, &twiml.stream_url, &[]);
    match MediaStream::connect(&twiml.stream_url, Some(&sig)).await {
        Err(tw::ConnectError::Refused { status, .. }) => assert_eq!(status, 410),
        Err(e) => panic!("expected 410, got {e:?}"),
        Ok(_) => panic!("a stream for a call that is over was accepted"),
    }
}

/// Twilio does not send a status callback again: one the call's object could not take
/// (`FAULT_INJECT_CALL_OBJECT_FAILURES`: the Worker's first hand-over to an object fails) is
/// written straight to D1, here on the second try (`FAULT_INJECT_D1_FAILURES` fails the
/// first), and acknowledged. The call, whose stream never connected, no longer reads
/// `ringing`: it is completed, with Twilio's duration. (Why its stream never connected only
/// its object knows, so the row does not say.)
#[tokio::test(flavor = "multi_thread")]
async fn a_status_callback_the_call_object_does_not_take_is_written_to_d1() {
    let h = own_worker(
        "e2e-persistence-call-object-faults",
        "the Worker with failing call objects",
        &[
            ("FAULT_INJECT_CALL_OBJECT_FAILURES", "1"),
            ("FAULT_INJECT_D1_FAILURES", "1"),
        ],
    )
    .await;
    let h = &h;
    let admin = admin(h);
    let ids = CallIds::new();
    let (from, to) = ("+15551230304", "+81312345678");
    h.answer_call(&ids, from, to).await;
    ok(
        h,
        admin
            .wait_call(&ids.call_sid, "the ringing row", D1_DEADLINE, |d| {
                d["call"]["status"] == "ringing"
            })
            .await,
    );
    let r = h
        .post_status(&tw::status_params(&ids, from, to, "completed", 2, Some(31)))
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    // Acknowledged once it is in D1: no waiting needed.
    let detail = ok(h, admin.call(&ids.call_sid).await).expect("the call's row");
    assert_eq!(
        project(
            &detail["call"],
            &["status", "twilio_duration_s", "from_number", "agent_id"]
        ),
        json!({"status": "completed", "twilio_duration_s": 31, "from_number": from,
               "agent_id": "default"}),
        "{}",
        pretty(&detail)
    );
    assert!(
        detail["call"]["ended_at"].is_string(),
        "{}",
        pretty(&detail)
    );
    // wrangler prints a request's lines after its answer: waited for.
    log_line(h, &ids.call_sid, "call.status_not_kept").await;
    log_line(h, &ids.call_sid, "call.record_written").await;
    let log = h.worker.log();
    // A Worker with test hooks set says so, at error level, whatever check-config saw.
    assert!(
        log.lines()
            .any(|l| l.contains("\"config.test_hook_active\"")
                && l.contains("FAULT_INJECT_CALL_OBJECT_FAILURES")
                && l.contains(r#""level":"error""#)),
        "{}",
        h.worker.log_tail(40)
    );
}

/// A call its Durable Object cannot take: the object keeps the call's row before it takes
/// the call, and here cannot, its first D1 write and its first write to its own storage
/// failing (`FAULT_INJECT_D1_FAILURES`, `FAULT_INJECT_STORAGE_FAILURES`: whichever of the
/// two it tries first fails), so `/register` answers 500 (`call.register_failed`). The caller
/// hears the fallback (the apology, then the fallback number) rather than Twilio's
/// "application error"; the call's row, handed to the object once the answer has gone, says
/// why the agent never took it; and a Media Stream for the call is refused, the object never
/// having registered it. Some 15 s, most of them the Worker's start.
#[tokio::test(flavor = "multi_thread")]
async fn a_call_its_object_cannot_register_gets_the_fallback_and_is_recorded_with_why() {
    const APOLOGY: &str = "ただいま担当者におつなぎします。";
    const FALLBACK_NUMBER: &str = "+81300002222";
    let h = own_worker(
        "e2e-persistence-not-registered",
        "the Worker whose call objects cannot keep a registration",
        &[
            ("FAULT_INJECT_D1_FAILURES", "1"),
            ("FAULT_INJECT_STORAGE_FAILURES", "1"),
            ("FALLBACK_MESSAGE", APOLOGY),
            ("FALLBACK_DIAL_NUMBER", FALLBACK_NUMBER),
        ],
    )
    .await;
    let h = &h;
    let admin = admin(h);
    let ids = CallIds::new();
    let (from, to) = ("+15551230306", "+81312345678");
    let reply = h.post_voice(&ids, from, to).await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (
            200,
            format!(
                "<Response><Say language=\"ja-JP\" voice=\"Polly.Mizuki\">{APOLOGY}</Say>\
                 <Dial action=\"{}/api/twilio/transfer-result\" method=\"POST\">\
                 {FALLBACK_NUMBER}</Dial></Response>",
                h.worker.base_url()
            )
            .as_str()
        ),
        "the answer is the fallback, with no <Connect><Stream>\n{}",
        h.worker.log_tail(40)
    );

    // The row says the agent did not serve the call, and why.
    let detail = fallback_row(h, &admin, &ids).await;
    assert_eq!(
        project(
            &detail["call"],
            &[
                "status",
                "end_reason",
                "end_detail",
                "from_number",
                "to_number",
                "agent_id",
                "stream_sid",
                "ended_at"
            ]
        ),
        json!({"status": "failed", "end_reason": "not_registered", "end_detail": "HTTP 500",
               "from_number": from, "to_number": to, "agent_id": "default",
               "stream_sid": null, "ended_at": null}),
        "{}",
        pretty(&detail)
    );

    // The log says what happened, with the CallSid: the object's storage refused the
    // registration's row, and the Worker could not register the call.
    let sid = ids.call_sid.as_str();
    let (_, line) = log_line(h, sid, "outbox.store_failed").await;
    assert!(line.contains("FAULT_INJECT_STORAGE_FAILURES"), "{line}");
    let (_, line) = log_line(h, sid, "call.register_failed").await;
    assert!(
        line.contains(r#""level":"error""#) && line.contains("HTTP 500"),
        "{line}"
    );

    // Twilio never gets a Stream URL for this call; one tried all the same is refused, as
    // for any call the object has no voice webhook for.
    let stream_url = h.expected_stream_url(sid);
    let sig = tw::sign(support::TWILIO_AUTH_TOKEN, &stream_url, &[]);
    match MediaStream::connect(&stream_url, Some(&sig)).await {
        Err(tw::ConnectError::Refused { status, body }) => {
            assert_eq!(status, 404, "{body}");
        }
        Err(e) => panic!("expected 404, got {e:?}"),
        Ok(_) => panic!("a stream for a call its object never registered was accepted"),
    }
    let (_, line) = log_line(h, sid, "stream.refused").await;
    assert!(line.contains("no signed voice webhook"), "{line}");
}

/// The first line of the Worker's log with `event` for the call, and its place in the log.
async fn log_line(h: &Harness, call_sid: &str, event: &str) -> (usize, String) {
    let needle = format!("\"{event}\"");
    h.worker
        .wait_for_line(&format!("{event} for {call_sid}"), |l| {
            l.contains(&needle) && l.contains(call_sid)
        })
        .await
}

/// Twilio stops waiting for a webhook's answer after 15 s, and keeping a status callback may
/// take longer: here its call's object waits on a D1 write under way (each held 12 s by
/// `FAULT_INJECT_D1_STALL_MS`) until it gives up after 8 s, then the direct write to D1 fails
/// three times (`FAULT_INJECT_D1_FAILURES`) and lands on the fourth, after 7 s of pauses: some
/// 15 s in all. The callback is answered 202 before that, within Twilio's 15 s, and the status
/// lands all the same.
///
/// The 202 itself is the proof that the answer did not wait for the record (a 204 or 500 is
/// what comes once it is decided); the one timing asserted is Twilio's own limit, which an
/// answer due after 12 s keeps with a margin of 3 s. Slow: the object's own first three D1
/// writes fail too, each after its 12 s hold, before the test can start.
#[tokio::test(flavor = "multi_thread")]
async fn a_status_callback_still_being_kept_is_answered_within_twilios_timeout() {
    let h = own_worker(
        "e2e-persistence-slow-status",
        "the Worker with held and failing D1 writes",
        &[
            ("FAULT_INJECT_D1_STALL_MS", "12000"),
            ("FAULT_INJECT_D1_FAILURES", "3"),
            ("IDLE_TIMEOUT_SECONDS", "600"),
            // Its outbox logs each D1 write as it starts.
            ("LOG_LEVEL", "debug"),
        ],
    )
    .await;
    let h = &h;
    let admin = admin(h);
    let (from, to) = ("+15551230305", "+81312345678");
    let call = h
        .start_call(CallSpec {
            from: from.into(),
            to: to.into(),
            ..CallSpec::default()
        })
        .await;
    let (oa, twilio, ids) = (&call.openai, &call.twilio, &call.ids);
    let key = |digit: &str| {
        twilio.send_raw(json!({
            "event": "dtmf",
            "streamSid": ids.stream_sid,
            "dtmf": {"track": "inbound_track", "digit": digit},
        }));
    };
    let pressed = |d: &Value, digit: &str| {
        events(d)
            .iter()
            .any(|e| e["type"] == "dtmf" && e["detail"]["digit"] == digit)
    };
    // Once a first keypress is in D1 (after the object's failed writes, about a minute), the
    // object's storage is drained: the next record goes straight to D1, a write held 12 s.
    key("1");
    ok(
        h,
        admin
            .wait_call(
                &ids.call_sid,
                "the first keypress",
                Duration::from_secs(150),
                |d| pressed(d, "1"),
            )
            .await,
    );
    let writes = h.direct_d1_writes();
    key("2");
    // The Worker has handled the keypress before this frame comes out at OpenAI; its object
    // starts that write once it has gathered what comes with it (GATHER_MS), and the status
    // comes after that.
    sync_twilio(h, twilio, oa, 0x66).await;
    h.direct_d1_write_started("the keypress's write to D1", writes)
        .await;

    let sent = Instant::now();
    let r = h
        .post_status(&tw::status_params(ids, from, to, "completed", 2, Some(33)))
        .await;
    let took = sent.elapsed();
    assert_eq!(
        r.status,
        202,
        "answered after {took:?}: {}\n{}",
        r.body,
        h.worker.log_tail(40)
    );
    assert!(
        took < Duration::from_secs(15),
        "answered after {took:?}, past Twilio's 15 s"
    );

    // Kept all the same: written to D1 directly, on the fourth try.
    let detail = ok(
        h,
        admin
            .wait_call(&ids.call_sid, "Twilio's duration", D1_DEADLINE, |d| {
                d["call"]["twilio_duration_s"] == 33
            })
            .await,
    );
    assert_eq!(detail["call"]["status"], "completed", "{}", pretty(&detail));
    // The log tells the story in order: not kept by the object, answered, then written.
    let sid = ids.call_sid.as_str();
    let (not_kept, _) = log_line(h, sid, "call.status_not_kept").await;
    let (answered, _) = log_line(h, sid, "call.status_answered_before_kept").await;
    let (written, line) = log_line(h, sid, "call.record_written").await;
    assert!(
        not_kept < answered && answered < written,
        "{}",
        h.worker.log_tail(40)
    );
    assert!(line.contains("\"tries\":4"), "{line}");
    twilio.send_stop(ids);
}

#[tokio::test(flavor = "multi_thread")]
async fn status_callbacks_are_verified_idempotent_and_never_move_a_call_backwards() {
    let h = harness().await;
    let admin = admin(h);
    let (from, to) = ("+15551230201", "+81312345678");
    let url = h.status_url();

    // Refused callbacks record nothing.
    let lone = CallIds::new();
    let forged = tw::status_params(&lone, from, to, "completed", 3, Some(999));
    let r = tw::post_form(&url, &forged, None).await.unwrap();
    assert_eq!(r.status, 403, "unsigned: {}", r.body);
    let sig = tw::sign("not-the-auth-token", &url, &forged);
    let r = tw::post_form(&url, &forged, Some(&sig)).await.unwrap();
    assert_eq!(r.status, 403, "signed with another token: {}", r.body);
    let honest = tw::status_params(&lone, from, to, "completed", 3, Some(12));
    let sig = tw::sign(support::TWILIO_AUTH_TOKEN, &url, &honest);
    let tampered: Vec<(String, String)> = honest
        .iter()
        .map(|(k, v)| match k.as_str() {
            "CallDuration" => (k.clone(), "999".to_owned()),
            _ => (k.clone(), v.clone()),
        })
        .collect();
    let r = tw::post_form(&url, &tampered, Some(&sig)).await.unwrap();
    assert_eq!(r.status, 403, "a param changed after signing: {}", r.body);
    let sig = tw::sign(support::TWILIO_AUTH_TOKEN, &format!("{url}/"), &honest);
    let r = tw::post_form(&url, &honest, Some(&sig)).await.unwrap();
    assert_eq!(r.status, 403, "signed for another URL: {}", r.body);
    for status in ["answered", ""] {
        let r = h
            .post_status(&tw::status_params(&lone, from, to, status, 3, Some(999)))
            .await;
        assert_eq!(r.status, 400, "CallStatus {status:?}: {}", r.body);
    }
    let mut bad_duration = tw::status_params(&lone, from, to, "completed", 3, None);
    bad_duration.push(("CallDuration".into(), "soon".into()));
    let r = h.post_status(&bad_duration).await;
    assert_eq!(r.status, 400, "CallDuration \"soon\": {}", r.body);
    assert_eq!(
        admin.call(&lone.call_sid).await.unwrap(),
        None,
        "a refused callback created a row"
    );
    // A status callback for a call whose webhook never came still creates its row, with the
    // parties the callback names. (Written after anything a refused callback might have
    // queued: had one been, the row would say completed/999, or D1 would have refused the
    // status and held everything behind it.)
    let r = h
        .post_status(&tw::status_params(&lone, from, to, "in-progress", 1, None))
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(r.body, "");
    let detail = ok(
        h,
        admin
            .wait_call(
                &lone.call_sid,
                "the row from the callback",
                D1_DEADLINE,
                |d| d["call"]["status"].is_string(),
            )
            .await,
    );
    assert_eq!(
        project(
            &detail["call"],
            &["status", "twilio_duration_s", "from_number", "agent_id"]
        ),
        json!({"status": "in-progress", "twilio_duration_s": null, "from_number": from, "agent_id": null}),
        "{}",
        pretty(&detail)
    );
    assert!(detail["call"]["started_at"].is_string());

    // A call from the webhook on: ringing → in-progress → its end with its CallDuration. (Its
    // stream never connects, so it ends as a failure: see
    // a_call_whose_stream_never_connected_is_recorded_with_why.)
    let a = CallIds::new();
    h.answer_call(&a, from, to).await;
    let ringing = |d: &Value| d["call"]["status"] == "ringing";
    let detail = ok(
        h,
        admin
            .wait_call(&a.call_sid, "ringing", D1_DEADLINE, ringing)
            .await,
    );
    assert_eq!(detail["call"]["agent_id"], "default");
    let r = h
        .post_status(&tw::status_params(&a, from, to, "in-progress", 1, None))
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    ok(
        h,
        admin
            .wait_call(&a.call_sid, "in-progress", D1_DEADLINE, |d| {
                d["call"]["status"] == "in-progress"
            })
            .await,
    );
    let completed = tw::status_params(&a, from, to, "completed", 2, Some(42));
    let r = h.post_status(&completed).await;
    assert_eq!(r.status, 204, "{}", r.body);
    let detail = ok(
        h,
        admin
            .wait_call(&a.call_sid, "ended, 42 s", D1_DEADLINE, |d| {
                d["call"]["status"] == "failed" && d["call"]["twilio_duration_s"] == 42
            })
            .await,
    );
    assert!(
        detail["call"]["ended_at"].is_string(),
        "{}",
        pretty(&detail)
    );

    // Callbacks that overtake the webhook, Twilio's retry of the final one, and late ones.
    let b = CallIds::new();
    let r = h
        .post_status(&tw::status_params(&b, from, to, "in-progress", 1, None))
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let completed = tw::status_params(&b, from, to, "completed", 2, Some(42));
    let r = h.post_status(&completed).await;
    assert_eq!(r.status, 204, "{}", r.body);
    let before = ok(
        h,
        admin
            .wait_call(&b.call_sid, "completed, 42 s", D1_DEADLINE, |d| {
                d["call"]["status"] == "completed" && d["call"]["twilio_duration_s"] == 42
            })
            .await,
    );
    let ended_at = before["call"]["ended_at"].clone();
    assert!(ended_at.is_string(), "{}", pretty(&before));
    for (what, params) in [
        ("the same completed again", completed.clone()),
        (
            "a late in-progress",
            tw::status_params(&b, from, to, "in-progress", 1, None),
        ),
        (
            "a late ringing",
            tw::status_params(&b, from, to, "ringing", 0, None),
        ),
    ] {
        let r = h.post_status(&params).await;
        assert_eq!(r.status, 204, "{what}: {}", r.body);
    }
    // The webhook, last: the call's writes are applied in order, so once its row data shows,
    // every callback above has been applied too.
    h.answer_call(&b, from, to).await;
    let detail = ok(
        h,
        admin
            .wait_call(&b.call_sid, "the webhook's data", D1_DEADLINE, |d| {
                d["call"]["from_number"] == from
            })
            .await,
    );
    assert_eq!(
        project(
            &detail["call"],
            &[
                "status",
                "twilio_duration_s",
                "ended_at",
                "to_number",
                "agent_id",
                "direction"
            ]
        ),
        json!({"status": "completed", "twilio_duration_s": 42, "ended_at": ended_at,
               "to_number": to, "agent_id": "default", "direction": "inbound"}),
        "{}",
        pretty(&detail)
    );
}

// ---- 3. nothing is lost when D1 fails ------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn failing_d1_writes_are_retried_and_every_row_lands_once() {
    // A Worker of its own: the first 3 D1 batch writes of each call object fail.
    let h = own_worker(
        "e2e-persistence-d1-faults",
        "the faulty Worker",
        &[("FAULT_INJECT_D1_FAILURES", "3")],
    )
    .await;
    let h = &h;
    let admin = admin(h);
    let (from, to) = ("+15551230301", "+81312345678");
    let greet_item = "item_greet";
    let (c1, c2, reply_item) = ("item_c1", "item_c2", "item_reply");
    const GREETING: &str = "お電話ありがとうございます。";
    const CALLER_SAID: &str = "営業時間を教えてください。";
    const REPLY: &str = "はい、午前十時から午後八時まででございます。";

    let mut greeting = oai::full_response(
        "resp_greet",
        greet_item,
        &tagged_chunks(0x61, 1, 800),
        GREETING,
    );
    greeting = oai::with_usage(greeting, 100, 20);
    let script = SessionScript::new().once("response.create", greeting);

    let ids = CallIds::new();
    let webhook_sent = Instant::now();
    let twiml = h.answer_call(&ids, from, to).await;
    // The ringing row's write failed at once, and the retries come after 0.5 s, 1 s and 2 s
    // of backoff: within 1.5 s of the webhook D1 cannot have it yet.
    let early = admin.call(&ids.call_sid).await.unwrap();
    if webhook_sent.elapsed() < Duration::from_millis(1500) {
        assert_eq!(
            early, None,
            "the row was in D1 despite the injected failures"
        );
    }

    let claim = h.openai.claim(script).await;
    let twilio = h.open_stream(&twiml).await;
    twilio.send_connected();
    let t0 = Instant::now();
    twilio.send_start(&ids, &twiml.parameters);
    let oa = ok(h, claim.session(SOON).await);
    drop(claim);
    let oa = &oa;
    let created = ok(
        h,
        oa.wait_until("session.created sent", SOON, |v| {
            v.sent.first().map(|(_, e)| e.clone())
        })
        .await,
    );
    let session_id = created["session"]["id"].as_str().unwrap().to_owned();

    greeting_played(h, &twilio).await;
    sync_twilio(h, &twilio, oa, 0x62).await;

    // First utterance: transcription fails (an event). Second: transcribed. Then the reply.
    let c1_ms = t0.elapsed().as_millis() as u64;
    oa.send(oai::speech_started(c1_ms, c1));
    caller_talks(h, &twilio, oa, 0x63, 10).await;
    oa.send_all(oai::caller_turn_end(c1, Some(greet_item), c1_ms + 200));
    oa.send(oai::caller_transcription_failed(
        c1,
        "audio_unintelligible",
        "The audio could not be transcribed.",
    ));
    let c2_ms = t0.elapsed().as_millis() as u64;
    oa.send(oai::speech_started(c2_ms, c2));
    caller_talks(h, &twilio, oa, 0x64, 10).await;
    oa.send_all(oai::caller_turn_end(c2, Some(c1), c2_ms + 200));
    oa.send(oai::caller_transcription_completed(c2, CALLER_SAID));
    let reply_audio = tagged_chunks(0x65, 2, 800);
    oa.send_all(oai::with_usage(
        oai::full_response("resp_reply", reply_item, &reply_audio, REPLY),
        200,
        30,
    ));
    // The reply's audio reaching Twilio proves every OpenAI event before it was handled.
    ok(
        h,
        twilio
            .wait_until("the reply to play", SOON, |l| {
                (l.played_echoes() >= 2).then_some(())
            })
            .await,
    );
    twilio.send_stop(&ids);
    ok(h, oa.wait_closed(SOON).await);
    // Twilio's final status callback goes through the same (failing) write path.
    let r = h
        .post_status(&tw::status_params(&ids, from, to, "completed", 2, Some(4)))
        .await;
    assert_eq!(r.status, 204, "{}", r.body);

    let detail = ok(
        h,
        admin
            .wait_call(
                &ids.call_sid,
                "every row: the end, 3 turns, the event, Twilio's duration",
                D1_DEADLINE,
                |d| {
                    d["call"]["end_reason"].is_string()
                        && d["call"]["twilio_duration_s"] == 4
                        && entries(d).len() >= 3
                        && !events(d).is_empty()
                },
            )
            .await,
    );
    eprintln!("call detail:\n{}", pretty(&detail));

    let log = h.worker.log();
    // The background writer logs each failed batch; on a stalled machine the object's alarm
    // may run one of the retries instead (logged as outbox.alarm_flush_failed).
    let failures: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("outbox.d1_write_failed") || l.contains("outbox.alarm_flush_failed"))
        .collect();
    assert!(
        failures
            .iter()
            .any(|l| l.contains("outbox.d1_write_failed")),
        "no outbox.d1_write_failed in the Worker log ({})",
        h.worker.log_path.display()
    );
    assert_eq!(
        failures.len(),
        3,
        "expected exactly the 3 injected failures:\n{}",
        failures.join("\n")
    );
    assert!(
        failures.iter().all(|l| l.contains("injected D1 failure")),
        "{failures:?}"
    );
    // Each names the call whose records failed to go.
    assert!(
        failures.iter().all(|l| l.contains(&ids.call_sid)),
        "{failures:?}"
    );
    assert!(
        !log.contains(ADMIN_TOKEN),
        "the admin token reached the log"
    );

    let c = &detail["call"];
    let keys = [
        "call_sid",
        "account_sid",
        "from_number",
        "to_number",
        "direction",
        "agent_id",
        "status",
        "stream_sid",
        "openai_session_id",
        "end_reason",
        "input_tokens",
        "output_tokens",
        "total_tokens",
        "barge_ins",
        "twilio_duration_s",
    ];
    assert_eq!(
        project(c, &keys),
        project(
            &json!({
                "call_sid": ids.call_sid, "account_sid": ids.account_sid, "from_number": from,
                "to_number": to, "direction": "inbound", "agent_id": "default",
                "status": "completed", "stream_sid": ids.stream_sid,
                "openai_session_id": session_id, "end_reason": "twilio_stop",
                "input_tokens": 300, "output_tokens": 50, "total_tokens": 350,
                "barge_ins": 0, "twilio_duration_s": 4,
            }),
            &keys
        ),
        "calls row: {}",
        pretty(c)
    );
    check_call_times(c);

    // Every turn exactly once, in order; the failed utterance keeps its place, saying so.
    let t = entries(&detail);
    let seqs: Vec<i64> = t.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "seq not increasing: {seqs:?}"
    );
    let keys = ["role", "text", "item_id", "interrupted"];
    let got: Vec<Value> = t.iter().map(|e| project(e, &keys)).collect();
    assert_eq!(
        got,
        vec![
            json!({"role": "agent", "text": GREETING, "item_id": greet_item, "interrupted": false}),
            json!({"role": "caller", "text": "（文字起こしできませんでした）", "item_id": c1, "interrupted": false}),
            json!({"role": "caller", "text": CALLER_SAID, "item_id": c2, "interrupted": false}),
            json!({"role": "agent", "text": REPLY, "item_id": reply_item, "interrupted": false}),
        ],
        "transcript: {}",
        pretty(&detail["transcript"])
    );
    assert_eq!(t[0]["offset_ms"], c["first_audio_ms"]);
    assert_eq!(t[2]["offset_ms"], c2_ms);

    // The event exactly once.
    let ev = events(&detail);
    assert_eq!(ev.len(), 1, "events: {}", pretty(&detail["events"]));
    assert_eq!(ev[0]["type"], "transcription_failed");
    assert_eq!(ev[0]["detail"]["item_id"], c1, "{}", ev[0]);
    assert_eq!(ev[0]["detail"]["code"], "audio_unintelligible", "{}", ev[0]);
}

/// A D1 write that never answers (`FAULT_INJECT_D1_HANGS`: the call object's first two) is
/// given up after the outbox's limit (10 s) and its records are tried again: nothing queued
/// behind it waits for good. (Without the limit, the first one, the registration's copy from
/// the object's storage, held the outbox for as long as the object lived: no row of the call
/// ever reached D1.) Every row lands, once.
#[tokio::test(flavor = "multi_thread")]
async fn a_d1_write_that_never_answers_is_given_up_and_every_row_still_lands_once() {
    let h = own_worker(
        "e2e-persistence-d1-hangs",
        "the Worker whose first D1 writes hang",
        &[("FAULT_INJECT_D1_HANGS", "2"), ("LOG_LEVEL", "debug")],
    )
    .await;
    let h = &h;
    let admin = admin(h);
    const GREETING: &str = "お電話ありがとうございます。";
    const CALLER_SAID: &str = "予約を変更したいのですが。";
    let (greet_item, caller_item) = ("item_greet", "item_c1");
    let call = h
        .start_call(CallSpec {
            from: "+15551230306".into(),
            script: SessionScript::new().once(
                "response.create",
                oai::full_response(
                    "resp_greet",
                    greet_item,
                    &tagged_chunks(0x71, 1, 800),
                    GREETING,
                ),
            ),
            ..CallSpec::default()
        })
        .await;
    let (oa, twilio, ids) = (&call.openai, &call.twilio, &call.ids);
    greeting_played(h, twilio).await;
    sync_twilio(h, twilio, oa, 0x74).await;
    let said_at = call.start_sent_at.elapsed().as_millis() as u64;
    oa.send(oai::speech_started(said_at, caller_item));
    caller_talks(h, twilio, oa, 0x72, 10).await;
    oa.send_all(oai::caller_turn_end(
        caller_item,
        Some(greet_item),
        said_at + 200,
    ));
    oa.send(oai::caller_transcription_completed(
        caller_item,
        CALLER_SAID,
    ));
    // The transcript's record handed over before the caller hangs up.
    sync_twilio(h, twilio, oa, 0x73).await;
    twilio.send_stop(ids);
    ok(h, oa.wait_closed(SOON).await);
    let detail = completed(h, &admin, ids, (&call.from, &call.to), 5).await;
    let detail = if entries(&detail).len() >= 2 && detail["call"]["end_reason"].is_string() {
        detail
    } else {
        ok(
            h,
            admin
                .wait_call(&ids.call_sid, "the end and both turns", D1_DEADLINE, |d| {
                    d["call"]["end_reason"].is_string() && entries(d).len() >= 2
                })
                .await,
        )
    };

    let given_up: Vec<String> = h
        .worker
        .log()
        .lines()
        .filter(|l| l.contains("no answer from D1 within 10s (FAULT_INJECT_D1_HANGS)"))
        .map(str::to_owned)
        .collect();
    assert_eq!(
        given_up.len(),
        2,
        "expected the 2 hung writes given up, each once:\n{}\n{}",
        given_up.join("\n"),
        h.worker.log_tail(40)
    );
    let keys = [
        "from_number",
        "to_number",
        "status",
        "stream_sid",
        "end_reason",
        "twilio_duration_s",
    ];
    assert_eq!(
        project(&detail["call"], &keys),
        json!({"from_number": call.from, "to_number": call.to, "status": "completed",
               "stream_sid": ids.stream_sid, "end_reason": "twilio_stop", "twilio_duration_s": 5}),
        "{}",
        pretty(&detail)
    );
    check_call_times(&detail["call"]);
    let got: Vec<Value> = entries(&detail)
        .iter()
        .map(|e| project(e, &["role", "text", "item_id"]))
        .collect();
    assert_eq!(
        got,
        vec![
            json!({"role": "agent", "text": GREETING, "item_id": greet_item}),
            json!({"role": "caller", "text": CALLER_SAID, "item_id": caller_item}),
        ],
        "transcript: {}",
        pretty(&detail["transcript"])
    );
}

// ---- 4. the agent assigned to the number answers -------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_assigned_to_the_called_number_answers_and_other_numbers_get_the_default() {
    let h = harness().await;
    let admin = admin(h);
    let instructions = "You are the booking line of Restaurant Sakura (e2e agent choice). \
                        Answer in short English sentences.";
    let greeting = "Say: Thank you for calling Restaurant Sakura. How can I help?";
    let r = admin
        .post(
            "/api/admin/agents",
            &json!({
                "name": "Sakura bookings", "instructions": instructions, "greeting": greeting,
                "voice": "cedar", "language": "en",
                "turn_detection": {"type": "server_vad", "threshold": 0.7, "silence_duration_ms": 800},
            }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "create agent: {}", r.text);
    let agent_id = r.body["agent"]["id"].as_str().unwrap().to_owned();
    let number = "+81355559001";
    let r = admin
        .put(
            "/api/admin/numbers/%2B81355559001",
            &json!({"agent_id": agent_id}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "assign number: {}", r.text);
    let r = admin.get("/api/admin/agents/default").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text);
    let default = r.body["agent"].clone();

    for (to, agent) in [
        (number, r#"the assigned agent"#),
        ("+81355559002", "the default agent"),
    ] {
        let call = h
            .start_call(CallSpec {
                from: "+15551230401".into(),
                to: to.into(),
                ..CallSpec::default()
            })
            .await;
        let update = ok(h, call.openai.wait_event("session.update", SOON).await);
        let create = ok(h, call.openai.wait_event("response.create", SOON).await);
        call.twilio.send_stop(&call.ids);
        ok(h, call.openai.wait_closed(SOON).await);

        let s = &update.event["session"];
        let got = json!({
            "instructions": s["instructions"],
            "voice": s["audio"]["output"]["voice"],
            "language": s["audio"]["input"]["transcription"]["language"],
            "threshold": s["audio"]["input"]["turn_detection"]["threshold"],
            "silence_duration_ms": s["audio"]["input"]["turn_detection"]["silence_duration_ms"],
            "greeting": create.event["response"]["instructions"],
        });
        let (expected_id, expected) = if to == number {
            (
                agent_id.as_str(),
                // The greeting follows the agent's own instructions (a response's replace the
                // session's).
                json!({"instructions": instructions, "voice": "cedar", "language": "en",
                       "threshold": 0.7, "silence_duration_ms": 800,
                       "greeting": format!("{instructions}\n\n{greeting}")}),
            )
        } else {
            (
                "default",
                json!({"instructions": default["instructions"], "voice": default["voice"],
                       "language": default["language"],
                       "threshold": default["turn_detection"]["threshold"],
                       "silence_duration_ms": default["turn_detection"]["silence_duration_ms"],
                       "greeting": format!("{}\n\n{}",
                           default["instructions"].as_str().unwrap(),
                           default["greeting"].as_str().unwrap())}),
            )
        };
        assert_eq!(
            got, expected,
            "a call to {to} must be configured from {agent}; session.update: {}",
            update.event
        );
        let detail = ok(
            h,
            admin
                .wait_call(&call.ids.call_sid, "the call's end", D1_DEADLINE, |d| {
                    d["call"]["end_reason"].is_string()
                })
                .await,
        );
        assert_eq!(
            project(&detail["call"], &["agent_id", "to_number", "status"]),
            json!({"agent_id": expected_id, "to_number": to, "status": "completed"}),
            "{}",
            pretty(&detail)
        );
    }
    assert_eq!(default["voice"], "marin", "the seeded default agent");
}

/// D1 that answers the agent lookup too slowly (here: 20 s, longer than Twilio waits for the
/// voice webhook) must not cost the call: the webhook answers with the Stream well inside
/// Twilio's 15 s, the agent from configuration takes the call, and its row says so.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_agent_lookup_gives_the_call_to_the_configured_agent_in_time() {
    const INSTRUCTIONS: &str = "You are the configured agent of the slow D1 test. Be brief.";
    let h = own_worker(
        "e2e-persistence-slow-lookup",
        "the slow-lookup Worker",
        &[
            ("FAULT_INJECT_D1_LOOKUP_DELAY_MS", "20000"),
            ("AGENT_INSTRUCTIONS", INSTRUCTIONS),
            ("AGENT_VOICE", "cedar"),
        ],
    )
    .await;
    let h = &h;
    let admin = admin(h);
    let (from, to) = ("+15551230501", "+81312345678");
    let ids = CallIds::new();
    let sent = Instant::now();
    let twiml = h.answer_call(&ids, from, to).await;
    let took = sent.elapsed();
    assert_eq!(twiml.stream_url, h.expected_stream_url(&ids.call_sid));
    assert!(
        took < Duration::from_secs(10),
        "the voice webhook took {took:?}: Twilio gives up after 15 s\n{}",
        h.worker.log_tail(20)
    );
    // It did wait for D1 (the hook works), up to the bound.
    assert!(took >= Duration::from_millis(2_900), "took {took:?}");

    let claim = h.openai.claim(SessionScript::new()).await;
    let twilio = h.open_stream(&twiml).await;
    twilio.send_connected();
    twilio.send_start(&ids, &twiml.parameters);
    let oa = ok(h, claim.session(SOON).await);
    let update = ok(h, oa.wait_event("session.update", SOON).await);
    let s = &update.event["session"];
    assert_eq!(
        (
            s["instructions"].as_str(),
            s["audio"]["output"]["voice"].as_str()
        ),
        (Some(INSTRUCTIONS), Some("cedar")),
        "the agent from configuration answers: {}",
        update.event
    );
    twilio.send_stop(&ids);
    ok(h, oa.wait_closed(SOON).await);

    // The row names the agent that answered.
    let detail = ok(
        h,
        admin
            .wait_call(&ids.call_sid, "the call's end", D1_DEADLINE, |d| {
                d["call"]["end_reason"].is_string()
            })
            .await,
    );
    assert_eq!(
        project(&detail["call"], &["agent_id", "to_number", "status"]),
        json!({"agent_id": "env", "to_number": to, "status": "completed"}),
        "{}",
        pretty(&detail)
    );
    assert!(
        h.worker
            .log()
            .lines()
            .any(|l| l.contains("agent.lookup_timeout")
                && l.contains(&to[1..])
                && l.contains(&ids.call_sid)),
        "{}",
        h.worker.log_tail(30)
    );
}

/// A caller who hangs up mid-sentence, before the server heard them stop: the Worker commits
/// their words so far, waits for their transcription, and keeps it; the call ends as of
/// Twilio's stop.
#[tokio::test(flavor = "multi_thread")]
async fn a_caller_who_hangs_up_mid_sentence_keeps_their_words_in_the_record() {
    let h = harness().await;
    let admin = admin(h);
    let call = h
        .start_call(CallSpec {
            from: "+15551230311".into(),
            to: "+81312345678".into(),
            script: SessionScript::new().once(
                "response.create",
                oai::full_response(
                    "resp_greet",
                    "item_greet",
                    &tagged_chunks(0x81, 1, 800),
                    "お電話ありがとうございます。",
                ),
            ),
            caller_audio: None,
        })
        .await;
    let (oa, twilio, ids) = (&call.openai, &call.twilio, &call.ids);
    greeting_played(h, twilio).await;
    oa.send(oai::speech_started(1_000, "item_u"));
    // Half a second of their words reaches the server, then they hang up.
    caller_talks(h, twilio, oa, 0x82, 25).await;
    twilio.send_stop(ids);
    let commit = ok(h, oa.wait_event("input_audio_buffer.commit", SOON).await);
    assert_eq!(
        commit.event["event_id"], "evt_bridge_final_commit",
        "{}",
        commit.event
    );
    ok(h, oa.wait_closed(SOON).await);
    let detail = ok(
        h,
        admin
            .wait_call(
                &ids.call_sid,
                "the call's end and the caller's last words",
                D1_DEADLINE,
                |d| {
                    d["call"]["end_reason"].is_string()
                        && entries(d)
                            .iter()
                            .any(|e| e["role"] == "caller" && e["text"] == oai::COMMITTED_WORDS)
                },
            )
            .await,
    );
    assert_eq!(
        detail["call"]["end_reason"],
        "twilio_stop",
        "{}",
        pretty(&detail)
    );
    assert!(
        !h.worker
            .log()
            .lines()
            .any(|l| l.contains("call.caller_transcript_missing") && l.contains(&ids.call_sid)),
        "the transcription came"
    );
}
