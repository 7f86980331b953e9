//! A fake Twilio REST API (the Call resource's update, protocol.md C3) for the end-to-end
//! tests: `POST /2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}.json` with Basic auth and a
//! form body. Every request is recorded (method, path, headers, decoded form); a valid one is
//! answered 200 with JSON shaped like Twilio's Call resource, wrong credentials 401 and other
//! paths 404, with Twilio's error body. Per call, the answer can be delayed or given another
//! status ([`FakeTwilioRest::set_answer`]).
//!
//! One server is shared by all tests of a binary (the Worker's `TWILIO_API_BASE_URL` points at
//! it); tests tell their requests apart by CallSid.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use super::local_http::{Answered, HttpReply, HttpRequest, LocalHttp};

/// One request to the fake REST API.
#[derive(Clone, Debug)]
pub struct RestRequest {
    pub at: Instant,
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    /// The raw body.
    pub body: String,
    /// The body decoded as `application/x-www-form-urlencoded`, in order.
    pub form: Vec<(String, String)>,
    /// From the path, when it is a Call resource path.
    pub account_sid: Option<String>,
    pub call_sid: Option<String>,
    pub answered: Option<Answered>,
}

impl RestRequest {
    fn from_http(r: &HttpRequest) -> RestRequest {
        let form = form_urlencoded::parse(r.body.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let (account_sid, call_sid) = match call_path(&r.path) {
            Some((a, c)) => (Some(a), Some(c)),
            None => (None, None),
        };
        RestRequest {
            at: r.at,
            method: r.method.clone(),
            path: r.path.clone(),
            headers: r.headers.clone(),
            body: r.body.clone(),
            form,
            account_sid,
            call_sid,
            answered: r.answered.clone(),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The first value of a form field.
    pub fn form_value(&self, name: &str) -> Option<&str> {
        self.form
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The decoded `user:password` of a Basic `Authorization` header.
    pub fn basic_auth(&self) -> Option<(String, String)> {
        basic_auth(self.header("authorization")?)
    }
}

/// `(AccountSid, CallSid)` of `/2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}.json`.
pub fn call_path(path: &str) -> Option<(String, String)> {
    let rest = path.strip_prefix("/2010-04-01/Accounts/")?;
    let (account, rest) = rest.split_once('/')?;
    let call = rest.strip_prefix("Calls/")?.strip_suffix(".json")?;
    if account.is_empty() || call.is_empty() || call.contains('/') {
        return None;
    }
    Some((account.to_owned(), call.to_owned()))
}

fn basic_auth(header: &str) -> Option<(String, String)> {
    let b64 = header.strip_prefix("Basic ")?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_owned(), p.to_owned()))
}

/// How to answer requests for one call instead of the default 200.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    pub delay: Duration,
}

struct Config {
    username: String,
    password: String,
    answers: Mutex<HashMap<String, Answer>>,
}

/// The fake REST API.
pub struct FakeTwilioRest {
    http: LocalHttp,
    config: Arc<Config>,
}

fn twilio_error(status: u16, code: u32, message: &str) -> HttpReply {
    HttpReply::json(
        status,
        json!({
            "code": code,
            "message": message,
            "more_info": format!("https://www.twilio.com/docs/errors/{code}"),
            "status": status,
        })
        .to_string(),
    )
}

/// The Call resource after the update, as Twilio returns it (abridged).
fn call_resource(account_sid: &str, call_sid: &str, form: &[(String, String)]) -> Value {
    let hung_up = form.iter().any(|(k, v)| k == "Status" && v == "completed");
    let now = super::fake_twilio::rfc2822_now();
    json!({
        "sid": call_sid,
        "account_sid": account_sid,
        "api_version": "2010-04-01",
        "status": if hung_up { "completed" } else { "in-progress" },
        "direction": "inbound",
        "date_created": now,
        "date_updated": now,
        "start_time": now,
        "end_time": if hung_up { json!(now) } else { Value::Null },
        "duration": if hung_up { json!("12") } else { Value::Null },
        "price": null,
        "parent_call_sid": null,
        "uri": format!("/2010-04-01/Accounts/{account_sid}/Calls/{call_sid}.json"),
        "subresource_uris": {
            "recordings": format!("/2010-04-01/Accounts/{account_sid}/Calls/{call_sid}/Recordings.json"),
            "streams": format!("/2010-04-01/Accounts/{account_sid}/Calls/{call_sid}/Streams.json"),
        },
    })
}

impl FakeTwilioRest {
    /// Serve on `rt`, accepting Basic auth `username:password` (the Worker's
    /// `TWILIO_ACCOUNT_SID:TWILIO_AUTH_TOKEN`).
    pub fn start(rt: &tokio::runtime::Runtime, username: &str, password: &str) -> FakeTwilioRest {
        let config = Arc::new(Config {
            username: username.to_owned(),
            password: password.to_owned(),
            answers: Mutex::new(HashMap::new()),
        });
        let c = config.clone();
        let http = LocalHttp::start(rt, move |r| {
            let req = RestRequest::from_http(r);
            let (Some(account), Some(call)) = (&req.account_sid, &req.call_sid) else {
                return twilio_error(
                    404,
                    20404,
                    &format!("The requested resource {} was not found", req.path),
                );
            };
            if req.method != "POST" {
                return twilio_error(405, 20004, "Method not allowed");
            }
            if req.basic_auth() != Some((c.username.clone(), c.password.clone())) {
                return twilio_error(401, 20003, "Authenticate");
            }
            let answer = c.answers.lock().unwrap().get(call).cloned();
            let (status, delay) = answer
                .map(|a| (a.status, a.delay))
                .unwrap_or((200, Duration::ZERO));
            let reply = if status == 200 {
                HttpReply::json(200, call_resource(account, call, &req.form).to_string())
            } else {
                twilio_error(status, 20500, "Internal Server Error")
            };
            reply.after(delay)
        });
        FakeTwilioRest { http, config }
    }

    /// The value for the Worker's `TWILIO_API_BASE_URL`.
    pub fn base_url(&self) -> String {
        self.http.base_url()
    }

    /// Answer this call's requests with `answer` instead of an immediate 200.
    pub fn set_answer(&self, call_sid: &str, answer: Answer) {
        self.config
            .answers
            .lock()
            .unwrap()
            .insert(call_sid.to_owned(), answer);
    }

    pub fn requests(&self) -> Vec<RestRequest> {
        self.http
            .requests()
            .iter()
            .map(RestRequest::from_http)
            .collect()
    }

    /// Requests whose path names this CallSid.
    pub fn requests_for(&self, call_sid: &str) -> Vec<RestRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.call_sid.as_deref() == Some(call_sid))
            .collect()
    }

    /// Wait until `check` accepts this call's requests so far.
    pub async fn wait_for<T>(
        &self,
        call_sid: &str,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&[RestRequest]) -> Option<T>,
    ) -> Result<T, String> {
        self.http
            .wait_until(&format!("{what} (call {call_sid})"), timeout, |reqs| {
                let mine: Vec<RestRequest> = reqs
                    .iter()
                    .map(RestRequest::from_http)
                    .filter(|r| r.call_sid.as_deref() == Some(call_sid))
                    .collect();
                check(&mine)
            })
            .await
    }

    /// The first request for this call (waiting for it).
    pub async fn wait_request(
        &self,
        call_sid: &str,
        timeout: Duration,
    ) -> Result<RestRequest, String> {
        self.wait_for(call_sid, "a REST request", timeout, |r| r.first().cloned())
            .await
    }
}

/// The Workers' `TWILIO_ACCOUNT_SID` in the tests: the Basic auth user of REST requests.
pub const ACCOUNT_SID: &str = "AC0123456789abcdef0123456789abcdef";

/// The fake REST server a test binary shares (its Workers' `TWILIO_API_BASE_URL`), taking
/// `ACCOUNT_SID` and the tests' Twilio auth token.
pub fn shared() -> &'static FakeTwilioRest {
    static REST: std::sync::OnceLock<FakeTwilioRest> = std::sync::OnceLock::new();
    REST.get_or_init(|| {
        FakeTwilioRest::start(
            super::background_runtime(),
            ACCOUNT_SID,
            super::TWILIO_AUTH_TOKEN,
        )
    })
}
