//! The call's recording, fed from the points where audio moves (see `crate::recording`):
//! caller frames as they arrive (with Twilio's timestamps), agent audio as it is sent to
//! Twilio, the `clear` of a barge-in, and the end. Only when the agent records calls; the
//! relay never waits on it.

use super::{Action, Call, Level};
use crate::ids::Millis;
use crate::recording::{Recorder, SAMPLES_PER_MS};
use serde_json::json;

impl Call {
    /// The stream started: the recording's timeline starts here.
    pub(super) fn recording_started(&mut self) {
        if self.agent.record_calls && self.recorder.is_none() {
            self.recorder = Some(Recorder::new());
        }
    }

    /// A caller frame (base64 μ-law, already checked for shape) arrived, stamped by Twilio
    /// `timestamp` ms into its stream when it was: the recording places it by that stamp.
    pub(super) fn record_caller(&mut self, payload: &str, timestamp: Option<u64>, now: Millis) {
        let at = self.offset(now);
        if let Some(r) = &mut self.recorder {
            r.caller_base64(at, timestamp, payload);
        }
    }

    /// When agent audio sent at `at` (ms from the stream start) starts to play: after what
    /// is still queued at Twilio, as the recording places it (or, without one, as the same
    /// clock counts it: audio plays at 8 bytes per ms, one piece after the other).
    pub(super) fn agent_plays_at(&self, at: u64) -> u64 {
        match &self.recorder {
            Some(r) => r.agent_plays_at_ms(at),
            None => at.max(self.agent_queued_until / crate::recording::SAMPLES_PER_MS),
        }
    }

    /// `bytes` of agent audio went to Twilio `at` ms into the stream.
    pub(super) fn record_agent(&mut self, payload: &str, bytes: u64, at: u64) {
        let sent = at * crate::recording::SAMPLES_PER_MS;
        self.agent_queued_until = sent.max(self.agent_queued_until) + bytes;
        if let Some(r) = &mut self.recorder {
            r.agent_base64(at, payload);
        }
    }

    /// Twilio was told to `clear` its playback buffer.
    pub(super) fn record_clear(&mut self, now: Millis) {
        let at = self.offset(now);
        self.agent_queued_until = self
            .agent_queued_until
            .min(at * crate::recording::SAMPLES_PER_MS);
        if let Some(r) = &mut self.recorder {
            r.clear(at);
        }
    }

    /// Hands out what of the recording can no longer change (after every input).
    pub(super) fn record_settled(&mut self, now: Millis) {
        let at = self.offset(now);
        let Some(r) = &mut self.recorder else { return };
        while let Some(chunk) = r.poll(at) {
            self.actions.push_back(Action::RecordingData(chunk));
        }
    }

    /// The call is over: the rest of the recording, then that it is complete.
    pub(super) fn record_end(&mut self, now: Millis) {
        let at = self.offset(now);
        let Some(mut r) = self.recorder.take() else {
            return;
        };
        let (rest, duration_ms) = r.finish(at);
        if !rest.is_empty() {
            self.actions.push_back(Action::RecordingData(rest));
        }
        self.actions
            .push_back(Action::RecordingDone { duration_ms });
        // Audio left out, caller audio that came too late for its place, or caller frames
        // delivered again (left out): said once for the call, not per frame.
        let (left_out, late) = (r.dropped_samples(), r.late_samples());
        let replayed = r.replayed_frames();
        if left_out > 0 || late > 0 || replayed > 0 {
            self.log(
                Level::Warn,
                "recording.adjusted",
                json!({
                    "left_out_ms": left_out / SAMPLES_PER_MS,
                    "caller_late_ms": late / SAMPLES_PER_MS,
                    "caller_replayed_frames": replayed,
                    "caller_replayed_ms": r.replayed_samples() / SAMPLES_PER_MS,
                }),
            );
        }
    }
}
