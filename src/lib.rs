//! Twilio Media Streams <-> OpenAI Realtime voice-agent bridge.
//!
//! The crate is split in two on purpose:
//! - the *core* (every module but `cloudflare`) is pure Rust with no I/O, no clock and no
//!   platform types; it builds and is tested natively;
//! - the *shell* (`cloudflare`, wasm32 only) is a thin pump that feeds the core what arrived
//!   on sockets and HTTP and carries out the actions it returns.

pub mod admin;
pub mod agents;
pub mod audio;
pub mod call;
pub mod config;
pub mod http;
pub mod ids;
pub mod openai;
pub mod outbox;
pub mod recording;
pub mod signature;
pub mod store;
pub mod tools;
pub mod twilio;
pub mod twiml;
pub mod webhook;

#[cfg(target_arch = "wasm32")]
mod cloudflare;
