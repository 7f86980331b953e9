//! Replays the committed corpora through the harnesses on stable Rust (no libFuzzer), so
//! `cargo test` here checks every seed still passes every invariant.

use arbitrary::{Arbitrary, Unstructured};
use std::path::Path;

/// Replays every input in `corpus/TARGET`; panics when there is none (a replay of nothing
/// would pass and prove nothing) or when one does not decode into an input.
fn replay<T: for<'a> Arbitrary<'a>>(target: &str, run: impl Fn(&T)) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("no corpus for {target}: {}: {e}", dir.display()));
    let mut n = 0;
    for entry in entries {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        // As libfuzzer-sys decodes a target's input.
        let input = T::arbitrary_take_rest(Unstructured::new(&data))
            .unwrap_or_else(|e| panic!("{} does not decode: {e}", path.display()));
        run(&input);
        n += 1;
    }
    assert!(n > 0, "the {target} corpus ({}) is empty", dir.display());
}

#[test]
fn call_machine_corpus_passes() {
    use phone_agent_bridge_fuzz::call_machine::{count_milestones, Harness, Scenario, PREOPENED};
    count_milestones();
    // Each input as it decodes, and with its first socket opened ahead of the stream or
    // not the other way round: inputs committed before that bit was read keep their meaning.
    replay::<Scenario>("call_machine", |s| {
        Harness::run(s);
        let mut other = s.clone();
        other.record ^= PREOPENED;
        Harness::run(&other);
    });
    // What the seeds reach (`cargo test -- --nocapture` shows it).
    for (milestone, count) in count_milestones() {
        println!("{count:>8}  {milestone}");
    }
}

#[test]
fn frames_corpus_passes() {
    use phone_agent_bridge_fuzz::frames::{run, FrameInput};
    replay::<FrameInput>("frames", run);
}

#[test]
fn webhook_corpus_passes() {
    use phone_agent_bridge_fuzz::webhook::{run, WebhookInput};
    replay::<WebhookInput>("webhook", run);
}
