//! The Cloudflare shell: HTTP routing in the Worker and one Durable Object per call.
//! It moves bytes and maps results to responses; every protocol decision is the core's.

mod admin;
mod call_session;
mod db;
mod http;
mod outbox;
mod preopen;
mod recording;
mod socket;

use crate::call::Level;
use crate::config::{Bridge, Setting};
use crate::webhook::{self, Refusal};
use futures::channel::oneshot;
use std::cell::Cell;
use std::time::Duration;
use worker::*;

thread_local! {
    /// `LOG_LEVEL` as last read by [`bridge_config`] (every request reads the configuration
    /// first): the least important line [`log`] prints. `info` until then.
    static LOG_LEVEL: Cell<Level> = const { Cell::new(Level::Info) };
}

/// One variable or secret. wrangler binds a `[vars]` value written without quotes
/// (`IDLE_TIMEOUT_SECONDS = 45`, `FALLBACK_ONLY = true`) as a number or boolean, which
/// `Env::var` does not read: such a setting would be silently left at its default. Those
/// are text as written; a table or array comes as its JSON, for the configuration to refuse.
pub(crate) fn setting(env: &Env, name: &str) -> Option<Setting> {
    let value = js_sys::Reflect::get(env.as_ref(), &name.into()).ok()?;
    if value.is_undefined() || value.is_null() {
        None
    } else if let Some(s) = value.as_string() {
        Some(Setting::Text(s))
    } else if let Some(n) = value.as_f64() {
        Some(Setting::Text(n.to_string()))
    } else if let Some(b) = value.as_bool() {
        Some(Setting::Text(b.to_string()))
    } else {
        let json = js_sys::JSON::stringify(&value)
            .ok()
            .and_then(|s| s.as_string())
            .unwrap_or_default();
        Some(Setting::NotText(json))
    }
}

/// A setting the shell reads itself, as text (anything else counts as unset).
pub(crate) fn setting_text(env: &Env, name: &str) -> Option<String> {
    match setting(env, name)? {
        Setting::Text(s) => Some(s),
        Setting::NotText(_) => None,
    }
}

/// Reads the configuration from the Worker's variables and secrets; what was set aside for
/// its default is logged as `config.ignored`, on every request until it is fixed.
pub(crate) fn bridge_config(env: &Env) -> Bridge {
    let config = Bridge::from_lookup(|name| setting(env, name));
    LOG_LEVEL.with(|l| l.set(config.log_level));
    for e in &config.ignored {
        log(
            "error",
            "config.ignored",
            serde_json::json!({ "field": e.field, "reason": e.reason }),
        );
    }
    for (hook, what) in &config.test_hooks {
        log(
            "error",
            "config.test_hook_active",
            serde_json::json!({ "field": hook, "what": what }),
        );
    }
    config
}

/// Waits up to `limit` for `done` to hold, checking every `step`; false if it never did. True
/// comes back in the same turn as the check, so what the caller does next, before awaiting
/// anything, comes before anything else can change.
pub(crate) async fn wait_until(limit: Duration, step: Duration, done: impl Fn() -> bool) -> bool {
    let mut waited = Duration::ZERO;
    while !done() {
        if waited >= limit {
            return false;
        }
        Delay::from(step).await;
        waited += step;
    }
    true
}

/// One structured log line for events outside a call's machine, unless `LOG_LEVEL` is above
/// its level.
pub(crate) fn log(level: &str, event: &str, fields: serde_json::Value) {
    if level.parse::<Level>().unwrap_or(Level::Error) < LOG_LEVEL.with(Cell::get) {
        return;
    }
    let mut line = serde_json::json!({ "level": level, "event": event });
    if let (Some(obj), serde_json::Value::Object(extra)) = (line.as_object_mut(), fields) {
        obj.extend(extra);
    }
    match level {
        "error" => console_error!("{}", line),
        "warn" => console_warn!("{}", line),
        _ => console_log!("{}", line),
    }
}

thread_local! {
    /// The minute (since the epoch) and how many unverified voice webhooks this isolate has
    /// logged in it.
    static UNVERIFIED: Cell<(u64, u32)> = const { Cell::new((0, 0)) };
}

/// The level of an unverified voice webhook's log line (see [`webhook::unverified_log`]).
fn unverified_log_level(now_ms: u64) -> &'static str {
    let loud = UNVERIFIED.with(|c| {
        let (state, loud) = webhook::unverified_log(c.get(), now_ms);
        c.set(state);
        loud
    });
    if loud {
        "error"
    } else {
        "debug"
    }
}

fn refuse(refusal: &Refusal, route: &str) -> Result<Response> {
    let level = if matches!(refusal, Refusal::NoAuthToken) {
        "error"
    } else {
        "warn"
    };
    log(
        level,
        "http.refused",
        serde_json::json!({ "route": route, "status": refusal.status(), "why": refusal.to_string() }),
    );
    let body = if refusal.status() == 403 {
        "Forbidden".to_owned()
    } else {
        refusal.to_string()
    };
    Response::error(body, refusal.status())
}

#[event(start)]
fn start() {
    console_error_panic_hook::set_once();
}

#[event(fetch)]
async fn fetch(req: Request, env: Env, ctx: Context) -> Result<Response> {
    let path = req.path();
    match (req.method(), path.as_str()) {
        (Method::Get, "/healthz") => Response::ok("ok"),
        // A number's webhooks may be set to POST (the default) or GET.
        (Method::Post | Method::Get, webhook::VOICE_PATH) => voice(req, env, ctx).await,
        (Method::Post | Method::Get, webhook::STATUS_PATH) => status(req, env, ctx).await,
        (Method::Post | Method::Get, webhook::TRANSFER_RESULT_PATH) => {
            transfer_result(req, env, ctx).await
        }
        (Method::Get, p) if p.starts_with(webhook::STREAM_PATH_PREFIX) => {
            media_stream(req, env).await
        }
        (_, p) if p.starts_with("/api/admin/") => admin::handle(req, env).await,
        _ => Response::error("Not Found", 404),
    }
}

/// What every signed Twilio webhook needs: the configuration, the URL as the Worker saw
/// it, the signature header, and the body of a POST (`None` for a GET, whose parameters are
/// in the URL).
async fn twilio_form(
    req: &mut Request,
    env: &Env,
) -> Result<(Bridge, String, Option<String>, Option<String>)> {
    let config = bridge_config(env);
    let url = req.inner().url();
    let signature = req.headers().get("X-Twilio-Signature")?;
    let body = match req.method() {
        Method::Get => None,
        _ => Some(req.text().await?),
    };
    Ok((config, url, signature, body))
}

fn params(body: &Option<String>) -> webhook::Params<'_> {
    body.as_deref()
        .map_or(webhook::Params::Query, webhook::Params::Form)
}

async fn voice(mut req: Request, env: Env, ctx: Context) -> Result<Response> {
    let (config, url, signature, body) = twilio_form(&mut req, &env).await?;
    let answer = match webhook::answer_voice(&config, &url, signature.as_deref(), params(&body)) {
        Ok(a) => a,
        Err(r) => {
            let Some(unverified) =
                webhook::unverified_voice(&config, &url, params(&body), r.clone())
            else {
                return refuse(&r, "voice");
            };
            // Not refused: Twilio would play "an application error" to the caller. The caller
            // hears the fallback; nothing is registered or recorded for an unverified request.
            log(
                unverified_log_level(Date::now().as_millis()),
                "twilio.voice_unverified",
                serde_json::json!({
                    "call_sid": unverified.claimed_call_sid,
                    "why": unverified.why.to_string(),
                    "checked_url": unverified.checked_url,
                    "then": "fallback",
                }),
            );
            return twiml_response(unverified.twiml);
        }
    };
    log(
        "info",
        "twilio.voice",
        serde_json::json!({
            "call_sid": answer.call.call_sid, "direction": answer.call.direction,
            "streams": answer.streams(),
        }),
    );
    if answer.key == webhook::Key::Secondary {
        // A rotation under way: Twilio still signs with the token being replaced, and REST
        // calls (hang-up, transfer, the fallback's redirect) authenticate with the new one
        // in TWILIO_AUTH_TOKEN, which Twilio takes as its secondary until it is promoted.
        log(
            "warn",
            "twilio.secondary_token",
            serde_json::json!({
                "call_sid": answer.call.call_sid,
                "why": "signed with TWILIO_AUTH_TOKEN_SECONDARY's token: promote the one in \
                        TWILIO_AUTH_TOKEN in the Twilio console, then delete the secondary",
            }),
        );
    }
    let slowed = setting_text(&env, crate::config::FAULT_INJECT_D1_LOOKUP_DELAY_MS)
        .and_then(|v| v.trim().parse().ok())
        .map_or(Duration::ZERO, Duration::from_millis);
    let agent = agent_for(&env, &config, &answer.call, slowed).await;
    let twiml = answer.twiml(&config, &agent);
    let streams = answer.streams();
    let dial_action = answer.dial_action.clone();
    let registration = webhook::Registration {
        agent,
        call: answer.call,
        at_ms: Date::now().as_millis(),
    };
    if !streams {
        let (reason, detail) = webhook::fallback_only_reason(&config);
        record_unserved(&env, &ctx, &registration, reason, detail);
        return twiml_response(twiml);
    }
    // Tell the call's Durable Object first, so the stream that follows is accepted.
    if let Err(why) = register(&env, &registration).await {
        // The stream would be refused: the caller hears the apology and is put through to
        // a person instead of Twilio's "application error".
        log(
            "error",
            "call.register_failed",
            serde_json::json!({ "call_sid": registration.call.call_sid, "error": why }),
        );
        record_unserved(
            &env,
            &ctx,
            &registration,
            webhook::NOT_REGISTERED,
            Some(why),
        );
        return twiml_response(webhook::fallback_twiml(
            &config,
            &registration.agent,
            dial_action.as_deref(),
        ));
    }
    twiml_response(twiml)
}

/// How long a Worker may go on after its answer (`waitUntil`): what [`keep`] does must fit in it.
const AFTER_ANSWER: Duration = Duration::from_secs(30);
/// The longest [`record_unserved`] waits for the call's object (which may well be failing
/// still, having just failed to take the call).
const UNSERVED_OBJECT_WAIT: Duration = Duration::from_secs(3);
/// The longest a status callback or a transfer's result waits for the call's object: the
/// object's own wait on a D1 write already on its way, plus its storage and the network.
const OBJECT_WAIT: Duration = Duration::from_secs(outbox::DURABLE_WAIT.as_secs() + 2);
/// The longest [`keep`] waits for each direct write to D1.
const DIRECT_WAIT: Duration = Duration::from_secs(3);
/// Pauses before a direct write of records the call's object did not keep is tried again.
const DIRECT_RETRY_PAUSES: [Duration; 3] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
];
// The object, 4 writes and the pauses: 10 + 4 × 3 + 7 = 29 s, inside the 30.
const _: () = assert!(
    OBJECT_WAIT.as_secs()
        + DIRECT_WAIT.as_secs() * (1 + DIRECT_RETRY_PAUSES.len() as u64)
        + DIRECT_RETRY_PAUSES[0].as_secs()
        + DIRECT_RETRY_PAUSES[1].as_secs()
        + DIRECT_RETRY_PAUSES[2].as_secs()
        <= AFTER_ANSWER.as_secs()
        && UNSERVED_OBJECT_WAIT.as_secs() <= OBJECT_WAIT.as_secs()
);

/// The row of a call the agent did not take (numbers, agent, why), kept once the answer has
/// gone (the fallback's TwiML waits on nothing), by [`keep`].
fn record_unserved(
    env: &Env,
    ctx: &Context,
    registration: &webhook::Registration,
    reason: &str,
    detail: Option<String>,
) {
    let records = vec![registration.record(), registration.unserved(reason, detail)];
    keep(
        env,
        ctx,
        Keep {
            call_sid: registration.call.call_sid.clone(),
            url: call_session::UNSERVED_URL,
            body: serde_json::to_string(&records).expect("records serialize"),
            statements: crate::store::coalesce(
                records
                    .iter()
                    .flat_map(|r| r.statements(registration.at_ms)),
            ),
            object_wait: UNSERVED_OBJECT_WAIT,
            not_kept: "call.record_not_kept",
            what: serde_json::json!({ "unserved": reason }),
        },
        None,
    );
}

/// What a Twilio webhook said about a call, for [`keep`].
struct Keep {
    call_sid: crate::ids::CallSid,
    /// The call object's internal URL for it, and what it is sent there.
    url: &'static str,
    body: String,
    /// What writes it to D1, should the object not keep it.
    statements: Vec<crate::store::Statement>,
    object_wait: Duration,
    /// The event logged when the object did not keep it.
    not_kept: &'static str,
    /// Fields that name it in the log.
    what: serde_json::Value,
}

/// Keeps what a Twilio webhook said about a call: through the call's object, whose outbox
/// keeps it in its storage and retries D1 until it takes it. Should the object not take it
/// within `object_wait` (it failed, refused, or could not be reached: logged as `not_kept`
/// says, with the CallSid), it is written straight to D1, tried again after each of
/// [`DIRECT_RETRY_PAUSES`]; should every try fail, the log keeps what it would have said
/// (`call.record_failed`). This goes on under `waitUntil`, so it is finished even once the
/// answer has gone, or Twilio stopped waiting for it; whether it was kept, one way or the
/// other, is sent on `done`, if given.
fn keep(env: &Env, ctx: &Context, keep: Keep, done: Option<oneshot::Sender<bool>>) {
    let done = |kept| {
        if let Some(done) = done {
            let _ = done.send(kept);
        }
    };
    let env = env.clone();
    // The test hook fails this path's first direct writes as it does a call object's.
    let mut injected: u64 = setting_text(&env, crate::config::FAULT_INJECT_D1_FAILURES)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let object_fails = injected_object_failure(&env);
    ctx.wait_until(async move {
        let Keep {
            call_sid,
            url,
            body,
            statements,
            object_wait,
            not_kept,
            what,
        } = keep;
        let fields = |extra: serde_json::Value| {
            let mut line = serde_json::json!({ "call_sid": call_sid });
            for fields in [&what, &extra] {
                if let (Some(line), Some(fields)) = (line.as_object_mut(), fields.as_object()) {
                    line.extend(fields.clone());
                }
            }
            line
        };
        let reached = if object_fails {
            Some(Err(Error::RustError(
                "injected call object failure (FAULT_INJECT_CALL_OBJECT_FAILURES)".into(),
            )))
        } else {
            within(
                object_wait,
                keep_through_call_object(&env, &call_sid, url, body),
            )
            .await
        };
        let why = match reached {
            Some(Ok(true)) => {
                done(true);
                return;
            }
            Some(Ok(false)) => "the call object refused it".to_owned(),
            Some(Err(e)) => e.to_string(),
            None => format!("no answer from the call object within {object_wait:?}"),
        };
        log(
            "warn",
            not_kept,
            fields(serde_json::json!({ "error": why, "then": "written to D1 directly" })),
        );
        let mut error = String::new();
        let pauses = std::iter::once(Duration::ZERO).chain(DIRECT_RETRY_PAUSES);
        for (tries, pause) in pauses.enumerate() {
            Delay::from(pause).await;
            let written = if injected > 0 {
                injected -= 1;
                Some(Err(Error::RustError(
                    "injected D1 failure (FAULT_INJECT_D1_FAILURES)".into(),
                )))
            } else if statements.is_empty() {
                Some(Ok(()))
            } else {
                within(DIRECT_WAIT, async {
                    db::batch(&db::database(&env)?, &statements).await
                })
                .await
            };
            match written {
                Some(Ok(())) => {
                    log(
                        "info",
                        "call.record_written",
                        fields(serde_json::json!({ "tries": tries + 1 })),
                    );
                    done(true);
                    return;
                }
                Some(Err(e)) => error = e.to_string(),
                None => error = format!("no answer from D1 within {DIRECT_WAIT:?}"),
            }
        }
        log(
            "error",
            "call.record_failed",
            fields(serde_json::json!({ "error": error })),
        );
        done(false);
    });
}

thread_local! {
    /// What is left of the test hook `FAULT_INJECT_CALL_OBJECT_FAILURES` in this isolate:
    /// read when first needed.
    static OBJECT_FAILURES_LEFT: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Whether the test hook fails this hand-over to a call's object: the first N of the isolate.
fn injected_object_failure(env: &Env) -> bool {
    OBJECT_FAILURES_LEFT.with(|left| {
        let n = left.get().unwrap_or_else(|| {
            setting_text(env, crate::config::FAULT_INJECT_CALL_OBJECT_FAILURES)
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        });
        left.set(Some(n.saturating_sub(1)));
        n > 0
    })
}

/// `fut`'s output, or `None` when it has not come within `limit` (`fut` is then dropped: a
/// request it sent may still land).
pub(crate) async fn within<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = T>,
) -> Option<T> {
    let limit = Delay::from(limit);
    futures::pin_mut!(fut, limit);
    match futures::future::select(fut, limit).await {
        futures::future::Either::Left((out, _)) => Some(out),
        futures::future::Either::Right(_) => None,
    }
}

/// Hands a verified call to its Durable Object; what went wrong when it was not taken.
async fn register(
    env: &Env,
    registration: &webhook::Registration,
) -> std::result::Result<(), String> {
    let sent = async {
        call_object(env, &registration.call.call_sid)?
            .fetch_with_request(internal_post(
                call_session::REGISTER_URL,
                &serde_json::to_string(registration)?,
            )?)
            .await
    };
    match sent.await {
        Ok(resp) if resp.status_code() == 204 => Ok(()),
        Ok(resp) => Err(format!("HTTP {}", resp.status_code())),
        Err(e) => Err(e.to_string()),
    }
}

fn twiml_response(twiml: String) -> Result<Response> {
    let headers = Headers::new();
    headers.set("Content-Type", "text/xml; charset=utf-8")?;
    Ok(Response::ok(twiml)?.with_headers(headers))
}

fn call_object(env: &Env, call_sid: &crate::ids::CallSid) -> Result<Stub> {
    env.durable_object("CALLS")?
        .id_from_name(call_sid.as_str())?
        .get_stub()
}

fn internal_post(url: &str, body: &str) -> Result<Request> {
    let mut init = RequestInit::new();
    init.with_method(Method::Post).with_body(Some(body.into()));
    Request::new_with_init(url, &init)
}

/// How long Twilio waits for the voice webhook's answer; past it the caller hears "an
/// application error has occurred" and the call is never handed to the bridge.
const TWILIO_WEBHOOK_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the voice webhook waits for D1 to name the call's agent before the agent from
/// configuration takes the call. A D1 read takes milliseconds; one that takes seconds is an
/// outage. After the lookup the webhook hands the call to its object, which may wait up to
/// [`outbox::DURABLE_WAIT`] (8 s) on a D1 write already on its way: 3 s + 8 s leaves 4 s of
/// Twilio's 15 for the signature check, the object's storage and the network.
const AGENT_LOOKUP_LIMIT: Duration = Duration::from_secs(3);
const _: () = assert!(
    AGENT_LOOKUP_LIMIT.as_secs() + outbox::DURABLE_WAIT.as_secs() + 4
        <= TWILIO_WEBHOOK_TIMEOUT.as_secs(),
    "the voice webhook's waits must stay well inside Twilio's timeout"
);

/// The agent that answers `call` (to its number): its assignment, else the default agent in
/// D1. If D1 cannot answer, or does not within [`AGENT_LOOKUP_LIMIT`], the call is still
/// taken, by the agent from configuration (whose id, `env`, the call's row then names).
/// `slowed` delays the lookup (the test hook `FAULT_INJECT_D1_LOOKUP_DELAY_MS`).
async fn agent_for(
    env: &Env,
    config: &Bridge,
    call: &webhook::VoiceCall,
    slowed: Duration,
) -> crate::config::Agent {
    let number = call.to.as_str();
    let lookup = async {
        if !slowed.is_zero() {
            Delay::from(slowed).await;
        }
        let database = db::database(env)?;
        let rows = db::query(&database, &crate::agents::select_for_number(number)).await?;
        Ok::<_, Error>(rows.into_iter().next())
    };
    let found = match within(AGENT_LOOKUP_LIMIT, lookup).await {
        Some(found) => found,
        None => {
            log(
                "error",
                "agent.lookup_timeout",
                serde_json::json!({
                    "call_sid": call.call_sid, "number": number,
                    "limit_ms": AGENT_LOOKUP_LIMIT.as_millis() as u64,
                    "agent_id": config.agent.id,
                }),
            );
            return config.agent.clone();
        }
    };
    let why = match found {
        Ok(Some(row)) => match crate::agents::from_row(&row) {
            Ok(agent) => return agent,
            Err(e) => format!("stored agent is invalid: {e}"),
        },
        Ok(None) => "no agent for the number and no default agent".to_owned(),
        Err(e) => format!("D1 lookup failed: {e}"),
    };
    log(
        "warn",
        "agent.fallback_to_config",
        serde_json::json!({ "call_sid": call.call_sid, "number": number, "why": why }),
    );
    config.agent.clone()
}

/// How long a status callback's answer waits for its record to be kept. [`keep`] may take
/// up to 29 s (the object, then four direct writes), but Twilio stops waiting after 15 s (and
/// logs an error in its debugger) and never sends the callback again, so a later answer buys
/// nothing: the keeping goes on under `waitUntil` whether or not the answer waited for it.
const STATUS_ANSWER_WAIT: Duration = Duration::from_secs(12);
// The object has answered (or been given up on) by then, so what is not known yet is up to
// the direct writes, whose end is always logged: `call.record_written` or `call.record_failed`.
const _: () = assert!(
    STATUS_ANSWER_WAIT.as_secs() + 3 <= TWILIO_WEBHOOK_TIMEOUT.as_secs()
        && OBJECT_WAIT.as_secs() < STATUS_ANSWER_WAIT.as_secs(),
    "the status callback must be answered inside Twilio's timeout, after the object's wait"
);

/// Twilio's status callback, applied through the call's object so it is kept even when
/// D1 is failing; written straight to D1 when the object does not keep it (Twilio does not
/// send a status callback again). Answered as [`webhook::StatusAnswer`] says: 204 once it is
/// kept one way or the other, 500 when it was not, 202 when that is not known within
/// [`STATUS_ANSWER_WAIT`] (logged as `call.status_answered_before_kept`; the keeping goes
/// on, and `call.record_written` or `call.record_failed` tells how it ended).
async fn status(mut req: Request, env: Env, ctx: Context) -> Result<Response> {
    let (config, url, signature, body) = twilio_form(&mut req, &env).await?;
    let now = Date::now().as_millis();
    let record =
        match webhook::status_callback(&config, &url, signature.as_deref(), params(&body), now) {
            Ok(r) => r,
            Err(r) => return refuse(&r, "status"),
        };
    let call_sid = crate::ids::CallSid::new(record.call_sid());
    let (done, kept) = oneshot::channel();
    keep(
        &env,
        &ctx,
        Keep {
            call_sid: call_sid.clone(),
            url: call_session::STATUS_URL,
            body: serde_json::to_string(&record)?,
            statements: record.statements(now),
            object_wait: OBJECT_WAIT,
            not_kept: "call.status_not_kept",
            what: serde_json::json!({ "record": "twilio_status" }),
        },
        Some(done),
    );
    // A dropped sender (the keeping itself was dropped) counts as not kept.
    let kept = within(STATUS_ANSWER_WAIT, kept)
        .await
        .map(|kept| kept.unwrap_or(false));
    let answer = webhook::StatusAnswer::new(kept);
    match answer {
        webhook::StatusAnswer::Kept => Response::empty().map(|r| r.with_status(204)),
        webhook::StatusAnswer::NotKept => Response::error(answer.body(), answer.status()),
        webhook::StatusAnswer::Keeping => {
            log(
                "warn",
                "call.status_answered_before_kept",
                serde_json::json!({
                    "call_sid": call_sid,
                    "waited_ms": STATUS_ANSWER_WAIT.as_millis() as u64,
                    "status": answer.status(),
                    "then": "still being kept: call.record_written or call.record_failed follows",
                }),
            );
            Ok(Response::ok(answer.body())?.with_status(answer.status()))
        }
    }
}

/// Hands what a Twilio webhook said about a call (`body`, for the object's `url`) to the
/// call's object, which keeps it (in D1, or in its storage until D1 takes it); false when the
/// object did not.
async fn keep_through_call_object(
    env: &Env,
    call_sid: &crate::ids::CallSid,
    url: &str,
    body: String,
) -> Result<bool> {
    let resp = call_object(env, call_sid)?
        .fetch_with_request(internal_post(url, &body)?)
        .await?;
    Ok(resp.status_code() == 204)
}

/// Twilio asks, once a transfer's `<Dial>` has ended, what to do with the caller: answered
/// at once, while the result is kept among the call's events by [`keep`] (the caller does
/// not wait on the call's object, nor on a D1 write it may be waiting for).
async fn transfer_result(mut req: Request, env: Env, ctx: Context) -> Result<Response> {
    let (config, url, signature, body) = twilio_form(&mut req, &env).await?;
    let now = Date::now().as_millis();
    let result =
        match webhook::transfer_result(&config, &url, signature.as_deref(), params(&body), now) {
            Ok(r) => r,
            Err(r) => return refuse(&r, "transfer-result"),
        };
    log(
        if result.answered { "info" } else { "warn" },
        "transfer.result",
        serde_json::json!({ "call_sid": result.call_sid, "answered": result.answered }),
    );
    keep(
        &env,
        &ctx,
        Keep {
            call_sid: result.call_sid.clone(),
            url: call_session::STATUS_URL,
            body: serde_json::to_string(&result.record)?,
            statements: result.record.statements(now),
            object_wait: OBJECT_WAIT,
            not_kept: "transfer.result_not_kept",
            what: serde_json::json!({ "record": "transfer_result" }),
        },
        None,
    );
    twiml_response(result.twiml)
}

async fn media_stream(req: Request, env: Env) -> Result<Response> {
    let config = bridge_config(&env);
    if !req
        .headers()
        .get("Upgrade")?
        .is_some_and(|u| u.eq_ignore_ascii_case("websocket"))
    {
        return Response::error("Expected a WebSocket upgrade", 426);
    }
    let Some(call_sid) = webhook::stream_call_sid(&req.path()) else {
        return Response::error("Not Found", 404);
    };
    let url = req.inner().url();
    let signature = req.headers().get("X-Twilio-Signature")?;
    if let Err(r) = webhook::verify_stream_upgrade(&config, &url, signature.as_deref(), &call_sid) {
        return refuse(&r, "media-stream");
    }
    call_object(&env, &call_sid)?.fetch_with_request(req).await
}
