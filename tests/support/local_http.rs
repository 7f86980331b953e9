//! A minimal HTTP/1.1 server on 127.0.0.1 for the fakes the Worker calls with `fetch` (the
//! Twilio REST API, webhook tools). One request per connection (`Connection: close`), a body
//! read by `Content-Length` or chunked transfer coding, and every request recorded with its
//! arrival time before the handler runs.
//!
//! The handler returns a future, so an answer can be delayed or held until the test releases
//! it ([`Gate`]); the time the answer was written (or failed to be, when the Worker gave up
//! first) is recorded too.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// Largest request head or body accepted (the fakes only see small requests).
const MAX_BYTES: usize = 1 << 20;

/// One request as it arrived.
#[derive(Clone, Debug)]
pub struct HttpRequest {
    /// 0-based order of arrival on this server.
    pub index: usize,
    pub at: Instant,
    pub method: String,
    /// The request target's path (without the query).
    pub path: String,
    pub query: Option<String>,
    /// Header names lower-cased, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// When the answer was written; `None` while it is pending.
    pub answered: Option<Answered>,
}

/// How a request was answered.
#[derive(Clone, Debug)]
pub struct Answered {
    pub at: Instant,
    pub status: u16,
    /// `Some` when writing the answer failed (e.g. the client had already given up).
    pub write_error: Option<String>,
}

impl HttpRequest {
    /// The first value of a header (name compared case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// An answer: status, content type, body, sent after `delay` (and after `gate` opens).
#[derive(Clone, Debug)]
pub struct HttpReply {
    pub status: u16,
    pub content_type: String,
    pub body: String,
    pub delay: Duration,
    pub gate: Option<Gate>,
}

impl HttpReply {
    pub fn json(status: u16, body: impl Into<String>) -> HttpReply {
        HttpReply {
            status,
            content_type: "application/json".into(),
            body: body.into(),
            delay: Duration::ZERO,
            gate: None,
        }
    }

    pub fn text(status: u16, body: impl Into<String>) -> HttpReply {
        HttpReply {
            content_type: "text/plain; charset=utf-8".into(),
            ..HttpReply::json(status, body)
        }
    }

    pub fn after(mut self, delay: Duration) -> HttpReply {
        self.delay = delay;
        self
    }

    /// Hold the answer until `gate` is opened.
    pub fn held_by(mut self, gate: &Gate) -> HttpReply {
        self.gate = Some(gate.clone());
        self
    }
}

/// A latch the test opens to release held answers. Runtime-agnostic.
#[derive(Clone, Debug)]
pub struct Gate {
    tx: Arc<watch::Sender<bool>>,
}

impl Default for Gate {
    fn default() -> Self {
        Gate::new()
    }
}

impl Gate {
    pub fn new() -> Gate {
        Gate {
            tx: Arc::new(watch::channel(false).0),
        }
    }

    pub fn open(&self) {
        self.tx.send_replace(true);
    }

    pub fn is_open(&self) -> bool {
        *self.tx.borrow()
    }

    pub async fn wait(&self) {
        let mut rx = self.tx.subscribe();
        let _ = rx.wait_for(|open| *open).await;
    }
}

pub type Handler = Arc<dyn Fn(&HttpRequest) -> HttpReply + Send + Sync>;

struct Shared {
    requests: Mutex<Vec<HttpRequest>>,
    changed: watch::Sender<u64>,
    handler: Handler,
}

impl Shared {
    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }
}

/// A running server. Cheap to clone; it serves until the runtime it was started on ends.
#[derive(Clone)]
pub struct LocalHttp {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl LocalHttp {
    /// Bind 127.0.0.1 on a free port and serve on `rt`, answering with `handler`.
    pub fn start(
        rt: &tokio::runtime::Runtime,
        handler: impl Fn(&HttpRequest) -> HttpReply + Send + Sync + 'static,
    ) -> LocalHttp {
        let std_listener = super::worker::local_listener("local HTTP");
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            requests: Mutex::new(Vec::new()),
            changed: watch::channel(0).0,
            handler: Arc::new(handler),
        });
        let s = shared.clone();
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            loop {
                match listener.accept().await {
                    Ok((tcp, _)) => {
                        tokio::spawn(serve(s.clone(), tcp));
                    }
                    Err(e) => {
                        eprintln!("local HTTP: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        LocalHttp { addr, shared }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://127.0.0.1:<port>`
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<HttpRequest> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// Wait until `check` returns `Some` on the requests so far (checked at once and after
    /// every change: a request arriving or being answered).
    pub async fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&[HttpRequest]) -> Option<T>,
    ) -> Result<T, String> {
        let mut rx = self.shared.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            {
                let reqs = self.shared.requests.lock().unwrap();
                rx.borrow_and_update();
                if let Some(t) = check(&reqs) {
                    return Ok(t);
                }
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                let seen: Vec<String> = self
                    .requests()
                    .iter()
                    .map(|r| format!("{} {} -> {:?}", r.method, r.path, r.answered))
                    .collect();
                return Err(format!(
                    "local HTTP {}: timed out after {timeout:?} waiting for {what}; requests so far: {seen:?}",
                    self.addr
                ));
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads one request: head, then the body by `Content-Length` or chunked coding.
async fn read_request(
    tcp: &mut tokio::net::TcpStream,
) -> Result<(String, String, Vec<(String, String)>, Vec<u8>), String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_BYTES {
            return Err("request head too large".into());
        }
        let n = tcp.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed before the request head ended".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut rest = buf[head_end + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or_default().to_owned();
    let target = parts.next().unwrap_or_default().to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            let (n, v) = l.split_once(':')?;
            Some((n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        })
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let body = if header("transfer-encoding")
        .is_some_and(|t| t.to_ascii_lowercase().contains("chunked"))
    {
        let mut body = Vec::new();
        let mut pos = 0;
        loop {
            let line_end = loop {
                if let Some(i) = find(&rest[pos..], b"\r\n") {
                    break pos + i;
                }
                read_more(tcp, &mut rest).await?;
            };
            let size_text = String::from_utf8_lossy(&rest[pos..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| format!("bad chunk size {size_text:?}"))?;
            pos = line_end + 2;
            if size == 0 {
                break;
            }
            while rest.len() < pos + size + 2 {
                read_more(tcp, &mut rest).await?;
            }
            body.extend_from_slice(&rest[pos..pos + size]);
            pos += size + 2;
        }
        body
    } else {
        let len: usize = header("content-length")
            .map(|v| v.parse().map_err(|_| format!("bad content-length {v:?}")))
            .transpose()?
            .unwrap_or(0);
        if len > MAX_BYTES {
            return Err("request body too large".into());
        }
        while rest.len() < len {
            read_more(tcp, &mut rest).await?;
        }
        rest.truncate(len);
        rest
    };
    Ok((method, target, headers, body))
}

/// Reads more of the body into `rest`.
async fn read_more(tcp: &mut tokio::net::TcpStream, rest: &mut Vec<u8>) -> Result<(), String> {
    let mut chunk = [0u8; 8192];
    let n = tcp.read(&mut chunk).await.map_err(|e| e.to_string())?;
    if n == 0 {
        return Err("connection closed in the body".to_string());
    }
    rest.extend_from_slice(&chunk[..n]);
    if rest.len() > MAX_BYTES {
        return Err("request body too large".into());
    }
    Ok(())
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

async fn serve(shared: Arc<Shared>, mut tcp: tokio::net::TcpStream) {
    let (method, target, headers, body) = match read_request(&mut tcp).await {
        Ok(r) => r,
        Err(e) => {
            // workerd may open a connection it never uses; only complain about partial ones.
            if !e.starts_with("connection closed before") {
                eprintln!("local HTTP: bad request: {e}");
            }
            return;
        }
    };
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
        None => (target.clone(), None),
    };
    let request = {
        let mut reqs = shared.requests.lock().unwrap();
        let r = HttpRequest {
            index: reqs.len(),
            at: Instant::now(),
            method,
            path,
            query,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
            answered: None,
        };
        reqs.push(r.clone());
        r
    };
    shared.bump();
    let reply = (shared.handler)(&request);
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    if let Some(g) = &reply.gate {
        g.wait().await;
    }
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reply.status,
        reason(reply.status),
        reply.content_type,
        reply.body.len()
    );
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(reply.body.as_bytes());
    let written = async {
        tcp.write_all(&bytes).await?;
        tcp.flush().await?;
        tcp.shutdown().await
    }
    .await;
    {
        let mut reqs = shared.requests.lock().unwrap();
        reqs[request.index].answered = Some(Answered {
            at: Instant::now(),
            status: reply.status,
            write_error: written.err().map(|e| e.to_string()),
        });
    }
    shared.bump();
}
