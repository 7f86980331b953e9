//! Both peers' parsers, the frames and events the bridge writes, and the base64 check.
#![no_main]

use libfuzzer_sys::fuzz_target;
use phone_agent_bridge_fuzz::frames::{run, FrameInput};

fuzz_target!(|f: FrameInput| run(&f));
