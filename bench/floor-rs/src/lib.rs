//! The benchmark's Rust floor: bench/floor/worker.js, frame for frame, as a workers-rs Worker.
//! Voice webhook -> TwiML with <Connect><Stream>; stream -> Durable Object; Twilio `media` ->
//! `input_audio_buffer.append`; `response.output_audio.delta` -> Twilio `media`. Nothing
//! else: no signature checks, no marks, no barge-in, no transcript, no records. Each frame
//! crosses into wasm as text, is parsed there (serde_json, borrowing the payload), and its
//! answer crosses back as text: the least a Rust/wasm bridge does per frame.

use serde::Deserialize;
use std::cell::RefCell;
use std::rc::Rc;
use worker::wasm_bindgen::closure::Closure;
use worker::wasm_bindgen::{JsCast, JsValue};
use worker::*;

const STREAM_PREFIX: &str = "/api/twilio/media-stream/";

#[event(fetch)]
async fn fetch(mut req: Request, env: Env, _ctx: Context) -> Result<Response> {
    let path = req.path();
    if path == "/healthz" {
        return Response::ok("ok");
    }
    if req.method() == Method::Post && path == "/api/twilio/voice" {
        let body = req.text().await?;
        let sid: String = form_urlencoded::parse(body.as_bytes())
            .find(|(k, _)| k == "CallSid")
            .map(|(_, v)| v.chars().filter(char::is_ascii_alphanumeric).collect())
            .unwrap_or_else(|| "CAunknown".into());
        let url = req.url()?;
        let scheme = if url.scheme() == "https" { "wss" } else { "ws" };
        let host = url.host_str().unwrap_or_default();
        let host = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        let twiml = format!(
            r#"<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url="{scheme}://{host}{STREAM_PREFIX}{sid}"/></Connect></Response>"#
        );
        let mut resp = Response::ok(twiml)?;
        resp.headers_mut().set("content-type", "text/xml")?;
        return Ok(resp);
    }
    let upgrade = req.headers().get("Upgrade")?;
    if let (Some(sid), Some("websocket")) = (path.strip_prefix(STREAM_PREFIX), upgrade.as_deref()) {
        let relays = env.durable_object("RELAY")?;
        let stub = relays.id_from_name(sid)?.get_stub()?;
        return stub.fetch_with_request(req).await;
    }
    Response::error("Not Found", 404)
}

#[durable_object]
pub struct Relay {
    env: Env,
}

impl DurableObject for Relay {
    fn new(_state: State, env: Env) -> Self {
        Self { env }
    }

    async fn fetch(&self, _req: Request) -> Result<Response> {
        relay(&self.env)
    }
}

#[derive(Deserialize)]
struct TwilioFrame<'a> {
    #[serde(borrow)]
    event: &'a str,
    #[serde(borrow)]
    media: Option<Media<'a>>,
    #[serde(borrow)]
    start: Option<Start<'a>>,
}

#[derive(Deserialize)]
struct Media<'a> {
    #[serde(borrow)]
    payload: &'a str,
}

#[derive(Deserialize)]
struct Start<'a> {
    #[serde(borrow, rename = "streamSid")]
    stream_sid: &'a str,
}

#[derive(Deserialize)]
struct OpenAiEvent<'a> {
    #[serde(borrow, rename = "type")]
    kind: &'a str,
    #[serde(borrow)]
    delta: Option<&'a str>,
}

type Listener = Closure<dyn FnMut(JsValue)>;

/// One call's relay: both sockets, and the listeners (kept until the call ends).
struct Call {
    twilio: WebSocket,
    upstream: Option<WebSocket>,
    stream_sid: Option<String>,
    pending: Vec<String>,
    listeners: Vec<(web_sys::WebSocket, &'static str, Listener)>,
    ended: bool,
}

type Shared = Rc<RefCell<Call>>;

fn listen(call: &Shared, ws: &WebSocket, kind: &'static str, f: impl FnMut(JsValue) + 'static) {
    let socket: web_sys::WebSocket = ws.as_ref().clone();
    let listener: Listener = Closure::wrap(Box::new(f));
    if socket
        .add_event_listener_with_callback(kind, listener.as_ref().unchecked_ref())
        .is_ok()
    {
        call.borrow_mut().listeners.push((socket, kind, listener));
    }
}

/// Closes both sockets; the listeners go once the running handler has returned.
fn end(call: &Shared) {
    let Ok(mut c) = call.try_borrow_mut() else {
        return;
    };
    if std::mem::replace(&mut c.ended, true) {
        return;
    }
    let _ = c.twilio.close(Some(1000), Some("done"));
    if let Some(ws) = c.upstream.take() {
        let _ = ws.close(Some(1000), Some("done"));
    }
    let listeners = std::mem::take(&mut c.listeners);
    wasm_bindgen_futures::spawn_local(async move {
        for (socket, kind, listener) in listeners {
            let _ =
                socket.remove_event_listener_with_callback(kind, listener.as_ref().unchecked_ref());
        }
    });
}

fn text(e: &JsValue) -> Option<String> {
    e.unchecked_ref::<web_sys::MessageEvent>()
        .data()
        .as_string()
}

fn relay(env: &Env) -> Result<Response> {
    let pair = WebSocketPair::new()?;
    pair.server.accept()?;
    let call: Shared = Rc::new(RefCell::new(Call {
        twilio: pair.server.clone(),
        upstream: None,
        stream_sid: None,
        pending: Vec::new(),
        listeners: Vec::new(),
        ended: false,
    }));
    // Listeners before any await: workerd drops messages that arrive with no listener.
    let c = call.clone();
    listen(&call, &pair.server, "message", move |e| {
        let Some(text) = text(&e) else { return };
        let Ok(frame) = serde_json::from_str::<TwilioFrame>(&text) else {
            return;
        };
        match (frame.event, frame.media, frame.start) {
            ("media", Some(media), _) => {
                let msg = format!(
                    r#"{{"type":"input_audio_buffer.append","audio":"{}"}}"#,
                    media.payload
                );
                let mut call = c.borrow_mut();
                match &call.upstream {
                    Some(ws) => {
                        let _ = ws.send_with_str(&msg);
                    }
                    None => call.pending.push(msg),
                }
            }
            ("start", _, Some(start)) => c.borrow_mut().stream_sid = Some(start.stream_sid.into()),
            ("stop", _, _) => end(&c),
            _ => {}
        }
    });
    for kind in ["close", "error"] {
        let c = call.clone();
        listen(&call, &pair.server, kind, move |_| end(&c));
    }

    let url = env
        .var("OPENAI_REALTIME_URL")?
        .to_string()
        .replacen("ws", "http", 1)
        + "?model=gpt-realtime";
    let key = env.var("OPENAI_API_KEY")?.to_string();
    let c = call.clone();
    wasm_bindgen_futures::spawn_local(async move {
        if connect(&c, &url, &key).await.is_err() {
            end(&c);
        }
    });
    Response::from_websocket(pair.client)
}

async fn connect(call: &Shared, url: &str, key: &str) -> Result<()> {
    let headers = Headers::new();
    headers.set("Upgrade", "websocket")?;
    headers.set("Authorization", &format!("Bearer {key}"))?;
    let mut init = RequestInit::new();
    init.with_headers(headers);
    let resp = Fetch::Request(Request::new_with_init(url, &init)?)
        .send()
        .await?;
    let ws = resp
        .websocket()
        .ok_or_else(|| Error::RustError("no websocket".into()))?;
    ws.accept()?;
    if call.borrow().ended {
        // The caller's side ended while this connected: nothing to relay, no listeners.
        let _ = ws.close(Some(1000), Some("done"));
        return Ok(());
    }
    let c = call.clone();
    listen(call, &ws, "message", move |e| {
        let Some(text) = text(&e) else { return };
        let Ok(event) = serde_json::from_str::<OpenAiEvent>(&text) else {
            return;
        };
        let call = c.borrow();
        if let ("response.output_audio.delta", Some(delta), Some(sid)) =
            (event.kind, event.delta, &call.stream_sid)
        {
            let msg = format!(
                r#"{{"event":"media","streamSid":"{sid}","media":{{"payload":"{delta}"}}}}"#
            );
            let _ = call.twilio.send_with_str(&msg);
        }
    });
    for kind in ["close", "error"] {
        let c = call.clone();
        listen(call, &ws, kind, move |_| end(&c));
    }
    ws.send_with_str(
        r#"{"type":"session.update","session":{"type":"realtime","output_modalities":["audio"],"audio":{"input":{"format":{"type":"audio/pcmu"},"turn_detection":{"type":"server_vad"}},"output":{"format":{"type":"audio/pcmu"}}}}}"#,
    )?;
    let mut c = call.borrow_mut();
    for msg in std::mem::take(&mut c.pending) {
        ws.send_with_str(&msg)?;
    }
    c.upstream = Some(ws);
    Ok(())
}
