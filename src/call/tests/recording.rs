//! Scenario tests of the call's recording, as the call machine feeds it: caller frames where
//! Twilio's timestamps put them, agent audio as Twilio plays it, a barge-in's cut, and the
//! end.

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

/// (left, right) of interleaved μ-law stereo, decoded.
fn split(audio: &[u8]) -> (Vec<i16>, Vec<i16>) {
    audio
        .chunks(2)
        .map(|f| (ulaw_to_linear(f[0]), ulaw_to_linear(f[1])))
        .unzip()
}

fn ms(t: u64) -> usize {
    (t * 8) as usize
}

/// A caller frame stamped by Twilio `ts` ms into its stream.
fn media_at(ts: u64, payload: &str) -> String {
    format!(
        r#"{{"event":"media","sequenceNumber":"{}","media":{{"track":"inbound","chunk":"{}","timestamp":"{ts}","payload":"{payload}"}},"streamSid":"{STREAM}"}}"#,
        ts / 20 + 2,
        ts / 20 + 1,
    )
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
        // Twilio stamps each frame 20 ms before it arrives here.
        let frame = loud(160, t as u8);
        sim.twilio(&media_at(t - 20, &b64(&frame)));
        caller_frames.push((t, frame));
    }
    // Audio is handed out while the call goes on, never more than a few seconds behind.
    assert!(sim.recording.len() as u64 >= 900 * BYTES_PER_MS);
    sim.at(2_500);
    sim.twilio(STOP);
    // The caller was still talking: the commit of their words finds nothing more.
    sim.openai(FINAL_COMMIT_REFUSED);
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
    assert!(sim.logged("recording.adjusted").is_empty());
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

/// The network stalls for 1.5 s while the agent is talking: Twilio's frames come late, in a
/// burst, and then in real time again. The caller's audio sits where Twilio's timestamps put
/// it, the stalled frames included, and the audio after the stall has not moved against the
/// agent's: no drift.
#[test]
fn caller_audio_after_a_stall_keeps_its_place_against_the_agents() {
    let mut sim = Sim::live(); // the stream started at 0
    let reply = loud(8_000, 7); // 1 s
    let mut frames = Vec::new();
    let mut held = Vec::new();
    // Frame `ts` would arrive at ts + 20; those due from 1 s to 2.5 s are held by TCP and
    // come at once at 2.5 s.
    for ts in (0..4_000).step_by(20) {
        let due = ts + 20;
        let frame = loud(160, (ts / 20) as u8);
        frames.push((ts, frame.clone()));
        if (1_000..2_500).contains(&due) {
            held.push((ts, frame));
            if due == 1_200 {
                // Meanwhile the agent speaks (the recording is polled then).
                sim.at(1_200);
                sim.agent_chunk("item_reply", &b64(&reply));
            }
            continue;
        }
        sim.at(due);
        for (ts, frame) in held.drain(..) {
            sim.twilio(&media_at(ts, &b64(&frame)));
        }
        sim.twilio(&media_at(ts, &b64(&frame)));
    }
    sim.at(4_500);
    sim.twilio(STOP);
    assert_eq!(sim.recording_done, Some(4_500));
    let (left, right) = split(&sim.recording);
    assert_eq!(right[ms(1_200)..ms(2_200)], pcm(&reply)[..]);
    for (ts, frame) in &frames {
        let at = ms(ts + 20);
        assert_eq!(left[at..at + 160], pcm(frame)[..], "frame stamped {ts}");
    }
}

/// A stall longer than the recording waits: the frames that came too late for their place
/// follow what was handed out, all of them, and the end of the call says how much audio was
/// placed late.
#[test]
fn a_stall_longer_than_the_wait_keeps_the_audio_and_says_so() {
    let mut sim = Sim::live();
    let mut held = Vec::new();
    let mut frames = Vec::new();
    for ts in (0..8_000).step_by(20) {
        let due = ts + 20;
        let frame = loud(160, (ts / 20) as u8);
        frames.push(frame.clone());
        if (1_000..6_000).contains(&due) {
            held.push((ts, frame));
            // Meanwhile OpenAI's events come (the recording is polled then).
            sim.at(due);
            sim.openai(r#"{"type":"rate_limits.updated","event_id":"e","rate_limits":[]}"#);
            continue;
        }
        sim.at(due);
        for (ts, frame) in held.drain(..) {
            sim.twilio(&media_at(ts, &b64(&frame)));
        }
        sim.twilio(&media_at(ts, &b64(&frame)));
    }
    sim.at(8_100);
    sim.twilio(STOP);
    let (left, _) = split(&sim.recording);
    let mut from = 0;
    for (i, frame) in frames.iter().enumerate() {
        let want = pcm(frame);
        let at = (from..=left.len() - 160)
            .find(|&at| left[at..at + 160] == want[..])
            .unwrap_or_else(|| panic!("frame {i} is missing"));
        from = at + 160;
    }
    let logged = sim.logged("recording.adjusted");
    assert_eq!(logged.len(), 1, "{:?}", sim.logs);
    assert_eq!(logged[0]["left_out_ms"], 0);
    assert!(logged[0]["caller_late_ms"].as_u64().unwrap() >= 2_000);
}

/// Caller frames that came before Twilio's `start` keep their stamps: replayed when it
/// comes, they sit where Twilio's clock puts them, a gap included, and so do the frames
/// after them.
#[test]
fn frames_before_the_start_keep_their_stamps() {
    let mut sim = Sim::new();
    sim.openai_opened();
    sim.openai(&session_updated("audio/pcmu"));
    let (a, b, c) = (loud(160, 1), loud(160, 80), loud(160, 160));
    sim.at(10);
    sim.twilio(&media_at(0, &b64(&a)));
    sim.twilio(&media_at(60, &b64(&b))); // two frames missing before it
    sim.at(50);
    sim.twilio(&start()); // the timeline starts here
    sim.at(70);
    sim.twilio(&media_at(80, &b64(&c)));
    sim.at(1_000);
    sim.twilio(STOP);
    let (left, _) = split(&sim.recording);
    assert_eq!(left[..ms(20)], pcm(&a)[..]);
    assert!(left[ms(20)..ms(60)].iter().all(|&s| s == 0));
    assert_eq!(left[ms(60)..ms(80)], pcm(&b)[..]);
    assert_eq!(left[ms(80)..ms(100)], pcm(&c)[..]);
    assert!(sim.logged("recording.adjusted").is_empty());
}

/// Twilio delivers some caller frames again (the same stamps, the same audio). The recording
/// leaves them out, so the caller's audio after them does not move, and says how many once,
/// at the end; the relay to OpenAI is as before: every frame that came is appended.
#[test]
fn caller_frames_delivered_again_are_left_out_of_the_recording_once_said() {
    let mut sim = Sim::live();
    let mut frames = Vec::new();
    let mut appended = 0;
    for ts in (0..3_000).step_by(20) {
        sim.at(ts + 20);
        let frame = loud(160, (ts / 20) as u8);
        let mut sends = vec![ts];
        if ts == 1_000 || ts == 2_000 {
            // The frame, and the two before it, come again.
            sends.extend([ts - 40, ts - 20, ts]);
        }
        for sent in sends {
            let payload = if sent == ts {
                frame.clone()
            } else {
                loud(160, (sent / 20) as u8)
            };
            let out = sim.twilio(&media_at(sent, &b64(&payload)));
            appended += out
                .iter()
                .filter(|a| matches!(a, Action::SendOpenAi(e) if e.contains("input_audio_buffer.append")))
                .count();
        }
        frames.push((ts, frame));
    }
    assert_eq!(appended, frames.len() + 6, "the relay is unchanged");
    sim.at(3_500);
    sim.twilio(STOP);
    assert_eq!(sim.recording_done, Some(3_500));
    let (left, _) = split(&sim.recording);
    for (ts, frame) in &frames {
        let at = ms(ts + 20);
        assert_eq!(left[at..at + 160], pcm(frame)[..], "frame stamped {ts}");
    }
    assert!(left[ms(3_020)..].iter().all(|&s| s == 0));
    let logged = sim.logged("recording.adjusted");
    assert_eq!(logged.len(), 1, "once for the call: {:?}", sim.logs);
    assert_eq!(logged[0]["caller_replayed_frames"], 6);
    assert_eq!(logged[0]["caller_replayed_ms"], 120);
    assert_eq!(logged[0]["caller_late_ms"], 0);
    assert_eq!(logged[0]["left_out_ms"], 0);
}
