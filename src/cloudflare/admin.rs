//! The admin JSON API's shell: reads the request, runs the statements `crate::admin` and
//! `crate::agents` build on D1, and writes JSON. Every decision is in the core.

use super::db::{batch, batch_changes, database, execute, query};
use super::log;
use crate::admin::{self, CallsQuery, Error, Route};
use crate::agents;
use crate::store::iso_time;
use serde_json::{json, Value};
use worker::{D1Database, Date, Env, Request, Response, ResponseBuilder};

/// What a handled route answers: a status and a JSON body (none for 204).
struct Reply {
    status: u16,
    body: Option<Value>,
}

fn ok(body: Value) -> Reply {
    Reply {
        status: 200,
        body: Some(body),
    }
}

type Outcome = std::result::Result<Reply, Error>;

/// D1, R2 and runtime failures: logged with their message, answered as a 503 to retry when
/// the failure passes (D1 busy or locked, a lost connection) and a plain 500 otherwise.
pub(super) fn failed(what: &'static str) -> impl Fn(worker::Error) -> Error {
    move |e| {
        let message = e.to_string();
        let answer = admin::storage_failure(&message);
        log(
            "error",
            "admin.failed",
            json!({ "during": what, "status": answer.status(), "error": message }),
        );
        answer
    }
}

/// A failure on our side that is not D1's or R2's: logged like theirs, answered 500.
pub(super) fn internal(during: &'static str, error: impl std::fmt::Display) -> Error {
    log(
        "error",
        "admin.failed",
        json!({ "during": during, "status": 500, "error": error.to_string() }),
    );
    Error::Internal
}

/// `ADMIN_TOKEN` from the secrets, or from a plain variable (local `--var`).
fn admin_token(env: &Env) -> String {
    super::setting_text(env, crate::config::ADMIN_TOKEN)
        .map(|t| t.trim().to_owned())
        .unwrap_or_default()
}

fn now() -> String {
    iso_time(Date::now().as_millis())
}

fn respond(
    status: u16,
    body: Option<&Value>,
    extra: &[(&'static str, String)],
) -> worker::Result<Response> {
    let mut builder = ResponseBuilder::new()
        .with_status(status)
        .with_header("Cache-Control", "no-store")?;
    for (k, v) in extra {
        builder = builder.with_header(k, v)?;
    }
    Ok(match body {
        Some(b) => builder
            .with_header("Content-Type", admin::CONTENT_TYPE)?
            .fixed(b.to_string().into_bytes()),
        None => builder.empty(),
    })
}

/// Every request under `/api/admin/`.
pub async fn handle(mut req: Request, env: Env) -> worker::Result<Response> {
    let method = req.inner().method();
    let path = req.path();
    let token = admin_token(&env);
    let header = req.headers().get("Authorization")?;
    let route = admin::route(&method, &path);
    let query = req.url()?.query().unwrap_or("").to_owned();
    let now_ms = Date::now().as_millis();
    if let Err(why) = admin::admit(&route, &query, header.as_deref(), &token, now_ms) {
        log(
            if token.chars().count() < admin::MIN_ADMIN_TOKEN_CHARS {
                "error"
            } else {
                "warn"
            },
            "admin.refused",
            json!({ "method": method, "path": path, "status": 401, "why": why }),
        );
        let e = admin::refused(why);
        return respond(e.status(), Some(&e.body()), &e.headers());
    }
    let outcome = match route {
        // Audio, not JSON: answered by the recordings shell (errors still as JSON below).
        Ok(Route::GetRecording(sid)) => match super::recording::serve(&req, &env, &sid).await {
            Ok(resp) => return Ok(resp),
            Err(e) => Err(e),
        },
        Ok(route) => dispatch(route, &mut req, &env, &token).await,
        Err(e) => Err(e),
    };
    match outcome {
        Ok(reply) => respond(reply.status, reply.body.as_ref(), &[]),
        Err(e) => {
            if e.status() != 500 {
                log(
                    "warn",
                    "admin.refused",
                    json!({ "method": method, "path": path, "status": e.status(), "why": e.to_string() }),
                );
            }
            respond(e.status(), Some(&e.body()), &e.headers())
        }
    }
}

/// The JSON object of the body, read as bytes so that a body in another encoding is
/// refused instead of being stored with replacement characters.
async fn body(req: &mut Request) -> std::result::Result<serde_json::Map<String, Value>, Error> {
    let bytes = req.bytes().await.map_err(failed("read body"))?;
    admin::parse_body(&bytes)
}

async fn dispatch(route: Route, req: &mut Request, env: &Env, token: &str) -> Outcome {
    let db = database(env).map_err(failed("D1 binding"))?;
    match route {
        Route::GetRecording(_) => unreachable!("answered by handle: not JSON"),
        Route::GetRecordingLink(sid) => {
            super::recording::key_of(env, &sid).await?;
            let link = admin::recording_link(&sid, token, Date::now().as_millis());
            Ok(ok(link))
        }
        Route::ListCalls => {
            let raw = req.url().map_err(failed("url"))?;
            let q = CallsQuery::parse(raw.query().unwrap_or(""), token)?;
            let rows = query(&db, &q.statement())
                .await
                .map_err(failed("list calls"))?;
            Ok(ok(q.page(rows, token)))
        }
        Route::GetCall(sid) => {
            let mut call = query(&db, &admin::select_call(&sid))
                .await
                .map_err(failed("get call"))?;
            if call.is_empty() {
                return Err(Error::NotFound(format!("no call {:?}", sid.as_str())));
            }
            let transcript = query(&db, &admin::select_transcript(&sid))
                .await
                .map_err(failed("get transcript"))?;
            let events = query(&db, &admin::select_events(&sid))
                .await
                .map_err(failed("get events"))?;
            Ok(ok(admin::call_detail(call.remove(0), transcript, events)))
        }
        Route::ListAgents => {
            let rows = query(&db, &agents::select_all())
                .await
                .map_err(failed("list agents"))?;
            // One unreadable row must not hide the others: it is listed as unreadable.
            let (list, bad) = agents::list_json(&rows);
            for (id, e) in bad {
                log_bad_row(id.as_deref(), &e);
            }
            Ok(ok(list))
        }
        Route::GetAgent(id) => {
            let row = agent_row(&db, &id).await?.ok_or_else(|| no_agent(&id))?;
            Ok(ok(json!({ "agent": shown(&row) })))
        }
        Route::CreateAgent => {
            let body = body(req).await?;
            let mut random = [0u8; 8];
            getrandom::fill(&mut random).map_err(|e| internal("random id", e))?;
            let change = agents::parse_create(&body, &agents::new_id(random))?;
            let id = change.agent.id.clone();
            let taken = format!("agent {id:?} already exists");
            if agent_row(&db, &id).await?.is_some() {
                return Err(Error::Conflict(taken));
            }
            // Another request with the same id may get there between the check and here.
            batch(&db, &agents::insert(&change, &now()))
                .await
                .map_err(
                    |e| match admin::create_failure(&e.to_string(), || taken.clone()) {
                        conflict @ Error::Conflict(_) => conflict,
                        _ => failed("create agent")(e),
                    },
                )?;
            let row = agent_row(&db, &id)
                .await?
                .ok_or_else(|| internal("create agent", "the new agent is not there"))?;
            log("info", "admin.agent_created", json!({ "agent_id": id }));
            Ok(Reply {
                status: 201,
                body: Some(json!({ "agent": shown(&row) })),
            })
        }
        Route::UpdateAgent(id) => {
            let body = body(req).await?;
            let row = agent_row(&db, &id).await?.ok_or_else(|| no_agent(&id))?;
            let current = agents::record_for_update(&row, &body)?;
            let change = agents::parse_update(&body, &current)?;
            // Only the given columns are written, on the condition that what the checks
            // took from this read still holds.
            let changed = batch_changes(&db, &agents::update(&change, &now()))
                .await
                .map_err(failed("update agent"))?;
            if changed.last() == Some(&0) {
                // Deleted, or changed so that the checks no longer hold: say which.
                let row = agent_row(&db, &id).await?.ok_or_else(|| no_agent(&id))?;
                let current = agents::record_for_update(&row, &body)?;
                agents::parse_update(&body, &current)?;
                return Err(Error::Conflict(format!(
                    "agent {id:?} was changed by another request meanwhile; read it and try again"
                )));
            }
            let row = agent_row(&db, &id).await?.ok_or_else(|| no_agent(&id))?;
            log("info", "admin.agent_updated", json!({ "agent_id": id }));
            Ok(ok(json!({ "agent": shown(&row) })))
        }
        Route::DeleteAgent(id) => {
            // A row that cannot be read can still be deleted.
            let current = deletable(&db, &id).await?;
            let numbers = numbers_of(&db, &id).await?;
            if let Some(refusal) = agents::deletion_conflict(&current, &numbers) {
                return Err(refusal.into());
            }
            let changed = execute(&db, &agents::delete(&id))
                .await
                .map_err(failed("delete agent"))?;
            if changed == 0 {
                // Something changed between the check and the delete: say what, if we can.
                let current = deletable(&db, &id).await?;
                let numbers = numbers_of(&db, &id).await?;
                return Err(agents::deletion_conflict(&current, &numbers)
                    .map(Error::from)
                    .unwrap_or_else(|| Error::Conflict(format!("agent {id:?} changed; retry"))));
            }
            log("info", "admin.agent_deleted", json!({ "agent_id": id }));
            Ok(Reply {
                status: 204,
                body: None,
            })
        }
        Route::ListNumbers => {
            let rows = query(&db, &agents::select_numbers())
                .await
                .map_err(failed("list numbers"))?;
            Ok(ok(json!({ "numbers": rows })))
        }
        Route::GetNumber(number) => {
            let row = load_number(&db, &number).await?;
            row.map(|r| ok(json!({ "number": r })))
                .ok_or_else(|| Error::NotFound(format!("number {number:?} is not assigned")))
        }
        Route::AssignNumber(number) => {
            let body = body(req).await?;
            let agent_id = agents::parse_assignment(&body)?;
            if agent_row(&db, &agent_id).await?.is_none() {
                return Err(Error::Invalid {
                    field: "agent_id".into(),
                    message: format!("no agent {agent_id:?}"),
                });
            }
            let existed = load_number(&db, &number).await?.is_some();
            execute(&db, &agents::assign_number(&number, &agent_id, &now()))
                .await
                .map_err(failed("assign number"))?;
            let row = load_number(&db, &number)
                .await?
                .ok_or_else(|| internal("assign number", "the assignment is not there"))?;
            log(
                "info",
                "admin.number_assigned",
                json!({ "number": number, "agent_id": agent_id }),
            );
            Ok(Reply {
                status: if existed { 200 } else { 201 },
                body: Some(json!({ "number": row })),
            })
        }
        Route::UnassignNumber(number) => {
            let changed = execute(&db, &agents::unassign_number(&number))
                .await
                .map_err(failed("unassign number"))?;
            if changed == 0 {
                return Err(Error::NotFound(format!(
                    "number {number:?} is not assigned"
                )));
            }
            log(
                "info",
                "admin.number_unassigned",
                json!({ "number": number }),
            );
            Ok(Reply {
                status: 204,
                body: None,
            })
        }
    }
}

fn no_agent(id: &str) -> Error {
    Error::NotFound(format!("no agent {id:?}"))
}

fn log_bad_row(id: Option<&str>, e: &crate::config::ConfigError) {
    log(
        "error",
        "admin.bad_agent_row",
        json!({ "agent_id": id, "error": e.to_string() }),
    );
}

/// The API's view of a stored row; a row the core cannot read is logged and shown as
/// unreadable, naming the field to fix.
fn shown(row: &Value) -> Value {
    match agents::view(row) {
        agents::View::Agent(json) => json,
        agents::View::Unreadable { json, error } => {
            log_bad_row(row.get("id").and_then(Value::as_str), &error);
            json
        }
    }
}

/// The stored row of agent `id`, if there is one.
async fn agent_row(db: &D1Database, id: &str) -> std::result::Result<Option<Value>, Error> {
    let mut rows = query(db, &agents::select_by_id(id))
        .await
        .map_err(failed("get agent"))?;
    Ok((!rows.is_empty()).then(|| rows.remove(0)))
}

/// Agent `id` as far as deciding whether it may be deleted needs.
async fn deletable(db: &D1Database, id: &str) -> std::result::Result<agents::Record, Error> {
    let row = agent_row(db, id).await?.ok_or_else(|| no_agent(id))?;
    agents::record_for_delete(&row).map_err(|e| internal("read agent row", e))
}

async fn numbers_of(db: &D1Database, id: &str) -> std::result::Result<Vec<String>, Error> {
    let rows = query(db, &agents::select_numbers_of(id))
        .await
        .map_err(failed("numbers of agent"))?;
    Ok(rows
        .iter()
        .filter_map(|r| r.get("number").and_then(Value::as_str).map(str::to_owned))
        .collect())
}

async fn load_number(db: &D1Database, number: &str) -> std::result::Result<Option<Value>, Error> {
    let mut rows = query(db, &agents::select_number(number))
        .await
        .map_err(failed("get number"))?;
    Ok((!rows.is_empty()).then(|| rows.remove(0)))
}
