//! Twilio's HTTP side of a call: the voice webhook that answers with TwiML, and the
//! checks on the Media Stream upgrade. Pure functions of the request's URL, headers and
//! body, so the shell only has to hand them over and map a refusal to a status code.

use crate::config::{Agent, Bridge};
use crate::ids::CallSid;
use crate::store::{status_rank, EventKind, Record};
use crate::{signature, twiml};

/// Path of the voice webhook.
pub const VOICE_PATH: &str = "/api/twilio/voice";
/// Path of Twilio's call status callback.
pub const STATUS_PATH: &str = "/api/twilio/status";
/// Path Twilio asks, once a transfer's `<Dial>` has ended, what to do with the caller.
pub const TRANSFER_RESULT_PATH: &str = "/api/twilio/transfer-result";
/// The `seq` of a transfer's result among the call's events: the call machine numbers its
/// own from 0, and a call is transferred at most once, so a retried callback lands once.
pub const TRANSFER_RESULT_SEQ: u64 = 1_000_000_000;
/// Prefix of the Media Stream WebSocket path; the CallSid follows.
pub const STREAM_PATH_PREFIX: &str = "/api/twilio/media-stream/";

/// Why a Twilio request was not served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no X-Twilio-Signature header")]
    Unsigned,
    #[error("X-Twilio-Signature does not match")]
    BadSignature,
    #[error("neither TWILIO_AUTH_TOKEN nor TWILIO_AUTH_TOKEN_SECONDARY is set, so no Twilio request can be verified")]
    NoAuthToken,
    #[error("bad request: {0}")]
    BadRequest(String),
}

impl Refusal {
    /// The HTTP status the shell answers with.
    pub fn status(&self) -> u16 {
        match self {
            Refusal::BadRequest(_) => 400,
            _ => 403,
        }
    }

    /// True when the request could not be verified as Twilio's (no signature, one that does
    /// not match, or no auth token to check it with), rather than being malformed.
    pub fn unverified(&self) -> bool {
        !matches!(self, Refusal::BadRequest(_))
    }
}

/// The call a verified voice webhook announced.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VoiceCall {
    pub call_sid: CallSid,
    pub account_sid: String,
    pub from: String,
    pub to: String,
    pub direction: String,
    pub call_status: String,
}

/// What the Worker hands the call's Durable Object before answering the webhook: the call
/// and the agent that will answer it, as they were when the call came in.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Registration {
    pub call: VoiceCall,
    pub agent: Agent,
    pub at_ms: u64,
}

impl Registration {
    /// The `calls` row as the call starts ringing.
    pub fn record(&self) -> Record {
        Record::CallRinging {
            call_sid: self.call.call_sid.0.clone(),
            account_sid: self.call.account_sid.clone(),
            from: self.call.from.clone(),
            to: self.call.to.clone(),
            direction: self.call.direction.clone(),
            agent_id: self.agent.id.clone(),
            at_ms: self.at_ms,
        }
    }

    /// The call got the fallback TwiML instead of its agent: `reason` (one of
    /// [`FALLBACK_ONLY`], [`OPENAI_URL_INVALID`], [`NOT_REGISTERED`], [`NEVER_STREAMED`])
    /// and its particulars.
    pub fn unserved(&self, reason: &str, detail: Option<String>) -> Record {
        Record::CallUnserved {
            call_sid: self.call.call_sid.0.clone(),
            at_ms: self.at_ms,
            end_reason: reason.into(),
            end_detail: detail,
            failed: reason != FALLBACK_ONLY,
        }
    }

    /// The end of a call whose bridge went away mid-stream (the object was restarted, by
    /// a deploy for instance): what the call machine would have written had it lived.
    pub fn interrupted(&self, streamed_at_ms: u64, now_ms: u64) -> Record {
        Record::CallEnded {
            call_sid: self.call.call_sid.0.clone(),
            at_ms: now_ms,
            duration_ms: Some(now_ms.saturating_sub(streamed_at_ms)),
            end_reason: INTERRUPTED.into(),
            end_detail: Some(
                "the bridge restarted mid-call (a deploy or a platform restart)".into(),
            ),
            failed: true,
            input_tokens: 0,
            output_tokens: 0,
            total_tokens: 0,
            first_audio_ms: None,
            barge_ins: 0,
            transcription: Default::default(),
            presumed: true,
        }
    }
}

/// End reason of a call whose bridge was restarted mid-stream.
pub const INTERRUPTED: &str = "bridge_restarted";
/// `end_reason` of a call answered with the fallback because `FALLBACK_ONLY` is on.
pub const FALLBACK_ONLY: &str = "fallback_only";
/// `end_reason` of a call answered with the fallback because `OPENAI_REALTIME_URL` is not a
/// URL: a failure, where `FALLBACK_ONLY` is a choice.
pub const OPENAI_URL_INVALID: &str = "openai_url_invalid";

/// Why a call gets the fallback only ([`VoiceAnswer::streams`] false): the maintenance
/// switch, or a Realtime URL that is not one; with its particulars.
pub fn fallback_only_reason(config: &Bridge) -> (&'static str, Option<String>) {
    match &config.openai_url_invalid {
        Some(why) => (OPENAI_URL_INVALID, Some(why.clone())),
        None => (FALLBACK_ONLY, None),
    }
}
/// `end_reason` of a call whose call object could not take it (the fallback answered it).
pub const NOT_REGISTERED: &str = "not_registered";
/// `end_reason` of a call handed to its agent whose Media Stream never connected (an
/// upgrade refused or never made, or the caller gone first): Twilio went on past
/// `</Connect>` to the fallback, or the call was over.
pub const NEVER_STREAMED: &str = "stream_never_connected";

/// What a call's Durable Object keeps about its call in its own storage.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CallState {
    pub registration: Registration,
    /// Set once the stream has ended; the call cannot be streamed again.
    pub end_reason: Option<String>,
    /// When the stream was accepted; with no end reason, a stream is (or was) running.
    #[serde(default)]
    pub streamed_at_ms: Option<u64>,
    /// An end the object decided for the call from what it was told (see
    /// [`CallState::never_streamed`]) and the outbox has not kept yet: stored with the call, so
    /// that it is handed over again (by the alarm, after a restart too) until it is kept, as
    /// an end found from the call's state alone ([`CallState::finalize_orphaned`]) is.
    #[serde(default)]
    pub end_owed: Option<Record>,
}

/// Why a call's object refuses a Media Stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StreamRefusal {
    #[error("no signed voice webhook for this call")]
    NoWebhook,
    #[error("this call already has a stream")]
    AlreadyStreaming,
    #[error("this call's stream has ended")]
    Ended,
    #[error("this call's stream was cut by a restart of the bridge and cannot be resumed")]
    Interrupted,
}

impl StreamRefusal {
    /// The HTTP status the upgrade is answered with.
    pub fn status(self) -> u16 {
        match self {
            StreamRefusal::NoWebhook => 404,
            StreamRefusal::AlreadyStreaming => 409,
            StreamRefusal::Ended | StreamRefusal::Interrupted => 410,
        }
    }
}

impl CallState {
    pub fn new(registration: Registration) -> Self {
        CallState {
            registration,
            end_reason: None,
            streamed_at_ms: None,
            end_owed: None,
        }
    }

    /// Whether a new Media Stream for `call_sid` may start, given whether a pump of this
    /// instance of the object serves one (`live`). A stream that started before this instance
    /// (the object restarted) went with it: it cannot be resumed, and a new one would start a
    /// new call machine whose turns overwrite the call's; it is refused as `Interrupted`,
    /// and is then to be finalized ([`CallState::finalize_orphaned`]).
    pub fn admit_stream(&self, call_sid: &CallSid, live: bool) -> Result<(), StreamRefusal> {
        if self.registration.call.call_sid != *call_sid {
            Err(StreamRefusal::NoWebhook)
        } else if self.end_reason.is_some() {
            Err(StreamRefusal::Ended)
        } else if live {
            Err(StreamRefusal::AlreadyStreaming)
        } else if self.streamed_at_ms.is_some() {
            Err(StreamRefusal::Interrupted)
        } else {
            Ok(())
        }
    }

    /// Twilio's final `status` for a call handed to its agent whose stream never started:
    /// marks it ended (a late upgrade is refused) and returns the end to record, with
    /// Twilio's status and duration as its particulars, also kept as owed
    /// ([`CallState::end_owed`]): Twilio says this once, and nothing else could rebuild it;
    /// `None` for any other call or status.
    pub fn never_streamed(&mut self, status: &str, duration_s: Option<u64>) -> Option<Record> {
        if crate::store::status_rank(status) != Some(3)
            || self.streamed_at_ms.is_some()
            || self.end_reason.is_some()
        {
            return None;
        }
        self.end_reason = Some(NEVER_STREAMED.to_owned());
        let lasted = duration_s.map_or(String::new(), |s| format!(" after {s} s"));
        let end = self.registration.unserved(
            NEVER_STREAMED,
            Some(format!(
                "Twilio reported the call {status}{lasted} and its Media Stream never connected"
            )),
        );
        self.end_owed = Some(end.clone());
        Some(end)
    }

    /// A stream that started and never ended, while no pump of this instance of the object
    /// serves it (`pumped` is false): the object was restarted mid-stream (by a deploy, say)
    /// and both sockets went with it. Marks the stream ended and returns the call's end to
    /// record; `None` when there is nothing to finalize.
    pub fn finalize_orphaned(&mut self, pumped: bool, now_ms: u64) -> Option<Record> {
        let streamed_at = self.streamed_at_ms?;
        if pumped || self.end_reason.is_some() {
            return None;
        }
        self.end_reason = Some(INTERRUPTED.to_owned());
        Some(self.registration.interrupted(streamed_at, now_ms))
    }
}

/// A verified voice webhook: the call, and where its Media Stream is to connect.
#[derive(Debug, Clone, PartialEq)]
pub struct VoiceAnswer {
    pub call: VoiceCall,
    /// `None` when the call gets the fallback only (`FALLBACK_ONLY`).
    pub stream_url: Option<String>,
    /// Where Twilio asks what to do once the fallback's `<Dial>` ends (the transfer-result
    /// URL); `None` when it cannot be made from the request's URL.
    pub dial_action: Option<String>,
    /// The auth token the webhook was signed with.
    pub key: Key,
}

impl VoiceAnswer {
    /// True when the call is handed to the bridge; false for the fallback TwiML.
    pub fn streams(&self) -> bool {
        self.stream_url.is_some()
    }

    /// The TwiML that answers the call, once its agent is known: the Media Stream, then
    /// what Twilio plays when the stream ends without the call having ended (the agent side
    /// failed, the bridge restarted, a hang-up or transfer was refused): the apology and a
    /// transfer to the fallback number or else the agent's own. With `FALLBACK_ONLY`, that
    /// fallback alone.
    pub fn twiml(&self, config: &Bridge, agent: &Agent) -> String {
        let action = self.dial_action.as_deref();
        let Some(url) = &self.stream_url else {
            return fallback_twiml(config, agent, action);
        };
        let call = &self.call;
        twiml::connect_stream_then_fallback(
            url,
            &[
                ("From", &call.from),
                ("To", &call.to),
                ("Direction", &call.direction),
            ],
            &apology(config),
            fallback_dial(config, agent),
            action,
        )
    }
}

fn apology(config: &Bridge) -> twiml::Apology<'_> {
    twiml::Apology {
        message: &config.fallback_message,
        language: &config.fallback_language,
        voice: &config.fallback_voice,
    }
}

/// Who a caller the agent cannot serve is put through to: the fallback number, or else
/// the agent's own transfer number.
fn fallback_dial<'a>(config: &'a Bridge, agent: &'a Agent) -> Option<&'a str> {
    config
        .fallback_dial_number
        .as_deref()
        .or(agent.transfer_number.as_deref())
}

/// `scheme://authority` and the rest (`/path?query`) of an absolute URL.
fn split_origin(url: &str) -> Option<(&str, &str, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    (!authority.is_empty()).then_some((scheme, authority, tail))
}

/// Where Twilio reaches us: the scheme, and `host[:port]` followed by the path the Worker is
/// served under, to which the paths of its routes (`/api/twilio/...`) are appended. That is
/// `PUBLIC_BASE_URL` when set (behind a proxy or custom domain; a proxy may serve the Worker
/// under a path, `https://example.jp/phone`, and pass its requests on without it), else the
/// request's own origin.
fn public_base(config: &Bridge, request_url: &str) -> Result<(String, String), Refusal> {
    let not_absolute = |url: &str| Refusal::BadRequest(format!("not an absolute URL: {url}"));
    let (scheme, base) = match config.public_base_url.as_deref() {
        Some(public) => {
            let (scheme, authority, path) =
                split_origin(public).ok_or_else(|| not_absolute(public))?;
            (scheme, format!("{authority}{}", path.trim_end_matches('/')))
        }
        None => {
            let (scheme, authority, _) =
                split_origin(request_url).ok_or_else(|| not_absolute(request_url))?;
            (scheme, authority.to_owned())
        }
    };
    Ok((scheme.to_ascii_lowercase(), base))
}

/// [`public_base`] for a URL that goes into TwiML: without the characters no XML document
/// can carry, which the TwiML drops. Twilio signs what it read there, so the URL a
/// signature is checked against must be the one the TwiML holds.
fn twiml_base(config: &Bridge, request_url: &str) -> Result<(String, String), Refusal> {
    let (scheme, base) = public_base(config, request_url)?;
    Ok((scheme, twiml::xml_chars(&base)))
}

/// The URL Twilio signed: the public base with the request's path and query.
fn signed_url(config: &Bridge, request_url: &str) -> Result<String, Refusal> {
    let (_, _, tail) = split_origin(request_url)
        .ok_or_else(|| Refusal::BadRequest(format!("not an absolute URL: {request_url}")))?;
    let (scheme, base) = public_base(config, request_url)?;
    Ok(format!("{scheme}://{base}{tail}"))
}

/// Whether the stream on `base` is `wss` (and a transfer's action `https`): always, since
/// Twilio opens Media Streams over `wss` only, but for this machine reached over plain http
/// (local development, where `ws` is all there is).
fn secure(scheme: &str, base: &str) -> bool {
    let authority = base.split(['/', '?', '#']).next().unwrap_or_default();
    matches!(scheme, "https" | "wss") || !crate::config::is_loopback(authority)
}

/// The Media Stream URL for a call, exactly as written into the TwiML, on the public base:
/// `wss`, or `ws` for this machine reached over plain http (local development).
pub fn stream_url(
    config: &Bridge,
    request_url: &str,
    call_sid: &CallSid,
) -> Result<String, Refusal> {
    let (scheme, base) = twiml_base(config, request_url)?;
    let ws = if secure(&scheme, &base) { "wss" } else { "ws" };
    Ok(format!("{ws}://{base}{STREAM_PATH_PREFIX}{call_sid}"))
}

/// The `<Dial action>` URL of a transfer, on the public base Twilio reaches us at (`https`
/// when the stream is `wss`). `request_url` is any request Twilio made to us: the stream's.
pub fn transfer_result_url(config: &Bridge, request_url: &str) -> Result<String, Refusal> {
    let (scheme, base) = twiml_base(config, request_url)?;
    let http = if secure(&scheme, &base) {
        "https"
    } else {
        "http"
    };
    Ok(format!("{http}://{base}{TRANSFER_RESULT_PATH}"))
}

/// What a verified transfer result is answered with, and kept as.
#[derive(Debug, Clone, PartialEq)]
pub struct TransferResult {
    pub call_sid: CallSid,
    /// The person answered (`DialCallStatus` `completed` or `answered`).
    pub answered: bool,
    /// A `transfer_result` event for the call's record.
    pub record: Record,
    /// `<Hangup/>`, after the apology when nobody answered.
    pub twiml: String,
}

/// Verifies Twilio's request to a transfer's `<Dial action>` and answers it: the call ends
/// when the person answered (their conversation is over), or after an apology when the
/// line was busy, not answered or failed, rather than with silence.
pub fn transfer_result<'a>(
    config: &Bridge,
    request_url: &str,
    signature: Option<&str>,
    params: impl Into<Params<'a>>,
    now_ms: u64,
) -> Result<TransferResult, Refusal> {
    let params = verified_params(config, request_url, signature, params.into())?;
    let get = |name: &str| params.get(name);
    let call_sid = params.call_sid()?;
    let status = get("DialCallStatus")
        .ok_or_else(|| Refusal::BadRequest("DialCallStatus missing".into()))?;
    let answered = matches!(status, "completed" | "answered");
    let duration_s = get("DialCallDuration").and_then(|d| d.parse::<u64>().ok());
    let record = EventKind::TransferResult.record(
        &call_sid.0,
        TRANSFER_RESULT_SEQ,
        now_ms,
        serde_json::json!({
            "answered": answered,
            "dial_call_status": status,
            "dial_call_duration_s": duration_s,
            "dial_call_sid": get("DialCallSid"),
        }),
    );
    let apology = twiml::Apology {
        message: &config.transfer_failed_message,
        ..apology(config)
    };
    Ok(TransferResult {
        twiml: twiml::transfer_result(answered, &apology),
        call_sid,
        answered,
        record,
    })
}

/// Which auth token a request was signed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    /// `TWILIO_AUTH_TOKEN`.
    Primary,
    /// `TWILIO_AUTH_TOKEN_SECONDARY`: Twilio signs with it once it is promoted, while REST
    /// calls still use `TWILIO_AUTH_TOKEN`.
    Secondary,
}

/// The auth tokens Twilio's signatures are checked with, each with the key it is; an unset
/// one is left out.
fn tokens(config: &Bridge) -> Result<Vec<(Key, &str)>, Refusal> {
    let tokens: Vec<_> = [
        (Key::Primary, &config.twilio_auth_token),
        (Key::Secondary, &config.twilio_auth_token_secondary),
    ]
    .into_iter()
    .filter(|(_, token)| !token.is_empty())
    .map(|(key, token)| (key, token.expose()))
    .collect();
    if tokens.is_empty() {
        Err(Refusal::NoAuthToken)
    } else {
        Ok(tokens)
    }
}

/// The first of `tokens` that `signed` says the request was signed with.
fn signed_with(tokens: &[(Key, &str)], signed: impl Fn(&str) -> bool) -> Result<Key, Refusal> {
    tokens
        .iter()
        .find(|(_, token)| signed(token))
        .map(|(key, _)| *key)
        .ok_or(Refusal::BadSignature)
}

/// Where a Twilio webhook's parameters are: the body of a form POST, or the query string
/// of a GET (a number's webhook can be set to either method). Twilio signs the URL followed
/// by a form's parameters; a GET's are in the URL already, and nothing is appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Params<'a> {
    Form(&'a str),
    Query,
}

impl<'a> From<&'a str> for Params<'a> {
    fn from(body: &'a str) -> Self {
        Params::Form(body)
    }
}

impl<'a> From<&'a String> for Params<'a> {
    fn from(body: &'a String) -> Self {
        Params::Form(body)
    }
}

/// Verifies Twilio's voice webhook; [`VoiceAnswer::twiml`] answers it.
pub fn answer_voice<'a>(
    config: &Bridge,
    request_url: &str,
    signature: Option<&str>,
    params: impl Into<Params<'a>>,
) -> Result<VoiceAnswer, Refusal> {
    let params = verified_params(config, request_url, signature, params.into())?;
    let get = |name: &str| params.get(name).unwrap_or_default().to_owned();
    let call_sid = params.call_sid()?;
    let call = VoiceCall {
        call_sid,
        account_sid: get("AccountSid"),
        from: get("From"),
        to: get("To"),
        direction: get("Direction"),
        call_status: get("CallStatus"),
    };
    let stream_url = if config.fallback_only {
        None
    } else {
        Some(stream_url(config, request_url, &call.call_sid)?)
    };
    Ok(VoiceAnswer {
        call,
        stream_url,
        dial_action: transfer_result_url(config, request_url).ok(),
        key: params.key,
    })
}

/// The TwiML of a caller the agent cannot serve (the agent failed mid-call, the call could
/// not be handed to its call object, `FALLBACK_ONLY`): the apology, then the fallback
/// number, or else the agent's own transfer number, when either is set. With `dial_action`
/// (the transfer-result URL), a person who does not answer is handled as in a transfer: the
/// caller hears `TRANSFER_FAILED_MESSAGE`, and the call's events get a `transfer_result`.
pub fn fallback_twiml(config: &Bridge, agent: &Agent, dial_action: Option<&str>) -> String {
    twiml::fallback(&apology(config), fallback_dial(config, agent), dial_action)
}

/// A voice webhook whose signature did not verify: none, one that does not match, or no
/// auth token to check it with. Refused (403), Twilio would play "an application error has
/// occurred" and hang up, and when the cause is the configuration (a rotated
/// `TWILIO_AUTH_TOKEN`, a `PUBLIC_BASE_URL` other than the URL Twilio calls) it would do so
/// to every caller. It is answered with the fallback instead: the apology, then
/// `FALLBACK_DIAL_NUMBER`. Nothing the request says is acted on: no agent is looked up, no
/// stream is offered, nothing is recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct Unverified {
    pub why: Refusal,
    /// The CallSid the request names, when it is well-formed: not verified, for the log only.
    pub claimed_call_sid: Option<CallSid>,
    /// The URL the signature was checked against, without its query: the URL Twilio must
    /// be calling for its signature to verify.
    pub checked_url: Option<String>,
    pub twiml: String,
}

/// How a voice webhook that [`answer_voice`] refused with `why` is answered: `Some` when it
/// could not be verified (see [`Unverified`]); `None` for a malformed request, whose
/// refusal stands.
pub fn unverified_voice<'a>(
    config: &Bridge,
    request_url: &str,
    params: impl Into<Params<'a>>,
    why: Refusal,
) -> Option<Unverified> {
    if !why.unverified() {
        return None;
    }
    let (_, claimed) = read_params(request_url, params.into());
    let claimed_call_sid = claimed
        .iter()
        .find(|(name, _)| name == "CallSid")
        .and_then(|(_, sid)| CallSid::parse(sid));
    let checked_url = signed_url(config, request_url).ok().map(|u| {
        let end = u.find(['?', '#']).unwrap_or(u.len());
        u[..end].to_owned()
    });
    Some(Unverified {
        why,
        claimed_call_sid,
        checked_url,
        // No `<Dial action>`: its request would not verify either, and be refused.
        twiml: twiml::fallback(
            &apology(config),
            config.fallback_dial_number.as_deref(),
            None,
        ),
    })
}

/// Unverified voice webhooks logged at `error`, per isolate and minute; the rest at
/// `debug`. A wrong token makes every call one, and anyone can send them: the first few say
/// what is wrong, and a flood does not bury everything else in the log.
pub const UNVERIFIED_ERRORS_PER_MINUTE: u32 = 5;

/// Counts one more unverified voice webhook at `now_ms`, given the minute (since the epoch)
/// and count so far: the new state, and whether to log it at `error`.
pub fn unverified_log(state: (u64, u32), now_ms: u64) -> ((u64, u32), bool) {
    let minute = now_ms / 60_000;
    let n = if state.0 == minute {
        state.1.saturating_add(1)
    } else {
        1
    };
    ((minute, n), n <= UNVERIFIED_ERRORS_PER_MINUTE)
}

/// The parameters of a signed webhook from Twilio, once its signature checks out.
fn verified_params(
    config: &Bridge,
    request_url: &str,
    signature: Option<&str>,
    params: Params<'_>,
) -> Result<Verified, Refusal> {
    let tokens = tokens(config)?;
    let signature = signature
        .filter(|s| !s.is_empty())
        .ok_or(Refusal::Unsigned)?;
    let url = signed_url(config, request_url)?;
    let (signed, params) = read_params(&url, params);
    let urls = signed_urls(config, url);
    let key = signed_with(&tokens, |token| {
        urls.iter()
            .any(|url| signature::validate_webhook(token, url, &signed, signature))
    })?;
    Ok(Verified { params, key })
}

/// The URLs a webhook to `url` may have been signed over. A `PUBLIC_BASE_URL` written
/// `http://` is read as `https://` (see `config`), which is what the URLs the Worker gives
/// Twilio are on; a number's voice URL set in Twilio's console as written, `http://`, is
/// signed over that: both are the Worker's own.
fn signed_urls(config: &Bridge, url: String) -> Vec<String> {
    let plain = config
        .public_base_url
        .as_ref()
        .and(url.strip_prefix("https://"))
        .map(|rest| format!("http://{rest}"));
    std::iter::once(url).chain(plain).collect()
}

/// A webhook's parameters as signed (appended to the URL: a form's; none for a GET) and
/// all of them (a GET's are in the query of `url`).
fn read_params(url: &str, params: Params<'_>) -> (Pairs, Pairs) {
    match params {
        Params::Form(body) => {
            let form: Vec<_> = form_urlencoded::parse(body.as_bytes())
                .into_owned()
                .collect();
            (form.clone(), form)
        }
        Params::Query => {
            let query = url.split_once('?').map_or("", |(_, q)| q);
            let query = query.split_once('#').map_or(query, |(q, _)| q);
            let query = form_urlencoded::parse(query.as_bytes())
                .into_owned()
                .collect();
            (Vec::new(), query)
        }
    }
}

/// A webhook's parameters: names and values, in the order sent.
type Pairs = Vec<(String, String)>;

/// The parameters of a webhook whose signature checked out, and the key it was signed with.
struct Verified {
    params: Pairs,
    key: Key,
}

impl Verified {
    /// The first value given for `name`, unless it is empty.
    fn get(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }

    /// The call it is about: every Twilio webhook names it.
    fn call_sid(&self) -> Result<CallSid, Refusal> {
        self.get("CallSid")
            .and_then(CallSid::parse)
            .ok_or_else(|| Refusal::BadRequest("CallSid missing or malformed".into()))
    }
}

/// Verifies Twilio's status callback and turns it into the update of the call's row.
pub fn status_callback<'a>(
    config: &Bridge,
    request_url: &str,
    signature: Option<&str>,
    params: impl Into<Params<'a>>,
    now_ms: u64,
) -> Result<Record, Refusal> {
    let params = verified_params(config, request_url, signature, params.into())?;
    let get = |name: &str| params.get(name);
    let call_sid = params.call_sid()?;
    let status = get("CallStatus").unwrap_or_default();
    if status_rank(status).is_none() {
        return Err(Refusal::BadRequest(format!(
            "unknown CallStatus {status:?}"
        )));
    }
    let call_duration_s = match get("CallDuration") {
        None => None,
        Some(d) => Some(
            d.parse::<u64>()
                .map_err(|_| Refusal::BadRequest(format!("CallDuration {d:?} is not a number")))?,
        ),
    };
    let text = |name: &str| get(name).unwrap_or_default().to_owned();
    Ok(Record::TwilioStatus {
        call_sid: call_sid.0,
        status: status.to_owned(),
        call_duration_s,
        at_ms: now_ms,
        parties: crate::store::Parties {
            account_sid: text("AccountSid"),
            from: text("From"),
            to: text("To"),
            direction: text("Direction"),
        },
    })
}

/// How a status callback is answered, by whether its record was kept by the time the
/// answer is due. Twilio does not send a status callback again and stops waiting for any
/// webhook's answer after 15 s, so the answer does not wait for the keeping to end: the
/// shell bounds the wait, and the keeping goes on after the answer either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusAnswer {
    /// Kept, by the call's object or written to D1 directly.
    Kept,
    /// Neither the object nor D1 took it.
    NotKept,
    /// Still being kept when the answer was due; the log says how it ends.
    Keeping,
}

impl StatusAnswer {
    /// `kept`: whether it was kept, `None` when that was not yet known.
    pub fn new(kept: Option<bool>) -> Self {
        match kept {
            Some(true) => StatusAnswer::Kept,
            Some(false) => StatusAnswer::NotKept,
            None => StatusAnswer::Keeping,
        }
    }

    /// The HTTP status the shell answers with. Twilio takes any 2xx as delivered.
    pub fn status(self) -> u16 {
        match self {
            StatusAnswer::Kept => 204,
            StatusAnswer::NotKept => 500,
            StatusAnswer::Keeping => 202,
        }
    }

    /// The answer's body (none for 204).
    pub fn body(self) -> &'static str {
        match self {
            StatusAnswer::Kept => "",
            StatusAnswer::NotKept => "Status not recorded",
            StatusAnswer::Keeping => "Status accepted; still being recorded",
        }
    }
}

/// The CallSid named by a Media Stream path, if the path is one.
pub fn stream_call_sid(path: &str) -> Option<CallSid> {
    CallSid::parse(path.strip_prefix(STREAM_PATH_PREFIX)?)
}

/// Verifies the Media Stream WebSocket upgrade: signed over the stream URL as written in
/// the TwiML (no params), which is rebuilt from the public origin and the CallSid.
pub fn verify_stream_upgrade(
    config: &Bridge,
    request_url: &str,
    signature: Option<&str>,
    call_sid: &CallSid,
) -> Result<(), Refusal> {
    let tokens = tokens(config)?;
    let signature = signature
        .filter(|s| !s.is_empty())
        .ok_or(Refusal::Unsigned)?;
    let url = stream_url(config, request_url, call_sid)?;
    signed_with(&tokens, |token| {
        signature::validate_stream_upgrade(token, &url, signature)
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    const TOKEN: &str = "test-token";

    fn config() -> Bridge {
        let mut c = Bridge::from_lookup(|_| None);
        c.twilio_auth_token = Secret::new(TOKEN);
        c
    }

    fn form(params: &[(&str, &str)]) -> (String, Vec<(String, String)>) {
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(params)
            .finish();
        let owned = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        (body, owned)
    }

    const CALL: &[(&str, &str)] = &[
        ("CallSid", "CA0123456789abcdef0123456789abcdef"),
        ("AccountSid", "AC0123456789abcdef0123456789abcdef"),
        ("From", "+819012345678"),
        ("To", "+815012345678"),
        ("Direction", "inbound"),
        ("CallStatus", "ringing"),
    ];

    #[test]
    fn signed_webhook_gets_connect_stream_over_wss() {
        let c = config();
        let url = "https://bridge.example.com/api/twilio/voice";
        let (body, params) = form(CALL);
        let sig = signature::compute(TOKEN, url, &params);
        let a = answer_voice(&c, url, Some(&sig), &body).unwrap();
        let twiml = a.twiml(&c, &Agent::default());
        assert!(a.streams());
        assert_eq!(a.call.from, "+819012345678");
        assert!(twiml.contains(
            r#"<Stream url="wss://bridge.example.com/api/twilio/media-stream/CA0123456789abcdef0123456789abcdef">"#
        ));
        assert!(twiml.contains(r#"<Parameter name="From" value="+819012345678"/>"#));
        assert!(twiml.contains(r#"<Parameter name="To" value="+815012345678"/>"#));
        assert!(
            twiml.contains(r#"<Say language="ja-JP" voice="Polly.Mizuki">"#),
            "fallback after the stream"
        );
    }

    #[test]
    fn local_http_gets_ws_with_port() {
        let c = config();
        let url = "http://127.0.0.1:8787/api/twilio/voice";
        let (body, params) = form(CALL);
        let sig = signature::compute(TOKEN, url, &params);
        let a = answer_voice(&c, url, Some(&sig), &body).unwrap();
        let twiml = a.twiml(&c, &Agent::default());
        assert!(twiml.contains(r#"url="ws://127.0.0.1:8787/api/twilio/media-stream/CA"#));
    }

    /// Twilio opens Media Streams over wss:// only: a request that came over plain http
    /// still gets a `wss` stream (and an `https` transfer action) on its host, while what
    /// was signed is the URL Twilio called; only this machine (local development) gets `ws`.
    #[test]
    fn plain_http_gets_wss_unless_the_host_is_this_machine() {
        let mut c = config();
        let (body, params) = form(CALL);
        let sid = "CA0123456789abcdef0123456789abcdef";
        for (url, stream, action) in [
            (
                "http://bridge.example.com/api/twilio/voice",
                "wss://bridge.example.com/api/twilio/media-stream/",
                "https://bridge.example.com/api/twilio/transfer-result",
            ),
            (
                "http://localhost:8787/api/twilio/voice",
                "ws://localhost:8787/api/twilio/media-stream/",
                "http://localhost:8787/api/twilio/transfer-result",
            ),
            (
                "http://[::1]:8787/api/twilio/voice",
                "ws://[::1]:8787/api/twilio/media-stream/",
                "http://[::1]:8787/api/twilio/transfer-result",
            ),
        ] {
            let sig = signature::compute(TOKEN, url, &params);
            let a = answer_voice(&c, url, Some(&sig), &body).unwrap();
            assert_eq!(a.stream_url, Some(format!("{stream}{sid}")), "{url}");
            assert_eq!(transfer_result_url(&c, url).unwrap(), action, "{url}");
            let upgrade = signature::compute(TOKEN, &format!("{stream}{sid}"), &[]);
            assert_eq!(
                verify_stream_upgrade(&c, url, Some(&upgrade), &a.call.call_sid),
                Ok(())
            );
        }
        // Whatever PUBLIC_BASE_URL holds (the configuration reads http:// as https://).
        c.public_base_url = Some("http://phone.example.jp/line".into());
        let url = "http://internal:8787/api/twilio/voice";
        let sig = signature::compute(
            TOKEN,
            "http://phone.example.jp/line/api/twilio/voice",
            &params,
        );
        let a = answer_voice(&c, url, Some(&sig), &body).unwrap();
        assert_eq!(
            a.stream_url,
            Some(format!(
                "wss://phone.example.jp/line/api/twilio/media-stream/{sid}"
            ))
        );
    }

    #[test]
    fn public_base_url_decides_host_and_what_was_signed() {
        let mut c = config();
        c.public_base_url = Some("https://phone.example.jp".into());
        let (body, params) = form(CALL);
        let public = "https://phone.example.jp/api/twilio/voice";
        let sig = signature::compute(TOKEN, public, &params);
        let a = answer_voice(
            &c,
            "http://internal:8787/api/twilio/voice",
            Some(&sig),
            &body,
        )
        .unwrap();
        let twiml = a.twiml(&c, &Agent::default());
        assert!(twiml.contains(r#"url="wss://phone.example.jp/api/twilio/media-stream/"#));
    }

    /// A proxy may serve the Worker under a path (`https://example.jp/phone`) and pass its
    /// requests on without it: Twilio signs the URL with the path, and the stream and the
    /// transfer's action must carry it too, or Twilio asks the proxy for a path it has not.
    #[test]
    fn a_public_base_url_with_a_path_keeps_it_in_what_was_signed_and_in_the_twiml() {
        let mut c = config();
        c.public_base_url = Some("https://example.jp/phone".into());
        let (body, params) = form(CALL);
        let seen = "https://bridge.example.workers.dev/api/twilio/voice";
        let sig = signature::compute(TOKEN, "https://example.jp/phone/api/twilio/voice", &params);
        let a = answer_voice(&c, seen, Some(&sig), &body).unwrap();
        let stream = a.stream_url.clone().unwrap();
        assert_eq!(
            stream,
            "wss://example.jp/phone/api/twilio/media-stream/CA0123456789abcdef0123456789abcdef"
        );
        assert!(a
            .twiml(&c, &c.agent)
            .contains(&format!("<Stream url=\"{stream}\">")));
        let without_path =
            signature::compute(TOKEN, "https://example.jp/api/twilio/voice", &params);
        assert_eq!(
            answer_voice(&c, seen, Some(&without_path), &body),
            Err(Refusal::BadSignature)
        );

        let upgrade = "https://bridge.example.workers.dev/api/twilio/media-stream/CA0123456789abcdef0123456789abcdef";
        let sig = signature::compute(TOKEN, &stream, &[]);
        assert_eq!(
            verify_stream_upgrade(&c, upgrade, Some(&sig), &a.call.call_sid),
            Ok(())
        );
        assert_eq!(
            transfer_result_url(&c, upgrade).unwrap(),
            "https://example.jp/phone/api/twilio/transfer-result"
        );
        let status = "https://bridge.example.workers.dev/api/twilio/status";
        let (body, params) = form(&[("CallSid", "CA1"), ("CallStatus", "completed")]);
        let sig = signature::compute(TOKEN, "https://example.jp/phone/api/twilio/status", &params);
        assert!(status_callback(&c, status, Some(&sig), &body, 7).is_ok());
        // However the path was written, one `/` between it and the route.
        c.public_base_url = Some("https://example.jp/phone/".into());
        assert_eq!(
            transfer_result_url(&c, upgrade).unwrap(),
            "https://example.jp/phone/api/twilio/transfer-result"
        );
    }

    #[test]
    fn unsigned_or_wrongly_signed_webhooks_are_refused() {
        let c = config();
        let url = "https://bridge.example.com/api/twilio/voice";
        let (body, params) = form(CALL);
        assert_eq!(answer_voice(&c, url, None, &body), Err(Refusal::Unsigned));
        assert_eq!(
            answer_voice(&c, url, Some(""), &body),
            Err(Refusal::Unsigned)
        );
        let wrong = signature::compute("other-token", url, &params);
        assert_eq!(
            answer_voice(&c, url, Some(&wrong), &body),
            Err(Refusal::BadSignature)
        );
        // A parameter changed after signing.
        let sig = signature::compute(TOKEN, url, &params);
        let tampered = body.replace("ringing", "completed");
        assert_eq!(
            answer_voice(&c, url, Some(&sig), &tampered),
            Err(Refusal::BadSignature)
        );
        assert_eq!(Refusal::BadSignature.status(), 403);
    }

    #[test]
    fn unverified_webhooks_are_logged_loudly_a_few_times_a_minute() {
        let mut state = (0, 0);
        let mut loud = Vec::new();
        for t in [
            60_000, 60_001, 60_002, 60_003, 60_004, 60_005, 119_999, 120_000,
        ] {
            let (next, l) = unverified_log(state, t);
            state = next;
            loud.push(l);
        }
        assert_eq!(loud, [true, true, true, true, true, false, false, true]);
    }

    /// A wrong `TWILIO_AUTH_TOKEN` (or `PUBLIC_BASE_URL`) must not turn every call into
    /// Twilio's "application error": the caller hears the apology and is put through to the
    /// fallback number, and nothing the request says is acted on.
    #[test]
    fn an_unverified_voice_webhook_gets_the_fallback_and_nothing_else() {
        let mut c = config();
        c.fallback_dial_number = Some("+81311112222".into());
        let url = "https://bridge.example.com/api/twilio/voice";
        let (body, params) = form(CALL);
        let expected = "<Response><Say language=\"ja-JP\" voice=\"Polly.Mizuki\">申し訳ございません。ただいま電話に出ることができません。後ほどおかけ直しください。</Say><Dial>+81311112222</Dial></Response>";
        let rotated = signature::compute("rotated-token", url, &params);
        let cases = [
            (c.clone(), Some(rotated.as_str()), Refusal::BadSignature),
            (c.clone(), None, Refusal::Unsigned),
            (
                Bridge {
                    twilio_auth_token: Secret::default(),
                    ..c.clone()
                },
                Some(rotated.as_str()),
                Refusal::NoAuthToken,
            ),
        ];
        for (config, sig, refusal) in cases {
            let why = answer_voice(&config, url, sig, &body).unwrap_err();
            assert_eq!(why, refusal);
            let u = unverified_voice(&config, url, &body, why).expect("answered");
            assert_eq!(u.why, refusal);
            assert_eq!(u.twiml, expected, "{refusal:?}");
            assert_eq!(
                u.claimed_call_sid,
                CallSid::parse("CA0123456789abcdef0123456789abcdef")
            );
            assert_eq!(u.checked_url.as_deref(), Some(url));
        }
        // Only the fallback number is dialled: not a number an agent would have named.
        c.fallback_dial_number = None;
        let why = answer_voice(&c, url, Some(&rotated), &body).unwrap_err();
        let u = unverified_voice(&c, url, &body, why).unwrap();
        assert!(
            !u.twiml.contains("<Dial") && !u.twiml.contains("<Stream"),
            "{}",
            u.twiml
        );
        // Behind a proxy, the log names the URL the signature was checked against; a GET's
        // parameters are left out of it.
        c.public_base_url = Some("https://phone.example.jp".into());
        let (query, _) = form(&[("CallSid", "CA77"), ("From", "+81")]);
        let get = format!("http://internal:8787/api/twilio/voice?{query}");
        let why = answer_voice(&c, &get, Some("bm90LWEtc2lnbmF0dXJl"), Params::Query).unwrap_err();
        let u = unverified_voice(&c, &get, Params::Query, why).unwrap();
        assert_eq!(
            u.checked_url.as_deref(),
            Some("https://phone.example.jp/api/twilio/voice")
        );
        assert_eq!(u.claimed_call_sid, CallSid::parse("CA77"));
        // A CallSid that could smuggle anything into the log is not repeated.
        let (odd, _) = form(&[("CallSid", "CA1\"}{")]);
        let u = unverified_voice(&c, url, &odd, Refusal::Unsigned).unwrap();
        assert_eq!(u.claimed_call_sid, None);
    }

    /// Twilio signs with the secondary token from the moment it is promoted: accepted on
    /// every route, and the answer says which token it was.
    #[test]
    fn a_signature_made_with_the_secondary_token_is_accepted_on_every_route() {
        let mut c = config();
        let url = "https://bridge.example.com/api/twilio/voice";
        let (body, params) = form(CALL);
        let promoted = signature::compute("promoted-token", url, &params);
        assert_eq!(
            answer_voice(&c, url, Some(&promoted), &body),
            Err(Refusal::BadSignature),
            "no secondary token set"
        );
        c.twilio_auth_token_secondary = Secret::new("promoted-token");
        let a = answer_voice(&c, url, Some(&promoted), &body).unwrap();
        assert_eq!(a.key, Key::Secondary);
        assert!(a.streams());
        let primary = signature::compute(TOKEN, url, &params);
        assert_eq!(
            answer_voice(&c, url, Some(&primary), &body).unwrap().key,
            Key::Primary
        );
        let neither = signature::compute("other-token", url, &params);
        assert_eq!(
            answer_voice(&c, url, Some(&neither), &body),
            Err(Refusal::BadSignature)
        );

        let stream = a.stream_url.clone().unwrap();
        let upgrade = "https://bridge.example.com/api/twilio/media-stream/x";
        let sig = signature::compute("promoted-token", &stream, &[]);
        assert_eq!(
            verify_stream_upgrade(&c, upgrade, Some(&sig), &a.call.call_sid),
            Ok(())
        );
        let sig = signature::compute("other-token", &stream, &[]);
        assert_eq!(
            verify_stream_upgrade(&c, upgrade, Some(&sig), &a.call.call_sid),
            Err(Refusal::BadSignature)
        );
        let status = "https://bridge.example.com/api/twilio/status";
        let (body, params) = form(&[("CallSid", "CA1"), ("CallStatus", "completed")]);
        let sig = signature::compute("promoted-token", status, &params);
        assert!(status_callback(&c, status, Some(&sig), &body, 7).is_ok());
        let action = "https://bridge.example.com/api/twilio/transfer-result";
        let (body, params) = form(&[("CallSid", "CA1"), ("DialCallStatus", "busy")]);
        let sig = signature::compute("promoted-token", action, &params);
        assert!(transfer_result(&c, action, Some(&sig), &body, 7).is_ok());

        // The secondary alone verifies too; neither set, nothing does.
        c.twilio_auth_token = Secret::default();
        let (body, _) = form(CALL);
        assert_eq!(
            answer_voice(&c, url, Some(&promoted), &body).unwrap().key,
            Key::Secondary
        );
        c.twilio_auth_token_secondary = Secret::default();
        assert_eq!(
            answer_voice(&c, url, Some(&promoted), &body),
            Err(Refusal::NoAuthToken)
        );
    }

    #[test]
    fn a_verified_but_malformed_voice_webhook_stays_a_bad_request() {
        let c = config();
        let url = "https://bridge.example.com/api/twilio/voice";
        let (body, params) = form(&[("CallSid", "CA1/../x"), ("From", "+81")]);
        let sig = signature::compute(TOKEN, url, &params);
        let why = answer_voice(&c, url, Some(&sig), &body).unwrap_err();
        assert!(!why.unverified());
        assert_eq!(unverified_voice(&c, url, &body, why), None);
    }

    #[test]
    fn a_get_webhook_carries_its_parameters_in_the_signed_url() {
        let c = config();
        let (query, params) = form(CALL);
        let url = format!("https://bridge.example.com/api/twilio/voice?{query}");
        // Twilio signs the whole URL and appends nothing.
        let sig = signature::compute(TOKEN, &url, &[]);
        let a = answer_voice(&c, &url, Some(&sig), Params::Query).unwrap();
        assert!(a.streams());
        assert_eq!(
            a.call.call_sid.as_str(),
            "CA0123456789abcdef0123456789abcdef"
        );
        assert_eq!(a.call.from, "+819012345678");
        // A signature with the parameters appended, as for a POST, is not Twilio's for a GET.
        let as_post = signature::compute(TOKEN, &url, &params);
        assert_eq!(
            answer_voice(&c, &url, Some(&as_post), Params::Query),
            Err(Refusal::BadSignature)
        );
        let tampered = url.replace("ringing", "completed");
        assert_eq!(
            answer_voice(&c, &tampered, Some(&sig), Params::Query),
            Err(Refusal::BadSignature)
        );
        let status =
            "https://bridge.example.com/api/twilio/status?CallSid=CA1&CallStatus=completed&CallDuration=7";
        let sig = signature::compute(TOKEN, status, &[]);
        let r = status_callback(&c, status, Some(&sig), Params::Query, 1_000).unwrap();
        assert_eq!(r.call_sid(), "CA1");
    }

    #[test]
    fn a_stream_url_is_checked_as_the_twiml_holds_it() {
        // Found by the webhook fuzz target: a host with characters XML cannot carry (they are
        // dropped from the TwiML, and Twilio signs what it read there).
        let c = config();
        let url = "https://\u{0}\u{1}\u{98}e.example/api/twilio/voice";
        let (body, params) = form(CALL);
        let sig = signature::compute(TOKEN, url, &params);
        let a = answer_voice(&c, url, Some(&sig), &body).unwrap();
        let stream = a.stream_url.clone().unwrap();
        assert_eq!(
            stream,
            "wss://\u{98}e.example/api/twilio/media-stream/CA0123456789abcdef0123456789abcdef"
        );
        assert!(a.twiml(&c, &c.agent).contains(&stream));
        let upgrade = signature::compute(TOKEN, &stream, &[]);
        assert_eq!(
            verify_stream_upgrade(&c, url, Some(&upgrade), &a.call.call_sid),
            Ok(())
        );
    }

    #[test]
    fn a_transfer_asks_back_on_the_origin_twilio_reaches_us_at() {
        let mut c = config();
        let stream = "https://bridge.example.com/api/twilio/media-stream/CA1";
        assert_eq!(
            transfer_result_url(&c, stream).unwrap(),
            "https://bridge.example.com/api/twilio/transfer-result"
        );
        assert_eq!(
            transfer_result_url(&c, "http://127.0.0.1:8787/api/twilio/media-stream/CA1").unwrap(),
            "http://127.0.0.1:8787/api/twilio/transfer-result"
        );
        c.public_base_url = Some("https://phone.example.jp".into());
        assert_eq!(
            transfer_result_url(&c, "http://internal:8787/x").unwrap(),
            "https://phone.example.jp/api/twilio/transfer-result"
        );
    }

    #[test]
    fn a_transfer_nobody_answered_gets_the_apology_and_is_kept_once() {
        let c = config();
        let url = "https://bridge.example.com/api/twilio/transfer-result";
        let result = |status: &str| {
            let mut p = CALL.to_vec();
            p.extend([("DialCallStatus", status), ("DialCallDuration", "")]);
            let (body, params) = form(&p);
            let sig = signature::compute(TOKEN, url, &params);
            transfer_result(&c, url, Some(&sig), &body, 5_000)
        };
        for status in ["busy", "no-answer", "failed", "canceled"] {
            let r = result(status).unwrap();
            assert!(!r.answered, "{status}");
            assert!(
                r.twiml.contains("<Say language=\"ja-JP\" voice=\"Polly.Mizuki\">申し訳ございません。ただいま担当者が")
                    && r.twiml.ends_with("</Say><Hangup/></Response>"),
                "{status}: {}",
                r.twiml
            );
            let Record::Event {
                seq, kind, detail, ..
            } = &r.record
            else {
                panic!("{:?}", r.record)
            };
            assert_eq!(
                (*seq, kind.as_str()),
                (TRANSFER_RESULT_SEQ, "transfer_result")
            );
            assert_eq!(detail["dial_call_status"], status);
            assert_eq!(detail["answered"], false);
            assert!(detail["dial_call_duration_s"].is_null());
        }
        for status in ["completed", "answered"] {
            let r = result(status).unwrap();
            assert!(r.answered);
            assert!(
                r.twiml.ends_with("<Response><Hangup/></Response>"),
                "{}",
                r.twiml
            );
        }
        assert_eq!(
            result("").unwrap_err(),
            Refusal::BadRequest("DialCallStatus missing".into())
        );
        let (body, _) = form(CALL);
        assert_eq!(
            transfer_result(&c, url, Some("forged"), &body, 0).unwrap_err(),
            Refusal::BadSignature
        );
    }

    #[test]
    fn without_an_auth_token_nothing_is_accepted() {
        let c = Bridge::from_lookup(|_| None);
        let (body, _) = form(CALL);
        let sig = signature::compute("", "https://x/api/twilio/voice", &[]);
        let r = answer_voice(&c, "https://x/api/twilio/voice", Some(&sig), &body);
        assert_eq!(r, Err(Refusal::NoAuthToken));
    }

    #[test]
    fn a_malformed_call_sid_is_a_bad_request() {
        let c = config();
        let url = "https://bridge.example.com/api/twilio/voice";
        let (body, params) = form(&[("CallSid", "CA1/../x"), ("From", "+81")]);
        let sig = signature::compute(TOKEN, url, &params);
        let r = answer_voice(&c, url, Some(&sig), &body);
        assert!(matches!(r, Err(Refusal::BadRequest(_))));
        assert_eq!(r.unwrap_err().status(), 400);
    }

    #[test]
    fn fallback_only_answers_the_japanese_fallback_with_dial() {
        let mut c = config();
        c.fallback_only = true;
        c.fallback_dial_number = Some("+81312345678".into());
        let url = "https://bridge.example.com/api/twilio/voice";
        let (body, params) = form(CALL);
        let sig = signature::compute(TOKEN, url, &params);
        let a = answer_voice(&c, url, Some(&sig), &body).unwrap();
        let twiml = a.twiml(&c, &Agent::default());
        assert!(!a.streams());
        assert!(!twiml.contains("<Stream"));
        assert!(twiml.contains(r#"<Say language="ja-JP" voice="Polly.Mizuki">申し訳ございません"#));
        // A person who does not answer: Twilio asks the transfer-result URL, as after a transfer.
        assert!(
            twiml.contains(
                r#"<Dial action="https://bridge.example.com/api/twilio/transfer-result" method="POST">+81312345678</Dial>"#
            ),
            "{twiml}"
        );
    }

    #[test]
    fn a_public_base_url_written_http_verifies_what_twilio_signed_either_way() {
        let c = {
            let mut c = Bridge::from_lookup(|k| {
                (k == "PUBLIC_BASE_URL")
                    .then(|| crate::config::Setting::Text("http://phone.example.jp".into()))
            });
            c.twilio_auth_token = Secret::new(TOKEN);
            c
        };
        let (body, params) = form(CALL);
        // The Worker reached as written in Twilio's console: http, signed so.
        let voice = "http://phone.example.jp/api/twilio/voice";
        let sig = signature::compute(TOKEN, voice, &params);
        let a = answer_voice(&c, voice, Some(&sig), &body).expect("signed over http");
        assert_eq!(
            a.stream_url.as_deref(),
            Some(
                "wss://phone.example.jp/api/twilio/media-stream/CA0123456789abcdef0123456789abcdef"
            )
        );
        // The URLs the Worker gives Twilio are https, and signed so.
        let https = "https://phone.example.jp/api/twilio/voice";
        let sig = signature::compute(TOKEN, https, &params);
        assert!(answer_voice(&c, voice, Some(&sig), &body).is_ok());
        // Anything else is still refused.
        let sig = signature::compute("another-token", voice, &params);
        assert_eq!(
            answer_voice(&c, voice, Some(&sig), &body).unwrap_err(),
            Refusal::BadSignature
        );
    }

    #[test]
    fn calls_a_broken_realtime_url_sends_to_the_fallback_are_recorded_as_failed() {
        let registration = |c: &Bridge| {
            let url = "https://bridge.example.com/api/twilio/voice";
            let (body, params) = form(CALL);
            let sig = signature::compute(TOKEN, url, &params);
            let a = answer_voice(c, url, Some(&sig), &body).unwrap();
            assert!(!a.streams(), "the fallback only");
            Registration {
                agent: Agent::default(),
                call: a.call,
                at_ms: 1,
            }
        };
        let from = |pairs: &[(&str, &str)]| {
            let mut pairs = pairs.to_vec();
            pairs.push(("TWILIO_AUTH_TOKEN", TOKEN));
            Bridge::from_lookup(|k| {
                pairs
                    .iter()
                    .find(|(name, _)| *name == k)
                    .map(|(_, v)| crate::config::Setting::Text(v.to_string()))
            })
        };
        // No scheme: not a URL. The calls it costs are failures, with the reason.
        let broken = from(&[("OPENAI_REALTIME_URL", "api.openai.com/v1/realtime")]);
        let (reason, detail) = fallback_only_reason(&broken);
        assert_eq!(reason, OPENAI_URL_INVALID);
        let detail = detail.expect("why");
        assert!(detail.contains("OPENAI_REALTIME_URL"), "{detail}");
        let Record::CallUnserved {
            end_reason, failed, ..
        } = registration(&broken).unserved(reason, Some(detail))
        else {
            panic!("an unserved record")
        };
        assert_eq!((end_reason.as_str(), failed), (OPENAI_URL_INVALID, true));
        // The maintenance switch is a choice, whatever else is wrong.
        for c in [
            from(&[("FALLBACK_ONLY", "true")]),
            from(&[
                ("FALLBACK_ONLY", "true"),
                ("OPENAI_REALTIME_URL", "api.openai.com/v1/realtime"),
            ]),
        ] {
            let (reason, detail) = fallback_only_reason(&c);
            assert_eq!((reason, detail.as_deref()), (FALLBACK_ONLY, None));
            let Record::CallUnserved { failed, .. } = registration(&c).unserved(reason, detail)
            else {
                panic!("an unserved record")
            };
            assert!(!failed);
        }
    }

    #[test]
    fn the_fallback_after_the_stream_transfers_to_the_agent_s_number_unless_one_is_set() {
        let mut c = config();
        let url = "https://bridge.example.com/api/twilio/voice";
        let (body, params) = form(CALL);
        let sig = signature::compute(TOKEN, url, &params);
        let a = answer_voice(&c, url, Some(&sig), &body).unwrap();
        let agent = Agent {
            transfer_number: Some("+81355550000".into()),
            ..Agent::default()
        };
        let twiml = a.twiml(&c, &agent);
        assert!(
            twiml.ends_with("</Connect><Say language=\"ja-JP\" voice=\"Polly.Mizuki\">申し訳ございません。ただいま電話に出ることができません。後ほどおかけ直しください。</Say><Dial action=\"https://bridge.example.com/api/twilio/transfer-result\" method=\"POST\">+81355550000</Dial></Response>"),
            "{twiml}"
        );
        assert!(!a.twiml(&c, &Agent::default()).contains("<Dial"));
        c.fallback_dial_number = Some("+81311112222".into());
        assert!(a
            .twiml(&c, &agent)
            .contains("method=\"POST\">+81311112222</Dial>"));
        assert_eq!(
            fallback_twiml(&c, &agent, None),
            "<Response><Say language=\"ja-JP\" voice=\"Polly.Mizuki\">申し訳ございません。ただいま電話に出ることができません。後ほどおかけ直しください。</Say><Dial>+81311112222</Dial></Response>"
        );
    }

    #[test]
    fn caller_values_are_escaped_in_the_twiml() {
        let c = config();
        let url = "https://bridge.example.com/api/twilio/voice";
        let (body, params) = form(&[("CallSid", "CA1"), ("From", "<a&b\">"), ("To", "+81")]);
        let sig = signature::compute(TOKEN, url, &params);
        let a = answer_voice(&c, url, Some(&sig), &body).unwrap();
        let twiml = a.twiml(&c, &Agent::default());
        assert!(
            twiml.contains(r#"value="&lt;a&amp;b&quot;&gt;""#),
            "{}",
            twiml
        );
    }

    #[test]
    fn stream_upgrade_is_verified_against_the_twiml_url() {
        let c = config();
        let sid = CallSid::parse("CA1").unwrap();
        let tw = "wss://bridge.example.com/api/twilio/media-stream/CA1";
        let sig = signature::compute(TOKEN, tw, &[]);
        // Workers see the upgrade as https://.
        let req = "https://bridge.example.com/api/twilio/media-stream/CA1";
        assert_eq!(verify_stream_upgrade(&c, req, Some(&sig), &sid), Ok(()));
        let slash = signature::compute(TOKEN, &format!("{tw}/"), &[]);
        assert_eq!(verify_stream_upgrade(&c, req, Some(&slash), &sid), Ok(()));
        assert_eq!(
            verify_stream_upgrade(&c, req, None, &sid),
            Err(Refusal::Unsigned)
        );
        let other = signature::compute(
            TOKEN,
            "wss://bridge.example.com/api/twilio/media-stream/CA2",
            &[],
        );
        assert_eq!(
            verify_stream_upgrade(&c, req, Some(&other), &sid),
            Err(Refusal::BadSignature)
        );
    }

    #[test]
    fn a_status_callback_is_answered_by_whether_its_record_was_kept_in_time() {
        assert_eq!(StatusAnswer::new(Some(true)).status(), 204);
        assert_eq!(StatusAnswer::new(Some(true)).body(), "");
        assert_eq!(StatusAnswer::new(Some(false)).status(), 500);
        // Not decided yet: accepted all the same, a 2xx, so Twilio logs no error for it.
        let keeping = StatusAnswer::new(None);
        assert_eq!(keeping, StatusAnswer::Keeping);
        assert_eq!(keeping.status(), 202);
        assert!(!keeping.body().is_empty());
    }

    #[test]
    fn status_callbacks_are_verified_and_parsed() {
        let c = config();
        let url = "https://bridge.example.com/api/twilio/status";
        let (body, params) = form(&[
            ("CallSid", "CA1"),
            ("CallStatus", "completed"),
            ("CallDuration", "42"),
            ("SequenceNumber", "3"),
            ("AccountSid", "AC1"),
            ("From", "+819012345678"),
            ("To", "+81312345678"),
            ("Direction", "inbound"),
        ]);
        let sig = signature::compute(TOKEN, url, &params);
        assert_eq!(
            status_callback(&c, url, Some(&sig), &body, 7),
            Ok(Record::TwilioStatus {
                call_sid: "CA1".into(),
                status: "completed".into(),
                call_duration_s: Some(42),
                at_ms: 7,
                parties: crate::store::Parties {
                    account_sid: "AC1".into(),
                    from: "+819012345678".into(),
                    to: "+81312345678".into(),
                    direction: "inbound".into(),
                },
            })
        );
        assert_eq!(
            status_callback(&c, url, None, &body, 7),
            Err(Refusal::Unsigned)
        );
        let (bad, params) = form(&[("CallSid", "CA1"), ("CallStatus", "exploded")]);
        let sig = signature::compute(TOKEN, url, &params);
        assert!(matches!(
            status_callback(&c, url, Some(&sig), &bad, 7),
            Err(Refusal::BadRequest(_))
        ));
    }

    #[test]
    fn an_interrupted_stream_ends_as_failed_with_its_duration() {
        let reg = registration();
        let Record::CallEnded {
            call_sid,
            duration_ms,
            end_reason,
            failed,
            ..
        } = reg.interrupted(2_000, 65_000)
        else {
            panic!()
        };
        assert_eq!(call_sid, "CA9");
        assert_eq!(duration_ms, Some(63_000));
        assert_eq!(end_reason, INTERRUPTED);
        assert!(failed);
        assert!(matches!(
            reg.record(),
            Record::CallRinging { at_ms: 1_000, .. }
        ));
    }

    fn registration() -> Registration {
        Registration {
            call: VoiceCall {
                call_sid: CallSid::new("CA9"),
                account_sid: "AC1".into(),
                from: "+81".into(),
                to: "+82".into(),
                direction: "inbound".into(),
                call_status: "ringing".into(),
            },
            agent: Agent::default(),
            at_ms: 1_000,
        }
    }

    #[test]
    fn only_a_started_unended_stream_without_a_pump_is_finalized_and_only_once() {
        let mut state = CallState::new(registration());
        assert_eq!(
            state.finalize_orphaned(false, 5_000),
            None,
            "never streamed"
        );
        state.streamed_at_ms = Some(2_000);
        assert_eq!(state.finalize_orphaned(true, 5_000), None, "its pump runs");
        assert_eq!(state.end_reason, None);
        let end = state.finalize_orphaned(false, 65_000);
        assert_eq!(end, Some(registration().interrupted(2_000, 65_000)));
        assert_eq!(state.end_reason.as_deref(), Some(INTERRUPTED));
        assert_eq!(
            state.finalize_orphaned(false, 70_000),
            None,
            "already ended"
        );
        let mut ended = CallState {
            end_reason: Some("twilio_stop".into()),
            ..CallState::new(registration())
        };
        ended.streamed_at_ms = Some(2_000);
        assert_eq!(ended.finalize_orphaned(false, 5_000), None);
        assert_eq!(ended.end_reason.as_deref(), Some("twilio_stop"));
    }

    #[test]
    fn one_stream_per_call_and_none_after_it_ended_or_was_cut() {
        let sid = CallSid::new("CA9");
        let mut state = CallState::new(registration());
        assert_eq!(
            state.admit_stream(&CallSid::new("CA8"), false),
            Err(StreamRefusal::NoWebhook)
        );
        assert_eq!(state.admit_stream(&sid, false), Ok(()));
        state.streamed_at_ms = Some(2_000);
        assert_eq!(
            state.admit_stream(&sid, true),
            Err(StreamRefusal::AlreadyStreaming)
        );
        // Started before this instance of the object: cut by its restart.
        assert_eq!(
            state.admit_stream(&sid, false),
            Err(StreamRefusal::Interrupted)
        );
        state.finalize_orphaned(false, 9_000).unwrap();
        assert_eq!(state.admit_stream(&sid, false), Err(StreamRefusal::Ended));
        let statuses: Vec<u16> = [
            StreamRefusal::NoWebhook,
            StreamRefusal::AlreadyStreaming,
            StreamRefusal::Ended,
            StreamRefusal::Interrupted,
        ]
        .into_iter()
        .map(StreamRefusal::status)
        .collect();
        assert_eq!(statuses, [404, 409, 410, 410]);
    }

    #[test]
    fn call_state_reads_what_earlier_versions_stored() {
        let mut stored = serde_json::to_value(CallState::new(registration())).unwrap();
        stored.as_object_mut().unwrap().remove("streamed_at_ms");
        let state: CallState = serde_json::from_value(stored).unwrap();
        assert_eq!(state, CallState::new(registration()));
    }

    /// A restart is presumed when the object finds no end kept; if the call's own end did
    /// reach D1 (a status callback came while that end was still being kept), it stays.
    #[test]
    fn a_presumed_restart_never_overwrites_the_end_the_call_recorded_itself() {
        use crate::agents::testdb;
        let row = |conn: &rusqlite::Connection| {
            testdb::query(
                conn,
                &crate::store::Statement::new(
                    "SELECT status, end_reason, total_tokens FROM calls",
                    vec![],
                ),
            )
        };
        let own_end = Record::CallEnded {
            call_sid: "CA9".into(),
            at_ms: 61_000,
            duration_ms: Some(59_000),
            end_reason: "twilio_stop".into(),
            end_detail: None,
            failed: false,
            input_tokens: 10,
            output_tokens: 20,
            total_tokens: 30,
            first_audio_ms: Some(640),
            barge_ins: 2,
            transcription: Default::default(),
            presumed: false,
        };
        for own_end_kept in [true, false] {
            let conn = testdb::open();
            let write = |r: &Record| testdb::batch(&conn, &r.statements(1_000)).unwrap();
            let mut state = CallState::new(registration());
            write(&state.registration.record());
            state.streamed_at_ms = Some(2_000);
            if own_end_kept {
                write(&own_end);
            }
            write(&state.finalize_orphaned(false, 70_000).unwrap());
            let expected = if own_end_kept {
                serde_json::json!({"status": "completed", "end_reason": "twilio_stop", "total_tokens": 30})
            } else {
                serde_json::json!({"status": "failed", "end_reason": INTERRUPTED, "total_tokens": 0})
            };
            assert_eq!(row(&conn), vec![expected], "own end kept: {own_end_kept}");
        }
    }

    /// A call handed to its agent whose stream never connected (the upgrade refused, say):
    /// Twilio's final status puts why on record, once, and a late upgrade is refused.
    #[test]
    fn a_call_whose_stream_never_connected_says_so_when_twilio_reports_its_end() {
        use crate::agents::testdb;
        let conn = testdb::open();
        let write = |r: &Record| testdb::batch(&conn, &r.statements(1_000)).unwrap();
        let mut state = CallState::new(registration());
        write(&state.registration.record());
        assert_eq!(state.never_streamed("ringing", None), None);
        assert_eq!(state.never_streamed("in-progress", None), None);
        let unserved = state.never_streamed("completed", Some(25)).unwrap();
        write(&unserved);
        write(&Record::TwilioStatus {
            call_sid: "CA9".into(),
            status: "completed".into(),
            call_duration_s: Some(25),
            at_ms: 26_000,
            parties: Default::default(),
        });
        assert_eq!(state.never_streamed("completed", Some(25)), None, "once");
        assert_eq!(
            state.admit_stream(&state.registration.call.call_sid.clone(), false),
            Err(StreamRefusal::Ended)
        );
        let rows = testdb::query(
            &conn,
            &crate::store::Statement::new(
                "SELECT status, end_reason, end_detail, twilio_duration_s FROM calls",
                vec![],
            ),
        );
        assert_eq!(
            rows,
            vec![serde_json::json!({
                "status": "failed", "end_reason": NEVER_STREAMED,
                "end_detail": "Twilio reported the call completed after 25 s and its Media Stream never connected",
                "twilio_duration_s": 25,
            })]
        );
        // A call that streamed is not this.
        let mut streamed = CallState::new(registration());
        streamed.streamed_at_ms = Some(2_000);
        assert_eq!(streamed.never_streamed("completed", Some(25)), None);
    }

    /// Twilio reports the end of a call whose stream never connected once, and the object
    /// cannot rebuild that end from anything else: it stays with the call's stored state, owed,
    /// until the outbox has kept it (a failure or a restart before then hands it over again).
    #[test]
    fn the_end_of_a_call_that_never_streamed_stays_owed_with_the_call() {
        let mut state = CallState::new(registration());
        assert_eq!(state.never_streamed("in-progress", None), None);
        assert_eq!(state.end_owed, None, "nothing decided yet");
        let end = state.never_streamed("no-answer", Some(0)).unwrap();
        // What the object stores, read back by its next instance.
        let stored: CallState =
            serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
        assert_eq!(stored.end_owed, Some(end));
        assert_eq!(stored.end_reason.as_deref(), Some(NEVER_STREAMED));
        // A state stored before anything could be owed owes nothing.
        let earlier = serde_json::json!({
            "registration": registration(), "end_reason": null, "streamed_at_ms": null,
        });
        let earlier: CallState = serde_json::from_value(earlier).unwrap();
        assert_eq!(earlier, CallState::new(registration()));
        // A call whose end the object finds from its state alone owes nothing either.
        let mut cut = CallState::new(registration());
        cut.streamed_at_ms = Some(2_000);
        assert!(cut.finalize_orphaned(false, 9_000).is_some());
        assert_eq!(cut.end_owed, None);
    }

    /// Twilio's final status reaches a restarted object before its watch does: finalizing
    /// first keeps the call a failure, ended when Twilio said, with Twilio's duration.
    #[test]
    fn a_restarted_call_finalized_before_twilios_final_status_reads_failed() {
        use crate::agents::testdb;
        let conn = testdb::open();
        let write = |r: &Record| testdb::batch(&conn, &r.statements(1_000)).unwrap();
        let mut state = CallState::new(registration());
        write(&state.registration.record());
        state.streamed_at_ms = Some(2_000);
        write(&state.finalize_orphaned(false, 9_000).unwrap());
        write(&Record::TwilioStatus {
            call_sid: "CA9".into(),
            status: "completed".into(),
            call_duration_s: Some(8),
            at_ms: 9_000,
            parties: Default::default(),
        });
        let rows = testdb::query(
            &conn,
            &crate::store::Statement::new(
                "SELECT status, end_reason, ended_at, duration_ms, twilio_duration_s FROM calls",
                vec![],
            ),
        );
        assert_eq!(
            rows,
            vec![serde_json::json!({
                "status": "failed", "end_reason": INTERRUPTED,
                "ended_at": "1970-01-01T00:00:09.000Z", "duration_ms": 7_000,
                "twilio_duration_s": 8,
            })]
        );
    }

    #[test]
    fn stream_paths_name_a_call_sid() {
        assert_eq!(
            stream_call_sid("/api/twilio/media-stream/CA12"),
            CallSid::parse("CA12")
        );
        assert_eq!(stream_call_sid("/api/twilio/media-stream/"), None);
        assert_eq!(stream_call_sid("/api/twilio/media-stream/CA1/x"), None);
        assert_eq!(stream_call_sid("/api/other/CA1"), None);
    }
}
