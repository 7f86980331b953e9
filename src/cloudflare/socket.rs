//! WebSocket events handed to one sink, the call's pump, as they arrive: no channel and no
//! task switch per frame.
//!
//! Listeners are attached synchronously, right after `accept()`: workerd drops messages
//! that arrive before a listener exists, and Twilio's `connected`/`start` come at once.

use std::rc::Rc;
use worker::js_sys;
use worker::wasm_bindgen::closure::Closure;
use worker::wasm_bindgen::JsCast;
use worker::{web_sys, WebSocket};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Twilio,
    OpenAi,
}

pub enum Frame {
    Text(String),
    Binary(usize),
    Closed { code: u16, reason: String },
    Error(String),
}

pub enum Event {
    Socket(Side, Frame),
    /// The connect numbered so (see `Pump::openai_connect`) succeeded; true when the socket
    /// was opened ahead of the stream and what `call::ahead_of_stream` gave went on it.
    OpenAiConnected(u64, WebSocket, Listeners, bool),
    /// A failed connect: its number, the HTTP status of a refused upgrade, what went wrong.
    OpenAiFailed(u64, Option<u16>, String),
    HttpDone(u64, crate::http::Outcome),
    /// The pump's timer numbered so fired.
    Timer(u64),
}

/// Where a socket's events go.
pub type Sink = Rc<dyn Fn(Event)>;

type Handler<T> = Closure<dyn FnMut(T)>;

/// Keeps the listeners alive; dropping it detaches them.
pub struct Listeners {
    socket: web_sys::WebSocket,
    message: Handler<web_sys::MessageEvent>,
    close: Handler<web_sys::CloseEvent>,
    error: Handler<web_sys::ErrorEvent>,
}

impl Listeners {
    /// Detaches the listeners once the running event handler (which may be one of them) has
    /// returned: a closure must not be freed while it runs.
    pub fn retire(self) {
        worker::wasm_bindgen_futures::spawn_local(async move { drop(self) });
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        let s = &self.socket;
        let _ =
            s.remove_event_listener_with_callback("message", self.message.as_ref().unchecked_ref());
        let _ = s.remove_event_listener_with_callback("close", self.close.as_ref().unchecked_ref());
        let _ = s.remove_event_listener_with_callback("error", self.error.as_ref().unchecked_ref());
    }
}

/// Lets go of a socket nothing will use (a connect no longer wanted, a socket opened ahead
/// that no stream took): its listeners retired, then a normal close with `reason`.
pub fn let_go(ws: &WebSocket, listeners: Listeners, reason: &str) {
    listeners.retire();
    let _ = ws.close(Some(1000), Some(reason));
}

/// Forwards every event of `ws` to `sink`, tagged with `side`. The sink may not drop these
/// listeners while it runs (they are running): see `Listeners::retire`.
pub fn listen(ws: &WebSocket, side: Side, sink: Sink) -> worker::Result<Listeners> {
    let socket: web_sys::WebSocket = ws.as_ref().clone();
    let message: Handler<web_sys::MessageEvent> = Closure::wrap(Box::new({
        let sink = sink.clone();
        move |e: web_sys::MessageEvent| {
            let data = e.data();
            let frame = match data.as_string() {
                Some(text) => Frame::Text(text),
                None => Frame::Binary(js_sys::Uint8Array::new(&data).length() as usize),
            };
            sink(Event::Socket(side, frame));
        }
    }));
    let close: Handler<web_sys::CloseEvent> = Closure::wrap(Box::new({
        let sink = sink.clone();
        move |e: web_sys::CloseEvent| {
            sink(Event::Socket(
                side,
                Frame::Closed {
                    code: e.code(),
                    reason: e.reason(),
                },
            ));
        }
    }));
    let error: Handler<web_sys::ErrorEvent> =
        Closure::wrap(Box::new(move |e: web_sys::ErrorEvent| {
            sink(Event::Socket(side, Frame::Error(e.message())));
        }));
    socket
        .add_event_listener_with_callback("message", message.as_ref().unchecked_ref())
        .map_err(worker::Error::from)?;
    socket
        .add_event_listener_with_callback("close", close.as_ref().unchecked_ref())
        .map_err(worker::Error::from)?;
    socket
        .add_event_listener_with_callback("error", error.as_ref().unchecked_ref())
        .map_err(worker::Error::from)?;
    Ok(Listeners {
        socket,
        message,
        close,
        error,
    })
}
