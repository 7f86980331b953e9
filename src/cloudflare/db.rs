//! Runs the core's [`Statement`]s on D1. Parameters are JSON scalars; this is the one place
//! they become JavaScript values.

use crate::store::Statement;
use serde_json::Value;
use worker::wasm_bindgen::JsValue;
use worker::{D1Database, D1PreparedStatement, Env, Result};

pub fn database(env: &Env) -> Result<D1Database> {
    env.d1("DB")
}

fn js(v: &Value) -> JsValue {
    match v {
        Value::Null => JsValue::NULL,
        Value::Bool(b) => JsValue::from_f64(if *b { 1.0 } else { 0.0 }),
        Value::Number(n) => JsValue::from_f64(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => JsValue::from_str(s),
        // Arrays and objects are stored as JSON text.
        other => JsValue::from_str(&other.to_string()),
    }
}

fn prepare(db: &D1Database, st: &Statement) -> Result<D1PreparedStatement> {
    let params: Vec<JsValue> = st.params.iter().map(js).collect();
    db.prepare(st.sql.as_str()).bind(&params)
}

/// Runs one statement that returns rows, as JSON objects keyed by column.
pub async fn query(db: &D1Database, st: &Statement) -> Result<Vec<Value>> {
    prepare(db, st)?.all().await?.results::<Value>()
}

/// Runs one statement for its effect; returns the number of rows changed.
pub async fn execute(db: &D1Database, st: &Statement) -> Result<u64> {
    let result = prepare(db, st)?.run().await?;
    if let Some(e) = result.error() {
        return Err(worker::Error::RustError(e));
    }
    Ok(result
        .meta()?
        .and_then(|m| m.changes)
        .map(|c| c as u64)
        .unwrap_or(0))
}

/// Runs statements atomically (D1 batches are one transaction).
pub async fn batch(db: &D1Database, statements: &[Statement]) -> Result<()> {
    batch_changes(db, statements).await.map(|_| ())
}

/// Runs statements atomically; returns the number of rows each changed.
pub async fn batch_changes(db: &D1Database, statements: &[Statement]) -> Result<Vec<u64>> {
    let prepared = statements
        .iter()
        .map(|st| prepare(db, st))
        .collect::<Result<Vec<_>>>()?;
    let mut changes = Vec::with_capacity(statements.len());
    for r in db.batch(prepared).await? {
        if let Some(e) = r.error() {
            return Err(worker::Error::RustError(e));
        }
        changes.push(
            r.meta()?
                .and_then(|m| m.changes)
                .map(|c| c as u64)
                .unwrap_or(0),
        );
    }
    Ok(changes)
}
