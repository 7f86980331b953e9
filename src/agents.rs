//! Agents as D1 keeps them and as the admin API shows them: the mapping between `agents`
//! rows and [`config::Agent`], the statements that read and change `agents` and
//! `phone_numbers`, and the parsing of API input into a validated agent.
//!
//! Rows are JSON objects keyed by column, exactly as D1 returns them (`tools` is JSON text,
//! `is_default` is 0/1). Validation of the agent itself is [`Agent::validate`]; this module
//! checks shapes and types, and the one rule only API input must meet (a webhook tool needs
//! a tool secret: stored agents from before it still load and answer calls).

use crate::config::{self, Agent, ConfigError, TurnDetection};
use crate::store::Statement;
use serde_json::{json, Map, Value};

/// The `agents` columns, in the order the statements here select them.
pub const COLUMNS: [&str; 21] = [
    "id",
    "name",
    "instructions",
    "greeting",
    "voice",
    "model",
    "language",
    "transcription_model",
    "turn_detection_type",
    "vad_threshold",
    "vad_silence_ms",
    "vad_prefix_padding_ms",
    "tools",
    "transfer_number",
    "max_call_seconds",
    "is_default",
    "created_at",
    "updated_at",
    "tool_secret",
    "record_calls",
    "noise_reduction",
];

/// Prefix of the ids the API generates (`agt_` and 16 hex digits).
pub const ID_PREFIX: &str = "agt_";

fn select_list(alias: &str) -> String {
    COLUMNS
        .iter()
        .map(|c| format!("{alias}.{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// An agent with what the table keeps besides it.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub agent: Agent,
    pub is_default: bool,
    pub created_at: String,
    pub updated_at: String,
}

// ---- rows -> Agent -------------------------------------------------------------------------------

fn column<'a>(row: &'a Value, col: &'static str) -> Result<&'a Value, ConfigError> {
    row.get(col).ok_or_else(|| ConfigError {
        field: col,
        reason: "missing from the row".into(),
    })
}

fn text(row: &Value, col: &'static str) -> Result<String, ConfigError> {
    match column(row, col)? {
        Value::String(s) => Ok(s.clone()),
        other => Err(ConfigError {
            field: col,
            reason: format!("expected text, got {other}"),
        }),
    }
}

fn whole(row: &Value, col: &'static str) -> Result<u32, ConfigError> {
    // D1 hands back JavaScript numbers, so an INTEGER may arrive as 1800 or 1800.0.
    let v = column(row, col)?;
    v.as_u64()
        .or_else(|| {
            v.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                .map(|f| f as u64)
        })
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| ConfigError {
            field: col,
            reason: format!("expected a non-negative integer, got {v}"),
        })
}

/// Reads one `agents` row without judging the agent (the admin API must be able to show,
/// and fix, a row an operator wrote by hand).
pub fn record_from_row(row: &Value) -> Result<Record, ConfigError> {
    read_row(row, &mut |e| Err(e))
}

/// A 0/1 (or boolean) column as D1 returns it.
fn flag(v: &Value) -> bool {
    match v {
        Value::Bool(b) => *b,
        v => v.as_f64().is_some_and(|n| n != 0.0),
    }
}

/// What [`read_row`] does with a column it cannot read: `Err` stops there; `Ok` goes on
/// with the column's default in the record.
type OnUnreadable<'a> = dyn FnMut(ConfigError) -> Result<(), ConfigError> + 'a;

fn or_default<T>(
    read: Result<T, ConfigError>,
    default: impl FnOnce() -> T,
    on_unreadable: &mut OnUnreadable<'_>,
) -> Result<T, ConfigError> {
    match read {
        Ok(v) => Ok(v),
        Err(e) => on_unreadable(e).map(|()| default()),
    }
}

fn read_tools(row: &Value) -> Result<Vec<Value>, ConfigError> {
    let tools = match column(row, "tools")? {
        Value::String(s) => serde_json::from_str::<Value>(s).map_err(|e| ConfigError {
            field: "tools",
            reason: format!("not JSON: {e}"),
        })?,
        other => other.clone(),
    };
    match tools {
        Value::Array(tools) => Ok(tools),
        _ => Err(ConfigError {
            field: "tools",
            reason: "not a JSON array".into(),
        }),
    }
}

fn read_threshold(row: &Value) -> Result<f64, ConfigError> {
    let threshold = column(row, "vad_threshold")?;
    threshold.as_f64().ok_or_else(|| ConfigError {
        field: "vad_threshold",
        reason: format!("expected a number, got {threshold}"),
    })
}

fn read_transfer_number(row: &Value) -> Result<Option<String>, ConfigError> {
    match row.get("transfer_number") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(ConfigError {
            field: "transfer_number",
            reason: format!("expected text, got {other}"),
        }),
    }
}

/// Reads a row column by column; `on_unreadable` is asked about each column that cannot be
/// read. The `id` must always be readable.
fn read_row(row: &Value, on_unreadable: &mut OnUnreadable<'_>) -> Result<Record, ConfigError> {
    let id = text(row, "id")?;
    let mut text_or_empty =
        |col: &'static str| or_default(text(row, col), String::new, on_unreadable);
    let name = text_or_empty("name")?;
    let instructions = text_or_empty("instructions")?;
    let greeting = text_or_empty("greeting")?;
    let voice = text_or_empty("voice")?;
    // A row from before the column existed: the column's default.
    let noise_reduction = match row.get("noise_reduction") {
        None | Some(Value::Null) => config::DEFAULT_NOISE_REDUCTION.to_owned(),
        Some(_) => text_or_empty("noise_reduction")?,
    };
    let model = text_or_empty("model")?;
    let language = text_or_empty("language")?;
    let transcription_model = text_or_empty("transcription_model")?;
    let kind = text_or_empty("turn_detection_type")?;
    let defaults = TurnDetection::default();
    let threshold = or_default(read_threshold(row), || defaults.threshold, on_unreadable)?;
    let prefix_padding_ms = or_default(
        whole(row, "vad_prefix_padding_ms"),
        || defaults.prefix_padding_ms,
        on_unreadable,
    )?;
    let silence_duration_ms = or_default(
        whole(row, "vad_silence_ms"),
        || defaults.silence_duration_ms,
        on_unreadable,
    )?;
    let tools = or_default(read_tools(row), Vec::new, on_unreadable)?;
    let transfer_number = or_default(read_transfer_number(row), || None, on_unreadable)?;
    let max_call_seconds = or_default(
        whole(row, "max_call_seconds"),
        || config::DEFAULT_MAX_CALL_SECONDS,
        on_unreadable,
    )?;
    let is_default = or_default(column(row, "is_default").map(flag), || false, on_unreadable)?;
    // A row from before the column existed records, like the column's default.
    let record_calls = match row.get("record_calls") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(v) => v.as_f64().is_some_and(|n| n != 0.0),
    };
    let agent = Agent {
        id,
        name,
        instructions,
        greeting,
        voice,
        noise_reduction,
        model,
        language,
        transcription_model,
        turn_detection: TurnDetection {
            kind,
            threshold,
            prefix_padding_ms,
            silence_duration_ms,
        },
        tools,
        transfer_number,
        max_call_seconds,
        tool_secret: row
            .get("tool_secret")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(config::Secret::new),
        record_calls,
    };
    Ok(Record {
        agent,
        is_default,
        created_at: row
            .get("created_at")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        updated_at: row
            .get("updated_at")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
    })
}

/// The API field a column is set through.
fn api_field(column: &'static str) -> &'static str {
    match column {
        "turn_detection_type" => "turn_detection.type",
        "vad_threshold" => "turn_detection.threshold",
        "vad_silence_ms" => "turn_detection.silence_duration_ms",
        "vad_prefix_padding_ms" => "turn_detection.prefix_padding_ms",
        other => other,
    }
}

/// Whether `body` gives a value for the API field `field` (`turn_detection.x` inside its
/// object).
fn body_gives(body: &Map<String, Value>, field: &str) -> bool {
    match field.split_once('.') {
        Some((outer, inner)) => body
            .get(outer)
            .and_then(Value::as_object)
            .is_some_and(|o| o.contains_key(inner)),
        None => body.contains_key(field),
    }
}

/// The stored agent a PUT `body` starts from. A column that cannot be read (a row written
/// by hand, say `tools = ''`) is refused naming its field unless the body gives a new value
/// for it, so that the row can be repaired through the API.
pub fn record_for_update(row: &Value, body: &Map<String, Value>) -> Result<Record, Refusal> {
    let mut first_unreadable = None;
    let read = read_row(row, &mut |e: ConfigError| {
        if !body_gives(body, api_field(e.field)) && first_unreadable.is_none() {
            first_unreadable = Some(e);
        }
        Ok(())
    });
    let record = read?;
    match first_unreadable {
        None => Ok(record),
        Some(e) => Err(invalid(
            api_field(e.field),
            format!(
                "the stored value cannot be read ({}); give a new one in this request",
                e.reason
            ),
        )),
    }
}

/// A stored agent as far as it can be read (unreadable columns at their defaults): enough to
/// decide whether it may be deleted.
pub fn record_for_delete(row: &Value) -> Result<Record, ConfigError> {
    read_row(row, &mut |_| Ok(()))
}

/// How the admin API shows one stored row.
#[derive(Clone, Debug, PartialEq)]
pub enum View {
    /// The API's view of the agent ([`to_json`]).
    Agent(Value),
    /// A row that cannot be read: shown with its id, name and default flag as far as they
    /// can be read and the field at fault, so it can be fixed with a PUT naming that field
    /// (or deleted).
    Unreadable { json: Value, error: ConfigError },
}

/// The API's view of one stored row, or what is wrong with it.
pub fn view(row: &Value) -> View {
    match record_from_row(row) {
        Ok(record) => View::Agent(to_json(&record)),
        Err(error) => View::Unreadable {
            json: json!({
                "id": row.get("id"),
                "name": row.get("name").filter(|v| v.is_string()),
                "is_default": row.get("is_default").is_some_and(flag),
                "unreadable": {
                    "field": api_field(error.field),
                    "message": error.reason,
                },
            }),
            error,
        },
    }
}

/// `{"agents": [...]}` of every stored row: a row that cannot be read is listed as
/// [`View::Unreadable`] (and returned beside, for the log) rather than failing the list.
pub fn list_json(rows: &[Value]) -> (Value, Vec<(Option<String>, ConfigError)>) {
    let mut bad = Vec::new();
    let list: Vec<Value> = rows
        .iter()
        .map(|row| match view(row) {
            View::Agent(json) => json,
            View::Unreadable { json, error } => {
                let id = row.get("id").and_then(Value::as_str).map(str::to_owned);
                bad.push((id, error));
                json
            }
        })
        .collect();
    (json!({ "agents": list }), bad)
}

/// The agent of one `agents` row, validated: what a call may be run with. An error names the
/// column (for a malformed row) or the agent field (for a value the Realtime API would refuse).
///
/// A stored language written as a slip (`jp`, `ja-JP`, `JA`: a row from before languages
/// were checked, or written by hand) is read as meant, as the configured agent's is, rather
/// than costing the number its agent: the call would otherwise go to the configured agent.
/// So is a model or transcription model with stray spaces or capitals
/// (`"gpt-4o-transcribe "`, `GPT-Realtime`). Any other value the Realtime API would refuse
/// (a model such as `gpt-realtme`, a tool whose `parameters` is not an object schema) is an
/// error like an unknown voice: the configured agent takes the call, where the stored one
/// would have had every call refused by the server and end in the fallback.
pub fn from_row(row: &Value) -> Result<Agent, ConfigError> {
    let mut agent = record_from_row(row)?.agent;
    if !config::ISO_639_1.contains(&agent.language.as_str()) {
        if let Some(meant) = config::suggest_language(&agent.language) {
            agent.language = meant.to_owned();
        }
    }
    if let Some(meant) = config::suggest_realtime_model(&agent.model) {
        agent.model = meant;
    }
    if let Some(meant) = config::suggest_transcription_model(&agent.transcription_model) {
        agent.transcription_model = meant;
    }
    agent.validate()?;
    Ok(agent)
}

// ---- Agent -> API JSON ---------------------------------------------------------------------------

/// The API's view of an agent; [`parse_create`] and [`parse_update`] accept the same shape.
pub fn to_json(record: &Record) -> Value {
    let a = &record.agent;
    json!({
        "id": a.id,
        "name": a.name,
        "instructions": a.instructions,
        "greeting": a.greeting,
        "voice": a.voice,
        "noise_reduction": a.noise_reduction,
        "model": a.model,
        "language": a.language,
        "transcription_model": a.transcription_model,
        "turn_detection": {
            "type": a.turn_detection.kind,
            "threshold": a.turn_detection.threshold,
            "silence_duration_ms": a.turn_detection.silence_duration_ms,
            "prefix_padding_ms": a.turn_detection.prefix_padding_ms,
        },
        "tools": a.tools,
        "transfer_number": a.transfer_number,
        "max_call_seconds": a.max_call_seconds,
        // Write-only: whether one is set, never the secret.
        "tool_secret_set": a.tool_secret.is_some(),
        "record_calls": a.record_calls,
        "is_default": record.is_default,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
    })
}

// ---- API input -> Agent --------------------------------------------------------------------------

/// Why API input about agents or numbers was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    /// 400: a field is missing, unknown, of the wrong type, or fails validation.
    #[error("`{field}`: {message}")]
    Invalid { field: String, message: String },
    /// 409: the change would break an invariant (the single default agent, assigned numbers).
    #[error("{0}")]
    Conflict(String),
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> Refusal {
    Refusal::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

impl From<ConfigError> for Refusal {
    fn from(e: ConfigError) -> Self {
        invalid(e.field, e.reason)
    }
}

/// True for an agent id the API accepts: 1-64 ASCII letters, digits, `_` or `-`.
pub fn is_valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A new agent id from random bytes the shell supplies (the core has no randomness).
pub fn new_id(random: [u8; 8]) -> String {
    let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
    format!("{ID_PREFIX}{hex}")
}

/// The agent and its default flag after applying API input.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    pub agent: Agent,
    pub is_default: bool,
    /// The columns the input gave a value for: an update writes these and no others, so
    /// two updates of different fields from the same read both stick.
    pub columns: Vec<&'static str>,
    /// What the stored row must still hold for an update to go ahead, because the checks
    /// of the merged agent relied on a field this update does not write.
    pub conditions: Vec<Condition>,
}

/// A condition an update puts on the stored row (see [`Change::conditions`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Condition {
    /// A tool secret is set (the update adds webhook tools and leaves the secret).
    SecretSet,
    /// No webhook tool is configured (the update removes the secret and leaves the tools).
    NoWebhookTool,
    /// Not the default agent (the update says `is_default: false`, which may not unset it).
    NotDefault,
    /// A transfer number is set (the update adds `transfer_call` and leaves the number).
    TransferNumberSet,
    /// No `transfer_call` tool is configured (the update removes the number, leaves the tools).
    NoTransferTool,
}

impl Condition {
    /// The SQL of the condition on the `agents` row named `table`.
    fn sql(self, table: &str) -> String {
        match self {
            Condition::SecretSet => {
                format!("{table}.tool_secret IS NOT NULL AND {table}.tool_secret <> ''")
            }
            Condition::NoWebhookTool => format!(
                "NOT EXISTS (SELECT 1 FROM json_each({table}.tools) AS t \
                 WHERE json_extract(t.value, '$.type') = 'function')"
            ),
            Condition::NotDefault => format!("{table}.is_default = 0"),
            Condition::TransferNumberSet => {
                format!("{table}.transfer_number IS NOT NULL AND {table}.transfer_number <> ''")
            }
            Condition::NoTransferTool => format!(
                "NOT EXISTS (SELECT 1 FROM json_each({table}.tools) AS t \
                 WHERE json_extract(t.value, '$.type') = 'transfer_call')"
            ),
        }
    }
}

/// True when `tools` has a webhook (`function`) tool.
fn has_webhook_tool(tools: &[Value]) -> bool {
    tools.iter().any(|t| {
        matches!(
            crate::tools::parse(t),
            Ok(crate::tools::Tool::Webhook { .. })
        )
    })
}

/// Webhook tool requests are signed with the tool secret, so an agent with one needs it.
/// Checked on API input only: a stored agent without one still loads and answers calls.
/// What a stored agent may have but a write may not give it, as it would fail the callers:
/// a transfer number Twilio cannot dial (`+810…`), or a `transfer_call` tool with no number
/// to transfer to (the model would offer transfers that never happen).
fn check_transfer(agent: &Agent) -> Result<(), Refusal> {
    match &agent.transfer_number {
        Some(n) => match config::number_problem(n) {
            Some(problem) => Err(invalid("transfer_number", problem)),
            None => Ok(()),
        },
        None if has_transfer_tool(&agent.tools) => Err(invalid(
            "transfer_number",
            "is required while the agent has a transfer_call tool: give the E.164 number \
             to transfer to (such as +81312345678), or remove the tool",
        )),
        None => Ok(()),
    }
}

/// True when `tools` has the built-in `transfer_call`.
fn has_transfer_tool(tools: &[Value]) -> bool {
    tools
        .iter()
        .any(|t| matches!(crate::tools::parse(t), Ok(crate::tools::Tool::TransferCall)))
}

fn check_tool_secret(agent: &Agent) -> Result<(), Refusal> {
    if agent.tool_secret.is_none() && has_webhook_tool(&agent.tools) {
        return Err(invalid(
            "tool_secret",
            "is required while the agent has a webhook (\"function\") tool: every request \
             to it is signed with this secret (X-Bridge-Signature); give 16 or more characters",
        ));
    }
    Ok(())
}

fn string(field: &str, v: &Value) -> Result<String, Refusal> {
    v.as_str()
        .map(str::to_owned)
        .ok_or_else(|| invalid(field, "must be a string"))
}

fn int_u32(field: &str, v: &Value) -> Result<u32, Refusal> {
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| invalid(field, "must be a non-negative integer"))
}

fn apply_turn_detection(td: &mut TurnDetection, v: &Value) -> Result<(), Refusal> {
    let Some(obj) = v.as_object() else {
        return Err(invalid(
            "turn_detection",
            "must be an object with type, threshold, silence_duration_ms, prefix_padding_ms",
        ));
    };
    for (key, v) in obj {
        let field = format!("turn_detection.{key}");
        match key.as_str() {
            "type" => td.kind = string(&field, v)?,
            "threshold" => {
                td.threshold = v
                    .as_f64()
                    .ok_or_else(|| invalid(&field, "must be a number"))?
            }
            "silence_duration_ms" => td.silence_duration_ms = int_u32(&field, v)?,
            "prefix_padding_ms" => td.prefix_padding_ms = int_u32(&field, v)?,
            _ => return Err(invalid(field, "unknown field")),
        }
    }
    Ok(())
}

/// Applies every field of `body` to `change` and notes the columns it sets; `id` is
/// handled by the callers.
fn apply(body: &Map<String, Value>, change: &mut Change) -> Result<(), Refusal> {
    let a = &mut change.agent;
    let columns = &mut change.columns;
    for (key, v) in body {
        let field = key.as_str();
        match field {
            "name"
            | "instructions"
            | "greeting"
            | "voice"
            | "model"
            | "language"
            | "transcription_model"
            | "tools"
            | "transfer_number"
            | "max_call_seconds"
            | "tool_secret"
            | "record_calls"
            | "noise_reduction"
            | "is_default" => {
                let column = COLUMNS.iter().find(|c| **c == field).expect("a column");
                columns.push(*column);
            }
            "turn_detection" => {
                for inner in v.as_object().into_iter().flat_map(Map::keys) {
                    match inner.as_str() {
                        "type" => columns.push("turn_detection_type"),
                        "threshold" => columns.push("vad_threshold"),
                        "silence_duration_ms" => columns.push("vad_silence_ms"),
                        "prefix_padding_ms" => columns.push("vad_prefix_padding_ms"),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
        match field {
            "id" => {}
            // Read-only: accepted and ignored so that a GET body can be edited and PUT back.
            "created_at" | "updated_at" => {}
            "name" => a.name = string(field, v)?,
            "instructions" => a.instructions = string(field, v)?,
            "greeting" => a.greeting = string(field, v)?,
            "voice" => a.voice = string(field, v)?,
            "noise_reduction" => a.noise_reduction = string(field, v)?,
            "model" => a.model = string(field, v)?,
            "language" => a.language = string(field, v)?,
            "transcription_model" => a.transcription_model = string(field, v)?,
            "turn_detection" => apply_turn_detection(&mut a.turn_detection, v)?,
            "tools" => {
                a.tools = v
                    .as_array()
                    .cloned()
                    .ok_or_else(|| invalid(field, "must be a JSON array of function definitions"))?
            }
            "transfer_number" => {
                a.transfer_number = match v {
                    Value::Null => None,
                    // A form's emptied field: no number, as a stored '' reads.
                    Value::String(s) if s.trim().is_empty() => None,
                    Value::String(s) => Some(s.clone()),
                    _ => return Err(invalid(field, "must be an E.164 string or null")),
                }
            }
            "max_call_seconds" => a.max_call_seconds = int_u32(field, v)?,
            "tool_secret" => {
                a.tool_secret =
                    match v {
                        Value::Null => None,
                        // Characters, not bytes: eight kanji are not a 16-character secret.
                        Value::String(s) if s.chars().count() >= 16 && !s.trim().is_empty() => {
                            Some(config::Secret::new(s.clone()))
                        }
                        _ => return Err(invalid(
                            field,
                            "must be a string of 16 or more characters, not all spaces, or null",
                        )),
                    }
            }
            // Shown by GET; accepted and ignored so a GET body can be PUT back.
            "tool_secret_set" => {}
            "record_calls" => {
                a.record_calls = v
                    .as_bool()
                    .ok_or_else(|| invalid(field, "must be true or false"))?
            }
            "is_default" => {
                change.is_default = v
                    .as_bool()
                    .ok_or_else(|| invalid(field, "must be true or false"))?
            }
            _ => return Err(invalid(field, "unknown field")),
        }
    }
    Ok(())
}

/// A new agent from a POST body. `name` and `instructions` are required; every other field
/// defaults as in [`Agent::default`] (the Japanese receptionist settings). `id` is optional:
/// without it `generated_id` is used.
pub fn parse_create(body: &Map<String, Value>, generated_id: &str) -> Result<Change, Refusal> {
    let id = match body.get("id") {
        None => generated_id.to_owned(),
        Some(v) => {
            let id = string("id", v)?;
            if !is_valid_id(&id) {
                return Err(invalid("id", "must be 1-64 letters, digits, _ or -"));
            }
            id
        }
    };
    for required in ["name", "instructions"] {
        if !body.contains_key(required) {
            return Err(invalid(required, "is required"));
        }
    }
    let mut change = Change {
        agent: Agent {
            id,
            name: String::new(),
            instructions: String::new(),
            ..Agent::default()
        },
        is_default: false,
        columns: Vec::new(),
        conditions: Vec::new(),
    };
    apply(body, &mut change)?;
    change.agent.validate()?;
    check_tool_secret(&change.agent)?;
    check_transfer(&change.agent)?;
    change.columns = COLUMNS.to_vec();
    Ok(change)
}

/// An agent after a PUT body: a partial update. Fields absent from the body keep their
/// values (inside `turn_detection` too); `transfer_number: null` clears the number. `id`, when
/// given, must be the agent's own. Unsetting `is_default` on the default agent is a conflict:
/// there must always be one, so make another agent the default instead.
pub fn parse_update(body: &Map<String, Value>, current: &Record) -> Result<Change, Refusal> {
    if let Some(v) = body.get("id") {
        if string("id", v)? != current.agent.id {
            return Err(invalid("id", "cannot be changed"));
        }
    }
    let mut change = Change {
        agent: current.agent.clone(),
        is_default: current.is_default,
        columns: Vec::new(),
        conditions: Vec::new(),
    };
    apply(body, &mut change)?;
    change.agent.validate()?;
    if current.is_default && !change.is_default {
        return Err(Refusal::Conflict(format!(
            "agent {:?} is the default agent; make another agent the default \
             (is_default: true) instead of unsetting it",
            current.agent.id
        )));
    }
    check_tool_secret(&change.agent)?;
    check_transfer(&change.agent)?;
    // What the checks above took from the stored row for fields this update leaves alone
    // must still hold when it is written (another update may have come in between).
    let gives = |c: &str| change.columns.contains(&c);
    if gives("tools") && !gives("tool_secret") && has_webhook_tool(&change.agent.tools) {
        change.conditions.push(Condition::SecretSet);
    }
    if gives("tool_secret") && !gives("tools") && change.agent.tool_secret.is_none() {
        change.conditions.push(Condition::NoWebhookTool);
    }
    if gives("tools") && !gives("transfer_number") && has_transfer_tool(&change.agent.tools) {
        change.conditions.push(Condition::TransferNumberSet);
    }
    if gives("transfer_number") && !gives("tools") && change.agent.transfer_number.is_none() {
        change.conditions.push(Condition::NoTransferTool);
    }
    if gives("is_default") && !change.is_default {
        change.conditions.push(Condition::NotDefault);
    }
    Ok(change)
}

/// Why an agent may not be deleted, if it may not: it is the default, or numbers are still
/// assigned to it.
pub fn deletion_conflict(record: &Record, assigned_numbers: &[String]) -> Option<Refusal> {
    if record.is_default {
        return Some(Refusal::Conflict(format!(
            "agent {:?} is the default agent; make another agent the default before deleting it",
            record.agent.id
        )));
    }
    if !assigned_numbers.is_empty() {
        return Some(Refusal::Conflict(format!(
            "agent {:?} still answers {}; assign those numbers to another agent or delete them first",
            record.agent.id,
            assigned_numbers.join(", ")
        )));
    }
    None
}

// ---- statements ----------------------------------------------------------------------------------

/// The agent that answers calls to `number`: the one assigned to it in `phone_numbers`, else
/// the default agent (`is_default = 1`). At most one row, the assigned agent preferred; no
/// row only when there is no default agent either. Map the row with [`from_row`].
pub fn select_for_number(number: &str) -> Statement {
    Statement::new(
        format!(
            "SELECT {} FROM agents a \
             LEFT JOIN phone_numbers p ON p.agent_id = a.id AND p.number = ?1 \
             WHERE p.number IS NOT NULL OR a.is_default = 1 \
             ORDER BY p.number IS NULL LIMIT 1",
            select_list("a")
        ),
        vec![json!(number)],
    )
}

/// Every agent, the default first, then oldest first.
pub fn select_all() -> Statement {
    Statement::new(
        format!(
            "SELECT {} FROM agents a ORDER BY a.is_default DESC, a.created_at, a.id",
            select_list("a")
        ),
        vec![],
    )
}

/// One agent by id (zero or one row).
pub fn select_by_id(id: &str) -> Statement {
    Statement::new(
        format!("SELECT {} FROM agents a WHERE a.id = ?1", select_list("a")),
        vec![json!(id)],
    )
}

fn row_params(change: &Change, now: &str) -> Vec<Value> {
    let a = &change.agent;
    vec![
        json!(a.id),
        json!(a.name),
        json!(a.instructions),
        json!(a.greeting),
        json!(a.voice),
        json!(a.model),
        json!(a.language),
        json!(a.transcription_model),
        json!(a.turn_detection.kind),
        json!(a.turn_detection.threshold),
        json!(a.turn_detection.silence_duration_ms),
        json!(a.turn_detection.prefix_padding_ms),
        json!(Value::Array(a.tools.clone()).to_string()),
        json!(a.transfer_number),
        json!(a.max_call_seconds),
        json!(i32::from(change.is_default)),
        json!(now),
        json!(a.tool_secret.as_ref().map(|s| s.expose())),
        json!(i32::from(a.record_calls)),
        json!(a.noise_reduction),
    ]
}

/// Clears `is_default` on every agent but `id`, so that `id` can become the default in the
/// same batch (the schema allows one default).
fn clear_other_defaults(id: &str, now: &str) -> Statement {
    Statement::new(
        "UPDATE agents SET is_default = 0, updated_at = ?2 WHERE is_default = 1 AND id <> ?1",
        vec![json!(id), json!(now)],
    )
}

/// Inserts a new agent (run as one batch). `now` is an ISO time ([`crate::store::iso_time`]).
pub fn insert(change: &Change, now: &str) -> Vec<Statement> {
    let mut out = Vec::new();
    if change.is_default {
        out.push(clear_other_defaults(&change.agent.id, now));
    }
    out.push(Statement::new(
        format!(
            "INSERT INTO agents ({}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, \
             ?13, ?14, ?15, ?16, ?17, ?17, ?18, ?19, ?20)",
            COLUMNS.join(", ")
        ),
        row_params(change, now),
    ));
    out
}

/// The value a column of `change` is written as.
fn column_value(change: &Change, column: &str) -> Value {
    let a = &change.agent;
    match column {
        "name" => json!(a.name),
        "instructions" => json!(a.instructions),
        "greeting" => json!(a.greeting),
        "voice" => json!(a.voice),
        "model" => json!(a.model),
        "language" => json!(a.language),
        "transcription_model" => json!(a.transcription_model),
        "turn_detection_type" => json!(a.turn_detection.kind),
        "vad_threshold" => json!(a.turn_detection.threshold),
        "vad_silence_ms" => json!(a.turn_detection.silence_duration_ms),
        "vad_prefix_padding_ms" => json!(a.turn_detection.prefix_padding_ms),
        "tools" => json!(Value::Array(a.tools.clone()).to_string()),
        "transfer_number" => json!(a.transfer_number),
        "max_call_seconds" => json!(a.max_call_seconds),
        "tool_secret" => json!(a.tool_secret.as_ref().map(|s| s.expose())),
        "record_calls" => json!(i32::from(a.record_calls)),
        "noise_reduction" => json!(a.noise_reduction),
        other => unreachable!("column {other} is not written by an update"),
    }
}

/// Writes the fields an update gave, and only those, with `updated_at` (run as one batch;
/// the last statement is the agent's own). It changes no row when the agent is gone or no
/// longer meets [`Change::conditions`]: then read it again and say why.
pub fn update(change: &Change, now: &str) -> Vec<Statement> {
    let id = &change.agent.id;
    let mut params = vec![json!(id), json!(now)];
    let mut sets = Vec::new();
    for column in COLUMNS {
        if !change.columns.contains(&column) {
            continue;
        }
        match column {
            // Only ever set here (unsetting is refused, or a condition when asked as a no-op).
            "is_default" => {
                if change.is_default {
                    sets.push("is_default = 1".to_owned());
                }
            }
            "id" | "created_at" | "updated_at" => {}
            _ => {
                params.push(column_value(change, column));
                sets.push(format!("{column} = ?{}", params.len()));
            }
        }
    }
    sets.push("updated_at = ?2".to_owned());
    let conditions = |table: &str| -> String {
        change
            .conditions
            .iter()
            .map(|c| format!(" AND {}", c.sql(table)))
            .collect()
    };
    let mut out = Vec::new();
    if change.is_default && change.columns.contains(&"is_default") {
        // Only if the agent's own update below will go ahead.
        out.push(Statement::new(
            format!(
                "UPDATE agents SET is_default = 0, updated_at = ?2 \
                 WHERE is_default = 1 AND id <> ?1 \
                 AND EXISTS (SELECT 1 FROM agents AS cur WHERE cur.id = ?1{})",
                conditions("cur")
            ),
            vec![json!(id), json!(now)],
        ));
    }
    out.push(Statement::new(
        format!(
            "UPDATE agents SET {} WHERE agents.id = ?1{}",
            sets.join(", "),
            conditions("agents")
        ),
        params,
    ));
    out
}

/// Deletes an agent unless it is the default or still has numbers: the condition is in the
/// statement too, so a concurrent change cannot slip between the check and the delete. Zero
/// rows changed means it was refused (or is gone); look again to say why.
pub fn delete(id: &str) -> Statement {
    Statement::new(
        "DELETE FROM agents WHERE id = ?1 AND is_default = 0 \
         AND NOT EXISTS (SELECT 1 FROM phone_numbers WHERE agent_id = ?1)",
        vec![json!(id)],
    )
}

// ---- phone numbers -------------------------------------------------------------------------------

/// Columns of the number statements: `number`, `agent_id`, `agent_name`, `created_at`.
const NUMBER_SELECT: &str = "SELECT p.number, p.agent_id, a.name AS agent_name, p.created_at \
     FROM phone_numbers p LEFT JOIN agents a ON a.id = p.agent_id";

/// Every number assignment, by number.
pub fn select_numbers() -> Statement {
    Statement::new(format!("{NUMBER_SELECT} ORDER BY p.number"), vec![])
}

/// One number's assignment (zero or one row).
pub fn select_number(number: &str) -> Statement {
    Statement::new(
        format!("{NUMBER_SELECT} WHERE p.number = ?1"),
        vec![json!(number)],
    )
}

/// The numbers assigned to one agent (column `number`).
pub fn select_numbers_of(agent_id: &str) -> Statement {
    Statement::new(
        "SELECT number FROM phone_numbers WHERE agent_id = ?1 ORDER BY number",
        vec![json!(agent_id)],
    )
}

/// Assigns `number` to `agent_id`, replacing an earlier assignment. `created_at` is when the
/// number was given to its agent (what the review page shows as 割り当て日時): a number
/// moved to another agent takes the new time, one assigned again to the same agent keeps it.
pub fn assign_number(number: &str, agent_id: &str, now: &str) -> Statement {
    Statement::new(
        "INSERT INTO phone_numbers (number, agent_id, created_at) VALUES (?1, ?2, ?3) \
         ON CONFLICT (number) DO UPDATE SET agent_id = excluded.agent_id, \
         created_at = CASE WHEN phone_numbers.agent_id = excluded.agent_id \
         THEN phone_numbers.created_at ELSE excluded.created_at END",
        vec![json!(number), json!(agent_id), json!(now)],
    )
}

/// Removes a number's assignment (calls to it then reach the default agent).
pub fn unassign_number(number: &str) -> Statement {
    Statement::new(
        "DELETE FROM phone_numbers WHERE number = ?1",
        vec![json!(number)],
    )
}

/// The `agent_id` of a `PUT /api/admin/numbers/{number}` body: an object with exactly that
/// one string field.
pub fn parse_assignment(body: &Map<String, Value>) -> Result<String, Refusal> {
    if let Some(key) = body.keys().find(|k| k.as_str() != "agent_id") {
        return Err(invalid(key.as_str(), "unknown field"));
    }
    let v = body
        .get("agent_id")
        .ok_or_else(|| invalid("agent_id", "is required"))?;
    let id = string("agent_id", v)?;
    if !is_valid_id(&id) {
        return Err(invalid("agent_id", format!("no agent {id:?}")));
    }
    Ok(id)
}

/// Checks a phone number for the API (path segments are percent-decoded by the caller).
/// Any E.164 number can be read or unassigned; only one a call can come in on (not
/// `+810…`) can be assigned.
pub fn check_number(number: &str, assigning: bool) -> Result<(), Refusal> {
    let problem = if assigning {
        config::number_problem(number)
    } else {
        (!config::is_e164(number))
            .then(|| format!("{number:?} is not an E.164 number such as +81312345678"))
    };
    match problem {
        Some(problem) => Err(invalid("number", problem)),
        None => Ok(()),
    }
}

/// Runs [`Statement`]s on an in-memory SQLite database that has `migrations/*.sql` applied,
/// the way D1 would: to prove the SQL against the real schema in native tests.
#[cfg(test)]
pub(crate) mod testdb {
    use crate::store::Statement;
    use rusqlite::types::{Value as Sql, ValueRef};
    use rusqlite::Connection;
    use serde_json::{Map, Value};

    /// A fresh database with every migration applied, foreign keys on (as on D1).
    pub fn open() -> Connection {
        open_before("~")
    }

    /// A fresh database with the migrations whose file names sort before `name` applied
    /// (`"0006"`: 0001 to 0005), as a database deployed before that one was.
    pub fn open_before(name: &str) -> Connection {
        let conn = Connection::open_in_memory().expect("open sqlite");
        conn.execute_batch("PRAGMA foreign_keys = ON;").unwrap();
        migrate(&conn, |file| file < name);
        conn
    }

    /// Applies the migrations whose file names `pick` takes, in order.
    pub fn migrate(conn: &Connection, pick: impl Fn(&str) -> bool) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .expect("migrations/")
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "sql"))
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(&pick))
            .collect();
        files.sort();
        for f in files {
            let sql = std::fs::read_to_string(&f).unwrap();
            conn.execute_batch(&sql)
                .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        }
    }

    /// The binding db.rs gives each JSON parameter on D1.
    fn param(v: &Value) -> Sql {
        match v {
            Value::Null => Sql::Null,
            Value::Bool(b) => Sql::Integer(i64::from(*b)),
            Value::Number(n) => match n.as_i64() {
                Some(i) => Sql::Integer(i),
                None => Sql::Real(n.as_f64().unwrap_or(0.0)),
            },
            Value::String(s) => Sql::Text(s.clone()),
            other => Sql::Text(other.to_string()),
        }
    }

    fn run(conn: &Connection, st: &Statement) -> rusqlite::Result<Vec<Value>> {
        let mut stmt = conn.prepare(&st.sql)?;
        let names: Vec<String> = stmt.column_names().map(|s| s.to_string()).collect();
        let params: Vec<Sql> = st.params.iter().map(param).collect();
        let mut rows = stmt.query(rusqlite::params_from_iter(params))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let mut obj = Map::new();
            for (i, name) in names.iter().enumerate() {
                let v = match row.get_ref(i)? {
                    ValueRef::Null => Value::Null,
                    ValueRef::Integer(n) => Value::from(n),
                    ValueRef::Real(f) => Value::from(f),
                    ValueRef::Text(t) => Value::String(String::from_utf8_lossy(t).into_owned()),
                    ValueRef::Blob(b) => Value::from(b.to_vec()),
                };
                obj.insert(name.clone(), v);
            }
            out.push(Value::Object(obj));
        }
        Ok(out)
    }

    /// Rows as JSON objects keyed by column, like `db::query`.
    pub fn query(conn: &Connection, st: &Statement) -> Vec<Value> {
        run(conn, st).unwrap_or_else(|e| panic!("{e}\n{}", st.sql))
    }

    /// Rows changed, like `db::execute`.
    pub fn execute(conn: &Connection, st: &Statement) -> rusqlite::Result<u64> {
        run(conn, st)?;
        Ok(conn.changes())
    }

    /// All or nothing, like `db::batch_changes`: the rows each statement changed.
    pub fn batch_changes(
        conn: &Connection,
        statements: &[Statement],
    ) -> rusqlite::Result<Vec<u64>> {
        conn.execute_batch("BEGIN")?;
        let mut changes = Vec::new();
        for st in statements {
            match run(conn, st) {
                Ok(_) => changes.push(conn.changes()),
                Err(e) => {
                    conn.execute_batch("ROLLBACK")?;
                    return Err(e);
                }
            }
        }
        conn.execute_batch("COMMIT")?;
        Ok(changes)
    }

    /// All or nothing, like `db::batch`.
    pub fn batch(conn: &Connection, statements: &[Statement]) -> rusqlite::Result<()> {
        conn.execute_batch("BEGIN")?;
        for st in statements {
            if let Err(e) = run(conn, st) {
                conn.execute_batch("ROLLBACK")?;
                return Err(e);
            }
        }
        conn.execute_batch("COMMIT")
    }
}

#[cfg(test)]
mod tests {
    use super::testdb;
    use super::*;

    const NOW: &str = "2026-11-22T01:32:02.123Z";
    const LATER: &str = "2026-11-22T02:00:00.000Z";
    const SECRET: &str = "a-long-random-shared-secret";

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn tool(name: &str) -> Value {
        json!({"type": "function", "name": name, "description": "d",
               "parameters": {"type": "object", "properties": {}},
               "url": "https://crm.example.jp/tools"})
    }

    fn field_of(r: Result<Change, Refusal>) -> String {
        match r {
            Err(Refusal::Invalid { field, .. }) => field,
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    fn create(db: &rusqlite::Connection, body: Value) -> Change {
        let change = parse_create(&obj(body), "agt_0000000000000001").unwrap();
        testdb::batch(db, &insert(&change, NOW)).unwrap();
        change
    }

    fn load(db: &rusqlite::Connection, id: &str) -> Record {
        let rows = testdb::query(db, &select_by_id(id));
        assert_eq!(rows.len(), 1, "{id}");
        record_from_row(&rows[0]).unwrap()
    }

    #[test]
    fn seeded_default_agent_maps_and_validates() {
        let db = testdb::open();
        let rows = testdb::query(&db, &select_all());
        assert_eq!(rows.len(), 1);
        let agent = from_row(&rows[0]).unwrap();
        assert_eq!(agent.id, "default");
        assert_eq!(agent.language, "ja");
        assert_eq!(agent.voice, "marin");
        assert_eq!(agent.turn_detection, TurnDetection::default());
        // It can end a call (migration 0006).
        assert_eq!(agent.tools, [json!({"type": "end_call"})]);
        let record = record_from_row(&rows[0]).unwrap();
        assert!(record.is_default);
        assert!(record.created_at.ends_with('Z'), "{}", record.created_at);
    }

    #[test]
    fn the_seed_gets_end_call_only_when_nobody_has_edited_it() {
        let tools_after_0006 = |edit: &str| {
            let db = testdb::open_before("0006");
            if !edit.is_empty() {
                db.execute_batch(edit).unwrap();
            }
            testdb::migrate(&db, |file| file >= "0006");
            from_row(&testdb::query(&db, &select_by_id("default"))[0])
                .unwrap()
                .tools
        };
        assert_eq!(tools_after_0006(""), [json!({"type": "end_call"})]);
        // Edited through the admin API (which moves updated_at), even to no tools: kept.
        let edited = "UPDATE agents SET instructions = '受付です', \
                      updated_at = '2026-12-01T00:00:00.000Z' WHERE id = 'default'";
        assert!(tools_after_0006(edited).is_empty());
        let with_tools =
            r#"UPDATE agents SET tools = '[{"type":"transfer_call"}]' WHERE id = 'default'"#;
        assert_eq!(
            tools_after_0006(with_tools),
            [json!({"type": "transfer_call"})]
        );
    }

    #[test]
    fn row_round_trip_through_the_real_schema() {
        let db = testdb::open();
        let body = json!({
            "id": "sales", "name": "Sales", "instructions": "Sell.", "greeting": "Hello",
            "voice": "cedar", "model": "gpt-realtime-mini", "language": "en",
            "transcription_model": "whisper-1", "noise_reduction": "far_field",
            "turn_detection": {"type": "semantic_vad", "threshold": 0.7,
                               "silence_duration_ms": 800, "prefix_padding_ms": 200},
            "tools": [tool("lookup_order"), tool("transfer")],
            "transfer_number": "+81312345678", "max_call_seconds": 600,
            "tool_secret": SECRET,
        });
        let change = create(&db, body.clone());
        let rows = testdb::query(&db, &select_by_id("sales"));
        assert_eq!(from_row(&rows[0]).unwrap(), change.agent);
        let record = load(&db, "sales");
        assert_eq!(record.created_at, NOW);
        assert_eq!(record.updated_at, NOW);
        assert!(!record.is_default);
        // The API view is the input plus the stored fields.
        let mut expected = body;
        expected.as_object_mut().unwrap().remove("tool_secret");
        expected["is_default"] = json!(false);
        expected["tool_secret_set"] = json!(true);
        expected["record_calls"] = json!(true);
        expected["created_at"] = json!(NOW);
        expected["updated_at"] = json!(NOW);
        assert_eq!(to_json(&record), expected);
        // And the API view parses back to the same agent.
        let again = parse_update(&obj(to_json(&record)), &record).unwrap();
        assert_eq!(again.agent, change.agent);
    }

    #[test]
    fn noise_reduction_defaults_to_near_field_and_takes_the_three_settings() {
        let db = testdb::open();
        // The seeded default agent (migrated) and a new one: near_field.
        assert_eq!(load(&db, "default").agent.noise_reduction, "near_field");
        create(&db, json!({"id": "n", "name": "N", "instructions": "I"}));
        let n = load(&db, "n");
        assert_eq!(n.agent.noise_reduction, "near_field");
        assert_eq!(to_json(&n)["noise_reduction"], "near_field");
        for setting in ["far_field", "off", "near_field"] {
            let change =
                parse_update(&obj(json!({"noise_reduction": setting})), &load(&db, "n")).unwrap();
            assert_eq!(apply_update(&db, &change), 1);
            assert_eq!(load(&db, "n").agent.noise_reduction, setting);
        }
        for bad in [json!("near"), json!(null), json!(1)] {
            assert_eq!(
                field_of(parse_update(&obj(json!({"noise_reduction": bad})), &n)),
                "noise_reduction"
            );
        }
        // A row read without the column (from before it existed): the default.
        let mut row = testdb::query(&db, &select_by_id("n")).remove(0);
        row.as_object_mut().unwrap().remove("noise_reduction");
        assert_eq!(from_row(&row).unwrap().noise_reduction, "near_field");
    }

    #[test]
    fn rows_as_d1_returns_them_map_whole_floats_and_missing_optionals() {
        let mut row = json!({
            "id": "x", "name": "n", "instructions": "i", "greeting": "g", "voice": "ash",
            "model": "gpt-realtime", "language": "ja", "transcription_model": "whisper-1",
            "turn_detection_type": "server_vad", "vad_threshold": 1, "vad_silence_ms": 500.0,
            "vad_prefix_padding_ms": 300, "tools": "[]", "transfer_number": null,
            "max_call_seconds": 1800, "is_default": 0,
        });
        let a = from_row(&row).unwrap();
        assert_eq!(a.turn_detection.threshold, 1.0);
        assert_eq!(a.turn_detection.silence_duration_ms, 500);
        row["tools"] = json!("{not json");
        assert_eq!(from_row(&row).unwrap_err().field, "tools");
        row["tools"] = json!("{}");
        assert_eq!(from_row(&row).unwrap_err().field, "tools");
        row["tools"] = json!("[]");
        row["voice"] = json!("robot");
        assert_eq!(from_row(&row).unwrap_err().field, "voice");
        // record_from_row does not judge, so the admin API can still show the row.
        assert_eq!(record_from_row(&row).unwrap().agent.voice, "robot");
        row["voice"] = json!("ash");
        // A language slip in a stored row is read as meant; a code that means nothing is not.
        for (stored, meant) in [("jp", "ja"), ("ja-JP", "ja"), ("JA", "ja"), ("en-US", "en")] {
            row["language"] = json!(stored);
            assert_eq!(from_row(&row).unwrap().language, meant, "{stored}");
        }
        row["language"] = json!("xx");
        assert_eq!(from_row(&row).unwrap_err().field, "language");
        row["language"] = json!("ja");
        // So is a model with a stray space or capitals.
        for (col, stored, meant) in [
            ("model", "gpt-realtime ", "gpt-realtime"),
            ("model", "GPT-Realtime-Mini", "gpt-realtime-mini"),
            (
                "transcription_model",
                "gpt-4o-transcribe ",
                "gpt-4o-transcribe",
            ),
            ("transcription_model", " Whisper-1", "whisper-1"),
        ] {
            let mut slip = row.clone();
            slip[col] = json!(stored);
            let a = from_row(&slip).unwrap();
            let read = if col == "model" {
                a.model
            } else {
                a.transcription_model
            };
            assert_eq!(read, meant, "{stored:?}");
        }
        // A model the API does not have, or a tool schema it refuses, is an invalid agent (the
        // configured one takes the call), still shown as stored so that it can be fixed.
        let bad_tool = json!([{"type": "function", "name": "lookup", "url": "https://a/b",
                               "parameters": {"properties": {"q": {"type": "string"}}}}]);
        for (col, stored) in [
            ("model", json!("gpt-realtme")),
            ("model", json!("gpt-4o")),
            ("transcription_model", json!("gpt-4o-transcibe")),
            ("tools", json!(bad_tool.to_string())),
        ] {
            let mut bad = row.clone();
            bad[col] = stored.clone();
            assert_eq!(from_row(&bad).unwrap_err().field, col, "{stored}");
            let View::Agent(shown) = view(&bad) else {
                panic!("{col} {stored}: not shown");
            };
            let shown = if col == "tools" {
                json!(shown[col].to_string())
            } else {
                shown[col].clone()
            };
            assert_eq!(shown, stored);
        }
        row.as_object_mut().unwrap().remove("name");
        assert_eq!(from_row(&row).unwrap_err().field, "name");
    }

    #[test]
    fn select_for_number_prefers_the_assigned_agent_then_the_default() {
        let db = testdb::open();
        create(
            &db,
            json!({"id": "sales", "name": "Sales", "instructions": "Sell."}),
        );
        testdb::execute(&db, &assign_number("+81312345678", "sales", NOW)).unwrap();
        let pick = |n: &str| {
            let rows = testdb::query(&db, &select_for_number(n));
            assert_eq!(rows.len(), 1, "{n}");
            from_row(&rows[0]).unwrap().id
        };
        assert_eq!(pick("+81312345678"), "sales");
        assert_eq!(pick("+81399999999"), "default");
        assert_eq!(pick("'; DROP TABLE agents; --"), "default");
        // With no default and no assignment there is no row.
        testdb::execute(
            &db,
            &Statement::new("UPDATE agents SET is_default = 0", vec![]),
        )
        .unwrap();
        assert!(testdb::query(&db, &select_for_number("+81399999999")).is_empty());
        assert_eq!(pick("+81312345678"), "sales");
    }

    #[test]
    fn validation_errors_name_the_field() {
        let base = json!({"name": "A", "instructions": "I"});
        let with = |k: &str, v: Value| {
            let mut b = base.clone();
            b[k] = v;
            field_of(parse_create(&obj(b), "agt_1"))
        };
        assert_eq!(with("voice", json!("nova")), "voice");
        assert_eq!(with("voice", json!(3)), "voice");
        assert_eq!(with("colour", json!("red")), "colour");
        assert_eq!(with("tools", json!({"type": "function"})), "tools");
        assert_eq!(with("tools", json!("[]")), "tools");
        assert_eq!(with("tools", json!([{"type": "function"}])), "tools");
        assert_eq!(with("tools", json!([tool("a"), tool("a")])), "tools");
        assert_eq!(
            with("transfer_number", json!("03-1234-5678")),
            "transfer_number"
        );
        assert_eq!(
            with("transfer_number", json!(81312345678u64)),
            "transfer_number"
        );
        assert_eq!(with("max_call_seconds", json!(10)), "max_call_seconds");
        assert_eq!(with("max_call_seconds", json!(-1)), "max_call_seconds");
        assert_eq!(with("max_call_seconds", json!(60.5)), "max_call_seconds");
        assert_eq!(with("language", json!("japanese")), "language");
        assert_eq!(with("model", json!("gpt-realtme")), "model");
        assert_eq!(with("model", json!("gpt-realtime ")), "model");
        assert_eq!(with("model", json!("gpt-4o-transcribe")), "model");
        assert_eq!(with("model", json!(5)), "model");
        assert_eq!(
            with("transcription_model", json!("gpt-4o-transcribe ")),
            "transcription_model"
        );
        assert_eq!(
            with("transcription_model", json!("gpt-realtime")),
            "transcription_model"
        );
        let mut not_an_object = tool("a");
        not_an_object["parameters"] = json!({"type": "string"});
        assert_eq!(with("tools", json!([not_an_object])), "tools");
        let mut required_not_names = tool("a");
        required_not_names["parameters"]["required"] = json!([1]);
        assert_eq!(with("tools", json!([required_not_names])), "tools");
        assert_eq!(with("is_default", json!(1)), "is_default");
        assert_eq!(with("record_calls", json!(0)), "record_calls");
        assert_eq!(with("id", json!("has space")), "id");
        assert_eq!(
            with("turn_detection", json!("server_vad")),
            "turn_detection"
        );
        assert_eq!(
            with("turn_detection", json!({"type": "push_to_talk"})),
            "turn_detection.type"
        );
        assert_eq!(
            with("turn_detection", json!({"threshold": 1.5})),
            "turn_detection.threshold"
        );
        assert_eq!(
            with("turn_detection", json!({"silence_duration_ms": 20000})),
            "turn_detection.silence_duration_ms"
        );
        assert_eq!(
            with("turn_detection", json!({"prefix_padding_ms": "300"})),
            "turn_detection.prefix_padding_ms"
        );
        assert_eq!(
            with("turn_detection", json!({"eagerness": "high"})),
            "turn_detection.eagerness"
        );
        assert_eq!(
            field_of(parse_create(&obj(json!({"name": "A"})), "x")),
            "instructions"
        );
        assert_eq!(
            field_of(parse_create(&obj(json!({"instructions": "I"})), "x")),
            "name"
        );
        assert_eq!(
            field_of(parse_create(
                &obj(json!({"name": " ", "instructions": "I"})),
                "x"
            )),
            "name"
        );
    }

    #[test]
    fn create_fills_defaults_and_generates_the_id() {
        let c = parse_create(&obj(json!({"name": "A", "instructions": "I"})), "agt_00ff").unwrap();
        assert_eq!(c.agent.id, "agt_00ff");
        assert_eq!(c.agent.voice, config::DEFAULT_VOICE);
        assert_eq!(c.agent.greeting, config::DEFAULT_GREETING);
        assert_eq!(c.agent.language, "ja");
        assert!(!c.is_default);
        assert_eq!(
            new_id([0, 1, 2, 3, 0xaa, 0xbb, 0xcc, 0xff]),
            "agt_00010203aabbccff"
        );
        assert!(is_valid_id(&new_id([9; 8])));
    }

    #[test]
    fn update_is_partial_and_keeps_created_at() {
        let db = testdb::open();
        create(
            &db,
            json!({"id": "a1", "name": "A", "instructions": "I", "transfer_number": "+15551234567",
                   "turn_detection": {"threshold": 0.6}}),
        );
        let before = load(&db, "a1");
        let change = parse_update(
            &obj(
                json!({"voice": "sage", "turn_detection": {"silence_duration_ms": 900},
                        "transfer_number": null}),
            ),
            &before,
        )
        .unwrap();
        testdb::batch(&db, &update(&change, LATER)).unwrap();
        let after = load(&db, "a1");
        assert_eq!(after.agent.voice, "sage");
        assert_eq!(after.agent.name, "A");
        assert_eq!(after.agent.turn_detection.threshold, 0.6);
        assert_eq!(after.agent.turn_detection.silence_duration_ms, 900);
        assert_eq!(after.agent.transfer_number, None);
        assert_eq!(after.created_at, NOW);
        assert_eq!(after.updated_at, LATER);
        assert_eq!(
            field_of(parse_update(&obj(json!({"id": "other"})), &after)),
            "id"
        );
        assert_eq!(
            field_of(parse_update(&obj(json!({"voice": "nova"})), &after)),
            "voice"
        );
    }

    #[test]
    fn recording_can_be_turned_off_and_on_per_agent() {
        let db = testdb::open();
        assert!(load(&db, "default").agent.record_calls, "on by default");
        let change = create(
            &db,
            json!({"id": "quiet", "name": "Q", "instructions": "I", "record_calls": false}),
        );
        assert!(!change.agent.record_calls);
        let quiet = load(&db, "quiet");
        assert!(!quiet.agent.record_calls);
        assert_eq!(to_json(&quiet)["record_calls"], false);
        let rows = testdb::query(&db, &select_for_number("+81399999999"));
        assert!(from_row(&rows[0]).unwrap().record_calls);
        let on = parse_update(&obj(json!({"record_calls": true})), &quiet).unwrap();
        testdb::batch(&db, &update(&on, LATER)).unwrap();
        assert!(load(&db, "quiet").agent.record_calls);
        // A row written before the column existed records.
        let mut row = testdb::query(&db, &select_by_id("quiet")).remove(0);
        row.as_object_mut().unwrap().remove("record_calls");
        assert!(from_row(&row).unwrap().record_calls);
    }

    #[test]
    fn making_an_agent_default_clears_the_others_in_the_same_batch() {
        let db = testdb::open();
        create(
            &db,
            json!({"id": "b", "name": "B", "instructions": "I", "is_default": true}),
        );
        assert!(load(&db, "b").is_default);
        let old = load(&db, "default");
        assert!(!old.is_default);
        assert_eq!(old.updated_at, NOW);
        // And back, through an update.
        let change = parse_update(&obj(json!({"is_default": true})), &old).unwrap();
        testdb::batch(&db, &update(&change, LATER)).unwrap();
        assert!(load(&db, "default").is_default);
        assert!(!load(&db, "b").is_default);
        // Unsetting the default is a conflict, not a field error.
        let current = load(&db, "default");
        assert!(matches!(
            parse_update(&obj(json!({"is_default": false})), &current),
            Err(Refusal::Conflict(_))
        ));
        // Setting it again on the default is a no-op, not a unique-index violation.
        let same = parse_update(&obj(json!({"is_default": true})), &current).unwrap();
        testdb::batch(&db, &update(&same, LATER)).unwrap();
        let defaults = testdb::query(
            &db,
            &Statement::new("SELECT id FROM agents WHERE is_default = 1", vec![]),
        );
        assert_eq!(defaults, vec![json!({"id": "default"})]);
    }

    #[test]
    fn deleting_is_refused_for_the_default_and_for_agents_with_numbers() {
        let db = testdb::open();
        create(&db, json!({"id": "s", "name": "S", "instructions": "I"}));
        testdb::execute(&db, &assign_number("+81312345678", "s", NOW)).unwrap();
        let numbers: Vec<String> = testdb::query(&db, &select_numbers_of("s"))
            .iter()
            .map(|r| r["number"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(numbers, ["+81312345678"]);
        let s = load(&db, "s");
        match deletion_conflict(&s, &numbers) {
            Some(Refusal::Conflict(m)) => assert!(m.contains("+81312345678"), "{m}"),
            other => panic!("{other:?}"),
        }
        // The statement refuses too, whatever the caller checked.
        assert_eq!(testdb::execute(&db, &delete("s")).unwrap(), 0);
        let default = load(&db, "default");
        assert!(deletion_conflict(&default, &[]).is_some());
        assert_eq!(testdb::execute(&db, &delete("default")).unwrap(), 0);

        testdb::execute(&db, &unassign_number("+81312345678")).unwrap();
        assert!(deletion_conflict(&s, &[]).is_none());
        assert_eq!(testdb::execute(&db, &delete("s")).unwrap(), 1);
        assert!(testdb::query(&db, &select_by_id("s")).is_empty());
    }

    #[test]
    fn numbers_assign_reassign_list_and_unassign() {
        let db = testdb::open();
        create(
            &db,
            json!({"id": "s", "name": "Sales", "instructions": "I"}),
        );
        testdb::execute(&db, &assign_number("+81312345678", "default", NOW)).unwrap();
        testdb::execute(&db, &assign_number("+15551234567", "s", NOW)).unwrap();
        // Moved to another agent: assigned now. Assigned again to the same one: unchanged.
        testdb::execute(&db, &assign_number("+81312345678", "s", LATER)).unwrap();
        testdb::execute(&db, &assign_number("+15551234567", "s", LATER)).unwrap();
        assert_eq!(
            testdb::query(&db, &select_numbers()),
            vec![
                json!({"number": "+15551234567", "agent_id": "s", "agent_name": "Sales", "created_at": NOW}),
                json!({"number": "+81312345678", "agent_id": "s", "agent_name": "Sales", "created_at": LATER}),
            ]
        );
        assert_eq!(testdb::query(&db, &select_number("+15551234567")).len(), 1);
        // The schema's foreign key refuses an unknown agent (the API checks first, for a 400).
        assert!(testdb::execute(&db, &assign_number("+15550000000", "nobody", NOW)).is_err());
        assert_eq!(
            testdb::execute(&db, &unassign_number("+15551234567")).unwrap(),
            1
        );
        assert_eq!(
            testdb::execute(&db, &unassign_number("+15551234567")).unwrap(),
            0
        );
    }

    #[test]
    fn assignment_body_and_number_checks() {
        assert_eq!(
            parse_assignment(&obj(json!({"agent_id": "sales"}))),
            Ok("sales".into())
        );
        let field = |b: Value| match parse_assignment(&obj(b)) {
            Err(Refusal::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(json!({})), "agent_id");
        assert_eq!(field(json!({"agent_id": 5})), "agent_id");
        assert_eq!(field(json!({"agent_id": "a/b"})), "agent_id");
        assert_eq!(field(json!({"agent_id": "a", "note": "x"})), "note");
        for assigning in [false, true] {
            assert!(check_number("+81312345678", assigning).is_ok());
            assert!(check_number("81312345678", assigning).is_err());
            assert!(check_number(" 81312345678", assigning).is_err());
        }
        // A +81 number with its domestic 0 can be read and unassigned, not assigned.
        assert!(check_number("+810312345678", false).is_ok());
        let Err(Refusal::Invalid { message, .. }) = check_number("+810312345678", true) else {
            panic!("assigned");
        };
        assert!(message.contains("+81312345678"), "{message}");
    }

    fn refusal_of(r: Result<Change, Refusal>) -> (String, String) {
        match r {
            Err(Refusal::Invalid { field, message }) => (field, message),
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    /// Runs an update; the rows the agent's own statement changed (0: gone or refused).
    fn apply_update(db: &rusqlite::Connection, change: &Change) -> u64 {
        *testdb::batch_changes(db, &update(change, LATER))
            .unwrap()
            .last()
            .unwrap()
    }

    fn defaults(db: &rusqlite::Connection) -> Vec<Value> {
        testdb::query(
            db,
            &Statement::new("SELECT id FROM agents WHERE is_default = 1", vec![]),
        )
    }

    #[test]
    fn a_japanese_language_slip_is_refused_with_a_suggestion() {
        let (field, message) = refusal_of(parse_create(
            &obj(json!({"name": "A", "instructions": "I", "language": "jp"})),
            "x",
        ));
        assert_eq!(field, "language");
        assert!(message.contains("\"ja\""), "{message}");
        let (field, _) = refusal_of(parse_create(
            &obj(json!({"name": "A", "instructions": "I", "language": "xx"})),
            "x",
        ));
        assert_eq!(field, "language");
        let ok = parse_create(
            &obj(
                json!({"name": "A", "instructions": "I", "language": "ko", "model": "gpt-realtime-next"}),
            ),
            "x",
        );
        assert!(ok.is_ok(), "{ok:?}");
        assert_eq!(
            field_of(parse_create(
                &obj(json!({"name": "A", "instructions": "I", "model": ""})),
                "x"
            )),
            "model"
        );
    }

    #[test]
    fn a_model_slip_is_refused_with_a_suggestion_and_a_stored_bad_model_can_be_fixed() {
        let (field, message) = refusal_of(parse_create(
            &obj(json!({"name": "A", "instructions": "I",
                        "transcription_model": "gpt-4o-transcribe "})),
            "x",
        ));
        assert_eq!(field, "transcription_model");
        assert!(
            message.contains("did you mean \"gpt-4o-transcribe\""),
            "{message}"
        );
        let (field, message) = refusal_of(parse_create(
            &obj(json!({"name": "A", "instructions": "I", "model": "gpt-realtme"})),
            "x",
        ));
        assert_eq!(field, "model");
        assert!(message.contains("\"realtime\""), "{message}");
        let ok = parse_create(
            &obj(
                json!({"name": "A", "instructions": "I", "model": "gpt-realtime-mini",
                        "transcription_model": "gpt-4o-mini-transcribe"}),
            ),
            "x",
        );
        assert!(ok.is_ok(), "{ok:?}");

        // A row stored with a bad model: a PUT of another field names it, one giving a
        // model repairs the row.
        let db = testdb::open();
        create(&db, json!({"id": "typo", "name": "T", "instructions": "I"}));
        testdb::execute(
            &db,
            &Statement::new(
                "UPDATE agents SET model = 'gpt-realtme' WHERE id = 'typo'",
                vec![],
            ),
        )
        .unwrap();
        let current = load(&db, "typo");
        assert_eq!(current.agent.model, "gpt-realtme");
        let body = obj(json!({"voice": "sage"}));
        assert_eq!(field_of(parse_update(&body, &current)), "model");
        let body = obj(json!({"model": "gpt-realtime"}));
        let change = parse_update(&body, &current).unwrap();
        assert_eq!(apply_update(&db, &change), 1);
        let row = testdb::query(&db, &select_by_id("typo")).remove(0);
        assert_eq!(from_row(&row).unwrap().model, "gpt-realtime");
    }

    #[test]
    fn tool_secret_counts_characters_and_is_not_blank() {
        let with = |secret: &str| {
            parse_create(
                &obj(json!({"name": "A", "instructions": "I", "tool_secret": secret})),
                "x",
            )
        };
        // Eight kanji are 24 bytes but 8 characters.
        assert_eq!(field_of(with("秘密秘密秘密秘密")), "tool_secret");
        assert_eq!(field_of(with(&" ".repeat(16))), "tool_secret");
        assert_eq!(field_of(with(&"\u{3000}".repeat(20))), "tool_secret");
        assert_eq!(field_of(with("fifteen-chars-x")), "tool_secret");
        assert!(with("秘密秘密秘密秘密秘密秘密秘密秘密").is_ok());
        assert!(with("sixteen-chars-xx").is_ok());
    }

    #[test]
    fn a_webhook_tool_needs_a_tool_secret_on_create_and_on_update() {
        let db = testdb::open();
        let body =
            json!({"id": "hook", "name": "H", "instructions": "I", "tools": [tool("lookup")]});
        let (field, message) = refusal_of(parse_create(&obj(body.clone()), "x"));
        assert_eq!(field, "tool_secret");
        assert!(message.contains("signed"), "{message}");
        // The built-ins are not webhooks: no secret needed.
        assert!(parse_create(
            &obj(json!({"name": "E", "instructions": "I", "tools": [{"type": "end_call"}]})),
            "x"
        )
        .is_ok());
        let mut with_secret = body.clone();
        with_secret["tool_secret"] = json!(SECRET);
        create(&db, with_secret);
        // Removing the secret while the webhook stays is refused.
        let current = load(&db, "hook");
        assert_eq!(
            field_of(parse_update(&obj(json!({"tool_secret": null})), &current)),
            "tool_secret"
        );
        // Removing both at once is fine.
        assert!(parse_update(&obj(json!({"tool_secret": null, "tools": []})), &current).is_ok());

        // A row stored before the rule still loads and answers calls...
        testdb::execute(
            &db,
            &Statement::new(
                "UPDATE agents SET tool_secret = NULL WHERE id = 'hook'",
                vec![],
            ),
        )
        .unwrap();
        let rows = testdb::query(&db, &select_by_id("hook"));
        assert!(from_row(&rows[0]).is_ok());
        let stored = record_from_row(&rows[0]).unwrap();
        // ...but an update that leaves it without a secret is refused, naming the secret.
        assert_eq!(
            field_of(parse_update(&obj(json!({"voice": "sage"})), &stored)),
            "tool_secret"
        );
        assert!(parse_update(&obj(json!({"tool_secret": SECRET})), &stored).is_ok());
    }

    #[test]
    fn updates_of_different_fields_from_the_same_read_both_stick() {
        let db = testdb::open();
        create(
            &db,
            json!({"id": "a", "name": "A", "instructions": "Old.", "voice": "ash",
                   "turn_detection": {"threshold": 0.6}}),
        );
        let stale = load(&db, "a");
        let voice = parse_update(&obj(json!({"voice": "sage"})), &stale).unwrap();
        let instructions = parse_update(&obj(json!({"instructions": "New."})), &stale).unwrap();
        let silence = parse_update(
            &obj(json!({"turn_detection": {"silence_duration_ms": 900}})),
            &stale,
        )
        .unwrap();
        let threshold =
            parse_update(&obj(json!({"turn_detection": {"threshold": 0.8}})), &stale).unwrap();
        for change in [&voice, &instructions, &silence, &threshold] {
            assert_eq!(apply_update(&db, change), 1);
        }
        let after = load(&db, "a");
        assert_eq!(after.agent.voice, "sage");
        assert_eq!(after.agent.instructions, "New.");
        assert_eq!(after.agent.turn_detection.silence_duration_ms, 900);
        assert_eq!(after.agent.turn_detection.threshold, 0.8);
        assert_eq!(after.agent.name, "A");
        assert_eq!(after.updated_at, LATER);
        // Each writes its own columns and no others.
        assert_eq!(
            update(&voice, LATER).last().unwrap().sql,
            "UPDATE agents SET voice = ?3, updated_at = ?2 WHERE agents.id = ?1"
        );
        assert_eq!(
            update(&silence, LATER).last().unwrap().sql,
            "UPDATE agents SET vad_silence_ms = ?3, updated_at = ?2 WHERE agents.id = ?1"
        );
        // A gone agent is not written (the shell then answers 404).
        testdb::execute(&db, &delete("a")).unwrap();
        assert_eq!(apply_update(&db, &voice), 0);
    }

    #[test]
    fn an_update_whose_checks_relied_on_a_field_changed_meanwhile_changes_nothing() {
        let db = testdb::open();
        let secret_no_tools = |id: &str| {
            create(
                &db,
                json!({"id": id, "name": id, "instructions": "I", "tool_secret": SECRET}),
            )
        };
        let add_hook = json!({"tools": [tool("lookup")]});
        let drop_secret = json!({"tool_secret": null});

        // The secret is dropped first: adding a webhook (checked against a read that had
        // the secret) must not go through.
        secret_no_tools("s1");
        let stale = load(&db, "s1");
        let hook = parse_update(&obj(add_hook.clone()), &stale).unwrap();
        let unset = parse_update(&obj(drop_secret.clone()), &stale).unwrap();
        assert_eq!(apply_update(&db, &unset), 1);
        assert_eq!(apply_update(&db, &hook), 0);
        let s1 = load(&db, "s1");
        assert!(s1.agent.tools.is_empty() && s1.agent.tool_secret.is_none());
        // Read again, the refusal names the field.
        assert_eq!(
            field_of(parse_update(&obj(add_hook.clone()), &s1)),
            "tool_secret"
        );

        // The webhook comes first: dropping the secret must not go through.
        secret_no_tools("s2");
        let stale = load(&db, "s2");
        let hook = parse_update(&obj(add_hook.clone()), &stale).unwrap();
        let unset = parse_update(&obj(drop_secret), &stale).unwrap();
        assert_eq!(apply_update(&db, &hook), 1);
        assert_eq!(apply_update(&db, &unset), 0);
        let s2 = load(&db, "s2");
        assert_eq!(s2.agent.tools.len(), 1);
        assert!(s2.agent.tool_secret.is_some());

        // `is_default: false` read on a non-default agent that became the default meanwhile.
        create(&db, json!({"id": "d", "name": "D", "instructions": "I"}));
        let stale = load(&db, "d");
        let not_default = parse_update(&obj(json!({"is_default": false})), &stale).unwrap();
        let make_default = parse_update(&obj(json!({"is_default": true})), &stale).unwrap();
        assert_eq!(apply_update(&db, &make_default), 1);
        assert_eq!(apply_update(&db, &not_default), 0);
        assert_eq!(defaults(&db), vec![json!({"id": "d"})]);

        // A refused update that would make its agent the default leaves the old default.
        secret_no_tools("s3");
        let stale = load(&db, "s3");
        let hook_default = parse_update(
            &obj(json!({"tools": [tool("lookup")], "is_default": true})),
            &stale,
        )
        .unwrap();
        let unset = parse_update(&obj(json!({"tool_secret": null})), &stale).unwrap();
        assert_eq!(apply_update(&db, &unset), 1);
        assert_eq!(apply_update(&db, &hook_default), 0);
        assert_eq!(defaults(&db), vec![json!({"id": "d"})]);
    }

    #[test]
    fn a_transfer_that_could_never_happen_is_refused_on_write_but_a_stored_one_still_reads() {
        let db = testdb::open();
        let transfer = json!([{"type": "transfer_call"}]);
        // The domestic 0 kept after +81 (03-1234-5678 as +810312345678): Twilio cannot dial it.
        let r = parse_create(
            &obj(json!({"name": "A", "instructions": "I",
                                          "transfer_number": "+810312345678"})),
            "agt_1",
        );
        let Err(Refusal::Invalid { field, message }) = r else {
            panic!("created");
        };
        assert_eq!(field, "transfer_number");
        assert!(message.contains("+81312345678"), "{message}");
        // A transfer_call tool with no number to transfer to.
        assert_eq!(
            field_of(parse_create(
                &obj(json!({"name": "A", "instructions": "I",
                                                "tools": transfer})),
                "agt_1"
            )),
            "transfer_number"
        );
        create(
            &db,
            json!({"id": "t", "name": "T", "instructions": "I", "tools": transfer,
                   "transfer_number": "+81312345678"}),
        );
        let t = load(&db, "t");
        for body in [
            json!({"transfer_number": null}),
            json!({"transfer_number": " "}),
        ] {
            assert_eq!(field_of(parse_update(&obj(body), &t)), "transfer_number");
        }
        // Both at once, or the tool first, is fine; an emptied field is no number.
        let both = parse_update(&obj(json!({"tools": [], "transfer_number": ""})), &t).unwrap();
        assert_eq!(both.agent.transfer_number, None);
        // Raced: the number removed (with the tool) meanwhile, adding the tool back, checked
        // against a read that had the number, does not go through.
        let stale = load(&db, "t");
        let drop =
            parse_update(&obj(json!({"tools": [], "transfer_number": null})), &stale).unwrap();
        let readd = parse_update(&obj(json!({"tools": transfer})), &stale).unwrap();
        assert_eq!(apply_update(&db, &drop), 1);
        assert_eq!(apply_update(&db, &readd), 0);
        let after = load(&db, "t");
        assert!(after.agent.tools.is_empty() && after.agent.transfer_number.is_none());
        // And the other way: the tool added back meanwhile, the number's removal does not go.
        apply_update(
            &db,
            &parse_update(
                &obj(json!({"tools": transfer, "transfer_number": "+81312345678"})),
                &after,
            )
            .unwrap(),
        );
        let stale = load(&db, "t");
        let tool_again = parse_update(&obj(json!({"tools": transfer})), &stale).unwrap();
        apply_update(
            &db,
            &parse_update(&obj(json!({"tools": []})), &stale).unwrap(),
        );
        let no_number =
            parse_update(&obj(json!({"transfer_number": null})), &load(&db, "t")).unwrap();
        assert_eq!(apply_update(&db, &tool_again), 1);
        assert_eq!(apply_update(&db, &no_number), 0);
        assert_eq!(
            load(&db, "t").agent.transfer_number.as_deref(),
            Some("+81312345678")
        );
        // A row stored that way (before the check, or by hand) still answers its calls.
        testdb::execute(
            &db,
            &Statement::new(
                "UPDATE agents SET transfer_number = '+810312345678' WHERE id = 't'",
                vec![],
            ),
        )
        .unwrap();
        let row = testdb::query(&db, &select_all())
            .into_iter()
            .find(|r| r["id"] == "t")
            .unwrap();
        assert_eq!(
            from_row(&row).unwrap().transfer_number.as_deref(),
            Some("+810312345678")
        );
    }

    #[test]
    fn an_unreadable_row_is_listed_as_such_and_can_be_fixed_or_deleted() {
        let db = testdb::open();
        create(&db, json!({"id": "good", "name": "G", "instructions": "I"}));
        for id in ["bad-tools", "bad-threshold"] {
            create(&db, json!({"id": id, "name": "B", "instructions": "I"}));
        }
        let set = |sql: &str| {
            testdb::execute(&db, &Statement::new(sql, vec![])).unwrap();
        };
        set("UPDATE agents SET tools = '' WHERE id = 'bad-tools'");
        set("UPDATE agents SET vad_threshold = 'loud' WHERE id = 'bad-threshold'");
        let rows = testdb::query(&db, &select_all());
        let (list, bad) = list_json(&rows);
        let list = list["agents"].as_array().unwrap();
        assert_eq!(list.len(), 4, "{list:?}");
        let entry = |id: &str| list.iter().find(|a| a["id"] == id).unwrap().clone();
        assert_eq!(entry("good")["voice"], "marin");
        assert_eq!(entry("default")["is_default"], true);
        assert_eq!(entry("bad-tools")["unreadable"]["field"], "tools");
        assert_eq!(entry("bad-tools")["name"], "B");
        assert_eq!(
            entry("bad-threshold")["unreadable"]["field"],
            "turn_detection.threshold"
        );
        let bad_ids: Vec<_> = bad.iter().map(|(id, _)| id.clone().unwrap()).collect();
        assert_eq!(bad_ids.len(), 2);
        assert!(bad_ids.contains(&"bad-tools".to_owned()));

        // A PUT that does not give the unreadable field is refused, naming it...
        let row = testdb::query(&db, &select_by_id("bad-tools")).remove(0);
        match record_for_update(&row, &obj(json!({"voice": "sage"}))) {
            Err(Refusal::Invalid { field, message }) => {
                assert_eq!(field, "tools");
                assert!(message.contains("cannot be read"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        // ...one that gives it repairs the row.
        let body = obj(json!({"tools": [{"type": "end_call"}]}));
        let current = record_for_update(&row, &body).unwrap();
        let change = parse_update(&body, &current).unwrap();
        assert_eq!(apply_update(&db, &change), 1);
        let fixed = testdb::query(&db, &select_by_id("bad-tools")).remove(0);
        assert_eq!(
            from_row(&fixed).unwrap().tools,
            vec![json!({"type": "end_call"})]
        );
        assert!(matches!(view(&fixed), View::Agent(_)));

        let row = testdb::query(&db, &select_by_id("bad-threshold")).remove(0);
        let body = obj(json!({"turn_detection": {"threshold": 0.4}}));
        let change = parse_update(&body, &record_for_update(&row, &body).unwrap()).unwrap();
        assert_eq!(apply_update(&db, &change), 1);
        let fixed = testdb::query(&db, &select_by_id("bad-threshold")).remove(0);
        assert_eq!(from_row(&fixed).unwrap().turn_detection.threshold, 0.4);

        // An unreadable row can be deleted too.
        set("UPDATE agents SET tools = '' WHERE id = 'bad-tools'");
        let row = testdb::query(&db, &select_by_id("bad-tools")).remove(0);
        let record = record_for_delete(&row).unwrap();
        assert!(deletion_conflict(&record, &[]).is_none());
        assert_eq!(testdb::execute(&db, &delete("bad-tools")).unwrap(), 1);
    }

    #[test]
    fn a_second_insert_of_the_same_id_fails_on_the_unique_key() {
        // What the shell maps to 409 when two creates race past the existence check.
        let db = testdb::open();
        let change = create(
            &db,
            json!({"id": "twice", "name": "T", "instructions": "I"}),
        );
        let e = testdb::batch(&db, &insert(&change, LATER)).unwrap_err();
        let answer = crate::admin::create_failure(&e.to_string(), || "exists".into());
        assert_eq!(answer.status(), 409, "{e}");
    }
}
