//! Writes the hand-written seeds into `corpus/call_machine/` as `seed-<name>`:
//! `cargo run --example seeds` (in `fuzz/`). Other files there (from fuzz runs) are kept.

use phone_agent_bridge_fuzz::{encode, seeds};
use std::path::Path;

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/call_machine");
    std::fs::create_dir_all(&dir).expect("corpus directory");
    for (name, scenario) in seeds::all() {
        let path = dir.join(format!("seed-{name}"));
        std::fs::write(&path, encode::to_bytes(&scenario)).expect("write seed");
        println!("{}", path.display());
    }
}
