//! The call machine under arbitrary sequences of frames, closes, timeouts and clock moves,
//! with its invariants checked after every input (see `Harness`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use phone_agent_bridge_fuzz::call_machine::{Harness, Scenario};

fuzz_target!(|s: Scenario| Harness::run(&s));
