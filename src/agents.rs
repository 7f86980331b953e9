//! Agents as D1 keeps them and as the admin API shows them: the mapping between `agents`
//! rows and [`config::Agent`], the statements that read and change `agents` and
//! `phone_numbers`, and the parsing of API input into a validated agent.
//!
//! Rows are JSON objects keyed by column, exactly as D1 returns them (`tools` is JSON text,
//! `is_default` is 0/1). Validation of the agent itself is [`Agent::validate`]; this module
//! only checks shapes and types, so each rule lives in one place.

use crate::config::{self, Agent, ConfigError, TurnDetection};
use crate::store::Statement;
use serde_json::{json, Map, Value};

/// The `agents` columns, in the order the statements here select them.
pub const COLUMNS: [&str; 20] = [
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
    let tools = match column(row, "tools")? {
        Value::String(s) => serde_json::from_str::<Value>(s).map_err(|e| ConfigError {
            field: "tools",
            reason: format!("not JSON: {e}"),
        })?,
        other => other.clone(),
    };
    let Value::Array(tools) = tools else {
        return Err(ConfigError {
            field: "tools",
            reason: "not a JSON array".into(),
        });
    };
    let threshold = column(row, "vad_threshold")?;
    let threshold = threshold.as_f64().ok_or_else(|| ConfigError {
        field: "vad_threshold",
        reason: format!("expected a number, got {threshold}"),
    })?;
    let transfer_number = match row.get("transfer_number") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => {
            return Err(ConfigError {
                field: "transfer_number",
                reason: format!("expected text, got {other}"),
            })
        }
    };
    let is_default = match column(row, "is_default")? {
        Value::Bool(b) => *b,
        v => v.as_f64().is_some_and(|n| n != 0.0),
    };
    // A row from before the column existed records, like the column's default.
    let record_calls = match row.get("record_calls") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(v) => v.as_f64().is_some_and(|n| n != 0.0),
    };
    let agent = Agent {
        id: text(row, "id")?,
        name: text(row, "name")?,
        instructions: text(row, "instructions")?,
        greeting: text(row, "greeting")?,
        voice: text(row, "voice")?,
        model: text(row, "model")?,
        language: text(row, "language")?,
        transcription_model: text(row, "transcription_model")?,
        turn_detection: TurnDetection {
            kind: text(row, "turn_detection_type")?,
            threshold,
            prefix_padding_ms: whole(row, "vad_prefix_padding_ms")?,
            silence_duration_ms: whole(row, "vad_silence_ms")?,
        },
        tools,
        transfer_number,
        max_call_seconds: whole(row, "max_call_seconds")?,
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

/// The agent of one `agents` row, validated: what a call may be run with. An error names the
/// column (for a malformed row) or the agent field (for a value the Realtime API would refuse).
pub fn from_row(row: &Value) -> Result<Agent, ConfigError> {
    let agent = record_from_row(row)?.agent;
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

/// Applies every field of `body` to `change`; `id` is handled by the callers.
fn apply(body: &Map<String, Value>, change: &mut Change) -> Result<(), Refusal> {
    let a = &mut change.agent;
    for (key, v) in body {
        let field = key.as_str();
        match field {
            "id" => {}
            // Read-only: accepted and ignored so that a GET body can be edited and PUT back.
            "created_at" | "updated_at" => {}
            "name" => a.name = string(field, v)?,
            "instructions" => a.instructions = string(field, v)?,
            "greeting" => a.greeting = string(field, v)?,
            "voice" => a.voice = string(field, v)?,
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
                    Value::String(s) => Some(s.clone()),
                    _ => return Err(invalid(field, "must be an E.164 string or null")),
                }
            }
            "max_call_seconds" => a.max_call_seconds = int_u32(field, v)?,
            "tool_secret" => {
                a.tool_secret = match v {
                    Value::Null => None,
                    Value::String(s) if s.len() >= 16 => Some(config::Secret::new(s.clone())),
                    _ => {
                        return Err(invalid(
                            field,
                            "must be a string of 16 or more characters, or null",
                        ))
                    }
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
    };
    apply(body, &mut change)?;
    change.agent.validate()?;
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
             ?13, ?14, ?15, ?16, ?17, ?17, ?18, ?19)",
            COLUMNS.join(", ")
        ),
        row_params(change, now),
    ));
    out
}

/// Rewrites an existing agent (run as one batch); `created_at` is kept.
pub fn update(change: &Change, now: &str) -> Vec<Statement> {
    let mut out = Vec::new();
    if change.is_default {
        out.push(clear_other_defaults(&change.agent.id, now));
    }
    out.push(Statement::new(
        "UPDATE agents SET name = ?2, instructions = ?3, greeting = ?4, voice = ?5, model = ?6, \
         language = ?7, transcription_model = ?8, turn_detection_type = ?9, vad_threshold = ?10, \
         vad_silence_ms = ?11, vad_prefix_padding_ms = ?12, tools = ?13, transfer_number = ?14, \
         max_call_seconds = ?15, is_default = ?16, updated_at = ?17, tool_secret = ?18, \
         record_calls = ?19 WHERE id = ?1",
        row_params(change, now),
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

/// Assigns `number` to `agent_id`, replacing an earlier assignment (keeps its `created_at`).
pub fn assign_number(number: &str, agent_id: &str, now: &str) -> Statement {
    Statement::new(
        "INSERT INTO phone_numbers (number, agent_id, created_at) VALUES (?1, ?2, ?3) \
         ON CONFLICT (number) DO UPDATE SET agent_id = excluded.agent_id",
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
pub fn check_number(number: &str) -> Result<(), Refusal> {
    if config::is_e164(number) {
        Ok(())
    } else {
        Err(invalid(
            "number",
            format!("{number:?} is not an E.164 number such as +81312345678"),
        ))
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
        let conn = Connection::open_in_memory().expect("open sqlite");
        conn.execute_batch("PRAGMA foreign_keys = ON;").unwrap();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .expect("migrations/")
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "sql"))
            .collect();
        files.sort();
        for f in files {
            let sql = std::fs::read_to_string(&f).unwrap();
            conn.execute_batch(&sql)
                .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        }
        conn
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
        assert!(agent.tools.is_empty());
        let record = record_from_row(&rows[0]).unwrap();
        assert!(record.is_default);
        assert!(record.created_at.ends_with('Z'), "{}", record.created_at);
    }

    #[test]
    fn row_round_trip_through_the_real_schema() {
        let db = testdb::open();
        let body = json!({
            "id": "sales", "name": "Sales", "instructions": "Sell.", "greeting": "Hello",
            "voice": "cedar", "model": "gpt-realtime-mini", "language": "en",
            "transcription_model": "whisper-1",
            "turn_detection": {"type": "semantic_vad", "threshold": 0.7,
                               "silence_duration_ms": 800, "prefix_padding_ms": 200},
            "tools": [tool("lookup_order"), tool("transfer")],
            "transfer_number": "+81312345678", "max_call_seconds": 600,
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
        expected["is_default"] = json!(false);
        expected["tool_secret_set"] = json!(false);
        expected["record_calls"] = json!(true);
        expected["created_at"] = json!(NOW);
        expected["updated_at"] = json!(NOW);
        assert_eq!(to_json(&record), expected);
        // And the API view parses back to the same agent.
        let again = parse_update(&obj(to_json(&record)), &record).unwrap();
        assert_eq!(again.agent, change.agent);
    }

    #[test]
    fn rows_as_d1_returns_them_map_whole_floats_and_missing_optionals() {
        let mut row = json!({
            "id": "x", "name": "n", "instructions": "i", "greeting": "g", "voice": "ash",
            "model": "m", "language": "ja", "transcription_model": "t",
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
        testdb::execute(&db, &assign_number("+81312345678", "s", LATER)).unwrap();
        assert_eq!(
            testdb::query(&db, &select_numbers()),
            vec![
                json!({"number": "+15551234567", "agent_id": "s", "agent_name": "Sales", "created_at": NOW}),
                json!({"number": "+81312345678", "agent_id": "s", "agent_name": "Sales", "created_at": NOW}),
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
        assert!(check_number("+81312345678").is_ok());
        assert!(check_number("81312345678").is_err());
        assert!(check_number(" 81312345678").is_err());
    }
}
