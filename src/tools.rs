//! The tools an agent can use during a call, as configured in its `tools` JSON:
//!
//! - `{"type": "end_call"}`: the agent says goodbye and the bridge hangs up;
//! - `{"type": "transfer_call"}`: the agent announces a transfer and the bridge redirects
//!   the call to the agent's `transfer_number`;
//! - `{"type": "function", "name", "description", "parameters", "url", "timeout_ms"?}`: a
//!   webhook tool; the bridge POSTs the arguments and call context to `url`, signed with
//!   the agent's tool secret, and gives the response body to the model.
//!
//! `description` may be set on the built-ins to override the default.

use crate::http;
use hmac::{Hmac, Mac};
use serde_json::{json, Map, Value};
use sha2::Sha256;

pub const END_CALL: &str = "end_call";
pub const TRANSFER_CALL: &str = "transfer_call";
pub const DEFAULT_TIMEOUT_MS: u64 = 5_000;
pub const MAX_TIMEOUT_MS: u64 = 30_000;
/// Header carrying `sha256=<hex HMAC-SHA256(tool_secret, body)>` on webhook tool calls.
pub const SIGNATURE_HEADER: &str = "X-Bridge-Signature";
/// Longest tool output handed to the model.
pub const MAX_OUTPUT_BYTES: usize = 16 * 1024;

/// A tool as the bridge runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tool {
    EndCall,
    TransferCall,
    Webhook {
        name: String,
        url: String,
        timeout_ms: u64,
    },
}

fn str_field<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    obj.get(key).and_then(Value::as_str)
}

/// The tool an entry of an agent's `tools` configures, or why it is not valid.
pub fn parse(entry: &Value) -> Result<Tool, String> {
    let obj = entry.as_object().ok_or("must be an object")?;
    if let Some(d) = obj.get("description") {
        if !d.is_string() {
            return Err("description must be a string".into());
        }
    }
    match str_field(obj, "type") {
        Some(END_CALL) => Ok(Tool::EndCall),
        Some(TRANSFER_CALL) => Ok(Tool::TransferCall),
        Some("function") => {
            let name = str_field(obj, "name").unwrap_or("");
            let name_ok = !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !name_ok {
                return Err("name must be 1-64 letters, digits, _ or -".into());
            }
            if name == END_CALL || name == TRANSFER_CALL {
                return Err(format!("{name} is built in: use {{\"type\": \"{name}\"}}"));
            }
            if let Some(p) = obj.get("parameters") {
                check_parameters(p)?;
            }
            let url = str_field(obj, "url").ok_or("url is required (the webhook to call)")?;
            if !url_allowed(url) {
                return Err("url must be https:// (http:// only to localhost)".into());
            }
            let timeout_ms = match obj.get("timeout_ms") {
                None => DEFAULT_TIMEOUT_MS,
                Some(v) => v
                    .as_u64()
                    .filter(|t| (1..=MAX_TIMEOUT_MS).contains(t))
                    .ok_or(format!("timeout_ms must be 1 to {MAX_TIMEOUT_MS}"))?,
            };
            Ok(Tool::Webhook {
                name: name.to_owned(),
                url: url.to_owned(),
                timeout_ms,
            })
        }
        _ => Err("type must be \"function\", \"end_call\" or \"transfer_call\"".into()),
    }
}

/// A function's `parameters` as the Realtime API takes them: the JSON Schema of an object
/// (`{"type": "object", "properties": {name: schema}, "required": [names]}`). The server
/// checks the schema against JSON Schema's own, nested schemas too, and refuses the whole
/// `session.update` for a schema that breaks it, and with it every call: so the keywords that
/// hold schemas or say what a value is are checked here, at every depth, and an agent with a
/// misspelt `"type": "strng"` three levels down is refused when it is saved.
fn check_parameters(p: &Value) -> Result<(), String> {
    let schema = p
        .as_object()
        .ok_or("parameters must be a JSON Schema object")?;
    if str_field(schema, "type") != Some("object") {
        return Err(
            "parameters must be the JSON Schema of an object: {\"type\": \"object\", \
             \"properties\": {...}}"
                .into(),
        );
    }
    check_keywords("parameters", schema, 0)
}

/// The types JSON Schema names.
const SCHEMA_TYPES: [&str; 7] = [
    "string", "number", "integer", "boolean", "object", "array", "null",
];
/// Deeper than this, a tool's arguments are not something a caller's words fill in; it also
/// bounds the check's recursion (serde_json stops at 128 levels of its own).
const MAX_SCHEMA_DEPTH: usize = 16;

/// A schema nested at `path`: an object whose keywords are checked.
fn check_schema(path: &str, schema: &Value, depth: usize) -> Result<(), String> {
    let obj = schema
        .as_object()
        .ok_or_else(|| format!("{path} must be a schema such as {{\"type\": \"string\"}}"))?;
    check_keywords(path, obj, depth)
}

/// The keywords of the schema at `path` that name types or hold schemas: the ones a typo
/// in makes the server refuse the session. Others (`description`, `minimum`, `format`...)
/// are left to the server, which ignores what it does not know.
fn check_keywords(path: &str, schema: &Map<String, Value>, depth: usize) -> Result<(), String> {
    if depth > MAX_SCHEMA_DEPTH {
        return Err(format!(
            "{path} is nested more than {MAX_SCHEMA_DEPTH} schemas deep"
        ));
    }
    let a_type = |v: &Value| v.as_str().is_some_and(|t| SCHEMA_TYPES.contains(&t));
    match schema.get("type") {
        None => {}
        Some(t) if a_type(t) => {}
        Some(Value::Array(ts)) if !ts.is_empty() && ts.iter().all(a_type) => {}
        Some(_) => {
            return Err(format!(
                "{path}.type must be one of {} (or a list of them)",
                SCHEMA_TYPES.join(", ")
            ))
        }
    }
    if let Some(d) = schema.get("description") {
        if !d.is_string() {
            return Err(format!("{path}.description must be a string"));
        }
    }
    match schema.get("properties") {
        None => {}
        Some(Value::Object(props)) => {
            for (name, property) in props {
                check_schema(&format!("{path}.properties.{name}"), property, depth + 1)?;
            }
        }
        Some(_) => {
            return Err(format!(
                "{path}.properties must be an object: a schema per argument"
            ))
        }
    }
    // A name not among the properties is valid JSON Schema (nothing can satisfy it but an
    // argument the model adds), and not refused by the server: an agent stored with one
    // keeps its calls.
    if let Some(required) = schema.get("required") {
        let names = required
            .as_array()
            .filter(|n| n.iter().all(Value::is_string));
        if names.is_none() {
            return Err(format!(
                "{path}.required must be an array of property names"
            ));
        }
    }
    if let Some(e) = schema.get("enum") {
        if !e.is_array() {
            return Err(format!(
                "{path}.enum must be an array of the values allowed"
            ));
        }
    }
    match schema.get("items") {
        None | Some(Value::Bool(_)) => {}
        // The list form of drafts before 2020-12: a schema per position.
        Some(Value::Array(each)) => {
            for (i, item) in each.iter().enumerate() {
                check_schema(&format!("{path}.items[{i}]"), item, depth + 1)?;
            }
        }
        Some(item) => check_schema(&format!("{path}.items"), item, depth + 1)?,
    }
    for keyword in ["additionalProperties", "not"] {
        match schema.get(keyword) {
            None | Some(Value::Bool(_)) => {}
            Some(s) => check_schema(&format!("{path}.{keyword}"), s, depth + 1)?,
        }
    }
    for keyword in ["anyOf", "oneOf", "allOf"] {
        let Some(list) = schema.get(keyword) else {
            continue;
        };
        match list.as_array() {
            Some(each) if !each.is_empty() => {
                for (i, s) in each.iter().enumerate() {
                    check_schema(&format!("{path}.{keyword}[{i}]"), s, depth + 1)?;
                }
            }
            _ => {
                return Err(format!(
                    "{path}.{keyword} must be a non-empty array of schemas"
                ))
            }
        }
    }
    Ok(())
}

/// `https://` to any host, `http://` only to this machine. A backslash, whitespace or a
/// control character is refused outright: `fetch` reads `\` as `/` and drops tabs and
/// newlines, so `http://evil.example\@localhost/` would pass a check of its host as
/// `localhost` and go to `evil.example` in clear text.
fn url_allowed(url: &str) -> bool {
    if url
        .chars()
        .any(|c| c == '\\' || c.is_whitespace() || c.is_control())
    {
        return false;
    }
    let host_of = |rest: &str| {
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        let host = authority.rsplit('@').next().unwrap_or("");
        if let Some(v6) = host.strip_prefix('[') {
            v6.split(']').next().unwrap_or("").to_owned()
        } else {
            host.split(':').next().unwrap_or("").to_owned()
        }
    };
    if let Some(rest) = url.strip_prefix("https://") {
        return !host_of(rest).is_empty();
    }
    if let Some(rest) = url.strip_prefix("http://") {
        return matches!(host_of(rest).as_str(), "localhost" | "127.0.0.1" | "::1");
    }
    false
}

/// The name the model calls a configured tool by.
pub fn name_of(entry: &Value) -> Option<&str> {
    match str_field(entry.as_object()?, "type")? {
        END_CALL => Some(END_CALL),
        TRANSFER_CALL => Some(TRANSFER_CALL),
        _ => str_field(entry.as_object()?, "name"),
    }
}

/// Finds the tool the model called.
pub fn resolve(tools: &[Value], name: &str) -> Option<Tool> {
    tools
        .iter()
        .find(|t| name_of(t) == Some(name))
        .and_then(|t| parse(t).ok())
}

/// The Realtime `tools` of a session: function definitions only, with the bridge's own
/// fields (`url`, `timeout_ms`) removed, since the API rejects unknown keys.
pub fn realtime_definitions(tools: &[Value]) -> Vec<Value> {
    tools
        .iter()
        .filter_map(|t| {
            let obj = t.as_object()?;
            let description = str_field(obj, "description");
            Some(match parse(t).ok()? {
                Tool::EndCall => json!({
                    "type": "function",
                    "name": END_CALL,
                    "description": description.unwrap_or(
                        "Ends the phone call. Call it when the conversation is finished or the caller asks to hang up; \
                         say a short goodbye first."),
                    "parameters": { "type": "object", "properties": {
                        "reason": { "type": "string", "description": "Why the call is ending." } } },
                }),
                Tool::TransferCall => json!({
                    "type": "function",
                    "name": TRANSFER_CALL,
                    "description": description.unwrap_or(
                        "Transfers the caller to a human staff member. Call it when the caller asks for a person \
                         or you cannot help; tell the caller you are transferring them."),
                    "parameters": { "type": "object", "properties": {
                        "reason": { "type": "string", "description": "Why the caller is transferred." } } },
                }),
                Tool::Webhook { name, .. } => {
                    let mut out = Map::new();
                    out.insert("type".into(), "function".into());
                    out.insert("name".into(), name.into());
                    if let Some(d) = description {
                        out.insert("description".into(), d.into());
                    }
                    out.insert(
                        "parameters".into(),
                        obj.get("parameters")
                            .cloned()
                            .unwrap_or_else(|| json!({"type": "object", "properties": {}})),
                    );
                    Value::Object(out)
                }
            })
        })
        .collect()
}

/// Who is calling whom, for tools that need it.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct CallContext {
    pub call_sid: String,
    pub account_sid: String,
    pub from: String,
    pub to: String,
    pub agent_id: String,
}

/// `sha256=<hex>` of the body, keyed by the agent's tool secret.
pub fn signature(secret: &str, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body.as_bytes());
    let bytes = mac.finalize().into_bytes();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// The POST to a webhook tool: `{"tool", "arguments", "call", "request"}` as JSON.
/// `request` is this tool call's id (`{call_sid}/{call_id}`, unique to it) and when it was
/// sent (`sent_at_ms`, Unix ms), both under the signature: a webhook that acts (a booking)
/// can refuse a request seen before, or one sent long ago, that someone replays.
pub struct WebhookCall<'a> {
    pub url: &'a str,
    pub timeout_ms: u64,
    pub tool: &'a str,
    pub arguments: &'a Value,
    /// The model's id of the call (`call_id`).
    pub call_id: &'a str,
    pub sent_at_ms: u64,
}

pub fn webhook_request(
    call: &WebhookCall<'_>,
    ctx: &CallContext,
    secret: Option<&str>,
) -> http::Request {
    let body = json!({
        "tool": call.tool,
        "arguments": call.arguments,
        "call": {
            "call_sid": ctx.call_sid, "from": ctx.from, "to": ctx.to, "agent_id": ctx.agent_id,
        },
        "request": {
            "id": format!("{}/{}", ctx.call_sid, call.call_id),
            "sent_at_ms": call.sent_at_ms,
        },
    })
    .to_string();
    let mut headers = vec![("Content-Type".to_owned(), "application/json".to_owned())];
    if let Some(secret) = secret.filter(|s| !s.is_empty()) {
        headers.push((SIGNATURE_HEADER.to_owned(), signature(secret, &body)));
    }
    http::Request {
        method: "POST".into(),
        url: call.url.to_owned(),
        headers,
        body,
        timeout_ms: call.timeout_ms,
    }
}

/// An answer over [`MAX_OUTPUT_BYTES`], as the model is given it: valid JSON that says it
/// was cut and how long it was, with as much of its start as fits, so the model neither
/// reads broken JSON nor takes the start for the whole.
fn cut_output(body: &str) -> String {
    let mut keep = MAX_OUTPUT_BYTES;
    loop {
        while !body.is_char_boundary(keep) {
            keep -= 1;
        }
        let out = json!({
            "truncated": true,
            "note": format!("the tool answered {} bytes; only the start fits here: do not guess the rest", body.len()),
            "partial": &body[..keep],
        })
        .to_string();
        if out.len() <= MAX_OUTPUT_BYTES || keep == 0 {
            return out;
        }
        // Escaping made it longer: keep less, in proportion.
        keep = keep * MAX_OUTPUT_BYTES / out.len() - 1;
    }
}

/// What the model is told a webhook tool returned.
pub fn webhook_output(outcome: &http::Outcome, timeout_ms: u64) -> (bool, String) {
    match outcome {
        http::Outcome::Response { status, body } if (200..300).contains(status) => {
            if body.len() <= MAX_OUTPUT_BYTES {
                return (true, body.clone());
            }
            (true, cut_output(body))
        }
        http::Outcome::Response { status, .. } => (
            false,
            json!({ "error": format!("the tool's server answered HTTP {status}") }).to_string(),
        ),
        http::Outcome::Failed { reason } if reason == "timeout" => (
            false,
            json!({ "error": format!("the tool did not answer within {timeout_ms} ms") })
                .to_string(),
        ),
        http::Outcome::Failed { reason } => (
            false,
            json!({ "error": format!("the tool could not be reached: {reason}") }).to_string(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_kinds() {
        assert_eq!(parse(&json!({"type":"end_call"})), Ok(Tool::EndCall));
        assert_eq!(
            parse(&json!({"type":"transfer_call"})),
            Ok(Tool::TransferCall)
        );
        assert_eq!(
            parse(&json!({"type":"function","name":"lookup","url":"https://crm.example.jp/hook"})),
            Ok(Tool::Webhook {
                name: "lookup".into(),
                url: "https://crm.example.jp/hook".into(),
                timeout_ms: DEFAULT_TIMEOUT_MS
            })
        );
        let local =
            json!({"type":"function","name":"x","url":"http://127.0.0.1:9000/t","timeout_ms":1500});
        assert!(matches!(
            parse(&local),
            Ok(Tool::Webhook {
                timeout_ms: 1500,
                ..
            })
        ));
    }

    #[test]
    fn rejects_what_cannot_run() {
        for bad in [
            json!("end_call"),
            json!({"type":"mcp"}),
            json!({"type":"function","name":"x"}),
            json!({"type":"function","name":"x","url":"http://crm.example.jp"}),
            // fetch reads the backslash as a slash, and drops tabs: the host is not localhost.
            json!({"type":"function","name":"x","url":"http://crm.example.jp\\@localhost/t"}),
            json!({"type":"function","name":"x","url":"http://crm.example.jp\t@localhost/t"}),
            json!({"type":"function","name":"x","url":"https://crm.example.jp/a b"}),
            json!({"type":"function","name":"x","url":"ftp://a"}),
            json!({"type":"function","name":"bad name","url":"https://a"}),
            json!({"type":"function","name":"end_call","url":"https://a"}),
            json!({"type":"function","name":"x","url":"https://a","timeout_ms":0}),
            json!({"type":"function","name":"x","url":"https://a","parameters":"{}"}),
            json!({"type":"end_call","description":5}),
        ] {
            assert!(parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parameters_must_be_an_object_schema() {
        let with = |parameters: Value| {
            parse(&json!({"type":"function","name":"x","url":"https://a","parameters":parameters}))
        };
        for ok in [
            json!({"type":"object"}),
            json!({"type":"object","properties":{}}),
            json!({"type":"object","properties":{"phone":{"type":"string"}},"required":["phone"]}),
            json!({"type":"object","properties":{"q":{"type":"string"}},"required":[],
                   "additionalProperties":false}),
            // Valid JSON Schema, which the server takes: not worth an agent's calls.
            json!({"type":"object","properties":{"phone":{}},"required":["phone","name"]}),
        ] {
            assert!(with(ok.clone()).is_ok(), "{ok}");
        }
        for (bad, says) in [
            (json!([]), "JSON Schema object"),
            (json!({}), "\"type\": \"object\""),
            (json!({"type":"string"}), "\"type\": \"object\""),
            (
                json!({"properties":{"q":{"type":"string"}}}),
                "\"type\": \"object\"",
            ),
            (
                json!({"type":"object","properties":[]}),
                "properties must be an object",
            ),
            (
                json!({"type":"object","properties":{"q":"string"}}),
                "properties.q",
            ),
            (
                json!({"type":"object","required":"q","properties":{"q":{}}}),
                "array",
            ),
            (
                json!({"type":"object","required":[1],"properties":{"q":{}}}),
                "array",
            ),
        ] {
            let e = with(bad.clone()).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn nested_schemas_are_checked_at_every_depth() {
        let with = |parameters: Value| {
            parse(&json!({"type":"function","name":"x","url":"https://a","parameters":parameters}))
        };
        let ok = json!({"type":"object","description":"予約","properties":{
            "slot":{"type":"object","properties":{
                "date":{"type":"string","format":"date","description":"日付"},
                "party":{"type":"integer","minimum":1},
                "seats":{"type":"array","items":{"type":"string","enum":["窓際","個室"]}},
                "note":{"type":["string","null"]},
                "kind":{"anyOf":[{"type":"string"},{"type":"number"}]},
                "pair":{"type":"array","items":[{"type":"string"},{"type":"number"}]},
                "extra":{"type":"object","additionalProperties":{"type":"string"}},
                "closed":{"type":"object","additionalProperties":false,"not":{"required":["x"]}}},
                "required":["date"]}},
            "required":["slot"]});
        assert_eq!(with(ok.clone()).map(|_| ()), Ok(()), "{ok}");
        let nest = |inner: Value| json!({"type":"object","properties":{"slot":{"type":"object","properties":{"date":inner}}}});
        for (bad, says) in [
            (
                nest(json!({"type":"strng"})),
                "parameters.properties.slot.properties.date.type must be one of",
            ),
            (nest(json!({"type":[]})), ".date.type must be one of"),
            (
                nest(json!({"type":["string", "text"]})),
                ".date.type must be one of",
            ),
            (
                nest(json!({"type":"string","description":["a"]})),
                ".date.description must be a string",
            ),
            (
                nest(json!("string")),
                "parameters.properties.slot.properties.date must be a schema",
            ),
            (
                nest(json!({"type":"string","enum":"a"})),
                ".date.enum must be an array",
            ),
            (
                nest(json!({"type":"array","items":{"type":"lst"}})),
                ".date.items.type must be one of",
            ),
            (
                nest(json!({"type":"array","items":[{"type":"string"}, 5]})),
                ".date.items[1] must be a schema",
            ),
            (
                nest(json!({"type":"object","properties":{"a":{}},"required":"a"})),
                ".date.required must be an array",
            ),
            (
                nest(json!({"type":"object","properties":["a"]})),
                ".date.properties must be an object",
            ),
            (
                nest(json!({"type":"object","additionalProperties":"no"})),
                ".date.additionalProperties must be a schema",
            ),
            (
                nest(json!({"anyOf":[]})),
                ".date.anyOf must be a non-empty array",
            ),
            (
                nest(json!({"oneOf":[{"type":"string"},{"type":"nothing"}]})),
                ".date.oneOf[1].type must be one of",
            ),
            (
                nest(json!({"not":{"type":1}})),
                ".date.not.type must be one of",
            ),
        ] {
            let e = with(bad.clone()).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        // Depth is bounded: a schema nested 16 below `parameters` is taken, 17 refused.
        let deep = |levels: usize| {
            let mut s = json!({"type":"string"});
            for _ in 0..levels {
                s = json!({"type":"object","properties":{"a":s}});
            }
            s
        };
        assert!(with(deep(16)).is_ok());
        let e = with(deep(17)).unwrap_err();
        assert!(e.contains("nested more than 16"), "{e}");
    }

    #[test]
    fn function_names_are_what_the_api_accepts() {
        let named = |name: &str| parse(&json!({"type":"function","name":name,"url":"https://a"}));
        for ok in ["a", "lookup_customer", "Find-Slot-2", &"x".repeat(64)] {
            assert!(named(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "bad name",
            "lookup.customer",
            "予約",
            &"x".repeat(65),
            "transfer_call",
        ] {
            assert!(named(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn realtime_definitions_drop_bridge_fields() {
        let tools = vec![
            json!({"type":"end_call"}),
            json!({"type":"transfer_call","description":"担当者へ転送"}),
            json!({"type":"function","name":"lookup","description":"顧客検索","parameters":{"type":"object"},"url":"https://a/b","timeout_ms":3000}),
        ];
        let defs = realtime_definitions(&tools);
        assert_eq!(defs.len(), 3);
        assert_eq!(defs[0]["name"], END_CALL);
        assert_eq!(defs[1]["description"], "担当者へ転送");
        assert_eq!(
            defs[2],
            json!({"type":"function","name":"lookup","description":"顧客検索","parameters":{"type":"object"}})
        );
        for d in &defs {
            assert!(d.get("url").is_none() && d.get("timeout_ms").is_none());
        }
        assert_eq!(
            resolve(&tools, "lookup").map(|t| matches!(t, Tool::Webhook { .. })),
            Some(true)
        );
        assert_eq!(resolve(&tools, "end_call"), Some(Tool::EndCall));
        assert_eq!(resolve(&tools, "nope"), None);
    }

    #[test]
    fn webhook_requests_are_signed_and_outputs_bounded() {
        let ctx = CallContext {
            call_sid: "CA1".into(),
            from: "+81901".into(),
            to: "+81501".into(),
            agent_id: "agt_1".into(),
            ..Default::default()
        };
        let r = webhook_request(
            &WebhookCall {
                url: "https://a/b",
                timeout_ms: 5000,
                tool: "lookup",
                arguments: &json!({"q":"山田"}),
                call_id: "call_7",
                sent_at_ms: 1_796_000_000_000,
            },
            &ctx,
            Some("s3cret"),
        );
        let body: Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(body["arguments"]["q"], "山田");
        assert_eq!(body["call"]["call_sid"], "CA1");
        // Its id and time are signed with it: a replay is recognisable.
        assert_eq!(
            body["request"],
            json!({"id": "CA1/call_7", "sent_at_ms": 1_796_000_000_000u64})
        );
        assert_eq!((r.url.as_str(), r.timeout_ms), ("https://a/b", 5000));
        assert_eq!(
            r.header(SIGNATURE_HEADER).unwrap(),
            signature("s3cret", &r.body)
        );
        assert!(!format!("{r:?}").contains("sha256="), "headers never print");
        // RFC 4231 test case 2.
        assert_eq!(
            signature("Jefe", "what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let (ok, out) = webhook_output(
            &http::Outcome::Response {
                status: 200,
                body: "あ".repeat(10_000),
            },
            5000,
        );
        assert!(ok && out.len() <= MAX_OUTPUT_BYTES);
        // Cut, it is still JSON, and says so.
        let slots: Vec<Value> = (0..400)
            .map(|i| json!({"id": i, "start": "2026-11-01T10:00:00+09:00", "room": "A"}))
            .collect();
        let body = json!({ "slots": slots }).to_string();
        let (ok, out) = webhook_output(
            &http::Outcome::Response {
                status: 200,
                body: body.clone(),
            },
            5000,
        );
        assert!(ok && out.len() <= MAX_OUTPUT_BYTES, "{}", out.len());
        let v: Value = serde_json::from_str(&out).expect("valid JSON");
        assert_eq!(v["truncated"], true);
        let partial = v["partial"].as_str().unwrap();
        assert!(partial.len() > MAX_OUTPUT_BYTES / 2 && body.starts_with(partial));
        // An answer that fits is given as it is.
        let (_, out) = webhook_output(
            &http::Outcome::Response {
                status: 200,
                body: r#"{"name":"山田"}"#.into(),
            },
            5000,
        );
        assert_eq!(out, r#"{"name":"山田"}"#);
        let (ok, out) = webhook_output(
            &http::Outcome::Failed {
                reason: "timeout".into(),
            },
            5000,
        );
        assert!(!ok && out.contains("5000 ms"));
        let (ok, out) = webhook_output(
            &http::Outcome::Response {
                status: 503,
                body: "x".into(),
            },
            5000,
        );
        assert!(!ok && out.contains("503"));
    }
}
