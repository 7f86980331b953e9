//! End-to-end tests of call recordings (issue 6): the real Worker in `wrangler dev` with local
//! D1 and local R2, between the fake Twilio (which plays the agent's audio back like Twilio's
//! buffer) and the fake OpenAI. A call with a barge-in is recorded to R2 and read back through
//! the admin API (`GET /api/admin/calls/{sid}/recording`): the WAV header, its length against
//! the call's, the caller on the left channel, the agent on the right up to the cut and silence
//! after it, and byte ranges. Then: an agent with recording off leaves none, a call whose
//! Twilio socket is lost still leaves a playable file, a long call is uploaded in parts,
//! caller audio the network held up keeps its place, and caller frames delivered twice are
//! recorded once.
//!
//! One Worker (with `ADMIN_TOKEN`) is shared by the tests of this binary; each test uses its own
//! CallSids and numbers.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::admin::Admin;
use support::fake_openai::{self as oai, SessionScript};
use support::fake_twilio::{self as tw};
use support::wav::{channels, data_offset, decoded, find, format_tag, parse_header, MULAW};
use support::{ok, tagged_chunks, CallSpec, Harness, SOON};

const ADMIN_TOKEN: &str = "admin-e2e-recording-SECRET-654";
/// D1 writes (and the recording's upload before its row) are asynchronous: be generous.
const D1_DEADLINE: Duration = Duration::from_secs(90);

async fn harness() -> &'static Harness {
    static HARNESS: tokio::sync::OnceCell<Result<Harness, String>> =
        tokio::sync::OnceCell::const_new();
    support::shared_harness(&HARNESS, "e2e-recording", || {
        vec![("ADMIN_TOKEN".into(), ADMIN_TOKEN.into())]
    })
    .await
}

fn admin(h: &Harness) -> Admin {
    Admin::new(&h.base_url(), ADMIN_TOKEN)
}

/// An HTTP answer with its headers.
struct Got {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Got {
    /// The body as JSON (errors and the recording link are JSON).
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

async fn get_recording(h: &Harness, sid: &str, range: Option<&str>, token: Option<&str>) -> Got {
    get(
        h,
        &format!("/api/admin/calls/{sid}/recording"),
        range,
        token,
    )
    .await
}

/// A call the Worker has never seen.
const UNKNOWN_CALL: &str = "CA00000000000000000000000000000404";

/// `GET /api/admin/calls/{sid}/recording-link` with the admin token.
async fn get_recording_link(h: &Harness, sid: &str) -> Got {
    get(
        h,
        &format!("/api/admin/calls/{sid}/recording-link"),
        None,
        Some(ADMIN_TOKEN),
    )
    .await
}

/// `GET path` (with its query) on the Worker, with an optional `Range` and bearer token.
async fn get(h: &Harness, path: &str, range: Option<&str>, token: Option<&str>) -> Got {
    let url = format!("{}{path}", h.base_url());
    let mut req = reqwest::Client::new().get(&url);
    if let Some(t) = token {
        req = req.header("Authorization", format!("Bearer {t}"));
    }
    if let Some(r) = range {
        req = req.header("Range", r);
    }
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    Got {
        status: resp.status().as_u16(),
        headers: resp.headers().clone(),
        body: resp.bytes().await.expect("body").to_vec(),
    }
}

/// Waits for the call's row to name its recording; returns the call row.
/// Waits until the Worker has relayed `last` (a caller frame's payload) to OpenAI.
async fn wait_relayed(h: &Harness, openai: &oai::Session, last: &str) {
    ok(
        h,
        openai
            .wait_until("the last caller frame to be relayed", SOON, |v| {
                v.received
                    .iter()
                    .any(|e| {
                        e.event_type() == "input_audio_buffer.append" && e.event["audio"] == last
                    })
                    .then_some(())
            })
            .await,
    );
}

/// Once the call has ended: its recording spans the call, no more, and has the caller's
/// `frames` each exactly 20 ms after the one before.
async fn recorded_in_step(h: &Harness, sid: &str, frames: &[Vec<u8>]) {
    let c = wait_recording(h, sid).await;
    let duration = c["duration_ms"].as_i64().expect("duration_ms");
    let rec_ms = c["recording_duration_ms"].as_i64().expect("recording ms");
    assert!(
        (duration..=duration + 200).contains(&rec_ms),
        "the recording ({rec_ms} ms) spans the call ({duration} ms), no more"
    );
    let full = get_recording(h, sid, None, Some(ADMIN_TOKEN)).await;
    assert_eq!(full.status, 200);
    let (left, _) = channels(&full.body);
    let first = find(&left, &decoded(&frames[0]), 0).expect("the first caller frame");
    for (i, frame) in frames.iter().enumerate().skip(1) {
        let want = first + i * frame.len();
        assert_eq!(
            find(&left, &decoded(frame), want.saturating_sub(8 * 2_000)),
            Some(want),
            "caller frame {i} is not 20 ms after the one before"
        );
    }
}

async fn wait_recording(h: &Harness, sid: &str) -> Value {
    let detail = ok(
        h,
        admin(h)
            .wait_call(sid, "the recording on the call's row", D1_DEADLINE, |d| {
                d["call"]["recording_key"].is_string() && d["call"]["ended_at"].is_string()
            })
            .await,
    );
    checkpoints_cleared(h, sid).await;
    detail["call"].clone()
}

/// Once the recording is stored, the call object's storage keeps none of it: no checkpoint
/// (`rec/…`), no count of upload tries, no stored marker.
async fn checkpoints_cleared(h: &Harness, sid: &str) {
    let recording_keys = || -> Vec<String> {
        h.call_object_keys(sid)
            .into_iter()
            .filter(|k| k.starts_with("rec"))
            .collect()
    };
    let deadline = std::time::Instant::now() + SOON;
    let mut left = recording_keys();
    while !left.is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        left = recording_keys();
    }
    assert!(
        left.is_empty(),
        "the call object still holds {} recording keys once its recording is stored: {:?}…\n{}",
        left.len(),
        &left[..left.len().min(5)],
        h.worker.log_tail(40)
    );
}

// ---- 1. a call with a barge-in ------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_call_with_a_barge_in_is_recorded_as_each_side_heard_it() {
    let h = harness().await;
    let (greet_resp, greet_item) = ("resp_greet", "item_greet");
    // A 6 s greeting in thirty 200 ms chunks (still playing when the interruption is handled
    // on a loaded machine); the caller talks over it once 2 marks (1.2 s) have echoed.
    let greeting_audio = tagged_chunks(0x31, 30, 1600);
    let greeting: Vec<u8> = greeting_audio.concat();
    let mut events = oai::response_start(greet_resp, greet_item);
    events.extend(oai::audio_with_transcript(
        greet_resp,
        greet_item,
        &greeting_audio,
        &["お電話ありがとうございます。"],
    ));
    let script = SessionScript::new()
        .once("response.create", events)
        .answer_retrieve(greet_item, "お電話");
    let call = h
        .start_call(CallSpec {
            from: "+15551230601".into(),
            to: "+81312345678".into(),
            script,
            caller_audio: None,
        })
        .await;
    let (oa, twilio, sid) = (&call.openai, &call.twilio, call.ids.call_sid.clone());
    let t0 = call.start_sent_at;

    ok(
        h,
        twilio
            .wait_until("2 greeting marks (1.2 s) echoed as played", SOON, |l| {
                (l.played_echoes() >= 2).then_some(())
            })
            .await,
    );
    // The caller talks (1 s of recognizable frames, paced in real time); the server VAD hears
    // it at once, so the Worker clears Twilio's buffer: a barge-in on the greeting.
    let caller_audio = tagged_chunks(0x42, 50, tw::FRAME_BYTES);
    let caller_sent_at = t0.elapsed();
    let talking = twilio.play_caller_audio(caller_audio.concat());
    oa.send(oai::speech_started(
        t0.elapsed().as_millis() as u64,
        "item_caller",
    ));
    let tlog = ok(
        h,
        twilio
            .wait_until("the clear", SOON, |l| {
                (!l.clears.is_empty()).then(|| l.clone())
            })
            .await,
    );
    let clear = tlog.clears[0].clone();
    oa.send_all(oai::response_finish(
        greet_resp,
        greet_item,
        "お電話ありがとうございます。",
        "cancelled",
    ));
    let sent = talking.await.expect("caller audio task");
    assert_eq!(sent.len(), caller_audio.len());
    // A little silence on the line, then the caller hangs up.
    tokio::time::sleep(Duration::from_millis(400)).await;
    twilio.send_stop(&call.ids);
    let _ = oa.wait_closed(SOON).await;

    let c = wait_recording(h, &sid).await;
    eprintln!("call row: {}", serde_json::to_string_pretty(&c).unwrap());
    assert_eq!(c["recording_key"], format!("recordings/{sid}.wav"));
    let duration = c["duration_ms"].as_i64().expect("duration_ms");
    let rec_ms = c["recording_duration_ms"].as_i64().expect("recording ms");
    let rec_bytes = c["recording_bytes"].as_i64().expect("recording bytes");
    assert!(
        (duration..=duration + 200).contains(&rec_ms),
        "the recording ({rec_ms} ms) spans the call ({duration} ms)"
    );

    // The whole file.
    let full = get_recording(h, &sid, None, Some(ADMIN_TOKEN)).await;
    assert_eq!(full.status, 200, "{}", String::from_utf8_lossy(&full.body));
    assert_eq!(full.header("content-type"), "audio/wav");
    assert_eq!(full.header("accept-ranges"), "bytes");
    let wav = full.body;
    assert_eq!(
        wav.len() as i64,
        rec_bytes,
        "recording_bytes is the file size"
    );
    let (channels_n, rate, byte_rate, align, bits, data) = parse_header(&wav);
    assert_eq!(format_tag(&wav), MULAW, "the μ-law as carried");
    assert_eq!(
        (channels_n, rate, byte_rate, align, bits),
        (2, 8000, 16_000, 2, 8)
    );
    assert_eq!(data as usize, wav.len() - data_offset(&wav));
    assert_eq!(data as i64, rec_ms * 16, "16 bytes per millisecond");
    let (left, right) = channels(&wav);

    // Right: silence, then the greeting from its first audio, up to the cut, then silence.
    let first_audio = c["first_audio_ms"].as_u64().expect("first_audio_ms") as usize;
    let start = right.iter().position(|&s| s != 0).expect("agent audio");
    assert_eq!(
        start,
        first_audio * 8,
        "the greeting starts where it was first sent"
    );
    let want = decoded(&greeting);
    let heard = (0..want.len())
        .take_while(|&i| right[start + i] == want[i])
        .count();
    assert!(heard < want.len(), "the greeting was cut, not played whole");
    assert!(
        right[start + heard..].iter().all(|&s| s == 0),
        "silence on the agent channel after the cut"
    );
    let heard_ms = heard as f64 / 8.0;
    eprintln!(
        "greeting heard in the recording: {heard_ms} ms; Twilio had played {} ms at the clear",
        clear.played_ms
    );
    assert!(
        heard_ms >= 600.0 - 50.0 && heard_ms <= clear.played_ms + 250.0,
        "the recording heard {heard_ms} ms of the greeting; Twilio had played {} ms at the clear",
        clear.played_ms
    );

    // Left: every caller frame, in order, about where it was sent.
    let mut from = 0;
    for (i, frame) in caller_audio.iter().enumerate() {
        let at = find(&left, &decoded(frame), from)
            .unwrap_or_else(|| panic!("caller frame {i} is not on the left channel"));
        if i == 0 {
            let expected = caller_sent_at.as_millis() as i64 * 8;
            assert!(
                (at as i64 - expected).abs() <= 250 * 8,
                "the first caller frame at {} ms, sent at {} ms",
                at / 8,
                expected / 8
            );
        }
        from = at + frame.len();
    }
    assert!(
        right.len() == left.len() && left.len() as i64 == rec_ms * 8,
        "both channels span the recording"
    );

    // Ranges.
    let size = wav.len();
    for (range, lo, hi) in [
        ("bytes=0-43", 0, 43),
        ("bytes=1000-1999", 1000, 1999),
        (
            &format!("bytes={}-", size - 10) as &str,
            size - 10,
            size - 1,
        ),
        ("bytes=-100", size - 100, size - 1),
    ] {
        let got = get_recording(h, &sid, Some(range), Some(ADMIN_TOKEN)).await;
        assert_eq!(got.status, 206, "{range}");
        assert_eq!(
            got.header("content-range"),
            format!("bytes {lo}-{hi}/{size}"),
            "{range}"
        );
        assert_eq!(got.header("accept-ranges"), "bytes");
        assert_eq!(got.body, wav[lo..=hi], "{range}");
    }
    for bad in [
        &format!("bytes={size}-") as &str,
        "bytes=50-10",
        "bytes=x-y",
    ] {
        let got = get_recording(h, &sid, Some(bad), Some(ADMIN_TOKEN)).await;
        assert_eq!(got.status, 416, "{bad}");
        assert_eq!(got.header("content-range"), format!("bytes */{size}"));
    }
    // HEAD: the size and type, no body (for tools that ask before they download).
    let url = format!("{}/api/admin/calls/{sid}/recording", h.base_url());
    let resp = reqwest::Client::new()
        .head(&url)
        .header("Authorization", format!("Bearer {ADMIN_TOKEN}"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("HEAD {url}: {e}"));
    assert_eq!(resp.status().as_u16(), 200);
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    assert_eq!(header("content-type"), "audio/wav");
    assert_eq!(header("content-length"), size.to_string());
    assert_eq!(header("accept-ranges"), "bytes");
    assert!(resp.bytes().await.expect("body").is_empty());
    // Behind the admin token; unknown calls are JSON 404s.
    let got = get_recording(h, &sid, None, None).await;
    assert_eq!(got.status, 401);
    let got = get_recording(h, &sid, None, Some("wrong-token")).await;
    assert_eq!(got.status, 401);
    let got = get_recording(h, UNKNOWN_CALL, None, Some(ADMIN_TOKEN)).await;
    assert_eq!(got.status, 404);
    assert_eq!(got.json()["error"], "not_found");

    // A signed link (what the review page gives its <audio>) plays this recording, ranges
    // included, without the token; not another call's, and not once tampered with.
    let link = get_recording_link(h, &sid).await;
    assert_eq!(link.status, 200);
    let link = link.json();
    let url = link["url"].as_str().expect("url");
    assert!(
        link["expires_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{link}"
    );
    let got = get(h, url, None, None).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("content-type"), "audio/wav");
    assert_eq!(got.body, wav);
    let got = get(h, url, Some("bytes=1000-1999"), None).await;
    assert_eq!(got.status, 206);
    assert_eq!(got.body, wav[1000..=1999]);
    let query = url.split_once('?').unwrap().1;
    let other = format!("/api/admin/calls/{UNKNOWN_CALL}/recording?{query}");
    assert_eq!(get(h, &other, None, None).await.status, 401);
    let tampered = url.replace("expires=", "expires=9");
    assert_eq!(get(h, &tampered, None, None).await.status, 401);
    // The link opens the recording only.
    let call_path = url.replace("/recording?", "?");
    assert_eq!(get(h, &call_path, None, None).await.status, 401);
    let got = get_recording_link(h, UNKNOWN_CALL).await;
    assert_eq!(got.status, 404);
    assert_eq!(got.json()["error"], "not_found");
}

// ---- 2. recording off -----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_with_recording_off_leaves_no_recording() {
    let h = harness().await;
    let admin = admin(h);
    let number = "+81399990602";
    let r = ok(
        h,
        admin
            .post(
                "/api/admin/agents",
                &json!({"id": "quiet-e2e", "name": "録音なし", "instructions": "短く答えてください。",
                        "record_calls": false}),
            )
            .await,
    );
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["agent"]["record_calls"], false);
    let r = ok(
        h,
        admin
            .put(
                &format!("/api/admin/numbers/{}", number.replace('+', "%2B")),
                &json!({"agent_id": "quiet-e2e"}),
            )
            .await,
    );
    assert!(r.status == 201 || r.status == 200, "{}", r.text);

    let call = h
        .start_call(CallSpec {
            from: "+15551230602".into(),
            to: number.into(),
            script: SessionScript::new(),
            caller_audio: Some(tagged_chunks(0x55, 25, tw::FRAME_BYTES).concat()),
        })
        .await;
    let sid = call.ids.call_sid.clone();
    call.caller_audio.unwrap().await.expect("caller audio");
    call.twilio.send_stop(&call.ids);
    let detail = ok(
        h,
        admin
            .wait_call(&sid, "the call's end", D1_DEADLINE, |d| {
                d["call"]["ended_at"].is_string()
            })
            .await,
    );
    assert_eq!(detail["call"]["agent_id"], "quiet-e2e");
    // The recording row would be written right after the upload; give it that long.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let detail = ok(h, admin.call(&sid).await).expect("the call");
    assert_eq!(detail["call"]["recording_key"], Value::Null);
    // Neither the recording nor a link to it: JSON 404s that say why.
    for got in [
        get_recording(h, &sid, None, Some(ADMIN_TOKEN)).await,
        get_recording_link(h, &sid).await,
    ] {
        assert_eq!(got.status, 404);
        let body = got.json();
        assert!(
            body["message"].as_str().unwrap().contains("no recording"),
            "{body}"
        );
    }
}

// ---- 3. a lost socket ------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_call_cut_off_by_a_lost_socket_still_leaves_a_playable_file() {
    let h = harness().await;
    let greeting_audio = tagged_chunks(0x61, 3, 800);
    let mut events = oai::response_start("resp_g3", "item_g3");
    events.extend(oai::audio_with_transcript(
        "resp_g3",
        "item_g3",
        &greeting_audio,
        &["はい。"],
    ));
    let call = h
        .start_call(CallSpec {
            from: "+15551230603".into(),
            to: "+81312345678".into(),
            script: SessionScript::new().once("response.create", events),
            caller_audio: Some(tagged_chunks(0x62, 40, tw::FRAME_BYTES).concat()),
        })
        .await;
    let sid = call.ids.call_sid.clone();
    ok(
        h,
        call.twilio
            .wait_until("the greeting to play (its mark echoed)", SOON, |l| {
                (l.played_echoes() >= 1).then_some(())
            })
            .await,
    );
    let sent = call.caller_audio.unwrap().await.expect("caller audio");
    // Once the Worker has relayed the last frame, the connection drops: no stop, no close.
    let last = sent.last().expect("frames sent").clone();
    wait_relayed(h, &call.openai, &last).await;
    call.twilio.abort();
    let c = wait_recording(h, &sid).await;
    assert_eq!(c["end_reason"], "twilio_socket_closed");
    let full = get_recording(h, &sid, None, Some(ADMIN_TOKEN)).await;
    assert_eq!(full.status, 200);
    let (ch, rate, _, _, bits, data) = parse_header(&full.body);
    assert_eq!(
        (format_tag(&full.body), ch, rate, bits),
        (MULAW, 2, 8000, 8)
    );
    assert_eq!(data as usize, full.body.len() - data_offset(&full.body));
    assert_eq!(
        data as i64,
        c["recording_duration_ms"].as_i64().unwrap() * 16
    );
    let (left, right) = channels(&full.body);
    assert!(
        find(&right, &decoded(&greeting_audio[2]), 0).is_some(),
        "the greeting is there"
    );
    assert!(
        find(
            &left,
            &decoded(&tagged_chunks(0x62, 40, tw::FRAME_BYTES)[39]),
            0
        )
        .is_some(),
        "the caller's last frame before the loss is there"
    );
}

// ---- 4. a call longer than one part ----------------------------------------------------------------

/// R2's part size, which the Worker uses for every part but the last.
const PART_BYTES: usize = 5 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread")]
async fn a_call_longer_than_one_part_is_uploaded_in_parts() {
    let h = harness().await;
    // 345 s of caller audio: more than one 5 MiB part of stereo μ-law (327.7 s), and long
    // enough past it (the checkpoint holding part 1's end is written at about 330 s) for part
    // 1 to leave memory before the call ends.
    let frames = 345_000 / 20;
    let caller_audio = tagged_chunks(0x71, frames, tw::FRAME_BYTES);
    let call = h
        .start_call(CallSpec {
            from: "+15551230604".into(),
            to: "+81312345678".into(),
            script: SessionScript::new(),
            caller_audio: Some(caller_audio.concat()),
        })
        .await;
    let sid = call.ids.call_sid.clone();
    let sent = call.caller_audio.unwrap().await.expect("caller audio");
    let last = sent.last().expect("frames sent").clone();
    wait_relayed(h, &call.openai, &last).await;
    call.twilio.send_stop(&call.ids);
    let c = wait_recording(h, &sid).await;
    let rec_ms = c["recording_duration_ms"].as_i64().unwrap();
    assert!(rec_ms > 328_000, "{rec_ms} ms");
    let full = get_recording(h, &sid, None, Some(ADMIN_TOKEN)).await;
    assert_eq!(full.status, 200);
    let wav = &full.body;
    assert!(wav.len() > PART_BYTES, "{} bytes", wav.len());
    assert_eq!(wav.len() as i64, c["recording_bytes"].as_i64().unwrap());
    let (_, _, _, _, _, data) = parse_header(wav);
    assert_eq!(data as i64, rec_ms * 16);
    // A multipart object's ETag counts its parts: the first 5 MiB (with the header) and the rest.
    let etag = full.header("etag").to_owned();
    assert!(etag.trim_matches('"').ends_with("-2"), "ETag {etag}");
    // The caller's frames are all there, in order, across the part boundary.
    let (left, _) = channels(wav);
    let mut from = 0;
    for (i, frame) in caller_audio.iter().enumerate() {
        let at = find(&left, &decoded(frame), from)
            .unwrap_or_else(|| panic!("caller frame {i} of {frames} is missing"));
        from = at + frame.len();
    }
    assert!(
        from * 2 + data_offset(wav) > PART_BYTES,
        "the frames cross into part 2"
    );
    // A range across the boundary between the parts.
    let range = format!("bytes={}-{}", PART_BYTES - 100, PART_BYTES + 99);
    let got = get_recording(h, &sid, Some(&range), Some(ADMIN_TOKEN)).await;
    assert_eq!(got.status, 206);
    assert_eq!(got.body, wav[PART_BYTES - 100..PART_BYTES + 100]);
    // Part 1 was not held to the end: it left memory once its checkpoints were written and
    // was made again from them (the header and frames checked above are its bytes).
    let stored_line = || {
        h.worker
            .log()
            .lines()
            .find(|l| l.contains("recording.stored") && l.contains(&sid))
            .map(str::to_owned)
    };
    let mut stored = stored_line();
    for _ in 0..50 {
        if stored.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        stored = stored_line();
    }
    let stored = stored.unwrap_or_else(|| panic!("no recording.stored line for {sid}"));
    assert!(
        stored.contains(r#""first_part_from_checkpoints":true"#),
        "{stored}"
    );
}

// ---- 5. a stall between Twilio and the Worker -------------------------------------------------------

/// The network between Twilio and the Worker stalls for 1.5 s while the caller talks: the
/// frames come late, in a burst, stamped when they were spoken. In the recording every frame
/// sits where its stamp puts it, exactly 20 ms after the one before, the held ones and those
/// after the stall included, and the recording is no longer than the call.
#[tokio::test(flavor = "multi_thread")]
async fn caller_audio_held_up_by_the_network_keeps_its_place() {
    let h = harness().await;
    let call = h
        .start_call(CallSpec {
            from: "+15551230605".into(),
            to: "+81312345678".into(),
            script: SessionScript::new(),
            caller_audio: None,
        })
        .await;
    let sid = call.ids.call_sid.clone();
    let frames = tagged_chunks(0x75, 150, tw::FRAME_BYTES); // 3 s
    let held = Duration::from_millis(1_000)..Duration::from_millis(2_500);
    let sent = call
        .twilio
        .play_caller_audio_held(frames.concat(), held)
        .await
        .expect("caller audio");
    let last = sent.last().expect("frames sent").clone();
    wait_relayed(h, &call.openai, &last).await;
    call.twilio.send_stop(&call.ids);
    recorded_in_step(h, &sid, &frames).await;
}

// ---- 6. caller frames delivered twice ---------------------------------------------------------------

/// Some of the caller's frames reach the Worker twice, exactly as they were sent (the same
/// `sequenceNumber`, `chunk`, `timestamp` and audio). Each goes to OpenAI as it comes, the
/// second copy too, but the recording has every frame once, exactly 20 ms after the one
/// before: the copies push nothing later, and the call's log says once how many there were.
#[tokio::test(flavor = "multi_thread")]
async fn caller_frames_delivered_twice_are_recorded_once() {
    let h = harness().await;
    let call = h
        .start_call(CallSpec {
            from: "+15551230606".into(),
            to: "+81312345678".into(),
            script: SessionScript::new(),
            caller_audio: None,
        })
        .await;
    let sid = call.ids.call_sid.clone();
    let frames = tagged_chunks(0x76, 150, tw::FRAME_BYTES); // 3 s
                                                            // After frame 50 the three up to it again; after 100 that one; after 120, three from more
                                                            // than a second before.
    let replays = vec![(50, 48..=50), (100, 100..=100), (120, 60..=62)];
    let sent = call
        .twilio
        .play_caller_audio_again(frames.concat(), replays)
        .await
        .expect("caller audio");
    let last = sent.last().expect("frames sent").clone();
    wait_relayed(h, &call.openai, &last).await;
    let appends = call.openai.received_of_type("input_audio_buffer.append");
    let appended = |payload: &str| {
        appends
            .iter()
            .filter(|e| e.event["audio"] == payload)
            .count()
    };
    assert_eq!(appended(&sent[49]), 2, "the relay passes on both copies");
    assert_eq!(appended(&sent[51]), 1);
    call.twilio.send_stop(&call.ids);
    recorded_in_step(h, &sid, &frames).await;
    let adjusted: Vec<String> = h
        .worker
        .log()
        .lines()
        .filter(|l| l.contains("recording.adjusted") && l.contains(&sid))
        .map(str::to_owned)
        .collect();
    assert_eq!(adjusted.len(), 1, "said once for the call: {adjusted:?}");
    assert!(
        adjusted[0].contains(r#""caller_replayed_frames":7"#),
        "{}",
        adjusted[0]
    );
}
