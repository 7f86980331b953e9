//! Scenario tests of function calls of a response the caller talked over: the server
//! cancels that response (`interrupt_response`) and still reports the calls it had begun
//! (`response.function_call_arguments.done`, arguments as far as they got). Reported after
//! the caller started speaking, they are answered "not run" and not run; the response that
//! answer asks for waits for the caller's turn, whose answer by the server is that response.

use super::*;

const STOPPED: &str =
    r#"{"type":"input_audio_buffer.speech_stopped","audio_end_ms":1500,"item_id":"item_user"}"#;
const COMMITTED: &str = r#"{"type":"input_audio_buffer.committed","item_id":"item_user"}"#;
const CANCELLED: &str = r#"{"type":"response.done","response":{"id":"resp_1","status":"cancelled","status_details":{"type":"cancelled","reason":"turn_detected"}}}"#;

/// `response.function_call_arguments.done` of resp_1 (the response of [`delta`]'s audio).
fn call_of_resp_1(name: &str, args: &str) -> String {
    json!({"type":"response.function_call_arguments.done","response_id":"resp_1",
           "item_id":"fc_7","output_index":1,"call_id":"call_7","name":name,
           "arguments":args})
    .to_string()
}

/// A greeted call whose agent is speaking (resp_1) when the caller starts to talk, 300 ms
/// into its words.
fn caller_talks_over_resp_1() -> Sim {
    let mut sim = Sim::greeted(agent_with_tools());
    sim.response("resp_1");
    sim.agent_chunk("item_bye", &audio(1600, 9));
    sim.at(300);
    let out = sim.openai(&speech_started());
    assert_eq!(sends_of(&out, "clear").len(), 1);
    sim
}

/// After [`caller_talks_over_resp_1`], resp_1 reports a call of `name` and is cancelled:
/// what the machine sent for the call, then for the `response.done`.
fn talked_over_call(sim: &mut Sim, name: &str, args: &str) -> (Vec<Action>, Vec<Action>) {
    sim.at(320);
    let call = sim.openai(&call_of_resp_1(name, args));
    let done = sim.openai(CANCELLED);
    (call, done)
}

/// The call's answer to the function call among `out`: one `function_call_output` saying
/// it was not run, and nothing else sent to the model or anyone (the response it asks for
/// is held: the caller is speaking).
fn assert_answered_not_run(out: &[Action]) {
    let created = sends_of(out, "conversation.item.create");
    assert_eq!(created.len(), 1, "{out:?}");
    assert_eq!(created[0]["item"]["type"], "function_call_output");
    assert_eq!(created[0]["item"]["call_id"], "call_7");
    let output: Value =
        serde_json::from_str(created[0]["item"]["output"].as_str().unwrap()).unwrap();
    assert_eq!(output["ok"], false);
    assert!(
        output["error"].as_str().unwrap().starts_with("Not run"),
        "{output}"
    );
    assert!(sends_of(out, "response.create").is_empty(), "{out:?}");
    assert!(http_of(out).is_empty(), "{out:?}");
}

/// The call goes on: the server answers the caller's turn, and that answer is the response
/// the output asked for (no second one of ours); no hang-up or transfer follows (not even
/// past the goodbye's time limit).
fn assert_call_goes_on(sim: &mut Sim) {
    sim.at(1_500);
    sim.openai(STOPPED);
    sim.openai(COMMITTED);
    sim.response("resp_vad");
    assert_eq!(
        sim.logged("control.held_response_taken_by_server").len(),
        1,
        "the server's answer to the turn is the response asked for"
    );
    let m = sim.agent_chunk("item_answer", &audio(800, 1));
    let mut out = sim.response_done("resp_vad");
    out.extend(sim.twilio(&mark(&m)));
    sim.at(21_000);
    out.extend(sim.input(Input::Timeout));
    assert!(http_of(&out).is_empty(), "{out:?}");
    assert!(sends_of(&out, "response.create").is_empty(), "{out:?}");
    assert_eq!(sim.call.end_reason(), None);
}

#[test]
fn an_end_call_reported_after_the_caller_talked_over_its_response_is_not_run() {
    let mut sim = caller_talks_over_resp_1();
    // The goodbye was cut; the call it had begun comes with no arguments.
    let (call, done) = talked_over_call(&mut sim, "end_call", "");
    assert_answered_not_run(&call);
    assert!(system_notes(&call).is_empty(), "no ending to call off");
    assert!(http_of(&done).is_empty(), "no hang-up: {done:?}");
    assert!(sends_of(&done, "response.create").is_empty(), "{done:?}");
    assert_call_goes_on(&mut sim);
    assert_eq!(sim.call.stats().dropped["function_call_interrupted"], 1);
    let logged = sim.logged("tool.not_run");
    assert_eq!(logged.len(), 1);
    assert_eq!(logged[0]["name"], "end_call");
    assert_eq!(logged[0]["call_id"], "call_7");
    let kinds: Vec<String> = events(&sim.records).into_iter().map(|e| e.1).collect();
    assert_eq!(
        kinds,
        ["barge_in", "tool_call"],
        "no hang-up, nothing called off"
    );
    let tool = &events(&sim.records)[1].2;
    assert_eq!(tool["name"], "end_call");
    assert_eq!(tool["ok"], false);
}

#[test]
fn a_transfer_reported_after_the_caller_talked_over_its_response_is_not_run() {
    let mut sim = caller_talks_over_resp_1();
    let (call, done) = talked_over_call(&mut sim, "transfer_call", "{}");
    assert_answered_not_run(&call);
    assert!(http_of(&done).is_empty(), "no transfer: {done:?}");
    assert_call_goes_on(&mut sim);
    assert_eq!(sim.call.stats().dropped["function_call_interrupted"], 1);
}

#[test]
fn a_webhook_tool_reported_after_the_caller_talked_over_its_response_is_not_posted() {
    let mut sim = caller_talks_over_resp_1();
    // Arguments complete or not, the webhook is not asked.
    let (call, done) = talked_over_call(&mut sim, "lookup_customer", r#"{"phone":"+8190"}"#);
    assert_answered_not_run(&call);
    assert!(http_of(&done).is_empty(), "{done:?}");
    assert_call_goes_on(&mut sim);
    let tool = &events(&sim.records)[1].2;
    assert_eq!(tool["name"], "lookup_customer");
    assert_eq!(tool["arguments"]["phone"], "+8190");
    assert_eq!(tool["ok"], false);
}

#[test]
fn a_call_not_run_asks_for_a_response_once_no_answer_to_the_speech_comes() {
    // Noise the server never commits: speech stopped, no turn, no answer of its own. The
    // agent speaks once the wait for one is over, rather than leave the line silent.
    let mut sim = caller_talks_over_resp_1();
    let (call, done) = talked_over_call(&mut sim, "end_call", "");
    assert_answered_not_run(&call);
    assert!(sends_of(&done, "response.create").is_empty(), "{done:?}");
    sim.at(1_500);
    assert!(sends_of(&sim.openai(STOPPED), "response.create").is_empty());
    sim.at(1_500 + control::TURN_RESPONSE_WAIT.0 - 1);
    assert!(sends_of(&sim.input(Input::Timeout), "response.create").is_empty());
    sim.at(1_500 + control::TURN_RESPONSE_WAIT.0);
    let out = sim.input(Input::Timeout);
    assert_eq!(sends_of(&out, "response.create").len(), 1, "{out:?}");
    assert!(http_of(&out).is_empty(), "no hang-up: {out:?}");

    // Speech that never stops: held no longer than 15 s from its start.
    let mut sim = caller_talks_over_resp_1();
    let (_, done) = talked_over_call(&mut sim, "lookup_customer", "{}");
    assert!(sends_of(&done, "response.create").is_empty(), "{done:?}");
    let held_until = 300 + control::SPEECH_HOLD_LIMIT.0;
    sim.at(held_until - 1);
    assert!(sends_of(&sim.input(Input::Timeout), "response.create").is_empty());
    sim.at(held_until);
    let out = sim.input(Input::Timeout);
    assert_eq!(sends_of(&out, "response.create").len(), 1, "{out:?}");
    assert!(http_of(&out).is_empty(), "no webhook: {out:?}");
}

#[test]
fn a_call_reported_before_the_caller_spoke_still_runs() {
    // A webhook: its request is out before the caller talks, and its answer reaches the
    // model once their turn is answered.
    let mut sim = Sim::greeted(agent_with_tools());
    sim.response("resp_1");
    sim.agent_chunk("item_x", &audio(1600, 9));
    let out = sim.openai(&call_of_resp_1("lookup_customer", r#"{"phone":"+8190"}"#));
    let reqs = http_of(&out);
    assert_eq!(reqs.len(), 1, "{out:?}");
    sim.at(300);
    sim.openai(&speech_started());
    sim.openai(CANCELLED);
    let out = sim.input(Input::HttpDone {
        id: reqs[0].0,
        outcome: &http::Outcome::Response {
            status: 200,
            body: r#"{"name":"山田太郎"}"#.into(),
        },
    });
    let created = sends_of(&out, "conversation.item.create");
    assert_eq!(created[0]["item"]["output"], r#"{"name":"山田太郎"}"#);
    assert!(!sim
        .call
        .stats()
        .dropped
        .contains_key("function_call_interrupted"));

    // end_call in the response saying the goodbye: the ending starts, and the caller
    // speaking over the goodbye calls it off, as before.
    let mut sim = Sim::greeted(agent_with_tools());
    sim.response("resp_1");
    sim.agent_chunk("item_bye", &audio(1600, 9));
    let out = sim.openai(&call_of_resp_1("end_call", ""));
    let output = &sends_of(&out, "conversation.item.create")[0]["item"]["output"];
    assert!(output.as_str().unwrap().contains("Done"), "{output}");
    sim.at(300);
    let out = sim.openai(&speech_started());
    assert_eq!(system_notes(&out).len(), 1, "told the call was not ended");
    let out = sim.openai(CANCELLED);
    assert!(http_of(&out).is_empty(), "{out:?}");
    let kinds: Vec<String> = events(&sim.records).into_iter().map(|e| e.1).collect();
    assert_eq!(kinds, ["tool_call", "ending_called_off", "barge_in"]);
    assert_eq!(events(&sim.records)[0].2["ok"], true);
}

#[test]
fn a_call_of_the_caller_s_own_turn_response_runs() {
    // The response the caller talked over is done: the next one's calls are the model's
    // answer to the caller, and run.
    let mut sim = caller_talks_over_resp_1();
    sim.openai(CANCELLED);
    sim.openai(STOPPED);
    sim.openai(COMMITTED);
    sim.response("resp_vad");
    let call = json!({"type":"response.function_call_arguments.done","response_id":"resp_vad",
                      "item_id":"fc_8","output_index":0,"call_id":"call_8","name":"lookup_customer",
                      "arguments":"{}"});
    let out = sim.openai(&call.to_string());
    assert_eq!(http_of(&out).len(), 1, "{out:?}");
}

#[test]
fn a_response_the_caller_spoke_over_before_its_audio_came_is_not_played_nor_transcribed() {
    let mut sim = Sim::greeted(agent_with_tools());
    sim.response("resp_1");
    sim.at(300);
    let out = sim.openai(&speech_started());
    assert!(sends_of(&out, "clear").is_empty(), "nothing was playing");
    // Its first audio was on its way: not played over the caller.
    let out = sim.openai(&delta("item_a", &audio(800, 1)));
    assert!(sends_of(&out, "media").is_empty(), "{out:?}");
    let out = sim.openai(r#"{"type":"response.output_audio_transcript.done","item_id":"item_a","response_id":"resp_1","transcript":"かしこまりました。"}"#);
    assert!(out
        .iter()
        .all(|a| !matches!(a, Action::Persist(Record::Transcript { .. }))));
    sim.openai(CANCELLED);
    sim.twilio(STOP);
    let dropped = &sim.call.stats().dropped;
    assert_eq!(dropped["openai_audio_after_barge_in"], 1);
    assert_eq!(dropped["agent_transcript_after_barge_in"], 1);
    assert!(
        transcript(&sim.records).iter().all(|r| r.1 != Role::Agent),
        "{:?}",
        transcript(&sim.records)
    );

    // A reply heard in full before the caller spoke, its response still under way (a tool
    // call to come): its words stand.
    let mut sim = Sim::greeted(agent_with_tools());
    sim.response("resp_1");
    let m = sim.agent_chunk("item_a", &audio(800, 1));
    sim.at(200);
    sim.twilio(&mark(&m));
    sim.at(300);
    sim.openai(&speech_started());
    sim.openai(r#"{"type":"response.output_audio_transcript.done","item_id":"item_a","response_id":"resp_1","transcript":"かしこまりました。"}"#);
    let agent: Vec<_> = transcript(&sim.records)
        .into_iter()
        .filter(|r| r.1 == Role::Agent)
        .map(|r| r.2)
        .collect();
    assert_eq!(agent, ["かしこまりました。"]);
}
