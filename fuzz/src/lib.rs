//! Helpers of the fuzz targets: what an input means and the invariants checked after each
//! step. They live here, not in the core, and are plain (stable) Rust, so the committed
//! corpora can also be replayed by `cargo test` in this crate without libFuzzer.

pub mod call_machine;
pub mod encode;
pub mod frames;
pub mod seeds;
pub mod text;
pub mod webhook;
