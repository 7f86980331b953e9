//! Scenario tests of a Realtime session lost mid-call and replaced: what was under way at
//! the loss (a reply, the greeting, a goodbye, keypad presses) carries on in the new one.

use super::*;

/// The session closes under the call; the first new connect goes out at once.
fn lose(sim: &mut Sim) {
    let out = sim.input(Input::OpenAiClosed {
        code: 1011,
        reason: "server_error",
    });
    sim.expect_reconnect(out, 1);
}

/// The new session opens and is ready; returns what the call sent it then.
fn ready(sim: &mut Sim) -> Vec<Action> {
    sim.openai_opened();
    sim.openai(&session_updated("audio/pcmu"))
}

#[test]
fn the_reconnect_gap_does_not_count_as_silence() {
    let mut sim = Sim::greeted(Agent::default());
    sim.at(IDLE.0 - 2_000);
    lose(&mut sim);
    sim.at(IDLE.0 + 500);
    ready(&mut sim);
    // The idle clock starts again once the new session is there, rather than a check-in
    // going out the moment it is.
    assert_eq!(sim.call.poll_timeout(), Some(IDLE + IDLE + Millis(500)));
    let out = sim.input(Input::Timeout);
    assert!(system_notes(&out).is_empty(), "{out:?}");
}
