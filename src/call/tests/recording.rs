//! Scenario tests of the call's recording, as the call machine feeds it: caller frames where
//! they arrive, agent audio as Twilio plays it, a barge-in's cut, and the end.

use super::*;
use crate::recording::{ulaw_to_linear, BYTES_PER_MS};

const STOP: &str = r#"{"event":"stop","sequenceNumber":"9","stop":{"accountSid":"AC1","callSid":"CA1"},"streamSid":"MZ1"}"#;

/// μ-law with no silent byte, so "not silence" is exact.
fn loud(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| match seed.wrapping_add(i as u8) {
            0xFF | 0x7F => 0x11,
            b => b,
        })
        .collect()
}

fn pcm(bytes: &[u8]) -> Vec<i16> {
    bytes.iter().map(|&b| ulaw_to_linear(b)).collect()
}

/// (left, right) of interleaved 16-bit stereo.
fn split(pcm: &[u8]) -> (Vec<i16>, Vec<i16>) {
    pcm.chunks(4)
        .map(|f| {
            (
                i16::from_le_bytes([f[0], f[1]]),
                i16::from_le_bytes([f[2], f[3]]),
            )
        })
        .unzip()
}

fn ms(t: u64) -> usize {
    (t * 8) as usize
}

#[test]
fn a_call_with_a_barge_in_records_what_each_side_heard() {
    let mut sim = Sim::live(); // the stream started at 0
    let greeting = loud(1_600, 1); // 200 ms
    let reply = loud(8_000, 2); // 1 s
    let mut caller_frames = Vec::new();
    let mut t = 0;
    while t < 2_000 {
        t += 20;
        sim.at(t);
        if t == 100 {
            sim.agent_chunk("item_greet", &b64(&greeting));
        }
        if t == 500 {
            sim.agent_chunk("item_reply", &b64(&reply));
        }
        if t == 800 {
            // The caller talks over the reply: Twilio is told to clear at 800 ms.
            let out = sim.openai(&speech_started());
            assert_eq!(json_of(&out[0])["event"], "clear");
        }
        let frame = loud(160, t as u8);
        sim.twilio(&media(&b64(&frame)));
        caller_frames.push((t, frame));
    }
    // Audio is handed out while the call goes on, never more than a few seconds behind.
    assert!(sim.recording.len() as u64 >= 900 * BYTES_PER_MS);
    sim.at(2_500);
    sim.twilio(STOP);
    assert_eq!(sim.recording_done, Some(2_500));
    assert_eq!(sim.recording.len() as u64, 2_500 * BYTES_PER_MS);
    let (left, right) = split(&sim.recording);

    // Right: the greeting, silence, the reply up to the cut, silence to the end.
    assert!(right[..ms(100)].iter().all(|&s| s == 0));
    assert_eq!(right[ms(100)..ms(300)], pcm(&greeting)[..]);
    assert!(right[ms(300)..ms(500)].iter().all(|&s| s == 0));
    assert_eq!(right[ms(500)..ms(800)], pcm(&reply[..ms(300)])[..]);
    assert!(
        right[ms(800)..].iter().all(|&s| s == 0),
        "silence after the cut"
    );
    // Left: every caller frame where it arrived.
    for (at, frame) in &caller_frames {
        assert_eq!(
            left[ms(*at)..ms(*at) + 160],
            pcm(frame)[..],
            "frame at {at}"
        );
    }
}

#[test]
fn the_recording_is_complete_before_the_calls_end_record() {
    let mut sim = Sim::live();
    sim.at(40);
    sim.twilio(&media(&b64(&loud(160, 9))));
    sim.at(3_000);
    sim.call.handle(Input::TwilioText(STOP), sim.now);
    let mut kinds = Vec::new();
    while let Some(a) = sim.call.poll_action() {
        kinds.push(match a {
            Action::RecordingData(_) => "data",
            Action::RecordingDone { duration_ms } => {
                assert_eq!(duration_ms, 3_000);
                "done"
            }
            Action::Persist(Record::CallEnded { .. }) => "call_ended",
            Action::Ended(_) => "ended",
            _ => continue,
        });
    }
    assert_eq!(kinds, ["data", "done", "call_ended", "ended"]);
}

#[test]
fn an_abnormal_end_still_completes_the_recording() {
    let mut sim = Sim::live();
    sim.at(1_500);
    sim.twilio(&media(&b64(&loud(160, 3))));
    sim.at(1_700);
    sim.input(Input::TwilioClosed {
        code: 1006,
        reason: "",
    });
    assert_eq!(sim.recording_done, Some(1_700));
    assert_eq!(sim.recording.len() as u64, 1_700 * BYTES_PER_MS);
}

#[test]
fn an_agent_that_does_not_record_leaves_no_recording() {
    let agent = Agent {
        record_calls: false,
        ..Agent::default()
    };
    let mut sim = Sim::live_with(agent);
    for t in (20..=5_000).step_by(20) {
        sim.at(t);
        sim.twilio(&media(&b64(&loud(160, 1))));
    }
    sim.twilio(STOP);
    assert!(sim.call.is_ended());
    assert!(sim.recording.is_empty());
    assert_eq!(sim.recording_done, None);
}

#[test]
fn a_call_whose_stream_never_started_has_no_recording() {
    let mut sim = Sim::new();
    sim.at(10_000);
    sim.input(Input::Timeout);
    sim.at(30_000);
    sim.input(Input::OpenAiConnectFailed {
        reason: "down",
        status: None,
    });
    sim.input(Input::TwilioClosed {
        code: 1000,
        reason: "",
    });
    assert!(sim.call.is_ended());
    assert_eq!(sim.recording_done, None);
}
