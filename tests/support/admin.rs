//! A small client for the Worker's admin JSON API (`/api/admin/`), for tests that read back
//! what a call left in D1. D1 writes are asynchronous (the call object's outbox copies them
//! in the background), so reads that expect a write poll until it shows up.

use std::time::Duration;

use serde_json::Value;

/// One admin API answer.
#[derive(Debug, Clone)]
pub struct AdminReply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    /// The body as JSON (`Null` when empty or not JSON; see `text`).
    pub body: Value,
    pub text: String,
}

/// The admin API of one Worker, with its bearer token.
#[derive(Clone)]
pub struct Admin {
    base_url: String,
    token: String,
    client: reqwest::Client,
}

/// How often polling reads repeat.
const POLL_EVERY: Duration = Duration::from_millis(250);

impl Admin {
    pub fn new(base_url: &str, token: &str) -> Admin {
        Admin {
            base_url: base_url.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("reqwest client"),
        }
    }

    /// `method path` with the bearer token and an optional JSON body.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<AdminReply, String> {
        let url = format!("{}{path}", self.base_url);
        let method = reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?;
        let mut req = self
            .client
            .request(method.clone(), &url)
            .header("Authorization", format!("Bearer {}", self.token));
        if let Some(b) = body {
            req = req
                .header("Content-Type", "application/json")
                .body(b.to_string());
        }
        let resp = super::send(req)
            .await
            .map_err(|e| format!("{method} {path}: {e}"))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp
            .text()
            .await
            .map_err(|e| format!("{method} {path}: {e}"))?;
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok(AdminReply {
            status,
            headers,
            body,
            text,
        })
    }

    pub async fn get(&self, path: &str) -> Result<AdminReply, String> {
        self.request("GET", path, None).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<AdminReply, String> {
        self.request("POST", path, Some(body)).await
    }

    pub async fn put(&self, path: &str, body: &Value) -> Result<AdminReply, String> {
        self.request("PUT", path, Some(body)).await
    }

    /// `GET /api/admin/calls/{call_sid}`: `Some({"call", "transcript", "events"})`, or `None`
    /// while D1 has no row for the call (404).
    pub async fn call(&self, call_sid: &str) -> Result<Option<Value>, String> {
        let r = self.get(&format!("/api/admin/calls/{call_sid}")).await?;
        match r.status {
            200 => Ok(Some(r.body)),
            404 => Ok(None),
            s => Err(format!("GET call {call_sid}: {s} {}", r.text)),
        }
    }

    /// Poll the call's detail until `check` accepts it; returns the accepted detail. On
    /// timeout the error shows the last detail seen.
    pub async fn wait_call(
        &self,
        call_sid: &str,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&Value) -> bool,
    ) -> Result<Value, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last: Option<Value> = None;
        let mut last_error: Option<String> = None;
        loop {
            match self.call(call_sid).await {
                Ok(Some(detail)) => {
                    if check(&detail) {
                        return Ok(detail);
                    }
                    last = Some(detail);
                }
                Ok(None) => {}
                // A transient failure (e.g. wrangler restarting) is retried until the deadline.
                Err(e) => last_error = Some(e),
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "timed out after {timeout:?} waiting for call {call_sid}: {what}; last detail: {}{}",
                    last.map(|d| serde_json::to_string_pretty(&d).unwrap())
                        .unwrap_or_else(|| "none (404: no row yet)".into()),
                    last_error
                        .map(|e| format!("; last error: {e}"))
                        .unwrap_or_default()
                ));
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }
}

/// The events of `kind` in a call's detail (`GET /api/admin/calls/{call_sid}`), in order.
pub fn events_of(detail: &Value, kind: &str) -> Vec<Value> {
    detail["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["type"] == kind)
        .cloned()
        .collect()
}
