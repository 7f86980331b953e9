//! End-to-end tests of the bridge under failures: the real Worker in `wrangler dev` between the
//! fake Twilio and the fake OpenAI, over real sockets, with what landed in D1 read back through
//! the admin API.
//!
//! - A second media stream for a call that is already streaming is refused (409) and the first
//!   keeps relaying both ways; of two upgrades racing for one call exactly one is accepted; an
//!   ended call's stream cannot be opened again (410). (A stream for a CallSid with no signed
//!   webhook is refused in e2e_bridge.)
//! - The call objects restart mid-call, as on a deploy: this test serves a copy of the built
//!   Worker from a directory of its own (`support::worker::Deployment`) and rewrites its bundle,
//!   so wrangler restarts workerd for real and the Worker the other tests share is untouched.
//!   Both sockets of each call in flight drop. Each call is then finalized one way: when
//!   Twilio's final status callback reaches its object, by the object's watch alarm, when its
//!   stream is opened again (refused, 410), or by the alarm that retries a D1 write which was
//!   still queued in the object's outbox because D1 was locked at the restart. All end as
//!   `bridge_restarted` and failed, keeping every row written before the restart, and each
//!   call's recording up to its last checkpoint is uploaded from its object's storage.
//! - The Worker restarts while records are on their way from a call object's storage to D1 (each
//!   D1 write is held by the test hook `FAULT_INJECT_D1_STALL_MS`, so the restart finds one
//!   in flight): an alarm was set when they were stored, and brings the object back to copy
//!   them, though nothing else would wake it (a call whose stream never connected). A call
//!   that ends while a write of its records is held is not marked ended until its last
//!   records are kept: the restart then finds it unfinished and finalizes it, or finds its end
//!   in storage; either way its row ends.
//! - A deploy after which the call objects' storage refuses their records (the test hook
//!   `FAULT_INJECT_STORAGE_FAILURES`) until another deploy: a replayed stream of a call the
//!   first deploy cut is refused as gone (410), though its end cannot be kept then, and the
//!   call is finalized once storage takes records again; so is a call whose stream never
//!   connected, whose final status Twilio sent meanwhile.
//! - An upgrade running before its migration was applied: a Worker whose call ends write a
//!   column the local D1 does not have yet (migration 0007 held back) keeps each refused end
//!   in its object and lands it once the migration is applied.
//!
//! Waits are for observed events (a frame at a peer, a row in D1, a line in wrangler's log),
//! with generous bounds; time is asserted only from below.

mod support;

use std::time::{Duration, Instant};

use phone_agent_bridge::recording;
use serde_json::{json, Value};
use support::admin::Admin;
use support::fake_openai::{self as oai, Session, SessionScript};
use support::fake_twilio::{self as tw, CallIds, ConnectError, MediaStream};
use support::wav::{channels, data_offset, decoded, find, format_tag, parse_header, MULAW};
use support::worker::Deployment;
use support::{ok, tagged_chunks, Call, CallSpec, Harness, SOON, TWILIO_AUTH_TOKEN};

const ADMIN_TOKEN: &str = "admin-e2e-resilience-SECRET-654";
/// D1 writes are asynchronous (the call object's outbox): be generous.
const D1_DEADLINE: Duration = Duration::from_secs(90);
/// A call whose object restarted and that nobody asks about is finalized by the object's watch
/// alarm, which runs once a minute while a stream is up; plus a noisy machine's slack.
const WATCH_DEADLINE: Duration = Duration::from_secs(180);
/// Long enough for a Worker to have done something it should not do (negative checks).
const QUIET: Duration = Duration::from_secs(2);

async fn harness() -> &'static Harness {
    static HARNESS: tokio::sync::OnceCell<Result<Harness, String>> =
        tokio::sync::OnceCell::const_new();
    let h = HARNESS
        .get_or_init(|| {
            Harness::start(
                "e2e-resilience",
                vec![("ADMIN_TOKEN".into(), ADMIN_TOKEN.into())],
            )
        })
        .await;
    match h {
        Ok(h) => h,
        Err(e) => panic!("the Worker under test did not start:\n{e}"),
    }
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap()
}

fn greeting_script(tag: u8) -> SessionScript {
    SessionScript::new().once(
        "response.create",
        oai::full_response(
            "resp_greet",
            "item_greet",
            &tagged_chunks(tag, 2, 800),
            "お電話ありがとうございます。",
        ),
    )
}

/// Open the signed media stream for `twiml` again, as a second Twilio (or a replay) would.
async fn connect_again(twiml: &tw::Twiml) -> Result<MediaStream, ConnectError> {
    let sig = tw::sign(TWILIO_AUTH_TOKEN, &twiml.stream_url, &[]);
    MediaStream::connect(&twiml.stream_url, Some(&sig)).await
}

fn refused_status(what: &str, r: Result<MediaStream, ConnectError>) -> (u16, String) {
    match r {
        Err(ConnectError::Refused { status, body }) => (status, body),
        Err(ConnectError::Other(e)) => panic!("{what}: expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("{what}: the Worker accepted the WebSocket upgrade"),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Five tagged caller frames come out at OpenAI unchanged and in order.
async fn caller_reaches_openai(h: &Harness, call: &Call, tag: u8, round: &str) {
    let frames = tagged_chunks(tag, 5, tw::FRAME_BYTES);
    let payloads: Vec<String> = frames.iter().map(|f| call.twilio.send_media(f)).collect();
    ok(
        h,
        call.openai
            .wait_until(&format!("{round}: the caller's tagged frames"), SOON, |v| {
                let appended: Vec<&str> = v
                    .received
                    .iter()
                    .filter(|e| e.event_type() == "input_audio_buffer.append")
                    .filter_map(|e| e.event["audio"].as_str())
                    .collect();
                appended
                    .windows(payloads.len())
                    .any(|w| w.iter().zip(&payloads).all(|(a, p)| *a == p.as_str()))
                    .then_some(())
            })
            .await,
    );
}

/// A tagged agent response (three 100 ms chunks) comes out at Twilio byte-exact.
async fn agent_reaches_twilio(h: &Harness, call: &Call, tag: u8, round: &str) {
    let chunks = tagged_chunks(tag, 3, 800);
    let (resp, item) = (format!("resp_{tag:02x}"), format!("item_{tag:02x}"));
    call.openai.send_all(oai::full_response(
        &resp,
        &item,
        &chunks,
        "はい、承知しました。",
    ));
    let want = chunks.concat();
    ok(
        h,
        call.twilio
            .wait_until(&format!("{round}: the agent's tagged audio"), SOON, |l| {
                contains(&l.media_bytes(), &want).then_some(())
            })
            .await,
    );
}

/// Proof that the call relays both ways.
async fn relays_both_ways(h: &Harness, call: &Call, tag: u8, round: &str) {
    caller_reaches_openai(h, call, tag, round).await;
    agent_reaches_twilio(h, call, tag.wrapping_add(1), round).await;
}

async fn greeting_played(h: &Harness, call: &Call) {
    ok(
        h,
        call.twilio
            .wait_until("the greeting to play (its mark echoed)", SOON, |l| {
                (l.played_echoes() >= 1).then_some(())
            })
            .await,
    );
}

// ---- 1. one stream per call ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_second_stream_for_a_live_call_is_refused_with_409_and_the_first_keeps_relaying() {
    let h = harness().await;
    let call = h
        .start_call(CallSpec {
            from: "+15551230601".into(),
            script: greeting_script(0x11),
            ..CallSpec::default()
        })
        .await;
    greeting_played(h, &call).await;
    relays_both_ways(h, &call, 0x20, "before the second stream").await;

    // The same signed upgrade again while the first stream is up: refused, and no second
    // OpenAI session is opened for it.
    let claim = h.openai.claim(SessionScript::new()).await;
    let (status, body) = refused_status(
        "a second stream for a live call",
        connect_again(&call.twiml).await,
    );
    assert_eq!(status, 409, "second stream refused with {status}: {body}");
    ok(h, claim.expect_no_connection(QUIET).await);
    drop(claim);

    // The first call did not notice.
    relays_both_ways(h, &call, 0x30, "after the second stream").await;
    let tlog = call.twilio.log();
    assert!(
        tlog.closed.is_none(),
        "the first stream was closed: {:?}",
        tlog.closed
    );
    assert!(tlog.problems.is_empty(), "{:?}", tlog.problems);
    assert!(
        tlog.clears.is_empty(),
        "nothing interrupted the agent: {:?}",
        tlog.clears
    );
    assert!(call.openai.closed().is_none(), "{:?}", call.openai.closed());
    assert!(
        call.openai
            .received()
            .iter()
            .all(|e| e.event_type() != "error"),
        "{:?}",
        call.openai.received_types()
    );
    let sid = call.ids.call_sid.as_str();
    let log = h.worker.log();
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("stream.refused") && l.contains(sid))
        .collect();
    assert!(
        refusals.len() == 1 && refusals[0].contains("\"status\":409"),
        "one stream.refused line with status 409 for {sid}: {refusals:?}"
    );

    // Once the call has ended its stream cannot be opened again (410). The object records
    // the end just after it closes the OpenAI socket, so a 409 can still come first.
    call.twilio.send_stop(&call.ids);
    ok(h, call.openai.wait_closed(SOON).await);
    let claim = h.openai.claim(SessionScript::new()).await;
    let deadline = Instant::now() + SOON;
    loop {
        let (status, body) = refused_status(
            "a stream for an ended call",
            connect_again(&call.twiml).await,
        );
        if status == 410 {
            break;
        }
        assert!(
            status == 409 && Instant::now() < deadline,
            "stream for an ended call refused with {status}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ok(h, claim.expect_no_connection(QUIET).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn of_two_streams_racing_for_one_call_exactly_one_is_accepted() {
    let h = harness().await;
    let ids = CallIds::new();
    let twiml = h.answer_call(&ids, "+15551230602", "+81312345678").await;
    let claim = h.openai.claim(greeting_script(0x41)).await;
    let connections_before = h.openai.connection_count();
    let (a, b) = tokio::join!(connect_again(&twiml), connect_again(&twiml));
    let (twilio, loser) = match (a, b) {
        (Ok(s), Err(e)) | (Err(e), Ok(s)) => (s, e),
        (Ok(_), Ok(_)) => panic!("both racing streams were accepted for {}", ids.call_sid),
        (Err(a), Err(b)) => panic!("both racing streams were refused: {a:?} / {b:?}"),
    };
    assert!(
        matches!(loser, ConnectError::Refused { status: 409, .. }),
        "the losing stream: {loser:?}"
    );
    twilio.send_connected();
    twilio.send_start(&ids, &twiml.parameters);
    let openai = ok(h, claim.session(SOON).await);
    let call = Call {
        ids,
        from: "+15551230602".into(),
        to: "+81312345678".into(),
        twiml,
        twilio,
        openai,
        start_sent_at: Instant::now(),
        caller_audio: None,
    };
    greeting_played(h, &call).await;
    relays_both_ways(h, &call, 0x50, "the winning stream").await;
    assert_eq!(
        h.openai.connection_count() - connections_before,
        1,
        "one OpenAI session for the one accepted stream"
    );
    drop(claim);
    call.twilio.send_stop(&call.ids);
    ok(h, call.openai.wait_closed(SOON).await);
}

// ---- 2. a restart mid-call -------------------------------------------------------------------------

/// What one call said before the restart.
struct Said {
    call: Call,
    /// The call's detail once its three turns were in D1.
    before: Value,
    /// When the caller's audio last reached the Worker.
    streamed_until: Instant,
    /// The tag of the call's audio: the caller's turn is tagged `tag + 1`, the reply `tag + 2`.
    tag: u8,
}

/// Greeting, a caller turn, a reply, all played; returns once the three turns are in D1.
async fn converse(h: &Harness, admin: &Admin, from: &str, tag: u8) -> Said {
    let call = h
        .start_call(CallSpec {
            from: from.into(),
            script: greeting_script(tag),
            ..CallSpec::default()
        })
        .await;
    greeting_played(h, &call).await;
    let oa: &Session = &call.openai;
    let caller_item = format!("item_caller_{tag:02x}");
    let at_ms = call.start_sent_at.elapsed().as_millis() as u64;
    oa.send(oai::speech_started(at_ms, &caller_item));
    caller_reaches_openai(h, &call, tag + 1, "the caller's turn").await;
    oa.send_all(oai::caller_turn_end(
        &caller_item,
        Some("item_greet"),
        at_ms + 100,
    ));
    oa.send(oai::caller_transcription_completed(
        &caller_item,
        "営業時間を教えてください。",
    ));
    agent_reaches_twilio(h, &call, tag + 2, "the reply").await;
    let before = ok(
        h,
        admin
            .wait_call(&call.ids.call_sid, "the three turns", D1_DEADLINE, |d| {
                d["transcript"].as_array().is_some_and(|t| t.len() == 3)
            })
            .await,
    );
    Said {
        call,
        before,
        streamed_until: Instant::now(),
        tag,
    }
}

/// The lines stay open as on real calls: Twilio streams each caller's audio all along (here a
/// frame every 100 ms to every call, for `how_long`), so the recordings run on past the
/// conversations, long enough for the call objects to checkpoint some of them.
async fn keep_streaming(calls: &mut [&mut Said], how_long: Duration) {
    let frames = tagged_chunks(0x3c, 1, tw::FRAME_BYTES);
    let until = Instant::now() + how_long;
    while Instant::now() < until {
        for said in calls.iter_mut() {
            said.call.twilio.send_media(&frames[0]);
            said.streamed_until = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The caller presses 7; returns once the call object has queued the key press in its outbox,
/// durably: a frame sent after it has reached OpenAI (the object handles one socket's frames
/// in order, and holds its output until its storage writes are durable).
async fn press_key(h: &Harness, call: &Call, tag: u8, digit: &str) {
    call.twilio.send_raw(json!({
        "event": "dtmf",
        "streamSid": call.ids.stream_sid,
        "dtmf": {"track": "inbound_track", "digit": digit},
    }));
    let sync = call
        .twilio
        .send_media(&tagged_chunks(tag, 1, tw::FRAME_BYTES)[0]);
    ok(
        h,
        call.openai
            .wait_until("the frame after the key press", SOON, |v| {
                v.received
                    .iter()
                    .any(|e| e.event["audio"] == sync.as_str())
                    .then_some(())
            })
            .await,
    );
}

fn has_key_presses(d: &Value) -> bool {
    ["7", "8"].iter().all(|digit| {
        d["events"].as_array().is_some_and(|ev| {
            ev.iter()
                .any(|e| e["type"] == "dtmf" && e["detail"]["digit"] == *digit)
        })
    })
}

/// Holds the local D1 database's write lock (as another writer would), so every D1 write of
/// the Worker fails while it is held (reads too: the admin API answers 503 meanwhile).
struct D1Lock(rusqlite::Connection);

impl D1Lock {
    fn take(h: &Harness) -> D1Lock {
        let dir = h
            .worker
            .persist_dir
            .join("v3/d1/miniflare-D1DatabaseObject");
        let files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.extension().is_some_and(|x| x == "sqlite")
                    && p.file_stem().is_some_and(|s| s != "metadata")
            })
            .collect();
        assert_eq!(files.len(), 1, "one local D1 database: {files:?}");
        let conn = rusqlite::Connection::open(&files[0]).unwrap();
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        D1Lock(conn)
    }

    fn release(self) {
        self.0.execute_batch("ROLLBACK").unwrap();
    }
}

fn count_in_log(h: &Harness, needle: &str) -> usize {
    h.worker.log().matches(needle).count()
}

/// A Worker of its own with `vars`, served from a copy of the project that can be
/// redeployed without touching the Worker the other tests use.
async fn redeployable(label: &str, vars: Vec<(String, String)>) -> (Deployment, Harness) {
    let scratch = support::scratch_dir(label);
    let deployment = Deployment::copy_of(&support::repo_root(), &scratch.join("app"))
        .unwrap_or_else(|e| panic!("{e}"));
    let h = Harness::start_from(scratch, deployment.dir.clone(), vars)
        .await
        .unwrap_or_else(|e| panic!("the {label} Worker did not start:\n{e}"));
    (deployment, h)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_mid_call_finalizes_the_calls_as_bridge_restarted_and_keeps_every_row() {
    let (deployment, h) = redeployable(
        "e2e-resilience-restart",
        vec![("ADMIN_TOKEN".into(), ADMIN_TOKEN.into())],
    )
    .await;
    let h = &h;
    let admin = Admin::new(&h.base_url(), ADMIN_TOKEN);

    // Four calls, each finalized one way after the restart:
    // A: Twilio's final status callback reaches its object;
    // B: nobody says anything, the object's watch alarm must notice;
    // C: its stream is opened again (a replay of Twilio's signed upgrade), which is refused;
    // D: a key press is still queued in its object's outbox at the restart (D1 is locked), and
    //    the object's retry (or watch) alarm brings it back to write it.
    // A, B and C have nothing left to write when the restart comes, so only their own path
    // can end them early.
    let mut a = converse(h, &admin, "+15551230611", 0x61).await;
    let mut b = converse(h, &admin, "+15551230612", 0x71).await;
    let mut c = converse(h, &admin, "+15551230613", 0x81).await;
    let mut d = converse(h, &admin, "+15551230614", 0x91).await;
    let checkpointed = Duration::from_millis(recording::CHECKPOINT_EVERY_MS);
    keep_streaming(
        &mut [&mut a, &mut b, &mut c, &mut d],
        checkpointed + Duration::from_millis(1_500),
    )
    .await;
    let lock = D1Lock::take(h);
    let wait_failed_write = |since: usize| async move {
        let deadline = Instant::now() + SOON;
        while count_in_log(h, "outbox.d1_write_failed") == since {
            assert!(
                Instant::now() < deadline,
                "no D1 write failed while D1 was locked:\n{}",
                h.worker.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let failed_writes = count_in_log(h, "outbox.d1_write_failed");
    press_key(h, &d.call, 0x94, "7").await;
    wait_failed_write(failed_writes).await;
    // A second key press while D1 is still refusing: it comes during the outbox's backoff,
    // and must reach storage too, not wait in memory for D1 to come back. A failed write
    // after it proves the writer has been round since.
    let failed_writes = count_in_log(h, "outbox.d1_write_failed");
    press_key(h, &d.call, 0x95, "8").await;
    wait_failed_write(failed_writes).await;
    // No write commits while the lock is held: D's key presses, queued after the lock was
    // taken, are only in the call object's own storage.

    // Meanwhile the admin API says the store is unavailable for now, with when to retry,
    // rather than an internal error.
    let r = admin.get("/api/admin/calls?limit=5").await.unwrap();
    assert_eq!(r.status, 503, "{}", r.text);
    assert_eq!(r.body["error"], "unavailable", "{}", r.text);
    assert_eq!(
        r.headers.get("retry-after").and_then(|v| v.to_str().ok()),
        Some("5"),
        "{:?}",
        r.headers
    );
    let deadline = Instant::now() + SOON;
    while !h
        .worker
        .log()
        .lines()
        .any(|l| l.contains("admin.failed") && l.contains("\"status\":503"))
    {
        assert!(
            Instant::now() < deadline,
            "the cause of the 503 is not in the log:\n{}",
            h.worker.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // What Twilio runs once the stream is gone: the apology after </Connect>.
    let calls = [&a, &b, &c, &d];
    for said in calls {
        let paths = &said.call.twiml.element_paths;
        let connect = paths.iter().position(|p| p == "Response/Connect").unwrap();
        assert!(
            paths[connect..].iter().any(|p| p == "Response/Say"),
            "no fallback after </Connect>: {paths:?}"
        );
    }

    // The deploy.
    let reloads = count_in_log(h, "Local server updated and ready");
    let redeployed_at = Instant::now();
    deployment.redeploy().unwrap_or_else(|e| panic!("{e}"));
    for said in calls {
        let call = &said.call;
        let closed = ok(
            h,
            call.twilio
                .wait_until("the restart to drop Twilio's socket", SOON, |l| {
                    l.closed.clone()
                })
                .await,
        );
        assert_eq!(
            closed.close_frame, None,
            "a dropped connection, not a close: {closed:?}"
        );
        let closed = ok(h, call.openai.wait_closed(SOON).await);
        assert_eq!(
            closed.close_frame, None,
            "a dropped connection, not a close: {closed:?}"
        );
    }
    let deadline = Instant::now() + SOON;
    while count_in_log(h, "Local server updated and ready") <= reloads {
        assert!(
            Instant::now() < deadline,
            "wrangler did not reload:\n{}",
            h.worker.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    lock.release();

    // A: Twilio played the apology and hung up; its final status callback.
    let r = h
        .post_status(&tw::status_params(
            &a.call.ids,
            &a.call.from,
            &a.call.to,
            "completed",
            2,
            Some(61),
        ))
        .await;
    assert_eq!(
        r.status, 204,
        "status callback after the restart: {}",
        r.body
    );
    // C: its stream again. Refused, no OpenAI session, and C is over.
    let claim = h.openai.claim(greeting_script(0x8a)).await;
    let (status, body) = refused_status(
        "a stream again for a call whose object restarted",
        connect_again(&c.call.twiml).await,
    );
    assert_eq!(status, 410, "{body}");
    ok(h, claim.expect_no_connection(QUIET).await);
    drop(claim);

    let finalized = |d: &Value| {
        d["call"]["end_reason"] == "bridge_restarted" && d["call"]["ended_at"].is_string()
    };
    // In the order they are expected to end (B's watch comes last), so the times printed
    // say when each was seen finalized.
    let mut after = Vec::new();
    for (said, what) in [
        (&a, "A finalized, with Twilio's duration"),
        (&c, "C finalized"),
        (&d, "D finalized, with its key presses"),
        (&b, "B finalized"),
    ] {
        let sid = &said.call.ids.call_sid;
        let detail = ok(
            h,
            admin
                .wait_call(sid, what, WATCH_DEADLINE, |detail| {
                    finalized(detail)
                        && (sid != &a.call.ids.call_sid
                            || detail["call"]["twilio_duration_s"] == 61)
                        && (sid != &d.call.ids.call_sid || has_key_presses(detail))
                })
                .await,
        );
        eprintln!(
            "{what}: {:.1}s after the restart",
            redeployed_at.elapsed().as_secs_f64()
        );
        after.push((said, detail));
    }

    for (said, after) in &after {
        let sid = said.call.ids.call_sid.as_str();
        eprintln!("{sid} after the restart:\n{}", pretty(after));
        let (row, row0) = (&after["call"], &said.before["call"]);
        assert_eq!(row["status"], "failed", "{sid}: {}", pretty(row));
        for key in [
            "started_at",
            "connected_at",
            "stream_sid",
            "openai_session_id",
            "from_number",
            "agent_id",
        ] {
            assert_eq!(row[key], row0[key], "{sid}: {key} changed by the restart");
        }
        // The call lasted at least until its last frame before the restart: what the object
        // goes by is the audio it recorded (its checkpoints), and the test's steps after
        // `keep_streaming` can take longer than the margin it adds past them.
        let lasted = said
            .streamed_until
            .duration_since(said.call.start_sent_at)
            .as_millis() as i64;
        let duration = row["duration_ms"]
            .as_i64()
            .unwrap_or_else(|| panic!("{sid}: no duration_ms"));
        assert!(
            duration + 100 >= lasted,
            "{sid}: duration_ms {duration} < {lasted} ms from the stream start to its last frame"
        );
        // Every turn written before the restart is there, unchanged, exactly once; so are
        // the events, and D's key presses (queued before the restart) are there once each.
        assert_eq!(
            after["transcript"], said.before["transcript"],
            "{sid}: transcript changed by the restart"
        );
        let events = after["events"].as_array().unwrap();
        for e in said.before["events"].as_array().unwrap() {
            assert!(events.contains(e), "{sid}: event lost: {e}");
        }
        let presses: &[&str] = if std::ptr::eq(*said, &d) {
            &["7", "8"]
        } else {
            &[]
        };
        let dtmf: Vec<&Value> = events
            .iter()
            .filter(|e| e["type"] == "dtmf")
            .map(|e| &e["detail"]["digit"])
            .collect();
        assert_eq!(dtmf, presses, "{sid}: {}", pretty(&after["events"]));
        let seqs: Vec<i64> = events.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "{sid}: event seqs {seqs:?}"
        );
    }
    assert_eq!(after[0].1["call"]["twilio_duration_s"], 61);
    // Every line an outbox logged (D's failed writes while D1 was locked among them) names
    // its call.
    let sids: Vec<&str> = calls
        .iter()
        .map(|said| said.call.ids.call_sid.as_str())
        .collect();
    let log = h.worker.log();
    let outbox_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(r#""event":"outbox."#))
        .collect();
    assert!(!outbox_lines.is_empty(), "D's failed writes are logged");
    for line in outbox_lines {
        assert!(
            sids.iter().any(|sid| line.contains(sid)),
            "an outbox line naming no call: {line}"
        );
    }

    // What each call recorded up to the restart is stored: the object's next instance uploads
    // it from the checkpoints its pump kept in the object's storage.
    for said in calls {
        let sid = said.call.ids.call_sid.as_str();
        let detail = ok(
            h,
            admin
                .wait_call(
                    sid,
                    "the recording, from the checkpoints",
                    WATCH_DEADLINE,
                    |d| d["call"]["recording_key"].is_string(),
                )
                .await,
        );
        let row = &detail["call"];
        assert_eq!(row["recording_key"], format!("recordings/{sid}.wav"));
        let lasted = redeployed_at
            .duration_since(said.call.start_sent_at)
            .as_millis() as i64;
        let rec_ms = row["recording_duration_ms"].as_i64().expect("recording ms");
        let streamed = said
            .streamed_until
            .duration_since(said.call.start_sent_at)
            .as_millis() as i64;
        eprintln!(
            "{sid}: recording of {rec_ms} ms; caller audio for {streamed} ms, the restart at {lasted} ms"
        );
        // The recorder hands out audio a second at a time (a little behind the clock) as
        // frames come in, and the object checkpoints it 5 s at a time: all of the caller's
        // audio is in but for at most those two.
        let step = recording::CHECKPOINT_EVERY_MS as i64;
        assert!(
            rec_ms >= step && rec_ms + step + 1_300 >= streamed && rec_ms <= lasted,
            "{sid}: a recording of {rec_ms} ms for {streamed} ms of caller audio"
        );
        let wav = reqwest::Client::new()
            .get(format!("{}/api/admin/calls/{sid}/recording", h.base_url()))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{sid}: recording: {e}"));
        assert_eq!(wav.status().as_u16(), 200, "{sid}: recording");
        let wav = wav.bytes().await.unwrap();
        let (channels_n, rate, _, _, bits, data) = parse_header(&wav);
        assert_eq!(
            (format_tag(&wav), channels_n, rate, bits),
            (MULAW, 2, 8000, 8),
            "{sid}"
        );
        assert_eq!(
            data as usize,
            wav.len() - data_offset(&wav),
            "{sid}: the header's length"
        );
        assert_eq!(data as i64, rec_ms * 16, "{sid}: 16 bytes per millisecond");
        assert_eq!(
            Some(wav.len() as i64),
            row["recording_bytes"].as_i64(),
            "{sid}"
        );
        // What was said before the restart is in it: the caller's frames on the left, in
        // order, and the agent's reply on the right, as Twilio played it.
        let (left, right) = channels(&wav);
        let mut from = 0;
        for (i, frame) in tagged_chunks(said.tag + 1, 5, tw::FRAME_BYTES)
            .iter()
            .enumerate()
        {
            from = find(&left, &decoded(frame), from)
                .unwrap_or_else(|| panic!("{sid}: caller frame {i} is not on the left channel"))
                + frame.len();
        }
        let reply = tagged_chunks(said.tag + 2, 3, 800).concat();
        assert!(
            find(&right, &decoded(&reply), 0).is_some(),
            "{sid}: the agent's reply is not on the right channel"
        );
    }
    assert!(
        count_in_log(h, "recording.recovering") >= calls.len(),
        "{}",
        h.worker.log_tail(40)
    );

    // The redeployed Worker takes new calls.
    let fresh = h
        .start_call(CallSpec {
            from: "+15551230615".into(),
            script: greeting_script(0x7a),
            ..CallSpec::default()
        })
        .await;
    greeting_played(h, &fresh).await;
    relays_both_ways(h, &fresh, 0x7b, "a call after the restart").await;
    fresh.twilio.send_stop(&fresh.ids);
    ok(h, fresh.openai.wait_closed(SOON).await);
}

// ---- 3. a restart while records are on their way to D1 ---------------------------------------------

/// How long the stalled Worker holds each D1 write of a call object's outbox.
const STALL: Duration = Duration::from_secs(15);

/// Records a call object moved to its storage and was copying to D1 when the Worker restarted
/// reach D1 all the same: an alarm was set as they were stored. A call whose end could not be
/// kept at once (a write of its records held longer than the outbox waits) is not marked
/// ended before it is, so the restart does not leave its row in progress.
#[tokio::test(flavor = "multi_thread")]
async fn records_on_their_way_to_d1_at_a_restart_still_reach_it() {
    let (deployment, h) = redeployable(
        "e2e-resilience-stalled",
        vec![
            ("ADMIN_TOKEN".into(), ADMIN_TOKEN.into()),
            (
                "FAULT_INJECT_D1_STALL_MS".into(),
                STALL.as_millis().to_string(),
            ),
        ],
    )
    .await;
    let h = &h;
    let admin = Admin::new(&h.base_url(), ADMIN_TOKEN);

    // Q: a call that ends while its records are on their way to D1. Its object's first write
    // (the registration, from storage) is held; its row appears once that is through, and the
    // records of the stream's start, handed over meanwhile, then go straight to D1, held too.
    let q = h
        .start_call(CallSpec {
            from: "+15551230632".into(),
            script: greeting_script(0xa1),
            ..CallSpec::default()
        })
        .await;
    let q_sid = q.ids.call_sid.as_str();
    ok(
        h,
        admin
            .wait_call(q_sid, "Q's registration", D1_DEADLINE, |_| true)
            .await,
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The caller hangs up during that write: the call's end waits for it longer than the
    // outbox waits for a D1 write (8 s), and is not kept at once.
    let not_durable = count_in_log(h, "outbox.not_durable");
    q.twilio.send_stop(&q.ids);
    let deadline = Instant::now() + SOON;
    while count_in_log(h, "outbox.not_durable") == not_durable {
        assert!(
            Instant::now() < deadline,
            "Q's end was kept at once: no D1 write was held at the end of the call\n{}",
            h.worker.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // P: a call whose stream never connected. Its object keeps the registration, then Twilio's
    // final status, in its storage, and is copying them to D1 (held) when the Worker restarts.
    // Nothing else will ever wake that object: no stream, no watch.
    let p = CallIds::new();
    let (p_from, p_to) = ("+15551230631", "+81312345678");
    let registered_at = Instant::now();
    h.answer_call(&p, p_from, p_to).await;
    let r = h
        .post_status(&tw::status_params(
            &p,
            p_from,
            p_to,
            "completed",
            2,
            Some(7),
        ))
        .await;
    assert_eq!(r.status, 204, "{}", r.body);

    // The deploy, within the first write's hold.
    let reloads = count_in_log(h, "Local server updated and ready");
    let redeployed_at = Instant::now();
    deployment.redeploy().unwrap_or_else(|e| panic!("{e}"));
    let deadline = Instant::now() + SOON;
    while count_in_log(h, "Local server updated and ready") <= reloads {
        assert!(
            Instant::now() < deadline,
            "wrangler did not reload:\n{}",
            h.worker.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        registered_at.elapsed() < STALL,
        "the reload came {:?} after the call's first record, later than its D1 write was \
         held: nothing was in flight",
        registered_at.elapsed()
    );

    // Twilio's final status callback for Q, as it comes after the stream dropped.
    let r = h
        .post_status(&tw::status_params(
            &q.ids,
            &q.from,
            &q.to,
            "completed",
            2,
            Some(30),
        ))
        .await;
    assert_eq!(r.status, 204, "{}", r.body);

    // P's records reach D1: its row, and why the agent never served it.
    let detail = ok(
        h,
        admin
            .wait_call(
                &p.call_sid,
                "P's records, after the restart",
                D1_DEADLINE,
                |d| d["call"]["end_reason"] == "stream_never_connected",
            )
            .await,
    );
    eprintln!(
        "P in D1 {:.1}s after the restart",
        redeployed_at.elapsed().as_secs_f64()
    );
    assert_eq!(detail["call"]["status"], "failed", "{}", pretty(&detail));
    assert_eq!(
        detail["call"]["twilio_duration_s"],
        7,
        "{}",
        pretty(&detail)
    );
    assert_eq!(detail["call"]["from_number"], p_from, "{}", pretty(&detail));

    // Q's row ends: with its own end if that was kept before the restart, else as a call the
    // restart cut (its object still counted it as streaming). Not left in progress.
    let detail = ok(
        h,
        admin
            .wait_call(q_sid, "Q's end, after the restart", D1_DEADLINE, |d| {
                d["call"]["end_reason"].is_string()
                    && d["call"]["ended_at"].is_string()
                    && d["call"]["twilio_duration_s"] == 30
            })
            .await,
    );
    eprintln!(
        "Q ended in D1 {:.1}s after the restart: {}",
        redeployed_at.elapsed().as_secs_f64(),
        detail["call"]["end_reason"]
    );
    let end = detail["call"]["end_reason"].as_str().unwrap();
    assert!(
        ["bridge_restarted", "twilio_stop"].contains(&end),
        "{}",
        pretty(&detail)
    );
}

// ---- 4. a call object whose storage refuses its records ----------------------------------------

/// Writes of a call object's records to its own storage that fail after the deploy below: all
/// of them, for as long as the test needs.
const REFUSED_WRITES: &str = "1000000";

/// Deploys `deployment` again with the test hook `FAULT_INJECT_STORAGE_FAILURES` set (`on`) or
/// not, and waits for wrangler to restart the Worker with it.
async fn redeploy_refusing_storage(h: &Harness, deployment: &Deployment, on: bool) {
    let line = format!("FAULT_INJECT_STORAGE_FAILURES = \"{REFUSED_WRITES}\"\n");
    let reloads = count_in_log(h, "Local server updated and ready");
    deployment
        .edit_config(|t| {
            if on {
                assert!(t.contains("\n[vars]\n"), "wrangler.toml has no [vars]");
                t.replacen("\n[vars]\n", &format!("\n[vars]\n{line}"), 1)
            } else {
                assert!(t.contains(&line), "the hook is not in wrangler.toml");
                t.replacen(&line, "", 1)
            }
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let deadline = Instant::now() + SOON;
    while count_in_log(h, "Local server updated and ready") <= reloads {
        assert!(
            Instant::now() < deadline,
            "wrangler did not reload:\n{}",
            h.worker.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits for `needle` to be logged more than `since` times: the object could not keep `what`
/// (wrangler prints a request's log lines after its answer).
async fn logged_again(h: &Harness, needle: &str, since: usize, what: &str) {
    let deadline = Instant::now() + SOON;
    while count_in_log(h, needle) <= since {
        assert!(
            Instant::now() < deadline,
            "no {needle}: {what} was kept, the object's storage did not refuse it\n{}",
            h.worker.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// After a deploy, the call objects' storage refuses their records for a while (the test hook
/// `FAULT_INJECT_STORAGE_FAILURES`, set by that deploy); another deploy ends it. What a call
/// object decides meanwhile is not lost, and its answers do not change: the replayed stream of
/// a call the deploy cut is refused as gone (410), as for any ended call, although its end
/// cannot be kept yet; once storage takes records again, the call reads `bridge_restarted`.
/// Twilio's final status for a call whose stream never connected, which Twilio sends once,
/// comes meanwhile, while D1 fails too: that call reads `stream_never_connected` all the same
/// once storage and D1 take records again, and refuses a late stream.
#[tokio::test(flavor = "multi_thread")]
async fn what_a_call_object_decides_while_its_storage_refuses_records_is_not_lost() {
    let (deployment, h) = redeployable(
        "e2e-resilience-refusing",
        vec![("ADMIN_TOKEN".into(), ADMIN_TOKEN.into())],
    )
    .await;
    let h = &h;
    let admin = Admin::new(&h.base_url(), ADMIN_TOKEN);

    // S: a call streaming when the deploy comes.
    let s = h
        .start_call(CallSpec {
            from: "+15551230641".into(),
            script: greeting_script(0xb1),
            ..CallSpec::default()
        })
        .await;
    greeting_played(h, &s).await;
    let s_sid = s.ids.call_sid.as_str();
    ok(
        h,
        admin
            .wait_call(s_sid, "S connected", D1_DEADLINE, |d| {
                d["call"]["connected_at"].is_string()
            })
            .await,
    );

    // P: a call handed to its agent whose stream never connects.
    let p = CallIds::new();
    let (p_from, p_to) = ("+15551230642", "+81312345678");
    let p_twiml = h.answer_call(&p, p_from, p_to).await;
    ok(
        h,
        admin
            .wait_call(&p.call_sid, "P's registration", D1_DEADLINE, |_| true)
            .await,
    );

    // D1 fails too, until storage takes records again: what the objects could not keep then
    // is held only in their memory, which the second deploy wipes.
    let lock = D1Lock::take(h);
    redeploy_refusing_storage(h, &deployment, true).await;
    ok(
        h,
        s.twilio
            .wait_until("the deploy to drop S's socket", SOON, |l| l.closed.clone())
            .await,
    );

    // Twilio's final status for P, which it sends once: P's object puts why the agent never
    // served the call on record, but can keep that neither in D1 nor in its outbox now.
    let cleanup_failures = count_in_log(h, "call.status_cleanup_failed");
    let r = h
        .post_status(&tw::status_params(
            &p,
            p_from,
            p_to,
            "completed",
            2,
            Some(7),
        ))
        .await;
    eprintln!("P's final status answered {}", r.status);
    logged_again(h, "call.status_cleanup_failed", cleanup_failures, "P's end").await;

    // S's stream again: the call is over, and the answer says so, although its object could
    // not keep the call's end.
    let cleanup_failures = count_in_log(h, "call.stream_cleanup_failed");
    let claim = h.openai.claim(greeting_script(0xb2)).await;
    let (status, body) = refused_status(
        "a stream again for a call the deploy cut",
        connect_again(&s.twiml).await,
    );
    assert_eq!(status, 410, "{body}\n{}", h.worker.log_tail(40));
    ok(h, claim.expect_no_connection(QUIET).await);
    drop(claim);
    logged_again(h, "call.stream_cleanup_failed", cleanup_failures, "S's end").await;

    // Storage takes records again, and D1 too: P's and S's ends are kept, by their objects'
    // alarms.
    redeploy_refusing_storage(h, &deployment, false).await;
    lock.release();
    let detail = ok(
        h,
        admin
            .wait_call(&p.call_sid, "P's end", D1_DEADLINE, |d| {
                d["call"]["end_reason"] == "stream_never_connected"
            })
            .await,
    );
    assert_eq!(detail["call"]["status"], "failed", "{}", pretty(&detail));
    assert_eq!(
        detail["call"]["end_detail"],
        "Twilio reported the call completed after 7 s and its Media Stream never connected",
        "{}",
        pretty(&detail)
    );
    // And P's object took it for over from Twilio's word on: a late stream is refused.
    let claim = h.openai.claim(greeting_script(0xb3)).await;
    let (status, body) = refused_status(
        "a late stream for a call Twilio reported over",
        connect_again(&p_twiml).await,
    );
    assert_eq!(status, 410, "{body}");
    ok(h, claim.expect_no_connection(QUIET).await);
    drop(claim);
    let detail = ok(
        h,
        admin
            .wait_call(s_sid, "S finalized", WATCH_DEADLINE, |d| {
                d["call"]["end_reason"] == "bridge_restarted" && d["call"]["ended_at"].is_string()
            })
            .await,
    );
    assert_eq!(detail["call"]["status"], "failed", "{}", pretty(&detail));
}

/// An upgrade deployed before its migration was applied (a plain `npx wrangler deploy` after
/// a change to `migrations/`): the Worker writes a column the database does not have yet
/// (0007's transcription usage, in each call's end). D1 refuses the call's end; the call's
/// object keeps it and tries again, and once the migration is applied it lands, whole: late,
/// not lost.
#[tokio::test(flavor = "multi_thread")]
async fn a_call_s_end_written_before_its_migration_was_applied_lands_once_it_is() {
    let scratch = support::scratch_dir("e2e-resilience-unmigrated");
    let deployment = Deployment::copy_of(&support::repo_root(), &scratch.join("app"))
        .unwrap_or_else(|e| panic!("{e}"));
    // The copy's migrations (a link to the repository's): all but the one the Worker needs.
    let migrations = deployment.dir.join("migrations");
    std::fs::remove_file(&migrations).unwrap();
    std::fs::create_dir(&migrations).unwrap();
    let mut shipped: Vec<std::path::PathBuf> =
        std::fs::read_dir(support::repo_root().join("migrations"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "sql"))
            .collect();
    shipped.sort();
    let needed = shipped
        .iter()
        .find(|p| p.to_string_lossy().contains("transcription_usage"))
        .expect("the migration of the transcription usage")
        .clone();
    for m in shipped.iter().filter(|m| **m != needed) {
        std::fs::copy(m, migrations.join(m.file_name().unwrap())).unwrap();
    }
    let h = Harness::start_from(
        scratch.clone(),
        deployment.dir.clone(),
        vec![("ADMIN_TOKEN".into(), ADMIN_TOKEN.into())],
    )
    .await
    .unwrap_or_else(|e| panic!("the Worker did not start:\n{e}"));
    let h = &h;
    let admin = Admin::new(&h.base_url(), ADMIN_TOKEN);

    // The call's turns land (they write nothing new); its end is refused by the old schema.
    let said = converse(h, &admin, "+15551230621", 0xa1).await;
    let sid = said.call.ids.call_sid.clone();
    said.call.twilio.send_stop(&said.call.ids);
    h.worker
        .wait_for_line("the end refused by the schema without the column", |l| {
            l.contains("outbox.d1_write_failed") && l.contains(&sid) && l.contains("no such column")
        })
        .await;
    let r = admin.get(&format!("/api/admin/calls/{sid}")).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.body["call"]["end_reason"].is_null(), "{}", r.text);
    assert_eq!(r.body["transcript"].as_array().map(Vec::len), Some(3));

    // The migration, applied while the Worker runs, as it would be after the deploy. The
    // Worker may hold the database's lock for a moment (SQLITE_BUSY): then again.
    std::fs::copy(&needed, migrations.join(needed.file_name().unwrap())).unwrap();
    let mut tries = 0;
    loop {
        tries += 1;
        match support::worker::apply_migrations(
            &deployment.dir,
            &scratch.join("state"),
            &scratch.join("migrations-after.log"),
        ) {
            Ok(()) => break,
            Err(e) if e.contains("SQLITE_BUSY") && tries < 10 => {
                tokio::time::sleep(Duration::from_millis(500)).await
            }
            Err(e) => panic!("{e}"),
        }
    }

    // The end the object kept lands, with the transcription's usage it was refused for.
    let detail = ok(
        h,
        admin
            .wait_call(
                &sid,
                "the end, once the column is there",
                D1_DEADLINE,
                |d| d["call"]["end_reason"].is_string(),
            )
            .await,
    );
    let call = &detail["call"];
    assert_eq!(call["end_reason"], "twilio_stop", "{}", pretty(call));
    assert_eq!(call["transcription_input_tokens"], 17, "{}", pretty(call));
    assert_eq!(call["transcription_output_tokens"], 9, "{}", pretty(call));
    assert_eq!(detail["transcript"], said.before["transcript"]);
}
