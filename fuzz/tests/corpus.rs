//! Replays the committed corpora through the harnesses on stable Rust (no libFuzzer), so
//! `cargo test` here checks every seed still passes every invariant.

use arbitrary::{Arbitrary, Unstructured};
use std::path::Path;

fn replay<T: for<'a> Arbitrary<'a>>(target: &str, run: impl Fn(&T)) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    let mut n = 0;
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return 0;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        // As libfuzzer-sys decodes a target's input.
        if let Ok(input) = T::arbitrary_take_rest(Unstructured::new(&data)) {
            run(&input);
        }
        n += 1;
    }
    n
}

#[test]
fn call_machine_corpus_passes() {
    use phone_agent_bridge_fuzz::call_machine::{count_milestones, Harness, Scenario};
    count_milestones();
    let n = replay::<Scenario>("call_machine", Harness::run);
    assert!(n > 0, "no call_machine corpus");
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
