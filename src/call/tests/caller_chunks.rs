//! Scenario tests of caller audio gathered into chunks (`CALLER_AUDIO_CHUNK_MS` above one
//! Twilio frame, 40 ms by default): the frames reach OpenAI whole and in order, a chunk at a
//! time, and never after an event that came later than they did.

use super::*;

fn bytes(payload: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(payload)
        .expect("base64")
}

/// The audio of each append among `out`, decoded.
fn appended(out: &[Action]) -> Vec<Vec<u8>> {
    sends_of(out, "input_audio_buffer.append")
        .iter()
        .map(|v| bytes(v["audio"].as_str().expect("audio")))
        .collect()
}

/// The types of the events `out` sends to OpenAI, in order.
fn openai_types(out: &[Action]) -> Vec<String> {
    out.iter()
        .filter(|a| matches!(a, Action::SendOpenAi(_)))
        .map(|a| json_of(a)["type"].as_str().unwrap_or("").to_owned())
        .collect()
}

impl Sim {
    /// A greeted call whose caller audio goes `ms` at a time.
    fn chunked(ms: u64) -> Self {
        let mut sim = Sim::greeted(Agent::default());
        sim.call.caller_chunk_bytes = (ms * crate::audio::BYTES_PER_MS) as usize;
        sim
    }
}

/// Twilio's 20 ms frames, each recognisable.
fn frames(n: u8) -> Vec<String> {
    (0..n).map(|i| audio(160, i.wrapping_mul(31))).collect()
}

#[test]
fn at_40_ms_every_two_frames_go_as_one_append_of_both_in_order() {
    let mut sim = Sim::chunked(40);
    let frames = frames(6);
    let mut sent = vec![];
    for (i, f) in frames.iter().enumerate() {
        sim.at(1_000 + i as u64 * 20);
        let out = appended(&sim.twilio(&media(f)));
        assert_eq!(
            out.len(),
            i % 2,
            "frame {i}: the second of a pair sends both"
        );
        sent.extend(out);
    }
    let want: Vec<Vec<u8>> = frames
        .chunks(2)
        .map(|pair| [bytes(&pair[0]), bytes(&pair[1])].concat())
        .collect();
    assert_eq!(sent, want);
    assert_eq!(sim.call.stats().caller_frames, 6);
}

#[test]
fn a_chunk_of_100_ms_is_five_frames_and_a_frame_that_fills_one_alone_goes_unchanged() {
    let mut sim = Sim::chunked(100);
    let frames = frames(5);
    for f in &frames[..4] {
        assert!(appended(&sim.twilio(&media(f))).is_empty());
    }
    let out = appended(&sim.twilio(&media(&frames[4])));
    assert_eq!(
        out,
        [frames.iter().flat_map(|f| bytes(f)).collect::<Vec<u8>>()]
    );
    // Nothing gathered, and a frame as large as a chunk: passed on as it came.
    let big = audio(800, 7);
    let out = sim.twilio(&media(&big));
    assert_eq!(sends_of(&out, "input_audio_buffer.append")[0]["audio"], big);
}

#[test]
fn gathered_audio_goes_before_any_later_event_for_openai() {
    let mut sim = Sim::chunked(40);
    let f = audio(160, 1);
    assert!(appended(&sim.twilio(&media(&f))).is_empty());
    // A key pressed after that frame: its note goes to the session after the frame.
    let out = sim.twilio(
        r#"{"event":"dtmf","streamSid":"MZ00000000000000000000000000000001","sequenceNumber":"5","dtmf":{"track":"inbound_track","digit":"1"}}"#,
    );
    let types = openai_types(&out);
    assert_eq!(
        types.first().map(String::as_str),
        Some("input_audio_buffer.append"),
        "{types:?}"
    );
    assert!(types.len() > 1, "{types:?}");
    assert_eq!(appended(&out), [bytes(&f)]);
}

#[test]
fn a_caller_who_hangs_up_mid_chunk_has_the_rest_sent_before_the_final_commit() {
    let mut sim = Sim::chunked(40);
    sim.at(4_000);
    sim.openai(
        r#"{"type":"input_audio_buffer.speech_started","audio_start_ms":3900,"item_id":"item_u"}"#,
    );
    let f = audio(160, 9);
    assert!(appended(&sim.twilio(&media(&f))).is_empty());
    sim.at(4_020);
    let out = sim.twilio(STOP);
    assert_eq!(
        openai_types(&out),
        ["input_audio_buffer.append", "input_audio_buffer.commit"]
    );
    assert_eq!(appended(&out), [bytes(&f)]);
}

#[test]
fn at_twilios_end_the_last_frame_is_sent_before_the_session_closes() {
    let mut sim = Sim::chunked(40);
    let f = audio(160, 3);
    sim.at(2_000);
    assert!(appended(&sim.twilio(&media(&f))).is_empty());
    let out = sim.twilio(STOP);
    assert_eq!(appended(&out), [bytes(&f)]);
    let append = out
        .iter()
        .position(|a| matches!(a, Action::SendOpenAi(_)))
        .expect("the append");
    let close = out
        .iter()
        .position(|a| matches!(a, Action::CloseOpenAi { .. }))
        .expect("the session closes with the call");
    assert!(append < close, "{out:?}");
}

#[test]
fn audio_gathered_for_a_lost_session_goes_first_to_the_next_one() {
    let mut sim = Sim::chunked(40);
    let frames = frames(4);
    sim.at(1_000);
    sim.twilio(&media(&frames[0]));
    sim.twilio(&media(&frames[1]));
    // Held, waiting for its pair, when the session goes.
    assert!(appended(&sim.twilio(&media(&frames[2]))).is_empty());
    sim.at(1_100);
    sim.lose_session_and_reconnect();
    assert!(
        sim.twilio(&media(&frames[3])).is_empty(),
        "held for the next session"
    );
    sim.at(1_500);
    sim.openai_opened();
    let out = sim.openai(&session_updated("audio/pcmu"));
    assert_eq!(appended(&out), [bytes(&frames[2]), bytes(&frames[3])]);
    // The new session's input begins where the first one's ended: after frames 0 and 1.
    assert_eq!(sim.call.session_audio_from_ms, 40);
}

#[test]
fn a_frame_that_is_not_base64_is_dropped_and_counted_not_gathered() {
    let mut sim = Sim::chunked(40);
    let f = audio(160, 5);
    sim.twilio(&media("not*base64"));
    assert!(appended(&sim.twilio(&media(&f))).is_empty());
    assert_eq!(
        sim.call.stats().dropped.get("twilio_invalid_base64"),
        Some(&1)
    );
    let g = audio(160, 6);
    assert_eq!(
        appended(&sim.twilio(&media(&g))),
        [[bytes(&f), bytes(&g)].concat()]
    );
}

#[test]
fn a_chunk_held_through_a_whole_reconnect_goes_to_the_new_session_at_once() {
    let mut sim = Sim::chunked(40);
    let frames = frames(3);
    sim.at(1_000);
    for f in &frames {
        sim.twilio(&media(f));
    }
    // No frame comes while the session is replaced (a reconnect within 20 ms).
    sim.lose_session_and_reconnect();
    sim.openai_opened();
    let out = sim.openai(&session_updated("audio/pcmu"));
    assert_eq!(appended(&out), [bytes(&frames[2])]);
    assert_eq!(
        sim.call.session_audio_from_ms, 40,
        "frame 2 is the new session's first"
    );
}
