//! Twilio's webhooks: form body, signature and URL in, TwiML or a refusal out.
#![no_main]

use libfuzzer_sys::fuzz_target;
use phone_agent_bridge_fuzz::webhook::{run, WebhookInput};

fuzz_target!(|w: WebhookInput| run(&w));
