//! End-to-end tests of call control (issue 4): tools the model calls, DTMF, time limits and
//! session renewal, each a real call through the Worker in `wrangler dev` between the fake
//! Twilio (media stream), the fake OpenAI Realtime server, a fake Twilio REST API
//! (`support::fake_twilio_rest`, where the Worker hangs up and transfers) and a local
//! webhook-tool server (`support::tool_server`).
//!
//! Two Workers are shared by the tests of this binary: the main one (idle timeout 600 s, so a
//! quiet moment on a slow machine never triggers a check-in) and one with
//! `IDLE_TIMEOUT_SECONDS=5` for the idle test. Both point `TWILIO_API_BASE_URL` at the one fake
//! REST server and set `TWILIO_ACCOUNT_SID`; each test uses its own agent, number and CallSid,
//! so the tests run in parallel.
//!
//! Order is checked on observed events, never on fixed times: a mark echoed by the fake
//! Twilio, a caller frame that came out at the fake OpenAI (proof that the Worker has handled
//! every Twilio frame before it), a request at a fake server, an event row in D1. The only
//! time checks are lower bounds (a timer cannot fire early; a slow machine only makes it late).

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::admin::{events_of, Admin};
use support::fake_openai::{self as oai, ClientEvent, Session, SessionScript};
use support::fake_twilio::{self as tw, CallIds, MediaStream};
use support::fake_twilio_rest::{Answer, FakeTwilioRest, RestRequest};
use support::tool_server::{expected_signature, Gate, ToolAnswer, ToolServer};
use support::{
    background_runtime, ok, shared_harness, tagged_chunks, Call, CallSpec, Harness, SOON,
};

/// The admin bearer token of the Workers under test.
const ADMIN_TOKEN: &str = "admin-e2e-tools-SECRET-654";
use support::fake_twilio_rest::ACCOUNT_SID;
/// D1 writes are asynchronous (the call object's outbox): be generous.
const D1_DEADLINE: Duration = Duration::from_secs(90);
const GREETING: &str = "お電話ありがとうございます。ご用件をどうぞ。";

// ---- the shared servers ---------------------------------------------------------------------------

fn rest() -> &'static FakeTwilioRest {
    support::fake_twilio_rest::shared()
}

fn vars(idle_timeout_seconds: u32) -> Vec<(String, String)> {
    vec![
        ("ADMIN_TOKEN".into(), ADMIN_TOKEN.into()),
        ("TWILIO_API_BASE_URL".into(), rest().base_url()),
        ("TWILIO_ACCOUNT_SID".into(), ACCOUNT_SID.into()),
        (
            "IDLE_TIMEOUT_SECONDS".into(),
            idle_timeout_seconds.to_string(),
        ),
    ]
}

async fn harness() -> &'static Harness {
    static HARNESS: tokio::sync::OnceCell<Result<Harness, String>> =
        tokio::sync::OnceCell::const_new();
    shared_harness(&HARNESS, "e2e-tools", || vars(600)).await
}

/// The Worker with `IDLE_TIMEOUT_SECONDS=5`.
async fn idle_harness() -> &'static Harness {
    static HARNESS: tokio::sync::OnceCell<Result<Harness, String>> =
        tokio::sync::OnceCell::const_new();
    shared_harness(&HARNESS, "e2e-tools-idle", || vars(5)).await
}

fn admin(h: &Harness) -> Admin {
    Admin::new(&h.base_url(), ADMIN_TOKEN)
}

/// Creates agent `id` (name, instructions and the fields of `extra`) and assigns `number` to it.
async fn agent_on_number(h: &Harness, id: &str, number: &str, extra: Value) {
    let mut body = json!({
        "id": id,
        "name": format!("e2e {id}"),
        "instructions": "電話受付です。丁寧に対応してください。",
    });
    for (k, v) in extra.as_object().expect("extra fields") {
        body[k] = v.clone();
    }
    let a = admin(h);
    let r = ok(h, a.post("/api/admin/agents", &body).await);
    assert_eq!(r.status, 201, "create agent {id}: {}", r.text);
    let path = format!("/api/admin/numbers/%2B{}", number.trim_start_matches('+'));
    let r = ok(h, a.put(&path, &json!({ "agent_id": id })).await);
    assert_eq!(r.status, 201, "assign {number} to {id}: {}", r.text);
}

// ---- OpenAI-side helpers ----------------------------------------------------------------------------

/// A session that answers the greeting's `response.create` with a 200 ms greeting
/// (two 100 ms chunks). Created items are confirmed by the fake itself, as by the real API.
fn greeting_script() -> SessionScript {
    SessionScript::new().once(
        "response.create",
        oai::full_response(
            "resp_greet",
            "item_greet",
            &tagged_chunks(0x31, 2, 800),
            GREETING,
        ),
    )
}

fn function_call_item(item_id: &str, call_id: &str, name: &str, args: &str, status: &str) -> Value {
    json!({
        "id": item_id, "object": "realtime.item", "type": "function_call", "status": status,
        "call_id": call_id, "name": name, "arguments": args,
    })
}

/// A response in which the model calls `name`: `response.created`, the function call item
/// (added, argument delta, `response.function_call_arguments.done`, item done). The response
/// stays active until [`function_call_response_done`].
fn function_call_response(
    resp: &str,
    item: &str,
    call_id: &str,
    name: &str,
    args: &str,
) -> Vec<Value> {
    let created = oai::response_start(resp, item).remove(0);
    let fc = |status, a| function_call_item(item, call_id, name, a, status);
    vec![
        created,
        json!({"type": "response.output_item.added", "response_id": resp, "output_index": 0,
               "item": fc("in_progress", "")}),
        json!({"type": "conversation.item.added", "previous_item_id": null,
               "item": fc("in_progress", "")}),
        json!({"type": "response.function_call_arguments.delta", "response_id": resp,
               "item_id": item, "output_index": 0, "call_id": call_id, "delta": args}),
        json!({"type": "response.function_call_arguments.done", "response_id": resp,
               "item_id": item, "output_index": 0, "call_id": call_id, "name": name,
               "arguments": args}),
        json!({"type": "response.output_item.done", "response_id": resp, "output_index": 0,
               "item": fc("completed", args)}),
        json!({"type": "conversation.item.done", "previous_item_id": null,
               "item": fc("completed", args)}),
    ]
}

/// The `response.done` that closes a [`function_call_response`].
fn function_call_response_done(
    resp: &str,
    item: &str,
    call_id: &str,
    name: &str,
    args: &str,
) -> Value {
    json!({
        "type": "response.done",
        "response": {
            "object": "realtime.response", "id": resp, "status": "completed",
            "status_details": null,
            "output": [function_call_item(item, call_id, name, args, "completed")],
            "conversation_id": "conv_fake", "output_modalities": ["audio"],
            "max_output_tokens": "inf",
            "usage": {"total_tokens": 40, "input_tokens": 30, "output_tokens": 10},
            "metadata": null,
        }
    })
}

fn is_output_for(e: &ClientEvent, call_id: &str) -> bool {
    e.event_type() == "conversation.item.create"
        && e.event["item"]["type"] == "function_call_output"
        && e.event["item"]["call_id"] == call_id
}

/// The `function_call_output` item for `call_id` (waiting for it).
async fn wait_output(h: &Harness, oa: &Session, call_id: &str) -> ClientEvent {
    ok(
        h,
        oa.wait_until(
            &format!("the function_call_output for {call_id}"),
            SOON,
            |v| {
                v.received
                    .iter()
                    .find(|e| is_output_for(e, call_id))
                    .cloned()
            },
        )
        .await,
    )
}

/// The output string of a `function_call_output` event.
fn output_text(e: &ClientEvent) -> String {
    e.event["item"]["output"]
        .as_str()
        .unwrap_or_else(|| panic!("function_call_output without a string output: {}", e.event))
        .to_owned()
}

/// Position of the first received event matching `pred`.
fn position(oa: &Session, pred: impl Fn(&ClientEvent) -> bool) -> Option<usize> {
    oa.received().iter().position(pred)
}

/// When the fake sent the first server event matching `pred`.
fn sent_at(oa: &Session, pred: impl Fn(&Value) -> bool) -> Instant {
    oa.sent()
        .iter()
        .find(|(_, e)| pred(e))
        .map(|(at, _)| *at)
        .expect("the server event was sent")
}

/// Every `response.create` received while the fake had a response open (`response.created`
/// sent, its `response.done` not yet): the real server refuses those with
/// `conversation_already_has_active_response`.
fn creates_while_active(oa: &Session) -> Vec<String> {
    let sent = oa.sent();
    let mut bad = Vec::new();
    for ev in oa.received_of_type("response.create") {
        let before = sent.iter().filter(|(at, _)| *at < ev.at);
        let mut open: Vec<String> = Vec::new();
        for (_, e) in before {
            let id = e["response"]["id"].as_str().unwrap_or("").to_owned();
            match e["type"].as_str() {
                Some("response.created") => open.push(id),
                Some("response.done") => open.retain(|o| *o != id),
                _ => {}
            }
        }
        if !open.is_empty() {
            bad.push(format!("{} while {open:?} was active", ev.event));
        }
    }
    bad
}

fn assert_no_create_while_active(h: &Harness, oa: &Session) {
    let bad = creates_while_active(oa);
    assert!(
        bad.is_empty(),
        "response.create sent while a response was active: {bad:?}\nWorker log tail:\n{}",
        h.worker.log_tail(40)
    );
}

// ---- Twilio-side helpers ----------------------------------------------------------------------------

/// Proof that the Worker has handled every frame Twilio sent so far: one recognizable caller
/// frame must come out at OpenAI as an `input_audio_buffer.append` (the Worker handles one
/// socket's frames in order, and its actions in order).
async fn sync_twilio(h: &Harness, twilio: &MediaStream, oa: &Session, tag: u8) {
    let payload = twilio.send_media(&tagged_chunks(tag, 1, tw::FRAME_BYTES)[0]);
    wait_appended(h, oa, &payload).await;
}

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

/// The audio payloads appended on this session, in order.
fn appended(oa: &Session) -> Vec<String> {
    oa.received_of_type("input_audio_buffer.append")
        .iter()
        .map(|e| e.event["audio"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// Wait until at least `n` marks were sent and every mark sent so far has been echoed as
/// played; returns the time of the last echo.
async fn wait_marks_played(h: &Harness, twilio: &MediaStream, n: usize) -> Instant {
    ok(
        h,
        twilio
            .wait_until(&format!("{n}+ marks, all played"), SOON, |l| {
                if l.marks.len() < n {
                    return None;
                }
                let mut last = None;
                for m in &l.marks {
                    let e = l.echoes.iter().find(|e| e.name == m.name && e.played)?;
                    last = Some(last.map_or(e.at, |t: Instant| t.max(e.at)));
                }
                last
            })
            .await,
    )
}

/// The greeting was asked for, played out at Twilio (its mark echoed: marks go every 500 ms
/// of audio, and when an item's audio is done), and the Worker has seen the echo.
async fn greeting_played(h: &Harness, call: &Call) -> Instant {
    let create = ok(h, call.openai.wait_event("response.create", SOON).await);
    assert_eq!(
        create.event["event_id"], "evt_bridge_greeting",
        "the first response.create is the greeting: {}",
        create.event
    );
    let played = wait_marks_played(h, &call.twilio, 1).await;
    sync_twilio(h, &call.twilio, &call.openai, 0x41).await;
    played
}

/// A call to a number whose agent has the end_call tool, greeted as [`greeting_script`] does.
async fn end_call_agent_call(h: &Harness, agent_id: &str, number: &str, from: &str) -> Call {
    agent_on_number(
        h,
        agent_id,
        number,
        json!({"tools": [{"type": "end_call"}]}),
    )
    .await;
    h.start_call(CallSpec {
        from: from.into(),
        to: number.into(),
        script: greeting_script(),
        caller_audio: None,
    })
    .await
}

/// The model calls end_call in a response of its own, which ends; the Worker then asks for
/// the goodbye (the second response.create, after the greeting's).
async fn model_calls_end_call(h: &Harness, oa: &Session, call_id: &str, args: &str) {
    let mut events = function_call_response("resp_tool", "item_fc", call_id, "end_call", args);
    events.push(function_call_response_done(
        "resp_tool",
        "item_fc",
        call_id,
        "end_call",
        args,
    ));
    oa.send_all(events);
    ok(h, oa.wait_events("response.create", 2, SOON).await);
}

/// Every mark the Worker sent before `before` was echoed as played before it: what the agent
/// said had been heard when the REST request went out.
fn assert_all_marks_played_before(twilio: &MediaStream, before: Instant, min_marks: usize) {
    let log = twilio.log();
    let sent: Vec<_> = log.marks.iter().filter(|m| m.at < before).collect();
    assert!(
        sent.len() >= min_marks,
        "expected at least {min_marks} marks before the REST request, got {}",
        sent.len()
    );
    for m in sent {
        let echo = log
            .echoes
            .iter()
            .find(|e| e.name == m.name && e.played)
            .unwrap_or_else(|| panic!("mark {:?} was never echoed as played", m.name));
        assert!(
            echo.at < before,
            "mark {:?} was echoed after the REST request went out: the agent's words had not all played",
            m.name
        );
    }
}

/// The REST request is Twilio's "update a call" for this call, from the Worker's credentials.
fn assert_call_update(r: &RestRequest, ids: &CallIds) {
    assert_eq!(r.method, "POST", "{r:?}");
    assert_eq!(
        r.path,
        format!(
            "/2010-04-01/Accounts/{}/Calls/{}.json",
            ids.account_sid, ids.call_sid
        ),
        "the Call resource of this call"
    );
    assert_eq!(
        r.basic_auth(),
        Some((
            ACCOUNT_SID.to_owned(),
            support::TWILIO_AUTH_TOKEN.to_owned()
        )),
        "Basic auth TWILIO_ACCOUNT_SID:TWILIO_AUTH_TOKEN (header {:?})",
        r.header("authorization")
    );
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/x-www-form-urlencoded")),
        "form-encoded body: {:?}",
        r.header("content-type")
    );
}

// ---- D1 helpers ---------------------------------------------------------------------------------------

fn events(detail: &Value) -> Vec<Value> {
    detail["events"].as_array().cloned().unwrap_or_default()
}

fn has_event(detail: &Value, kind: &str) -> bool {
    !events_of(detail, kind).is_empty()
}

async fn wait_call(
    h: &Harness,
    call_sid: &str,
    what: &str,
    check: impl FnMut(&Value) -> bool,
) -> Value {
    ok(
        h,
        admin(h).wait_call(call_sid, what, D1_DEADLINE, check).await,
    )
}

/// Wait until the row says the call ended (and `kinds` events are there).
async fn wait_ended(h: &Harness, call_sid: &str, kinds: &[&str]) -> Value {
    wait_call(
        h,
        call_sid,
        &format!("the end of the call and {kinds:?} events"),
        |d| d["call"]["end_reason"].is_string() && kinds.iter().all(|k| has_event(d, k)),
    )
    .await
}

/// The text of the last system message the Worker added to the conversation before `at`.
fn system_note_before(oa: &Session, at: Instant) -> String {
    oa.received_of_type("conversation.item.create")
        .into_iter()
        .rfind(|e| e.at <= at && e.event["item"]["role"] == "system")
        .map(|e| {
            e.event["item"]["content"][0]["text"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .unwrap_or_default()
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap()
}

// ---- 1. end_call ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn end_call_says_goodbye_then_hangs_up_through_twilio_rest_after_it_played() {
    let h = harness().await;
    let call = end_call_agent_call(h, "e2e-end-call", "+815000000101", "+819011110101").await;
    let (oa, twilio, ids) = (&call.openai, &call.twilio, &call.ids);
    let sid = ids.call_sid.as_str();

    // The session offers end_call as a function.
    let update = ok(h, oa.wait_event("session.update", SOON).await);
    let tools = update.event["session"]["tools"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        tools
            .iter()
            .any(|t| t["type"] == "function" && t["name"] == "end_call"),
        "session.update offers end_call: {}",
        update.event["session"]["tools"]
    );
    greeting_played(h, &call).await;

    // The model calls end_call inside an active response.
    let args = r#"{"reason":"the caller said goodbye"}"#;
    oa.send_all(function_call_response(
        "resp_tool",
        "item_fc",
        "call_end_1",
        "end_call",
        args,
    ));
    let output = wait_output(h, oa, "call_end_1").await;
    let out: Value = serde_json::from_str(&output_text(&output)).expect("the output is JSON");
    assert_eq!(out["ok"], true, "{out}");
    // Everything the Worker did for the function call has gone out: no response.create yet,
    // because the tool's response is still active.
    sync_twilio(h, twilio, oa, 0x61).await;
    assert_eq!(
        oa.received_of_type("response.create").len(),
        1,
        "only the greeting's response.create while the tool's response is active"
    );

    // The tool's response ends: now the goodbye is asked for.
    oa.send(function_call_response_done(
        "resp_tool",
        "item_fc",
        "call_end_1",
        "end_call",
        args,
    ));
    let creates = ok(h, oa.wait_events("response.create", 2, SOON).await);
    let done_at = sent_at(oa, |e| {
        e["type"] == "response.done" && e["response"]["id"] == "resp_tool"
    });
    assert!(
        creates[1].at > done_at,
        "response.create only after the tool's response.done"
    );
    assert!(
        position(oa, |e| is_output_for(e, "call_end_1")).unwrap()
            < position(oa, |e| e.event_type() == "response.create"
                && e.at == creates[1].at)
            .unwrap(),
        "the output item before the response.create"
    );

    // The goodbye: 400 ms of audio. Nothing is hung up before it has played.
    let bye_audio = tagged_chunks(0x71, 4, 800);
    oa.send_all(oai::full_response(
        "resp_bye",
        "item_bye",
        &bye_audio,
        "お電話ありがとうございました。失礼いたします。",
    ));
    let post = ok(h, rest().wait_request(sid, SOON).await);
    assert_call_update(&post, ids);
    assert_eq!(
        post.form,
        vec![("Status".to_owned(), "completed".to_owned())]
    );
    let log = twilio.log();
    assert!(
        log.media_bytes().ends_with(&bye_audio.concat()),
        "the goodbye's audio reached Twilio"
    );
    // The greeting's mark, and the goodbye's (400 ms of audio: one).
    assert_all_marks_played_before(twilio, post.at, 1 + 1);

    // Twilio answered 200; once the Worker has that answer, Twilio ends the stream.
    wait_call(h, sid, "the hangup event", |d| has_event(d, "hangup")).await;
    twilio.send_stop(ids);
    let detail = wait_ended(h, sid, &["tool_call", "hangup"]).await;
    assert_eq!(
        detail["call"]["end_reason"],
        "agent_hangup",
        "{}",
        pretty(&detail)
    );
    let tool = &events_of(&detail, "tool_call")[0];
    assert_eq!(tool["detail"]["name"], "end_call", "{tool}");
    assert_eq!(tool["detail"]["call_id"], "call_end_1", "{tool}");
    assert_eq!(tool["detail"]["ok"], true, "{tool}");
    assert_eq!(
        tool["detail"]["arguments"]["reason"], "the caller said goodbye",
        "{tool}"
    );
    let hangup = &events_of(&detail, "hangup")[0];
    assert_eq!(hangup["detail"]["ok"], true, "{hangup}");
    assert_eq!(hangup["detail"]["twilio"], 200, "{hangup}");
    assert_eq!(
        hangup["detail"]["reason"]["why"], "the caller said goodbye",
        "{hangup}"
    );
    assert!(
        tool["seq"].as_i64() < hangup["seq"].as_i64(),
        "tool_call before hangup"
    );

    assert_eq!(
        rest().requests_for(sid).len(),
        1,
        "exactly one REST request"
    );
    assert_no_create_while_active(h, oa);
    ok(
        h,
        twilio
            .wait_until("the Worker to close the stream", SOON, |l| l.closed.clone())
            .await,
    );
    h.assert_log_clean(&[support::TWILIO_AUTH_TOKEN]);
}

/// A caller who answers the goodbye ("はい、ありがとうございました") while it plays does not
/// cut it: the server's reply to those words is cancelled and never heard, nothing is
/// cleared or truncated, and the call is hung up once the goodbye has played.
#[tokio::test(flavor = "multi_thread")]
async fn words_over_a_goodbye_said_in_full_do_not_cut_it_and_the_call_is_hung_up_as_said() {
    let h = harness().await;
    let call = end_call_agent_call(h, "e2e-end-call-over", "+815000000113", "+819011110113").await;
    let (oa, twilio, ids) = (&call.openai, &call.twilio, &call.ids);
    let sid = ids.call_sid.as_str();
    greeting_played(h, &call).await;

    let args = r#"{"reason":"the caller is done"}"#;
    model_calls_end_call(h, oa, "call_end_o", args).await;

    // The goodbye, 3 s of audio, generated in full; Twilio has only begun to play it when
    // the caller speaks over it and the server (as its VAD does) answers with a response
    // of its own.
    let bye_audio = tagged_chunks(0x72, 30, 800);
    let bye = "お電話ありがとうございました。失礼いたします。";
    oa.send_all(oai::full_response("resp_bye", "item_bye", &bye_audio, bye));
    let reply_audio = tagged_chunks(0x7a, 2, 800);
    let reply = "かしこまりました。";
    let mut vad = vec![oai::speech_started(400, "item_caller_over")];
    vad.extend(oai::response_start("resp_vad", "item_vad"));
    vad.extend(
        reply_audio
            .iter()
            .map(|c| oai::audio_delta("resp_vad", "item_vad", c)),
    );
    vad.push(
        json!({"type": "response.output_audio_transcript.done", "response_id": "resp_vad",
        "item_id": "item_vad", "output_index": 0, "content_index": 0, "transcript": reply}),
    );
    oa.send_all(vad);
    let cancel = ok(h, oa.wait_event("response.cancel", SOON).await);
    assert_eq!(
        cancel.event["response_id"], "resp_vad",
        "{:?}",
        cancel.event
    );
    oa.send_all(oai::response_finish(
        "resp_vad",
        "item_vad",
        reply,
        "cancelled",
    ));

    // The goodbye plays out, and then the call is hung up.
    let post = ok(h, rest().wait_request(sid, SOON).await);
    assert_call_update(&post, ids);
    assert_eq!(
        post.form,
        vec![("Status".to_owned(), "completed".to_owned())]
    );
    assert_all_marks_played_before(twilio, post.at, 1 + 1);
    let log = twilio.log();
    assert!(
        log.media_bytes().ends_with(&bye_audio.concat()),
        "the whole goodbye reached Twilio, and nothing after it"
    );
    assert!(
        !log.event_names().iter().any(|e| e == "clear"),
        "nothing was cleared: {:?}",
        log.event_names()
    );
    assert!(
        oa.received_of_type("conversation.item.truncate").is_empty(),
        "nothing was truncated"
    );
    wait_call(h, sid, "the hangup event", |d| has_event(d, "hangup")).await;
    twilio.send_stop(ids);
    let detail = wait_ended(h, sid, &["hangup"]).await;
    assert_eq!(
        detail["call"]["end_reason"],
        "agent_hangup",
        "{}",
        pretty(&detail)
    );
    let said: Vec<&str> = detail["transcript"]
        .as_array()
        .map(|t| t.iter().filter_map(|e| e["text"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        said.contains(&bye),
        "the goodbye is in the transcript: {said:?}"
    );
    assert!(
        !said.iter().any(|t| t.contains(reply)),
        "the cancelled reply was never heard, so it is not in the transcript: {said:?}"
    );
    assert!(
        !h.worker.log().contains("control.ending_called_off"),
        "the hang-up was not called off"
    );
    assert_eq!(
        rest().requests_for(sid).len(),
        1,
        "exactly one REST request"
    );
}

// ---- 2. transfer_call ----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn transfer_call_announces_then_redirects_the_call_with_dial_twiml() {
    let h = harness().await;
    let number = "+815000000102";
    let staff = "+81312340099";
    agent_on_number(
        h,
        "e2e-transfer",
        number,
        json!({"tools": [{"type": "transfer_call"}], "transfer_number": staff}),
    )
    .await;
    let call = h
        .start_call(CallSpec {
            from: "+819011110102".into(),
            to: number.into(),
            script: greeting_script(),
            caller_audio: None,
        })
        .await;
    let (oa, twilio, ids) = (&call.openai, &call.twilio, &call.ids);
    let sid = ids.call_sid.as_str();
    // Should the stream end without the call (the agent side failing), Twilio reads the
    // apology with a Japanese voice and puts the caller through to this agent's staff.
    assert_eq!(call.twiml.dials, [staff], "{:?}", call.twiml);
    assert_eq!(
        call.twiml
            .says
            .iter()
            .map(|(_, v)| v.as_deref())
            .collect::<Vec<_>>(),
        [Some("Polly.Mizuki")]
    );
    greeting_played(h, &call).await;

    let args = r#"{"reason":"wants to speak to a person"}"#;
    oa.send_all(function_call_response(
        "resp_tool",
        "item_fc",
        "call_xfer_1",
        "transfer_call",
        args,
    ));
    let output = wait_output(h, oa, "call_xfer_1").await;
    let out: Value = serde_json::from_str(&output_text(&output)).expect("the output is JSON");
    assert_eq!(out["ok"], true, "{out}");
    sync_twilio(h, twilio, oa, 0x62).await;
    assert_eq!(oa.received_of_type("response.create").len(), 1);
    oa.send(function_call_response_done(
        "resp_tool",
        "item_fc",
        "call_xfer_1",
        "transfer_call",
        args,
    ));
    let creates = ok(h, oa.wait_events("response.create", 2, SOON).await);
    let done_at = sent_at(oa, |e| {
        e["type"] == "response.done" && e["response"]["id"] == "resp_tool"
    });
    assert!(
        creates[1].at > done_at,
        "response.create only after the tool's response.done"
    );

    // The notice (300 ms), then the redirect.
    let notice = tagged_chunks(0x72, 3, 800);
    oa.send_all(oai::full_response(
        "resp_notice",
        "item_notice",
        &notice,
        "担当者におつなぎします。",
    ));
    let post = ok(h, rest().wait_request(sid, SOON).await);
    assert_call_update(&post, ids);
    assert_eq!(
        post.form,
        vec![(
            "Twiml".to_owned(),
            format!(
                "<Response><Dial action=\"{}\" method=\"POST\">{staff}</Dial></Response>",
                h.transfer_result_url()
            )
        )],
        "raw body {:?}",
        post.body
    );
    assert!(twilio.log().media_bytes().ends_with(&notice.concat()));
    // The greeting's mark, and the notice's (300 ms of audio: one).
    assert_all_marks_played_before(twilio, post.at, 1 + 1);

    wait_call(h, sid, "the transfer event", |d| has_event(d, "transfer")).await;
    twilio.send_stop(ids);
    let detail = wait_ended(h, sid, &["tool_call", "transfer"]).await;
    assert_eq!(
        detail["call"]["end_reason"],
        "transferred",
        "{}",
        pretty(&detail)
    );
    let transfer = &events_of(&detail, "transfer")[0];
    assert_eq!(transfer["detail"]["ok"], true, "{transfer}");
    assert_eq!(transfer["detail"]["reason"]["to"], staff, "{transfer}");
    assert_eq!(
        events_of(&detail, "tool_call")[0]["detail"]["name"],
        "transfer_call"
    );
    assert_eq!(
        rest().requests_for(sid).len(),
        1,
        "exactly one REST request"
    );
    assert_no_create_while_active(h, oa);

    // Nobody picks up: Twilio asks the <Dial action> what to do with the caller, who hears
    // an apology in Japanese before the call ends (not silence, not a hang-up out of the blue).
    let mut params = tw::voice_params(ids, "+819011110102", number);
    params.extend(
        [
            ("DialCallStatus", "no-answer"),
            ("DialCallSid", "CAffffffffffffffffffffffffffffffff"),
            ("DialCallDuration", "0"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    let reply = h.post_transfer_result(&params).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(
        reply
            .content_type
            .as_deref()
            .unwrap_or("")
            .starts_with("text/xml"),
        "{reply:?}"
    );
    assert!(
        reply.body.contains(
            "<Say language=\"ja-JP\" voice=\"Polly.Mizuki\">申し訳ございません。ただいま担当者が"
        ) && reply.body.ends_with("</Say><Hangup/></Response>"),
        "{}",
        reply.body
    );
    let detail = wait_call(h, sid, "the transfer's result", |d| {
        has_event(d, "transfer_result")
    })
    .await;
    let result = &events_of(&detail, "transfer_result")[0]["detail"];
    assert_eq!(result["answered"], false, "{result}");
    assert_eq!(result["dial_call_status"], "no-answer", "{result}");
    // Twilio retries a callback it got no answer to: the result is kept once.
    let again = h.post_transfer_result(&params).await;
    assert_eq!(again.status, 200);
    // Not Twilio's signature: refused.
    let forged = tw::post_form(&h.transfer_result_url(), &params, Some("bad")).await;
    assert_eq!(forged.map(|r| r.status).ok(), Some(403));
    // Answered, then the person hung up: the call simply ends.
    let mut answered = params.clone();
    for (k, v) in answered.iter_mut() {
        if k == "DialCallStatus" {
            *v = "completed".into();
        }
    }
    let reply = h.post_transfer_result(&answered).await;
    assert_eq!(reply.status, 200);
    assert!(
        reply.body.ends_with("<Response><Hangup/></Response>"),
        "{}",
        reply.body
    );
    let detail = ok(h, admin(h).call(sid).await).expect("the call");
    assert_eq!(
        events_of(&detail, "transfer_result").len(),
        1,
        "one result per call: {}",
        pretty(&detail)
    );
}

/// A transfer's result is answered at once, even while the call's object is waiting on a
/// D1 write (here held 6 s by `FAULT_INJECT_D1_STALL_MS`): the caller whose transfer nobody
/// answered hears the apology, not silence, and the result reaches D1 all the same.
///
/// No clock decides it: the answer must come while the write of a keypress event the object
/// sent to D1 just before is still under way (not yet in D1), which a Worker that waits on
/// the object (whose hand-over waits for that write) cannot do. The margin is the whole
/// stall: the answer and one admin read would have to take 6 s on a loaded machine to pass
/// that point.
#[tokio::test(flavor = "multi_thread")]
async fn a_transfer_result_is_answered_without_waiting_for_a_d1_write_under_way() {
    let mut vars = vars(600);
    vars.push(("FAULT_INJECT_D1_STALL_MS".into(), "6000".into()));
    // Its outbox logs each D1 write as it starts.
    vars.push(("LOG_LEVEL".into(), "debug".into()));
    let h = Harness::start("e2e-tools-d1-stall", vars)
        .await
        .unwrap_or_else(|e| panic!("the Worker with stalled D1 writes did not start:\n{e}"));
    let h = &h;
    let (from, to) = ("+819011110112", "+815000000112");
    let call = h
        .start_call(CallSpec {
            from: from.into(),
            to: to.into(),
            script: greeting_script(),
            caller_audio: None,
        })
        .await;
    let (oa, twilio, ids) = (&call.openai, &call.twilio, &call.ids);
    let sid = ids.call_sid.as_str();
    greeting_played(h, &call).await;
    let key = |digit: &str| {
        twilio.send_raw(json!({
            "event": "dtmf",
            "streamSid": ids.stream_sid,
            "dtmf": {"track": "inbound_track", "digit": digit},
        }));
    };
    let dtmf = |d: &Value, digit: &str| {
        events_of(d, "dtmf")
            .iter()
            .any(|e| e["detail"]["digit"] == digit)
    };
    // Once a first keypress is in D1, what the call's object was given before it has gone
    // there too: the next record goes straight to D1, a write the object is then waiting on.
    key("1");
    wait_call(h, sid, "the first keypress", |d| dtmf(d, "1")).await;
    let writes = h.direct_d1_writes();
    key("2");
    // The Worker has handled the keypress before this frame comes out at OpenAI; its object
    // starts that write once it has gathered what comes with it (GATHER_MS), and the
    // result comes after that.
    sync_twilio(h, twilio, oa, 0x63).await;
    h.direct_d1_write_started("the keypress's write to D1", writes)
        .await;

    let mut params = tw::voice_params(ids, from, to);
    params.extend(
        [
            ("DialCallStatus", "no-answer"),
            ("DialCallSid", "CAeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee"),
            ("DialCallDuration", "0"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    let sent = Instant::now();
    let reply = h.post_transfer_result(&params).await;
    let took = sent.elapsed();
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(
        reply.body.ends_with("</Say><Hangup/></Response>"),
        "{}",
        reply.body
    );
    let detail = ok(h, admin(h).call(sid).await).expect("the call");
    assert!(
        !dtmf(&detail, "2"),
        "the answer (after {took:?}) waited for the D1 write under way: {}",
        pretty(&detail)
    );

    let detail = wait_call(h, sid, "the transfer's result", |d| {
        has_event(d, "transfer_result") && dtmf(d, "2")
    })
    .await;
    let result = &events_of(&detail, "transfer_result")[0]["detail"];
    assert_eq!(result["dial_call_status"], "no-answer", "{result}");
    twilio.send_stop(ids);
}

// ---- 3. webhook tools ---------------------------------------------------------------------------

const TOOL_SECRET: &str = "tool-secret-e2e-0123456789abcdef";

/// An agent on `number` with one webhook tool `name` at `url`.
async fn webhook_agent(
    h: &Harness,
    id: &str,
    number: &str,
    name: &str,
    url: &str,
    timeout_ms: Option<u64>,
) {
    let mut tool = json!({
        "type": "function", "name": name, "description": "顧客情報を電話番号で検索します。",
        "parameters": {"type": "object", "properties": {"phone": {"type": "string"}},
                       "required": ["phone"]},
        "url": url,
    });
    if let Some(t) = timeout_ms {
        tool["timeout_ms"] = json!(t);
    }
    agent_on_number(
        h,
        id,
        number,
        json!({"tools": [tool], "tool_secret": TOOL_SECRET}),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_webhook_tool_gets_signed_context_and_its_answer_goes_back_without_stalling_audio() {
    let h = harness().await;
    let (number, from) = ("+815000000103", "+819011110103");
    let tools = ToolServer::start(background_runtime(), TOOL_SECRET);
    let gate = Gate::new();
    let answer = r#"{"name":"山田太郎","vip":true,"last_order":"2026-11-01"}"#;
    // The answer takes at least a second, and is held until the test has seen the caller's
    // audio flow while the tool runs.
    tools.answer(
        "/tools/lookup",
        ToolAnswer::ok(answer)
            .after(Duration::from_secs(1))
            .held_by(&gate),
    );
    webhook_agent(
        h,
        "e2e-webhook-ok",
        number,
        "lookup_customer",
        &tools.url("/tools/lookup"),
        None,
    )
    .await;
    let call = h
        .start_call(CallSpec {
            from: from.into(),
            to: number.into(),
            script: greeting_script(),
            caller_audio: None,
        })
        .await;
    let (oa, twilio, ids) = (&call.openai, &call.twilio, &call.ids);
    let sid = ids.call_sid.as_str();

    // The Realtime session sees the tool without the bridge's own fields.
    let update = ok(h, oa.wait_event("session.update", SOON).await);
    let def = update.event["session"]["tools"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["name"] == "lookup_customer").cloned())
        .unwrap_or_else(|| panic!("lookup_customer not offered: {}", update.event["session"]));
    assert_eq!(def["type"], "function");
    assert!(
        def.get("url").is_none() && def.get("timeout_ms").is_none(),
        "{def}"
    );
    greeting_played(h, &call).await;

    let args = r#"{"phone":"+819011110103"}"#;
    oa.send_all(function_call_response(
        "resp_t1",
        "item_fc1",
        "call_lookup_1",
        "lookup_customer",
        args,
    ));
    let req = ok(h, tools.wait_request("/tools/lookup", SOON).await);
    assert_eq!(req.method, "POST");
    assert!(
        req.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{:?}",
        req.header("content-type")
    );
    // When it was sent (Unix ms, under the signature): within the last minute.
    let sent_at = req.json["request"]["sent_at_ms"].as_u64().unwrap_or(0);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        sent_at <= now_ms && now_ms - sent_at < 60_000,
        "sent_at_ms {sent_at}, now {now_ms}"
    );
    assert_eq!(
        req.json,
        json!({
            "tool": "lookup_customer",
            "arguments": {"phone": "+819011110103"},
            "call": {"call_sid": sid, "from": from, "to": number, "agent_id": "e2e-webhook-ok"},
            "request": {"id": format!("{sid}/call_lookup_1"), "sent_at_ms": sent_at},
        }),
        "raw body {}",
        req.body
    );
    assert!(
        req.signature_ok,
        "X-Bridge-Signature {:?} does not match the body (expected {})",
        req.signature,
        expected_signature(TOOL_SECRET, &req.body)
    );

    // The model's turn ends while the tool runs; no response.create before the output.
    oa.send(function_call_response_done(
        "resp_t1",
        "item_fc1",
        "call_lookup_1",
        "lookup_customer",
        args,
    ));
    // The caller talks for 600 ms while the tool server holds its answer: every frame reaches
    // OpenAI, in order, before the tool has answered.
    let audio = tagged_chunks(0x52, 30, tw::FRAME_BYTES).concat();
    let sent = twilio.play_caller_audio(audio).await.unwrap();
    wait_appended(h, oa, sent.last().unwrap()).await;
    let got: Vec<String> = appended(oa)
        .into_iter()
        .filter(|p| sent.contains(p))
        .collect();
    assert_eq!(
        got, sent,
        "caller frames during the tool call: all, in order"
    );
    assert!(!gate.is_open());
    assert!(
        position(oa, |e| is_output_for(e, "call_lookup_1")).is_none(),
        "no output before the tool answered"
    );
    assert_eq!(
        oa.received_of_type("response.create").len(),
        1,
        "only the greeting so far"
    );

    gate.open();
    let output = wait_output(h, oa, "call_lookup_1").await;
    assert_eq!(
        output_text(&output),
        answer,
        "the tool's body is the output, verbatim"
    );
    let creates = ok(h, oa.wait_events("response.create", 2, SOON).await);
    assert!(
        creates[1].at >= output.at,
        "response.create after the output"
    );
    assert!(
        position(oa, |e| is_output_for(e, "call_lookup_1")).unwrap()
            < position(oa, |e| e.event_type() == "response.create"
                && e.at == creates[1].at)
            .unwrap()
    );
    assert_no_create_while_active(h, oa);

    // The model answers; the caller hangs up.
    oa.send_all(oai::full_response(
        "resp_answer",
        "item_answer",
        &tagged_chunks(0x73, 2, 800),
        "山田様ですね。",
    ));
    wait_marks_played(h, twilio, 2).await;
    twilio.send_stop(ids);
    let detail = wait_ended(h, sid, &["tool_call"]).await;
    assert_eq!(detail["call"]["end_reason"], "twilio_stop");
    let ev = &events_of(&detail, "tool_call")[0];
    assert_eq!(ev["detail"]["name"], "lookup_customer", "{ev}");
    assert_eq!(ev["detail"]["ok"], true, "{ev}");
    assert_eq!(ev["detail"]["output"], answer, "{ev}");
    assert_eq!(ev["detail"]["arguments"]["phone"], "+819011110103", "{ev}");
    assert!(ev["detail"]["duration_ms"].as_u64().is_some(), "{ev}");
    assert_eq!(tools.requests().len(), 1, "one webhook request");
    assert!(rest().requests_for(sid).is_empty(), "no REST request");
    h.assert_log_clean(&[TOOL_SECRET]);
}

/// A webhook tool call that fails (`answer`); returns the output the model got and the
/// `tool_call` event.
async fn failing_webhook_call(
    h: &Harness,
    id: &str,
    number: &str,
    timeout_ms: Option<u64>,
    answer: ToolAnswer,
) -> (Value, Value) {
    let tools = ToolServer::start(background_runtime(), TOOL_SECRET);
    tools.answer("/tools/lookup", answer);
    webhook_agent(
        h,
        id,
        number,
        "lookup_customer",
        &tools.url("/tools/lookup"),
        timeout_ms,
    )
    .await;
    let call = h
        .start_call(CallSpec {
            from: "+819011119999".into(),
            to: number.into(),
            script: greeting_script(),
            caller_audio: None,
        })
        .await;
    let (oa, twilio, ids) = (&call.openai, &call.twilio, &call.ids);
    greeting_played(h, &call).await;
    let args = r#"{"phone":"+819011119999"}"#;
    let mut events = function_call_response(
        "resp_t1",
        "item_fc1",
        "call_fail_1",
        "lookup_customer",
        args,
    );
    events.push(function_call_response_done(
        "resp_t1",
        "item_fc1",
        "call_fail_1",
        "lookup_customer",
        args,
    ));
    oa.send_all(events);
    let req = ok(h, tools.wait_request("/tools/lookup", SOON).await);
    assert!(req.signature_ok, "signed: {:?}", req.signature);
    let output = wait_output(h, oa, "call_fail_1").await;
    let out: Value = serde_json::from_str(&output_text(&output))
        .unwrap_or_else(|_| panic!("the error output is JSON: {}", output_text(&output)));
    // The model is asked to go on (and tell the caller).
    let creates = ok(h, oa.wait_events("response.create", 2, SOON).await);
    assert!(creates[1].at >= output.at);
    // The tool server's (late) answer changes nothing: one output for the call.
    ok(h, tools.wait_answered("/tools/lookup", SOON).await);
    sync_twilio(h, twilio, oa, 0x63).await;
    assert_eq!(
        oa.received()
            .iter()
            .filter(|e| is_output_for(e, "call_fail_1"))
            .count(),
        1,
        "exactly one output for the call"
    );
    assert_no_create_while_active(h, oa);
    twilio.send_stop(ids);
    let detail = wait_ended(h, &ids.call_sid, &["tool_call"]).await;
    (out, events_of(&detail, "tool_call")[0].clone())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_webhook_tool_that_answers_too_late_gives_the_model_a_timeout_error() {
    let h = harness().await;
    let (out, ev) = failing_webhook_call(
        h,
        "e2e-webhook-slow",
        "+815000000104",
        Some(500),
        ToolAnswer::ok(r#"{"too":"late"}"#).after(Duration::from_secs(3)),
    )
    .await;
    let err = out["error"]
        .as_str()
        .unwrap_or_else(|| panic!("an error output: {out}"));
    assert!(err.contains("500 ms"), "names the timeout: {out}");
    assert_eq!(ev["detail"]["ok"], false, "{ev}");
    assert_eq!(ev["detail"]["name"], "lookup_customer", "{ev}");
    let took = ev["detail"]["duration_ms"].as_u64().unwrap_or(0);
    assert!(took >= 500, "gave up after the timeout, not before: {ev}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_webhook_tool_that_fails_gives_the_model_an_error() {
    let h = harness().await;
    let (out, ev) = failing_webhook_call(
        h,
        "e2e-webhook-500",
        "+815000000105",
        None,
        ToolAnswer::status(500, r#"{"detail":"database down"}"#),
    )
    .await;
    let err = out["error"]
        .as_str()
        .unwrap_or_else(|| panic!("an error output: {out}"));
    assert!(err.contains("500"), "names the status: {out}");
    assert_eq!(ev["detail"]["ok"], false, "{ev}");
}

// ---- 4. DTMF ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_keypress_reaches_the_model_as_a_message_and_is_recorded() {
    let h = harness().await;
    let call = h
        .start_call(CallSpec {
            from: "+819011110106".into(),
            to: "+815000000106".into(),
            script: greeting_script(),
            caller_audio: None,
        })
        .await;
    let (oa, twilio, ids) = (&call.openai, &call.twilio, &call.ids);
    greeting_played(h, &call).await;

    twilio.send_raw(json!({
        "event": "dtmf",
        "streamSid": ids.stream_sid,
        "dtmf": {"track": "inbound_track", "digit": "5"},
    }));
    let item = ok(
        h,
        oa.wait_until("a user message about the key", SOON, |v| {
            v.received
                .iter()
                .find(|e| {
                    e.event_type() == "conversation.item.create"
                        && e.event["item"]["role"] == "user"
                })
                .cloned()
        })
        .await,
    );
    assert_eq!(item.event["item"]["type"], "message", "{}", item.event);
    let text = item.event["item"]["content"][0]["text"]
        .as_str()
        .unwrap_or("");
    assert_eq!(item.event["item"]["content"][0]["type"], "input_text");
    assert!(text.contains('5'), "mentions the digit: {text:?}");
    let creates = ok(h, oa.wait_events("response.create", 2, SOON).await);
    assert!(creates[1].at >= item.at, "then a response is asked for");
    assert_no_create_while_active(h, oa);

    twilio.send_stop(ids);
    let detail = wait_ended(h, &ids.call_sid, &["dtmf"]).await;
    let dtmf = &events_of(&detail, "dtmf")[0];
    assert_eq!(dtmf["detail"]["digit"], "5", "{dtmf}");
    assert_eq!(detail["call"]["end_reason"], "twilio_stop");
}

// ---- 5. limits ----------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_line_gets_a_check_in_then_a_goodbye_then_a_hang_up() {
    let h = idle_harness().await;
    let call = h
        .start_call(CallSpec {
            from: "+819011110107".into(),
            to: "+815000000107".into(),
            script: greeting_script(),
            caller_audio: None,
        })
        .await;
    let (oa, twilio, ids) = (&call.openai, &call.twilio, &call.ids);
    let sid = ids.call_sid.as_str();
    let greeting_done = greeting_played(h, &call).await;

    // Nobody says anything: after the idle timeout (5 s) the agent checks in.
    let creates = ok(h, oa.wait_events("response.create", 2, SOON).await);
    let check_in = &creates[1];
    // What to say is a system message before it; the response keeps the agent's own
    // instructions (a response's `instructions` would replace them).
    assert!(
        check_in.event.get("response").is_none(),
        "{}",
        check_in.event
    );
    let note = system_note_before(oa, check_in.at);
    assert!(note.contains("無言"), "check-in note: {note:?}");
    assert!(
        check_in.at.duration_since(greeting_done) >= Duration::from_secs(4),
        "the check-in came {:?} after the greeting played, before the 5 s idle timeout",
        check_in.at.duration_since(greeting_done)
    );
    oa.send_all(oai::full_response(
        "resp_check_in",
        "item_check_in",
        &tagged_chunks(0x74, 2, 800),
        "もしもし、お電話つながっておりますでしょうか。",
    ));
    let check_in_played = wait_marks_played(h, twilio, 2).await;

    // Still nothing: a goodbye, then the hang-up once it has played.
    let creates = ok(h, oa.wait_events("response.create", 3, SOON).await);
    let goodbye = &creates[2];
    let note = system_note_before(oa, goodbye.at);
    assert!(note.contains("終了"), "goodbye note: {note:?}");
    assert!(
        goodbye.at.duration_since(check_in_played) >= Duration::from_secs(4),
        "the goodbye came {:?} after the check-in played",
        goodbye.at.duration_since(check_in_played)
    );
    let bye = tagged_chunks(0x75, 3, 800);
    oa.send_all(oai::full_response(
        "resp_idle_bye",
        "item_idle_bye",
        &bye,
        "お電話ありがとうございました。失礼いたします。",
    ));
    let post = ok(h, rest().wait_request(sid, SOON).await);
    assert_call_update(&post, ids);
    assert_eq!(
        post.form,
        vec![("Status".to_owned(), "completed".to_owned())]
    );
    // The greeting's, the check-in's and the goodbye's marks (each under 500 ms of audio).
    assert_all_marks_played_before(twilio, post.at, 3);

    wait_call(h, sid, "the hangup event", |d| has_event(d, "hangup")).await;
    twilio.send_stop(ids);
    let detail = wait_ended(h, sid, &["idle_check_in", "idle_hangup", "hangup"]).await;
    assert_eq!(
        detail["call"]["end_reason"],
        "agent_hangup",
        "{}",
        pretty(&detail)
    );
    let kinds: Vec<String> = events(&detail)
        .iter()
        .map(|e| e["type"].as_str().unwrap_or("").to_owned())
        .filter(|k| k.starts_with("idle") || k == "hangup")
        .collect();
    assert_eq!(kinds, ["idle_check_in", "idle_hangup", "hangup"]);
    assert_eq!(
        events_of(&detail, "hangup")[0]["detail"]["reason"]["why"],
        "idle"
    );
    assert_eq!(
        rest().requests_for(sid).len(),
        1,
        "exactly one REST request"
    );
    assert_no_create_while_active(h, oa);
}

/// Like `Harness::start_call`, but Twilio's `start` goes out only once the OpenAI session
/// is ready (`session.updated` sent, and a moment for the Worker to take it in: nothing the
/// Worker does marks that moment before the stream has started).
async fn start_call_session_first(
    h: &Harness,
    from: &str,
    to: &str,
    script: SessionScript,
) -> Call {
    let ids = CallIds::new();
    let twiml = h.answer_call(&ids, from, to).await;
    let claim = h.openai.claim(script).await;
    let twilio = h.open_stream(&twiml).await;
    twilio.send_connected();
    let openai = ok(h, claim.session(SOON).await);
    drop(claim);
    ok(h, openai.wait_sent("session.updated", SOON).await);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let start_sent_at = Instant::now();
    twilio.send_start(&ids, &twiml.parameters);
    Call {
        ids,
        from: from.into(),
        to: to.into(),
        twiml,
        twilio,
        openai,
        start_sent_at,
        caller_audio: None,
    }
}

fn is_system_item(e: &ClientEvent) -> bool {
    e.event_type() == "conversation.item.create" && e.event["item"]["role"] == "system"
}

#[tokio::test(flavor = "multi_thread")]
async fn the_time_limit_has_the_agent_wrap_up_then_hangs_up() {
    let h = harness().await;
    let number = "+815000000108";
    // 30 s is the shortest limit: the wrap-up is due half-way (30 s before the end would be
    // at the start, as the greeting begins).
    agent_on_number(
        h,
        "e2e-max-duration",
        number,
        json!({"max_call_seconds": 30}),
    )
    .await;
    let call = start_call_session_first(h, "+819011110108", number, greeting_script()).await;
    let (oa, twilio, ids) = (&call.openai, &call.twilio, &call.ids);
    let sid = ids.call_sid.as_str();

    greeting_played(h, &call).await;
    let wrap_up = ok(
        h,
        oa.wait_until("the wrap-up system item", SOON, |v| {
            v.received.iter().find(|e| is_system_item(e)).cloned()
        })
        .await,
    );
    let text = wrap_up.event["item"]["content"][0]["text"]
        .as_str()
        .unwrap_or("");
    assert!(text.contains("制限時間"), "wrap-up text: {text:?}");
    let told_after = wrap_up.at.duration_since(call.start_sent_at);
    assert!(
        told_after >= Duration::from_secs(14),
        "told to wrap up {told_after:?} after the start: not half-way through the 30 s"
    );
    // The wrap-up response is asked for with it, the greeting long done.
    let creates = ok(h, oa.wait_events("response.create", 2, SOON).await);
    assert!(creates[1].at > wrap_up.at);
    oa.send_all(oai::full_response(
        "resp_wrap",
        "item_wrap",
        &tagged_chunks(0x76, 2, 800),
        "お時間となりましたので、まもなく終了いたします。",
    ));
    wait_marks_played(h, twilio, 2).await;

    // At the limit the call is hung up.
    let post = ok(h, rest().wait_request(sid, Duration::from_secs(90)).await);
    assert_call_update(&post, ids);
    assert_eq!(
        post.form,
        vec![("Status".to_owned(), "completed".to_owned())]
    );
    let after = post.at.duration_since(call.start_sent_at);
    assert!(
        after >= Duration::from_secs(29),
        "hung up {after:?} after the start, before the 30 s limit"
    );

    wait_call(h, sid, "the hangup event", |d| has_event(d, "hangup")).await;
    twilio.send_stop(ids);
    let detail = wait_ended(h, sid, &["wrap_up", "max_duration", "hangup"]).await;
    assert_eq!(
        detail["call"]["end_reason"],
        "agent_hangup",
        "{}",
        pretty(&detail)
    );
    assert_eq!(
        events_of(&detail, "hangup")[0]["detail"]["reason"]["why"],
        "max_duration"
    );
    assert_eq!(
        events_of(&detail, "max_duration")[0]["detail"]["max_call_seconds"],
        30
    );
    assert_eq!(
        rest().requests_for(sid).len(),
        1,
        "exactly one REST request"
    );
    assert_no_create_while_active(h, oa);
}

/// The server ends `old` at its 60-minute limit. The session that replaces it is claimed
/// before and answered by hand: returned with its `session.update`, not yet confirmed (the
/// test sends `session.updated` when it wants the session ready).
async fn expire_session(h: &Harness, old: &Session) -> (std::sync::Arc<Session>, ClientEvent) {
    let claim = h
        .openai
        .claim(SessionScript::new().without_session_updated())
        .await;
    old.send(json!({"type": "error", "error": {
        "type": "invalid_request_error", "code": "session_expired",
        "message": "Your session hit the maximum duration of 60 minutes.",
        "param": null, "event_id": null}}));
    old.close();
    let new = ok(h, claim.session(SOON).await);
    drop(claim);
    let update = ok(h, new.wait_event("session.update", SOON).await);
    (new, update)
}

/// A wrap-up that falls due while the Realtime session is being replaced (the server ended
/// it; the new one is not ready until after the wrap-up's time) still reaches the model: on
/// the new session, once it is ready.
#[tokio::test(flavor = "multi_thread")]
async fn a_wrap_up_due_while_the_session_is_replaced_still_reaches_the_model() {
    let h = harness().await;
    let number = "+815000000109";
    // 30 s: the wrap-up is due 15 s after the start.
    agent_on_number(
        h,
        "e2e-max-duration-early",
        number,
        json!({"max_call_seconds": 30}),
    )
    .await;
    let call = h
        .start_call(CallSpec {
            from: "+819011110109".into(),
            to: number.into(),
            script: greeting_script(),
            caller_audio: None,
        })
        .await;
    let (oa1, twilio, ids) = (&call.openai, &call.twilio, &call.ids);
    greeting_played(h, &call).await;
    let due = call.start_sent_at + Duration::from_secs(15);

    // Three seconds before it, the session hits its limit; the next one is answered by hand,
    // a second after the wrap-up's time (well inside the 8 s a replacement may take).
    tokio::time::sleep_until((due - Duration::from_secs(3)).into()).await;
    let (oa2, update) = expire_session(h, oa1).await;
    tokio::time::sleep_until((due + Duration::from_secs(1)).into()).await;
    let wrap_up = |e: &ClientEvent| {
        is_system_item(e)
            && e.event["item"]["content"][0]["text"]
                .as_str()
                .is_some_and(|t| t.contains("制限時間"))
    };
    assert!(
        !oa1.received().iter().any(wrap_up) && !oa2.received().iter().any(wrap_up),
        "the wrap-up went out with no session ready to hear it"
    );
    oa2.send_session_updated(&update.event["session"]);
    let found = oa2
        .wait_until("the wrap-up on the new session", SOON, |v| {
            v.received.iter().find(|e| wrap_up(e)).cloned()
        })
        .await;
    twilio.send_stop(ids);
    let detail = wait_ended(h, &ids.call_sid, &["wrap_up"]).await;
    assert!(
        found.is_ok(),
        "call {}: the agent was never told to wrap up (due while its session was replaced): \
         {}\nevents: {}",
        ids.call_sid,
        found.unwrap_err(),
        pretty(&detail["events"])
    );
}

// ---- 6. session renewal -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_session_is_replaced_seeded_with_the_conversation_and_loses_no_audio() {
    let h = harness().await;
    let call = h
        .start_call(CallSpec {
            from: "+819011110110".into(),
            to: "+815000000110".into(),
            script: greeting_script(),
            caller_audio: None,
        })
        .await;
    let (oa1, twilio, ids) = (&call.openai, &call.twilio, &call.ids);
    let sid = ids.call_sid.as_str();
    greeting_played(h, &call).await;

    // The caller speaks; the turn is committed and transcribed.
    const CALLER_SAID: &str = "予約をお願いしたいのですが。";
    let t = call.start_sent_at.elapsed().as_millis() as u64;
    oa1.send(oai::speech_started(t, "item_caller_1"));
    let said = twilio
        .play_caller_audio(tagged_chunks(0x42, 15, tw::FRAME_BYTES).concat())
        .await
        .unwrap();
    wait_appended(h, oa1, said.last().unwrap()).await;
    oa1.send_all(oai::caller_turn_end(
        "item_caller_1",
        Some("item_greet"),
        t + 300,
    ));
    oa1.send(oai::caller_transcription_completed(
        "item_caller_1",
        CALLER_SAID,
    ));
    // The transcript is stored (the Worker has handled the transcription).
    wait_call(h, sid, "the caller's transcript entry", |d| {
        d["transcript"]
            .as_array()
            .is_some_and(|t| t.iter().any(|e| e["text"] == CALLER_SAID))
    })
    .await;

    // The session hits its 60-minute limit. The next session is ours; it is answered by hand
    // so that caller audio sent meanwhile falls in the gap for sure.
    let (oa2, update) = expire_session(h, oa1).await;
    assert_eq!(
        update.event["session"]["type"], "realtime",
        "{}",
        update.event
    );
    assert_eq!(
        oa2.handshake.header("authorization"),
        Some(format!("Bearer {}", support::OPENAI_API_KEY).as_str())
    );

    // The caller keeps talking while the new session is not ready.
    let gap: Vec<String> = tagged_chunks(0x43, 10, tw::FRAME_BYTES)
        .iter()
        .map(|f| twilio.send_media(f))
        .collect();
    oa2.send_session_updated(&update.event["session"]);
    wait_appended(h, &oa2, gap.last().unwrap()).await;

    // On the new session: session.update, the conversation so far as text, then the audio.
    let received = oa2.received();
    let types: Vec<&str> = received.iter().map(ClientEvent::event_type).collect();
    assert_eq!(types[0], "session.update", "{types:?}");
    let seeds: Vec<&ClientEvent> = received
        .iter()
        .filter(|e| e.event_type() == "conversation.item.create")
        .collect();
    assert_eq!(
        seeds.len(),
        2,
        "two seed items: {:?}",
        seeds.iter().map(|e| &e.event).collect::<Vec<_>>()
    );
    assert_eq!(
        seeds[0].event["item"]["role"], "assistant",
        "{}",
        seeds[0].event
    );
    assert_eq!(seeds[0].event["item"]["content"][0]["type"], "output_text");
    assert_eq!(seeds[0].event["item"]["content"][0]["text"], GREETING);
    assert_eq!(seeds[1].event["item"]["role"], "user", "{}", seeds[1].event);
    assert_eq!(seeds[1].event["item"]["content"][0]["type"], "input_text");
    assert_eq!(seeds[1].event["item"]["content"][0]["text"], CALLER_SAID);
    let first_append = types
        .iter()
        .position(|t| *t == "input_audio_buffer.append")
        .expect("audio appended");
    let last_seed = types
        .iter()
        .rposition(|t| *t == "conversation.item.create")
        .unwrap();
    assert!(
        last_seed < first_append,
        "seeds before any caller audio: {types:?}"
    );
    assert_eq!(
        appended(&oa2),
        gap,
        "every frame sent in the gap, in order, on the new session"
    );
    assert!(
        appended(oa1).iter().all(|p| !gap.contains(p)),
        "no gap frame went to the expired session"
    );

    // The caller's question had no answer under way when the session expired: the new
    // session is asked for one (after the seeds), not for a second greeting.
    sync_twilio(h, twilio, &oa2, 0x44).await;
    let creates = oa2.received_of_type("response.create");
    assert_eq!(creates.len(), 1, "one response.create on the new session");
    assert!(
        creates[0].event["response"]["instructions"].is_null(),
        "an answer to the caller, not the greeting: {}",
        creates[0].event
    );
    let create_at = oa2
        .received()
        .iter()
        .position(|e| e.event_type() == "response.create")
        .unwrap();
    assert!(
        last_seed < create_at,
        "seeded before it is asked: {types:?}"
    );
    oa2.send_all(oai::full_response(
        "resp_after",
        "item_after",
        &tagged_chunks(0x77, 2, 800),
        "ご予約ですね。",
    ));
    wait_marks_played(h, twilio, 2).await;
    assert_eq!(
        oa1.received_of_type("response.create").len(),
        1,
        "one greeting in all"
    );

    twilio.send_stop(ids);
    let detail = wait_ended(h, sid, &["reconnect", "reconnected"]).await;
    assert_eq!(
        detail["call"]["end_reason"],
        "twilio_stop",
        "{}",
        pretty(&detail)
    );
    let reconnect = &events_of(&detail, "reconnect")[0];
    assert_eq!(
        reconnect["detail"]["why"], "closed with code 1000: session_expired",
        "{reconnect}"
    );
    assert_eq!(reconnect["detail"]["attempt"], 1, "{reconnect}");
    let reconnected = &events_of(&detail, "reconnected")[0];
    assert_eq!(reconnected["detail"]["seeded_items"], 2, "{reconnected}");
    assert!(reconnect["seq"].as_i64() < reconnected["seq"].as_i64());
}

// ---- the hang-up and Twilio's stop racing --------------------------------------------------------

/// Twilio may end the stream (`stop`) before its answer to the hang-up request reaches the
/// Worker; the call is still the agent's hang-up.
#[tokio::test(flavor = "multi_thread")]
async fn a_stop_before_the_rest_answer_still_records_the_agents_hang_up() {
    let h = harness().await;
    let call = end_call_agent_call(h, "e2e-end-call-race", "+815000000111", "+819011110111").await;
    let (oa, twilio, ids) = (&call.openai, &call.twilio, &call.ids);
    let sid = ids.call_sid.as_str();
    rest().set_answer(
        sid,
        Answer {
            status: 200,
            delay: Duration::from_secs(2),
        },
    );
    greeting_played(h, &call).await;
    let args = r#"{"reason":"done"}"#;
    model_calls_end_call(h, oa, "call_end_2", args).await;
    oa.send_all(oai::full_response(
        "resp_bye",
        "item_bye",
        &tagged_chunks(0x78, 2, 800),
        "失礼いたします。",
    ));
    let post = ok(h, rest().wait_request(sid, SOON).await);
    assert!(post.answered.is_none(), "the answer is held");
    // Twilio hangs up and stops the stream before the Worker has its answer.
    twilio.send_stop(ids);
    let detail = wait_ended(h, sid, &["tool_call"]).await;
    assert_eq!(
        detail["call"]["end_reason"],
        "agent_hangup",
        "the agent hung up (the REST hang-up was in flight when Twilio sent stop): {}",
        pretty(&detail)
    );
}

/// Twilio refuses the hang-up: the failure is recorded, nothing is retried, and the Worker
/// closes the stream so that Twilio goes on with the TwiML after `</Connect>` (the call does
/// not stay open on a silent line).
#[tokio::test(flavor = "multi_thread")]
async fn a_hang_up_twilio_keeps_failing_is_tried_three_times_then_recorded_and_the_stream_closed() {
    let h = harness().await;
    let call =
        end_call_agent_call(h, "e2e-end-call-refused", "+815000000112", "+819011110112").await;
    let (oa, twilio, ids) = (&call.openai, &call.twilio, &call.ids);
    let sid = ids.call_sid.as_str();
    rest().set_answer(
        sid,
        Answer {
            status: 500,
            delay: Duration::ZERO,
        },
    );
    greeting_played(h, &call).await;
    let args = r#"{"reason":"done"}"#;
    model_calls_end_call(h, oa, "call_end_3", args).await;
    oa.send_all(oai::full_response(
        "resp_bye",
        "item_bye",
        &tagged_chunks(0x79, 2, 800),
        "失礼いたします。",
    ));
    let post = ok(h, rest().wait_request(sid, SOON).await);
    assert_call_update(&post, ids);
    let closed = ok(
        h,
        twilio
            .wait_until("the Worker to close the stream", SOON, |l| l.closed.clone())
            .await,
    );
    let detail = wait_ended(h, sid, &["hangup"]).await;
    let hangup = &events_of(&detail, "hangup")[0];
    assert_eq!(hangup["detail"]["ok"], false, "{hangup}");
    assert_eq!(hangup["detail"]["twilio"], 500, "{hangup}");
    // A 5xx is a passing failure: asked again after 1 s and 3 s, the same request each time.
    assert_eq!(hangup["detail"]["attempts"], 3, "{hangup}");
    let posts = rest().requests_for(sid);
    assert_eq!(posts.len(), 3, "three tries");
    assert!(posts.iter().all(|p| p.form == post.form), "{posts:?}");
    eprintln!(
        "[e2e] refused hang-up: stream closed with {:?}; call row end_reason {} failed {}",
        closed.close_frame, detail["call"]["end_reason"], detail["call"]["failed"]
    );
}
