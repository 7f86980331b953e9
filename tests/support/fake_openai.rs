//! A fake OpenAI Realtime (GA) server for the end-to-end tests.
//!
//! It is a real WebSocket server on 127.0.0.1. Each accepted connection becomes a [`Session`]
//! that records the handshake and every client event (in order, with receive time), answers
//! `session.update` with `session.updated` carrying the merged effective config (like the real
//! server), and otherwise says only what the test script tells it to (`Session::send`, or a
//! reaction registered in a [`SessionScript`]).
//!
//! The server runs on its own runtime (see `support::background_runtime`) because it outlives
//! any single `#[tokio::test]`; everything a test touches (`watch`, `mpsc`, mutexes) is
//! runtime-agnostic.
//!
//! Tests run concurrently, and the Worker does not tell OpenAI which call a socket belongs to,
//! so a test *claims* the next session: [`FakeOpenAi::claim`] serializes the window between
//! opening a media stream and the Worker connecting here, and hands the test "its" session.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch, OwnedMutexGuard};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// A scripted reaction: given the client event that triggered it, the server events to send
/// at once, in order.
pub type Reaction = Box<dyn FnMut(&Value) -> Vec<Value> + Send>;

/// How the next session behaves; handed over with [`FakeOpenAi::claim`].
pub struct SessionScript {
    /// Hold the WebSocket handshake this long after the TCP connect, so the Worker's socket
    /// to OpenAI is not open yet while the caller is already talking.
    pub handshake_delay: Duration,
    /// Answer `session.update` with `session.updated` (default). When false the update is only
    /// recorded; the test can answer by hand with [`Session::send_session_updated`].
    pub answer_session_update: bool,
    /// Refuse every WebSocket upgrade while the claim holds, with this HTTP status and
    /// OpenAI's error body (see [`SessionScript::refuse_upgrades`]).
    pub refuse: Option<u16>,
    reactions: Vec<(String, Reaction)>,
}

impl Default for SessionScript {
    fn default() -> Self {
        SessionScript {
            handshake_delay: Duration::ZERO,
            answer_session_update: true,
            refuse: None,
            reactions: Vec::new(),
        }
    }
}

impl SessionScript {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every time a client event of type `event_type` arrives, send what `reaction` returns.
    pub fn on(
        mut self,
        event_type: &str,
        reaction: impl FnMut(&Value) -> Vec<Value> + Send + 'static,
    ) -> Self {
        self.reactions
            .push((event_type.to_string(), Box::new(reaction)));
        self
    }

    /// Only the first time a client event of type `event_type` arrives, send `events`.
    pub fn once(self, event_type: &str, events: Vec<Value>) -> Self {
        let mut events = Some(events);
        self.on(event_type, move |_| events.take().unwrap_or_default())
    }

    pub fn handshake_delay(mut self, delay: Duration) -> Self {
        self.handshake_delay = delay;
        self
    }

    /// Answer every upgrade with HTTP `status` and an OpenAI-shaped JSON error instead of
    /// switching protocols, until the claim is dropped (so retries are refused too): 401 is
    /// what a wrong API key gets, 429 a rate limit, 5xx an outage.
    pub fn refuse_upgrades(mut self, status: u16) -> Self {
        self.refuse = Some(status);
        self
    }

    pub fn without_session_updated(mut self) -> Self {
        self.answer_session_update = false;
        self
    }

    /// Answer every `conversation.item.retrieve` of `item_id` with `conversation.item.retrieved`
    /// carrying `transcript` (what the real server holds after a truncate: the transcript of
    /// the audio the caller heard). A retrieve of any other item gets the server's error.
    pub fn answer_retrieve(self, item_id: &str, transcript: &str) -> Self {
        let (item_id, transcript) = (item_id.to_owned(), transcript.to_owned());
        self.on("conversation.item.retrieve", move |event| {
            if event["item_id"] == item_id.as_str() {
                vec![item_retrieved(&item_id, &transcript)]
            } else {
                vec![error_event(
                    "invalid_value",
                    &format!("Item with item_id '{}' not found", event["item_id"]),
                    Some("item_id"),
                    event,
                )]
            }
        })
    }
}

/// What the Worker sent in its WebSocket upgrade request.
#[derive(Clone, Debug)]
pub struct Handshake {
    pub path: String,
    pub query: Option<String>,
    /// Header names lower-cased, in the order received.
    pub headers: Vec<(String, String)>,
}

impl Handshake {
    /// All values of a header (name compared case-insensitively).
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.header_values(name).into_iter().next()
    }
}

/// One event received from the client (the Worker).
#[derive(Clone, Debug)]
pub struct ClientEvent {
    pub at: Instant,
    /// The parsed JSON; a text frame that is not JSON is kept as `Value::String(raw)`,
    /// a binary frame as `{"binary": <len>}`.
    pub event: Value,
}

impl ClientEvent {
    pub fn event_type(&self) -> &str {
        self.event.get("type").and_then(Value::as_str).unwrap_or("")
    }
}

/// What a session saw so far, as handed to `Session::wait_until` checks.
pub struct SessionView<'a> {
    pub received: &'a [ClientEvent],
    /// Server events sent, in order.
    pub sent: &'a [(Instant, Value)],
    pub closed: Option<&'a Closed>,
}

/// How a session's socket ended.
#[derive(Clone, Debug)]
pub struct Closed {
    pub at: Instant,
    /// `Some` when the client sent a close frame (code, reason); `None` for a dropped socket.
    pub close_frame: Option<(u16, String)>,
    pub error: Option<String>,
}

#[derive(Debug, Default)]
struct SessionLog {
    received: Vec<ClientEvent>,
    sent: Vec<(Instant, Value)>,
    effective: Value,
    closed: Option<Closed>,
    /// μ-law bytes sent in `response.output_audio.delta`, per item id (for truncate checks).
    audio_bytes_by_item: Vec<(String, usize)>,
    next_event: u64,
    /// μ-law bytes appended since the input buffer was last committed (by the script's
    /// `input_audio_buffer.committed` or by a commit of the Worker's).
    uncommitted_audio: usize,
    /// User items made by the Worker's commits so far.
    commits: usize,
}

enum Out {
    Event(Value),
    Close(u16, String),
}

/// One WebSocket connection from the Worker.
pub struct Session {
    /// 0-based order of connection over the whole run.
    pub index: usize,
    pub handshake: Handshake,
    pub connected_at: Instant,
    log: Mutex<SessionLog>,
    changed: watch::Sender<u64>,
    out: mpsc::UnboundedSender<Out>,
}

impl Session {
    /// Send a server event (an `event_id` is added when missing).
    pub fn send(&self, event: Value) {
        let _ = self.out.send(Out::Event(event));
    }

    pub fn send_all(&self, events: impl IntoIterator<Item = Value>) {
        for e in events {
            self.send(e);
        }
    }

    /// Answer a `session.update` by hand (see `SessionScript::without_session_updated`).
    /// `patch` is merged into the effective config first.
    pub fn send_session_updated(&self, patch: &Value) {
        let effective = {
            let mut log = self.log.lock().unwrap();
            merge_session(&mut log.effective, patch);
            log.effective.clone()
        };
        self.send(json!({"type": "session.updated", "session": effective}));
    }

    /// Close the socket from the server side.
    pub fn close(&self) {
        let _ = self.out.send(Out::Close(1000, String::new()));
    }

    /// Close the socket with this code and reason (1011 is what a server error closes with).
    pub fn close_with(&self, code: u16, reason: &str) {
        let _ = self.out.send(Out::Close(code, reason.to_owned()));
    }

    pub fn received(&self) -> Vec<ClientEvent> {
        self.log.lock().unwrap().received.clone()
    }

    pub fn received_of_type(&self, event_type: &str) -> Vec<ClientEvent> {
        self.received()
            .into_iter()
            .filter(|e| e.event_type() == event_type)
            .collect()
    }

    /// Server events sent so far, in order.
    pub fn sent(&self) -> Vec<(Instant, Value)> {
        self.log.lock().unwrap().sent.clone()
    }

    pub fn effective_session(&self) -> Value {
        self.log.lock().unwrap().effective.clone()
    }

    pub fn closed(&self) -> Option<Closed> {
        self.log.lock().unwrap().closed.clone()
    }

    /// Types of the client events so far (for failure messages).
    pub fn received_types(&self) -> Vec<String> {
        self.received()
            .iter()
            .map(|e| e.event_type().to_string())
            .collect()
    }

    /// Wait until `check` returns `Some` on what happened so far (checked at once and after
    /// every change).
    pub async fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&SessionView) -> Option<T>,
    ) -> Result<T, String> {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            {
                let log = self.log.lock().unwrap();
                rx.borrow_and_update();
                let view = SessionView {
                    received: &log.received,
                    sent: &log.sent,
                    closed: log.closed.as_ref(),
                };
                if let Some(t) = check(&view) {
                    return Ok(t);
                }
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return Err(format!(
                    "OpenAI session #{}: timed out after {:?} waiting for {what}; client events so far: {:?}; closed: {:?}",
                    self.index,
                    timeout,
                    summarize(&self.received()),
                    self.closed()
                ));
            }
        }
    }

    /// The first client event of this type (waiting for it if needed).
    pub async fn wait_event(
        &self,
        event_type: &str,
        timeout: Duration,
    ) -> Result<ClientEvent, String> {
        self.wait_until(&format!("a `{event_type}` event"), timeout, |v| {
            v.received
                .iter()
                .find(|e| e.event_type() == event_type)
                .cloned()
        })
        .await
    }

    /// Waits until the fake has sent the Worker an event of this type (`session.updated`:
    /// the session is configured).
    pub async fn wait_sent(&self, event_type: &str, timeout: Duration) -> Result<(), String> {
        self.wait_until(&format!("`{event_type}` to be sent"), timeout, |v| {
            v.sent
                .iter()
                .any(|(_, e)| e["type"] == event_type)
                .then_some(())
        })
        .await
    }

    /// The first `n` client events of this type (waiting until there are that many).
    pub async fn wait_events(
        &self,
        event_type: &str,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<ClientEvent>, String> {
        self.wait_until(&format!("{n} `{event_type}` events"), timeout, |view| {
            let v: Vec<ClientEvent> = view
                .received
                .iter()
                .filter(|e| e.event_type() == event_type)
                .cloned()
                .collect();
            (v.len() >= n).then(|| v.into_iter().take(n).collect())
        })
        .await
    }

    pub async fn wait_closed(&self, timeout: Duration) -> Result<Closed, String> {
        self.wait_until("the socket to close", timeout, |v| v.closed.cloned())
            .await
    }

    fn record_received(&self, event: Value) -> ClientEvent {
        let ev = ClientEvent {
            at: Instant::now(),
            event,
        };
        self.log.lock().unwrap().received.push(ev.clone());
        self.bump();
        ev
    }

    fn record_closed(&self, close_frame: Option<(u16, String)>, error: Option<String>) {
        {
            let mut log = self.log.lock().unwrap();
            if log.closed.is_none() {
                log.closed = Some(Closed {
                    at: Instant::now(),
                    close_frame,
                    error,
                });
            }
        }
        self.bump();
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// Stamp an outgoing event (event_id) and book-keep audio per item.
    fn prepare_outgoing(&self, mut event: Value) -> Value {
        let mut log = self.log.lock().unwrap();
        if let Some(obj) = event.as_object_mut() {
            if !obj.contains_key("event_id") {
                log.next_event += 1;
                obj.insert(
                    "event_id".into(),
                    json!(format!("event_s{}_{}", self.index, log.next_event)),
                );
            }
        }
        if event["type"] == "input_audio_buffer.committed" {
            log.uncommitted_audio = 0;
        }
        if event["type"] == "response.output_audio.delta" {
            let item = event["item_id"].as_str().unwrap_or("").to_string();
            let n = event["delta"]
                .as_str()
                .and_then(|d| base64::engine::general_purpose::STANDARD.decode(d).ok())
                .map(|b| b.len())
                .unwrap_or(0);
            match log.audio_bytes_by_item.iter_mut().find(|(i, _)| *i == item) {
                Some((_, total)) => *total += n,
                None => log.audio_bytes_by_item.push((item, n)),
            }
        }
        log.sent.push((Instant::now(), event.clone()));
        drop(log);
        self.bump();
        event
    }

    fn audio_ms_sent_for(&self, item_id: &str) -> Option<u64> {
        let log = self.log.lock().unwrap();
        log.audio_bytes_by_item
            .iter()
            .find(|(i, _)| i == item_id)
            .map(|(_, n)| (*n as u64) / 8)
    }
}

fn summarize(events: &[ClientEvent]) -> Vec<String> {
    // Collapse runs of the same type so long audio streams stay readable.
    let mut out: Vec<(String, usize)> = Vec::new();
    for e in events {
        let t = e.event_type().to_string();
        match out.last_mut() {
            Some((last, n)) if *last == t => *n += 1,
            _ => out.push((t, 1)),
        }
    }
    out.into_iter()
        .map(|(t, n)| if n > 1 { format!("{t} ×{n}") } else { t })
        .collect()
}

struct ServerState {
    sessions: Vec<Arc<Session>>,
    /// TCP connections accepted (a refused or broken handshake still counts).
    connections: usize,
    /// Upgrades refused by a [`SessionScript::refuse_upgrades`] script.
    refused: usize,
    pending: Option<SessionScript>,
}

struct Shared {
    state: Mutex<ServerState>,
    changed: watch::Sender<u64>,
    claim_lock: Arc<tokio::sync::Mutex<()>>,
}

/// The fake OpenAI Realtime server.
pub struct FakeOpenAi {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl FakeOpenAi {
    /// Bind 127.0.0.1 on a free port and serve on `rt`.
    pub fn start(rt: &tokio::runtime::Runtime) -> FakeOpenAi {
        let std_listener = super::worker::local_listener("fake OpenAI");
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            state: Mutex::new(ServerState {
                sessions: Vec::new(),
                connections: 0,
                refused: 0,
                pending: None,
            }),
            changed: watch::channel(0).0,
            claim_lock: Arc::new(tokio::sync::Mutex::new(())),
        });
        let s = shared.clone();
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            loop {
                match listener.accept().await {
                    Ok((tcp, _)) => {
                        tokio::spawn(serve_connection(s.clone(), tcp));
                    }
                    Err(e) => {
                        eprintln!("fake OpenAI: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        FakeOpenAi { addr, shared }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The value for the Worker's `OPENAI_REALTIME_URL`.
    pub fn realtime_url(&self) -> String {
        format!("ws://{}/v1/realtime", self.addr)
    }

    pub fn sessions(&self) -> Vec<Arc<Session>> {
        self.shared.state.lock().unwrap().sessions.clone()
    }

    pub fn connection_count(&self) -> usize {
        self.shared.state.lock().unwrap().connections
    }

    /// Upgrades refused so far (all claims).
    pub fn refused_count(&self) -> usize {
        self.shared.state.lock().unwrap().refused
    }

    /// Reserve the next session that connects. Hold the claim while opening the media stream
    /// whose OpenAI session you want, then call [`Claim::session`].
    pub async fn claim(&self, script: SessionScript) -> Claim {
        let guard = self.shared.claim_lock.clone().lock_owned().await;
        let (sessions, connections, refused) = {
            let mut st = self.shared.state.lock().unwrap();
            st.pending = Some(script);
            (st.sessions.len(), st.connections, st.refused)
        };
        Claim {
            shared: self.shared.clone(),
            sessions_before: sessions,
            connections_before: connections,
            refused_before: refused,
            _guard: guard,
        }
    }
}

/// An exclusive window in which the next connecting session belongs to the claimant.
pub struct Claim {
    shared: Arc<Shared>,
    sessions_before: usize,
    connections_before: usize,
    refused_before: usize,
    _guard: OwnedMutexGuard<()>,
}

impl Claim {
    /// The first session that connected after the claim began (waiting for it).
    pub async fn session(&self, timeout: Duration) -> Result<Arc<Session>, String> {
        let mut rx = self.shared.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            {
                let st = self.shared.state.lock().unwrap();
                rx.borrow_and_update();
                if let Some(s) = st.sessions.get(self.sessions_before) {
                    return Ok(s.clone());
                }
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return Err(format!(
                    "the Worker did not open an OpenAI session within {timeout:?} \
                     (TCP connections to the fake OpenAI during the claim: {})",
                    self.shared.state.lock().unwrap().connections - self.connections_before
                ));
            }
        }
    }

    /// TCP connections to the fake during the claim so far (refused ones included).
    pub fn connections(&self) -> usize {
        self.shared.state.lock().unwrap().connections - self.connections_before
    }

    /// Upgrades refused during the claim so far.
    pub fn refused(&self) -> usize {
        self.shared.state.lock().unwrap().refused - self.refused_before
    }

    /// Wait until at least `n` upgrades were refused during the claim.
    pub async fn wait_refused(&self, n: usize, timeout: Duration) -> Result<usize, String> {
        let mut rx = self.shared.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            rx.borrow_and_update();
            let got = self.refused();
            if got >= n {
                return Ok(got);
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return Err(format!(
                    "expected {n} refused upgrades within {timeout:?}, got {got}"
                ));
            }
        }
    }

    /// Succeeds if nobody connected to the fake OpenAI during `wait`.
    pub async fn expect_no_connection(&self, wait: Duration) -> Result<(), String> {
        tokio::time::sleep(wait).await;
        let st = self.shared.state.lock().unwrap();
        let n = st.connections - self.connections_before;
        if n == 0 {
            Ok(())
        } else {
            Err(format!(
                "expected no connection to the fake OpenAI, got {n} (handshakes: {:?})",
                st.sessions[self.sessions_before..]
                    .iter()
                    .map(|s| &s.handshake)
                    .collect::<Vec<_>>()
            ))
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        // A script nobody picked up must not leak into the next claimant's session.
        self.shared.state.lock().unwrap().pending = None;
    }
}

#[allow(clippy::result_large_err)] // the handshake callback type is tungstenite's
async fn serve_connection(shared: Arc<Shared>, tcp: tokio::net::TcpStream) {
    let (mut script, refuse) = {
        let mut st = shared.state.lock().unwrap();
        st.connections += 1;
        match st.pending.as_ref().and_then(|p| p.refuse) {
            // The refusing script stays in place for the next attempt.
            Some(status) => {
                st.refused += 1;
                (SessionScript::default(), Some(status))
            }
            None => (st.pending.take().unwrap_or_default(), None),
        }
    };
    shared.changed.send_modify(|v| *v += 1);
    if !script.handshake_delay.is_zero() {
        tokio::time::sleep(script.handshake_delay).await;
    }

    let captured: Arc<Mutex<Option<Handshake>>> = Arc::new(Mutex::new(None));
    let cap = captured.clone();
    let ws = tokio_tungstenite::accept_hdr_async(tcp, move |req: &Request, resp: Response| {
        if let Some(status) = refuse {
            return Err(refusal(status));
        }
        *cap.lock().unwrap() = Some(Handshake {
            path: req.uri().path().to_string(),
            query: req.uri().query().map(str::to_string),
            headers: req
                .headers()
                .iter()
                .map(|(n, v)| {
                    (
                        n.as_str().to_ascii_lowercase(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
        });
        Ok(resp)
    })
    .await;
    let ws = match ws {
        Ok(ws) => ws,
        Err(_) if refuse.is_some() => {
            shared.changed.send_modify(|v| *v += 1);
            return;
        }
        Err(e) => {
            eprintln!("fake OpenAI: WebSocket handshake failed: {e}");
            return;
        }
    };
    let handshake = captured.lock().unwrap().take().expect("handshake captured");

    let (out_tx, mut out_rx) = mpsc::unbounded_channel();
    let session = {
        let mut st = shared.state.lock().unwrap();
        let s = Arc::new(Session {
            index: st.sessions.len(),
            handshake,
            connected_at: Instant::now(),
            log: Mutex::new(SessionLog {
                effective: default_session(st.sessions.len()),
                ..SessionLog::default()
            }),
            changed: watch::channel(0).0,
            out: out_tx,
        });
        st.sessions.push(s.clone());
        s
    };
    shared.changed.send_modify(|v| *v += 1);

    let (mut sink, mut stream) = ws.split();
    let created = json!({"type": "session.created", "session": session.effective_session()});
    if send_event(&session, &mut sink, created).await.is_err() {
        session.record_closed(None, Some("could not send session.created".into()));
        return;
    }

    loop {
        tokio::select! {
            msg = stream.next() => match msg {
                Some(Ok(Message::Text(text))) => {
                    let event = serde_json::from_str::<Value>(text.as_str())
                        .unwrap_or_else(|_| Value::String(text.as_str().to_string()));
                    let ev = session.record_received(event);
                    for reply in react(&session, &mut script, &ev.event) {
                        if send_event(&session, &mut sink, reply).await.is_err() {
                            break;
                        }
                    }
                }
                Some(Ok(Message::Binary(b))) => {
                    session.record_received(json!({"binary": b.len()}));
                }
                Some(Ok(Message::Close(frame))) => {
                    session.record_closed(
                        Some(frame.map(|f| (u16::from(f.code), f.reason.to_string())).unwrap_or((1005, String::new()))),
                        None,
                    );
                    // tungstenite answers the close; drain until the stream ends.
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    session.record_closed(None, Some(e.to_string()));
                    break;
                }
                None => {
                    session.record_closed(None, None);
                    break;
                }
            },
            out = out_rx.recv() => match out {
                Some(Out::Event(e)) => {
                    if let Err(err) = send_event(&session, &mut sink, e).await {
                        session.record_closed(None, Some(format!("send failed: {err}")));
                        break;
                    }
                }
                Some(Out::Close(code, reason)) => {
                    let _ = sink
                        .send(Message::Close(Some(CloseFrame { code: CloseCode::from(code), reason: reason.into() })))
                        .await;
                }
                None => {}
            },
        }
    }
}

async fn send_event<S>(session: &Session, sink: &mut S, event: Value) -> Result<(), String>
where
    S: futures::Sink<Message> + Unpin,
    S::Error: std::fmt::Display,
{
    let event = session.prepare_outgoing(event);
    sink.send(Message::text(event.to_string()))
        .await
        .map_err(|e| e.to_string())
}

/// The server's own answers (like the real API) followed by the script's reactions.
fn react(session: &Session, script: &mut SessionScript, event: &Value) -> Vec<Value> {
    let mut replies = Vec::new();
    let ty = event.get("type").and_then(Value::as_str).unwrap_or("");
    match ty {
        "session.update" if script.answer_session_update => {
            let patch = &event["session"];
            if patch.get("type").is_none() {
                replies.push(error_event(
                    "missing_required_parameter",
                    "Missing required parameter: 'session.type'.",
                    Some("session.type"),
                    event,
                ));
            } else if let Some(param) = unknown_field(patch, "session", SESSION_FIELDS) {
                // GA rejects the whole update for one unknown (or beta) field.
                replies.push(error_event(
                    "unknown_parameter",
                    &format!("Unknown parameter: '{param}'."),
                    Some(&param),
                    event,
                ));
            } else {
                let effective = {
                    let mut log = session.log.lock().unwrap();
                    merge_session(&mut log.effective, patch);
                    log.effective.clone()
                };
                replies.push(json!({"type": "session.updated", "session": effective}));
            }
        }
        "response.create" => {
            if let Some(param) = unknown_field(&event["response"], "response", RESPONSE_FIELDS) {
                replies.push(error_event(
                    "unknown_parameter",
                    &format!("Unknown parameter: '{param}'."),
                    Some(&param),
                    event,
                ));
            }
        }
        "conversation.item.create" => {
            // Confirmed as the real API does, with an id of the server's when it has none.
            static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
            let mut item = event["item"].clone();
            if item.get("id").is_none() {
                let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                item["id"] = json!(format!("item_client_{n}"));
            }
            if item["type"] == "message" {
                item["status"] = json!("completed");
            }
            for ty in ["conversation.item.added", "conversation.item.done"] {
                replies.push(json!({ "type": ty, "previous_item_id": null, "item": item }));
            }
        }
        "input_audio_buffer.append" => {
            let n = event["audio"]
                .as_str()
                .and_then(|a| base64::engine::general_purpose::STANDARD.decode(a).ok())
                .map_or(0, |b| b.len());
            session.log.lock().unwrap().uncommitted_audio += n;
        }
        "input_audio_buffer.commit" => {
            // As the real API: a turn of the audio appended since the last commit, then its
            // transcription; under 100 ms of it, an error.
            let made = {
                let mut log = session.log.lock().unwrap();
                (log.uncommitted_audio >= 800).then(|| {
                    log.commits += 1;
                    format!("item_commit_s{}_{}", session.index, log.commits)
                })
            };
            match made {
                Some(item) => {
                    replies.push(input_committed(&item, None));
                    replies.push(user_item_added(&item, None));
                    replies.push(caller_transcription_completed(&item, COMMITTED_WORDS));
                }
                None => replies.push(error_event(
                    "input_audio_buffer_commit_empty",
                    "Error committing input audio buffer: buffer too small. Expected at least \
                     100ms of audio.",
                    None,
                    event,
                )),
            }
        }
        "conversation.item.truncate" => {
            let item = event["item_id"].as_str().unwrap_or("");
            let end = event["audio_end_ms"].as_u64();
            match (session.audio_ms_sent_for(item), end) {
                (Some(have), Some(end)) if end <= have => replies.push(json!({
                    "type": "conversation.item.truncated",
                    "item_id": item,
                    "content_index": event["content_index"],
                    "audio_end_ms": end,
                })),
                (Some(have), Some(end)) => replies.push(error_event(
                    "invalid_value",
                    &format!("Audio content of {have}ms is already shorter than {end}ms"),
                    Some("audio_end_ms"),
                    event,
                )),
                _ => replies.push(error_event(
                    "invalid_value",
                    &format!("Item with item_id '{item}' not found or audio_end_ms missing"),
                    Some("item_id"),
                    event,
                )),
            }
        }
        _ => {}
    }
    for (t, reaction) in script.reactions.iter_mut() {
        if t == ty {
            replies.extend(reaction(event));
        }
    }
    replies
}

/// The fields the GA API knows (protocol.md A2), as nested paths: a key not listed where an
/// object is listed is unknown. `*` lists the fields of every element of an array.
const SESSION_FIELDS: &[&str] = &[
    "type",
    "model",
    "output_modalities",
    "instructions",
    "audio",
    "audio.input",
    "audio.input.format",
    "audio.input.format.type",
    "audio.input.format.rate",
    "audio.input.transcription",
    "audio.input.transcription.model",
    "audio.input.transcription.language",
    "audio.input.transcription.prompt",
    "audio.input.noise_reduction",
    "audio.input.noise_reduction.type",
    "audio.input.turn_detection",
    "audio.input.turn_detection.type",
    "audio.input.turn_detection.threshold",
    "audio.input.turn_detection.prefix_padding_ms",
    "audio.input.turn_detection.silence_duration_ms",
    "audio.input.turn_detection.idle_timeout_ms",
    "audio.input.turn_detection.create_response",
    "audio.input.turn_detection.interrupt_response",
    "audio.input.turn_detection.eagerness",
    "audio.output",
    "audio.output.format",
    "audio.output.format.type",
    "audio.output.format.rate",
    "audio.output.voice",
    "audio.output.speed",
    "tools",
    "tools.*.type",
    "tools.*.name",
    "tools.*.description",
    "tools.*.parameters",
    "tool_choice",
    "max_output_tokens",
    "tracing",
    "truncation",
    "include",
    "prompt",
];

/// The fields of `response.create`'s `response` (protocol.md A3).
const RESPONSE_FIELDS: &[&str] = &[
    "instructions",
    "output_modalities",
    "tools",
    "tool_choice",
    "max_output_tokens",
    "conversation",
    "metadata",
    "input",
    "audio",
    "prompt",
];

/// The first field of `value` (at `path`) that `known` does not list, as the API names it
/// (`session.voice`). A listed field whose value is not an object (or array of objects) is
/// not looked into, unless fields under it are listed.
fn unknown_field(value: &Value, path: &str, known: &[&str]) -> Option<String> {
    fn walk(value: &Value, at: &str, shown: &str, known: &[&str]) -> Option<String> {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    let here = if at.is_empty() {
                        k.clone()
                    } else {
                        format!("{at}.{k}")
                    };
                    let shown = format!("{shown}.{k}");
                    if !known.contains(&here.as_str()) {
                        return Some(shown);
                    }
                    let inner = format!("{here}.");
                    if known.iter().any(|f| f.starts_with(&inner)) {
                        if let Some(u) = walk(v, &here, &shown, known) {
                            return Some(u);
                        }
                    }
                }
                None
            }
            Value::Array(items) => items
                .iter()
                .enumerate()
                .find_map(|(i, v)| walk(v, &format!("{at}.*"), &format!("{shown}[{i}]"), known)),
            _ => None,
        }
    }
    walk(value, "", path, known)
}

fn error_event(code: &str, message: &str, param: Option<&str>, cause: &Value) -> Value {
    json!({
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "code": code,
            "message": message,
            "param": param,
            "event_id": cause.get("event_id").cloned().unwrap_or(Value::Null),
        }
    })
}

/// The GA default config of a fresh session (as in the API reference's `session.created`).
/// The HTTP answer to a refused upgrade, with the JSON error body OpenAI's API gives.
fn refusal(status: u16) -> tokio_tungstenite::tungstenite::handshake::server::ErrorResponse {
    let (kind, code, message) = match status {
        401 => (
            "invalid_request_error",
            "invalid_api_key",
            "Incorrect API key provided.",
        ),
        429 => (
            "requests",
            "rate_limit_exceeded",
            "Rate limit reached for requests.",
        ),
        _ => ("server_error", "server_error", "The server had an error."),
    };
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    let mut resp = tokio_tungstenite::tungstenite::handshake::server::ErrorResponse::new(Some(
        body.to_string(),
    ));
    *resp.status_mut() =
        tokio_tungstenite::tungstenite::http::StatusCode::from_u16(status).expect("a status");
    resp.headers_mut().insert(
        "content-type",
        tokio_tungstenite::tungstenite::http::HeaderValue::from_static("application/json"),
    );
    resp
}

pub fn default_session(index: usize) -> Value {
    let expires = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    json!({
        "type": "realtime",
        "object": "realtime.session",
        "id": format!("sess_fake{index:06}"),
        "model": "gpt-realtime-2025-08-28",
        "output_modalities": ["audio"],
        "instructions": "Your knowledge cutoff is 2023-10. You are a helpful, witty, and friendly AI.",
        "tools": [],
        "tool_choice": "auto",
        "max_output_tokens": "inf",
        "tracing": null,
        "truncation": "auto",
        "prompt": null,
        "expires_at": expires,
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "transcription": null,
                "noise_reduction": null,
                "turn_detection": {
                    "type": "server_vad",
                    "threshold": 0.5,
                    "prefix_padding_ms": 300,
                    "silence_duration_ms": 200,
                    "idle_timeout_ms": null,
                    "create_response": true,
                    "interrupt_response": true
                }
            },
            "output": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "voice": "marin",
                "speed": 1.0
            }
        },
        "include": null
    })
}

/// Partial update as the server does it: objects merge key by key, anything else replaces.
/// A tagged object (`{"type": …}`) whose tag changes is replaced whole, so
/// `{"type":"audio/pcm","rate":24000}` updated with `{"type":"audio/pcmu"}` loses its rate.
pub fn merge_session(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            let retagged = p.get("type").is_some()
                && t.get("type").is_some()
                && p.get("type") != t.get("type");
            if retagged {
                *t = p.clone();
                return;
            }
            for (k, v) in p {
                match t.get_mut(k) {
                    Some(existing) if existing.is_object() && v.is_object() => {
                        merge_session(existing, v)
                    }
                    _ => {
                        t.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

// ---- server event builders ----------------------------------------------------------------

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// `input_audio_buffer.speech_stopped` (the server VAD heard the caller stop).
pub fn speech_stopped(audio_end_ms: u64, user_item_id: &str) -> Value {
    json!({
        "type": "input_audio_buffer.speech_stopped",
        "audio_end_ms": audio_end_ms,
        "item_id": user_item_id,
    })
}

/// `input_audio_buffer.committed`: the caller's turn became the user item `user_item_id`.
pub fn input_committed(user_item_id: &str, previous_item_id: Option<&str>) -> Value {
    json!({
        "type": "input_audio_buffer.committed",
        "previous_item_id": previous_item_id,
        "item_id": user_item_id,
    })
}

/// `conversation.item.added` for the caller's audio message, before its transcription.
pub fn user_item_added(user_item_id: &str, previous_item_id: Option<&str>) -> Value {
    json!({
        "type": "conversation.item.added",
        "previous_item_id": previous_item_id,
        "item": {
            "id": user_item_id,
            "object": "realtime.item",
            "type": "message",
            "status": "completed",
            "role": "user",
            "content": [{"type": "input_audio", "transcript": null}],
        },
    })
}

/// What the fake transcribes a turn the Worker commits itself to (its caller's words at a
/// hang-up mid-sentence).
pub const COMMITTED_WORDS: &str = "それでお願いしま";

/// The end of a caller's turn as the server VAD reports it: `speech_stopped`,
/// `input_audio_buffer.committed`, `conversation.item.added` (the user item).
pub fn caller_turn_end(
    user_item_id: &str,
    previous_item_id: Option<&str>,
    audio_end_ms: u64,
) -> Vec<Value> {
    vec![
        speech_stopped(audio_end_ms, user_item_id),
        input_committed(user_item_id, previous_item_id),
        user_item_added(user_item_id, previous_item_id),
    ]
}

/// `conversation.item.input_audio_transcription.delta` (caller speech, partial).
pub fn caller_transcription_delta(user_item_id: &str, delta: &str) -> Value {
    json!({
        "type": "conversation.item.input_audio_transcription.delta",
        "item_id": user_item_id,
        "content_index": 0,
        "delta": delta,
    })
}

/// `conversation.item.input_audio_transcription.completed` (caller speech, final). Its
/// `usage` is the transcription's, not a response's.
pub fn caller_transcription_completed(user_item_id: &str, transcript: &str) -> Value {
    json!({
        "type": "conversation.item.input_audio_transcription.completed",
        "item_id": user_item_id,
        "content_index": 0,
        "transcript": transcript,
        "usage": {"type": "tokens", "input_tokens": 17, "output_tokens": 9, "total_tokens": 26,
                  "input_token_details": {"text_tokens": 0, "audio_tokens": 17}},
    })
}

/// `conversation.item.input_audio_transcription.failed`.
pub fn caller_transcription_failed(user_item_id: &str, code: &str, message: &str) -> Value {
    json!({
        "type": "conversation.item.input_audio_transcription.failed",
        "item_id": user_item_id,
        "content_index": 0,
        "error": {"type": "transcription_error", "code": code, "message": message, "param": null},
    })
}

/// `response.output_audio_transcript.delta` (the agent's words, partial).
pub fn agent_transcript_delta(response_id: &str, item_id: &str, delta: &str) -> Value {
    json!({
        "type": "response.output_audio_transcript.delta",
        "response_id": response_id,
        "item_id": item_id,
        "output_index": 0,
        "content_index": 0,
        "delta": delta,
    })
}

/// `conversation.item.retrieved` for an assistant audio item whose transcript (after a
/// truncate) is `transcript`.
pub fn item_retrieved(item_id: &str, transcript: &str) -> Value {
    json!({
        "type": "conversation.item.retrieved",
        "item": {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "status": "incomplete",
            "role": "assistant",
            "content": [{"type": "output_audio", "transcript": transcript, "audio": b64(&[0xFF; 16])}],
        },
    })
}

/// Replace the token usage of every `response.done` in `events` (input + output = total).
pub fn with_usage(mut events: Vec<Value>, input_tokens: u64, output_tokens: u64) -> Vec<Value> {
    for e in events.iter_mut().filter(|e| e["type"] == "response.done") {
        e["response"]["usage"] = json!({
            "total_tokens": input_tokens + output_tokens,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "input_token_details": {
                "text_tokens": input_tokens, "audio_tokens": 0, "image_tokens": 0, "cached_tokens": 0,
                "cached_tokens_details": {"text_tokens": 0, "audio_tokens": 0, "image_tokens": 0}
            },
            "output_token_details": {"text_tokens": 0, "audio_tokens": output_tokens},
        });
    }
    events
}

/// `input_audio_buffer.speech_started` (the server VAD heard the caller).
pub fn speech_started(audio_start_ms: u64, user_item_id: &str) -> Value {
    json!({
        "type": "input_audio_buffer.speech_started",
        "audio_start_ms": audio_start_ms,
        "item_id": user_item_id,
    })
}

fn assistant_item(item_id: &str, status: &str, transcript: Option<&str>) -> Value {
    let content = match transcript {
        Some(t) => json!([{"type": "output_audio", "transcript": t}]),
        None => json!([]),
    };
    json!({
        "id": item_id,
        "object": "realtime.item",
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content,
    })
}

/// A `realtime.response` object (protocol.md A4) with this status, `status_details`, output
/// items and usage.
fn response_object(
    response_id: &str,
    status: &str,
    status_details: Value,
    output: Vec<Value>,
    usage: Value,
) -> Value {
    json!({
        "object": "realtime.response",
        "id": response_id,
        "status": status,
        "status_details": status_details,
        "output": output,
        "conversation_id": "conv_fake",
        "output_modalities": ["audio"],
        "max_output_tokens": "inf",
        "audio": {"output": {"format": {"type": "audio/pcmu"}, "voice": "marin"}},
        "usage": usage,
        "metadata": null
    })
}

/// The events that open an audio response: `response.created`, `response.output_item.added`,
/// `conversation.item.added`, `response.content_part.added`.
pub fn response_start(response_id: &str, item_id: &str) -> Vec<Value> {
    vec![
        json!({
            "type": "response.created",
            "response": response_object(response_id, "in_progress", Value::Null, vec![], Value::Null),
        }),
        json!({
            "type": "response.output_item.added",
            "response_id": response_id,
            "output_index": 0,
            "item": assistant_item(item_id, "in_progress", None),
        }),
        json!({
            "type": "conversation.item.added",
            "previous_item_id": null,
            "item": assistant_item(item_id, "in_progress", None),
        }),
        json!({
            "type": "response.content_part.added",
            "response_id": response_id,
            "item_id": item_id,
            "output_index": 0,
            "content_index": 0,
            "part": {"type": "output_audio", "transcript": ""},
        }),
    ]
}

/// One `response.output_audio.delta` carrying these μ-law bytes.
pub fn audio_delta(response_id: &str, item_id: &str, bytes: &[u8]) -> Value {
    json!({
        "type": "response.output_audio.delta",
        "response_id": response_id,
        "item_id": item_id,
        "output_index": 0,
        "content_index": 0,
        "delta": b64(bytes),
    })
}

/// The events that close an audio response. `status` is `completed` or `cancelled`
/// (the latter with reason `turn_detected`, as after a server-VAD barge-in).
pub fn response_finish(
    response_id: &str,
    item_id: &str,
    transcript: &str,
    status: &str,
) -> Vec<Value> {
    let ids = json!({"response_id": response_id, "item_id": item_id, "output_index": 0, "content_index": 0});
    let with = |ty: &str, extra: Value| {
        let mut v = ids.clone();
        v["type"] = json!(ty);
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            for (k, x) in e {
                o.insert(k.clone(), x.clone());
            }
        }
        v
    };
    let item_status = if status == "completed" {
        "completed"
    } else {
        "incomplete"
    };
    let status_details = if status == "cancelled" {
        json!({"type": "cancelled", "reason": "turn_detected"})
    } else {
        Value::Null
    };
    vec![
        with("response.output_audio.done", json!({})),
        with(
            "response.output_audio_transcript.done",
            json!({"transcript": transcript}),
        ),
        with(
            "response.content_part.done",
            json!({"part": {"type": "output_audio", "transcript": transcript}}),
        ),
        json!({
            "type": "response.output_item.done",
            "response_id": response_id,
            "output_index": 0,
            "item": assistant_item(item_id, item_status, Some(transcript)),
        }),
        json!({
            "type": "conversation.item.done",
            "previous_item_id": null,
            "item": assistant_item(item_id, item_status, Some(transcript)),
        }),
        json!({
            "type": "response.done",
            "response": response_object(
                response_id,
                status,
                status_details,
                vec![assistant_item(item_id, item_status, Some(transcript))],
                json!({
                    "total_tokens": 253,
                    "input_tokens": 132,
                    "output_tokens": 121,
                    "input_token_details": {
                        "text_tokens": 119, "audio_tokens": 13, "image_tokens": 0, "cached_tokens": 64,
                        "cached_tokens_details": {"text_tokens": 64, "audio_tokens": 0, "image_tokens": 0}
                    },
                    "output_token_details": {"text_tokens": 30, "audio_tokens": 91}
                }),
            ),
        }),
    ]
}

/// A response the server could not produce (protocol.md A4): `response.created`, then at
/// once `response.done` with status `failed` and `status_details.error` `{type, code}`, as
/// when the organisation is out of quota (`insufficient_quota`), over its rate limit
/// (`rate_limit_exceeded`) or the server erred (`server_error`).
pub fn response_failed(response_id: &str, error: &str) -> Vec<Value> {
    let response = |status: &str, details: Value| {
        response_object(response_id, status, details, vec![], Value::Null)
    };
    vec![
        json!({"type": "response.created", "response": response("in_progress", Value::Null)}),
        json!({
            "type": "response.done",
            "response": response(
                "failed",
                json!({"type": "failed", "error": {"type": error, "code": error}}),
            ),
        }),
    ]
}

/// The body of an audio response as the real server streams it: each audio chunk followed by
/// its piece of the transcript (`pieces[i]` after `chunks[i]`; extra pieces go at the end).
pub fn audio_with_transcript(
    response_id: &str,
    item_id: &str,
    chunks: &[Vec<u8>],
    pieces: &[&str],
) -> Vec<Value> {
    let mut v = Vec::new();
    for i in 0..chunks.len().max(pieces.len()) {
        if let Some(c) = chunks.get(i) {
            v.push(audio_delta(response_id, item_id, c));
        }
        if let Some(p) = pieces.get(i) {
            v.push(agent_transcript_delta(response_id, item_id, p));
        }
    }
    v
}

/// A whole audio response: start, one delta per chunk (in order), finish (`completed`).
pub fn full_response(
    response_id: &str,
    item_id: &str,
    chunks: &[Vec<u8>],
    transcript: &str,
) -> Vec<Value> {
    let mut v = response_start(response_id, item_id);
    v.extend(chunks.iter().map(|c| audio_delta(response_id, item_id, c)));
    v.push(json!({
        "type": "response.output_audio_transcript.delta",
        "response_id": response_id,
        "item_id": item_id,
        "output_index": 0,
        "content_index": 0,
        "delta": transcript,
    }));
    v.extend(response_finish(
        response_id,
        item_id,
        transcript,
        "completed",
    ));
    v
}

// Checks of the fake itself (no Worker needed).
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_openai_names_the_first_unknown_field_like_the_server() {
        let ga = json!({"type": "realtime", "model": "gpt-realtime",
            "audio": {"input": {"format": {"type": "audio/pcmu"},
                                "turn_detection": {"type": "server_vad", "threshold": 0.5}},
                      "output": {"format": {"type": "audio/pcmu"}, "voice": "marin"}},
            "tools": [{"type": "function", "name": "end_call", "parameters": {"type": "object",
                       "properties": {"reason": {"type": "string"}}}}]});
        assert_eq!(unknown_field(&ga, "session", SESSION_FIELDS), None);
        let beta = json!({"type": "realtime", "voice": "marin"});
        assert_eq!(
            unknown_field(&beta, "session", SESSION_FIELDS).as_deref(),
            Some("session.voice")
        );
        let nested =
            json!({"type": "realtime", "audio": {"input": {"input_audio_format": "g711_ulaw"}}});
        assert_eq!(
            unknown_field(&nested, "session", SESSION_FIELDS).as_deref(),
            Some("session.audio.input.input_audio_format")
        );
        let tool = json!({"type": "realtime", "tools": [{"type": "function", "name": "x", "url": "https://x"}]});
        assert_eq!(
            unknown_field(&tool, "session", SESSION_FIELDS).as_deref(),
            Some("session.tools[0].url")
        );
        let response = json!({"modalities": ["audio"]});
        assert_eq!(
            unknown_field(&response, "response", RESPONSE_FIELDS).as_deref(),
            Some("response.modalities")
        );
    }

    #[test]
    fn fake_openai_merges_session_update_like_the_server() {
        let mut s = default_session(0);
        merge_session(
            &mut s,
            &json!({"type": "realtime", "audio": {"output": {"format": {"type": "audio/pcmu"}},
                    "input": {"turn_detection": {"type": "server_vad", "threshold": 0.6}}}}),
        );
        assert_eq!(
            s["audio"]["output"]["format"],
            json!({"type": "audio/pcmu"})
        );
        assert_eq!(s["audio"]["output"]["voice"], json!("marin"));
        assert_eq!(
            s["audio"]["input"]["format"],
            json!({"type": "audio/pcm", "rate": 24000})
        );
        assert_eq!(
            s["audio"]["input"]["turn_detection"]["threshold"],
            json!(0.6)
        );
        assert_eq!(
            s["audio"]["input"]["turn_detection"]["prefix_padding_ms"],
            json!(300)
        );
    }
}
