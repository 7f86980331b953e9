//! Scenario tests of a Realtime session lost mid-call and replaced: what was under way at
//! the loss (a reply, the greeting, a goodbye, keypad presses) carries on in the new one.

use super::*;

/// The new session opens and is ready; returns what the call sent it then.
fn ready(sim: &mut Sim) -> Vec<Action> {
    sim.openai_opened();
    sim.openai(&session_updated("audio/pcmu"))
}

#[test]
fn the_reconnect_gap_does_not_count_as_silence() {
    let mut sim = Sim::greeted(Agent::default());
    sim.at(IDLE.0 - 2_000);
    sim.lose_session_and_reconnect();
    sim.at(IDLE.0 + 500);
    ready(&mut sim);
    // The idle clock starts again once the new session is there, rather than a check-in
    // going out the moment it is.
    assert_eq!(sim.call.poll_timeout(), Some(IDLE + IDLE + Millis(500)));
    let out = sim.input(Input::Timeout);
    assert!(system_notes(&out).is_empty(), "{out:?}");
}

#[test]
fn a_turn_cut_before_any_of_it_was_heard_is_rewritten_empty_and_not_seeded() {
    let mut sim = Sim::greeted(Agent::default());
    sim.response("resp_1");
    sim.openai(r#"{"type":"response.output_item.added","item":{"id":"item_a","type":"message","role":"assistant"}}"#);
    for i in 0..10u8 {
        sim.agent_chunk("item_a", &audio(800, i));
    }
    // The whole transcript comes (and is written) before Twilio has played any of it.
    sim.openai(r#"{"type":"response.output_audio_transcript.done","item_id":"item_a","response_id":"resp_1","transcript":"全部の長い説明です。"}"#);
    let whole = transcript(&sim.records);
    assert_eq!(whole.last().unwrap().2, "全部の長い説明です。");
    // The caller speaks before the audio can have reached Twilio (`PLAY_LEAD`).
    sim.at(150);
    let out = sim.openai(
        r#"{"type":"input_audio_buffer.speech_started","audio_start_ms":100,"item_id":"item_u"}"#,
    );
    assert_eq!(
        sends_of(&out, "conversation.item.truncate")[0]["audio_end_ms"],
        0
    );
    // The same entry (the upsert replaces it by seq) now says the caller heard none of it.
    let t = transcript(&sim.records);
    assert_eq!(t.len(), whole.len());
    let cut = t.last().unwrap();
    assert_eq!(cut.0, whole.last().unwrap().0);
    assert_eq!((cut.2.as_str(), cut.4), ("", true));
    sim.at(1_000);
    sim.lose_session_and_reconnect();
    let out = ready(&mut sim);
    assert!(
        messages(&out).iter().all(|(role, _)| role == "system"),
        "nothing the caller heard to seed: {out:?}"
    );
}

#[test]
fn a_cut_turn_whose_server_transcript_comes_back_empty_keeps_its_estimate() {
    let mut sim = Sim::greeted(Agent::default());
    sim.response("resp_1");
    sim.openai(r#"{"type":"response.output_item.added","item":{"id":"item_a","type":"message","role":"assistant"}}"#);
    sim.openai(r#"{"type":"response.output_audio_transcript.delta","item_id":"item_a","delta":"一二三四五六七八九十"}"#);
    // 1000 ms of audio, of which Twilio confirms 300 ms played.
    let marks: Vec<String> = (0..10u8)
        .map(|i| sim.agent_chunk("item_a", &audio(800, i)))
        .collect();
    sim.at(300);
    sim.twilio(&mark(&marks[2]));
    let out = sim.openai(
        r#"{"type":"input_audio_buffer.speech_started","audio_start_ms":250,"item_id":"item_u"}"#,
    );
    assert_eq!(
        sends_of(&out, "conversation.item.truncate")[0]["audio_end_ms"],
        300
    );
    assert_eq!(sends_of(&out, "conversation.item.retrieve").len(), 1);
    let estimated = transcript(&sim.records);
    let cut = estimated.last().unwrap().clone();
    assert_eq!(
        (cut.1, cut.2.as_str(), cut.4),
        (Role::Agent, "一二三", true)
    );
    // The truncate deleted the server's transcript: the item comes back with none.
    let out = sim.openai(r#"{"type":"conversation.item.retrieved","item":{"id":"item_a","type":"message","role":"assistant","content":[{"type":"output_audio","transcript":""}]}}"#);
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(
        transcript(&sim.records),
        estimated,
        "the row is not rewritten"
    );
    sim.openai(r#"{"type":"response.done","response":{"id":"resp_1","status":"cancelled","status_details":{"type":"cancelled","reason":"turn_detected"}}}"#);
    sim.at(1_000);
    sim.lose_session_and_reconnect();
    let out = ready(&mut sim);
    assert!(
        messages(&out).contains(&("assistant".to_owned(), "一二三".to_owned())),
        "the estimate is seeded: {out:?}"
    );
}

fn dtmf(digit: &str) -> String {
    format!(
        r#"{{"event":"dtmf","streamSid":"{STREAM}","sequenceNumber":"5","dtmf":{{"track":"inbound_track","digit":"{digit}"}}}}"#
    )
}

/// The text of the `conversation.item.create` messages among `out`: (role, text).
fn messages(out: &[Action]) -> Vec<(String, String)> {
    sends_of(out, "conversation.item.create")
        .iter()
        .map(|v| {
            let item = &v["item"];
            let text = item["content"][0]["text"].as_str().unwrap_or_default();
            (item["role"].as_str().unwrap().to_owned(), text.to_owned())
        })
        .collect()
}

#[test]
fn a_key_pressed_before_the_first_session_is_ready_reaches_it() {
    let mut sim = Sim::new();
    sim.twilio(&start());
    sim.at(300);
    assert!(sim.twilio(&dtmf("1")).is_empty());
    sim.openai_opened();
    let out = ready(&mut sim);
    assert!(is_greeting(&out[0]), "{out:?}");
    assert_eq!(
        messages(&out),
        [(
            "user".to_owned(),
            "（お客様が電話のキーパッドで「1」を押しました）".to_owned()
        )]
    );
    // Answered once the greeting is done (one response at a time).
    sim.response("resp_g");
    let out = sim.response_done("resp_g");
    assert_eq!(sends_of(&out, "response.create").len(), 1, "{out:?}");
}

#[test]
fn keys_pressed_before_and_during_a_reconnect_reach_the_new_session_in_order() {
    let mut sim = Sim::greeted(Agent::default());
    sim.twilio(&dtmf("1"));
    sim.response("resp_d");
    sim.response_done("resp_d");
    sim.openai(r#"{"type":"conversation.item.added","item":{"id":"item_u","type":"message","role":"user"}}"#);
    sim.openai(r#"{"type":"conversation.item.input_audio_transcription.completed","item_id":"item_u","transcript":"予約の件です"}"#);
    sim.at(1_000);
    sim.lose_session_and_reconnect();
    sim.at(1_200);
    assert!(sim.twilio(&dtmf("2")).is_empty());
    sim.at(1_500);
    let out = ready(&mut sim);
    let key = |d: &str| {
        (
            "user".to_owned(),
            format!("（お客様が電話のキーパッドで「{d}」を押しました）"),
        )
    };
    assert_eq!(
        messages(&out),
        [
            key("1"),
            ("user".to_owned(), "予約の件です".to_owned()),
            key("2")
        ]
    );
    assert_eq!(sends_of(&out, "response.create").len(), 1, "{out:?}");
}

/// The caller has asked something (transcribed) and the server has started its answer.
fn caller_asks(sim: &mut Sim) {
    sim.at(1_000);
    sim.openai(
        r#"{"type":"input_audio_buffer.speech_started","audio_start_ms":900,"item_id":"item_u"}"#,
    );
    sim.openai(r#"{"type":"conversation.item.added","item":{"id":"item_u","type":"message","role":"user"}}"#);
    sim.openai(r#"{"type":"conversation.item.input_audio_transcription.completed","item_id":"item_u","transcript":"火曜日に予約できますか"}"#);
    sim.response("resp_1");
}

#[test]
fn a_reply_under_way_when_the_session_is_lost_is_asked_of_the_new_one() {
    let mut sim = Sim::greeted(Agent::default());
    caller_asks(&mut sim);
    sim.at(2_000);
    sim.lose_session_and_reconnect();
    sim.at(2_500);
    let out = ready(&mut sim);
    // Seeded first, so the answer is to the caller's question; nothing of the lost reply
    // was heard, so there is nothing to tell the model about it.
    let kinds: Vec<Value> = out
        .iter()
        .map(|a| json_of(a)["type"].clone())
        .filter(|t| t != "input_audio_buffer.append")
        .collect();
    assert_eq!(kinds, ["conversation.item.create", "response.create"]);
    assert_eq!(
        messages(&out),
        [("user".to_owned(), "火曜日に予約できますか".to_owned())]
    );
    assert_eq!(
        sends_of(&out, "response.create")[0]["event_id"],
        openai::RESPONSE_EVENT_ID
    );
    // A response asked for and not yet started is asked again too.
    let mut sim = Sim::greeted(Agent::default());
    sim.twilio(&dtmf("3"));
    sim.lose_session_and_reconnect();
    let out = ready(&mut sim);
    assert_eq!(sends_of(&out, "response.create").len(), 1, "{out:?}");
}

#[test]
fn a_reply_cut_short_by_the_loss_is_taken_up_where_the_caller_stopped_hearing_it() {
    let mut sim = Sim::greeted(Agent::default());
    caller_asks(&mut sim);
    sim.openai(r#"{"type":"response.output_item.added","item":{"id":"item_a","type":"message","role":"assistant"}}"#);
    sim.openai(r#"{"type":"response.output_audio_transcript.delta","item_id":"item_a","delta":"はい、火曜日の"}"#);
    for i in 0..3u8 {
        sim.agent_chunk("item_a", &audio(800, i));
    }
    sim.at(1_500);
    sim.lose_session_and_reconnect();
    let out = ready(&mut sim);
    let notes = system_notes(&out);
    assert_eq!(notes.len(), 1, "{out:?}");
    assert!(notes[0].contains("「はい、火曜日の」"), "{notes:?}");
    let last = json_of(
        out.iter()
            .rfind(|a| json_of(a)["type"] != "input_audio_buffer.append")
            .unwrap(),
    );
    assert_eq!(last["type"], "response.create", "after the note: {out:?}");
}

/// The caller asks; the agent's reply "はい、火曜日の…" is under way, 300 ms of it sent
/// (three chunks, whose marks are returned) and none confirmed played.
fn reply_under_way(sim: &mut Sim) -> Vec<String> {
    caller_asks(sim);
    sim.openai(r#"{"type":"response.output_item.added","item":{"id":"item_a","type":"message","role":"assistant"}}"#);
    sim.openai(r#"{"type":"response.output_audio_transcript.delta","item_id":"item_a","delta":"はい、火曜日の"}"#);
    (0..3u8)
        .map(|i| sim.agent_chunk("item_a", &audio(800, i)))
        .collect()
}

fn agent_rows(sim: &Sim) -> Vec<(String, bool)> {
    transcript(&sim.records)
        .into_iter()
        .filter(|r| r.1 == Role::Agent)
        .map(|r| (r.2, r.4))
        .collect()
}

#[test]
fn a_reply_the_session_was_lost_in_is_in_the_transcript_as_far_as_it_was_sent() {
    let mut sim = Sim::greeted(Agent::default());
    let marks = reply_under_way(&mut sim);
    sim.at(1_500);
    sim.lose_session_and_reconnect();
    // Its transcript will never come; what was sent plays out, and is its row.
    assert_eq!(agent_rows(&sim), [("はい、火曜日の".to_owned(), true)]);
    ready(&mut sim);
    for m in &marks {
        sim.twilio(&mark(m));
    }
    sim.at(5_000);
    sim.twilio(STOP);
    assert_eq!(agent_rows(&sim), [("はい、火曜日の".to_owned(), true)]);

    // A barge-in over what still plays of it: the row is what was heard.
    let mut sim = Sim::greeted(Agent::default());
    let marks = reply_under_way(&mut sim);
    sim.at(1_500);
    sim.lose_session_and_reconnect();
    sim.twilio(&mark(&marks[0]));
    sim.openai_opened();
    sim.openai(&session_updated("audio/pcmu"));
    sim.openai(&speech_started());
    let rows = agent_rows(&sim);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(
        rows[0].1 && rows[0].0.chars().count() < "はい、火曜日の".chars().count(),
        "{rows:?}"
    );
}

#[test]
fn a_reply_the_caller_hung_up_on_is_in_the_transcript_as_far_as_it_played() {
    let mut sim = Sim::greeted(Agent::default());
    let marks = reply_under_way(&mut sim);
    // The first 100 ms played, then the caller hung up: no transcript of the reply came.
    sim.at(1_200);
    sim.twilio(&mark(&marks[0]));
    sim.twilio(STOP);
    let rows = agent_rows(&sim);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(rows[0].1, "cut: {rows:?}");
    assert_eq!(rows[0].0, "はい", "a third of it: {rows:?}");

    // Whose full transcript came: written once, as it came.
    let mut sim = Sim::greeted(Agent::default());
    let marks = reply_under_way(&mut sim);
    sim.openai(r#"{"type":"response.output_audio_transcript.done","item_id":"item_a","response_id":"resp_1","transcript":"はい、火曜日の十時でしたら空いております。"}"#);
    sim.twilio(&mark(&marks[0]));
    sim.twilio(STOP);
    assert_eq!(
        agent_rows(&sim),
        [(
            "はい、火曜日の十時でしたら空いております。".to_owned(),
            false
        )]
    );
}

#[test]
fn a_greeting_lost_before_any_of_it_was_heard_is_asked_for_again() {
    // Started, and lost before any audio.
    let mut sim = Sim::live_with(Agent::default());
    sim.response("resp_g");
    sim.at(500);
    sim.lose_session_and_reconnect();
    let out = ready(&mut sim);
    let greeting: Vec<&Action> = out.iter().filter(|a| is_greeting(a)).collect();
    assert_eq!(greeting.len(), 1, "{out:?}");
    let greeting = json_of(greeting[0]);
    assert_eq!(greeting["event_id"], openai::GREETING_EVENT_ID);
    assert_eq!(
        greeting["response"]["instructions"],
        super::default_greeting_instructions()
    );
    // Asked for and not yet started.
    let mut sim = Sim::live_with(Agent::default());
    sim.lose_session_and_reconnect();
    let out = ready(&mut sim);
    assert_eq!(
        sends_of(&out, "response.create")[0]["event_id"],
        openai::GREETING_EVENT_ID
    );
    // Part of it heard: it is taken up where it stopped, not said again from the start.
    let mut sim = Sim::live_with(Agent::default());
    sim.response("resp_g");
    sim.openai(r#"{"type":"response.output_audio_transcript.delta","item_id":"item_g","delta":"お電話ありがとうございます。"}"#);
    sim.agent_chunk("item_g", &audio(800, 1));
    sim.lose_session_and_reconnect();
    let out = ready(&mut sim);
    let asks = sends_of(&out, "response.create");
    assert_eq!(asks.len(), 1, "{out:?}");
    assert_eq!(asks[0]["event_id"], openai::RESPONSE_EVENT_ID);
    assert!(system_notes(&out)[0].contains("お電話ありがとうございます。"));
}

#[test]
fn a_goodbye_heard_in_part_when_the_session_is_lost_ends_the_call_once_it_has_played() {
    let mut sim = Sim::greeted(agent_with_tools());
    sim.response("resp_1");
    sim.at(1_000);
    sim.function_call("end_call", "{}");
    sim.response_done("resp_1");
    sim.response("resp_2");
    let marks: Vec<String> = (0..10u8)
        .map(|i| sim.agent_chunk("item_bye", &audio(800, i)))
        .collect();
    sim.at(1_200);
    // It stands as said: nothing more is wanted of the agent, so no new session.
    let out = sim.lose_session();
    Sim::expect_no_new_session(&out, "a goodbye heard in part");
    // The hang-up follows what was sent as soon as it has played, not GOODBYE_TIMEOUT on.
    sim.at(2_300);
    for m in &marks[..9] {
        assert!(http_of(&sim.twilio(&mark(m))).is_empty());
    }
    let out = sim.twilio(&mark(&marks[9]));
    assert_eq!(http_of(&out)[0].1.body, "Status=completed", "{out:?}");
}

#[test]
fn a_goodbye_not_yet_said_when_the_session_is_lost_is_asked_of_the_new_one() {
    // end_call answered, the goodbye asked for and not started.
    let mut sim = Sim::greeted(agent_with_tools());
    sim.response("resp_1");
    sim.function_call("end_call", "{}");
    let out = sim.response_done("resp_1");
    assert_eq!(sends_of(&out, "response.create").len(), 1);
    sim.at(500);
    sim.lose_session_and_reconnect();
    sim.at(900);
    let out = ready(&mut sim);
    // The tool's output, which said what to do, went with the old session: told again.
    let notes = system_notes(&out);
    assert_eq!(notes.len(), 1, "{out:?}");
    assert!(notes[0].contains("お別れ"), "{notes:?}");
    let last = json_of(out.last().unwrap());
    assert_eq!(last["type"], "response.create", "{out:?}");
    sim.response("resp_2");
    let m = sim.agent_chunk("item_bye", &audio(800, 1));
    sim.response_done("resp_2");
    sim.at(1_200);
    let out = sim.twilio(&mark(&m));
    assert_eq!(http_of(&out)[0].1.body, "Status=completed", "{out:?}");

    // transfer_call answered while its response is still under way.
    let mut sim = Sim::greeted(agent_with_tools());
    sim.response("resp_1");
    sim.function_call("transfer_call", "{}");
    sim.lose_session_and_reconnect();
    let out = ready(&mut sim);
    let notes = system_notes(&out);
    assert_eq!(notes.len(), 1, "{out:?}");
    assert!(notes[0].contains("転送"), "{notes:?}");
    assert_eq!(sends_of(&out, "response.create").len(), 1, "{out:?}");
    sim.response("resp_2");
    let out = sim.response_done("resp_2");
    assert!(http_of(&out)[0].1.body.starts_with("Twiml="), "{out:?}");
}

/// The session is lost, and every new one is refused for good (the key revoked, say).
fn lose_for_good(sim: &mut Sim) -> Vec<Action> {
    sim.lose_session_and_reconnect();
    sim.connect_refused_for_good()
}

#[test]
fn an_ending_whose_words_no_session_will_say_goes_ahead_without_them() {
    for tool in ["end_call", "transfer_call"] {
        // The tool answered, its goodbye or transfer notice asked for and not started.
        let mut sim = Sim::greeted(agent_with_tools());
        sim.response("resp_1");
        sim.function_call(tool, "{}");
        let out = sim.response_done("resp_1");
        assert_eq!(
            sends_of(&out, "response.create").len(),
            1,
            "{tool}: {out:?}"
        );
        sim.at(500);
        let out = lose_for_good(&mut sim);
        let lost = sim.logged("call.agent_lost_while_finishing");
        assert_eq!(lost.len(), 1, "{tool}");
        assert_eq!(
            lost[0]["reason"], "openai_closed",
            "{tool}: what lost it first"
        );
        assert_eq!(lost[0]["words"], "unsaid", "{tool}");
        // Nothing of the agent is still playing: the ending goes out at once (the caller
        // asked for a person gets one, not the apology).
        let id = ending_request(&out, tool);
        rest_answers(&mut sim, id, 200);
        sim.twilio(STOP);
        // The caller missed the agent's last words: the record is the loss, then the ending.
        let then = if tool == "end_call" {
            "agent_hangup: end_call"
        } else {
            "transferred: +81312345678"
        };
        sim.assert_failed(
            "openai_closed",
            &format!("closed with code 1011: server_error; then {then}"),
        );
        let kinds: Vec<String> = events(&sim.records).into_iter().map(|e| e.1).collect();
        assert!(
            !kinds.iter().any(|k| k.starts_with("fallback")),
            "{tool}: {kinds:?}"
        );
    }
}

#[test]
fn an_ending_whose_words_no_session_will_say_waits_for_what_is_still_playing() {
    let mut sim = Sim::greeted(agent_with_tools());
    // A reply still playing when the agent, in its next response, calls end_call.
    sim.response("resp_0");
    let m = sim.agent_chunk("item_0", &audio(1600, 2));
    sim.response_done("resp_0");
    sim.response("resp_1");
    sim.function_call("end_call", "{}");
    sim.response_done("resp_1");
    sim.at(100);
    let out = lose_for_good(&mut sim);
    assert!(http_of(&out).is_empty(), "the reply still plays: {out:?}");
    assert_eq!(
        sim.logged("call.agent_lost_while_finishing")[0]["words"],
        "unsaid"
    );
    sim.at(250);
    let out = sim.twilio(&mark(&m));
    ending_request(&out, "end_call");
    assert!(sim.logged("call.fallback").is_empty());
}

#[test]
fn a_reply_the_caller_talked_over_before_the_loss_is_not_asked_for_again() {
    let mut sim = Sim::greeted(Agent::default());
    caller_asks(&mut sim);
    sim.agent_chunk("item_a", &audio(800, 1));
    // The caller talks over it: the server cancels it and answers their turn instead.
    sim.at(1_300);
    sim.openai(
        r#"{"type":"input_audio_buffer.speech_started","audio_start_ms":1200,"item_id":"item_u2"}"#,
    );
    sim.lose_session_and_reconnect();
    let out = ready(&mut sim);
    assert!(sends_of(&out, "response.create").is_empty(), "{out:?}");
    // They were still speaking: the model is told it missed the start of their words.
    let notes = system_notes(&out);
    assert!(notes.len() == 1 && notes[0].contains("もう一度"), "{out:?}");
}

/// The caller's turn is over and in the conversation (server VAD answers it), but the
/// session is lost before its response starts.
fn caller_turn_committed(sim: &mut Sim, transcribed: bool) {
    sim.at(1_000);
    sim.openai(
        r#"{"type":"input_audio_buffer.speech_started","audio_start_ms":900,"item_id":"item_u"}"#,
    );
    sim.openai(
        r#"{"type":"input_audio_buffer.speech_stopped","audio_end_ms":1800,"item_id":"item_u"}"#,
    );
    sim.openai(
        r#"{"type":"input_audio_buffer.committed","item_id":"item_u","previous_item_id":"item_g"}"#,
    );
    sim.openai(r#"{"type":"conversation.item.added","item":{"id":"item_u","type":"message","role":"user"}}"#);
    if transcribed {
        sim.openai(r#"{"type":"conversation.item.input_audio_transcription.completed","item_id":"item_u","transcript":"火曜日に予約できますか"}"#);
    }
}

#[test]
fn a_question_the_lost_session_had_not_begun_to_answer_is_answered_by_the_new_one() {
    let mut sim = Sim::greeted(Agent::default());
    caller_turn_committed(&mut sim, true);
    sim.at(2_000);
    sim.lose_session_and_reconnect();
    let out = ready(&mut sim);
    // Seeded with the question, then asked to answer it: not left waiting for the idle
    // check-in.
    assert!(
        messages(&out)
            .iter()
            .any(|(role, text)| role == "user" && text == "火曜日に予約できますか"),
        "{out:?}"
    );
    assert_eq!(sends_of(&out, "response.create").len(), 1, "{out:?}");
    assert!(system_notes(&out).is_empty(), "{out:?}");
}

#[test]
fn words_the_lost_session_took_with_it_untranscribed_are_asked_for_again() {
    let mut sim = Sim::greeted(Agent::default());
    caller_turn_committed(&mut sim, false);
    sim.at(2_000);
    sim.lose_session_and_reconnect();
    let out = ready(&mut sim);
    // The new session never heard them: the agent apologises and asks the caller to say
    // them again, rather than answer a question it does not have.
    let notes = system_notes(&out);
    assert_eq!(notes.len(), 1, "{out:?}");
    assert!(notes[0].contains("もう一度"), "{notes:?}");
    assert_eq!(sends_of(&out, "response.create").len(), 1, "{out:?}");
    // Once answered, a later loss owes nothing for those words.
    let mut sim = Sim::greeted(Agent::default());
    caller_turn_committed(&mut sim, false);
    sim.response("resp_1");
    sim.response_done("resp_1");
    sim.lose_session_and_reconnect();
    let out = ready(&mut sim);
    assert!(system_notes(&out).is_empty(), "{out:?}");
    assert!(sends_of(&out, "response.create").is_empty(), "{out:?}");
}

#[test]
fn a_session_lost_while_the_caller_speaks_has_the_agent_ask_for_the_start_of_their_words() {
    let mut sim = Sim::greeted(Agent::default());
    sim.at(1_000);
    sim.openai(
        r#"{"type":"input_audio_buffer.speech_started","audio_start_ms":900,"item_id":"item_u"}"#,
    );
    sim.at(1_500);
    sim.lose_session_and_reconnect();
    let out = ready(&mut sim);
    // The new session hears only the rest of the words: the model is told, and answers
    // once the caller stops (the server's VAD), not at once over them.
    let notes = system_notes(&out);
    assert_eq!(notes.len(), 1, "{out:?}");
    assert!(notes[0].contains("もう一度"), "{notes:?}");
    assert!(sends_of(&out, "response.create").is_empty(), "{out:?}");
    // A caller who had stopped and whose turn was answered leaves nothing to tell.
    let mut sim = Sim::greeted(Agent::default());
    caller_turn_committed(&mut sim, true);
    sim.response("resp_1");
    sim.response_done("resp_1");
    sim.lose_session_and_reconnect();
    assert!(system_notes(&ready(&mut sim)).is_empty());
}

#[test]
fn a_tool_s_result_given_to_the_lost_session_is_told_to_the_new_one_in_its_place() {
    let mut sim = Sim::greeted(agent_with_tools());
    caller_asks(&mut sim);
    let out = sim.function_call("lookup_customer", r#"{"phone":"+819012345678"}"#);
    let (id, _) = http_of(&out)[0].clone();
    sim.response_done("resp_1");
    sim.at(1_500);
    let out = sim.input(Input::HttpDone {
        id,
        outcome: &http::Outcome::Response {
            status: 200,
            body: r#"{"name":"山田太郎","plan":"ゴールド"}"#.into(),
        },
    });
    assert_eq!(sends_of(&out, "response.create").len(), 1);
    // The session is lost before the model answered with the result.
    sim.at(1_600);
    sim.lose_session_and_reconnect();
    sim.at(2_000);
    let out = ready(&mut sim);
    let seeded = messages(&out);
    assert_eq!(seeded.len(), 2, "{out:?}");
    assert_eq!(seeded[0], ("user".into(), "火曜日に予約できますか".into()));
    let (role, note) = &seeded[1];
    assert_eq!(role, "system");
    assert!(
        note.contains("lookup_customer") && note.contains("山田太郎") && note.contains("ゴールド"),
        "{note}"
    );
    assert_eq!(
        sends_of(&out, "response.create").len(),
        1,
        "the owed answer is asked of the new session: {out:?}"
    );
    // And of any session after it.
    sim.response("resp_2");
    sim.response_done("resp_2");
    sim.at(3_000);
    sim.lose_session_and_reconnect();
    let out = ready(&mut sim);
    assert!(
        messages(&out).iter().any(|(_, t)| t.contains("山田太郎")),
        "{out:?}"
    );
}

#[test]
fn a_tool_answering_during_a_reconnect_is_told_to_every_later_session_once() {
    let mut sim = Sim::greeted(agent_with_tools());
    sim.response("resp_1");
    let out = sim.function_call("lookup_customer", "{}");
    let (id, _) = http_of(&out)[0].clone();
    sim.at(1_000);
    sim.lose_session_and_reconnect();
    // The webhook answers while the new session is being set up.
    sim.at(1_200);
    sim.input(Input::HttpDone {
        id,
        outcome: &http::Outcome::Response {
            status: 200,
            body: r#"{"name":"山田太郎"}"#.into(),
        },
    });
    let out = ready(&mut sim);
    let told = |out: &[Action]| {
        messages(out)
            .iter()
            .filter(|(role, t)| role == "system" && t.contains("山田太郎"))
            .count()
    };
    assert_eq!(
        told(&out),
        1,
        "once, not as a seed and a late note: {out:?}"
    );
    assert_eq!(sends_of(&out, "response.create").len(), 1, "{out:?}");
    sim.response("resp_2");
    sim.response_done("resp_2");
    sim.at(2_000);
    sim.lose_session_and_reconnect();
    let out = ready(&mut sim);
    assert_eq!(told(&out), 1, "{out:?}");
}

#[test]
fn a_new_session_is_told_the_results_of_the_latest_tools_only() {
    let mut sim = Sim::greeted(agent_with_tools());
    let total = control::MAX_SEEDED_TOOL_RESULTS + 5;
    for n in 0..total {
        let response = format!("resp_{n}");
        sim.response(&response);
        let out = sim.function_call("lookup_customer", "{}");
        let (id, _) = http_of(&out)[0].clone();
        sim.response_done(&response);
        sim.input(Input::HttpDone {
            id,
            outcome: &http::Outcome::Response {
                status: 200,
                body: format!(r#"{{"n":"result-{n}"}}"#),
            },
        });
        let answer = format!("resp_a{n}");
        sim.response(&answer);
        sim.response_done(&answer);
    }
    sim.lose_session_and_reconnect();
    let out = ready(&mut sim);
    let notes = system_notes(&out);
    assert_eq!(notes.len(), control::MAX_SEEDED_TOOL_RESULTS, "{notes:?}");
    assert!(notes[0].contains("result-5\""), "{notes:?}");
    assert!(notes
        .last()
        .unwrap()
        .contains(&format!("result-{}\"", total - 1)));
}
