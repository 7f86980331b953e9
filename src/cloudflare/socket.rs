//! WebSocket events as messages on one channel, so the call's pump can wait on both
//! sockets and a timer in a single loop.
//!
//! Listeners are attached synchronously, right after `accept()`: workerd drops messages
//! that arrive before a listener exists, and Twilio's `connected`/`start` come at once.

use futures::channel::mpsc::UnboundedSender;
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
    /// The connect numbered so (see `Pump::openai_connect`) succeeded or failed.
    OpenAiConnected(u64, WebSocket, Listeners),
    /// A failed connect: its number, the HTTP status of a refused upgrade, what went wrong.
    OpenAiFailed(u64, Option<u16>, String),
    HttpDone(u64, crate::http::Outcome),
    Timeout,
}

type Handler<T> = Closure<dyn FnMut(T)>;

/// Keeps the listeners alive; dropping it detaches them.
pub struct Listeners {
    socket: web_sys::WebSocket,
    message: Handler<web_sys::MessageEvent>,
    close: Handler<web_sys::CloseEvent>,
    error: Handler<web_sys::ErrorEvent>,
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

/// Forwards every event of `ws` to `tx`, tagged with `side`.
pub fn listen(ws: &WebSocket, side: Side, tx: UnboundedSender<Event>) -> worker::Result<Listeners> {
    let socket: web_sys::WebSocket = ws.as_ref().clone();
    let message: Handler<web_sys::MessageEvent> = Closure::wrap(Box::new({
        let tx = tx.clone();
        move |e: web_sys::MessageEvent| {
            let data = e.data();
            let frame = match data.as_string() {
                Some(text) => Frame::Text(text),
                None => Frame::Binary(js_sys::Uint8Array::new(&data).length() as usize),
            };
            let _ = tx.unbounded_send(Event::Socket(side, frame));
        }
    }));
    let close: Handler<web_sys::CloseEvent> = Closure::wrap(Box::new({
        let tx = tx.clone();
        move |e: web_sys::CloseEvent| {
            let _ = tx.unbounded_send(Event::Socket(
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
            let _ = tx.unbounded_send(Event::Socket(side, Frame::Error(e.message())));
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
