//! End-to-end tests of the OpenAI side failing (issue 5): the connection refused, HTTP 401 and
//! 429 on the upgrade, the session closed mid-call, `error` events and `session_expired`. Each
//! is a real call through the Worker in `wrangler dev`: the fake Twilio (media stream), the
//! fake OpenAI Realtime server (which refuses upgrades, closes sessions and sends errors on
//! cue) and a fake Twilio REST API where the Worker redirects the call.
//!
//! What must hold in every case: the caller is never left in silence. When the session cannot
//! start, or is lost and cannot be replaced within a few seconds, the Worker redirects the
//! call through Twilio REST to the fallback TwiML (the Japanese apology, then the fallback
//! number), and the call's row says it failed and why. The fake Twilio then does what Twilio
//! does once a redirect takes hold: it sends `stop` and closes the stream.
//!
//! Two Workers: the main one, and one whose `OPENAI_REALTIME_URL` points at a port where
//! nothing listens (connection refused).

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::admin::{events_of, Admin};
use support::fake_openai::{self as oai, SessionScript};
use support::fake_twilio::{CallIds, MediaStream};
use support::fake_twilio_rest::{Answer, FakeTwilioRest, RestRequest};
use support::worker::Deployment;
use support::{ok, shared_harness, tagged_chunks, CallSpec, Harness, SOON};

const ADMIN_TOKEN: &str = "admin-e2e-failures-SECRET-987";
use support::fake_twilio_rest::ACCOUNT_SID;
const FALLBACK_MESSAGE: &str = "申し訳ございません。ただいま電話に出ることができません。";
const FALLBACK_NUMBER: &str = "+81300001111";
/// D1 writes are asynchronous (the call object's outbox): be generous.
const D1_DEADLINE: Duration = Duration::from_secs(90);

/// The apology, then the fallback number: with `<Dial action>` (the transfer-result URL
/// on `h`'s Worker) when the request was verified, so that a person who does not answer is
/// handled as in a transfer; without it for one that was not (its result would be refused).
fn fallback_twiml(h: Option<&Harness>) -> String {
    let dial = match h {
        Some(h) => format!(
            "<Dial action=\"{}/api/twilio/transfer-result\" method=\"POST\">",
            h.worker.base_url()
        ),
        None => "<Dial>".to_owned(),
    };
    format!(
        "<Response><Say language=\"ja-JP\" voice=\"Polly.Mizuki\">{FALLBACK_MESSAGE}</Say>\
         {dial}{FALLBACK_NUMBER}</Dial></Response>"
    )
}

fn rest() -> &'static FakeTwilioRest {
    support::fake_twilio_rest::shared()
}

fn vars() -> Vec<(String, String)> {
    vec![
        ("ADMIN_TOKEN".into(), ADMIN_TOKEN.into()),
        ("TWILIO_API_BASE_URL".into(), rest().base_url()),
        ("TWILIO_ACCOUNT_SID".into(), ACCOUNT_SID.into()),
        ("FALLBACK_MESSAGE".into(), FALLBACK_MESSAGE.into()),
        ("FALLBACK_DIAL_NUMBER".into(), FALLBACK_NUMBER.into()),
    ]
}

async fn harness() -> &'static Harness {
    static HARNESS: tokio::sync::OnceCell<Result<Harness, String>> =
        tokio::sync::OnceCell::const_new();
    shared_harness(&HARNESS, "e2e-failures", vars).await
}

/// The Worker whose Realtime URL is a port nobody listens on.
async fn refused_harness() -> &'static Harness {
    static HARNESS: tokio::sync::OnceCell<Result<Harness, String>> =
        tokio::sync::OnceCell::const_new();
    shared_harness(&HARNESS, "e2e-failures-refused", || {
        let dead = support::worker::free_port();
        let mut v = vars();
        v.push((
            "OPENAI_REALTIME_URL".into(),
            format!("ws://127.0.0.1:{dead}/v1/realtime"),
        ));
        v
    })
    .await
}

/// Webhook, media stream, `connected` and `start`, with `script` claimed for the OpenAI side
/// (the claim is returned so that a refusing script keeps refusing the retries).
async fn open_call(
    h: &Harness,
    script: SessionScript,
) -> (CallIds, MediaStream, support::fake_openai::Claim) {
    let ids = CallIds::new();
    let twiml = h.answer_call(&ids, "+819012340000", "+81501234000").await;
    let claim = h.openai.claim(script).await;
    let twilio = h.open_stream(&twiml).await;
    twilio.send_connected();
    twilio.send_start(&ids, &twiml.parameters);
    (ids, twilio, claim)
}

/// The redirect to the fallback TwiML arrives at the fake REST API; once it is answered, the
/// fake Twilio stops and closes the stream as Twilio does. Returns the request.
async fn expect_redirect(h: &Harness, ids: &CallIds, twilio: &MediaStream) -> RestRequest {
    let sid = ids.call_sid.as_str();
    let req = ok(
        h,
        rest()
            .wait_for(sid, "the redirect, answered", SOON, |r| {
                r.first().filter(|r| r.answered.is_some()).cloned()
            })
            .await,
    );
    assert_eq!(req.method, "POST");
    assert_eq!(
        req.path,
        format!("/2010-04-01/Accounts/{}/Calls/{sid}.json", ids.account_sid)
    );
    assert_eq!(
        req.basic_auth(),
        Some((
            ACCOUNT_SID.to_owned(),
            support::TWILIO_AUTH_TOKEN.to_owned()
        ))
    );
    assert_eq!(req.form, [("Twiml".to_owned(), fallback_twiml(Some(h)))]);
    assert!(
        twilio.log().closed.is_none(),
        "the stream stays up until the redirect takes hold"
    );
    twilio.send_stop(ids);
    twilio.close();
    req
}

fn admin(h: &Harness) -> Admin {
    Admin::new(&h.base_url(), ADMIN_TOKEN)
}

/// Waits for the call's row to be finalized, then checks it failed with `reason` and
/// `detail` (when given), and that the redirect is in its event log.
async fn expect_failed(h: &Harness, ids: &CallIds, reason: &str, detail: Option<&str>) -> Value {
    let sid = ids.call_sid.as_str();
    let d = ok(
        h,
        admin(h)
            .wait_call(sid, "the failed call's final row", D1_DEADLINE, |d| {
                d["call"]["ended_at"].is_string() && !events_of(d, "fallback_redirect").is_empty()
            })
            .await,
    );
    let call = &d["call"];
    assert_eq!(call["status"], "failed", "{call}");
    assert_eq!(call["end_reason"], reason, "{call}");
    if let Some(detail) = detail {
        assert_eq!(call["end_detail"], detail, "{call}");
    }
    let fallback = &events_of(&d, "fallback")[0]["detail"];
    assert_eq!(fallback["reason"], reason, "{fallback}");
    // Twilio's `stop` may reach the Worker before its answer to the redirect does.
    let redirect = &events_of(&d, "fallback_redirect")[0]["detail"];
    assert!(
        (redirect["ok"] == true && redirect["twilio"] == 200)
            || redirect["twilio"] == "stream ended before the REST answer",
        "{redirect}"
    );
    d
}

/// The call's detail once its row says it ended.
async fn wait_ended(h: &Harness, sid: &str) -> Value {
    ok(
        h,
        admin(h)
            .wait_call(sid, "the end", D1_DEADLINE, |d| {
                d["call"]["ended_at"].is_string()
            })
            .await,
    )
}

fn reconnects(d: &Value) -> usize {
    events_of(d, "reconnect").len()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_connection_is_retried_then_the_caller_is_redirected_to_the_fallback() {
    let h = refused_harness().await;
    let (ids, twilio, _claim) = open_call(h, SessionScript::new()).await;
    let t0 = Instant::now();
    let req = expect_redirect(h, &ids, &twilio).await;
    let d = expect_failed(h, &ids, "openai_connect_failed", None).await;
    let detail = d["call"]["end_detail"].as_str().unwrap_or_default();
    assert!(detail.starts_with("connect: "), "{detail}");
    eprintln!(
        "[e2e] refused: redirect {:?} after start; detail {detail:?}",
        req.at.duration_since(t0)
    );
    assert_eq!(reconnects(&d), 3, "every attempt was made");
    assert_eq!(h.openai.connection_count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn http_401_on_the_upgrade_is_not_retried_and_the_caller_gets_the_fallback_at_once() {
    let h = harness().await;
    let (ids, twilio, claim) = open_call(h, SessionScript::new().refuse_upgrades(401)).await;
    expect_redirect(h, &ids, &twilio).await;
    let d = expect_failed(
        h,
        &ids,
        "openai_connect_failed",
        Some("HTTP 401 on upgrade"),
    )
    .await;
    assert_eq!(reconnects(&d), 0, "a refused key is not tried again");
    assert_eq!(claim.refused(), 1);
    // Neither the key OpenAI refused nor Twilio's token (in the redirect's Basic auth) is
    // written anywhere.
    h.assert_log_clean(&[
        support::OPENAI_API_KEY,
        support::TWILIO_AUTH_TOKEN,
        ADMIN_TOKEN,
    ]);
}

#[tokio::test(flavor = "multi_thread")]
async fn http_429_on_the_upgrade_is_retried_with_pauses_then_the_caller_gets_the_fallback() {
    let h = harness().await;
    // Before the stream: its first connect is made as the stream is accepted.
    let t0 = Instant::now();
    let (ids, twilio, claim) = open_call(h, SessionScript::new().refuse_upgrades(429)).await;
    let req = expect_redirect(h, &ids, &twilio).await;
    let d = expect_failed(
        h,
        &ids,
        "openai_connect_failed",
        Some("HTTP 429 on upgrade"),
    )
    .await;
    assert_eq!(reconnects(&d), 3);
    assert_eq!(claim.refused(), 4, "the first attempt and three more");
    // The pauses between attempts add up to 2 s (a lower bound: timers never fire early).
    assert!(
        req.at.duration_since(t0) >= Duration::from_millis(2000),
        "{:?}",
        req.at.duration_since(t0)
    );
}

/// One tagged caller frame goes out on the stream and arrives at the fake OpenAI.
async fn relay_caller_frame(h: &Harness, call: &support::Call, tag: u8) {
    let frame = &tagged_chunks(tag, 1, 160)[0];
    let payload = call.twilio.send_media(frame);
    ok(
        h,
        call.openai
            .wait_until("the caller frame relayed", SOON, |s| {
                s.received
                    .iter()
                    .any(|e| e.event["audio"] == payload.as_str())
                    .then_some(())
            })
            .await,
    );
}

/// A live call: the greeting asked for, and caller audio relayed.
async fn live_call(h: &Harness) -> support::Call {
    let call = h.start_call(CallSpec::default()).await;
    ok(h, call.openai.wait_event("response.create", SOON).await);
    relay_caller_frame(h, &call, 0x51).await;
    call
}

/// A live call, then an outage: every new session is refused with 503 while the claim holds.
async fn live_call_then_outage(h: &Harness) -> (support::Call, support::fake_openai::Claim) {
    let call = live_call(h).await;
    let claim = h
        .openai
        .claim(SessionScript::new().refuse_upgrades(503))
        .await;
    (call, claim)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_closed_mid_call_that_cannot_be_replaced_sends_the_caller_to_the_fallback() {
    let h = harness().await;
    let (call, claim) = live_call_then_outage(h).await;
    call.openai.close_with(1011, "server_error");
    expect_redirect(h, &call.ids, &call.twilio).await;
    let d = expect_failed(
        h,
        &call.ids,
        "openai_closed",
        Some("closed with code 1011: server_error"),
    )
    .await;
    assert_eq!(reconnects(&d), 3);
    assert!(claim.refused() >= 3, "{}", claim.refused());
    let fallback = &events_of(&d, "fallback")[0]["detail"];
    assert_eq!(
        fallback["last_failure"], "HTTP 503 on upgrade",
        "{fallback}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_error_event_mid_call_is_recorded_and_the_call_goes_on() {
    let h = harness().await;
    let call = live_call(h).await;
    call.openai.send(json!({
        "type": "error",
        "event_id": "event_srv_1",
        "error": {"type": "invalid_request_error", "code": "invalid_value",
                  "message": "Invalid value: 'x'.", "param": "item.content", "event_id": null}
    }));
    // Audio still flows both ways afterwards.
    relay_caller_frame(h, &call, 0x52).await;
    let agent = tagged_chunks(0x53, 1, 160).remove(0);
    call.openai
        .send_all(oai::response_start("resp_after", "item_after"));
    call.openai
        .send(oai::audio_delta("resp_after", "item_after", &agent));
    ok(
        h,
        call.twilio
            .wait_until("agent audio after the error", SOON, |l| {
                l.media_bytes().ends_with(&agent).then_some(())
            })
            .await,
    );
    let sid = call.ids.call_sid.as_str();
    let d = ok(
        h,
        admin(h)
            .wait_call(sid, "the openai_error event", D1_DEADLINE, |d| {
                !events_of(d, "openai_error").is_empty()
            })
            .await,
    );
    let e = &events_of(&d, "openai_error")[0]["detail"];
    assert_eq!(e["code"], "invalid_value", "{e}");
    assert!(events_of(&d, "fallback").is_empty());
    assert!(rest().requests_for(sid).is_empty(), "no redirect");
    call.twilio.send_stop(&call.ids);
    let d = wait_ended(h, sid).await;
    assert_eq!(d["call"]["end_reason"], "twilio_stop");
    assert_ne!(d["call"]["status"], "failed");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_error_rejecting_the_session_update_sends_the_caller_to_the_fallback_without_retrying() {
    let h = harness().await;
    let script = SessionScript::new()
        .without_session_updated()
        .on("session.update", |ev| {
            vec![json!({
                "type": "error",
                "event_id": "event_srv_2",
                "error": {"type": "invalid_request_error", "code": "unknown_parameter",
                          "message": "Unknown parameter: 'session.voice'.",
                          "param": "session.voice", "event_id": ev["event_id"]}
            })]
        });
    let (ids, twilio, claim) = open_call(h, script).await;
    ok(h, claim.session(SOON).await);
    expect_redirect(h, &ids, &twilio).await;
    let d = expect_failed(
        h,
        &ids,
        "openai_session_rejected",
        Some("unknown_parameter"),
    )
    .await;
    assert_eq!(reconnects(&d), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_greeting_failing_for_want_of_quota_sends_the_caller_to_the_fallback() {
    let h = harness().await;
    // The session is up, but every response fails: the organisation is out of quota.
    let script = SessionScript::new().on("response.create", |_| {
        oai::response_failed("resp_quota", "insufficient_quota")
    });
    let (ids, twilio, claim) = open_call(h, script).await;
    let oa = ok(h, claim.session(SOON).await);
    ok(h, oa.wait_event("response.create", SOON).await);
    expect_redirect(h, &ids, &twilio).await;
    let d = expect_failed(
        h,
        &ids,
        "openai_response_failed",
        Some("insufficient_quota"),
    )
    .await;
    assert_eq!(reconnects(&d), 0);
    let failed = &events_of(&d, "response_failed")[0]["detail"];
    assert_eq!(failed["code"], "insufficient_quota", "{failed}");
    assert_eq!(failed["then"], "fallback", "{failed}");
    assert_eq!(
        oa.received_of_type("response.create").len(),
        1,
        "not asked again: it would fail the same way"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn session_expired_that_cannot_be_renewed_sends_the_caller_to_the_fallback() {
    let h = harness().await;
    let (call, claim) = live_call_then_outage(h).await;
    call.openai.send(json!({
        "type": "error",
        "event_id": "event_srv_3",
        "error": {"type": "invalid_request_error", "code": "session_expired",
                  "message": "Your session hit the maximum duration of 60 minutes.",
                  "param": null, "event_id": null}
    }));
    expect_redirect(h, &call.ids, &call.twilio).await;
    let d = expect_failed(
        h,
        &call.ids,
        "openai_closed",
        Some("closed with code 1000: session_expired"),
    )
    .await;
    assert_eq!(reconnects(&d), 3);
    assert!(claim.refused() >= 3);
    let e = &events_of(&d, "openai_error")[0]["detail"];
    assert_eq!(e["code"], "session_expired", "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redirect_twilio_refuses_closes_the_stream_so_the_twiml_after_connect_plays() {
    let h = harness().await;
    let ids = CallIds::new();
    rest().set_answer(
        &ids.call_sid,
        Answer {
            status: 500,
            delay: Duration::ZERO,
        },
    );
    let twiml = h.answer_call(&ids, "+819012340001", "+81501234001").await;
    let _claim = h
        .openai
        .claim(SessionScript::new().refuse_upgrades(401))
        .await;
    let twilio = h.open_stream(&twiml).await;
    twilio.send_connected();
    twilio.send_start(&ids, &twiml.parameters);
    let closed = ok(
        h,
        twilio
            .wait_until("the Worker to close the stream", SOON, |l| l.closed.clone())
            .await,
    );
    eprintln!(
        "[e2e] refused redirect: stream closed with {:?}",
        closed.close_frame
    );
    assert_eq!(
        closed.close_frame.as_ref().map(|(code, _)| *code),
        Some(1011),
        "{closed:?}"
    );
    let sid = ids.call_sid.as_str();
    let d = wait_ended(h, sid).await;
    assert_eq!(d["call"]["status"], "failed");
    assert_eq!(d["call"]["end_reason"], "openai_connect_failed");
    let redirect = &events_of(&d, "fallback_redirect")[0]["detail"];
    assert_eq!(redirect["ok"], false, "{redirect}");
    assert_eq!(redirect["twilio"], 500, "{redirect}");
    // What Twilio then runs: the fallback after </Connect>.
    assert!(
        twiml.element_paths.iter().any(|p| p == "Response/Say")
            && twiml.element_paths.iter().any(|p| p == "Response/Dial"),
        "{:?}",
        twiml.element_paths
    );
}

/// A misconfigured setting (a voice name Twilio cannot read, a number written the domestic
/// way, an idle timeout out of range, an unknown log level, a base URL without its scheme)
/// must not take every call down with a 500 ("application error" at Twilio): calls are
/// answered, each such setting keeps its default (the number is left out), and the log says
/// what was set aside.
#[tokio::test(flavor = "multi_thread")]
async fn a_bad_setting_is_set_aside_and_calls_are_still_answered() {
    static HARNESS: tokio::sync::OnceCell<Result<Harness, String>> =
        tokio::sync::OnceCell::const_new();
    let h = shared_harness(&HARNESS, "e2e-failures-bad-fallback", || {
        let mut v = vars();
        v.retain(|(k, _)| k != "FALLBACK_DIAL_NUMBER");
        v.push(("FALLBACK_DIAL_NUMBER".into(), "03-1234-5678".into()));
        v.push(("FALLBACK_VOICE".into(), "Polly.Mizuki\" loop=\"9".into()));
        v.push(("IDLE_TIMEOUT_SECONDS".into(), "2".into()));
        v.push(("LOG_LEVEL".into(), "loud".into()));
        v.push(("PUBLIC_BASE_URL".into(), "phone.example.jp".into()));
        v
    })
    .await;
    let ids = CallIds::new();
    let twiml = h.answer_call(&ids, "+819012340009", "+81501234009").await;
    assert!(
        twiml.stream_url.contains("/api/twilio/media-stream/"),
        "the call goes to the agent: {twiml:?}"
    );
    assert!(twiml.dials.is_empty(), "no number to dial: {twiml:?}");
    // The stream is at the request's own origin, and its signed upgrade is accepted.
    let origin = h.base_url().replacen("http", "ws", 1);
    assert!(twiml.stream_url.starts_with(&origin), "{twiml:?}");
    drop(h.open_stream(&twiml).await);
    assert_eq!(
        twiml
            .says
            .iter()
            .map(|(_, v)| v.as_deref())
            .collect::<Vec<_>>(),
        [Some("Polly.Mizuki")],
        "{twiml:?}"
    );
    // wrangler prints the Worker's console after the response has gone.
    for field in [
        "FALLBACK_VOICE",
        "FALLBACK_DIAL_NUMBER",
        "IDLE_TIMEOUT_SECONDS",
        "LOG_LEVEL",
        "PUBLIC_BASE_URL",
    ] {
        let logged = || {
            h.worker
                .log()
                .lines()
                .any(|l| l.contains("config.ignored") && l.contains(field))
        };
        let deadline = std::time::Instant::now() + SOON;
        while !logged() {
            assert!(
                std::time::Instant::now() < deadline,
                "no config.ignored for {field}:\n{}",
                h.worker.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// wrangler binds a `[vars]` value written without quotes (`FALLBACK_ONLY = true`) as a
/// boolean or number, which the Worker would otherwise take for unset: it is read as written.
#[tokio::test(flavor = "multi_thread")]
async fn a_setting_written_without_quotes_is_read_as_written() {
    let scratch = support::scratch_dir("e2e-failures-unquoted");
    let deployment = Deployment::copy_of(&support::repo_root(), &scratch.join("app"))
        .unwrap_or_else(|e| panic!("{e}"));
    deployment
        .edit_config(|t| {
            let mut t = t;
            for (quoted, bare) in [
                ("FALLBACK_ONLY = \"false\"", "FALLBACK_ONLY = true"),
                ("IDLE_TIMEOUT_SECONDS = \"30\"", "IDLE_TIMEOUT_SECONDS = 45"),
            ] {
                assert!(t.contains(quoted), "wrangler.toml lost {quoted}");
                t = t.replace(quoted, bare);
            }
            t
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let h = Harness::start_from(scratch.clone(), deployment.dir.clone(), vars())
        .await
        .unwrap_or_else(|e| panic!("the Worker did not start:\n{e}"));
    // The fallback's TwiML (no <Stream>), which the harness's answer_call does not expect.
    let ids = CallIds::new();
    let params = support::fake_twilio::voice_params(&ids, "+819012340010", "+81501234010");
    let url = h.voice_url();
    let sig = support::fake_twilio::sign(support::TWILIO_AUTH_TOKEN, &url, &params);
    let reply = support::fake_twilio::post_form(&url, &params, Some(&sig))
        .await
        .unwrap_or_else(|e| panic!("voice webhook: {e}"));
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(
        !reply.body.contains("<Stream"),
        "FALLBACK_ONLY = true: no agent, no stream: {}",
        reply.body
    );
    assert!(
        reply.body.contains("<Say ")
            && reply
                .body
                .contains(&format!("method=\"POST\">{FALLBACK_NUMBER}</Dial>")),
        "the fallback message, then the number: {}",
        reply.body
    );
    // Nothing was set aside (the number read as 45, not as something else), once the
    // Worker's lines for this call are printed (wrangler prints them after the response).
    let deadline = Instant::now() + SOON;
    while !h.worker.log().contains(&ids.call_sid) {
        assert!(Instant::now() < deadline, "{}", h.worker.log_tail(30));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !h.worker.log().contains("config.ignored"),
        "{}",
        h.worker.log_tail(30)
    );
}

/// The `TWILIO_AUTH_TOKEN` of the Worker below: a rotation's new token, not yet promoted.
const NEW_TOKEN: &str = "twilio-e2e-new-SECRET-321";
/// Its `TWILIO_AUTH_TOKEN_SECONDARY`: the token being replaced, which Twilio signs with until
/// the new one is promoted.
const OLD_TOKEN: &str = "twilio-e2e-old-SECRET-654";

/// A Worker in the middle of a token rotation: neither of its tokens is
/// `support::TWILIO_AUTH_TOKEN`, what the harness's requests are signed with (as if the
/// secret had been taken from another account).
async fn rotating_harness() -> &'static Harness {
    static HARNESS: tokio::sync::OnceCell<Result<Harness, String>> =
        tokio::sync::OnceCell::const_new();
    shared_harness(&HARNESS, "e2e-failures-rotating", || {
        let mut v = vars();
        v.push(("TWILIO_AUTH_TOKEN".into(), NEW_TOKEN.into()));
        v.push(("TWILIO_AUTH_TOKEN_SECONDARY".into(), OLD_TOKEN.into()));
        v
    })
    .await
}

/// A voice webhook whose signature does not verify is answered with the fallback, not
/// refused: a refusal is Twilio's "an application error has occurred" and a hang-up, for
/// every caller while the token is wrong. Nothing it says is acted on: no stream, no row.
/// Status callbacks and transfer results, which change records, are still refused.
#[tokio::test(flavor = "multi_thread")]
async fn with_a_stale_auth_token_callers_hear_the_fallback_and_nothing_is_recorded() {
    use support::fake_twilio as tw;
    let h = rotating_harness().await;
    let ids = CallIds::new();
    let (from, to) = ("+819012340020", "+81501234020");
    let params = tw::voice_params(&ids, from, to);
    let url = h.voice_url();
    let sig = tw::sign(support::TWILIO_AUTH_TOKEN, &url, &params);
    let reply = tw::post_form(&url, &params, Some(&sig)).await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    let ct = reply.content_type.clone().unwrap_or_default();
    assert!(ct.starts_with("text/xml"), "{ct:?}");
    assert_eq!(
        reply.body,
        fallback_twiml(None),
        "the apology, then the number"
    );

    let status = tw::status_params(&ids, from, to, "completed", 1, Some(3));
    assert_eq!(h.post_status(&status).await.status, 403, "status callback");
    let mut result = params.clone();
    result.push(("DialCallStatus".into(), "completed".into()));
    assert_eq!(
        h.post_transfer_result(&result).await.status,
        403,
        "transfer result"
    );

    let (_, line) = h
        .worker
        .wait_for_line("twilio.voice_unverified", |l| {
            l.contains("twilio.voice_unverified") && l.contains(&ids.call_sid)
        })
        .await;
    assert!(line.contains(r#""level":"error""#), "{line}");
    assert!(
        line.contains(&format!(r#""checked_url":"{url}""#)),
        "{line}"
    );

    // No call was registered: a stream the Worker can verify finds no call.
    let stream = h.expected_stream_url(&ids.call_sid);
    match MediaStream::connect(&stream, Some(&tw::sign(NEW_TOKEN, &stream, &[]))).await {
        Err(tw::ConnectError::Refused { status, .. }) => assert_eq!(status, 404),
        other => panic!("expected 404, got {:?}", other.map(|_| "a stream")),
    }
    // And no row: a webhook the Worker can verify gets its row, the unverified one none.
    let verified = CallIds::new();
    let params = tw::voice_params(&verified, from, to);
    let sig = tw::sign(NEW_TOKEN, &url, &params);
    let reply = tw::post_form(&url, &params, Some(&sig)).await.unwrap();
    assert!(reply.body.contains("<Stream "), "{}", reply.body);
    ok(
        h,
        admin(h)
            .wait_call(
                &verified.call_sid,
                "the verified call's row",
                D1_DEADLINE,
                |_| true,
            )
            .await,
    );
    assert_eq!(admin(h).call(&ids.call_sid).await.unwrap(), None);
}

/// While a rotation is under way (the new token in `TWILIO_AUTH_TOKEN`, the one Twilio still
/// signs with in `TWILIO_AUTH_TOKEN_SECONDARY`), calls reach their agent: the webhook, the
/// stream's upgrade and the status callback all verify, and the log says the rotation is
/// not finished.
#[tokio::test(flavor = "multi_thread")]
async fn while_a_rotation_is_under_way_calls_signed_with_the_secondary_reach_their_agent() {
    use support::fake_twilio as tw;
    let h = rotating_harness().await;
    let ids = CallIds::new();
    let (from, to) = ("+819012340021", "+81501234021");
    let params = tw::voice_params(&ids, from, to);
    let url = h.voice_url();
    let sig = tw::sign(OLD_TOKEN, &url, &params);
    let reply = tw::post_form(&url, &params, Some(&sig)).await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    let twiml = tw::parse_twiml(&reply.body).unwrap_or_else(|e| panic!("{e}: {}", reply.body));
    assert_eq!(twiml.stream_url, h.expected_stream_url(&ids.call_sid));

    let claim = h.openai.claim(SessionScript::new()).await;
    let sig = tw::sign(OLD_TOKEN, &twiml.stream_url, &[]);
    let stream = MediaStream::connect(&twiml.stream_url, Some(&sig))
        .await
        .unwrap_or_else(|e| panic!("the upgrade signed with the secondary: {e:?}"));
    stream.send_connected();
    stream.send_start(&ids, &twiml.parameters);
    let session = ok(h, claim.session(SOON).await);
    stream.send_stop(&ids);
    ok(h, session.wait_closed(SOON).await);

    let status = tw::status_params(&ids, from, to, "completed", 2, Some(4));
    let sig = tw::sign(OLD_TOKEN, &h.status_url(), &status);
    let r = tw::post_form(&h.status_url(), &status, Some(&sig))
        .await
        .unwrap();
    assert_eq!(r.status, 204, "{}", r.body);
    let d = ok(
        h,
        admin(h)
            .wait_call(&ids.call_sid, "Twilio's final status", D1_DEADLINE, |d| {
                d["call"]["twilio_duration_s"] == 4
            })
            .await,
    );
    assert_eq!(d["call"]["end_reason"], "twilio_stop", "{d}");

    let (_, line) = h
        .worker
        .wait_for_line("twilio.secondary_token", |l| {
            l.contains("twilio.secondary_token") && l.contains(&ids.call_sid)
        })
        .await;
    assert!(line.contains(r#""level":"warn""#), "{line}");
    h.assert_log_clean(&[NEW_TOKEN, OLD_TOKEN]);
}
