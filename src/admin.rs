//! The admin JSON API under `/api/admin/`, minus the I/O: bearer-token check, routing,
//! request parsing and validation, the statements each route runs, the shape of its
//! answers, and one error type that maps to a status and a JSON body. The Cloudflare shell
//! (`cloudflare::admin`) reads the request, runs the statements on D1 and writes the response.
//!
//! Every value from a request reaches SQL as a positional parameter, never as SQL text.

use crate::agents::{self, Refusal};
use crate::config;
use crate::ids::CallSid;
use crate::store::{iso_time, Statement};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::{json, Map, Value};
use sha1::Sha1;
use sha2::Sha256;

pub const PREFIX: &str = "/api/admin/";

/// Twilio's `CallStatus` values, as the `calls.status` column holds them.
pub const CALL_STATUSES: [&str; 7] = [
    "ringing",
    "in-progress",
    "completed",
    "failed",
    "busy",
    "no-answer",
    "canceled",
];

pub const DEFAULT_LIMIT: u32 = 20;
pub const MAX_LIMIT: u32 = 100;
/// Larger request bodies are refused (413) before they are parsed.
pub const MAX_BODY_BYTES: usize = 256 * 1024;

/// The JSON content type of every answer.
pub const CONTENT_TYPE: &str = "application/json; charset=utf-8";

// ---- auth ----------------------------------------------------------------------------------------

type HmacSha1 = Hmac<Sha1>;

/// A fixed-length digest of a token, so that comparing two of them takes the same time
/// whatever their lengths and contents.
fn token_mac(token: &[u8]) -> HmacSha1 {
    let mut mac =
        HmacSha1::new_from_slice(b"phone-agent-bridge admin token").expect("any key length");
    mac.update(token);
    mac
}

/// The shortest `ADMIN_TOKEN` the API accepts: one short enough to guess (the API answers
/// anyone who asks) would open every call's transcript and recording.
pub const MIN_ADMIN_TOKEN_CHARS: usize = 16;

/// True when `authorization_header` is `Bearer <admin_token>` (scheme case-insensitive).
/// The comparison is constant-time; an empty configured token, or one shorter than
/// [`MIN_ADMIN_TOKEN_CHARS`], authorizes nothing.
pub fn authorized(authorization_header: Option<&str>, admin_token: &str) -> bool {
    if admin_token.chars().count() < MIN_ADMIN_TOKEN_CHARS {
        return false;
    }
    let Some((scheme, given)) = authorization_header
        .map(str::trim)
        .and_then(|h| h.split_once(' '))
    else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return false;
    }
    let expected = token_mac(admin_token.as_bytes()).finalize().into_bytes();
    token_mac(given.trim().as_bytes())
        .verify_slice(&expected)
        .is_ok()
}

/// Why [`admit`] refuses a recording link past its time: answered as [`Error::LinkExpired`],
/// so a player (the review page) knows to ask for a new link rather than sign in again.
pub const LINK_EXPIRED: &str = "the recording link has expired";

/// The answer to a request [`admit`] refused for `why`.
pub fn refused(why: &str) -> Error {
    if why == LINK_EXPIRED {
        Error::LinkExpired
    } else {
        Error::Unauthorized
    }
}

/// Whether a request to `route` may go on: with the bearer token, or, for a recording, with
/// a valid recording link in its `query` (see [`recording_link`]). A refusal says why, for
/// the log (never the token itself).
pub fn admit(
    route: &Result<Route, Error>,
    query: &str,
    authorization_header: Option<&str>,
    admin_token: &str,
    now_ms: u64,
) -> Result<(), &'static str> {
    if authorized(authorization_header, admin_token) {
        return Ok(());
    }
    if admin_token.is_empty() {
        return Err("ADMIN_TOKEN is not configured");
    }
    if admin_token.chars().count() < MIN_ADMIN_TOKEN_CHARS {
        return Err("ADMIN_TOKEN is shorter than 16 characters: set a longer one");
    }
    if authorization_header.is_some() {
        return Err("wrong credentials");
    }
    let Ok(Route::GetRecording(sid)) = route else {
        return Err("no Authorization header");
    };
    match check_recording_link(sid, query, admin_token, now_ms) {
        Ok(()) => Ok(()),
        Err(LinkRefusal::NoLink) => Err("no Authorization header"),
        Err(LinkRefusal::Expired) => Err(LINK_EXPIRED),
        Err(LinkRefusal::Malformed | LinkRefusal::BadSignature) => Err("a bad recording link"),
    }
}

// ---- errors --------------------------------------------------------------------------------------

/// Why a request was refused; [`Error::status`] and [`Error::body`] are the response.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    #[error("missing or wrong bearer token")]
    Unauthorized,
    #[error("the recording link has expired: ask for a new one (GET …/recording-link)")]
    LinkExpired,
    #[error("request body is not valid JSON: {0}")]
    InvalidJson(String),
    /// The body's bytes are not UTF-8 (say, Shift_JIS): refused rather than stored with
    /// replacement characters.
    #[error(
        "request body is not UTF-8 (invalid bytes at offset {valid_up_to}); send the JSON \
         encoded as UTF-8"
    )]
    InvalidUtf8 { valid_up_to: usize },
    /// A value that is missing, unknown, of the wrong type or out of range.
    #[error("`{field}`: {message}")]
    Invalid { field: String, message: String },
    /// A malformed request that no single field is to blame for.
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed; allowed: {allow}")]
    MethodNotAllowed { allow: &'static str },
    #[error("{0}")]
    Conflict(String),
    #[error("request body is larger than {MAX_BODY_BYTES} bytes")]
    TooLarge,
    /// A `Range` this resource of `size` bytes cannot serve.
    #[error("range not satisfiable: the recording has {size} bytes")]
    RangeNotSatisfiable { size: u64 },
    /// Something failed on our side (D1); the details go to the log, not to the client.
    #[error("internal error")]
    Internal,
    /// The store (D1) or the bucket (R2) failed in a way that passes (busy, locked,
    /// overloaded, a lost connection): the client may try again shortly.
    #[error("the call store is unavailable for now; try again in a few seconds")]
    Unavailable,
}

/// Seconds a client is told to wait after [`Error::Unavailable`].
pub const RETRY_AFTER_S: u32 = 5;

/// What the client is told when D1 or R2 failed with `message`: a failure that passes
/// (the database busy or locked by another writer, D1 overloaded or restarting, D1's own
/// "internal error; reference = …", which its documentation says to retry, a lost
/// connection, a timeout) is [`Error::Unavailable`], worth a retry; anything else (a
/// missing table, a bad statement) is [`Error::Internal`], which retrying will not fix.
pub fn storage_failure(message: &str) -> Error {
    const PASSING: [&str; 10] = [
        "internal error; reference",
        "database is locked",
        "busy",
        "overloaded",
        "network connection lost",
        "connection reset",
        "timed out",
        "timeout",
        "try again",
        "unavailable",
    ];
    let m = message.to_ascii_lowercase();
    if PASSING.iter().any(|p| m.contains(p)) {
        Error::Unavailable
    } else {
        Error::Internal
    }
}

/// What the client is told when creating a row failed with `message`: a UNIQUE failure
/// means another request made the same row first (past the existence check), which is a
/// conflict (`conflict` says what); anything else is as [`storage_failure`] says.
pub fn create_failure(message: &str, conflict: impl FnOnce() -> String) -> Error {
    let m = message.to_ascii_uppercase();
    if m.contains("UNIQUE CONSTRAINT FAILED")
        || m.contains("SQLITE_CONSTRAINT_UNIQUE")
        || m.contains("SQLITE_CONSTRAINT_PRIMARYKEY")
    {
        Error::Conflict(conflict())
    } else {
        storage_failure(message)
    }
}

fn invalid(field: &str, message: impl Into<String>) -> Error {
    Error::Invalid {
        field: field.to_owned(),
        message: message.into(),
    }
}

impl Error {
    pub fn status(&self) -> u16 {
        match self {
            Error::Unauthorized | Error::LinkExpired => 401,
            Error::InvalidJson(_)
            | Error::InvalidUtf8 { .. }
            | Error::Invalid { .. }
            | Error::BadRequest(_) => 400,
            Error::NotFound(_) => 404,
            Error::MethodNotAllowed { .. } => 405,
            Error::Conflict(_) => 409,
            Error::TooLarge => 413,
            Error::RangeNotSatisfiable { .. } => 416,
            Error::Internal => 500,
            Error::Unavailable => 503,
        }
    }

    /// The `error` member of the body: a stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Unauthorized => "unauthorized",
            Error::LinkExpired => "link_expired",
            Error::InvalidJson(_) => "invalid_json",
            Error::InvalidUtf8 { .. } => "invalid_utf8",
            Error::Invalid { .. } | Error::BadRequest(_) => "invalid_request",
            Error::NotFound(_) => "not_found",
            Error::MethodNotAllowed { .. } => "method_not_allowed",
            Error::Conflict(_) => "conflict",
            Error::TooLarge => "payload_too_large",
            Error::RangeNotSatisfiable { .. } => "range_not_satisfiable",
            Error::Internal => "internal",
            Error::Unavailable => "unavailable",
        }
    }

    /// `{"error": code, "message": ...}`, plus `"field"` for validation errors.
    pub fn body(&self) -> Value {
        let message = match self {
            Error::Invalid { message, .. } => message.clone(),
            other => other.to_string(),
        };
        let mut body = json!({ "error": self.code(), "message": message });
        if let Error::Invalid { field, .. } = self {
            body["field"] = json!(field);
        }
        body
    }

    /// Headers the status calls for.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        match self {
            Error::Unauthorized | Error::LinkExpired => {
                vec![("WWW-Authenticate", "Bearer".into())]
            }
            Error::MethodNotAllowed { allow } => vec![("Allow", (*allow).into())],
            Error::RangeNotSatisfiable { size } => {
                vec![("Content-Range", format!("bytes */{size}"))]
            }
            Error::Unavailable => vec![("Retry-After", RETRY_AFTER_S.to_string())],
            _ => vec![],
        }
    }
}

impl From<Refusal> for Error {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Invalid { field, message } => Error::Invalid { field, message },
            Refusal::Conflict(m) => Error::Conflict(m),
        }
    }
}

// ---- routing -------------------------------------------------------------------------------------

/// One admin API operation, with its decoded path parameter.
#[derive(Debug, Clone, PartialEq)]
pub enum Route {
    ListCalls,
    GetCall(CallSid),
    /// The call's recording (a WAV, not JSON), with `Range` support.
    GetRecording(CallSid),
    /// A link to the recording that plays without the bearer token (see [`recording_link`]).
    GetRecordingLink(CallSid),
    ListAgents,
    CreateAgent,
    GetAgent(String),
    /// PUT or PATCH: both are partial updates (see [`agents::parse_update`]).
    UpdateAgent(String),
    DeleteAgent(String),
    ListNumbers,
    GetNumber(String),
    AssignNumber(String),
    UnassignNumber(String),
}

/// Decodes `%XX` escapes of a path segment (`+` stays `+`); None for a bad escape or UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Maps a method and a raw (still percent-encoded) path to a [`Route`]. Unknown paths are
/// 404, known paths with another method 405, a path number that is not E.164 400.
pub fn route(method: &str, path: &str) -> Result<Route, Error> {
    let not_found = || Error::NotFound(format!("no admin API route {path:?}"));
    let rest = path.strip_prefix(PREFIX).ok_or_else(not_found)?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let segments = rest
        .split('/')
        .map(percent_decode)
        .collect::<Option<Vec<_>>>()
        .ok_or_else(not_found)?;
    if segments.iter().any(String::is_empty) {
        return Err(not_found());
    }
    let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
    let m = method.to_ascii_uppercase();
    let wrong = |allow: &'static str| Err(Error::MethodNotAllowed { allow });
    match segs.as_slice() {
        ["calls"] => match m.as_str() {
            "GET" => Ok(Route::ListCalls),
            _ => wrong("GET"),
        },
        ["calls", sid] => match m.as_str() {
            "GET" => CallSid::parse(sid)
                .map(Route::GetCall)
                .ok_or_else(|| Error::NotFound(format!("no call {sid:?}"))),
            _ => wrong("GET"),
        },
        // HEAD for tools that ask the size first (answered without the body).
        ["calls", sid, "recording"] => match m.as_str() {
            "GET" | "HEAD" => CallSid::parse(sid)
                .map(Route::GetRecording)
                .ok_or_else(|| Error::NotFound(format!("no call {sid:?}"))),
            _ => wrong("GET, HEAD"),
        },
        ["calls", sid, "recording-link"] => match m.as_str() {
            "GET" => CallSid::parse(sid)
                .map(Route::GetRecordingLink)
                .ok_or_else(|| Error::NotFound(format!("no call {sid:?}"))),
            _ => wrong("GET"),
        },
        ["agents"] => match m.as_str() {
            "GET" => Ok(Route::ListAgents),
            "POST" => Ok(Route::CreateAgent),
            _ => wrong("GET, POST"),
        },
        ["agents", id] => {
            let id = if agents::is_valid_id(id) {
                Ok((*id).to_owned())
            } else {
                Err(Error::NotFound(format!("no agent {id:?}")))
            };
            match m.as_str() {
                "GET" => id.map(Route::GetAgent),
                "PUT" | "PATCH" => id.map(Route::UpdateAgent),
                "DELETE" => id.map(Route::DeleteAgent),
                _ => wrong("GET, PUT, PATCH, DELETE"),
            }
        }
        ["numbers"] => match m.as_str() {
            "GET" => Ok(Route::ListNumbers),
            _ => wrong("GET"),
        },
        ["numbers", n] => {
            let route = match m.as_str() {
                "GET" => Route::GetNumber,
                "PUT" => Route::AssignNumber,
                "DELETE" => Route::UnassignNumber,
                _ => return wrong("GET, PUT, DELETE"),
            };
            agents::check_number(n, m == "PUT")?;
            Ok(route((*n).to_owned()))
        }
        _ => Err(not_found()),
    }
}

/// A request body that must be a JSON object, in UTF-8.
pub fn parse_body(bytes: &[u8]) -> Result<Map<String, Value>, Error> {
    if bytes.len() > MAX_BODY_BYTES {
        return Err(Error::TooLarge);
    }
    let text = std::str::from_utf8(bytes).map_err(|e| Error::InvalidUtf8 {
        valid_up_to: e.valid_up_to(),
    })?;
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Error::InvalidJson("the body must be a JSON object".into())),
        Err(e) => Err(Error::InvalidJson(e.to_string())),
    }
}

// ---- calls: list with keyset pagination ----------------------------------------------------------

/// The filters of a calls query, as normalized (`from` and `before` as stored ISO bounds).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filters {
    pub status: Option<String>,
    /// Matches `from_number` or `to_number` (E.164).
    pub number: Option<String>,
    /// `started_at >= from` (ISO UTC, as stored).
    pub from: Option<String>,
    /// `started_at < before`: the end of `to` (a date covers that whole UTC day; a time is
    /// inclusive to the millisecond). None also when `to` reaches past the last storable time.
    pub before: Option<String>,
}

impl Filters {
    /// `status=completed&number=…` of the filters that are set, for messages.
    fn describe(&self) -> String {
        let parts: Vec<String> = [
            ("status", &self.status),
            ("number", &self.number),
            ("from", &self.from),
            ("before", &self.before),
        ]
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}")))
        .collect();
        if parts.is_empty() {
            "no filters".into()
        } else {
            parts.join("&")
        }
    }
}

/// Where the next page starts: the last call of this page, in (started_at, call_sid) order,
/// with the filters and page size of the query it continues, so that a cursor alone goes on
/// with the same calls and a cursor with other filters is refused rather than silently
/// paging through another set. Opaque to clients and signed (HMAC-SHA1 with the admin
/// token), so an edited cursor is refused too.
#[derive(Debug, Clone, PartialEq)]
pub struct Cursor {
    pub started_at: String,
    pub call_sid: String,
    pub filters: Filters,
    pub limit: u32,
}

const CURSOR_TAG_LEN: usize = 12;

fn cursor_mac(key: &str, payload: &str) -> HmacSha1 {
    let mut mac = HmacSha1::new_from_slice(key.as_bytes()).expect("any key length");
    mac.update(b"calls-cursor-v2\n");
    mac.update(payload.as_bytes());
    mac
}

impl Cursor {
    pub fn encode(&self, key: &str) -> String {
        let f = &self.filters;
        let payload = json!({
            "t": self.started_at, "c": self.call_sid, "status": f.status, "number": f.number,
            "from": f.from, "before": f.before, "limit": self.limit,
        })
        .to_string();
        let tag = cursor_mac(key, &payload).finalize().into_bytes();
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(payload),
            URL_SAFE_NO_PAD.encode(&tag[..CURSOR_TAG_LEN])
        )
    }

    pub fn decode(s: &str, key: &str) -> Result<Cursor, Error> {
        let bad = || invalid("cursor", "is not a cursor this API returned");
        let (payload, tag) = s.split_once('.').ok_or_else(bad)?;
        let payload = URL_SAFE_NO_PAD.decode(payload).map_err(|_| bad())?;
        let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| bad())?;
        let payload = String::from_utf8(payload).map_err(|_| bad())?;
        if tag.len() != CURSOR_TAG_LEN {
            return Err(bad());
        }
        cursor_mac(key, &payload)
            .verify_truncated_left(&tag)
            .map_err(|_| bad())?;
        let v: Value = serde_json::from_str(&payload).map_err(|_| bad())?;
        let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        Ok(Cursor {
            started_at: text("t").ok_or_else(bad)?,
            call_sid: text("c").ok_or_else(bad)?,
            filters: Filters {
                status: text("status"),
                number: text("number"),
                from: text("from"),
                before: text("before"),
            },
            limit: v
                .get("limit")
                .and_then(Value::as_u64)
                .and_then(|n| u32::try_from(n).ok())
                .filter(|n| (1..=MAX_LIMIT).contains(n))
                .ok_or_else(bad)?,
        })
    }
}

/// `GET /api/admin/calls` query: every filter optional, combined with AND.
#[derive(Debug, Clone, PartialEq)]
pub struct CallsQuery {
    pub filters: Filters,
    pub limit: u32,
    /// Where the page starts: the last call of the previous page.
    pub after: Option<(String, String)>,
}

/// One past the last millisecond a stored time can have (10000-01-01T00:00:00Z): stored
/// times are fixed-width `YYYY-…` text.
const END_OF_TIME_MS: i64 = 253_402_300_800_000;

const MS_PER_DAY: i64 = 86_400_000;

/// Days from 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

fn digits(s: &str, range: std::ops::Range<usize>) -> Option<u32> {
    let part = s.get(range)?;
    if part.bytes().all(|b| b.is_ascii_digit()) {
        part.parse().ok()
    } else {
        None
    }
}

/// An ISO 8601 date (`2026-11-22`) or date-time (`2026-11-22T10:00`, `…:30`, `…:30.5`, with
/// `Z`, `±HH:MM`, or nothing for UTC) as milliseconds since the epoch, and whether it was a
/// bare date.
fn parse_instant(s: &str) -> Option<(i64, bool)> {
    let b = s.as_bytes();
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let (y, m, d) = (
        i64::from(digits(s, 0..4)?),
        digits(s, 5..7)?,
        digits(s, 8..10)?,
    );
    if !(1..=12).contains(&m) || d == 0 || d > days_in_month(y, m) {
        return None;
    }
    let day_ms = days_from_civil(y, m, d) * MS_PER_DAY;
    if b.len() == 10 {
        return Some((day_ms, true));
    }
    if !matches!(b[10], b'T' | b't') || b.len() < 16 || b[13] != b':' {
        return None;
    }
    let (h, mi) = (digits(s, 11..13)?, digits(s, 14..16)?);
    let mut i = 16;
    let mut sec = 0;
    let mut ms = 0;
    if b.get(i) == Some(&b':') {
        sec = digits(s, i + 1..i + 3)?;
        i += 3;
        if b.get(i) == Some(&b'.') {
            let start = i + 1;
            let mut end = start;
            while end < b.len() && b[end].is_ascii_digit() {
                end += 1;
            }
            if end == start || end - start > 9 {
                return None;
            }
            // Milliseconds: the first three digits, padded.
            let frac = &s[start..end];
            ms = format!("{:0<3}", &frac[..frac.len().min(3)]).parse().ok()?;
            i = end;
        }
    }
    if h > 23 || mi > 59 || sec > 59 {
        return None;
    }
    let offset_min: i64 = match &s[i..] {
        "" | "Z" | "z" => 0,
        tz => {
            let tb = tz.as_bytes();
            if tb.len() != 6 || tb[3] != b':' {
                return None;
            }
            let (oh, om) = (digits(tz, 1..3)?, digits(tz, 4..6)?);
            if oh > 23 || om > 59 {
                return None;
            }
            let total = i64::from(oh * 60 + om);
            match tb[0] {
                b'+' => total,
                b'-' => -total,
                _ => return None,
            }
        }
    };
    let t = day_ms
        + i64::from(h) * 3_600_000
        + i64::from(mi) * 60_000
        + i64::from(sec) * 1000
        + i64::from(ms)
        - offset_min * 60_000;
    Some((t, false))
}

/// Epoch ms of the latest time `started_at` may have, as the stored ISO text.
fn bound(field: &str, raw: &str) -> Result<(i64, bool), Error> {
    // form decoding turns a literal `+` (as in `+09:00`) into a space.
    let s = raw.replace(' ', "+");
    let parsed = parse_instant(&s).ok_or_else(|| {
        invalid(
            field,
            format!(
                "{raw:?} is not an ISO 8601 date or date-time such as 2026-11-22 or \
                 2026-11-22T10:00:00+09:00"
            ),
        )
    })?;
    // Stored times are 1970..9999 (iso_time's range, fixed-width text).
    if !(0..END_OF_TIME_MS).contains(&parsed.0) {
        return Err(invalid(field, "must be between 1970 and 9999"));
    }
    Ok(parsed)
}

/// The `number` filter: E.164, as calls are stored. A domestic Japanese number gets a
/// suggestion of its +81 form.
fn number_filter(raw: &str) -> Result<String, Error> {
    // `?number=+8131…` arrives form-decoded as " 8131…".
    let n = match raw.strip_prefix(' ') {
        Some(rest) => format!("+{rest}"),
        None => raw.to_owned(),
    };
    if config::is_e164(&n) {
        return Ok(n);
    }
    let digits: String = n
        .chars()
        .filter(|c| !matches!(c, '-' | ' ' | '(' | ')' | '.'))
        .collect();
    let hint = match digits.strip_prefix('0') {
        Some(rest)
            if !rest.starts_with('0')
                && rest.bytes().all(|b| b.is_ascii_digit())
                && config::is_e164(&format!("+81{rest}")) =>
        {
            format!(" (for a number in Japan, +81{rest})")
        }
        _ => String::new(),
    };
    let shown: String = n.chars().take(40).collect();
    Err(invalid(
        "number",
        format!(
            "{shown:?} is not an E.164 number; calls are stored in E.164, so write it in \
             +81… form{hint}, such as +81312345678 (the + as %2B)"
        ),
    ))
}

impl CallsQuery {
    /// Parses the raw query string (without `?`). Unknown or repeated parameters are refused;
    /// an empty value counts as not given. `cursor_key` checks the cursor's signature. A
    /// cursor brings the filters and page size of the query that made it: given alone it
    /// goes on with them, given with other filters it is refused (a `limit` may change).
    pub fn parse(query: &str, cursor_key: &str) -> Result<CallsQuery, Error> {
        let mut seen = std::collections::HashSet::new();
        // Each filter: None if not given, Some(normalized value) if given.
        let mut status = None;
        let mut number = None;
        let mut from = None;
        let mut before = None;
        let mut limit = None;
        let mut cursor = None;
        let mut from_ms = None;
        let mut before_ms = None;
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let key = key.into_owned();
            if !seen.insert(key.clone()) {
                return Err(invalid(&key, "given more than once"));
            }
            if value.is_empty() {
                if ["status", "number", "from", "to", "limit", "cursor"].contains(&key.as_str()) {
                    continue;
                }
                return Err(invalid(&key, "unknown query parameter"));
            }
            match key.as_str() {
                "status" => {
                    if !CALL_STATUSES.contains(&value.as_ref()) {
                        return Err(invalid(
                            "status",
                            format!("{value:?} is not one of {}", CALL_STATUSES.join(", ")),
                        ));
                    }
                    status = Some(Some(value.into_owned()));
                }
                "number" => number = Some(Some(number_filter(&value)?)),
                "from" => {
                    let (t, _) = bound("from", &value)?;
                    from_ms = Some(t);
                    from = Some(Some(iso_time(t as u64)));
                }
                "to" => {
                    let (t, date_only) = bound("to", &value)?;
                    let end = if date_only { t + MS_PER_DAY } else { t + 1 };
                    before_ms = Some(end);
                    // The end of 9999-12-31 bounds nothing (and has no 4-digit year).
                    before = Some((end < END_OF_TIME_MS).then(|| iso_time(end as u64)));
                }
                "limit" => {
                    limit = Some(
                        value
                            .parse::<u32>()
                            .ok()
                            .filter(|n| (1..=MAX_LIMIT).contains(n))
                            .ok_or_else(|| {
                                invalid(
                                    "limit",
                                    format!("must be an integer from 1 to {MAX_LIMIT}"),
                                )
                            })?,
                    );
                }
                "cursor" => cursor = Some(Cursor::decode(&value, cursor_key)?),
                _ => return Err(invalid(&key, "unknown query parameter")),
            }
        }
        if let (Some(f), Some(b)) = (from_ms, before_ms) {
            if b <= f {
                return Err(invalid("to", "must not be before from"));
            }
        }
        let given = Filters {
            status: status.clone().flatten(),
            number: number.clone().flatten(),
            from: from.clone().flatten(),
            before: before.clone().flatten(),
        };
        let Some(cursor) = cursor else {
            return Ok(CallsQuery {
                filters: given,
                limit: limit.unwrap_or(DEFAULT_LIMIT),
                after: None,
            });
        };
        let made_for = &cursor.filters;
        let differs = [
            (status.is_some(), &given.status, &made_for.status),
            (number.is_some(), &given.number, &made_for.number),
            (from.is_some(), &given.from, &made_for.from),
            (before.is_some(), &given.before, &made_for.before),
        ]
        .iter()
        .any(|(was_given, g, m)| *was_given && g != m);
        if differs {
            return Err(invalid(
                "cursor",
                format!(
                    "was made for a query with {}, not these filters; give the cursor alone \
                     (it keeps its filters) or with the same filters",
                    made_for.describe()
                ),
            ));
        }
        Ok(CallsQuery {
            filters: cursor.filters.clone(),
            limit: limit.unwrap_or(cursor.limit),
            after: Some((cursor.started_at, cursor.call_sid)),
        })
    }

    /// The page's rows, newest first; one more than `limit` to learn whether a next page
    /// exists (see [`CallsQuery::page`]).
    ///
    /// A number is looked for as the caller and as the called number separately, each side
    /// walking its own index newest first and stopping at the page's size, and the two are
    /// merged: one query with `from_number = ? OR to_number = ?` would read and sort every
    /// call of that number (the business's own number is on nearly every call) for each page.
    pub fn statement(&self) -> Statement {
        let mut params: Vec<Value> = Vec::new();
        let mut param = |v: Value| {
            params.push(v);
            params.len()
        };
        let mut conds = Vec::new();
        let f = &self.filters;
        if let Some(s) = &f.status {
            conds.push(format!("status = ?{}", param(json!(s))));
        }
        if let Some(from) = &f.from {
            conds.push(format!("started_at >= ?{}", param(json!(from))));
        }
        if let Some(b) = &f.before {
            conds.push(format!("started_at < ?{}", param(json!(b))));
        }
        if let Some((started_at, call_sid)) = &self.after {
            let t = param(json!(started_at));
            let s = param(json!(call_sid));
            conds.push(format!(
                "(started_at < ?{t} OR (started_at = ?{t} AND call_sid < ?{s}))"
            ));
        }
        let number = f.number.as_ref().map(|n| param(json!(n)));
        let limit = param(json!(self.limit + 1));
        const ORDER: &str = "ORDER BY started_at DESC, call_sid DESC";
        let select = |extra: Option<String>| {
            let conds: Vec<&str> = extra
                .iter()
                .map(String::as_str)
                .chain(conds.iter().map(String::as_str))
                .collect();
            let mut sql = String::from("SELECT * FROM calls");
            if !conds.is_empty() {
                sql.push_str(" WHERE ");
                sql.push_str(&conds.join(" AND "));
            }
            format!("{sql} {ORDER} LIMIT ?{limit}")
        };
        let sql = match number {
            None => select(None),
            Some(n) => format!(
                "SELECT * FROM ({}) UNION SELECT * FROM ({}) {ORDER} LIMIT ?{limit}",
                select(Some(format!("from_number = ?{n}"))),
                select(Some(format!("to_number = ?{n}"))),
            ),
        };
        Statement::new(sql, params)
    }

    /// `{"calls": [...], "next_cursor": "..." | null}` from the rows [`CallsQuery::statement`]
    /// returned.
    pub fn page(&self, mut rows: Vec<Value>, cursor_key: &str) -> Value {
        let more = rows.len() > self.limit as usize;
        rows.truncate(self.limit as usize);
        let next = more
            .then(|| rows.last())
            .flatten()
            .and_then(|last| {
                Some(Cursor {
                    started_at: last.get("started_at")?.as_str()?.to_owned(),
                    call_sid: last.get("call_sid")?.as_str()?.to_owned(),
                    filters: self.filters.clone(),
                    limit: self.limit,
                })
            })
            .map(|c| c.encode(cursor_key));
        json!({ "calls": rows, "next_cursor": next })
    }
}

// ---- one call ------------------------------------------------------------------------------------

/// The call row (zero or one).
pub fn select_call(call_sid: &CallSid) -> Statement {
    Statement::new(
        "SELECT * FROM calls WHERE call_sid = ?1",
        vec![json!(call_sid.as_str())],
    )
}

/// The call's transcript in conversation order.
pub fn select_transcript(call_sid: &CallSid) -> Statement {
    Statement::new(
        "SELECT seq, role, text, offset_ms, item_id, interrupted FROM transcript_entries \
         WHERE call_sid = ?1 ORDER BY seq",
        vec![json!(call_sid.as_str())],
    )
}

/// The call's events in order.
pub fn select_events(call_sid: &CallSid) -> Statement {
    Statement::new(
        "SELECT seq, at, type, detail FROM call_events WHERE call_sid = ?1 ORDER BY seq",
        vec![json!(call_sid.as_str())],
    )
}

/// `{"call": {...}, "transcript": [...], "events": [...]}`: `interrupted` as a boolean and
/// each event's `detail` as JSON (as text when it is not JSON).
pub fn call_detail(call: Value, mut transcript: Vec<Value>, mut events: Vec<Value>) -> Value {
    for entry in &mut transcript {
        if let Some(v) = entry.get_mut("interrupted") {
            let flag = match &*v {
                Value::Bool(b) => *b,
                other => other.as_f64().is_some_and(|n| n != 0.0),
            };
            *v = Value::Bool(flag);
        }
    }
    for event in &mut events {
        if let Some(v) = event.get_mut("detail") {
            if let Some(parsed) = v.as_str().and_then(|s| serde_json::from_str(s).ok()) {
                *v = parsed;
            }
        }
    }
    json!({ "call": call, "transcript": transcript, "events": events })
}

// ---- recordings ----------------------------------------------------------------------------------

/// How long a recording link plays: a review session's listening, pauses included.
pub const RECORDING_LINK_TTL_MS: u64 = 6 * 60 * 60 * 1000;

type HmacSha256 = Hmac<Sha256>;

/// The signature of a link to `call_sid`'s recording good until `expires` (epoch seconds),
/// keyed by the admin token: changing the token revokes every link.
fn link_mac(admin_token: &str, call_sid: &CallSid, expires: u64) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(admin_token.as_bytes()).expect("any key length");
    mac.update(b"phone-agent-bridge recording link\n");
    mac.update(call_sid.as_str().as_bytes());
    mac.update(b"\n");
    mac.update(expires.to_string().as_bytes());
    mac
}

/// `GET /api/admin/calls/{CallSid}/recording-link`: the recording's URL with an expiry and a
/// signature in its query, which authorizes that one recording without the bearer token, so
/// the review page can give it to an `<audio>` element. The browser then streams it with
/// `Range` requests instead of the page downloading the whole WAV first.
pub fn recording_link(call_sid: &CallSid, admin_token: &str, now_ms: u64) -> Value {
    let expires = (now_ms + RECORDING_LINK_TTL_MS) / 1000;
    let signature = URL_SAFE_NO_PAD.encode(
        link_mac(admin_token, call_sid, expires)
            .finalize()
            .into_bytes(),
    );
    json!({
        "url": format!(
            "{PREFIX}calls/{}/recording?expires={expires}&signature={signature}",
            call_sid.as_str()
        ),
        "expires_at": iso_time(expires * 1000),
    })
}

/// Why a recording link in a request's query does not authorize it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkRefusal {
    /// No `signature` in the query: the request needs the bearer token.
    NoLink,
    Malformed,
    Expired,
    /// Not signed with this admin token for this call and expiry.
    BadSignature,
}

/// Checks the `expires` and `signature` of a recording link (the query of
/// [`recording_link`]'s URL) for `call_sid` at `now_ms`; the comparison is constant-time.
pub fn check_recording_link(
    call_sid: &CallSid,
    query: &str,
    admin_token: &str,
    now_ms: u64,
) -> Result<(), LinkRefusal> {
    let param = |name: &str| {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    };
    let Some(signature) = param("signature") else {
        return Err(LinkRefusal::NoLink);
    };
    let expires: u64 = param("expires")
        .and_then(|e| e.parse().ok())
        .ok_or(LinkRefusal::Malformed)?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| LinkRefusal::Malformed)?;
    if admin_token.is_empty() {
        return Err(LinkRefusal::BadSignature);
    }
    link_mac(admin_token, call_sid, expires)
        .verify_slice(&signature)
        .map_err(|_| LinkRefusal::BadSignature)?;
    if expires.saturating_mul(1000) <= now_ms {
        return Err(LinkRefusal::Expired);
    }
    Ok(())
}

/// Where the call's recording is (`recording_key`) and how large (`recording_bytes`); no row
/// when there is no such call, a null key when it has no recording.
pub fn select_recording(call_sid: &CallSid) -> Statement {
    Statement::new(
        "SELECT recording_key, recording_bytes, recording_duration_ms FROM calls WHERE call_sid = ?1",
        vec![json!(call_sid.as_str())],
    )
}

/// The recording's key from [`select_recording`]'s rows: a 404 for an unknown call or a call
/// without a recording, saying which.
pub fn recording_key(call_sid: &CallSid, rows: &[Value]) -> Result<String, Error> {
    let row = rows
        .first()
        .ok_or_else(|| Error::NotFound(format!("no call {:?}", call_sid.as_str())))?;
    row.get("recording_key")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| Error::NotFound(format!("call {:?} has no recording", call_sid.as_str())))
}

/// Bytes `start..=end` of a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

impl ByteRange {
    pub fn len(&self) -> u64 {
        self.end - self.start + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// The `Content-Range` of a 206 answer.
    pub fn content_range(&self, size: u64) -> String {
        format!("bytes {}-{}/{size}", self.start, self.end)
    }
}

/// What a `Range` header asks of a resource of `size` bytes (RFC 9110 §14): `Ok(None)` for
/// the whole of it (no header, another unit, or several ranges, which a server may answer
/// in full), `Ok(Some(range))` for one satisfiable byte range, and an error (416) for a
/// malformed or unsatisfiable one.
pub fn byte_range(header: Option<&str>, size: u64) -> Result<Option<ByteRange>, Error> {
    let Some(h) = header.map(str::trim) else {
        return Ok(None);
    };
    let Some((unit, spec)) = h.split_once('=') else {
        return Err(Error::RangeNotSatisfiable { size });
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return Ok(None);
    }
    if spec.contains(',') {
        return Ok(None);
    }
    let bad = || Error::RangeNotSatisfiable { size };
    let number = |s: &str| -> Result<u64, Error> {
        let s = s.trim();
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        s.parse().map_err(|_| bad())
    };
    let (first, last) = spec.split_once('-').ok_or_else(bad)?;
    let range = if first.trim().is_empty() {
        // The last `n` bytes.
        let n = number(last)?;
        if n == 0 || size == 0 {
            return Err(bad());
        }
        ByteRange {
            start: size - n.min(size),
            end: size - 1,
        }
    } else {
        let start = number(first)?;
        let end = if last.trim().is_empty() {
            u64::MAX
        } else {
            number(last)?
        };
        if end < start || start >= size {
            return Err(bad());
        }
        ByteRange {
            start,
            end: end.min(size - 1),
        }
    };
    Ok(Some(range))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agents::testdb;

    const KEY: &str = "admin-token-0123456789";

    fn field(e: Error) -> String {
        match e {
            Error::Invalid { field, .. } => field,
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    fn q(query: &str) -> Result<CallsQuery, Error> {
        CallsQuery::parse(query, KEY)
    }

    #[test]
    fn bearer_token_check() {
        assert!(authorized(
            Some("Bearer s3cret-s3cret-s3cret"),
            "s3cret-s3cret-s3cret"
        ));
        assert!(authorized(
            Some("bearer s3cret-s3cret-s3cret"),
            "s3cret-s3cret-s3cret"
        ));
        assert!(authorized(
            Some("  Bearer   s3cret-s3cret-s3cret "),
            "s3cret-s3cret-s3cret"
        ));
        assert!(!authorized(
            Some("Bearer s3cret-s3cret-s3cre"),
            "s3cret-s3cret-s3cret"
        ));
        assert!(!authorized(
            Some("Bearer s3cret-s3cret-s3cret2"),
            "s3cret-s3cret-s3cret"
        ));
        assert!(!authorized(
            Some("Bearer S3CRET-S3CRET-S3CRET"),
            "s3cret-s3cret-s3cret"
        ));
        assert!(!authorized(None, "s3cret-s3cret-s3cret"));
        assert!(!authorized(Some(""), "s3cret-s3cret-s3cret"));
        assert!(!authorized(Some("Bearer"), "s3cret-s3cret-s3cret"));
        assert!(!authorized(
            Some("s3cret-s3cret-s3cret"),
            "s3cret-s3cret-s3cret"
        ));
        assert!(!authorized(
            Some("Basic s3cret-s3cret-s3cret"),
            "s3cret-s3cret-s3cret"
        ));
        assert!(!authorized(
            Some("Token s3cret-s3cret-s3cret"),
            "s3cret-s3cret-s3cret"
        ));
        // Nothing is authorized when no token is configured, not even an empty bearer.
        assert!(!authorized(Some("Bearer "), ""));
        assert!(!authorized(Some("Bearer x"), ""));
        assert!(!authorized(None, ""));
        // Nor with a token short enough to guess: even the right one is refused.
        assert!(!authorized(Some("Bearer s3cret"), "s3cret"));
        assert!(!authorized(
            Some("Bearer 123456789012345"),
            "123456789012345"
        ));
        assert!(authorized(
            Some("Bearer 1234567890123456"),
            "1234567890123456"
        ));
        let why = admit(
            &Ok(Route::ListCalls),
            "",
            Some("Bearer s3cret"),
            "s3cret",
            0,
        );
        assert_eq!(
            why,
            Err("ADMIN_TOKEN is shorter than 16 characters: set a longer one")
        );
    }

    #[test]
    fn errors_map_to_status_and_body() {
        let e = invalid("voice", "unknown voice");
        assert_eq!(e.status(), 400);
        assert_eq!(
            e.body(),
            json!({"error": "invalid_request", "field": "voice", "message": "unknown voice"})
        );
        let e = parse_body(b"{nope").unwrap_err();
        assert_eq!(e.status(), 400);
        assert_eq!(e.body()["error"], "invalid_json");
        assert!(e.body().get("field").is_none());
        // JSON, and not an object: `invalid_json` too, with no field to name.
        let e = parse_body(b"[1]").unwrap_err();
        assert_eq!(e.status(), 400);
        assert_eq!(e.body()["error"], "invalid_json");
        assert!(e.body().get("field").is_none(), "{:?}", e.body());
        assert_eq!(
            parse_body(" ".repeat(MAX_BODY_BYTES + 1).as_bytes())
                .unwrap_err()
                .status(),
            413
        );
        assert_eq!(parse_body(br#"{"a":1}"#).unwrap()["a"], 1);
        assert_eq!(
            Error::Unauthorized.headers(),
            vec![("WWW-Authenticate", "Bearer".to_string())]
        );
        assert_eq!(Error::Unauthorized.status(), 401);
        assert_eq!(Error::Internal.body()["message"], "internal error");
        assert_eq!(Error::Conflict("x".into()).status(), 409);
        let r: Error = Refusal::Conflict("busy".into()).into();
        assert_eq!(r.body(), json!({"error": "conflict", "message": "busy"}));
    }

    #[test]
    fn a_recording_link_plays_that_one_recording_until_it_expires() {
        let sid = CallSid::new("CA0123456789abcdef0123456789abcdef");
        let now = 1_795_000_000_000;
        let link = recording_link(&sid, "admin-token-0123456789", now);
        let url = link["url"].as_str().unwrap();
        let (path, query) = url.split_once('?').unwrap();
        assert_eq!(route("GET", path), Ok(Route::GetRecording(sid.clone())));
        let expires = (now + RECORDING_LINK_TTL_MS) / 1000;
        assert!(
            query.starts_with(&format!("expires={expires}&signature=")),
            "{query}"
        );
        assert_eq!(link["expires_at"], iso_time(expires * 1000));

        let check =
            |sid: &CallSid, q: &str, token: &str, at: u64| check_recording_link(sid, q, token, at);
        assert_eq!(check(&sid, query, "admin-token-0123456789", now), Ok(()));
        assert_eq!(
            check(&sid, query, "admin-token-0123456789", expires * 1000 - 1),
            Ok(())
        );
        assert_eq!(
            check(&sid, query, "admin-token-0123456789", expires * 1000),
            Err(LinkRefusal::Expired)
        );
        // Past its time, the answer says so (a player asks for a new link), not "sign in".
        let route = Ok(Route::GetRecording(sid.clone()));
        let why = admit(
            &route,
            query,
            None,
            "admin-token-0123456789",
            expires * 1000,
        )
        .unwrap_err();
        let e = refused(why);
        assert_eq!(
            (e.status(), e.body()["error"].clone()),
            (401, json!("link_expired"))
        );
        assert_eq!(
            refused(admit(&route, "", None, "admin-token-0123456789", now).unwrap_err()),
            Error::Unauthorized
        );
        // Another call, another token, a moved expiry, a changed signature: refused.
        let other = CallSid::new("CA0123456789abcdef0123456789abcdee");
        assert_eq!(
            check(&other, query, "admin-token-0123456789", now),
            Err(LinkRefusal::BadSignature)
        );
        assert_eq!(
            check(&sid, query, "new-token", now),
            Err(LinkRefusal::BadSignature)
        );
        assert_eq!(check(&sid, query, "", now), Err(LinkRefusal::BadSignature));
        let later = query.replace(&expires.to_string(), &(expires + 3600).to_string());
        assert_eq!(
            check(&sid, &later, "admin-token-0123456789", now),
            Err(LinkRefusal::BadSignature)
        );
        let sig = query.split_once("signature=").unwrap().1;
        let flipped = format!(
            "expires={expires}&signature={}{}",
            if sig.starts_with('A') { 'B' } else { 'A' },
            &sig[1..]
        );
        assert_eq!(
            check(&sid, &flipped, "admin-token-0123456789", now),
            Err(LinkRefusal::BadSignature)
        );
        assert_eq!(
            check(
                &sid,
                &format!("expires={expires}&signature={}", &sig[..8]),
                "admin-token-0123456789",
                now
            ),
            Err(LinkRefusal::BadSignature)
        );
        // No link at all, or not one.
        assert_eq!(
            check(&sid, "", "admin-token-0123456789", now),
            Err(LinkRefusal::NoLink)
        );
        assert_eq!(
            check(&sid, "expires=1", "admin-token-0123456789", now),
            Err(LinkRefusal::NoLink)
        );
        for bad in [
            "signature=abc",
            "expires=soon&signature=abc",
            &format!("expires={expires}&signature=not*base64"),
        ] {
            assert_eq!(
                check(&sid, bad, "admin-token-0123456789", now),
                Err(LinkRefusal::Malformed),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_recording_key_is_found_or_the_404_says_whether_the_call_or_its_recording_is_missing() {
        let sid = CallSid::new("CA0123456789abcdef0123456789abcdef");
        let key = "recordings/CA0123456789abcdef0123456789abcdef.wav";
        assert_eq!(
            recording_key(&sid, &[json!({ "recording_key": key })]),
            Ok(key.to_owned())
        );
        let no_call = recording_key(&sid, &[]).unwrap_err();
        assert_eq!(no_call.status(), 404);
        assert!(no_call.to_string().starts_with("no call"), "{no_call}");
        for row in [json!({ "recording_key": null }), json!({})] {
            let none = recording_key(&sid, &[row]).unwrap_err();
            assert_eq!(none.status(), 404);
            assert!(none.to_string().contains("has no recording"), "{none}");
        }
    }

    #[test]
    fn a_request_is_admitted_with_the_token_or_for_a_recording_with_its_link() {
        let sid = CallSid::new("CA0123456789abcdef0123456789abcdef");
        let now = 1_795_000_000_000;
        let url = recording_link(&sid, "admin-token-0123456789", now)["url"]
            .as_str()
            .unwrap()
            .to_owned();
        let (path, query) = url.split_once('?').unwrap();
        let recording = route("GET", path);
        let call = route("GET", "/api/admin/calls/CA0123456789abcdef0123456789abcdef");
        let bearer = Some("Bearer admin-token-0123456789");
        assert_eq!(
            admit(&call, "", bearer, "admin-token-0123456789", now),
            Ok(())
        );
        assert_eq!(
            admit(&recording, "", bearer, "admin-token-0123456789", now),
            Ok(())
        );
        assert_eq!(
            admit(&recording, query, None, "admin-token-0123456789", now),
            Ok(())
        );
        // The link opens the recording only, and not once expired.
        assert_eq!(
            admit(&call, query, None, "admin-token-0123456789", now),
            Err("no Authorization header")
        );
        assert_eq!(
            admit(
                &recording,
                query,
                None,
                "admin-token-0123456789",
                now + RECORDING_LINK_TTL_MS
            ),
            Err("the recording link has expired")
        );
        assert_eq!(
            admit(&recording, query, None, "other-token-0123456789", now),
            Err("a bad recording link")
        );
        assert_eq!(
            admit(&recording, "", None, "admin-token-0123456789", now),
            Err("no Authorization header")
        );
        assert_eq!(
            admit(
                &recording,
                query,
                Some("Bearer wrong"),
                "admin-token-0123456789",
                now
            ),
            Err("wrong credentials")
        );
        assert_eq!(
            admit(&recording, query, None, "", now),
            Err("ADMIN_TOKEN is not configured")
        );
        assert_eq!(
            admit(
                &route("GET", "/api/admin/nowhere"),
                "",
                None,
                "admin-token-0123456789",
                now
            ),
            Err("no Authorization header")
        );
    }

    #[test]
    fn a_store_failure_that_passes_is_a_503_to_retry_and_any_other_a_500() {
        for passing in [
            "D1_ERROR: database is locked: SQLITE_BUSY",
            "D1_ERROR: Network connection lost.",
            "D1 DB is overloaded. Requests queued for too long.",
            "D1_ERROR: Operation timed out",
            "D1_ERROR: Failed to parse body as JSON, got: Error: internal error; reference = b3ls",
            "please try again",
            "R2 is temporarily unavailable",
        ] {
            let e = storage_failure(passing);
            assert_eq!(e, Error::Unavailable, "{passing}");
            assert_eq!(e.status(), 503);
            assert_eq!(e.code(), "unavailable");
            assert_eq!(e.headers(), vec![("Retry-After", "5".to_string())]);
            assert!(e.body()["message"].as_str().unwrap().contains("try again"));
        }
        for lasting in [
            "D1_ERROR: no such table: calls: SQLITE_ERROR",
            "D1_TYPE_ERROR: Type 'object' not supported for value",
            "Binding DB is undefined",
        ] {
            let e = storage_failure(lasting);
            assert_eq!(e, Error::Internal, "{lasting}");
            assert_eq!(e.status(), 500);
            assert!(e.headers().is_empty());
        }
    }

    #[test]
    fn routes() {
        use Route::*;
        let r = |m: &str, p: &str| route(m, p);
        assert_eq!(r("GET", "/api/admin/calls"), Ok(ListCalls));
        assert_eq!(r("GET", "/api/admin/calls/"), Ok(ListCalls));
        assert_eq!(
            r("GET", "/api/admin/calls/CA123"),
            Ok(GetCall(CallSid::new("CA123")))
        );
        assert_eq!(
            r("GET", "/api/admin/calls/CA123/recording-link"),
            Ok(GetRecordingLink(CallSid::new("CA123")))
        );
        // HEAD, for tools that ask the size first.
        assert_eq!(
            r("HEAD", "/api/admin/calls/CA123/recording"),
            Ok(GetRecording(CallSid::new("CA123")))
        );
        assert_eq!(
            r("PUT", "/api/admin/calls/CA123/recording"),
            Err(Error::MethodNotAllowed { allow: "GET, HEAD" })
        );
        assert_eq!(
            r("POST", "/api/admin/calls/CA123/recording-link"),
            Err(Error::MethodNotAllowed { allow: "GET" })
        );
        assert_eq!(r("GET", "/api/admin/agents"), Ok(ListAgents));
        assert_eq!(r("POST", "/api/admin/agents"), Ok(CreateAgent));
        assert_eq!(
            r("GET", "/api/admin/agents/a_1"),
            Ok(GetAgent("a_1".into()))
        );
        assert_eq!(
            r("PUT", "/api/admin/agents/a_1"),
            Ok(UpdateAgent("a_1".into()))
        );
        assert_eq!(
            r("PATCH", "/api/admin/agents/a_1"),
            Ok(UpdateAgent("a_1".into()))
        );
        assert_eq!(
            r("DELETE", "/api/admin/agents/a_1"),
            Ok(DeleteAgent("a_1".into()))
        );
        assert_eq!(r("GET", "/api/admin/numbers"), Ok(ListNumbers));
        let n = || "+81312345678".to_string();
        assert_eq!(
            r("PUT", "/api/admin/numbers/%2B81312345678"),
            Ok(AssignNumber(n()))
        );
        assert_eq!(
            r("PUT", "/api/admin/numbers/%2b81312345678"),
            Ok(AssignNumber(n()))
        );
        assert_eq!(
            r("PUT", "/api/admin/numbers/+81312345678"),
            Ok(AssignNumber(n()))
        );
        assert_eq!(
            r("DELETE", "/api/admin/numbers/%2B81312345678"),
            Ok(UnassignNumber(n()))
        );
        assert_eq!(
            r("GET", "/api/admin/numbers/%2B81312345678"),
            Ok(GetNumber(n()))
        );

        assert_eq!(
            field(r("PUT", "/api/admin/numbers/81312345678").unwrap_err()),
            "number"
        );
        assert_eq!(
            field(r("PUT", "/api/admin/numbers/%2081312345678").unwrap_err()),
            "number"
        );
        // A number with the domestic 0 after +81 never answers a call: not assigned, but
        // one stored that way can be read and unassigned.
        assert_eq!(
            field(r("PUT", "/api/admin/numbers/%2B810312345678").unwrap_err()),
            "number"
        );
        let zero = || "+810312345678".to_string();
        assert_eq!(
            r("DELETE", "/api/admin/numbers/%2B810312345678"),
            Ok(UnassignNumber(zero()))
        );
        assert_eq!(
            r("GET", "/api/admin/numbers/%2B810312345678"),
            Ok(GetNumber(zero()))
        );
        let status = |m: &str, p: &str| r(m, p).unwrap_err().status();
        assert_eq!(status("POST", "/api/admin/calls"), 405);
        assert_eq!(status("DELETE", "/api/admin/calls/CA1"), 405);
        assert_eq!(status("DELETE", "/api/admin/agents"), 405);
        assert_eq!(status("POST", "/api/admin/agents/a"), 405);
        assert_eq!(status("POST", "/api/admin/numbers"), 405);
        assert_eq!(status("POST", "/api/admin/numbers/%2B81312345678"), 405);
        assert_eq!(
            r("POST", "/api/admin/numbers/x").unwrap_err().headers(),
            vec![("Allow", "GET, PUT, DELETE".to_string())]
        );
        assert_eq!(status("GET", "/api/admin/"), 404);
        assert_eq!(status("GET", "/api/admin/nope"), 404);
        assert_eq!(status("GET", "/api/admin/agents/a/b"), 404);
        assert_eq!(status("GET", "/api/admin/agents//"), 404);
        assert_eq!(status("GET", "/api/admin/agents/a%2Fb"), 404);
        assert_eq!(status("GET", "/api/admin/agents/%ZZ"), 404);
        assert_eq!(status("GET", "/api/admin/calls/CA-1"), 404);
        assert_eq!(status("GET", "/api/other"), 404);
    }

    #[test]
    fn recording_route_and_byte_ranges() {
        assert_eq!(
            route("GET", "/api/admin/calls/CA1/recording"),
            Ok(Route::GetRecording(CallSid::new("CA1")))
        );
        assert_eq!(
            route("PUT", "/api/admin/calls/CA1/recording")
                .unwrap_err()
                .status(),
            405
        );
        assert_eq!(
            route("GET", "/api/admin/calls/CA-1/recording")
                .unwrap_err()
                .status(),
            404
        );
        let r = |h: &str| byte_range(Some(h), 1_000);
        let some = |start, end| Ok(Some(ByteRange { start, end }));
        assert_eq!(byte_range(None, 1_000), Ok(None));
        assert_eq!(r("bytes=0-43"), some(0, 43));
        assert_eq!(r("bytes=0-43").unwrap().unwrap().len(), 44);
        assert_eq!(r("bytes=990-"), some(990, 999));
        assert_eq!(r("bytes=990-5000"), some(990, 999));
        assert_eq!(r("bytes=-10"), some(990, 999));
        assert_eq!(r("bytes=-5000"), some(0, 999));
        assert_eq!(r(" Bytes = 5 - 6 "), some(5, 6));
        assert_eq!(r("bytes=0-0"), some(0, 0));
        assert_eq!(r("items=0-5"), Ok(None), "another unit is ignored");
        assert_eq!(r("bytes=0-1,5-6"), Ok(None), "several ranges: the whole");
        for bad in [
            "bytes=1000-",
            "bytes=1000-1001",
            "bytes=5-4",
            "bytes=-0",
            "bytes=a-b",
            "bytes=-",
            "bytes=1",
            "bytes=+1-2",
            "bytes",
            "bytes=99999999999999999999999-",
        ] {
            let e = r(bad).unwrap_err();
            assert_eq!(e.status(), 416, "{bad}");
            assert_eq!(
                e.headers(),
                vec![("Content-Range", "bytes */1000".to_string())]
            );
        }
        assert_eq!(byte_range(Some("bytes=-1"), 0).unwrap_err().status(), 416);
        assert_eq!(
            ByteRange { start: 0, end: 43 }.content_range(1_000),
            "bytes 0-43/1000"
        );
    }

    #[test]
    fn a_calls_recording_is_found_by_its_row() {
        let conn = testdb::open();
        let sid = CallSid::new("CA1");
        assert!(testdb::query(&conn, &select_recording(&sid)).is_empty());
        let ring = crate::store::Record::CallRinging {
            call_sid: "CA1".into(),
            account_sid: "AC1".into(),
            from: "+15550001111".into(),
            to: "+81312345678".into(),
            direction: "inbound".into(),
            agent_id: "default".into(),
            at_ms: 1,
        };
        testdb::batch(&conn, &ring.statements(1)).unwrap();
        let rows = testdb::query(&conn, &select_recording(&sid));
        assert_eq!(rows[0]["recording_key"], Value::Null);
        let rec = crate::store::Record::Recording {
            call_sid: "CA1".into(),
            key: "recordings/CA1.wav".into(),
            duration_ms: 10,
            bytes: 364,
        };
        testdb::batch(&conn, &rec.statements(2)).unwrap();
        let rows = testdb::query(&conn, &select_recording(&sid));
        assert_eq!(
            rows,
            vec![
                json!({"recording_key": "recordings/CA1.wav", "recording_bytes": 364, "recording_duration_ms": 10})
            ]
        );
    }

    #[test]
    fn cursor_round_trip_and_tamper_rejection() {
        let c = Cursor {
            started_at: "2026-11-22T01:32:02.123Z".into(),
            call_sid: "CA0123456789abcdef".into(),
            filters: Filters::default(),
            limit: 20,
        };
        let s = c.encode(KEY);
        assert!(s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)));
        assert_eq!(Cursor::decode(&s, KEY), Ok(c.clone()));
        // Another key (a rotated admin token) does not accept it.
        assert_eq!(field(Cursor::decode(&s, "other").unwrap_err()), "cursor");
        // Any changed character is refused.
        for i in 0..s.len() {
            let mut b = s.clone().into_bytes();
            b[i] = if b[i] == b'A' { b'B' } else { b'A' };
            let t = String::from_utf8(b).unwrap();
            assert!(Cursor::decode(&t, KEY).is_err(), "{t}");
        }
        // A forged payload with a copied tag too.
        let (_, tag) = s.split_once('.').unwrap();
        let forged = format!(
            "{}.{tag}",
            URL_SAFE_NO_PAD.encode(r#"{"t":"2099-01-01T00:00:00.000Z","c":"CA0","limit":20}"#)
        );
        assert!(Cursor::decode(&forged, KEY).is_err());
        for junk in ["", ".", "abc", "abc.def", "%%%.%%%"] {
            assert!(Cursor::decode(junk, KEY).is_err(), "{junk}");
        }
        assert_eq!(field(q("cursor=abc").unwrap_err()), "cursor");
        assert_eq!(
            q(&format!("cursor={s}")).unwrap().after,
            Some((c.started_at, c.call_sid))
        );
    }

    #[test]
    fn query_validation_names_the_field() {
        assert_eq!(field(q("status=done").unwrap_err()), "status");
        assert_eq!(field(q("status=Completed").unwrap_err()), "status");
        assert_eq!(field(q("limit=0").unwrap_err()), "limit");
        assert_eq!(field(q("limit=101").unwrap_err()), "limit");
        assert_eq!(field(q("limit=ten").unwrap_err()), "limit");
        assert_eq!(field(q("from=yesterday").unwrap_err()), "from");
        assert_eq!(field(q("from=2026-02-30").unwrap_err()), "from");
        assert_eq!(field(q("to=2026-11-22T24:00").unwrap_err()), "to");
        assert_eq!(field(q("to=2026-11-22T10:00:00+0900").unwrap_err()), "to");
        assert_eq!(field(q("from=1969-12-31").unwrap_err()), "from");
        assert_eq!(field(q("from=2026-11-23&to=2026-11-22").unwrap_err()), "to");
        assert_eq!(field(q("sort=asc").unwrap_err()), "sort");
        assert_eq!(field(q("status=busy&status=failed").unwrap_err()), "status");
        let d = q("").unwrap();
        assert_eq!(d.limit, DEFAULT_LIMIT);
        assert_eq!(d, q("status=&number=&from=&to=&limit=&cursor=").unwrap());
        for s in CALL_STATUSES {
            assert_eq!(
                q(&format!("status={s}")).unwrap().filters.status.as_deref(),
                Some(s)
            );
        }
    }

    #[test]
    fn dates_become_stored_iso_bounds() {
        let b = |query: &str| {
            let x = q(query).unwrap();
            (x.filters.from, x.filters.before)
        };
        assert_eq!(
            b("from=2026-11-22&to=2026-11-22"),
            (
                Some("2026-11-22T00:00:00.000Z".into()),
                Some("2026-11-23T00:00:00.000Z".into())
            )
        );
        // Offsets convert to UTC; a literal `+` arrives as a space and still works.
        assert_eq!(
            b("from=2026-11-22T10:00:00%2B09:00&to=2026-11-22T10:00:00+09:00"),
            (
                Some("2026-11-22T01:00:00.000Z".into()),
                Some("2026-11-22T01:00:00.001Z".into())
            )
        );
        assert_eq!(
            b("from=2026-03-01T00:30-01:00").0,
            Some("2026-03-01T01:30:00.000Z".into())
        );
        // Digits past the millisecond are dropped; `to` is inclusive to the millisecond.
        assert_eq!(
            b("to=2024-02-29T23:59:59.9999Z").1,
            Some("2024-03-01T00:00:00.000Z".into())
        );
        assert_eq!(
            b("from=2026-11-22T10:00").0,
            Some("2026-11-22T10:00:00.000Z".into())
        );
        assert_eq!(
            b("from=2026-11-22t10:00:05.5z").0,
            Some("2026-11-22T10:00:05.500Z".into())
        );
    }

    #[test]
    fn list_sql_and_params_for_each_filter() {
        let key_c = Cursor {
            started_at: "2026-11-22T01:00:00.000Z".into(),
            call_sid: "CA9".into(),
            filters: Filters::default(),
            limit: 20,
        }
        .encode(KEY);
        let st = q("").unwrap().statement();
        assert_eq!(
            st.sql,
            "SELECT * FROM calls ORDER BY started_at DESC, call_sid DESC LIMIT ?1"
        );
        assert_eq!(st.params, vec![json!(21)]);
        let st = q("status=completed&limit=5").unwrap().statement();
        assert_eq!(
            st.sql,
            "SELECT * FROM calls WHERE status = ?1 ORDER BY started_at DESC, call_sid DESC LIMIT ?2"
        );
        assert_eq!(st.params, vec![json!("completed"), json!(6)]);
        let st = q("number=+81312345678").unwrap().statement();
        assert_eq!(
            st.sql,
            "SELECT * FROM (SELECT * FROM calls WHERE from_number = ?1 \
             ORDER BY started_at DESC, call_sid DESC LIMIT ?2) \
             UNION SELECT * FROM (SELECT * FROM calls WHERE to_number = ?1 \
             ORDER BY started_at DESC, call_sid DESC LIMIT ?2) \
             ORDER BY started_at DESC, call_sid DESC LIMIT ?2"
        );
        assert_eq!(st.params, vec![json!("+81312345678"), json!(21)]);
        // Each side walks its own index; no side reads the whole table.
        let plan = crate::agents::testdb::query(
            &crate::agents::testdb::open(),
            &Statement::new(format!("EXPLAIN QUERY PLAN {}", st.sql), st.params.clone()),
        );
        let plan: Vec<&str> = plan.iter().filter_map(|r| r["detail"].as_str()).collect();
        assert!(
            plan.iter().any(|d| d.contains("INDEX calls_from"))
                && plan.iter().any(|d| d.contains("INDEX calls_to"))
                && !plan.iter().any(|d| d.starts_with("SCAN calls")),
            "{plan:?}"
        );
        let st = q("from=2026-11-22&to=2026-11-22").unwrap().statement();
        assert_eq!(
            st.sql,
            "SELECT * FROM calls WHERE started_at >= ?1 AND started_at < ?2 \
             ORDER BY started_at DESC, call_sid DESC LIMIT ?3"
        );
        assert_eq!(
            st.params,
            vec![
                json!("2026-11-22T00:00:00.000Z"),
                json!("2026-11-23T00:00:00.000Z"),
                json!(21)
            ]
        );
        let st = q(&format!("cursor={key_c}")).unwrap().statement();
        assert_eq!(
            st.sql,
            "SELECT * FROM calls WHERE (started_at < ?1 OR (started_at = ?1 AND call_sid < ?2)) \
             ORDER BY started_at DESC, call_sid DESC LIMIT ?3"
        );
        assert_eq!(
            st.params,
            vec![json!("2026-11-22T01:00:00.000Z"), json!("CA9"), json!(21)]
        );
        let filtered = "status=busy&number=%2B15551230001&from=2026-11-01&to=2026-11-30";
        let key_f = Cursor {
            started_at: "2026-11-22T01:00:00.000Z".into(),
            call_sid: "CA9".into(),
            filters: q(filtered).unwrap().filters,
            limit: 20,
        }
        .encode(KEY);
        let st = q(&format!("{filtered}&limit=2&cursor={key_f}"))
            .unwrap()
            .statement();
        // The cursor alone applies the same filters (with its own page size).
        let alone = q(&format!("cursor={key_f}")).unwrap();
        assert_eq!(alone.filters, q(filtered).unwrap().filters);
        assert_eq!(alone.limit, 20);
        let side = |column: &str| {
            format!(
                "SELECT * FROM calls WHERE {column} = ?6 AND status = ?1 \
                 AND started_at >= ?2 AND started_at < ?3 \
                 AND (started_at < ?4 OR (started_at = ?4 AND call_sid < ?5)) \
                 ORDER BY started_at DESC, call_sid DESC LIMIT ?7"
            )
        };
        assert_eq!(
            st.sql,
            format!(
                "SELECT * FROM ({}) UNION SELECT * FROM ({}) \
                 ORDER BY started_at DESC, call_sid DESC LIMIT ?7",
                side("from_number"),
                side("to_number")
            )
        );
        assert_eq!(
            st.params,
            vec![
                json!("busy"),
                json!("2026-11-01T00:00:00.000Z"),
                json!("2026-12-01T00:00:00.000Z"),
                json!("2026-11-22T01:00:00.000Z"),
                json!("CA9"),
                json!("+15551230001"),
                json!(3)
            ]
        );
        // Input never becomes SQL text (and a number that is not E.164 is refused anyway).
        assert_eq!(field(q("number=x'%20OR%201=1;--").unwrap_err()), "number");
        let st = q("status=busy").unwrap().statement();
        assert!(!st.sql.contains("busy"), "{}", st.sql);
    }

    fn insert_call(
        db: &rusqlite::Connection,
        sid: &str,
        started: &str,
        status: &str,
        from: &str,
        to: &str,
    ) {
        testdb::execute(
            db,
            &Statement::new(
                "INSERT INTO calls (call_sid, from_number, to_number, status, started_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                vec![
                    json!(sid),
                    json!(from),
                    json!(to),
                    json!(status),
                    json!(started),
                ],
            ),
        )
        .unwrap();
    }

    fn sids(page: &Value) -> Vec<String> {
        page["calls"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["call_sid"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Every page of `query`, following next_cursor.
    fn all_pages(db: &rusqlite::Connection, query: &str) -> Vec<Vec<String>> {
        let mut pages = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let full = match &cursor {
                Some(c) => format!("{query}&cursor={c}"),
                None => query.to_owned(),
            };
            let parsed = q(&full).unwrap();
            let page = parsed.page(testdb::query(db, &parsed.statement()), KEY);
            pages.push(sids(&page));
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => break,
            }
            assert!(pages.len() < 20, "runaway pagination");
        }
        pages
    }

    #[test]
    fn a_call_from_a_number_to_itself_is_listed_once() {
        let db = testdb::open();
        let n = "+81312345678";
        insert_call(&db, "CA1", "2026-11-20T09:00:00.000Z", "completed", n, n);
        insert_call(
            &db,
            "CA2",
            "2026-11-21T09:00:00.000Z",
            "completed",
            "+1555",
            n,
        );
        insert_call(
            &db,
            "CA3",
            "2026-11-22T09:00:00.000Z",
            "completed",
            n,
            "+1555",
        );
        assert_eq!(
            all_pages(&db, "number=%2B81312345678&limit=2"),
            vec![vec!["CA3", "CA2"], vec!["CA1"]]
        );
        assert_eq!(
            all_pages(&db, "number=%2B81312345678&limit=1").concat(),
            vec!["CA3", "CA2", "CA1"]
        );
    }

    #[test]
    fn list_runs_on_the_real_schema_with_filters_and_keyset_pages() {
        let db = testdb::open();
        // Two calls share a start time: the call_sid breaks the tie.
        insert_call(
            &db,
            "CA1",
            "2026-11-20T09:00:00.000Z",
            "completed",
            "+15550000001",
            "+81312345678",
        );
        insert_call(
            &db,
            "CA2",
            "2026-11-21T09:00:00.000Z",
            "busy",
            "+15550000002",
            "+81312345678",
        );
        insert_call(
            &db,
            "CA3",
            "2026-11-22T09:00:00.000Z",
            "completed",
            "+81312345678",
            "+15550000003",
        );
        insert_call(
            &db,
            "CA4",
            "2026-11-22T09:00:00.000Z",
            "in-progress",
            "+15550000004",
            "+81399999999",
        );
        insert_call(
            &db,
            "CA5",
            "2026-11-23T00:00:00.000Z",
            "ringing",
            "+15550000005",
            "+81312345678",
        );

        assert_eq!(
            all_pages(&db, "limit=100"),
            vec![vec!["CA5", "CA4", "CA3", "CA2", "CA1"]]
        );
        assert_eq!(
            all_pages(&db, "limit=2"),
            vec![vec!["CA5", "CA4"], vec!["CA3", "CA2"], vec!["CA1"]]
        );
        assert_eq!(
            all_pages(&db, "limit=1").concat(),
            vec!["CA5", "CA4", "CA3", "CA2", "CA1"]
        );
        // Exactly `limit` rows left: no cursor to an empty page.
        assert_eq!(
            all_pages(&db, "limit=5"),
            vec![vec!["CA5", "CA4", "CA3", "CA2", "CA1"]]
        );
        assert_eq!(all_pages(&db, "status=completed"), vec![vec!["CA3", "CA1"]]);
        assert_eq!(
            all_pages(&db, "number=%2B81312345678&limit=2"),
            vec![vec!["CA5", "CA3"], vec!["CA2", "CA1"]]
        );
        assert_eq!(
            all_pages(&db, "from=2026-11-21&to=2026-11-22"),
            vec![vec!["CA4", "CA3", "CA2"]]
        );
        assert_eq!(
            all_pages(&db, "to=2026-11-22T09:00:00Z"),
            vec![vec!["CA4", "CA3", "CA2", "CA1"]]
        );
        assert_eq!(
            all_pages(&db, "from=2026-11-22T18:00:00%2B09:00"),
            vec![vec!["CA5", "CA4", "CA3"]]
        );
        assert_eq!(
            all_pages(
                &db,
                "status=completed&number=%2B81312345678&from=2026-11-21"
            ),
            vec![vec!["CA3"]]
        );
        assert_eq!(all_pages(&db, "status=failed"), vec![Vec::<String>::new()]);
    }

    #[test]
    fn call_detail_orders_and_shapes_rows() {
        let db = testdb::open();
        insert_call(
            &db,
            "CA1",
            "2026-11-20T09:00:00.000Z",
            "completed",
            "+1555",
            "+8131",
        );
        let run = |sql: &str, params: Vec<Value>| {
            testdb::execute(&db, &Statement::new(sql, params)).unwrap();
        };
        // Inserted out of order: the answer is by seq.
        for (seq, role, text, interrupted) in [(2, "caller", "はい", 0), (1, "agent", "お電話", 1)]
        {
            run(
                "INSERT INTO transcript_entries (call_sid, seq, role, text, offset_ms, item_id, interrupted) \
                 VALUES ('CA1', ?1, ?2, ?3, ?4, 'item', ?5)",
                vec![json!(seq), json!(role), json!(text), json!(seq * 1000), json!(interrupted)],
            );
        }
        run(
            "INSERT INTO call_events (call_sid, seq, at, type, detail) VALUES \
             ('CA1', 2, 't2', 'error', 'not json'), ('CA1', 1, 't1', 'barge_in', '{\"at_ms\":1200}')",
            vec![],
        );
        let sid = CallSid::new("CA1");
        let call = testdb::query(&db, &select_call(&sid)).remove(0);
        let detail = call_detail(
            call,
            testdb::query(&db, &select_transcript(&sid)),
            testdb::query(&db, &select_events(&sid)),
        );
        assert_eq!(detail["call"]["call_sid"], "CA1");
        assert_eq!(detail["call"]["status"], "completed");
        assert_eq!(
            detail["transcript"],
            json!([
                {"seq": 1, "role": "agent", "text": "お電話", "offset_ms": 1000, "item_id": "item", "interrupted": true},
                {"seq": 2, "role": "caller", "text": "はい", "offset_ms": 2000, "item_id": "item", "interrupted": false},
            ])
        );
        assert_eq!(
            detail["events"],
            json!([
                {"seq": 1, "at": "t1", "type": "barge_in", "detail": {"at_ms": 1200}},
                {"seq": 2, "at": "t2", "type": "error", "detail": "not json"},
            ])
        );
        assert!(testdb::query(&db, &select_call(&CallSid::new("CA404"))).is_empty());
    }

    #[test]
    fn a_cursor_keeps_the_filters_it_was_made_for_and_refuses_others() {
        let db = testdb::open();
        let n = "+81312345678";
        insert_call(
            &db,
            "CA1",
            "2026-11-20T09:00:00.000Z",
            "completed",
            "+1555",
            n,
        );
        insert_call(&db, "CA2", "2026-11-21T09:00:00.000Z", "failed", "+1555", n);
        insert_call(
            &db,
            "CA3",
            "2026-11-22T09:00:00.000Z",
            "completed",
            "+1555",
            n,
        );
        let page = |query: &str| {
            let parsed = q(query)?;
            Ok::<_, Error>(parsed.page(testdb::query(&db, &parsed.statement()), KEY))
        };
        let first = page("status=completed&limit=1").unwrap();
        assert_eq!(sids(&first), ["CA3"]);
        let cursor = first["next_cursor"].as_str().unwrap().to_owned();
        // The cursor alone goes on with status=completed (and limit=1): not the failed CA2.
        let second = page(&format!("cursor={cursor}")).unwrap();
        assert_eq!(sids(&second), ["CA1"]);
        assert_eq!(second["next_cursor"], Value::Null);
        // With the same filters, and another page size, it is accepted.
        assert_eq!(
            sids(&page(&format!("status=completed&limit=5&cursor={cursor}")).unwrap()),
            ["CA1"]
        );
        // With other filters it is refused, naming the cursor.
        for other in [
            "status=failed",
            "number=%2B81312345678",
            "from=2026-11-01",
            "to=2026-11-30",
        ] {
            let e = q(&format!("{other}&cursor={cursor}")).unwrap_err();
            assert_eq!(e.status(), 400, "{other}");
            let message = e.body()["message"].as_str().unwrap().to_owned();
            assert_eq!(field(e), "cursor", "{other}");
            assert!(message.contains("status=completed"), "{message}");
        }
        // The same bound written another way is the same filter.
        let dated = page("from=2026-11-01&limit=1").unwrap();
        let c = dated["next_cursor"].as_str().unwrap();
        assert_eq!(
            sids(&page(&format!("from=2026-11-01T09:00%2B09:00&cursor={c}")).unwrap()),
            ["CA2"]
        );
    }

    #[test]
    fn to_the_last_storable_day_bounds_nothing_rather_than_everything() {
        let db = testdb::open();
        insert_call(
            &db,
            "CA1",
            "2026-11-20T09:00:00.000Z",
            "completed",
            "+1555",
            "+8131",
        );
        insert_call(
            &db,
            "CA2",
            "9999-12-31T23:59:59.999Z",
            "completed",
            "+1555",
            "+8131",
        );
        for query in [
            "to=9999-12-31",
            "to=9999-12-31T23:59:59.999Z",
            "from=2026-11-01&to=9999-12-31",
        ] {
            let parsed = q(query).unwrap();
            assert_eq!(parsed.filters.before, None, "{query}");
            assert_eq!(
                sids(&parsed.page(testdb::query(&db, &parsed.statement()), KEY)),
                ["CA2", "CA1"],
                "{query}"
            );
        }
        assert_eq!(
            q("to=9999-12-30").unwrap().filters.before.as_deref(),
            Some("9999-12-31T00:00:00.000Z")
        );
        assert!(q("from=9999-12-31&to=9999-12-31").is_ok());
    }

    #[test]
    fn the_number_filter_must_be_e164_and_a_domestic_number_gets_its_plus_81_form() {
        let e = q("number=090-1234-5678").unwrap_err();
        assert_eq!(e.status(), 400);
        let message = e.body()["message"].as_str().unwrap().to_owned();
        assert_eq!(field(e), "number");
        assert!(message.contains("+819012345678"), "{message}");
        assert!(message.contains("+81"), "{message}");
        for bad in ["81312345678", "0312345678", "%2B0312345678", "abc"] {
            assert_eq!(
                field(q(&format!("number={bad}")).unwrap_err()),
                "number",
                "{bad}"
            );
        }
        // The + as %2B, or a literal + (which form decoding turns into a space).
        for ok in ["number=%2B819012345678", "number=+819012345678"] {
            assert_eq!(
                q(ok).unwrap().filters.number.as_deref(),
                Some("+819012345678"),
                "{ok}"
            );
        }
    }

    #[test]
    fn a_body_that_is_not_utf8_is_refused_not_stored_as_mojibake() {
        // {"name": "予約"} in Shift_JIS.
        let sjis = b"{\"name\": \"\x97\x5c\x96\xf1\"}";
        let e = parse_body(sjis).unwrap_err();
        assert_eq!(e, Error::InvalidUtf8 { valid_up_to: 10 });
        assert_eq!(e.status(), 400);
        assert_eq!(e.code(), "invalid_utf8");
        assert!(e.body()["message"].as_str().unwrap().contains("UTF-8"));
        assert_eq!(
            parse_body("{\"name\": \"予約\"}".as_bytes()).unwrap()["name"],
            "予約"
        );
    }

    #[test]
    fn a_constraint_failure_on_create_is_a_conflict() {
        for unique in [
            "D1_ERROR: UNIQUE constraint failed: agents.id: SQLITE_CONSTRAINT",
            "UNIQUE constraint failed: agents.id",
        ] {
            let e = create_failure(unique, || "agent \"x\" already exists".into());
            assert_eq!(e, Error::Conflict("agent \"x\" already exists".into()));
            assert_eq!(e.status(), 409);
        }
        assert_eq!(
            create_failure("D1_ERROR: database is locked", String::new),
            Error::Unavailable
        );
        assert_eq!(
            create_failure("D1_ERROR: CHECK constraint failed: is_default", String::new),
            Error::Internal
        );
        assert_eq!(
            create_failure("D1_ERROR: no such table: agents", String::new),
            Error::Internal
        );
    }
}
