//! A local webhook-tool server for the end-to-end tests: what an agent's
//! `{"type": "function", "url": …}` tool calls. It records every request with its JSON body
//! and checks `X-Bridge-Signature: sha256=<hex HMAC-SHA256(tool secret, raw body)>` with its
//! own HMAC (not the Worker's code). Answers are scripted per path ([`ToolServer::answer`]):
//! a body and status, optionally delayed (past the tool's timeout) or held until the test
//! opens a [`Gate`]. Unscripted paths get 404.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

pub use super::local_http::Gate;
use super::local_http::{Answered, HttpReply, HttpRequest, LocalHttp};

/// The header the Worker signs webhook tool requests with.
pub const SIGNATURE_HEADER: &str = "x-bridge-signature";

/// `sha256=<hex>` of `body` keyed by `secret`.
pub fn expected_signature(secret: &str, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body.as_bytes());
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256={hex}")
}

/// One tool call as the server saw it.
#[derive(Clone, Debug)]
pub struct ToolRequest {
    pub at: Instant,
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    /// The raw body (what the signature covers).
    pub body: String,
    /// The body as JSON (`Null` when it is not JSON).
    pub json: Value,
    pub signature: Option<String>,
    /// The signature header is present and matches the body under the server's secret.
    pub signature_ok: bool,
    pub answered: Option<Answered>,
}

impl ToolRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A scripted answer for one path.
#[derive(Clone, Debug)]
pub struct ToolAnswer {
    pub status: u16,
    pub body: String,
    pub delay: Duration,
    pub gate: Option<Gate>,
}

impl ToolAnswer {
    pub fn ok(body: impl Into<String>) -> ToolAnswer {
        ToolAnswer {
            status: 200,
            body: body.into(),
            delay: Duration::ZERO,
            gate: None,
        }
    }

    pub fn status(status: u16, body: impl Into<String>) -> ToolAnswer {
        ToolAnswer {
            status,
            ..ToolAnswer::ok(body)
        }
    }

    pub fn after(mut self, delay: Duration) -> ToolAnswer {
        self.delay = delay;
        self
    }

    pub fn held_by(mut self, gate: &Gate) -> ToolAnswer {
        self.gate = Some(gate.clone());
        self
    }
}

/// The tool server.
pub struct ToolServer {
    http: LocalHttp,
    secret: String,
    answers: Arc<Mutex<HashMap<String, ToolAnswer>>>,
}

impl ToolServer {
    /// Serve on `rt`, checking signatures against `secret`.
    pub fn start(rt: &tokio::runtime::Runtime, secret: &str) -> ToolServer {
        let answers: Arc<Mutex<HashMap<String, ToolAnswer>>> = Arc::default();
        let a = answers.clone();
        let http = LocalHttp::start(rt, move |r| match a.lock().unwrap().get(&r.path) {
            Some(ans) => {
                let mut reply = HttpReply::json(ans.status, ans.body.clone()).after(ans.delay);
                if let Some(g) = &ans.gate {
                    reply = reply.held_by(g);
                }
                reply
            }
            None => HttpReply::text(404, "no such tool"),
        });
        ToolServer {
            http,
            secret: secret.to_owned(),
            answers,
        }
    }

    /// The URL of the tool at `path` (e.g. `/tools/lookup`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.http.base_url())
    }

    /// Answer requests to `path` with `answer`.
    pub fn answer(&self, path: &str, answer: ToolAnswer) {
        self.answers.lock().unwrap().insert(path.to_owned(), answer);
    }

    fn convert(&self, r: &HttpRequest) -> ToolRequest {
        let signature = r.header(SIGNATURE_HEADER).map(str::to_owned);
        let signature_ok = signature
            .as_deref()
            .is_some_and(|s| s == expected_signature(&self.secret, &r.body));
        ToolRequest {
            at: r.at,
            method: r.method.clone(),
            path: r.path.clone(),
            headers: r.headers.clone(),
            body: r.body.clone(),
            json: serde_json::from_str(&r.body).unwrap_or(Value::Null),
            signature,
            signature_ok,
            answered: r.answered.clone(),
        }
    }

    pub fn requests(&self) -> Vec<ToolRequest> {
        self.http
            .requests()
            .iter()
            .map(|r| self.convert(r))
            .collect()
    }

    /// Wait until `check` accepts the requests so far.
    pub async fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&[ToolRequest]) -> Option<T>,
    ) -> Result<T, String> {
        self.http
            .wait_until(what, timeout, |reqs| {
                let v: Vec<ToolRequest> = reqs.iter().map(|r| self.convert(r)).collect();
                check(&v)
            })
            .await
    }

    /// The first request to `path` (waiting for it).
    pub async fn wait_request(&self, path: &str, timeout: Duration) -> Result<ToolRequest, String> {
        self.wait_until(&format!("a request to {path}"), timeout, |reqs| {
            reqs.iter().find(|r| r.path == path).cloned()
        })
        .await
    }

    /// The first request to `path` once it has been answered (or the answer failed).
    pub async fn wait_answered(
        &self,
        path: &str,
        timeout: Duration,
    ) -> Result<ToolRequest, String> {
        self.wait_until(&format!("the answer to {path}"), timeout, |reqs| {
            reqs.iter()
                .find(|r| r.path == path && r.answered.is_some())
                .cloned()
        })
        .await
    }
}
