//! End-to-end tests of the admin JSON API (`/api/admin/`) on the real Worker in `wrangler dev`
//! with a local D1 database migrated from `migrations/`.
//!
//! One Worker is shared by the tests of this binary. It is started through the shared
//! launcher (`support::worker`) with `--var ADMIN_TOKEN:<ADMIN_TOKEN>`. Calls are seeded with
//! `wrangler d1 execute --local` into the Worker's own `--persist-to` state. Each test uses
//! ids and numbers of its own, so they can run in parallel.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use support::worker::{WorkerConfig, WorkerProcess};

/// The bearer token the Worker under test is started with; it must never reach the log.
const ADMIN_TOKEN: &str = "admin-e2e-token-SECRET-789";

async fn worker() -> &'static WorkerProcess {
    static WORKER: tokio::sync::OnceCell<Result<WorkerProcess, String>> =
        tokio::sync::OnceCell::const_new();
    let w = WORKER
        .get_or_init(|| async {
            let stamp = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_millis();
            let scratch_dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
                .join(format!("e2e-admin-{}-{stamp}", std::process::id()));
            WorkerProcess::start(WorkerConfig {
                root: support::repo_root(),
                vars: vec![
                    ("ADMIN_TOKEN".into(), ADMIN_TOKEN.into()),
                    (
                        "TWILIO_AUTH_TOKEN".into(),
                        support::TWILIO_AUTH_TOKEN.into(),
                    ),
                    ("OPENAI_API_KEY".into(), support::OPENAI_API_KEY.into()),
                ],
                scratch_dir,
            })
            .await
        })
        .await;
    match w {
        Ok(w) => w,
        Err(e) => panic!("the Worker under test did not start:\n{e}"),
    }
}

/// One answer: status, headers we look at, and the body as JSON (Null when empty).
#[derive(Debug)]
struct Reply {
    status: u16,
    content_type: Option<String>,
    www_authenticate: Option<String>,
    allow: Option<String>,
    body: Value,
    text: String,
}

enum Auth<'a> {
    None,
    Bearer(&'a str),
    Raw(&'a str),
}

/// Sends one admin request. A 503 `unavailable` (D1 answered "database is locked") is sent
/// again, as its message asks: the tests here seed D1 with `wrangler d1 execute` (see
/// [`d1_execute`]), another process writing the same local database while other tests in
/// this binary read it, and the Worker's read can meet that process's write lock.
async fn send(method: &str, path: &str, auth: Auth<'_>, body: Option<&[u8]>) -> Reply {
    let mut tries = 0;
    loop {
        tries += 1;
        let reply = send_once(method, path, &auth, body).await;
        if reply.status != 503 || reply.body["error"] != "unavailable" || tries == 10 {
            if reply.status >= 500 {
                panic!(
                    "{method} {path} -> {} (try {tries}): {}\nWorker log tail:\n{}",
                    reply.status,
                    reply.text,
                    worker().await.log_tail(40)
                );
            }
            return reply;
        }
        eprintln!(
            "[e2e] {method} {path}: 503 unavailable (D1 locked by a seeding write); sent again"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn send_once(method: &str, path: &str, auth: &Auth<'_>, body: Option<&[u8]>) -> Reply {
    let w = worker().await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let url = format!("{}{path}", w.base_url());
    let mut req = client.request(
        reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
        &url,
    );
    match *auth {
        Auth::None => {}
        Auth::Bearer(t) => req = req.header("Authorization", format!("Bearer {t}")),
        Auth::Raw(h) => req = req.header("Authorization", h),
    }
    if let Some(b) = body {
        req = req
            .header("Content-Type", "application/json")
            .body(b.to_vec());
    }
    let resp = support::send(req)
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (content_type, www_authenticate, allow) = (
        header("content-type"),
        header("www-authenticate"),
        header("allow"),
    );
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!(
                "{method} {path} -> {status}: body is not JSON ({e}): {text}\nWorker log tail:\n{}",
                w.log_tail(30)
            )
        })
    };
    Reply {
        status,
        content_type,
        www_authenticate,
        allow,
        body,
        text,
    }
}

async fn api(method: &str, path: &str, body: Option<Value>) -> Reply {
    let body = body.map(|b| b.to_string());
    send(
        method,
        path,
        Auth::Bearer(ADMIN_TOKEN),
        body.as_deref().map(str::as_bytes),
    )
    .await
}

fn expect(r: &Reply, status: u16, what: &str) {
    assert_eq!(r.status, status, "{what}: {}", r.text);
    if status != 204 {
        assert_eq!(
            r.content_type.as_deref(),
            Some("application/json; charset=utf-8"),
            "{what}"
        );
    }
}

/// A 400 that names `field`.
fn expect_field(r: &Reply, field: &str, what: &str) {
    expect(r, 400, what);
    assert_eq!(r.body["error"], "invalid_request", "{what}: {}", r.text);
    assert_eq!(r.body["field"], field, "{what}: {}", r.text);
    assert!(
        r.body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}"
    );
}

/// Runs SQL on the Worker's local D1 state, as an operator would. The running Worker writes
/// to the same SQLite file (a call object's records, its alarm's retries): a write of its
/// that holds the lock makes this one fail with SQLITE_BUSY, and, as an operator would, it
/// is run again (other failures are not).
fn d1_execute(persist_dir: &Path, sql: &str) {
    let mut tries = 0;
    loop {
        tries += 1;
        let out = Command::new("npx")
            .current_dir(support::repo_root())
            .env("CI", "true")
            .env("WRANGLER_SEND_METRICS", "false")
            .env("NO_COLOR", "1")
            .args(["wrangler", "d1", "execute", "DB", "--local", "--persist-to"])
            .arg(persist_dir)
            .args(["--command", sql])
            .stdin(Stdio::null())
            .output()
            .expect("spawn wrangler d1 execute");
        if out.status.success() {
            return;
        }
        let said = format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            said.contains("SQLITE_BUSY") && tries < 10,
            "wrangler d1 execute failed (try {tries}):\n{said}"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

fn tool(name: &str) -> Value {
    json!({"type": "function", "name": name, "description": "Looks something up",
           "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
           "url": "https://crm.example.jp/hooks/lookup"})
}

// ---- auth and malformed requests ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn every_admin_route_needs_the_bearer_token() {
    for (method, path) in [
        ("GET", "/api/admin/agents"),
        ("POST", "/api/admin/agents"),
        ("GET", "/api/admin/calls"),
        ("GET", "/api/admin/numbers"),
        ("DELETE", "/api/admin/agents/default"),
        // Unknown paths too: nothing is revealed before the token is checked.
        ("GET", "/api/admin/nothing-here"),
    ] {
        for auth in [
            Auth::None,
            Auth::Bearer("wrong-token"),
            Auth::Bearer(""),
            Auth::Raw(&format!("Basic {ADMIN_TOKEN}")),
            Auth::Raw(ADMIN_TOKEN),
        ] {
            let r = send(method, path, auth, Some(b"{}")).await;
            expect(&r, 401, &format!("{method} {path}"));
            assert_eq!(r.www_authenticate.as_deref(), Some("Bearer"));
            assert_eq!(r.body["error"], "unauthorized");
            assert!(!r.text.contains(ADMIN_TOKEN));
        }
    }
    // The scheme is case-insensitive.
    let r = send(
        "GET",
        "/api/admin/agents",
        Auth::Raw(&format!("bearer {ADMIN_TOKEN}")),
        None,
    )
    .await;
    expect(&r, 200, "lower-case scheme");

    let log = worker().await.log();
    assert!(log.contains("admin.refused"), "refusals are logged");
    assert!(
        !log.contains(ADMIN_TOKEN),
        "the admin token reached the log"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_requests_get_json_errors() {
    let r = send(
        "POST",
        "/api/admin/agents",
        Auth::Bearer(ADMIN_TOKEN),
        Some(b"{\"name\": "),
    )
    .await;
    expect(&r, 400, "truncated JSON");
    assert_eq!(r.body["error"], "invalid_json");
    assert!(r.body.get("field").is_none());

    // A Shift_JIS body is refused, not stored with replacement characters.
    let sjis: &[u8] =
        b"{\"id\": \"e2e-sjis\", \"name\": \"\x97\x5c\x96\xf1\", \"instructions\": \"I\"}";
    let r = send(
        "POST",
        "/api/admin/agents",
        Auth::Bearer(ADMIN_TOKEN),
        Some(sjis),
    )
    .await;
    expect(&r, 400, "Shift_JIS body");
    assert_eq!(r.body["error"], "invalid_utf8", "{}", r.text);
    assert!(r.body["message"].as_str().unwrap().contains("UTF-8"));
    let r = api("GET", "/api/admin/agents/e2e-sjis", None).await;
    expect(&r, 404, "nothing stored from the Shift_JIS body");

    let r = send("POST", "/api/admin/agents", Auth::Bearer(ADMIN_TOKEN), None).await;
    expect(&r, 400, "empty body");
    assert_eq!(r.body["error"], "invalid_json");

    let r = api(
        "POST",
        "/api/admin/agents",
        Some(json!(["not", "an", "object"])),
    )
    .await;
    expect(&r, 400, "array body");
    assert_eq!(r.body["error"], "invalid_json");

    let r = api("DELETE", "/api/admin/calls", None).await;
    expect(&r, 405, "DELETE calls");
    assert_eq!(r.body["error"], "method_not_allowed");
    assert_eq!(r.allow.as_deref(), Some("GET"));
    let r = api("POST", "/api/admin/agents/default", Some(json!({}))).await;
    expect(&r, 405, "POST one agent");
    assert_eq!(r.allow.as_deref(), Some("GET, PUT, PATCH, DELETE"));

    for path in [
        "/api/admin/",
        "/api/admin/nothing-here",
        "/api/admin/agents/a/b",
    ] {
        let r = api("GET", path, None).await;
        expect(&r, 404, path);
        assert_eq!(r.body["error"], "not_found");
    }
    let r = api("GET", "/api/admin/agents/no-such-agent", None).await;
    expect(&r, 404, "unknown agent");
    let r = api(
        "PUT",
        "/api/admin/agents/no-such-agent",
        Some(json!({"name": "x"})),
    )
    .await;
    expect(&r, 404, "update unknown agent");
    let r = api("DELETE", "/api/admin/agents/no-such-agent", None).await;
    expect(&r, 404, "delete unknown agent");
}

// ---- agents and numbers -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn agents_and_numbers_lifecycle() {
    // The migration's Japanese default agent is there and is the default.
    let r = api("GET", "/api/admin/agents", None).await;
    expect(&r, 200, "list agents");
    let list = r.body["agents"].as_array().expect("agents array");
    let default = list
        .iter()
        .find(|a| a["id"] == "default")
        .unwrap_or_else(|| panic!("seeded default agent missing: {}", r.text));
    assert_eq!(default["is_default"], true);
    assert_eq!(default["language"], "ja");
    assert_eq!(default["voice"], "marin");
    // It can end a call (migration 0006); the rest is up to whoever sets it up.
    assert_eq!(default["tools"], json!([{"type": "end_call"}]));
    assert_eq!(default["turn_detection"]["type"], "server_vad");

    // Create with a generated id.
    let r = api(
        "POST",
        "/api/admin/agents",
        Some(json!({
            "name": "予約受付", "instructions": "予約を受け付けます。", "voice": "cedar",
            "turn_detection": {"type": "server_vad", "threshold": 0.6, "silence_duration_ms": 700},
            "tools": [tool("find_slot")], "transfer_number": "+81312340000",
            "max_call_seconds": 900, "tool_secret": "e2e-tool-secret-0123456789",
        })),
    )
    .await;
    expect(&r, 201, "create agent");
    let agent = r.body["agent"].clone();
    let id = agent["id"].as_str().unwrap().to_owned();
    assert!(
        id.starts_with("agt_") && id.len() == 20,
        "generated id {id:?}"
    );
    assert_eq!(agent["name"], "予約受付");
    assert_eq!(agent["voice"], "cedar");
    assert_eq!(agent["language"], "ja");
    assert_eq!(agent["is_default"], false);
    assert_eq!(agent["turn_detection"]["threshold"], 0.6);
    assert_eq!(agent["turn_detection"]["silence_duration_ms"], 700);
    assert_eq!(agent["turn_detection"]["prefix_padding_ms"], 300);
    assert_eq!(agent["tools"], json!([tool("find_slot")]));
    assert_eq!(agent["max_call_seconds"], 900);
    assert!(agent["created_at"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));
    let r = api("GET", &format!("/api/admin/agents/{id}"), None).await;
    expect(&r, 200, "get agent");
    assert_eq!(r.body["agent"], agent);

    // Create with a given id; the same id again conflicts.
    let sales = json!({"id": "e2e-sales", "name": "Sales", "instructions": "Sell politely.",
                       "language": "en", "voice": "alloy"});
    let r = api("POST", "/api/admin/agents", Some(sales.clone())).await;
    expect(&r, 201, "create with id");
    assert_eq!(r.body["agent"]["id"], "e2e-sales");
    let r = api("POST", "/api/admin/agents", Some(sales)).await;
    expect(&r, 409, "duplicate id");
    assert_eq!(r.body["error"], "conflict");

    // Validation errors name the field and create nothing.
    let base = json!({"id": "e2e-invalid", "name": "X", "instructions": "Y"});
    let with = |k: &str, v: Value| {
        let mut b = base.clone();
        b[k] = v;
        Some(b)
    };
    for (body, field, what) in [
        (with("voice", json!("nova")), "voice", "unknown voice"),
        (with("nickname", json!("x")), "nickname", "unknown field"),
        (
            with("tools", json!({"type": "function"})),
            "tools",
            "tools not an array",
        ),
        (
            with("tools", json!([{"type": "function"}])),
            "tools",
            "tool without a name",
        ),
        (
            with("transfer_number", json!("03-1234-5678")),
            "transfer_number",
            "bad number",
        ),
        (
            with("max_call_seconds", json!(5)),
            "max_call_seconds",
            "too short",
        ),
        (
            with("turn_detection", json!({"type": "push_to_talk"})),
            "turn_detection.type",
            "turn detection type",
        ),
        (
            with("turn_detection", json!({"threshold": 3})),
            "turn_detection.threshold",
            "threshold",
        ),
        (with("id", json!("bad id!")), "id", "bad id"),
        (with("language", json!("jp")), "language", "jp for Japanese"),
        (
            with("tools", json!([tool("unsigned")])),
            "tool_secret",
            "a webhook tool without a secret",
        ),
        (
            with("tool_secret", json!("秘密秘密秘密秘密")),
            "tool_secret",
            "8 kanji",
        ),
        (Some(json!({"instructions": "Y"})), "name", "missing name"),
    ] {
        let r = api("POST", "/api/admin/agents", body).await;
        expect_field(&r, field, what);
    }
    let r = api("GET", "/api/admin/agents/e2e-invalid", None).await;
    expect(&r, 404, "nothing was created");
    let r = api(
        "POST",
        "/api/admin/agents",
        Some(json!({"name": "X", "instructions": "Y", "language": "jp"})),
    )
    .await;
    assert!(
        r.body["message"].as_str().unwrap().contains("\"ja\""),
        "{}",
        r.text
    );
    // Removing the secret while the webhook tool stays is refused too.
    let r = api(
        "PUT",
        &format!("/api/admin/agents/{id}"),
        Some(json!({"tool_secret": null})),
    )
    .await;
    expect_field(&r, "tool_secret", "unsetting the secret of a webhook agent");
    assert_eq!(agent["tool_secret_set"], true);

    // Partial update.
    let r = api(
        "PUT",
        &format!("/api/admin/agents/{id}"),
        Some(
            json!({"voice": "sage", "turn_detection": {"prefix_padding_ms": 150},
                    "transfer_number": null}),
        ),
    )
    .await;
    expect(&r, 200, "update");
    let updated = &r.body["agent"];
    assert_eq!(updated["voice"], "sage");
    assert_eq!(updated["name"], "予約受付");
    assert_eq!(updated["turn_detection"]["prefix_padding_ms"], 150);
    assert_eq!(updated["turn_detection"]["threshold"], 0.6);
    assert_eq!(updated["transfer_number"], Value::Null);
    assert_eq!(updated["created_at"], agent["created_at"]);
    let r = api(
        "PUT",
        &format!("/api/admin/agents/{id}"),
        Some(json!({"voice": "robot"})),
    )
    .await;
    expect_field(&r, "voice", "update with an unknown voice");
    // A GET body can be edited and PUT back as it is.
    let mut edited = updated.clone();
    edited["name"] = json!("予約受付（新）");
    let r = api("PUT", &format!("/api/admin/agents/{id}"), Some(edited)).await;
    expect(&r, 200, "round-trip update");
    assert_eq!(r.body["agent"]["name"], "予約受付（新）");

    // Assign a number; the `+` arrives percent-encoded.
    let number = "+81355550101";
    let r = api(
        "PUT",
        "/api/admin/numbers/%2B81355550101",
        Some(json!({"agent_id": id})),
    )
    .await;
    expect(&r, 201, "assign number");
    assert_eq!(r.body["number"]["number"], number);
    assert_eq!(r.body["number"]["agent_id"], id.as_str());
    let r = api(
        "PUT",
        "/api/admin/numbers/%2B81355550101",
        Some(json!({"agent_id": id})),
    )
    .await;
    expect(&r, 200, "assign again");
    let r = api(
        "PUT",
        "/api/admin/numbers/%2B81355550102",
        Some(json!({"agent_id": "no-such-agent"})),
    )
    .await;
    expect_field(&r, "agent_id", "unknown agent");
    let r = api(
        "PUT",
        "/api/admin/numbers/0355550101",
        Some(json!({"agent_id": id})),
    )
    .await;
    expect_field(&r, "number", "not E.164");
    let r = api(
        "PUT",
        "/api/admin/numbers/%2B81355550102",
        Some(json!({"agent": id})),
    )
    .await;
    expect_field(&r, "agent", "unknown field in an assignment");

    let r = api("GET", "/api/admin/numbers", None).await;
    expect(&r, 200, "list numbers");
    let entry = r.body["numbers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["number"] == number)
        .unwrap_or_else(|| panic!("{number} not listed: {}", r.text))
        .clone();
    assert_eq!(entry["agent_id"], id.as_str());
    assert_eq!(entry["agent_name"], "予約受付（新）");
    let r = api("GET", "/api/admin/numbers/%2B81355550101", None).await;
    expect(&r, 200, "get number");
    assert_eq!(r.body["number"], entry);

    // An agent that answers a number cannot be deleted.
    let r = api("DELETE", &format!("/api/admin/agents/{id}"), None).await;
    expect(&r, 409, "delete an agent with a number");
    assert_eq!(r.body["error"], "conflict");
    assert!(
        r.body["message"].as_str().unwrap().contains(number),
        "{}",
        r.text
    );
    // Nor can the default agent.
    let r = api("DELETE", "/api/admin/agents/default", None).await;
    expect(&r, 409, "delete the default agent");

    // Delete the number, then the agent.
    let r = api("DELETE", "/api/admin/numbers/%2B81355550101", None).await;
    expect(&r, 204, "unassign");
    let r = api("DELETE", "/api/admin/numbers/%2B81355550101", None).await;
    expect(&r, 404, "unassign again");
    let r = api("DELETE", &format!("/api/admin/agents/{id}"), None).await;
    expect(&r, 204, "delete agent");
    let r = api("GET", &format!("/api/admin/agents/{id}"), None).await;
    expect(&r, 404, "deleted agent");

    // Making another agent the default moves the flag; it cannot just be unset.
    let r = api(
        "PUT",
        "/api/admin/agents/e2e-sales",
        Some(json!({"is_default": true})),
    )
    .await;
    expect(&r, 200, "make sales the default");
    let r = api("GET", "/api/admin/agents", None).await;
    let defaults: Vec<&str> = r.body["agents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["is_default"] == true)
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(defaults, ["e2e-sales"]);
    let r = api(
        "PUT",
        "/api/admin/agents/e2e-sales",
        Some(json!({"is_default": false})),
    )
    .await;
    expect(&r, 409, "unset the only default");
    let r = api(
        "PUT",
        "/api/admin/agents/default",
        Some(json!({"is_default": true})),
    )
    .await;
    expect(&r, 200, "restore the default");
    let r = api("DELETE", "/api/admin/agents/e2e-sales", None).await;
    expect(&r, 204, "delete sales");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_model_or_tool_schema_the_realtime_api_would_refuse_is_not_saved() {
    // Saved, each would have the server refuse every call of the agent (its session.update,
    // or the model on the upgrade): every caller would hear the fallback.
    let lookup_with = |parameters: Value| {
        let mut t = tool("lookup_order");
        t["parameters"] = parameters;
        json!([t])
    };
    let base = json!({"id": "e2e-models", "name": "M", "instructions": "I",
                      "tool_secret": "e2e-tool-secret-0123456789"});
    let with = |k: &str, v: Value| {
        let mut b = base.clone();
        b[k] = v;
        b
    };
    let bad_tools = lookup_with(json!({"properties": {"q": {"type": "string"}}}));
    let deep_typo = lookup_with(json!({"type": "object", "properties": {"slot": {
        "type": "object", "properties": {"date": {"type": "strng"}}}}}));
    for (body, field, what) in [
        (
            with("model", json!("gpt-realtme")),
            "model",
            "a misspelt model",
        ),
        (
            with("model", json!("gpt-realtime ")),
            "model",
            "a model with a trailing space",
        ),
        (
            with("model", json!("gpt-4o")),
            "model",
            "not a Realtime model",
        ),
        (
            with("transcription_model", json!("gpt-4o-transcribe ")),
            "transcription_model",
            "a transcription model with a trailing space",
        ),
        (
            with("transcription_model", json!("gpt-realtime")),
            "transcription_model",
            "a Realtime model as the transcription model",
        ),
        (
            with("tools", bad_tools.clone()),
            "tools",
            "parameters that are not an object schema",
        ),
        (
            with(
                "tools",
                lookup_with(json!({"type": "object", "properties": {"q": "string"}})),
            ),
            "tools",
            "a property that is not a schema",
        ),
        (
            with(
                "tools",
                lookup_with(
                    json!({"type": "object", "properties": {"q": {"type": "string"}},
                                   "required": "q"}),
                ),
            ),
            "tools",
            "required that is not a list of names",
        ),
        (
            with("tools", deep_typo.clone()),
            "tools",
            "a misspelt type two schemas down",
        ),
    ] {
        let r = api("POST", "/api/admin/agents", Some(body)).await;
        expect_field(&r, field, what);
    }
    // The message names where in the schema the slip is.
    let r = api("POST", "/api/admin/agents", Some(with("tools", deep_typo))).await;
    assert!(
        r.body["message"]
            .as_str()
            .is_some_and(|m| m.contains("parameters.properties.slot.properties.date.type")),
        "{}",
        r.text
    );
    let r = api("GET", "/api/admin/agents/e2e-models", None).await;
    expect(&r, 404, "nothing was created");
    let r = api(
        "POST",
        "/api/admin/agents",
        Some(with("transcription_model", json!("gpt-4o-transcribe "))),
    )
    .await;
    assert!(
        r.body["message"]
            .as_str()
            .unwrap()
            .contains("did you mean \"gpt-4o-transcribe\""),
        "{}",
        r.text
    );

    // Newer Realtime models than gpt-realtime are taken; bad values in a PUT change nothing.
    let mut good = with("model", json!("gpt-realtime-mini"));
    good["transcription_model"] = json!("gpt-4o-mini-transcribe");
    good["tools"] = json!([tool("lookup_order")]);
    let r = api("POST", "/api/admin/agents", Some(good)).await;
    expect(&r, 201, "create with gpt-realtime-mini");
    let created = r.body["agent"].clone();
    assert_eq!(created["model"], "gpt-realtime-mini");
    for (body, field) in [
        (json!({"model": "gpt-realtme"}), "model"),
        (json!({"model": "gpt-realtime\n"}), "model"),
        (
            json!({"transcription_model": "gpt-4o-transcribe "}),
            "transcription_model",
        ),
        (json!({"tools": bad_tools}), "tools"),
    ] {
        let r = api("PUT", "/api/admin/agents/e2e-models", Some(body.clone())).await;
        expect_field(&r, field, &format!("PUT {body}"));
    }
    let r = api("GET", "/api/admin/agents/e2e-models", None).await;
    expect(&r, 200, "get after refused PUTs");
    assert_eq!(r.body["agent"], created);
    let r = api(
        "PUT",
        "/api/admin/agents/e2e-models",
        Some(json!({"model": "gpt-realtime-2025-08-28", "transcription_model": "whisper-1"})),
    )
    .await;
    expect(&r, 200, "a dated Realtime model");
    assert_eq!(r.body["agent"]["model"], "gpt-realtime-2025-08-28");

    // A row stored with a bad model before the check is still shown as stored; a PUT of
    // another field names the model, one giving a model repairs the row.
    let w = worker().await;
    d1_execute(
        &w.persist_dir,
        "UPDATE agents SET model = 'gpt-realtme' WHERE id = 'e2e-models'",
    );
    let r = api("GET", "/api/admin/agents/e2e-models", None).await;
    expect(&r, 200, "get a stored bad model");
    assert_eq!(r.body["agent"]["model"], "gpt-realtme");
    let r = api(
        "PUT",
        "/api/admin/agents/e2e-models",
        Some(json!({"voice": "sage"})),
    )
    .await;
    expect_field(&r, "model", "a PUT that leaves the stored bad model");
    let r = api(
        "PUT",
        "/api/admin/agents/e2e-models",
        Some(json!({"model": "gpt-realtime"})),
    )
    .await;
    expect(&r, 200, "a PUT that repairs the model");
    assert_eq!(r.body["agent"]["model"], "gpt-realtime");
    let r = api("DELETE", "/api/admin/agents/e2e-models", None).await;
    expect(&r, 204, "delete");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreadable_agent_row_is_listed_as_such_and_can_be_fixed_or_deleted() {
    let w = worker().await;
    // A row written by hand with tools that are not JSON.
    d1_execute(
        &w.persist_dir,
        "INSERT INTO agents (id, name, instructions, greeting, tools) \
         VALUES ('e2e-bad-row', 'Hand-written', 'I', 'G', '')",
    );
    let r = api("GET", "/api/admin/agents", None).await;
    expect(&r, 200, "list with an unreadable row");
    let list = r.body["agents"].as_array().unwrap();
    assert!(list
        .iter()
        .any(|a| a["id"] == "default" && a["voice"] == "marin"));
    let bad = list
        .iter()
        .find(|a| a["id"] == "e2e-bad-row")
        .unwrap_or_else(|| panic!("the unreadable row is not listed: {}", r.text));
    assert_eq!(bad["unreadable"]["field"], "tools", "{}", r.text);
    assert_eq!(bad["name"], "Hand-written");
    // The row is reported in the log (which may lag the answer a little).
    let mut logged = false;
    for _ in 0..50 {
        logged = w.log().contains("admin.bad_agent_row");
        if logged {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        logged,
        "admin.bad_agent_row not logged:\n{}",
        w.log_tail(40)
    );
    let r = api("GET", "/api/admin/agents/e2e-bad-row", None).await;
    expect(&r, 200, "get the unreadable row");
    assert_eq!(r.body["agent"]["unreadable"]["field"], "tools");

    // A PUT must give the field named; then the row is fixed.
    let r = api(
        "PUT",
        "/api/admin/agents/e2e-bad-row",
        Some(json!({"voice": "sage"})),
    )
    .await;
    expect_field(&r, "tools", "a PUT that leaves the unreadable field");
    let r = api(
        "PUT",
        "/api/admin/agents/e2e-bad-row",
        Some(json!({"tools": [{"type": "end_call"}]})),
    )
    .await;
    expect(&r, 200, "a PUT that repairs the row");
    assert_eq!(r.body["agent"]["tools"], json!([{"type": "end_call"}]));
    assert_eq!(r.body["agent"]["name"], "Hand-written");

    // Broken again, it can be deleted.
    d1_execute(
        &w.persist_dir,
        "UPDATE agents SET tools = '' WHERE id = 'e2e-bad-row'",
    );
    let r = api("DELETE", "/api/admin/agents/e2e-bad-row", None).await;
    expect(&r, 204, "delete the unreadable row");
    let r = api("GET", "/api/admin/agents/e2e-bad-row", None).await;
    expect(&r, 404, "deleted");
}

#[tokio::test(flavor = "multi_thread")]
async fn creates_racing_with_the_same_id_get_one_201_and_409s_never_a_500() {
    let body = json!({"id": "e2e-race", "name": "Race", "instructions": "I"});
    let answers = futures::future::join_all(
        (0..6).map(|_| api("POST", "/api/admin/agents", Some(body.clone()))),
    )
    .await;
    let mut statuses: Vec<u16> = answers.iter().map(|r| r.status).collect();
    statuses.sort();
    assert_eq!(statuses, [201, 409, 409, 409, 409, 409], "{answers:?}");
    for r in answers.iter().filter(|r| r.status == 409) {
        assert_eq!(r.body["error"], "conflict");
    }
    let r = api("DELETE", "/api/admin/agents/e2e-race", None).await;
    expect(&r, 204, "delete");
}

// ---- calls --------------------------------------------------------------------------------------

fn call_sids(r: &Reply) -> Vec<String> {
    r.body["calls"]
        .as_array()
        .unwrap_or_else(|| panic!("no calls array: {}", r.text))
        .iter()
        .map(|c| c["call_sid"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_newest_first_filtered_paginated_and_in_detail() {
    let w = worker().await;
    let r = api("GET", "/api/admin/calls", None).await;
    expect(&r, 200, "empty list");
    assert_eq!(r.body, json!({"calls": [], "next_cursor": null}));

    // Five calls; two share a start time (the call_sid breaks the tie).
    d1_execute(
        &w.persist_dir,
        "INSERT INTO calls (call_sid, account_sid, from_number, to_number, agent_id, direction, \
         status, started_at) VALUES \
         ('CAe2e0001', 'ACe2e', '+15550000001', '+81312345678', 'default', 'inbound', 'completed', '2026-11-20T09:00:00.000Z'), \
         ('CAe2e0002', 'ACe2e', '+15550000002', '+81312345678', 'default', 'inbound', 'busy', '2026-11-21T09:00:00.000Z'), \
         ('CAe2e0003', 'ACe2e', '+81312345678', '+15550000003', 'default', 'outbound-api', 'completed', '2026-11-22T09:00:00.000Z'), \
         ('CAe2e0004', 'ACe2e', '+15550000004', '+81399999999', 'default', 'inbound', 'in-progress', '2026-11-22T09:00:00.000Z'), \
         ('CAe2e0005', 'ACe2e', '+15550000005', '+81312345678', 'default', 'inbound', 'ringing', '2026-11-23T00:00:00.000Z'); \
         INSERT INTO transcript_entries (call_sid, seq, role, text, offset_ms, item_id, interrupted) VALUES \
         ('CAe2e0003', 2, 'caller', '予約をお願いします', 4200, 'item_2', 0), \
         ('CAe2e0003', 1, 'agent', 'お電話ありがとうございます', 300, 'item_1', 1); \
         INSERT INTO call_events (call_sid, seq, at, type, detail) VALUES \
         ('CAe2e0003', 1, '2026-11-22T09:00:01.000Z', 'barge_in', '{\"played_ms\":1200}');",
    );

    let all = [
        "CAe2e0005",
        "CAe2e0004",
        "CAe2e0003",
        "CAe2e0002",
        "CAe2e0001",
    ];
    let r = api("GET", "/api/admin/calls", None).await;
    expect(&r, 200, "list");
    assert_eq!(call_sids(&r), all);
    assert_eq!(r.body["next_cursor"], Value::Null);
    assert_eq!(r.body["calls"][0]["status"], "ringing");
    assert_eq!(r.body["calls"][0]["from_number"], "+15550000005");

    for (query, expected) in [
        ("status=completed", vec!["CAe2e0003", "CAe2e0001"]),
        ("status=in-progress", vec!["CAe2e0004"]),
        ("status=failed", vec![]),
        (
            "number=%2B81312345678",
            vec!["CAe2e0005", "CAe2e0003", "CAe2e0002", "CAe2e0001"],
        ),
        ("number=%2B15550000003", vec!["CAe2e0003"]),
        (
            "from=2026-11-21&to=2026-11-22",
            vec!["CAe2e0004", "CAe2e0003", "CAe2e0002"],
        ),
        (
            "from=2026-11-22T18:00:00%2B09:00",
            vec!["CAe2e0005", "CAe2e0004", "CAe2e0003"],
        ),
        ("to=2026-11-21T09:00:00Z", vec!["CAe2e0002", "CAe2e0001"]),
        (
            "status=completed&number=%2B81312345678&from=2026-11-21",
            vec!["CAe2e0003"],
        ),
    ] {
        let r = api("GET", &format!("/api/admin/calls?{query}"), None).await;
        expect(&r, 200, query);
        assert_eq!(call_sids(&r), expected, "{query}");
    }

    // limit=1: every row once, in order, by following next_cursor.
    let mut seen = Vec::new();
    let mut path = "/api/admin/calls?limit=1".to_owned();
    loop {
        let r = api("GET", &path, None).await;
        expect(&r, 200, &path);
        let page = call_sids(&r);
        assert_eq!(page.len(), 1, "{path}: {}", r.text);
        seen.extend(page);
        match r.body["next_cursor"].as_str() {
            Some(c) => path = format!("/api/admin/calls?limit=1&cursor={c}"),
            None => break,
        }
        assert!(seen.len() <= all.len(), "pagination does not end: {seen:?}");
    }
    assert_eq!(seen, all);
    // Pages of two, with a filter.
    let r = api(
        "GET",
        "/api/admin/calls?number=%2B81312345678&limit=2",
        None,
    )
    .await;
    assert_eq!(call_sids(&r), ["CAe2e0005", "CAe2e0003"]);
    let cursor = r.body["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_owned();
    let r = api(
        "GET",
        &format!("/api/admin/calls?number=%2B81312345678&limit=2&cursor={cursor}"),
        None,
    )
    .await;
    assert_eq!(call_sids(&r), ["CAe2e0002", "CAe2e0001"]);
    assert_eq!(r.body["next_cursor"], Value::Null);

    // A cursor alone goes on with the filters it was made for; with others it is refused.
    let r = api("GET", "/api/admin/calls?status=completed&limit=1", None).await;
    assert_eq!(call_sids(&r), ["CAe2e0003"]);
    let completed = r.body["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_owned();
    let r = api("GET", &format!("/api/admin/calls?cursor={completed}"), None).await;
    expect(&r, 200, "cursor alone");
    assert_eq!(call_sids(&r), ["CAe2e0001"], "still status=completed");
    let r = api(
        "GET",
        &format!("/api/admin/calls?status=busy&cursor={completed}"),
        None,
    )
    .await;
    expect_field(&r, "cursor", "a cursor with other filters");

    // The last storable day is a bound like any other.
    let r = api("GET", "/api/admin/calls?to=9999-12-31", None).await;
    expect(&r, 200, "to=9999-12-31");
    assert_eq!(call_sids(&r), all);

    // Calls are stored in E.164: a domestic number is refused with its +81 form.
    let r = api("GET", "/api/admin/calls?number=090-1234-5678", None).await;
    expect_field(&r, "number", "a domestic number");
    assert!(
        r.body["message"]
            .as_str()
            .unwrap()
            .contains("+819012345678"),
        "{}",
        r.text
    );

    // Invalid filters name the parameter.
    for (query, field) in [
        ("status=done", "status"),
        ("limit=0", "limit"),
        ("limit=500", "limit"),
        ("from=yesterday", "from"),
        ("to=2026-13-01", "to"),
        ("cursor=not-a-cursor", "cursor"),
        ("sort=asc", "sort"),
    ] {
        let r = api("GET", &format!("/api/admin/calls?{query}"), None).await;
        expect_field(&r, field, query);
    }
    let mut tampered = cursor.clone().into_bytes();
    tampered[2] = if tampered[2] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let r = api("GET", &format!("/api/admin/calls?cursor={tampered}"), None).await;
    expect_field(&r, "cursor", "tampered cursor");

    // One call with its transcript and events, in order.
    let r = api("GET", "/api/admin/calls/CAe2e0003", None).await;
    expect(&r, 200, "call detail");
    assert_eq!(r.body["call"]["call_sid"], "CAe2e0003");
    assert_eq!(r.body["call"]["direction"], "outbound-api");
    assert_eq!(
        r.body["transcript"],
        json!([
            {"seq": 1, "role": "agent", "text": "お電話ありがとうございます", "offset_ms": 300,
             "item_id": "item_1", "interrupted": true},
            {"seq": 2, "role": "caller", "text": "予約をお願いします", "offset_ms": 4200,
             "item_id": "item_2", "interrupted": false},
        ])
    );
    assert_eq!(
        r.body["events"],
        json!([{"seq": 1, "at": "2026-11-22T09:00:01.000Z", "type": "barge_in",
                "detail": {"played_ms": 1200}}])
    );
    let r = api("GET", "/api/admin/calls/CAe2e0001", None).await;
    expect(&r, 200, "call without transcript");
    assert_eq!(r.body["transcript"], json!([]));
    assert_eq!(r.body["events"], json!([]));

    let r = api(
        "GET",
        "/api/admin/calls/CA00000000000000000000000000000000",
        None,
    )
    .await;
    expect(&r, 404, "unknown call");
    assert_eq!(r.body["error"], "not_found");
}
