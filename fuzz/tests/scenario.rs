//! The hand-written seeds: each decodes back to itself (so the committed bytes mean what
//! `seeds.rs` says) and passes every invariant, and together they reach the paths that
//! matter.

use arbitrary::{Arbitrary, Unstructured};
use phone_agent_bridge_fuzz::call_machine::{count_milestones, Harness, Scenario};
use phone_agent_bridge_fuzz::{encode, seeds};

#[test]
fn seeds_round_trip_and_pass() {
    count_milestones();
    for (name, scenario) in seeds::all() {
        let bytes = encode::to_bytes(&scenario);
        let back = Scenario::arbitrary_take_rest(Unstructured::new(&bytes)).unwrap();
        assert_eq!(
            format!("{back:?}"),
            format!("{scenario:?}"),
            "seed {name} does not decode to itself"
        );
        Harness::run(&back);
    }
    let reached = count_milestones();
    for m in [
        "agent audio relayed",
        "agent audio flushed at start",
        "mark echoed",
        "truncate after audio heard",
        "truncate at 0",
        "caller's words committed at the hang-up",
        "caller audio relayed",
        "caller audio relayed, frames gathered",
        "greeting",
        "session configured ahead",
        "reconnect",
        "tool webhook request",
        "function_call_output",
        "REST hang-up",
        "REST retried",
        "REST transfer",
        "REST fallback",
        "fallback",
        "response.create (control)",
        "text item",
        "recording done",
        "twilio_stop",
        "agent_hangup",
        "transferred",
        "call_control_failed",
        "openai_session_rejected",
        "openai_session_timeout",
        "openai_connect_failed",
        "openai_closed",
        "twilio_socket_closed",
    ] {
        assert!(
            reached.get(m).copied().unwrap_or(0) > 0,
            "no seed reaches {m}: {reached:?}"
        );
    }
}
