//! Scenario tests of responses that fail (`response.done` with status `failed`): asked for
//! again when the failure passes, the caller handed to the fallback when it does not, and
//! the call's record saying so either way.

use super::*;

/// The server's `response.done` for a response that failed with `status_details.error`.
fn failed(sim: &mut Sim, id: &str, error: &str) -> Vec<Action> {
    sim.openai(&format!(
        r#"{{"type":"response.done","event_id":"e","response":{{"object":"realtime.response","id":"{id}","status":"failed","status_details":{{"type":"failed","error":{{"type":"{error}","code":"{error}"}}}},"output":[],"usage":null}}}}"#
    ))
}

fn kinds(sim: &Sim) -> Vec<String> {
    events(&sim.records).into_iter().map(|e| e.1).collect()
}

fn failed_flag(sim: &Sim) -> Option<bool> {
    sim.records.iter().find_map(|r| match r {
        Record::CallEnded { failed, .. } => Some(*failed),
        _ => None,
    })
}

#[test]
fn a_greeting_failing_for_want_of_quota_hands_the_caller_to_the_fallback() {
    let mut sim = Sim::live_with(Agent::default());
    sim.response("resp_g");
    let out = failed(&mut sim, "resp_g", "insufficient_quota");
    // Not asked again (it would fail the same way): the caller hears the fallback.
    assert!(sends_of(&out, "response.create").is_empty(), "{out:?}");
    let id = expect_redirect(&out);
    assert_eq!(kinds(&sim), ["response_failed", "fallback"]);
    let ev = &events(&sim.records)[0].2;
    assert_eq!(ev["code"], "insufficient_quota");
    assert_eq!(ev["then"], "fallback");
    assert_eq!(sim.logged("control.response_failed").len(), 1);
    assert!(sim.info_events.iter().any(|e| e == "call.fallback"));
    sim.redirect_answered(id, 200);
    sim.twilio(STOP);
    sim.assert_failed("openai_response_failed", "insufficient_quota");
}

#[test]
fn a_greeting_failing_for_a_server_error_is_asked_for_again_once() {
    let mut sim = Sim::live_with(Agent::default());
    sim.response("resp_g");
    sim.at(300);
    let out = failed(&mut sim, "resp_g", "server_error");
    assert!(sends_of(&out, "response.create").is_empty(), "not at once");
    assert!(http_of(&out).is_empty(), "{out:?}");
    assert_eq!(sim.call.poll_timeout(), Some(Millis(1_300)), "a second on");
    sim.at(1_300);
    let out = sim.input(Input::Timeout);
    let asks = sends_of(&out, "response.create");
    assert_eq!(asks.len(), 1, "{out:?}");
    assert_eq!(asks[0]["event_id"], openai::GREETING_EVENT_ID);
    assert_eq!(
        asks[0]["response"]["instructions"],
        super::default_greeting_instructions(),
        "asked as it was first asked"
    );
    sim.response("resp_g2");
    sim.agent_chunk("item_g", &audio(800, 1));
    let out = sim.response_done("resp_g2");
    assert!(http_of(&out).is_empty());
    assert_eq!(kinds(&sim), ["response_failed"]);
    assert_eq!(events(&sim.records)[0].2["then"], "ask_again");
    // Once answered, a later failure is asked again once more, not taken as the second.
    sim.at(5_000);
    sim.twilio(r#"{"event":"dtmf","streamSid":"MZ","dtmf":{"track":"inbound_track","digit":"1"}}"#);
    sim.response("resp_d");
    let out = failed(&mut sim, "resp_d", "server_error");
    assert!(http_of(&out).is_empty(), "{out:?}");
    sim.at(6_000);
    let out = sim.input(Input::Timeout);
    let asks = sends_of(&out, "response.create");
    assert_eq!(asks[0]["event_id"], openai::RESPONSE_EVENT_ID, "{out:?}");
}

#[test]
fn a_response_failing_again_when_asked_again_hands_the_caller_to_the_fallback() {
    let mut sim = Sim::greeted(Agent::default());
    sim.at(IDLE.0);
    let out = sim.input(Input::Timeout);
    assert_eq!(sends_of(&out, "response.create").len(), 1, "check-in");
    sim.response("resp_c");
    failed(&mut sim, "resp_c", "server_error");
    sim.at(IDLE.0 + 1_000);
    let out = sim.input(Input::Timeout);
    assert_eq!(sends_of(&out, "response.create").len(), 1, "asked again");
    sim.response("resp_c2");
    let out = failed(&mut sim, "resp_c2", "server_error");
    let id = expect_redirect(&out);
    let then: Vec<Value> = events(&sim.records)
        .into_iter()
        .filter(|e| e.1 == "response_failed")
        .map(|e| e.2["then"].clone())
        .collect();
    assert_eq!(then, ["ask_again", "fallback"]);
    sim.redirect_answered(id, 200);
    sim.twilio(STOP);
    sim.assert_failed("openai_response_failed", "server_error");
}

#[test]
fn a_reply_owed_after_a_tool_is_asked_for_again_when_it_fails() {
    let mut sim = Sim::greeted(agent_with_tools());
    sim.response("resp_1");
    let out = sim.function_call("lookup_customer", "{}");
    let (id, _) = http_of(&out)[0].clone();
    sim.response_done("resp_1");
    sim.at(500);
    let out = sim.input(Input::HttpDone {
        id,
        outcome: &http::Outcome::Response {
            status: 200,
            body: "{}".into(),
        },
    });
    assert_eq!(sends_of(&out, "response.create").len(), 1);
    sim.response("resp_2");
    sim.at(600);
    failed(&mut sim, "resp_2", "server_error");
    sim.at(1_600);
    let out = sim.input(Input::Timeout);
    let asks = sends_of(&out, "response.create");
    assert_eq!(asks.len(), 1, "{out:?}");
    assert_eq!(asks[0]["event_id"], openai::RESPONSE_EVENT_ID);
}

#[test]
fn a_failed_response_the_caller_talked_over_is_not_asked_for_again() {
    let mut sim = Sim::greeted(Agent::default());
    sim.twilio(r#"{"event":"dtmf","streamSid":"MZ","dtmf":{"track":"inbound_track","digit":"1"}}"#);
    sim.response("resp_d");
    // The caller speaks: their turn gets the server's own answer.
    sim.at(200);
    sim.openai(&speech_started());
    failed(&mut sim, "resp_d", "server_error");
    assert_eq!(events(&sim.records).last().unwrap().2["then"], "none");
    sim.at(2_000);
    let out = sim.input(Input::Timeout);
    assert!(sends_of(&out, "response.create").is_empty(), "{out:?}");
}

#[test]
fn a_goodbye_failing_for_want_of_quota_still_ends_the_call_recorded_as_failed() {
    let mut sim = Sim::greeted(Agent::default());
    sim.at(IDLE.0);
    sim.input(Input::Timeout);
    sim.response("resp_c");
    sim.response_done("resp_c");
    sim.at(2 * IDLE.0);
    let out = sim.input(Input::Timeout);
    assert_eq!(sends_of(&out, "response.create").len(), 1, "goodbye");
    sim.response("resp_bye");
    let out = failed(&mut sim, "resp_bye", "insufficient_quota");
    // Not left hanging until the goodbye's timeout, nor handed to the fallback (nobody is
    // there to hear it): hung up at once, as planned.
    let id = ending_request(&out, "end_call");
    assert_eq!(
        events(&sim.records).last().unwrap().2["then"],
        "end_as_planned"
    );
    sim.redirect_answered(id, 200);
    sim.twilio(STOP);
    assert_eq!(sim.end_label(), Some("openai_response_failed"));
    assert_eq!(failed_flag(&sim), Some(true));
    let detail = sim.records.iter().find_map(|r| match r {
        Record::CallEnded { end_detail, .. } => end_detail.clone(),
        _ => None,
    });
    assert_eq!(
        detail.as_deref(),
        Some("insufficient_quota; then agent_hangup: idle")
    );

    // A transfer notice that fails: the caller is put through all the same.
    let mut sim = Sim::greeted(agent_with_tools());
    sim.response("resp_1");
    sim.function_call("transfer_call", "{}");
    sim.response_done("resp_1");
    sim.response("resp_2");
    let out = failed(&mut sim, "resp_2", "insufficient_quota");
    let reqs = http_of(&out);
    assert_eq!(reqs.len(), 1, "{out:?}");
    let form: Vec<(String, String)> = form_urlencoded::parse(reqs[0].1.body.as_bytes())
        .into_owned()
        .collect();
    assert!(
        form[0].1.contains(TRANSFER_ACTION),
        "the transfer, not the fallback: {form:?}"
    );
    sim.redirect_answered(reqs[0].0, 200);
    sim.twilio(STOP);
    assert_eq!(sim.end_label(), Some("openai_response_failed"));
}

#[test]
fn a_goodbye_failing_for_a_server_error_is_asked_for_again_then_the_call_ends() {
    let mut sim = Sim::greeted(agent_with_tools());
    sim.response("resp_1");
    sim.function_call("end_call", "{}");
    sim.response_done("resp_1");
    sim.response("resp_2");
    let out = failed(&mut sim, "resp_2", "server_error");
    assert!(
        http_of(&out).is_empty(),
        "not hung up without a word: {out:?}"
    );
    sim.at(1_000);
    let out = sim.input(Input::Timeout);
    assert_eq!(sends_of(&out, "response.create").len(), 1, "{out:?}");
    sim.response("resp_3");
    let m = sim.agent_chunk("item_bye", &audio(800, 9));
    let out = sim.response_done("resp_3");
    assert!(http_of(&out).is_empty(), "the goodbye plays first");
    sim.at(1_200);
    let out = sim.twilio(&mark(&m));
    let reqs = http_of(&out);
    assert_eq!(reqs[0].1.body, "Status=completed", "{out:?}");
    sim.redirect_answered(reqs[0].0, 200);
    sim.twilio(STOP);
    assert_eq!(sim.end_label(), Some("agent_hangup"));
    assert_eq!(failed_flag(&sim), Some(false));
}

#[test]
fn an_incomplete_response_is_recorded_and_the_call_goes_on() {
    let mut sim = Sim::greeted(Agent::default());
    sim.twilio(r#"{"event":"dtmf","streamSid":"MZ","dtmf":{"track":"inbound_track","digit":"1"}}"#);
    sim.response("resp_d");
    let out = sim.openai(r#"{"type":"response.done","response":{"id":"resp_d","status":"incomplete","status_details":{"type":"incomplete","reason":"max_output_tokens"}}}"#);
    assert!(out.is_empty(), "no fallback, nothing asked again: {out:?}");
    let last = events(&sim.records).pop().unwrap();
    assert_eq!(last.1, "response_incomplete");
    assert_eq!(last.2["reason"], "max_output_tokens");
    assert!(sim.info_events.iter().any(|e| e == "openai.response.done"));
    sim.at(2_000);
    assert!(sim.input(Input::Timeout).is_empty());
    sim.twilio(STOP);
    assert_eq!(sim.end_label(), Some("twilio_stop"));
    assert_eq!(failed_flag(&sim), Some(false));
}

#[test]
fn a_rate_limit_is_asked_again_once_and_hands_the_caller_over_when_it_holds() {
    let mut sim = Sim::live_with(Agent::default());
    sim.response("resp_g");
    sim.at(300);
    // A rate limit can clear within seconds: asked again a second on, not the fallback.
    let out = failed(&mut sim, "resp_g", "rate_limit_exceeded");
    assert!(http_of(&out).is_empty(), "no fallback yet: {out:?}");
    assert_eq!(sim.call.poll_timeout(), Some(Millis(1_300)));
    sim.at(1_300);
    let out = sim.input(Input::Timeout);
    assert_eq!(sends_of(&out, "response.create").len(), 1, "{out:?}");
    // Still limited: the caller is not left in silence.
    sim.response("resp_g2");
    let out = failed(&mut sim, "resp_g2", "rate_limit_exceeded");
    let id = expect_redirect(&out);
    assert_eq!(
        kinds(&sim),
        ["response_failed", "response_failed", "fallback"]
    );
    sim.redirect_answered(id, 200);
    sim.twilio(STOP);
    sim.assert_failed("openai_response_failed", "rate_limit_exceeded");
}
