//! What the bridge keeps in D1, as SQL statements built from typed records. The shell
//! only runs them; this module knows the schema of `migrations/`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One SQL statement with positional parameters (`?1`, `?2`, …). Parameters are JSON
/// scalars: null, number, string.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Statement {
    pub sql: String,
    pub params: Vec<Value>,
}

impl Statement {
    pub fn new(sql: impl Into<String>, params: Vec<Value>) -> Self {
        Self {
            sql: sql.into(),
            params,
        }
    }
}

/// Twilio's call statuses, in the order a call moves through them. A status never moves
/// backwards: every terminal status ranks the same. Which terminal status a call ends with
/// does not depend on the order its records arrive in (Twilio's status callback and the
/// stream's end come over different connections): Twilio's `busy`, `no-answer`, `canceled`
/// and `failed` stand whatever the bridge says; Twilio's `completed` only says the line was
/// up, and gives way to a failure of the agent side (the call's failed end, a call the
/// bridge could not take), which it does not overwrite either.
pub fn status_rank(status: &str) -> Option<u8> {
    match status {
        "queued" | "initiated" => Some(0),
        "ringing" => Some(1),
        "in-progress" => Some(2),
        "completed" | "failed" | "busy" | "no-answer" | "canceled" => Some(3),
        _ => None,
    }
}

/// The SQL twin of [`status_rank`], for conditional updates.
const RANK_SQL: &str = "CASE status WHEN 'ringing' THEN 1 WHEN 'in-progress' THEN 2 ELSE 3 END";

/// What a call event (`call_events.type`) records. The review page (`public/app.js`) names
/// each in both its languages; `tests/review_labels.rs` keeps the two in step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    BargeIn,
    ToolCall,
    Dtmf,
    Hangup,
    Transfer,
    TransferResult,
    Reconnect,
    Reconnected,
    OpenAiError,
    TranscriptionFailed,
    Fallback,
    FallbackRedirect,
    DroppedInput,
    MaxDuration,
    WrapUp,
    IdleCheckIn,
    IdleHangup,
    EndingCalledOff,
    ResponseFailed,
    ResponseIncomplete,
}

impl EventKind {
    /// Every kind (a new one goes here too: writing a kind missing from it fails the tests).
    pub const ALL: [EventKind; 20] = [
        EventKind::BargeIn,
        EventKind::ToolCall,
        EventKind::Dtmf,
        EventKind::Hangup,
        EventKind::Transfer,
        EventKind::TransferResult,
        EventKind::Reconnect,
        EventKind::Reconnected,
        EventKind::OpenAiError,
        EventKind::TranscriptionFailed,
        EventKind::Fallback,
        EventKind::FallbackRedirect,
        EventKind::DroppedInput,
        EventKind::MaxDuration,
        EventKind::WrapUp,
        EventKind::IdleCheckIn,
        EventKind::IdleHangup,
        EventKind::EndingCalledOff,
        EventKind::ResponseFailed,
        EventKind::ResponseIncomplete,
    ];

    /// The kind as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::BargeIn => "barge_in",
            EventKind::ToolCall => "tool_call",
            EventKind::Dtmf => "dtmf",
            EventKind::Hangup => "hangup",
            EventKind::Transfer => "transfer",
            EventKind::TransferResult => "transfer_result",
            EventKind::Reconnect => "reconnect",
            EventKind::Reconnected => "reconnected",
            EventKind::OpenAiError => "openai_error",
            EventKind::TranscriptionFailed => "transcription_failed",
            EventKind::Fallback => "fallback",
            EventKind::FallbackRedirect => "fallback_redirect",
            EventKind::DroppedInput => "dropped_input",
            EventKind::MaxDuration => "max_duration",
            EventKind::WrapUp => "wrap_up",
            EventKind::IdleCheckIn => "idle_check_in",
            EventKind::IdleHangup => "idle_hangup",
            EventKind::EndingCalledOff => "ending_called_off",
            EventKind::ResponseFailed => "response_failed",
            EventKind::ResponseIncomplete => "response_incomplete",
        }
    }

    /// An event of this kind, as a record (`seq` numbers it within its call).
    pub fn record(self, call_sid: &str, seq: u64, at_ms: u64, detail: Value) -> Record {
        debug_assert!(EventKind::ALL.contains(&self), "{self:?} missing from ALL");
        Record::Event {
            call_sid: call_sid.to_owned(),
            seq,
            at_ms,
            kind: self.as_str().to_owned(),
            detail,
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for EventKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// One fact about a call, to be written to D1. Writes are idempotent (upserts keyed by the
/// call and a sequence number), so a batch retried after a failure changes nothing twice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "record", rename_all = "snake_case")]
pub enum Record {
    /// The voice webhook announced the call.
    CallRinging {
        call_sid: String,
        account_sid: String,
        from: String,
        to: String,
        direction: String,
        agent_id: String,
        at_ms: u64,
    },
    /// Twilio's stream started: the caller is connected to the bridge.
    CallConnected {
        call_sid: String,
        stream_sid: String,
        at_ms: u64,
    },
    SessionId {
        call_sid: String,
        session_id: String,
    },
    Transcript {
        call_sid: String,
        seq: u64,
        role: Role,
        text: String,
        offset_ms: u64,
        item_id: Option<String>,
        interrupted: bool,
    },
    Event {
        call_sid: String,
        seq: u64,
        at_ms: u64,
        kind: String,
        detail: Value,
    },
    CallEnded {
        call_sid: String,
        at_ms: u64,
        /// From the stream start; `None` when the stream never started.
        duration_ms: Option<u64>,
        end_reason: String,
        /// The particulars of the reason (a close code, an HTTP status, …).
        end_detail: Option<String>,
        failed: bool,
        input_tokens: u64,
        output_tokens: u64,
        total_tokens: u64,
        first_audio_ms: Option<u64>,
        barge_ins: u64,
        /// What transcribing the caller cost (ends written before it was kept have none).
        #[serde(default)]
        transcription: TranscriptionUsage,
        /// Not the call's own account of its end but its object's presumption (the stream's
        /// pump is gone: a restart): written only where the call has no end yet, so the
        /// call's own end, if it reached D1, stays. Its time gives way to Twilio's: the
        /// call was over when Twilio's final status said so, whichever of the two lands
        /// first (`duration_ms` stays the stream's presumed length).
        #[serde(default)]
        presumed: bool,
    },
    /// The call's recording is complete in the bucket.
    Recording {
        call_sid: String,
        /// The object's key in the RECORDINGS bucket.
        key: String,
        duration_ms: u64,
        /// Size of the WAV file, header included.
        bytes: u64,
    },
    /// The call got the fallback TwiML instead of the agent (`FALLBACK_ONLY`, or the call
    /// could not be handed to its call object): why, so the call can be found and followed
    /// up. Twilio's final status callback dates its end.
    CallUnserved {
        call_sid: String,
        at_ms: u64,
        end_reason: String,
        end_detail: Option<String>,
        /// The bridge failed the caller (the status reads `failed`), rather than being
        /// switched off on purpose.
        failed: bool,
    },
    /// Twilio's status callback. A final status dates the call's end where the bridge has
    /// not, or has only presumed it.
    TwilioStatus {
        call_sid: String,
        status: String,
        call_duration_s: Option<u64>,
        at_ms: u64,
        /// The call's parties as the callback names them, for a row its voice webhook never
        /// wrote (a webhook that failed, an outbound call never answered); a row that has
        /// them keeps its own.
        #[serde(default)]
        parties: Parties,
    },
}

/// What the transcription of a call's caller speech cost, summed over its transcriptions:
/// the transcription model's tokens, or for a model billed by time (`whisper-1`) the length
/// of the audio it transcribed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TranscriptionUsage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub audio_ms: u64,
}

impl TranscriptionUsage {
    /// This and `other` together.
    pub fn add(&mut self, other: TranscriptionUsage) {
        self.input_tokens = self.input_tokens.saturating_add(other.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(other.output_tokens);
        self.audio_ms = self.audio_ms.saturating_add(other.audio_ms);
    }
}

/// Who a call is between, as a Twilio callback names them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Parties {
    pub account_sid: String,
    pub from: String,
    pub to: String,
    pub direction: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Caller,
    Agent,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Caller => "caller",
            Role::Agent => "agent",
        }
    }
}

/// Makes sure a `calls` row exists, whichever write comes first (the webhook's, the
/// stream's, or a status callback that overtook both).
fn ensure_call(call_sid: &str, at_ms: u64) -> Statement {
    Statement::new(
        ENSURE_CALL_SQL,
        vec![call_sid.into(), iso_time(at_ms).into()],
    )
}

const ENSURE_CALL_SQL: &str =
    "INSERT INTO calls (call_sid, started_at) VALUES (?1, ?2) ON CONFLICT (call_sid) DO NOTHING";

/// Several records' statements as one batch (one D1 transaction), in order: a call's row is
/// made sure of once, by the first record that needs it; the later "make sure" statements of
/// the same call could only ever do nothing.
pub fn coalesce(statements: impl IntoIterator<Item = Statement>) -> Vec<Statement> {
    let mut ensured: Vec<Value> = Vec::new();
    statements
        .into_iter()
        .filter(|st| {
            if st.sql != ENSURE_CALL_SQL {
                return true;
            }
            let call = st.params.first().cloned().unwrap_or(Value::Null);
            if ensured.contains(&call) {
                return false;
            }
            ensured.push(call);
            true
        })
        .collect()
}

impl Record {
    pub fn call_sid(&self) -> &str {
        match self {
            Record::CallRinging { call_sid, .. }
            | Record::CallConnected { call_sid, .. }
            | Record::SessionId { call_sid, .. }
            | Record::Transcript { call_sid, .. }
            | Record::Event { call_sid, .. }
            | Record::CallEnded { call_sid, .. }
            | Record::Recording { call_sid, .. }
            | Record::CallUnserved { call_sid, .. }
            | Record::TwilioStatus { call_sid, .. } => call_sid,
        }
    }

    /// Twilio's word that the call is over (a terminal status: `completed`, `busy`, …).
    pub fn is_final_status(&self) -> bool {
        matches!(self, Record::TwilioStatus { status, .. } if status_rank(status) == Some(3))
    }

    /// The statements that write this record; `now_ms` dates a row this write creates.
    pub fn statements(&self, now_ms: u64) -> Vec<Statement> {
        match self {
            Record::CallRinging {
                call_sid,
                account_sid,
                from,
                to,
                direction,
                agent_id,
                at_ms,
            } => vec![Statement::new(
                "INSERT INTO calls (call_sid, account_sid, from_number, to_number, direction, agent_id, status, started_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'ringing', ?7) \
                 ON CONFLICT (call_sid) DO UPDATE SET account_sid = excluded.account_sid, \
                 from_number = excluded.from_number, to_number = excluded.to_number, \
                 direction = excluded.direction, agent_id = excluded.agent_id, \
                 started_at = MIN(calls.started_at, excluded.started_at)",
                vec![
                    call_sid.as_str().into(),
                    account_sid.as_str().into(),
                    from.as_str().into(),
                    to.as_str().into(),
                    direction.as_str().into(),
                    agent_id.as_str().into(),
                    iso_time(*at_ms).into(),
                ],
            )],
            Record::CallConnected {
                call_sid,
                stream_sid,
                at_ms,
            } => vec![
                ensure_call(call_sid, *at_ms),
                Statement::new(
                    format!(
                        "UPDATE calls SET stream_sid = ?2, connected_at = ?3, \
                         status = CASE WHEN {RANK_SQL} < 2 THEN 'in-progress' ELSE status END \
                         WHERE call_sid = ?1"
                    ),
                    vec![
                        call_sid.as_str().into(),
                        stream_sid.as_str().into(),
                        iso_time(*at_ms).into(),
                    ],
                ),
            ],
            Record::SessionId {
                call_sid,
                session_id,
            } => vec![
                ensure_call(call_sid, now_ms),
                Statement::new(
                    "UPDATE calls SET openai_session_id = ?2 WHERE call_sid = ?1",
                    vec![call_sid.as_str().into(), session_id.as_str().into()],
                ),
            ],
            Record::Transcript {
                call_sid,
                seq,
                role,
                text,
                offset_ms,
                item_id,
                interrupted,
            } => vec![
                ensure_call(call_sid, now_ms),
                Statement::new(
                    "INSERT INTO transcript_entries (call_sid, seq, role, text, offset_ms, item_id, interrupted) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
                     ON CONFLICT (call_sid, seq) DO UPDATE SET role = excluded.role, text = excluded.text, \
                     offset_ms = excluded.offset_ms, item_id = excluded.item_id, interrupted = excluded.interrupted",
                    vec![
                        call_sid.as_str().into(),
                        (*seq).into(),
                        role.as_str().into(),
                        text.as_str().into(),
                        (*offset_ms).into(),
                        item_id.clone().map(Value::from).unwrap_or(Value::Null),
                        u8::from(*interrupted).into(),
                    ],
                ),
            ],
            Record::Event {
                call_sid,
                seq,
                at_ms,
                kind,
                detail,
            } => vec![
                ensure_call(call_sid, *at_ms),
                Statement::new(
                    "INSERT INTO call_events (call_sid, seq, at, type, detail) VALUES (?1, ?2, ?3, ?4, ?5) \
                     ON CONFLICT (call_sid, seq) DO NOTHING",
                    vec![
                        call_sid.as_str().into(),
                        (*seq).into(),
                        iso_time(*at_ms).into(),
                        kind.as_str().into(),
                        detail.to_string().into(),
                    ],
                ),
            ],
            Record::CallEnded {
                call_sid,
                at_ms,
                duration_ms,
                end_reason,
                end_detail,
                failed,
                input_tokens,
                output_tokens,
                total_tokens,
                first_audio_ms,
                barge_ins,
                transcription,
                presumed,
            } => vec![
                ensure_call(call_sid, *at_ms),
                Statement::new(
                    format!(
                        "UPDATE calls SET ended_at = {}, duration_ms = ?3, end_reason = ?4, \
                         input_tokens = ?5, output_tokens = ?6, total_tokens = ?7, \
                         first_audio_ms = ?8, barge_ins = ?9, \
                         status = CASE WHEN {RANK_SQL} < 3 THEN ?10 \
                                  WHEN ?10 = 'failed' AND status = 'completed' THEN 'failed' \
                                  ELSE status END, \
                         end_detail = ?11, transcription_input_tokens = ?12, \
                         transcription_output_tokens = ?13, transcription_audio_ms = ?14 \
                         WHERE call_sid = ?1{}",
                        // A call with no end yet has an end time only from Twilio's final
                        // status: when the call was over, which a presumption does not move.
                        if *presumed { "COALESCE(ended_at, ?2)" } else { "?2" },
                        if *presumed { " AND end_reason IS NULL" } else { "" }
                    ),
                    vec![
                        call_sid.as_str().into(),
                        iso_time(*at_ms).into(),
                        duration_ms.map(Value::from).unwrap_or(Value::Null),
                        end_reason.as_str().into(),
                        (*input_tokens).into(),
                        (*output_tokens).into(),
                        (*total_tokens).into(),
                        first_audio_ms.map(Value::from).unwrap_or(Value::Null),
                        (*barge_ins).into(),
                        if *failed { "failed" } else { "completed" }.into(),
                        end_detail.as_deref().map(Value::from).unwrap_or(Value::Null),
                        transcription.input_tokens.into(),
                        transcription.output_tokens.into(),
                        transcription.audio_ms.into(),
                    ],
                ),
            ],
            Record::Recording {
                call_sid,
                key,
                duration_ms,
                bytes,
            } => vec![
                ensure_call(call_sid, now_ms),
                Statement::new(
                    "UPDATE calls SET recording_key = ?2, recording_duration_ms = ?3, \
                     recording_bytes = ?4 WHERE call_sid = ?1",
                    vec![
                        call_sid.as_str().into(),
                        key.as_str().into(),
                        (*duration_ms).into(),
                        (*bytes).into(),
                    ],
                ),
            ],
            Record::CallUnserved {
                call_sid,
                at_ms,
                end_reason,
                end_detail,
                failed,
            } => vec![
                ensure_call(call_sid, *at_ms),
                Statement::new(
                    format!(
                        "UPDATE calls SET \
                         end_detail = CASE WHEN end_reason IS NULL THEN ?3 ELSE end_detail END, \
                         end_reason = COALESCE(end_reason, ?2), \
                         status = CASE WHEN ?4 AND end_reason IS NULL \
                                  AND ({RANK_SQL} < 3 OR status = 'completed') \
                                  THEN 'failed' ELSE status END \
                         WHERE call_sid = ?1"
                    ),
                    vec![
                        call_sid.as_str().into(),
                        end_reason.as_str().into(),
                        end_detail.as_deref().map(Value::from).unwrap_or(Value::Null),
                        (*failed).into(),
                    ],
                ),
            ],
            Record::TwilioStatus {
                call_sid,
                status,
                call_duration_s,
                at_ms,
                parties,
            } => {
                let Some(rank) = status_rank(status).filter(|r| *r >= 1) else {
                    // queued/initiated say nothing the row does not already say.
                    return vec![];
                };
                vec![
                    ensure_call(call_sid, *at_ms),
                    Statement::new(
                        format!(
                            "UPDATE calls SET \
                             status = CASE WHEN {RANK_SQL} < ?3 THEN ?2 \
                                      WHEN ?3 = 3 AND ?2 <> 'completed' \
                                      AND status IN ('completed', 'failed') THEN ?2 \
                                      ELSE status END, \
                             twilio_duration_s = COALESCE(?4, twilio_duration_s), \
                             ended_at = CASE WHEN ?3 <> 3 THEN ended_at \
                                        WHEN end_reason = ?10 THEN ?5 \
                                        ELSE COALESCE(ended_at, ?5) END, \
                             account_sid = CASE WHEN account_sid = '' THEN ?6 ELSE account_sid END, \
                             from_number = CASE WHEN from_number = '' THEN ?7 ELSE from_number END, \
                             to_number = CASE WHEN to_number = '' THEN ?8 ELSE to_number END, \
                             direction = CASE WHEN direction = '' THEN ?9 ELSE direction END \
                             WHERE call_sid = ?1"
                        ),
                        vec![
                            call_sid.as_str().into(),
                            status.as_str().into(),
                            rank.into(),
                            call_duration_s.map(Value::from).unwrap_or(Value::Null),
                            iso_time(*at_ms).into(),
                            parties.account_sid.as_str().into(),
                            parties.from.as_str().into(),
                            parties.to.as_str().into(),
                            parties.direction.as_str().into(),
                            // Only a presumed end bears this reason (see
                            // `Registration::interrupted`): Twilio's end replaces its time.
                            crate::webhook::INTERRUPTED.into(),
                        ],
                    ),
                ]
            }
        }
    }
}

/// ISO 8601 UTC with milliseconds, from milliseconds since the Unix epoch.
pub fn iso_time(epoch_ms: u64) -> String {
    let secs = epoch_ms / 1000;
    let ms = epoch_ms % 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agents::testdb;
    use serde_json::json;

    #[test]
    fn every_event_kind_is_listed_once_and_recorded_as_its_name() {
        let mut kinds: Vec<_> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
        kinds.sort_unstable();
        kinds.dedup();
        assert_eq!(kinds.len(), EventKind::ALL.len());
        let e = EventKind::Dtmf.record("CA1", 3, 40, json!({"digit": "1"}));
        assert_eq!(
            e,
            Record::Event {
                call_sid: "CA1".into(),
                seq: 3,
                at_ms: 40,
                kind: "dtmf".into(),
                detail: json!({"digit": "1"}),
            }
        );
    }

    const SID: &str = "CA1";

    fn write(conn: &rusqlite::Connection, r: &Record) {
        testdb::batch(conn, &r.statements(1_000)).unwrap();
    }

    fn call_row(conn: &rusqlite::Connection) -> Value {
        let rows = testdb::query(
            conn,
            &Statement::new("SELECT * FROM calls WHERE call_sid = ?1", vec![SID.into()]),
        );
        assert_eq!(rows.len(), 1);
        rows[0].clone()
    }

    fn project(row: &Value, keys: &[&str]) -> Value {
        Value::Object(
            keys.iter()
                .map(|k| ((*k).to_owned(), row[*k].clone()))
                .collect(),
        )
    }

    fn status(conn: &rusqlite::Connection, s: &str, duration: Option<u64>) {
        write(
            conn,
            &Record::TwilioStatus {
                call_sid: SID.into(),
                status: s.into(),
                call_duration_s: duration,
                at_ms: 9_000,
                parties: Default::default(),
            },
        );
    }

    fn ringing() -> Record {
        Record::CallRinging {
            call_sid: SID.into(),
            account_sid: "AC1".into(),
            from: "+819012345678".into(),
            to: "+815012345678".into(),
            direction: "inbound".into(),
            agent_id: "default".into(),
            at_ms: 1_000,
        }
    }

    fn ended(failed: bool) -> Record {
        Record::CallEnded {
            call_sid: SID.into(),
            at_ms: 61_000,
            duration_ms: Some(59_000),
            end_reason: if failed {
                "openai_closed"
            } else {
                "twilio_stop"
            }
            .into(),
            end_detail: failed.then(|| "closed with code 1011: server error".into()),
            failed,
            input_tokens: 10,
            output_tokens: 20,
            total_tokens: 30,
            first_audio_ms: Some(640),
            barge_ins: 2,
            transcription: TranscriptionUsage {
                input_tokens: 40,
                output_tokens: 12,
                audio_ms: 0,
            },
            presumed: false,
        }
    }

    #[test]
    fn a_call_moves_ringing_to_in_progress_to_completed() {
        let conn = testdb::open();
        write(&conn, &ringing());
        assert_eq!(call_row(&conn)["status"], "ringing");
        assert_eq!(call_row(&conn)["started_at"], "1970-01-01T00:00:01.000Z");
        write(
            &conn,
            &Record::CallConnected {
                call_sid: SID.into(),
                stream_sid: "MZ1".into(),
                at_ms: 2_000,
            },
        );
        write(
            &conn,
            &Record::SessionId {
                call_sid: SID.into(),
                session_id: "sess_1".into(),
            },
        );
        let row = call_row(&conn);
        assert_eq!(row["status"], "in-progress");
        assert_eq!(row["stream_sid"], "MZ1");
        assert_eq!(row["openai_session_id"], "sess_1");
        write(&conn, &ended(false));
        let row = call_row(&conn);
        assert_eq!(row["status"], "completed");
        assert_eq!(row["end_reason"], "twilio_stop");
        assert_eq!(row["duration_ms"], 59_000);
        assert_eq!(row["total_tokens"], 30);
        assert_eq!(row["first_audio_ms"], 640);
        assert_eq!(row["barge_ins"], 2);
        assert_eq!(row["transcription_input_tokens"], 40);
        assert_eq!(row["transcription_output_tokens"], 12);
        assert_eq!(row["transcription_audio_ms"], 0);
        assert_eq!(row["from_number"], "+819012345678");
    }

    #[test]
    fn an_end_kept_before_transcription_usage_was_reads_back_with_none() {
        // An end owed and stored by an object (`CallState::end_owed`) before this field
        // existed: read after a deploy, it is the same end with no transcription usage.
        let mut stored = serde_json::to_value(ended(false)).unwrap();
        stored.as_object_mut().unwrap().remove("transcription");
        let Record::CallEnded { transcription, .. } = serde_json::from_value(stored).unwrap()
        else {
            panic!("not an end");
        };
        assert_eq!(transcription, TranscriptionUsage::default());
    }

    #[test]
    fn a_batch_makes_sure_of_each_call_once_and_writes_what_the_records_would_alone() {
        let other = "CA2";
        let transcript = |call: &str, seq: u64| Record::Transcript {
            call_sid: call.into(),
            seq,
            role: Role::Caller,
            text: format!("turn {seq}"),
            offset_ms: 1_000 * seq,
            item_id: None,
            interrupted: false,
        };
        let connected = Record::CallConnected {
            call_sid: SID.into(),
            stream_sid: "MZ1".into(),
            at_ms: 2_000,
        };
        let records = [
            connected,
            transcript(SID, 0),
            transcript(other, 0),
            transcript(SID, 1),
            ended(false),
        ];
        let statements: Vec<Statement> = records.iter().flat_map(|r| r.statements(5_000)).collect();
        let batch = coalesce(statements.clone());
        let ensures = |sts: &[Statement]| {
            sts.iter()
                .filter(|s| s.sql == ENSURE_CALL_SQL)
                .map(|s| s.params[0].clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(ensures(&batch), vec![json!(SID), json!(other)]);
        assert_eq!(
            batch.len(),
            statements.len() - 3,
            "three repeated ensures of CA1 dropped"
        );
        assert_eq!(
            batch
                .iter()
                .filter(|s| s.sql != ENSURE_CALL_SQL)
                .collect::<Vec<_>>(),
            statements
                .iter()
                .filter(|s| s.sql != ENSURE_CALL_SQL)
                .collect::<Vec<_>>(),
            "every other statement kept, in order"
        );
        // The batch leaves the database as the records written one by one do.
        let dump = |conn: &rusqlite::Connection| {
            let calls = testdb::query(
                conn,
                &Statement::new("SELECT * FROM calls ORDER BY call_sid", vec![]),
            );
            let rows = testdb::query(
                conn,
                &Statement::new(
                    "SELECT * FROM transcript_entries ORDER BY call_sid, seq",
                    vec![],
                ),
            );
            (calls, rows)
        };
        let one_by_one = testdb::open();
        for r in &records {
            testdb::batch(&one_by_one, &r.statements(5_000)).unwrap();
        }
        let batched = testdb::open();
        testdb::batch(&batched, &batch).unwrap();
        assert_eq!(dump(&batched), dump(&one_by_one));
        assert_eq!(dump(&batched).1.len(), 3);
    }

    #[test]
    fn status_never_moves_backwards_and_callbacks_are_idempotent() {
        let conn = testdb::open();
        write(&conn, &ringing());
        status(&conn, "in-progress", None);
        assert_eq!(call_row(&conn)["status"], "in-progress");
        status(&conn, "ringing", None);
        assert_eq!(
            call_row(&conn)["status"],
            "in-progress",
            "late ringing ignored"
        );
        status(&conn, "completed", Some(61));
        status(&conn, "completed", Some(61));
        let row = call_row(&conn);
        assert_eq!(row["status"], "completed");
        assert_eq!(row["twilio_duration_s"], 61);
        status(&conn, "in-progress", None);
        assert_eq!(call_row(&conn)["status"], "completed");
        // Our own end after Twilio's final status does not move it either (a failed end
        // does make it failed: see the order tests below).
        write(&conn, &ended(false));
        assert_eq!(call_row(&conn)["status"], "completed");
        assert_eq!(call_row(&conn)["end_reason"], "twilio_stop");
    }

    #[test]
    fn a_failed_call_stays_failed_when_twilio_reports_completed() {
        let conn = testdb::open();
        write(&conn, &ringing());
        write(&conn, &ended(true));
        status(&conn, "completed", Some(5));
        let row = call_row(&conn);
        assert_eq!(row["status"], "failed");
        assert_eq!(row["end_reason"], "openai_closed");
        assert_eq!(row["end_detail"], "closed with code 1011: server error");
    }

    #[test]
    fn a_call_the_agent_never_took_says_why_and_keeps_its_numbers() {
        let conn = testdb::open();
        write(&conn, &ringing());
        let unserved = |failed| Record::CallUnserved {
            call_sid: SID.into(),
            at_ms: 1_000,
            end_reason: if failed {
                "not_registered"
            } else {
                "fallback_only"
            }
            .into(),
            end_detail: failed.then(|| "HTTP 500".into()),
            failed,
        };
        write(&conn, &unserved(true));
        status(&conn, "completed", Some(12));
        let row = call_row(&conn);
        assert_eq!(row["status"], "failed");
        assert_eq!(row["end_reason"], "not_registered");
        assert_eq!(row["end_detail"], "HTTP 500");
        assert_eq!(row["from_number"], "+819012345678");
        assert_eq!(
            row["ended_at"],
            iso_time(9_000),
            "dated by Twilio's final status"
        );
        assert_eq!(row["twilio_duration_s"], 12);
        // Switched off on purpose: Twilio's status stands, and a reason already there stays.
        let conn = testdb::open();
        write(&conn, &ringing());
        write(&conn, &unserved(false));
        write(&conn, &unserved(true));
        status(&conn, "completed", Some(8));
        let row = call_row(&conn);
        assert_eq!(row["status"], "completed");
        assert_eq!(row["end_reason"], "fallback_only");
        assert_eq!(row["end_detail"], Value::Null);
    }

    fn unserved(reason: &str) -> Record {
        Record::CallUnserved {
            call_sid: SID.into(),
            at_ms: 1_000,
            end_reason: reason.into(),
            end_detail: Some(format!("{reason} detail")),
            failed: reason != "fallback_only",
        }
    }

    /// The row after the webhook's record, then `first` and `second`.
    fn after(
        first: &dyn Fn(&rusqlite::Connection),
        second: &dyn Fn(&rusqlite::Connection),
    ) -> Value {
        let conn = testdb::open();
        write(&conn, &ringing());
        first(&conn);
        second(&conn);
        call_row(&conn)
    }

    #[test]
    fn twilios_completed_before_the_calls_own_failed_end_leaves_it_failed() {
        // The status callback and the stream's end come over two connections, in no set
        // order: the call reads the same either way.
        let end = |c: &rusqlite::Connection| write(c, &ended(true));
        let completed = |c: &rusqlite::Connection| status(c, "completed", Some(5));
        for row in [after(&end, &completed), after(&completed, &end)] {
            assert_eq!(
                project(&row, &["status", "end_reason", "twilio_duration_s"]),
                json!({"status": "failed", "end_reason": "openai_closed", "twilio_duration_s": 5}),
            );
        }
    }

    #[test]
    fn twilios_completed_before_a_call_the_bridge_could_not_take_leaves_it_failed() {
        for reason in ["not_registered", "stream_never_connected"] {
            let unserved = |c: &rusqlite::Connection| write(c, &unserved(reason));
            let completed = |c: &rusqlite::Connection| status(c, "completed", Some(5));
            for row in [after(&unserved, &completed), after(&completed, &unserved)] {
                assert_eq!(
                    project(&row, &["status", "end_reason", "end_detail"]),
                    json!({"status": "failed", "end_reason": reason,
                           "end_detail": format!("{reason} detail")}),
                );
            }
        }
        // Switched off on purpose is no failure, in either order.
        let off = |c: &rusqlite::Connection| write(c, &unserved("fallback_only"));
        let completed = |c: &rusqlite::Connection| status(c, "completed", Some(5));
        for row in [after(&off, &completed), after(&completed, &off)] {
            assert_eq!(
                project(&row, &["status", "end_reason"]),
                json!({"status": "completed", "end_reason": "fallback_only"}),
            );
        }
    }

    #[test]
    fn twilios_other_final_statuses_stand_against_the_bridges_end_in_either_order() {
        // Busy, no answer, canceled (and Twilio's own failed) say what became of the call on
        // the phone network: the bridge's end, failed or not, does not change them.
        for twilio in ["busy", "no-answer", "canceled", "failed"] {
            for (ours, reason) in [
                (ended(true), "openai_closed"),
                (ended(false), "twilio_stop"),
                (unserved("not_registered"), "not_registered"),
                (unserved("fallback_only"), "fallback_only"),
            ] {
                let ours = |c: &rusqlite::Connection| write(c, &ours);
                let theirs = |c: &rusqlite::Connection| status(c, twilio, Some(0));
                for row in [after(&ours, &theirs), after(&theirs, &ours)] {
                    assert_eq!(
                        project(&row, &["status", "end_reason"]),
                        json!({"status": twilio, "end_reason": reason}),
                        "{twilio} with {reason}"
                    );
                }
            }
        }
    }

    /// The end the object presumes at 70 s when a restart cut the stream.
    fn presumed_end() -> Record {
        Record::CallEnded {
            call_sid: SID.into(),
            at_ms: 70_000,
            duration_ms: Some(68_000),
            end_reason: "bridge_restarted".into(),
            end_detail: None,
            failed: true,
            input_tokens: 0,
            output_tokens: 0,
            total_tokens: 0,
            first_audio_ms: None,
            barge_ins: 0,
            transcription: TranscriptionUsage::default(),
            presumed: true,
        }
    }

    #[test]
    fn a_presumed_end_lands_only_where_the_call_has_none_and_then_fails_it() {
        let presumed = presumed_end();
        let presume = |c: &rusqlite::Connection| write(c, &presumed);
        // After the call's own end: nothing changes, Twilio's completed before it or not.
        let own = |c: &rusqlite::Connection| write(c, &ended(false));
        let row = after(&own, &presume);
        assert_eq!(
            project(&row, &["status", "end_reason", "duration_ms"]),
            json!({"status": "completed", "end_reason": "twilio_stop", "duration_ms": 59_000}),
        );
        let own_then_completed = |c: &rusqlite::Connection| {
            write(c, &ended(false));
            status(c, "completed", Some(60));
        };
        let row = after(&own_then_completed, &presume);
        assert_eq!(
            project(&row, &["status", "end_reason"]),
            json!({"status": "completed", "end_reason": "twilio_stop"}),
        );
        // Where the call has no end, it is the end, and a failure whichever came first.
        let completed = |c: &rusqlite::Connection| status(c, "completed", Some(60));
        for row in [after(&presume, &completed), after(&completed, &presume)] {
            assert_eq!(
                project(&row, &["status", "end_reason"]),
                json!({"status": "failed", "end_reason": "bridge_restarted"}),
            );
        }
        let canceled = |c: &rusqlite::Connection| status(c, "canceled", Some(0));
        for row in [after(&presume, &canceled), after(&canceled, &presume)] {
            assert_eq!(row["status"], "canceled");
        }
    }

    #[test]
    fn twilios_end_time_stands_against_a_presumed_end_in_either_order() {
        // The object presumes a restart cut the stream, at 70 s (when it noticed, or as late
        // as the recording's checkpoints allow); Twilio's final status says the call was over
        // at 9 s. Its status may land first (the status callback could not end the stream
        // then, and the alarm did later) or second.
        let presumed = presumed_end();
        let presume = |c: &rusqlite::Connection| write(c, &presumed);
        for twilio in ["completed", "no-answer"] {
            let theirs = |c: &rusqlite::Connection| status(c, twilio, Some(8));
            for (order, row) in [
                ("status first", after(&theirs, &presume)),
                ("presumed first", after(&presume, &theirs)),
            ] {
                assert_eq!(
                    project(&row, &["ended_at", "duration_ms", "end_reason"]),
                    json!({"ended_at": iso_time(9_000), "duration_ms": 68_000,
                           "end_reason": "bridge_restarted"}),
                    "{twilio}, {order}"
                );
            }
        }
        // A presumed end with no final status yet dates the call itself.
        let row = after(&presume, &|c| status(c, "in-progress", None));
        assert_eq!(row["ended_at"], iso_time(70_000));
        // The call's own end is no presumption: its time stands, before Twilio's or after.
        let own = |c: &rusqlite::Connection| write(c, &ended(false));
        let completed = |c: &rusqlite::Connection| status(c, "completed", Some(60));
        for row in [after(&own, &completed), after(&completed, &own)] {
            assert_eq!(row["ended_at"], iso_time(61_000));
        }
    }

    #[test]
    fn a_status_callback_before_the_webhook_row_still_lands() {
        let conn = testdb::open();
        status(&conn, "completed", Some(3));
        write(&conn, &ringing());
        let row = call_row(&conn);
        assert_eq!(row["status"], "completed");
        assert_eq!(row["to_number"], "+815012345678");
        // The call started when the webhook came, not when the callback made the row.
        assert_eq!(row["started_at"], iso_time(1_000));
        // A retried webhook record never moves the start later.
        let mut late = ringing();
        if let Record::CallRinging { at_ms, .. } = &mut late {
            *at_ms = 5_000;
        }
        write(&conn, &late);
        assert_eq!(call_row(&conn)["started_at"], iso_time(1_000));
        // queued/initiated write nothing.
        assert!(Record::TwilioStatus {
            call_sid: SID.into(),
            status: "queued".into(),
            call_duration_s: None,
            at_ms: 0,
            parties: Default::default(),
        }
        .statements(0)
        .is_empty());
    }

    #[test]
    fn a_call_known_only_from_its_status_callback_has_its_parties() {
        // The voice webhook never reached the Worker (it failed, or the call was never
        // answered): the callback's parties fill the row, so a number filter finds it.
        let with = |from: &str| Record::TwilioStatus {
            call_sid: SID.into(),
            status: "no-answer".into(),
            call_duration_s: Some(0),
            at_ms: 9_000,
            parties: Parties {
                account_sid: "AC1".into(),
                from: from.into(),
                to: "+815012345678".into(),
                direction: "outbound-api".into(),
            },
        };
        let conn = testdb::open();
        write(&conn, &with("+819011112222"));
        let row = call_row(&conn);
        let got: Vec<&str> = [
            "status",
            "from_number",
            "to_number",
            "direction",
            "account_sid",
        ]
        .iter()
        .map(|k| row[*k].as_str().unwrap_or("?"))
        .collect();
        assert_eq!(
            got,
            [
                "no-answer",
                "+819011112222",
                "+815012345678",
                "outbound-api",
                "AC1"
            ]
        );
        // A row that has its parties (from the webhook) keeps them.
        let conn = testdb::open();
        write(&conn, &ringing());
        write(&conn, &with("+810000000000"));
        let row = call_row(&conn);
        assert_eq!(
            (row["from_number"].as_str(), row["direction"].as_str()),
            (Some("+819012345678"), Some("inbound"))
        );
    }

    #[test]
    fn transcripts_and_events_are_upserted_by_seq() {
        let conn = testdb::open();
        let entry = |seq, text: &str, interrupted| Record::Transcript {
            call_sid: SID.into(),
            seq,
            role: Role::Agent,
            text: text.into(),
            offset_ms: 100,
            item_id: Some("item_1".into()),
            interrupted,
        };
        // Written before the call row exists (the outbox replays in order, but a row
        // must never be refused for it).
        write(&conn, &entry(1, "ご予約", true));
        write(&conn, &entry(1, "ご予約ですね。", true));
        write(&conn, &entry(0, "はい", false));
        let event = Record::Event {
            call_sid: SID.into(),
            seq: 0,
            at_ms: 5_000,
            kind: "barge_in".into(),
            detail: json!({"audio_end_ms": 200}),
        };
        write(&conn, &event);
        write(&conn, &event);
        let rows = testdb::query(
            &conn,
            &Statement::new(
                "SELECT seq, role, text, interrupted FROM transcript_entries ORDER BY seq",
                vec![],
            ),
        );
        assert_eq!(
            rows,
            vec![
                json!({"seq":0,"role":"agent","text":"はい","interrupted":0}),
                json!({"seq":1,"role":"agent","text":"ご予約ですね。","interrupted":1}),
            ]
        );
        let events = testdb::query(
            &conn,
            &Statement::new("SELECT seq, type, detail FROM call_events", vec![]),
        );
        assert_eq!(
            events,
            vec![json!({"seq":0,"type":"barge_in","detail":"{\"audio_end_ms\":200}"})]
        );
    }

    #[test]
    fn a_recording_lands_on_its_call_row() {
        let conn = testdb::open();
        write(&conn, &ringing());
        assert_eq!(call_row(&conn)["recording_key"], Value::Null);
        let rec = Record::Recording {
            call_sid: SID.into(),
            key: "recordings/CA1.wav".into(),
            duration_ms: 59_000,
            bytes: 44 + 59_000 * 32,
        };
        write(&conn, &rec);
        write(&conn, &rec);
        write(&conn, &ended(false));
        let row = call_row(&conn);
        assert_eq!(row["recording_key"], "recordings/CA1.wav");
        assert_eq!(row["recording_duration_ms"], 59_000);
        assert_eq!(row["recording_bytes"], 44 + 59_000 * 32);
        assert_eq!(row["status"], "completed");
    }

    #[test]
    fn status_ranks() {
        assert!(status_rank("ringing") < status_rank("in-progress"));
        assert_eq!(status_rank("busy"), status_rank("completed"));
        assert_eq!(status_rank("bogus"), None);
        let status = |status: &str| Record::TwilioStatus {
            call_sid: "CA1".into(),
            status: status.into(),
            call_duration_s: None,
            at_ms: 0,
            parties: Parties::default(),
        };
        for over in ["completed", "busy", "no-answer", "canceled", "failed"] {
            assert!(status(over).is_final_status(), "{over}");
        }
        for not_yet in ["ringing", "in-progress", "bogus"] {
            assert!(!status(not_yet).is_final_status(), "{not_yet}");
        }
    }

    #[test]
    fn iso_times() {
        assert_eq!(iso_time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso_time(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(iso_time(1_795_311_122_123), "2026-11-22T01:32:02.123Z");
    }
}
