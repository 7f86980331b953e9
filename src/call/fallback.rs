//! The caller is never left in silence: when the agent side fails for good (its session
//! cannot start, or is lost and cannot be replaced in time), the call is redirected through
//! Twilio REST to the fallback TwiML (the apology, and a transfer when a number is set);
//! unless the call is already ending and its goodbye (or transfer notice) has been said,
//! when the hang-up or transfer goes ahead as planned.
//!
//! The stream stays open while the redirect is on its way. Twilio ends it (`stop`) once
//! the redirect takes hold; the call is then recorded as failed with the original reason.
//! Should the REST request fail or take too long, the stream is closed instead, which makes
//! Twilio run the same fallback from the TwiML after `</Connect>`.

use super::{Action, Call, EndReason, Level, Upstream};
use crate::http;
use crate::ids::Millis;
use crate::store::EventKind;
use crate::twilio;
use serde_json::json;

/// How long the redirect request may take (its own timeout is 10 s) before the stream is
/// closed instead.
pub const REDIRECT_TIMEOUT: Millis = Millis(12_000);
/// After Twilio accepted the redirect, how long its `stop` may take.
pub const STOP_TIMEOUT: Millis = Millis(5_000);

#[derive(Debug)]
pub(super) struct Failing {
    reason: EndReason,
    /// The REST request still on its way.
    request: Option<u64>,
    deadline: Millis,
}

impl Call {
    /// True once the call is being handed to the fallback.
    pub(super) fn failing(&self) -> bool {
        self.fallback.is_some()
    }

    pub(super) fn fallback_deadline(&self) -> Option<Millis> {
        self.fallback.as_ref().map(|f| f.deadline)
    }

    /// The agent side failed for good: hand the caller to the fallback TwiML.
    pub(super) fn fail(&mut self, reason: EndReason, now: Millis) {
        if self.ended.is_some() || self.fallback.is_some() {
            return;
        }
        if self.upstream != Upstream::Closed {
            self.upstream = Upstream::Closed;
            self.actions.push_back(Action::CloseOpenAi {
                code: 1000,
                reason: "giving up on the session".into(),
            });
        }
        self.setup_deadline = None;
        // The call failed for what lost its session, not for the last attempt to replace it.
        let last = reason;
        let reason = self.cancel_reconnect().unwrap_or_else(|| last.clone());
        // A goodbye or transfer notice still to be said will not be: the ending goes ahead
        // without it, as when its words do not come in time, and is recorded as the failure
        // it followed. The caller asked for a person is put through; the apology and the
        // fallback number would answer a call whose end was already decided.
        let unsaid = self.ending_goes_ahead_unsaid(&reason, now);
        if self.ending_needs_no_agent() {
            // The goodbye (or transfer notice) has been said and is playing out (or will
            // not be said, above), or the hang-up or transfer is already with Twilio:
            // nothing more is wanted of the agent. The ending goes ahead as planned (its
            // `stop` ends the call, recorded as the hang-up or transfer it is when its words
            // were said: the caller got what was planned), and the loss is logged; the
            // apology and the fallback number would contradict the goodbye.
            let mut detail = json!({ "reason": reason.label(), "detail": reason.detail() });
            if last != reason {
                detail["last_failure"] = json!(last.detail_text());
            }
            if unsaid {
                detail["words"] = json!("unsaid");
            }
            self.log(Level::Warn, "call.agent_lost_while_finishing", detail);
            self.check_drained(now);
            return;
        }
        let mut detail = json!({
            "reason": reason.label(), "detail": reason.detail_text(),
        });
        if last != reason {
            detail["last_failure"] = json!(last.detail_text());
        }
        self.log(Level::Error, "call.fallback", detail.clone());
        self.event(now, EventKind::Fallback, detail);
        let request = twilio::update_call(
            &self.twilio_rest,
            &self.context.account_sid,
            &self.context.call_sid,
            &[("Twiml", &self.fallback_twiml)],
        );
        let id = self.next_http_id();
        self.fallback = Some(Failing {
            reason,
            request: Some(id),
            deadline: now + REDIRECT_TIMEOUT,
        });
        self.actions.push_back(Action::Http { id, request });
    }

    /// The answer to the redirect request; false when `id` is not it.
    pub(super) fn on_fallback_http_done(
        &mut self,
        id: u64,
        outcome: &http::Outcome,
        now: Millis,
    ) -> bool {
        let Some(f) = self.fallback.as_mut().filter(|f| f.request == Some(id)) else {
            return false;
        };
        f.request = None;
        f.deadline = now + STOP_TIMEOUT;
        let ok = matches!(outcome, http::Outcome::Response { status, .. } if (200..300).contains(status));
        let twilio = match outcome {
            http::Outcome::Response { status, .. } => json!(status),
            http::Outcome::Failed { reason } => json!(reason),
        };
        self.event(
            now,
            EventKind::FallbackRedirect,
            json!({ "ok": ok, "twilio": twilio }),
        );
        if ok {
            self.log(Level::Info, "call.fallback_redirected", json!({}));
        } else {
            self.log(
                Level::Error,
                "call.fallback_redirect_failed",
                json!({ "twilio": twilio }),
            );
            // Closing the stream makes Twilio run the fallback after </Connect> instead.
            self.end_failed(now);
        }
        true
    }

    /// The redirect took too long, or Twilio's `stop` did not follow it.
    pub(super) fn on_fallback_timer(&mut self, now: Millis) {
        if self.fallback_deadline().is_some_and(|d| now >= d) {
            self.log(Level::Warn, "call.fallback_timeout", json!({}));
            if self.fallback.as_ref().is_some_and(|f| f.request.is_some()) {
                self.event(
                    now,
                    EventKind::FallbackRedirect,
                    json!({ "ok": false, "twilio": "no answer in time" }),
                );
            }
            self.end_failed(now);
        }
    }

    /// The stream ends (Twilio's `stop` or its socket closing) while failing: the call is
    /// recorded with the reason it failed, not the way the stream ended.
    pub(super) fn failed_reason(&mut self, now: Millis) -> Option<EndReason> {
        let f = self.fallback.as_ref()?;
        let reason = f.reason.clone();
        if f.request.is_some() {
            // Twilio's `stop` can overtake its answer to the redirect.
            self.event(
                now,
                EventKind::FallbackRedirect,
                json!({ "ok": null, "twilio": "stream ended before the REST answer" }),
            );
        }
        Some(reason)
    }

    fn end_failed(&mut self, now: Millis) {
        if let Some(f) = &self.fallback {
            self.end(f.reason.clone(), now);
        }
    }
}
