//! A call's Realtime socket opened when its voice webhook registers it, before Twilio opens
//! the media stream: Twilio takes a moment to connect once it has the TwiML, and opening a
//! socket to OpenAI (TCP, TLS, the upgrade, the session's creation) takes another. Done
//! one after the other, the caller hears the greeting later by the shorter of the two.
//!
//! The socket is the call's first connect. As it opens, what the call machine gives for it
//! (`call::ahead_of_stream`: the session's configuration) goes on it, so that
//! `session.updated` is on its way before the stream is; the greeting still waits for the
//! stream. Until the stream's pump takes the socket what OpenAI sends (`session.created`,
//! `session.updated`) is held, and handed on in order after the socket. A stream that
//! comes while the connect is still on its way waits for it. A socket that closed while it
//! waited (`openai.preopen_closed`), a connect that failed (`openai.preopen_failed`), or
//! one made for another URL is not handed over: the pump connects as it would have
//! without it. Unclaimed after `OPENAI_PREOPEN_SECONDS` (no
//! stream came: the caller hung up, or Twilio could not reach the Worker) the socket is
//! closed, and with it the session at OpenAI, which has cost nothing; sooner when Twilio's
//! status callback says the call is over.

use super::log;
use super::socket::{self, Event, Frame, Listeners, Sink};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;
use worker::{Delay, WebSocket};

/// A sink that holds what it is given until it is pointed somewhere; for the call named.
#[derive(Clone)]
struct Relay(Rc<RefCell<Target>>, Rc<str>);

enum Target {
    Held(Vec<Event>),
    To(Sink),
}

impl Default for Target {
    fn default() -> Self {
        Target::Held(Vec::new())
    }
}

impl Relay {
    fn new(call_sid: &str) -> Relay {
        Relay(Rc::default(), call_sid.into())
    }

    fn sink(&self) -> Sink {
        let me = self.clone();
        Rc::new(move |event| {
            // Cloned out first: the sink may call back into this relay's socket's owner.
            let to: Sink = match &mut *me.0.borrow_mut() {
                Target::To(sink) => sink.clone(),
                Target::Held(events) => {
                    // Once: a socket that fails is closed after.
                    if !events.iter().any(ends) {
                        me.log_if_ended(&event);
                    }
                    events.push(event);
                    return;
                }
            };
            to(event);
        })
    }

    /// OpenAI closed the socket, or it failed, before any stream took it: said as it
    /// happens, since no call is there to say it.
    fn log_if_ended(&self, event: &Event) {
        let detail = match event {
            Event::Socket(_, Frame::Closed { code, reason }) => {
                serde_json::json!({ "code": code, "reason": reason })
            }
            Event::Socket(_, Frame::Error(error)) => serde_json::json!({ "error": error }),
            _ => return,
        };
        log(
            "warn",
            "openai.preopen_closed",
            serde_json::json!({ "call_sid": &*self.1, "detail": detail,
                                "then": "the stream connects itself" }),
        );
    }

    /// The socket closed or failed while nobody had it.
    fn ended(&self) -> bool {
        match &*self.0.borrow() {
            Target::Held(events) => events.iter().any(ends),
            _ => false,
        }
    }

    /// From now on events go to `sink`, those held first.
    fn point_to(&self, sink: Sink) {
        let held = std::mem::replace(&mut *self.0.borrow_mut(), Target::To(sink.clone()));
        if let Target::Held(events) = held {
            for event in events {
                sink(event);
            }
        }
    }
}

/// The socket's end: closed, or failed.
fn ends(event: &Event) -> bool {
    matches!(
        event,
        Event::Socket(_, Frame::Closed { .. } | Frame::Error(_))
    )
}

/// What became of the connect.
enum Slot {
    /// On its way; a pump that came meanwhile waits for it, as its connect number `n`.
    Connecting { claim: Option<(u64, Sink)> },
    /// Open, nobody's yet; `configured`: what went ahead went.
    Open {
        ws: WebSocket,
        listeners: Listeners,
        relay: Relay,
        configured: bool,
    },
    /// Handed over, closed, failed or given up.
    Gone,
}

/// The socket opened ahead of the call's stream (see the module's text).
pub struct Preopen {
    url: String,
    call_sid: String,
    slot: Rc<RefCell<Slot>>,
}

/// Logs the hand-over; `waited`: the stream came while the connect was on its way.
fn handed_over(call_sid: &str, waited: bool) {
    log(
        "info",
        "openai.preopened",
        serde_json::json!({ "call_sid": call_sid, "waited": waited }),
    );
}

impl Preopen {
    /// Starts connecting to `url` (with the bearer `key`) for `call_sid`, sending `ahead` as
    /// the socket opens; the socket is closed if no pump takes it within `hold` of opening.
    pub fn start(
        url: String,
        key: String,
        call_sid: String,
        hold: Duration,
        ahead: Vec<String>,
    ) -> Preopen {
        let slot = Rc::new(RefCell::new(Slot::Connecting { claim: None }));
        let task_slot = slot.clone();
        let task_url = url.clone();
        let task_sid = call_sid.clone();
        worker::wasm_bindgen_futures::spawn_local(async move {
            let (slot, call_sid) = (task_slot, task_sid);
            let relay = Relay::new(&call_sid);
            let result = super::call_session::connect_openai(&task_url, &key, relay.sink()).await;
            let claim = match &mut *slot.borrow_mut() {
                Slot::Connecting { claim } => Some(claim.take()),
                _ => None,
            };
            let Some(claim) = claim else {
                // Given up while it was on its way (see `Preopen::discard`).
                if let Ok((ws, listeners)) = result {
                    socket::let_go(&ws, listeners, "no longer wanted");
                }
                return;
            };
            // What goes ahead goes first, whoever takes the socket.
            let configured = result.as_ref().is_ok_and(|(ws, _)| {
                ahead
                    .iter()
                    .all(|message| ws.send_with_str(message).is_ok())
            });
            match (claim, result) {
                (Some((n, sink)), Ok((ws, listeners))) => {
                    *slot.borrow_mut() = Slot::Gone;
                    handed_over(&call_sid, true);
                    sink(Event::OpenAiConnected(n, ws, listeners, configured));
                    relay.point_to(sink);
                }
                (Some((n, sink)), Err((status, reason))) => {
                    *slot.borrow_mut() = Slot::Gone;
                    sink(Event::OpenAiFailed(n, status, reason));
                }
                (None, Ok((ws, listeners))) => {
                    *slot.borrow_mut() = Slot::Open {
                        ws,
                        listeners,
                        relay,
                        configured,
                    };
                    Delay::from(hold).await;
                    let unclaimed = std::mem::replace(&mut *slot.borrow_mut(), Slot::Gone);
                    if let Slot::Open { ws, listeners, .. } = unclaimed {
                        log(
                            "warn",
                            "openai.preopened_unused",
                            serde_json::json!({ "call_sid": call_sid, "held_ms": hold.as_millis() as u64,
                                                "then": "closed: no media stream came for it" }),
                        );
                        socket::let_go(&ws, listeners, "no media stream came");
                    }
                }
                (None, Err((status, reason))) => {
                    *slot.borrow_mut() = Slot::Gone;
                    log(
                        "warn",
                        "openai.preopen_failed",
                        serde_json::json!({ "call_sid": call_sid, "status": status, "reason": reason,
                                            "then": "the stream connects itself" }),
                    );
                }
            }
        });
        Preopen {
            url,
            call_sid,
            slot,
        }
    }

    /// Hands the socket to a pump's connect number `n` to `url`, whose events go to `sink`:
    /// at once when it is open, or once it opens (or fails) when it is on its way. False when
    /// there is nothing to hand over: the pump connects itself.
    pub fn hand_over(self, url: &str, n: u64, sink: Sink) -> bool {
        if url != self.url {
            self.discard("the stream wants another URL");
            return false;
        }
        let taken = std::mem::replace(&mut *self.slot.borrow_mut(), Slot::Gone);
        match taken {
            Slot::Connecting { .. } => {
                *self.slot.borrow_mut() = Slot::Connecting {
                    claim: Some((n, sink)),
                };
                true
            }
            Slot::Open {
                ws,
                listeners,
                relay,
                configured,
            } if !relay.ended() => {
                handed_over(&self.call_sid, false);
                sink(Event::OpenAiConnected(n, ws, listeners, configured));
                relay.point_to(sink);
                true
            }
            Slot::Open { ws, listeners, .. } => {
                socket::let_go(&ws, listeners, "closed while it waited");
                false
            }
            Slot::Gone => false,
        }
    }

    /// Gives the socket up: closed now if open, or as soon as its connect ends. False when
    /// there was none to give up (handed over, closed, failed, or given up already).
    pub fn discard(self, why: &str) -> bool {
        let taken = std::mem::replace(&mut *self.slot.borrow_mut(), Slot::Gone);
        match taken {
            Slot::Open { ws, listeners, .. } => {
                socket::let_go(&ws, listeners, why);
                true
            }
            Slot::Connecting { .. } => true,
            Slot::Gone => false,
        }
    }
}
