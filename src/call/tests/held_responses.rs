//! Scenario tests of responses asked for while the caller is speaking (a tool's answer, a
//! key pressed, the wrap-up, a reply cancelled by a barge-in): held until their turn ends,
//! and then answered by the server's own response to that turn rather than by a second one.

use super::*;

const STOPPED: &str =
    r#"{"type":"input_audio_buffer.speech_stopped","audio_end_ms":1500,"item_id":"item_user"}"#;
const COMMITTED: &str = r#"{"type":"input_audio_buffer.committed","item_id":"item_user"}"#;

/// The next timer is due at `ms`, and what it releases is the held response.
fn held_response_goes_out_at(sim: &mut Sim, ms: u64) {
    assert_eq!(sim.call.poll_timeout(), Some(Millis(ms)));
    sim.at(ms);
    let out = sim.input(Input::Timeout);
    assert_eq!(sends_of(&out, "response.create").len(), 1, "{out:?}");
}

fn tool_answer(sim: &mut Sim, id: u64) -> Vec<Action> {
    sim.input(Input::HttpDone {
        id,
        outcome: &http::Outcome::Response {
            status: 200,
            body: r#"{"name":"山田太郎"}"#.into(),
        },
    })
}

/// The caller's turn ends and the server answers it by itself (resp_vad, done): what the
/// call sent at the end of that answer.
fn server_answers_turn(sim: &mut Sim) -> Vec<Action> {
    sim.openai(STOPPED);
    sim.openai(COMMITTED);
    sim.response("resp_vad");
    sim.response_done("resp_vad")
}

/// A greeted call whose model has called `lookup_customer` (resp_1, done); returns the
/// webhook's request id.
fn lookup_running() -> (Sim, u64) {
    let mut sim = Sim::greeted(agent_with_tools());
    sim.response("resp_1");
    let out = sim.function_call("lookup_customer", "{}");
    let (id, _) = http_of(&out)[0].clone();
    sim.response_done("resp_1");
    (sim, id)
}

#[test]
fn a_tool_answering_while_the_caller_speaks_is_answered_by_the_server_s_reply_to_their_turn() {
    let (mut sim, id) = lookup_running();
    // The caller goes on talking while the lookup runs.
    sim.at(1_000);
    sim.openai(&speech_started());
    sim.at(1_500);
    let out = tool_answer(&mut sim, id);
    assert_eq!(
        sends_of(&out, "conversation.item.create").len(),
        1,
        "the output goes in at once"
    );
    assert!(
        sends_of(&out, "response.create").is_empty(),
        "no reply over the caller: {out:?}"
    );
    sim.at(2_000);
    assert!(sim.openai(STOPPED).is_empty());
    assert!(sim.openai(COMMITTED).is_empty());
    // Server VAD answers their turn; that answer already sees the tool's output.
    sim.response("resp_vad");
    sim.agent_chunk("item_answer", &audio(800, 1));
    let out = sim.response_done("resp_vad");
    assert!(
        sends_of(&out, "response.create").is_empty(),
        "the turn is not answered twice: {out:?}"
    );
    sim.at(10_000);
    let out = sim.input(Input::Timeout);
    assert!(sends_of(&out, "response.create").is_empty(), "{out:?}");
}

/// The server's confirmation of the tool's output (`function_call_output`).
const OUTPUT_ADDED: &str = r#"{"type":"conversation.item.added","previous_item_id":"item_user","item":{"id":"item_out","type":"function_call_output","call_id":"call_1","output":"{}"}}"#;

#[test]
fn a_tool_answering_as_the_turn_ends_is_answered_after_a_server_reply_that_did_not_see_it() {
    let (mut sim, id) = lookup_running();
    sim.confirm_items = false;
    sim.at(1_000);
    sim.openai(&speech_started());
    sim.openai(STOPPED);
    // The server has committed the turn and created its answer; the tool answers before
    // either reaches us, so the output reaches the server after that answer was made.
    sim.at(1_050);
    let out = tool_answer(&mut sim, id);
    assert_eq!(sends_of(&out, "conversation.item.create").len(), 1);
    assert!(sends_of(&out, "response.create").is_empty(), "{out:?}");
    sim.openai(COMMITTED);
    sim.response("resp_vad");
    // Only now is the output confirmed: resp_vad was made without it.
    assert!(sim.openai(OUTPUT_ADDED).is_empty());
    sim.agent_chunk("item_answer", &audio(800, 1));
    let out = sim.response_done("resp_vad");
    assert_eq!(
        sends_of(&out, "response.create").len(),
        1,
        "the tool's answer is asked for once the server's reply is done: {out:?}"
    );
    assert_eq!(sim.logged("control.held_response_follows").len(), 1);
}

#[test]
fn an_output_confirmed_before_the_server_s_reply_is_answered_by_that_reply() {
    let (mut sim, id) = lookup_running();
    sim.confirm_items = false;
    sim.at(1_000);
    sim.openai(&speech_started());
    sim.at(1_500);
    tool_answer(&mut sim, id);
    assert!(sim.openai(OUTPUT_ADDED).is_empty());
    let out = server_answers_turn(&mut sim);
    assert!(sends_of(&out, "response.create").is_empty(), "{out:?}");
}

#[test]
fn an_output_the_server_never_confirms_holds_back_no_reply() {
    let (mut sim, id) = lookup_running();
    sim.confirm_items = false;
    sim.at(1_000);
    sim.openai(&speech_started());
    tool_answer(&mut sim, id);
    // The server refused the item (an `error`, no confirmation); the caller talks on.
    sim.at(7_000);
    let out = server_answers_turn(&mut sim);
    assert!(sends_of(&out, "response.create").is_empty(), "{out:?}");
    assert_eq!(sim.logged("openai.items_unconfirmed").len(), 1);
}

const KEY_2: &str =
    r#"{"event":"dtmf","streamSid":"MZ","dtmf":{"track":"inbound_track","digit":"2"}}"#;

/// The server's confirmation of the note of a key pressed.
const KEY_ADDED: &str = r#"{"type":"conversation.item.added","item":{"id":"item_key","type":"message","role":"user","status":"completed","content":[{"type":"input_text","text":"2"}]}}"#;

#[test]
fn an_output_the_server_refused_does_not_hold_back_the_next_item_s_reply() {
    let (mut sim, id) = lookup_running();
    sim.confirm_items = false;
    sim.at(1_000);
    sim.openai(&speech_started());
    let out = tool_answer(&mut sim, id);
    let sent = sends_of(&out, "conversation.item.create");
    let event_id = sent[0]["event_id"]
        .as_str()
        .expect("an event_id")
        .to_owned();
    // The server refuses the output, naming it; then a key is pressed and its note confirmed.
    sim.openai(&format!(
        r#"{{"type":"error","error":{{"type":"invalid_request_error","code":"invalid_value","message":"No tool call found with call_id 'call_1'.","param":"item.call_id","event_id":"{event_id}"}}}}"#
    ));
    sim.at(1_200);
    sim.twilio(KEY_2);
    assert!(sim.openai(KEY_ADDED).is_empty());
    sim.at(1_500);
    let out = server_answers_turn(&mut sim);
    assert!(
        sends_of(&out, "response.create").is_empty(),
        "the turn is not answered twice: {out:?}"
    );
}

#[test]
fn an_item_confirmed_twice_is_not_taken_for_the_next_one() {
    let (mut sim, id) = lookup_running();
    sim.confirm_items = false;
    sim.at(1_000);
    sim.openai(&speech_started());
    tool_answer(&mut sim, id);
    sim.twilio(KEY_2);
    // The output is confirmed under both names; the key's note is not yet.
    assert!(sim
        .openai(&OUTPUT_ADDED.replace("item.added", "item.created"))
        .is_empty());
    assert!(sim.openai(OUTPUT_ADDED).is_empty());
    sim.at(1_500);
    let out = server_answers_turn(&mut sim);
    assert_eq!(
        sends_of(&out, "response.create").len(),
        1,
        "the key is answered once the server's reply, made without it, is done: {out:?}"
    );
}

#[test]
fn a_reply_cancelled_by_a_second_barge_in_is_not_asked_for_over_the_caller() {
    let (mut sim, id) = lookup_running();
    // The caller asks "まだですか" during the lookup; the server answers by itself.
    sim.at(1_000);
    sim.openai(&speech_started());
    sim.openai(STOPPED);
    sim.openai(COMMITTED);
    sim.response("resp_vad");
    sim.agent_chunk("item_wait", &audio(1600, 1));
    // The tool answers while that response is on.
    sim.at(1_200);
    let out = tool_answer(&mut sim, id);
    assert!(sends_of(&out, "response.create").is_empty());
    // The caller talks over "少々お待ちください": barge-in, the server cancels resp_vad.
    sim.at(1_300);
    let out = sim.openai(&speech_started().replace("item_user", "item_user2"));
    assert_eq!(sends_of(&out, "clear").len(), 1);
    let out = sim.openai(r#"{"type":"response.done","response":{"id":"resp_vad","status":"cancelled","status_details":{"type":"cancelled","reason":"turn_detected"}}}"#);
    assert!(
        sends_of(&out, "response.create").is_empty(),
        "response.create sent while the caller is still speaking: {out:?}"
    );
    // Their turn ends: the server's answer to it is the reply the tool's answer wanted.
    sim.at(2_500);
    sim.openai(&STOPPED.replace("item_user", "item_user2"));
    sim.openai(&COMMITTED.replace("item_user", "item_user2"));
    sim.response("resp_vad2");
    let out = sim.response_done("resp_vad2");
    assert!(sends_of(&out, "response.create").is_empty(), "{out:?}");
}

#[test]
fn the_wrap_up_due_while_the_caller_speaks_is_said_in_the_answer_to_their_turn() {
    let agent = Agent {
        max_call_seconds: 60,
        ..Agent::default()
    };
    let mut sim = Sim::greeted(agent);
    sim.at(29_000);
    sim.openai(&speech_started());
    sim.at(30_000);
    let out = sim.input(Input::Timeout);
    assert_eq!(system_notes(&out).len(), 1, "the note goes in: {out:?}");
    assert!(
        sends_of(&out, "response.create").is_empty(),
        "wrap-up reply requested mid-utterance: {out:?}"
    );
    sim.at(31_000);
    let out = server_answers_turn(&mut sim);
    assert!(sends_of(&out, "response.create").is_empty(), "{out:?}");
}

#[test]
fn a_key_pressed_while_the_caller_speaks_is_answered_once() {
    let mut sim = Sim::greeted(Agent::default());
    sim.at(1_000);
    sim.openai(&speech_started());
    let out = sim.twilio(
        r#"{"event":"dtmf","streamSid":"MZ","dtmf":{"track":"inbound_track","digit":"2"}}"#,
    );
    assert_eq!(sends_of(&out, "conversation.item.create").len(), 1);
    assert!(sends_of(&out, "response.create").is_empty(), "{out:?}");
    sim.at(1_400);
    sim.openai(STOPPED);
    sim.openai(COMMITTED);
    let out = sim.openai(
        r#"{"type":"response.created","response":{"id":"resp_vad","status":"in_progress"}}"#,
    );
    assert!(out.is_empty(), "{out:?}");
    let out = sim.response_done("resp_vad");
    assert!(sends_of(&out, "response.create").is_empty(), "{out:?}");
}

#[test]
fn a_held_response_goes_out_when_no_turn_comes_of_the_speech() {
    // Speech too short to be a turn: stopped, never committed, no response of the server's.
    let (mut sim, id) = lookup_running();
    sim.at(1_000);
    sim.openai(&speech_started());
    sim.at(1_200);
    tool_answer(&mut sim, id);
    sim.at(1_300);
    sim.openai(STOPPED);
    held_response_goes_out_at(&mut sim, 2_800);

    // Committed, and still no response of the server's own.
    let (mut sim, id) = lookup_running();
    sim.at(1_000);
    sim.openai(&speech_started());
    tool_answer(&mut sim, id);
    sim.at(1_300);
    sim.openai(STOPPED);
    sim.at(1_400);
    sim.openai(COMMITTED);
    sim.at(2_899);
    assert!(sim.input(Input::Timeout).is_empty());
    sim.at(2_900);
    let out = sim.input(Input::Timeout);
    assert_eq!(sends_of(&out, "response.create").len(), 1, "{out:?}");

    // Speech that never stops (a noisy line): held no longer than 15 s from its start.
    let (mut sim, id) = lookup_running();
    sim.at(1_000);
    sim.openai(&speech_started());
    sim.at(1_200);
    tool_answer(&mut sim, id);
    held_response_goes_out_at(&mut sim, 16_000);
}

#[test]
fn a_held_response_released_over_speech_does_not_end_the_speech_s_hold_on_the_idle_clock() {
    let (mut sim, id) = lookup_running();
    sim.at(1_000);
    sim.openai(&speech_started());
    sim.at(1_200);
    tool_answer(&mut sim, id);
    // Held no longer than 15 s, it goes out over speech that goes on (no `speech_stopped`).
    sim.at(16_000);
    let out = sim.input(Input::Timeout);
    assert_eq!(sends_of(&out, "response.create").len(), 1, "{out:?}");
    sim.response("resp_held");
    sim.at(16_500);
    sim.response_done("resp_held");
    // Not an answer to the caller's turn, which is still under way: their speech still
    // counts as activity up to SPEECH_IDLE_LIMIT from its start, not the response's end.
    let due = Millis(1_000) + control::SPEECH_IDLE_LIMIT + IDLE;
    assert_eq!(sim.call.poll_timeout(), Some(due));
    let out = sim.run_until(due.0 - 1);
    assert!(system_notes(&out).is_empty(), "no check-in yet: {out:?}");
    assert!(sends_of(&out, "response.create").is_empty(), "{out:?}");
}

#[test]
fn with_semantic_vad_the_end_of_the_turn_is_awaited_longer() {
    let mut agent = agent_with_tools();
    agent.turn_detection.kind = "semantic_vad".into();
    let mut sim = Sim::greeted(agent);
    sim.response("resp_1");
    let out = sim.function_call("lookup_customer", "{}");
    let (id, _) = http_of(&out)[0].clone();
    sim.response_done("resp_1");
    sim.at(1_000);
    sim.openai(&speech_started());
    let out = tool_answer(&mut sim, id);
    assert!(sends_of(&out, "response.create").is_empty(), "{out:?}");
    sim.at(1_300);
    sim.openai(STOPPED);
    // A pause mid-thought: semantic VAD may take seconds to decide the turn is over.
    sim.at(2_800);
    assert!(sends_of(&sim.input(Input::Timeout), "response.create").is_empty());
    sim.at(4_000);
    sim.openai(COMMITTED);
    sim.response("resp_vad");
    let out = sim.response_done("resp_vad");
    assert!(sends_of(&out, "response.create").is_empty(), "{out:?}");
}

#[test]
fn a_response_held_when_the_session_is_lost_mid_speech_waits_for_the_new_session_s_turn() {
    let mut sim = Sim::greeted(Agent::default());
    sim.at(1_000);
    sim.openai(&speech_started());
    sim.twilio(r#"{"event":"dtmf","streamSid":"MZ","dtmf":{"track":"inbound_track","digit":"2"}}"#);
    sim.at(1_500);
    let out = lose_and_recover(&mut sim);
    // The new session hears the rest of the caller's words: no reply over them.
    assert!(sends_of(&out, "response.create").is_empty(), "{out:?}");
    sim.at(1_700);
    sim.openai(&speech_started());
    sim.at(2_500);
    let out = server_answers_turn(&mut sim);
    assert!(sends_of(&out, "response.create").is_empty(), "{out:?}");

    // The new session hears no more speech: the held response goes out shortly.
    let mut sim = Sim::greeted(Agent::default());
    sim.at(1_000);
    sim.openai(&speech_started());
    sim.twilio(r#"{"event":"dtmf","streamSid":"MZ","dtmf":{"track":"inbound_track","digit":"2"}}"#);
    sim.at(1_500);
    let out = lose_and_recover(&mut sim);
    assert!(sends_of(&out, "response.create").is_empty(), "{out:?}");
    held_response_goes_out_at(&mut sim, 3_000);
}

/// The session is lost; a new one opens and is ready. What the call sent it then.
fn lose_and_recover(sim: &mut Sim) -> Vec<Action> {
    sim.lose_session_and_reconnect();
    sim.openai_opened();
    sim.openai(&session_updated("audio/pcmu"))
}

#[test]
fn words_a_lost_session_took_before_their_turn_was_committed_are_asked_for_again() {
    // Lost while the caller speaks (in the silence before speech_stopped, say), and the new
    // session hears no more of them: nothing was held, and yet they are not left waiting.
    let mut sim = Sim::greeted(Agent::default());
    sim.at(1_000);
    sim.openai(&speech_started());
    sim.at(2_000);
    let out = lose_and_recover(&mut sim);
    assert!(system_notes(&out)[0].contains("もう一度"), "{out:?}");
    assert!(
        sends_of(&out, "response.create").is_empty(),
        "not over the caller"
    );
    held_response_goes_out_at(&mut sim, 3_500);

    // Lost once they stopped, before the commit (semantic VAD takes its time): the model is
    // told it missed them, and asked at once.
    let mut sim = Sim::greeted(Agent::default());
    sim.at(1_000);
    sim.openai(&speech_started());
    sim.at(2_000);
    sim.openai(STOPPED);
    sim.at(2_400);
    let out = lose_and_recover(&mut sim);
    let notes = system_notes(&out);
    assert!(notes.len() == 1 && notes[0].contains("もう一度"), "{out:?}");
    assert_eq!(sends_of(&out, "response.create").len(), 1, "{out:?}");

    // Committed before the loss: the words are in the conversation, and the new session,
    // seeded with them, answers them (see reconnect.rs); nothing is asked again.
    let mut sim = Sim::greeted(Agent::default());
    sim.at(1_000);
    sim.openai(&speech_started());
    sim.openai(STOPPED);
    sim.openai(COMMITTED);
    sim.openai(r#"{"type":"conversation.item.input_audio_transcription.completed","item_id":"item_user","transcript":"予約したいです"}"#);
    sim.at(1_500);
    let out = lose_and_recover(&mut sim);
    assert!(system_notes(&out).is_empty(), "{out:?}");
    assert_eq!(sends_of(&out, "response.create").len(), 1, "{out:?}");
}

#[test]
fn a_reply_cut_by_a_noise_that_makes_no_turn_is_asked_for_again() {
    let mut sim = Sim::greeted(Agent::default());
    sim.at(1_000);
    sim.response("resp_1");
    sim.agent_chunk("item_a", &audio(1600, 1));
    // A cough: barge-in, and the server cancels the reply.
    sim.at(1_100);
    let out = sim.openai(&speech_started());
    assert_eq!(sends_of(&out, "clear").len(), 1);
    let out = sim.openai(r#"{"type":"response.done","response":{"id":"resp_1","status":"cancelled","status_details":{"type":"cancelled","reason":"turn_detected"}}}"#);
    assert!(sends_of(&out, "response.create").is_empty(), "{out:?}");
    // Too short to be a turn: stopped, never committed.
    sim.at(1_300);
    sim.openai(STOPPED);
    held_response_goes_out_at(&mut sim, 2_800);

    // Real words: the server's answer to their turn is the only response.
    let mut sim = Sim::greeted(Agent::default());
    sim.at(1_000);
    sim.response("resp_1");
    sim.agent_chunk("item_a", &audio(1600, 1));
    sim.at(1_100);
    sim.openai(&speech_started());
    sim.openai(r#"{"type":"response.done","response":{"id":"resp_1","status":"cancelled","status_details":{"type":"cancelled","reason":"turn_detected"}}}"#);
    sim.at(2_000);
    let out = server_answers_turn(&mut sim);
    assert!(sends_of(&out, "response.create").is_empty(), "{out:?}");
    let out = sim.run_until(40_000);
    assert_eq!(
        sends_of(&out, "response.create").len(),
        1,
        "only the idle check-in, 30 s on: {out:?}"
    );
    // A noise while nothing is owed the caller asks for nothing.
    let mut sim = Sim::greeted(Agent::default());
    sim.at(1_000);
    sim.openai(&speech_started());
    sim.at(1_300);
    sim.openai(STOPPED);
    assert!(sends_of(&sim.run_until(20_000), "response.create").is_empty());
}
