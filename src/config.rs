//! Typed configuration, read once per request or call from the Worker's variables and
//! validated here. Nothing deeper in the crate looks at environment variables.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;

/// The GA Realtime voices (protocol.md A2).
pub const VOICES: &[&str] = &[
    "alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar",
];

pub const DEFAULT_TWILIO_API_BASE_URL: &str = "https://api.twilio.com";
pub const DEFAULT_REALTIME_URL: &str = "wss://api.openai.com/v1/realtime";
pub const DEFAULT_MODEL: &str = "gpt-realtime";
pub const DEFAULT_VOICE: &str = "marin";
pub const DEFAULT_LANGUAGE: &str = "ja";
pub const DEFAULT_TRANSCRIPTION_MODEL: &str = "gpt-4o-transcribe";
/// The Realtime API's input noise reduction: `near_field` for a handset held to the ear
/// (what a phone caller uses), `far_field` for a speakerphone or a room; `off` sends none.
pub const NOISE_REDUCTIONS: &[&str] = &["near_field", "far_field", "off"];
pub const DEFAULT_NOISE_REDUCTION: &str = "near_field";
/// Said to the model of the agent used when D1 cannot be read (and when `AGENT_INSTRUCTIONS`
/// is empty). A webhook tool can take seconds: the caller is told to wait rather than hear
/// silence.
pub const DEFAULT_INSTRUCTIONS: &str = "あなたは会社の電話受付担当です。丁寧な敬語で、電話に適した短く分かりやすい文で話してください。相手の話を最後まで聞き、分からないことは推測せず確認してください。情報の確認や予約の操作など、時間のかかるツールを呼び出すときは、呼び出す前に「少々お待ちください」と一言お伝えしてください。";
pub const DEFAULT_GREETING: &str =
    "お電話ありがとうございます、と丁寧にあいさつし、ご用件を伺ってください。";
pub const DEFAULT_FALLBACK_MESSAGE: &str =
    "申し訳ございません。ただいま電話に出ることができません。後ほどおかけ直しください。";
/// Said when a transfer to a person is not answered (busy, no answer, failed).
pub const DEFAULT_TRANSFER_FAILED_MESSAGE: &str =
    "申し訳ございません。ただいま担当者が電話に出ることができません。恐れ入りますが、しばらくたってからおかけ直しください。";
pub const DEFAULT_FALLBACK_LANGUAGE: &str = "ja-JP";
/// A Japanese Amazon Polly voice: Twilio's default voice cannot read Japanese.
pub const DEFAULT_FALLBACK_VOICE: &str = "Polly.Mizuki";

/// A secret value: never printed, not even by `{:?}`.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Turn detection settings (protocol.md A2, turn detection objects). `kind` is
/// `server_vad` (uses the three numbers) or `semantic_vad`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TurnDetection {
    #[serde(rename = "type")]
    pub kind: String,
    pub threshold: f64,
    pub prefix_padding_ms: u32,
    pub silence_duration_ms: u32,
}

impl Default for TurnDetection {
    fn default() -> Self {
        Self {
            kind: "server_vad".into(),
            threshold: 0.5,
            prefix_padding_ms: 300,
            silence_duration_ms: 500,
        }
    }
}

pub const TURN_DETECTION_TYPES: &[&str] = &["server_vad", "semantic_vad"];
pub const DEFAULT_MAX_CALL_SECONDS: u32 = 1800;

/// Who answers the phone: the voice agent's behaviour for one call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Agent {
    /// The `agents.id` it was loaded from (`env` when it comes from the Worker's variables).
    pub id: String,
    pub name: String,
    pub instructions: String,
    /// What the first response should say or do; sent as that response's instructions.
    pub greeting: String,
    pub voice: String,
    pub model: String,
    /// ISO-639-1 language of the caller's speech, for transcription.
    pub language: String,
    pub transcription_model: String,
    pub turn_detection: TurnDetection,
    /// Realtime function tool definitions (`{type:"function", name, description, parameters}`).
    pub tools: Vec<Value>,
    /// E.164 number a caller is transferred to when they ask for a person.
    pub transfer_number: Option<String>,
    pub max_call_seconds: u32,
    /// Key for the signature on webhook tool requests (write-only in the admin API).
    #[serde(default)]
    pub tool_secret: Option<Secret>,
    /// Whether calls are recorded (a stereo WAV in R2). Absent from older stored agents: on.
    #[serde(default = "recording_on")]
    pub record_calls: bool,
    /// One of [`NOISE_REDUCTIONS`]. Absent from older stored agents: the default.
    #[serde(default = "default_noise_reduction")]
    pub noise_reduction: String,
}

fn default_noise_reduction() -> String {
    DEFAULT_NOISE_REDUCTION.into()
}

fn recording_on() -> bool {
    true
}

impl Default for Agent {
    fn default() -> Self {
        Self {
            id: "env".into(),
            name: "Default (from configuration)".into(),
            instructions: DEFAULT_INSTRUCTIONS.into(),
            greeting: DEFAULT_GREETING.into(),
            voice: DEFAULT_VOICE.into(),
            model: DEFAULT_MODEL.into(),
            language: DEFAULT_LANGUAGE.into(),
            transcription_model: DEFAULT_TRANSCRIPTION_MODEL.into(),
            turn_detection: TurnDetection::default(),
            tools: Vec::new(),
            transfer_number: None,
            max_call_seconds: DEFAULT_MAX_CALL_SECONDS,
            tool_secret: None,
            record_calls: true,
            noise_reduction: DEFAULT_NOISE_REDUCTION.into(),
        }
    }
}

/// The ISO 639-1 language codes (the two-letter ones; the Realtime API refuses others as the
/// transcription language).
pub const ISO_639_1: &[&str] = &[
    "aa", "ab", "ae", "af", "ak", "am", "an", "ar", "as", "av", "ay", "az", "ba", "be", "bg", "bi",
    "bm", "bn", "bo", "br", "bs", "ca", "ce", "ch", "co", "cr", "cs", "cu", "cv", "cy", "da", "de",
    "dv", "dz", "ee", "el", "en", "eo", "es", "et", "eu", "fa", "ff", "fi", "fj", "fo", "fr", "fy",
    "ga", "gd", "gl", "gn", "gu", "gv", "ha", "he", "hi", "ho", "hr", "ht", "hu", "hy", "hz", "ia",
    "id", "ie", "ig", "ii", "ik", "io", "is", "it", "iu", "ja", "jv", "ka", "kg", "ki", "kj", "kk",
    "kl", "km", "kn", "ko", "kr", "ks", "ku", "kv", "kw", "ky", "la", "lb", "lg", "li", "ln", "lo",
    "lt", "lu", "lv", "mg", "mh", "mi", "mk", "ml", "mn", "mr", "ms", "mt", "my", "na", "nb", "nd",
    "ne", "ng", "nl", "nn", "no", "nr", "nv", "ny", "oc", "oj", "om", "or", "os", "pa", "pi", "pl",
    "ps", "pt", "qu", "rm", "rn", "ro", "ru", "rw", "sa", "sc", "sd", "se", "sg", "si", "sk", "sl",
    "sm", "sn", "so", "sq", "sr", "ss", "st", "su", "sv", "sw", "ta", "te", "tg", "th", "ti", "tk",
    "tl", "tn", "to", "tr", "ts", "tt", "tw", "ty", "ug", "uk", "ur", "uz", "ve", "vi", "vo", "wa",
    "wo", "xh", "yi", "yo", "za", "zh", "zu",
];

/// The ISO 639-1 code someone writing `s` most likely meant: a code in other case or with a
/// region (`JA`, `ja-JP`), a country code used for its language (`jp`, `cn`), or a withdrawn
/// code (`iw`).
pub fn suggest_language(s: &str) -> Option<&'static str> {
    let lower = s.trim().to_ascii_lowercase();
    let base = lower.split(['-', '_']).next().unwrap_or("");
    if let Some(code) = ISO_639_1.iter().find(|c| **c == base) {
        return Some(code);
    }
    const SLIPS: &[(&str, &str)] = &[
        ("jp", "ja"),
        ("jpn", "ja"),
        ("cn", "zh"),
        ("zho", "zh"),
        ("kor", "ko"),
        ("eng", "en"),
        ("cz", "cs"),
        ("dk", "da"),
        ("gr", "el"),
        ("ua", "uk"),
        ("vn", "vi"),
        ("iw", "he"),
        ("in", "id"),
        ("ji", "yi"),
        ("mo", "ro"),
    ];
    SLIPS
        .iter()
        .find(|(slip, _)| *slip == base)
        .map(|(_, c)| *c)
}

/// The input transcription models of the GA Realtime API (protocol.md A2,
/// `audio.input.transcription.model`, the 2026 SDK's two newest included). The server
/// refuses a whole `session.update` naming any other, so it is checked against this list.
pub const TRANSCRIPTION_MODELS: &[&str] = &[
    "whisper-1",
    "gpt-4o-transcribe",
    "gpt-4o-mini-transcribe",
    "gpt-4o-mini-transcribe-2025-12-15",
    "gpt-4o-transcribe-diarize",
    "gpt-realtime-whisper",
    "gpt-transcribe",
    "gpt-live-transcribe",
];

/// Why `model` cannot be the Realtime model of a session (the `?model=` of the upgrade
/// and `session.model`), if it cannot.
///
/// Not a list: Realtime models keep coming (protocol.md names `gpt-realtime`,
/// `gpt-realtime-2025-08-28`, `gpt-realtime-1.5`, `gpt-realtime-2`, `gpt-realtime-2.1`,
/// `gpt-4o-mini-realtime`; `gpt-realtime-mini` and the `gpt-4o-realtime-preview` line are
/// others), and a list would refuse the next one. What they all share is `realtime` in the
/// name, while what else gets written there does not: a chat model (`gpt-4o`), a typo
/// (`gpt-realtme`), a name with a stray space. The one Realtime-looking name that is not a
/// session model, `gpt-realtime-whisper`, is a transcription model and is refused as such.
pub fn realtime_model_problem(model: &str) -> Option<String> {
    if model.trim().is_empty() {
        return Some("must not be empty".into());
    }
    if model.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Some(format!("{model:?} has spaces or control characters in it"));
    }
    if TRANSCRIPTION_MODELS.contains(&model) {
        return Some(format!(
            "{model:?} is a transcription model (give it as transcription_model), not a \
             Realtime model such as \"gpt-realtime\""
        ));
    }
    if !model.contains("realtime") {
        return Some(format!(
            "{model:?} is not a Realtime model: their names contain \"realtime\" \
             (gpt-realtime, gpt-realtime-mini, gpt-4o-realtime-preview, …)"
        ));
    }
    None
}

/// The model name someone writing `s` most likely meant, when `s` is not valid but the
/// same name without surrounding spaces and in lower case (`"gpt-4o-transcribe "`,
/// `"GPT-Realtime"`) is.
pub fn suggest_model(s: &str, valid: impl Fn(&str) -> bool) -> Option<String> {
    if valid(s) {
        return None;
    }
    let meant = s.trim().to_lowercase();
    valid(&meant).then_some(meant)
}

fn is_transcription_model(s: &str) -> bool {
    TRANSCRIPTION_MODELS.contains(&s)
}

fn is_realtime_model(s: &str) -> bool {
    realtime_model_problem(s).is_none()
}

/// The Realtime model someone writing `s` most likely meant ([`suggest_model`]).
pub fn suggest_realtime_model(s: &str) -> Option<String> {
    suggest_model(s, is_realtime_model)
}

/// The transcription model someone writing `s` most likely meant ([`suggest_model`]).
pub fn suggest_transcription_model(s: &str) -> Option<String> {
    suggest_model(s, is_transcription_model)
}

/// `; did you mean "x"?` for a suggestion, nothing without one.
fn did_you_mean(suggestion: Option<impl fmt::Debug>) -> String {
    suggestion
        .map(|s| format!("; did you mean {s:?}?"))
        .unwrap_or_default()
}

/// True for an E.164 number: `+`, a non-zero digit, at most 15 digits in all.
pub fn is_e164(s: &str) -> bool {
    let Some(digits) = s.strip_prefix('+') else {
        return false;
    };
    (2..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
}

/// Why `s` is no number to dial or to answer calls on, if it is not: not E.164, or a
/// Japanese number written with its domestic 0 after +81 (`+810312345678` for 03-1234-5678),
/// which Twilio cannot dial and which no call's `To` ever matches.
pub fn number_problem(s: &str) -> Option<String> {
    if !is_e164(s) {
        return Some(format!("{s:?} is not an E.164 number such as +81312345678"));
    }
    s.strip_prefix("+810").map(|rest| {
        format!("{s:?} keeps the domestic 0 after +81: write +81{rest} (E.164 leaves it out)")
    })
}

#[derive(Clone, Debug, thiserror::Error, PartialEq)]
#[error("invalid configuration `{field}`: {reason}")]
pub struct ConfigError {
    pub field: &'static str,
    pub reason: String,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field,
        reason: reason.into(),
    }
}

impl Agent {
    /// Checks every field against what the Realtime API accepts, so a bad value is an
    /// error here rather than a `session.update` the server rejects mid-call.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.name.trim().is_empty() {
            return Err(invalid("name", "must not be empty"));
        }
        if self.instructions.trim().is_empty() {
            return Err(invalid("instructions", "must not be empty"));
        }
        if !NOISE_REDUCTIONS.contains(&self.noise_reduction.as_str()) {
            return Err(invalid(
                "noise_reduction",
                format!(
                    "{:?} is not one of {}",
                    self.noise_reduction,
                    NOISE_REDUCTIONS.join(", ")
                ),
            ));
        }
        if !VOICES.contains(&self.voice.as_str()) {
            return Err(invalid(
                "voice",
                format!(
                    "unknown voice {:?}; one of {}",
                    self.voice,
                    VOICES.join(", ")
                ),
            ));
        }
        if let Some(problem) = realtime_model_problem(&self.model) {
            let hint = did_you_mean(suggest_realtime_model(&self.model));
            return Err(invalid("model", format!("{problem}{hint}")));
        }
        let lang = &self.language;
        if !ISO_639_1.contains(&lang.as_str()) {
            let hint = did_you_mean(suggest_language(lang));
            return Err(invalid(
                "language",
                format!(
                    "{lang:?} is not an ISO 639-1 language code (two lowercase letters such as \
                     \"ja\" or \"en\"){hint}"
                ),
            ));
        }
        let transcription = &self.transcription_model;
        if !is_transcription_model(transcription) {
            let hint = did_you_mean(suggest_transcription_model(transcription));
            return Err(invalid(
                "transcription_model",
                format!(
                    "{transcription:?} is not a transcription model of the Realtime API; one \
                     of {}{hint}",
                    TRANSCRIPTION_MODELS.join(", ")
                ),
            ));
        }
        let td = &self.turn_detection;
        if !TURN_DETECTION_TYPES.contains(&td.kind.as_str()) {
            return Err(invalid(
                "turn_detection.type",
                format!(
                    "{:?} is not one of {}",
                    td.kind,
                    TURN_DETECTION_TYPES.join(", ")
                ),
            ));
        }
        if !(0.0..=1.0).contains(&td.threshold) {
            return Err(invalid(
                "turn_detection.threshold",
                "must be between 0.0 and 1.0",
            ));
        }
        if td.silence_duration_ms > 10_000 {
            return Err(invalid(
                "turn_detection.silence_duration_ms",
                "at most 10000",
            ));
        }
        if td.prefix_padding_ms > 10_000 {
            return Err(invalid("turn_detection.prefix_padding_ms", "at most 10000"));
        }
        let mut names = std::collections::HashSet::new();
        for (i, tool) in self.tools.iter().enumerate() {
            if let Err(problem) = crate::tools::parse(tool) {
                return Err(invalid("tools", format!("tool {i}: {problem}")));
            }
            if !names.insert(crate::tools::name_of(tool).unwrap_or_default()) {
                return Err(invalid("tools", format!("tool {i}: duplicate name")));
            }
        }
        if let Some(n) = &self.transfer_number {
            if !is_e164(n) {
                return Err(invalid(
                    "transfer_number",
                    format!("{n:?} is not an E.164 number such as +81312345678"),
                ));
            }
        }
        if !(30..=4 * 3600).contains(&self.max_call_seconds) {
            return Err(invalid("max_call_seconds", "must be between 30 and 14400"));
        }
        Ok(())
    }
}

/// A base URL as the settings take it: one of `schemes`, a host, an optional path; no query
/// or fragment (`?model=` is added to the Realtime URL). The URL without a trailing `/`, or
/// why it is not one.
fn base_url(v: &str, schemes: &[&str]) -> Result<String, String> {
    let Some(rest) = schemes.iter().find_map(|s| v.strip_prefix(s)) else {
        return Err(format!("{v:?} does not start with {}", schemes.join(", ")));
    };
    let host = rest.split('/').next().unwrap_or("");
    if host.is_empty()
        || v.bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(format!("{v:?} has no host, or spaces in it"));
    }
    if v.contains(['?', '#']) {
        return Err(format!(
            "{v:?} has a query or fragment; give the base URL alone"
        ));
    }
    Ok(v.trim_end_matches('/').to_owned())
}

/// Why `url` may not carry a credential, if it may not: plain `http://` or `ws://` to a host
/// other than this machine would send it (the Twilio auth token, the OpenAI key) and the
/// callers' audio unencrypted.
fn cleartext_to_remote(url: &str) -> Option<String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("ws://"))?;
    if is_loopback(rest.split('/').next().unwrap_or_default()) {
        return None;
    }
    Some(format!(
        "{url:?} is unencrypted: use https:// or wss:// (plain http:// and ws:// only to this \
         machine, for local tests)"
    ))
}

/// Whether `authority` (`[user@]host[:port]`) names this machine: `localhost`, `127.0.0.0/8`
/// or `[::1]`. Twilio never reaches such a host, so it only serves local development
/// (`wrangler dev`, the call simulator), which has no TLS: plain `http` and `ws` are all there is.
pub fn is_loopback(authority: &str) -> bool {
    let host_port = authority.rsplit('@').next().unwrap_or(authority);
    let host = match host_port.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host_port.split(':').next().unwrap_or_default(),
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Settings the shell reads itself, outside [`Bridge`]: the admin API's bearer token (a
/// secret) and the test hooks (see [`FAULT_HOOKS`]).
pub const ADMIN_TOKEN: &str = "ADMIN_TOKEN";
/// Test hook: the first N D1 writes of each call fail.
pub const FAULT_INJECT_D1_FAILURES: &str = "FAULT_INJECT_D1_FAILURES";
/// Test hook: the voice webhook's D1 agent lookup takes N ms longer (a slow D1).
pub const FAULT_INJECT_D1_LOOKUP_DELAY_MS: &str = "FAULT_INJECT_D1_LOOKUP_DELAY_MS";
/// Test hook: each D1 write of a call waits N ms before it is sent (a write on its way
/// when the object restarts).
pub const FAULT_INJECT_D1_STALL_MS: &str = "FAULT_INJECT_D1_STALL_MS";
/// Test hook: the first N D1 writes of a call get no answer (D1 hung): each is given up
/// after the outbox's limit and its records are tried again.
pub const FAULT_INJECT_D1_HANGS: &str = "FAULT_INJECT_D1_HANGS";
/// Test hook: the first N writes of a call object's records to its own storage fail (the
/// object's storage refusing them), counted from the object's start (and restart).
pub const FAULT_INJECT_STORAGE_FAILURES: &str = "FAULT_INJECT_STORAGE_FAILURES";
/// Test hook: the Worker's first N hand-overs of a webhook's records (a status callback, a
/// transfer's result, an unserved call's row) to the call's object fail, as when the object
/// cannot be reached.
pub const FAULT_INJECT_CALL_OBJECT_FAILURES: &str = "FAULT_INJECT_CALL_OBJECT_FAILURES";
/// The test hooks, with what each does: unset in production (`check-config` refuses a
/// deploy that sets one to anything but 0).
pub const FAULT_HOOKS: &[(&str, &str)] = &[
    (
        FAULT_INJECT_D1_FAILURES,
        "the first writes of every call to D1 fail",
    ),
    (
        FAULT_INJECT_D1_LOOKUP_DELAY_MS,
        "every call's agent lookup in D1 is slowed down",
    ),
    (
        FAULT_INJECT_D1_STALL_MS,
        "every write of a call to D1 waits that many milliseconds",
    ),
    (
        FAULT_INJECT_D1_HANGS,
        "the first writes of every call to D1 get no answer",
    ),
    (
        FAULT_INJECT_STORAGE_FAILURES,
        "the first writes of every call object to its own storage fail",
    ),
    (
        FAULT_INJECT_CALL_OBJECT_FAILURES,
        "the first status callbacks and other records the Worker hands to call objects are lost",
    ),
];
/// The settings that are secrets (`wrangler secret put`, `.dev.vars` locally): never to be
/// written into `wrangler.toml`.
pub const SECRETS: &[&str] = &[
    "OPENAI_API_KEY",
    "TWILIO_AUTH_TOKEN",
    "TWILIO_AUTH_TOKEN_SECONDARY",
    ADMIN_TOKEN,
];

/// One variable or secret as the Worker has it: text (a number or boolean written without
/// quotes counts, as written), or something else (wrangler binds a `[vars]` table or array
/// as JSON), given as its JSON.
#[derive(Clone, Debug, PartialEq)]
pub enum Setting {
    Text(String),
    NotText(String),
}

/// Everything the bridge needs to answer calls, from the Worker's variables and secrets.
#[derive(Clone, Debug, PartialEq)]
pub struct Bridge {
    /// `ws(s)://` or `http(s)://` base of the Realtime endpoint, without the query.
    pub openai_realtime_url: String,
    pub openai_api_key: Secret,
    pub twilio_auth_token: Secret,
    /// Also verifies Twilio's signatures, never used for REST calls: the account's secondary
    /// token while a rotation is under way, so that requests signed with it are accepted
    /// from the moment Twilio promotes it until `TWILIO_AUTH_TOKEN` is set to it.
    pub twilio_auth_token_secondary: Secret,
    /// Username of Twilio REST calls (hang up, transfer); the auth token is the password.
    pub twilio_account_sid: String,
    /// Base of Twilio's REST API, `https://api.twilio.com` unless a test points it elsewhere.
    pub twilio_api_base_url: String,
    /// Public `https://host[/path]` the Worker is reached at, when it differs from the
    /// request's: the path is the one a proxy serves the Worker under (without a trailing `/`).
    pub public_base_url: Option<String>,
    /// Answer every call with the fallback TwiML, without an agent (a maintenance switch,
    /// or forced on by an `OPENAI_REALTIME_URL` that is not a URL).
    pub fallback_only: bool,
    /// Why `OPENAI_REALTIME_URL` was not taken, when that (and not the switch) is what has
    /// the fallback answer every call: those calls are recorded as failed, for this.
    pub openai_url_invalid: Option<String>,
    pub fallback_message: String,
    /// Said (with the fallback's voice) when a transfer to a person is not answered.
    pub transfer_failed_message: String,
    /// `<Say language>` and `<Say voice>` of the fallback message.
    pub fallback_language: String,
    pub fallback_voice: String,
    pub fallback_dial_number: Option<String>,
    /// Silence this long makes the agent check in; as long again ends the call.
    pub idle_timeout_ms: u64,
    /// Caller audio goes to OpenAI this much at a time (`CALLER_AUDIO_CHUNK_MS`; see
    /// `call::CALLER_CHUNK_DEFAULT_MS`): 20 sends every Twilio frame as it comes.
    pub caller_audio_chunk_ms: u64,
    /// How long a Realtime socket opened at the voice webhook waits for the call's media
    /// stream (`OPENAI_PREOPEN_SECONDS`, 0–60); 0 opens it only once the stream is there.
    pub openai_preopen_ms: u64,
    /// The least important call log lines printed (`LOG_LEVEL`; `info` unless set).
    pub log_level: crate::call::Level,
    /// Settings of the fallback that were invalid and set aside for their defaults (the
    /// shell logs each as `config.ignored`).
    pub ignored: Vec<ConfigError>,
    /// The test hooks set (to anything but 0), with what each does: the shell logs each as
    /// `config.test_hook_active`, since a hook set as a secret or in the dashboard escapes
    /// `check-config`.
    pub test_hooks: Vec<(&'static str, &'static str)>,
    pub agent: Agent,
}

impl Bridge {
    /// Reads the configuration through `get` (a variable or secret by name; empty counts as
    /// unset) and validates it. It cannot fail: a setting with an invalid value is set aside
    /// for its default and noted in `ignored` (the shell logs each as `config.ignored`). A
    /// typo in one variable must not make every webhook a 500, which Twilio answers with
    /// "an application error has occurred" and a hang-up: every call lost until someone
    /// reads the log. `scripts/deploy.sh` refuses to deploy a `wrangler.toml` with any.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<Setting>) -> Self {
        let ignored = std::cell::RefCell::new(Vec::new());
        let set_aside = |name: &'static str, reason: String| {
            ignored.borrow_mut().push(invalid(name, reason));
        };
        let get = |name: &'static str| match lookup(name)? {
            Setting::Text(v) => Some(v.trim().to_owned()).filter(|v| !v.is_empty()),
            Setting::NotText(json) => {
                // Every setting is text: a table or list would end up read as its JSON
                // (as the agent's instructions, say).
                set_aside(
                    name,
                    format!("{json} is not text (a table or list?): treated as unset"),
                );
                None
            }
        };
        let or =
            |name: &'static str, default: &str| get(name).unwrap_or_else(|| default.to_owned());
        let test_hooks = FAULT_HOOKS
            .iter()
            .copied()
            .filter(|(hook, _)| get(hook).is_some_and(|v| v != "0"))
            .collect();
        // A `<Say>` language or voice name (`ja-JP`, `Polly.Mizuki`, `Google.ja-JP-Wavenet-A`).
        let tts_name = |name: &'static str, default: &str| -> String {
            let v = or(name, default);
            let ok = v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
            if ok {
                return v;
            }
            set_aside(
                name,
                format!(
                    "{v:?} is not a language or voice name (letters, digits, - _ .): {default:?} is used"
                ),
            );
            default.to_owned()
        };
        // A number in `range`; anything else is set aside for `default`.
        let number = |name: &'static str, default: f64, range: std::ops::RangeInclusive<f64>| {
            let Some(v) = get(name) else {
                return default;
            };
            match v.parse::<f64>() {
                Ok(n) if range.contains(&n) => n,
                _ => {
                    set_aside(
                        name,
                        format!(
                            "{v:?} is not a number from {} to {}: {default} is used",
                            range.start(),
                            range.end()
                        ),
                    );
                    default
                }
            }
        };
        // The maintenance switch fails safe: a value that is neither on nor off is taken as on
        // (the fallback answers), since that is what whoever set it most likely wanted.
        let mut fallback_only = match get("FALLBACK_ONLY")
            .map(|v| v.to_ascii_lowercase())
            .as_deref()
        {
            Some("true" | "1" | "yes" | "on") => true,
            None | Some("false" | "0" | "no" | "off") => false,
            Some(_) => {
                set_aside(
                    "FALLBACK_ONLY",
                    format!(
                        "{:?} is not true or false: taken as true (the fallback answers \
                             every call)",
                        or("FALLBACK_ONLY", "")
                    ),
                );
                true
            }
        };
        let public_base_url = get("PUBLIC_BASE_URL").and_then(|u| {
            let url = base_url(&u, &["https://", "http://"])
                .map_err(|why| {
                    set_aside(
                        "PUBLIC_BASE_URL",
                        format!("{why}: the request's own origin is used"),
                    )
                })
                .ok()?;
            // Twilio opens Media Streams over wss:// only: a Worker it reaches serves https,
            // whatever was written (plain http stays for a local one).
            match url.strip_prefix("http://") {
                Some(rest) if !is_loopback(rest.split('/').next().unwrap_or_default()) => {
                    let https = format!("https://{rest}");
                    set_aside(
                        "PUBLIC_BASE_URL",
                        format!(
                            "{u:?} is plain http, and Twilio opens Media Streams over wss:// \
                             only: {https:?} is used (webhooks signed over http:// are still \
                             verified)"
                        ),
                    );
                    Some(https)
                }
                _ => Some(url),
            }
        });
        // Where the caller's audio and the API key go. A value that is not a URL is not
        // replaced by OpenAI's own endpoint (it may name a gateway or a regional endpoint the
        // audio must go through): calls are answered with the fallback until it is fixed.
        let mut realtime = or("OPENAI_REALTIME_URL", DEFAULT_REALTIME_URL);
        if let Some(at) = realtime.find('?') {
            // OpenAI's documented `wss://api.openai.com/v1/realtime?model=gpt-realtime`.
            set_aside(
                "OPENAI_REALTIME_URL",
                format!(
                    "{realtime:?} has a query: it is left out (the model is the agent's, \
                     OPENAI_MODEL for the configured one)"
                ),
            );
            realtime.truncate(at);
        }
        let mut openai_url_invalid = None;
        let realtime = match base_url(&realtime, &["wss://", "ws://", "https://", "http://"])
            .and_then(|url| cleartext_to_remote(&url).map_or(Ok(url), Err))
        {
            Ok(url) => url,
            Err(why) => {
                set_aside(
                    "OPENAI_REALTIME_URL",
                    format!("{why}: every call is answered with the fallback"),
                );
                if !fallback_only {
                    openai_url_invalid = Some(format!("OPENAI_REALTIME_URL {why}"));
                }
                fallback_only = true;
                DEFAULT_REALTIME_URL.to_owned()
            }
        };
        let twilio_api_base_url = match base_url(
            &or("TWILIO_API_BASE_URL", DEFAULT_TWILIO_API_BASE_URL),
            &["https://", "http://"],
        )
        .and_then(|url| cleartext_to_remote(&url).map_or(Ok(url), Err))
        {
            Ok(url) => url,
            Err(why) => {
                set_aside(
                    "TWILIO_API_BASE_URL",
                    format!("{why}: {DEFAULT_TWILIO_API_BASE_URL} is used"),
                );
                DEFAULT_TWILIO_API_BASE_URL.to_owned()
            }
        };
        let defaults = Agent::default();
        let td = &defaults.turn_detection;
        let mut agent = Agent {
            id: "env".into(),
            name: "Default (from configuration)".into(),
            instructions: or("AGENT_INSTRUCTIONS", DEFAULT_INSTRUCTIONS),
            greeting: or("AGENT_GREETING", DEFAULT_GREETING),
            voice: or("AGENT_VOICE", DEFAULT_VOICE),
            noise_reduction: or("AGENT_NOISE_REDUCTION", DEFAULT_NOISE_REDUCTION),
            model: or("OPENAI_MODEL", DEFAULT_MODEL),
            language: or("AGENT_LANGUAGE", DEFAULT_LANGUAGE),
            transcription_model: or("AGENT_TRANSCRIPTION_MODEL", DEFAULT_TRANSCRIPTION_MODEL),
            turn_detection: TurnDetection {
                kind: "server_vad".into(),
                threshold: number("AGENT_VAD_THRESHOLD", td.threshold, 0.0..=1.0),
                prefix_padding_ms: number(
                    "AGENT_VAD_PREFIX_PADDING_MS",
                    td.prefix_padding_ms.into(),
                    0.0..=10_000.0,
                ) as u32,
                silence_duration_ms: number(
                    "AGENT_VAD_SILENCE_MS",
                    td.silence_duration_ms.into(),
                    0.0..=10_000.0,
                ) as u32,
            },
            ..defaults.clone()
        };
        // What the Realtime API would refuse in `session.update`: each such field goes back
        // to its default, named by the variable it came from. Each pass fixes one field, and
        // the defaults are valid, so this ends.
        while let Err(e) = agent.validate() {
            let reason = format!("{}: the default is used", e.reason);
            match e.field {
                "voice" => {
                    set_aside("AGENT_VOICE", reason);
                    agent.voice = defaults.voice.clone();
                }
                "noise_reduction" => {
                    set_aside("AGENT_NOISE_REDUCTION", reason);
                    agent.noise_reduction = defaults.noise_reduction.clone();
                }
                "language" => {
                    // `EN`, `en-US`, `jp`: what was meant is clear enough to use.
                    let meant = suggest_language(&agent.language).unwrap_or(&defaults.language);
                    set_aside("AGENT_LANGUAGE", format!("{}: {meant:?} is used", e.reason));
                    agent.language = meant.to_owned();
                }
                // `GPT-Realtime`: what was meant is clear enough to use, as for languages;
                // any other name goes back to the default.
                "model" => {
                    let meant = suggest_realtime_model(&agent.model)
                        .unwrap_or_else(|| defaults.model.clone());
                    set_aside("OPENAI_MODEL", format!("{}: {meant:?} is used", e.reason));
                    agent.model = meant;
                }
                "transcription_model" => {
                    let meant = suggest_transcription_model(&agent.transcription_model)
                        .unwrap_or_else(|| defaults.transcription_model.clone());
                    set_aside(
                        "AGENT_TRANSCRIPTION_MODEL",
                        format!("{}: {meant:?} is used", e.reason),
                    );
                    agent.transcription_model = meant;
                }
                // The rest cannot fail from variables (empty is unset, the numbers are
                // checked above); were one to, the whole default agent is used.
                _ => {
                    set_aside("AGENT_*", format!("{e}: the default agent is used"));
                    agent = defaults.clone();
                }
            }
        }
        // It can hang up, as the seeded default agent in D1 can: without it a call the agent
        // has finished stays open until the caller hangs up or goes silent.
        agent.tools = vec![serde_json::json!({ "type": crate::tools::END_CALL })];
        Self {
            openai_realtime_url: realtime,
            openai_api_key: Secret::new(get("OPENAI_API_KEY").unwrap_or_default()),
            twilio_auth_token: Secret::new(get("TWILIO_AUTH_TOKEN").unwrap_or_default()),
            twilio_auth_token_secondary: Secret::new(
                get("TWILIO_AUTH_TOKEN_SECONDARY").unwrap_or_default(),
            ),
            twilio_account_sid: get("TWILIO_ACCOUNT_SID").unwrap_or_default(),
            twilio_api_base_url,
            public_base_url,
            fallback_only,
            openai_url_invalid,
            fallback_message: or("FALLBACK_MESSAGE", DEFAULT_FALLBACK_MESSAGE),
            transfer_failed_message: or("TRANSFER_FAILED_MESSAGE", DEFAULT_TRANSFER_FAILED_MESSAGE),
            fallback_language: tts_name("FALLBACK_LANGUAGE", DEFAULT_FALLBACK_LANGUAGE),
            fallback_voice: tts_name("FALLBACK_VOICE", DEFAULT_FALLBACK_VOICE),
            // It goes into `<Dial>` as it is: a number Twilio cannot dial would fail after the
            // apology. Not dialled then (the agent's own transfer number is, if it has one).
            fallback_dial_number: get("FALLBACK_DIAL_NUMBER").filter(|n| {
                let problem = number_problem(n);
                if let Some(problem) = &problem {
                    set_aside("FALLBACK_DIAL_NUMBER", format!("{problem}: not dialled"));
                }
                problem.is_none()
            }),
            idle_timeout_ms: (number("IDLE_TIMEOUT_SECONDS", 30.0, 5.0..=600.0) * 1000.0) as u64,
            caller_audio_chunk_ms: number(
                "CALLER_AUDIO_CHUNK_MS",
                crate::call::CALLER_CHUNK_DEFAULT_MS as f64,
                crate::call::CALLER_CHUNK_MS_RANGE.0 as f64
                    ..=crate::call::CALLER_CHUNK_MS_RANGE.1 as f64,
            )
            .round() as u64,
            openai_preopen_ms: (number("OPENAI_PREOPEN_SECONDS", 10.0, 0.0..=60.0) * 1000.0) as u64,
            log_level: match get("LOG_LEVEL") {
                None => crate::call::Level::Info,
                Some(v) => v.parse().unwrap_or_else(|()| {
                    set_aside(
                        "LOG_LEVEL",
                        format!("{v:?} is not debug, info, warn or error: info is used"),
                    );
                    crate::call::Level::Info
                }),
            },
            agent,
            test_hooks,
            ignored: ignored.into_inner(),
        }
    }

    /// The URL the Worker fetches to open the Realtime socket: `http(s)` scheme (the
    /// upgrade is an ordinary fetch) and the model as the only query parameter.
    pub fn realtime_connect_url(&self, model: &str) -> String {
        let base = &self.openai_realtime_url;
        let base = if let Some(rest) = base.strip_prefix("wss://") {
            format!("https://{rest}")
        } else if let Some(rest) = base.strip_prefix("ws://") {
            format!("http://{rest}")
        } else {
            base.clone()
        };
        let encoded: String = model
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        format!("{base}?model={encoded}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(pairs: &[(&str, &str)]) -> Bridge {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Bridge::from_lookup(|k| map.get(k).cloned().map(Setting::Text))
    }

    #[test]
    fn log_level_is_info_unless_set_and_checked() {
        use crate::call::Level;
        assert_eq!(from(&[]).log_level, Level::Info);
        assert_eq!(from(&[("LOG_LEVEL", "debug")]).log_level, Level::Debug);
        assert_eq!(from(&[("LOG_LEVEL", "WARN")]).log_level, Level::Warn);
        assert_eq!(from(&[("LOG_LEVEL", "error")]).log_level, Level::Error);
        let c = from(&[("LOG_LEVEL", "loud")]);
        assert_eq!(
            (c.log_level, c.ignored[0].field),
            (Level::Info, "LOG_LEVEL")
        );
        assert!(
            Level::Debug < Level::Info && Level::Info < Level::Warn && Level::Warn < Level::Error
        );
    }

    #[test]
    fn a_test_hook_set_to_anything_but_0_is_named_with_what_it_does() {
        assert!(from(&[]).test_hooks.is_empty());
        assert!(from(&[
            (FAULT_INJECT_D1_FAILURES, "0"),
            (FAULT_INJECT_D1_STALL_MS, " ")
        ])
        .test_hooks
        .is_empty());
        let c = from(&[
            (FAULT_INJECT_D1_FAILURES, "3"),
            (FAULT_INJECT_CALL_OBJECT_FAILURES, "yes"),
        ]);
        let named: Vec<&str> = c.test_hooks.iter().map(|(hook, _)| *hook).collect();
        assert_eq!(
            named,
            [FAULT_INJECT_D1_FAILURES, FAULT_INJECT_CALL_OBJECT_FAILURES]
        );
        assert!(c.test_hooks.iter().all(|(_, what)| !what.is_empty()));
        assert!(c.ignored.is_empty(), "{:?}", c.ignored);
    }

    #[test]
    fn japanese_defaults_when_nothing_is_set() {
        let c = from(&[]);
        assert_eq!(c.agent.language, "ja");
        assert_eq!(c.agent.voice, "marin");
        assert_eq!(c.agent.model, "gpt-realtime");
        // It can hang up, as the seeded default agent can (migration 0006).
        assert_eq!(c.agent.tools, [serde_json::json!({"type": "end_call"})]);
        assert!(!c.fallback_only);
        assert_eq!(c.openai_realtime_url, DEFAULT_REALTIME_URL);
        assert!(c.fallback_message.contains("申し訳"));
        assert_eq!(c.fallback_language, "ja-JP");
        assert_eq!(c.fallback_voice, "Polly.Mizuki");
        assert_eq!(c.fallback_dial_number, None);
        let c = from(&[
            ("FALLBACK_LANGUAGE", "en-US"),
            ("FALLBACK_VOICE", "Google.en-US-Standard-C"),
        ]);
        assert_eq!(
            (c.fallback_language.as_str(), c.fallback_voice.as_str()),
            ("en-US", "Google.en-US-Standard-C")
        );
    }

    #[test]
    fn connect_url_maps_scheme_and_adds_model() {
        let c = from(&[("OPENAI_REALTIME_URL", "ws://127.0.0.1:9000/v1/realtime/")]);
        assert_eq!(
            c.realtime_connect_url("gpt-realtime"),
            "http://127.0.0.1:9000/v1/realtime?model=gpt-realtime"
        );
        let c = from(&[]);
        assert_eq!(
            c.realtime_connect_url("a b&c"),
            "https://api.openai.com/v1/realtime?model=a%20b%26c"
        );
    }

    #[test]
    fn an_invalid_setting_is_set_aside_for_its_default_and_named_by_its_variable() {
        // One typo must not fail every webhook: calls are answered with the default, and
        // `ignored` says what was set aside (logged as config.ignored).
        let d = from(&[]);
        assert!(d.ignored.is_empty());
        assert_eq!(d.openai_preopen_ms, 10_000);
        let check = |var: &str, value: &str, same: &dyn Fn(&Bridge) -> bool| {
            let c = from(&[(var, value)]);
            let fields: Vec<&str> = c.ignored.iter().map(|e| e.field).collect();
            assert_eq!(fields, [var], "{var}={value}");
            assert!(c.ignored[0].reason.contains(value), "{:?}", c.ignored[0]);
            assert!(same(&c), "{var}={value} gives the default");
        };
        check("AGENT_VOICE", "robot", &|c| c.agent.voice == d.agent.voice);
        check("AGENT_NOISE_REDUCTION", "loud", &|c| {
            c.agent.noise_reduction == "near_field"
        });
        assert_eq!(
            from(&[("AGENT_NOISE_REDUCTION", "off")])
                .agent
                .noise_reduction,
            "off"
        );
        check("AGENT_LANGUAGE", "jp", &|c| c.agent.language == "ja");
        // A language written another way is read as the code it means, not replaced.
        check("AGENT_LANGUAGE", "EN", &|c| c.agent.language == "en");
        check("AGENT_LANGUAGE", "en-US", &|c| c.agent.language == "en");
        check("AGENT_LANGUAGE", "cn", &|c| c.agent.language == "zh");
        check("AGENT_LANGUAGE", "klingon", &|c| c.agent.language == "ja");
        check("AGENT_VAD_THRESHOLD", "2", &|c| c.agent == d.agent);
        check("AGENT_VAD_SILENCE_MS", "a second", &|c| c.agent == d.agent);
        check("AGENT_VAD_PREFIX_PADDING_MS", "-300", &|c| {
            c.agent == d.agent
        });
        // The maintenance switch fails safe: on.
        check("FALLBACK_ONLY", "maybe", &|c| c.fallback_only);
        check("FALLBACK_ONLY", "enabled", &|c| c.fallback_only);
        check("PUBLIC_BASE_URL", "example.com", &|c| {
            c.public_base_url.is_none()
        });
        check("PUBLIC_BASE_URL", "https://", &|c| {
            c.public_base_url.is_none()
        });
        // Not a URL: never replaced by OpenAI's own host (it may name a gateway the audio
        // must go through); the fallback answers.
        for bad in [
            "gateway.example.jp/v1/openai",
            "wss://",
            "wss://gw.example.jp/v1 realtime",
        ] {
            check("OPENAI_REALTIME_URL", bad, &|c| c.fallback_only);
        }
        // OpenAI's documented URL with its `?model=`: the query is left out, the host kept.
        check(
            "OPENAI_REALTIME_URL",
            "wss://gw.example.jp/v1/realtime?model=gpt-realtime",
            &|c| !c.fallback_only && c.openai_realtime_url == "wss://gw.example.jp/v1/realtime",
        );
        check("TWILIO_API_BASE_URL", "api.twilio.com", &|c| {
            c.twilio_api_base_url == DEFAULT_TWILIO_API_BASE_URL
        });
        // The auth token would go to another machine in clear text: not used. To this
        // machine (the simulator's REST stand-in, tests' fakes), plain http is all there is.
        check(
            "TWILIO_API_BASE_URL",
            "http://twilio-proxy.example.jp",
            &|c| c.twilio_api_base_url == DEFAULT_TWILIO_API_BASE_URL,
        );
        assert_eq!(
            from(&[("TWILIO_API_BASE_URL", "http://127.0.0.1:8788/twilio")]).twilio_api_base_url,
            "http://127.0.0.1:8788/twilio"
        );
        // The OpenAI key and the callers' audio likewise: calls get the fallback instead.
        check(
            "OPENAI_REALTIME_URL",
            "ws://gw.example.jp/v1/realtime",
            &|c| {
                c.fallback_only
                    && c.openai_url_invalid
                        .as_deref()
                        .is_some_and(|w| w.contains("unencrypted"))
            },
        );
        check("IDLE_TIMEOUT_SECONDS", "1", &|c| {
            c.idle_timeout_ms == 30_000
        });
        check("IDLE_TIMEOUT_SECONDS", "30s", &|c| {
            c.idle_timeout_ms == 30_000
        });
        check("CALLER_AUDIO_CHUNK_MS", "10", &|c| {
            c.caller_audio_chunk_ms == 40
        });
        check("CALLER_AUDIO_CHUNK_MS", "1000", &|c| {
            c.caller_audio_chunk_ms == 40
        });
        check("OPENAI_PREOPEN_SECONDS", "120", &|c| {
            c.openai_preopen_ms == 10_000
        });
        check("OPENAI_PREOPEN_SECONDS", "-1", &|c| {
            c.openai_preopen_ms == 10_000
        });
        check("LOG_LEVEL", "verbose", &|c| c.log_level == d.log_level);
        // A model the Realtime API does not have would fail every call: the default is
        // used, or the name meant when only its case is off (spaces are trimmed already).
        check("OPENAI_MODEL", "gpt-realtme", &|c| c.agent == d.agent);
        check("OPENAI_MODEL", "gpt-4o", &|c| c.agent == d.agent);
        check("OPENAI_MODEL", "GPT-Realtime-Mini", &|c| {
            c.agent.model == "gpt-realtime-mini"
        });
        check("AGENT_TRANSCRIPTION_MODEL", "gpt-4o-transcibe", &|c| {
            c.agent == d.agent
        });
        check("AGENT_TRANSCRIPTION_MODEL", "Whisper-1", &|c| {
            c.agent.transcription_model == "whisper-1"
        });
        // Several at once are each named, and what is valid is kept.
        let c = from(&[
            ("AGENT_VOICE", "nova"),
            ("AGENT_LANGUAGE", "japanese"),
            ("AGENT_VAD_SILENCE_MS", "800"),
            ("IDLE_TIMEOUT_SECONDS", "45"),
            ("CALLER_AUDIO_CHUNK_MS", "20"),
            ("OPENAI_PREOPEN_SECONDS", "0"),
        ]);
        let fields: Vec<&str> = c.ignored.iter().map(|e| e.field).collect();
        assert_eq!(fields, ["AGENT_VOICE", "AGENT_LANGUAGE"]);
        assert_eq!(c.openai_preopen_ms, 0);
        assert_eq!(c.agent.turn_detection.silence_duration_ms, 800);
        assert_eq!(c.idle_timeout_ms, 45_000);
        assert_eq!(c.caller_audio_chunk_ms, 20);
        assert_eq!(c.agent.validate(), Ok(()));
        // A table or list where text belongs is not read as its JSON.
        let c = Bridge::from_lookup(|k| match k {
            "AGENT_INSTRUCTIONS" => Some(Setting::NotText(r#"["a","b"]"#.into())),
            "FALLBACK_MESSAGE" => Some(Setting::NotText(r#"{"text":"x"}"#.into())),
            _ => None,
        });
        let fields: Vec<&str> = c.ignored.iter().map(|e| e.field).collect();
        assert_eq!(fields, ["AGENT_INSTRUCTIONS", "FALLBACK_MESSAGE"]);
        assert_eq!(c.agent.instructions, DEFAULT_INSTRUCTIONS);
        assert_eq!(c.fallback_message, DEFAULT_FALLBACK_MESSAGE);
        assert_eq!(c.agent.tools.len(), 1, "set-aside settings keep end_call");
        // The switch reads the usual spellings.
        for on in ["true", "TRUE", "1", "yes", "on"] {
            assert!(from(&[("FALLBACK_ONLY", on)]).fallback_only, "{on}");
        }
        for off in ["false", "False", "0", "no", "off"] {
            let c = from(&[("FALLBACK_ONLY", off)]);
            assert!(!c.fallback_only && c.ignored.is_empty(), "{off}");
        }
    }

    #[test]
    fn a_public_base_url_may_carry_the_path_a_proxy_serves_the_worker_under() {
        for (written, read) in [
            ("https://phone.example.jp", "https://phone.example.jp"),
            ("https://example.jp/phone", "https://example.jp/phone"),
            ("https://example.jp/a/b/", "https://example.jp/a/b"),
        ] {
            let c = from(&[("PUBLIC_BASE_URL", written)]);
            assert_eq!(c.public_base_url.as_deref(), Some(read), "{written}");
            assert!(c.ignored.is_empty(), "{written}: {:?}", c.ignored);
        }
        let c = from(&[("PUBLIC_BASE_URL", "https://example.jp/phone?x=1")]);
        assert_eq!(c.public_base_url, None);
        assert_eq!(c.ignored[0].field, "PUBLIC_BASE_URL");
    }

    /// Twilio opens Media Streams over wss:// only: a public base URL written with http://
    /// is read as https:// (and named), except for this machine, which has no TLS.
    #[test]
    fn a_public_base_url_is_https_unless_it_names_this_machine() {
        let c = from(&[("PUBLIC_BASE_URL", "http://example.jp/phone")]);
        assert_eq!(
            c.public_base_url.as_deref(),
            Some("https://example.jp/phone")
        );
        let e = &c.ignored[0];
        assert_eq!(e.field, "PUBLIC_BASE_URL");
        assert!(
            e.reason
                .contains("\"http://example.jp/phone\" is plain http"),
            "{}",
            e.reason
        );
        assert!(e.reason.contains("wss://"), "{}", e.reason);
        for local in [
            "http://127.0.0.1:8787",
            "http://localhost:8787/phone",
            "http://[::1]:8787",
            "http://127.1.2.3",
        ] {
            let c = from(&[("PUBLIC_BASE_URL", local)]);
            assert_eq!(c.public_base_url.as_deref(), Some(local));
            assert!(c.ignored.is_empty(), "{local}: {:?}", c.ignored);
        }
        for (authority, local) in [
            ("localhost", true),
            ("LOCALHOST:80", true),
            ("user:pw@127.0.0.1:8787", true),
            ("[::1]", true),
            ("128.0.0.1", false),
            ("localhost.example.jp", false),
            ("[::2]:8787", false),
            ("example.jp", false),
        ] {
            assert_eq!(is_loopback(authority), local, "{authority}");
        }
    }

    #[test]
    fn a_bad_fallback_setting_is_set_aside_for_its_default_not_a_failure() {
        // The fallback is what callers hear when everything else fails: it must not fail too.
        let c = from(&[
            ("FALLBACK_VOICE", "Polly.Mizuki\" loop=\"9"),
            ("FALLBACK_LANGUAGE", "日本語"),
        ]);
        assert_eq!(c.fallback_voice, DEFAULT_FALLBACK_VOICE);
        assert_eq!(c.fallback_language, DEFAULT_FALLBACK_LANGUAGE);
        let fields: Vec<&str> = c.ignored.iter().map(|e| e.field).collect();
        assert_eq!(fields, ["FALLBACK_LANGUAGE", "FALLBACK_VOICE"]);
        assert!(from(&[]).ignored.is_empty());
    }

    #[test]
    fn fallback_only_turns_the_agent_off_and_empty_is_unset() {
        let c = from(&[("FALLBACK_ONLY", "true"), ("FALLBACK_DIAL_NUMBER", "")]);
        assert!(c.fallback_only);
        assert_eq!(c.fallback_dial_number, None);
    }

    #[test]
    fn agent_validation_names_the_field() {
        let ok = Agent::default();
        assert_eq!(ok.validate(), Ok(()));
        let check = |f: &dyn Fn(&mut Agent)| {
            let mut a = Agent::default();
            f(&mut a);
            a.validate().unwrap_err().field
        };
        assert_eq!(check(&|a| a.voice = "nova".into()), "voice");
        assert_eq!(check(&|a| a.model = "gpt-realtme".into()), "model");
        assert_eq!(
            check(&|a| a.transcription_model = "gpt-4o-transcribe ".into()),
            "transcription_model"
        );
        assert_eq!(
            check(
                &|a| a.tools = vec![serde_json::json!({"type":"function","name":"x",
                "url":"https://crm.example.jp/t","parameters":{"type":"string"}})]
            ),
            "tools"
        );
        assert_eq!(check(&|a| a.name = " ".into()), "name");
        assert_eq!(
            check(&|a| a.turn_detection.kind = "push".into()),
            "turn_detection.type"
        );
        assert_eq!(
            check(&|a| a.turn_detection.silence_duration_ms = 60_000),
            "turn_detection.silence_duration_ms"
        );
        assert_eq!(
            check(&|a| a.transfer_number = Some("0312345678".into())),
            "transfer_number"
        );
        assert_eq!(check(&|a| a.max_call_seconds = 5), "max_call_seconds");
        assert_eq!(
            check(&|a| a.tools = vec![serde_json::json!({"type":"function"})]),
            "tools"
        );
        assert_eq!(check(&|a| a.tools = vec![serde_json::json!("x")]), "tools");
        let tool = serde_json::json!({"type":"function","name":"lookup","description":"d","parameters":{"type":"object"},"url":"https://crm.example.jp/t"});
        assert_eq!(
            check(&|a| a.tools = vec![tool.clone(), tool.clone()]),
            "tools"
        );
        let a = Agent {
            tools: vec![tool],
            transfer_number: Some("+81312345678".into()),
            ..Agent::default()
        };
        assert_eq!(a.validate(), Ok(()));
    }

    #[test]
    fn language_must_be_an_iso_639_1_code_and_a_slip_gets_a_suggestion() {
        let lang = |l: &str| {
            Agent {
                language: l.into(),
                ..Agent::default()
            }
            .validate()
        };
        for ok in ["ja", "en", "zh", "ko", "de", "pt", "zu"] {
            assert_eq!(lang(ok), Ok(()), "{ok}");
        }
        let e = lang("jp").unwrap_err();
        assert_eq!(e.field, "language");
        assert!(e.reason.contains("did you mean \"ja\""), "{}", e.reason);
        for (slip, meant) in [("JA", "ja"), ("ja-JP", "ja"), ("cn", "zh"), ("iw", "he")] {
            let e = lang(slip).unwrap_err();
            assert!(
                e.reason.contains(&format!("{meant:?}")),
                "{slip}: {}",
                e.reason
            );
        }
        for bad in ["xx", "qq", "japanese", "", "j", "日本"] {
            let e = lang(bad).unwrap_err();
            assert_eq!(e.field, "language", "{bad}");
            assert!(!e.reason.contains("did you mean"), "{bad}: {}", e.reason);
        }
        assert_eq!(ISO_639_1.len(), 183);
        assert!(
            ISO_639_1.windows(2).all(|w| w[0] < w[1]),
            "sorted, no repeats"
        );
        let e = &from(&[("AGENT_LANGUAGE", "jp")]).ignored[0];
        assert_eq!(e.field, "AGENT_LANGUAGE");
        assert!(e.reason.contains("did you mean \"ja\""), "{}", e.reason);
    }

    #[test]
    fn model_must_name_a_realtime_model_and_new_ones_pass() {
        let model = |m: &str| {
            Agent {
                model: m.into(),
                ..Agent::default()
            }
            .validate()
        };
        // The names protocol.md gives, others of the family, and ones not out yet.
        for ok in [
            "gpt-realtime",
            "gpt-realtime-2025-08-28",
            "gpt-realtime-mini",
            "gpt-realtime-1.5",
            "gpt-realtime-2",
            "gpt-realtime-2.1",
            "gpt-4o-realtime-preview",
            "gpt-4o-mini-realtime-preview-2024-12-17",
            "gpt-realtime-2030",
        ] {
            assert_eq!(model(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            " ",
            "gpt-realtme",
            "gpt-4o",
            "gpt realtime",
            "gpt-realtime\n",
            "gpt-realtime\u{7}",
            "gpt-realtime-whisper",
            "gpt-4o-transcribe",
            "GPT-REALTIME",
        ] {
            let e = model(bad).unwrap_err();
            assert_eq!(e.field, "model", "{bad:?}");
        }
        assert!(model("gpt-realtime-whisper")
            .unwrap_err()
            .reason
            .contains("transcription model"));
        // A stray space or capitals: the message says what was meant.
        for (slip, meant) in [
            ("gpt-realtime ", "gpt-realtime"),
            (" gpt-realtime-mini", "gpt-realtime-mini"),
            ("GPT-Realtime", "gpt-realtime"),
        ] {
            let e = model(slip).unwrap_err();
            assert!(
                e.reason.contains(&format!("did you mean {meant:?}")),
                "{slip:?}: {}",
                e.reason
            );
        }
        assert!(!model("gpt-realtme")
            .unwrap_err()
            .reason
            .contains("did you mean"));
    }

    #[test]
    fn transcription_model_must_be_one_the_api_lists() {
        let transcription = |m: &str| {
            Agent {
                transcription_model: m.into(),
                ..Agent::default()
            }
            .validate()
        };
        for ok in TRANSCRIPTION_MODELS {
            assert_eq!(transcription(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "gpt-4o-transcribe ",
            "gpt-4o-transcibe",
            "whisper",
            "gpt-realtime",
            "Whisper-1",
        ] {
            let e = transcription(bad).unwrap_err();
            assert_eq!(e.field, "transcription_model", "{bad:?}");
            assert!(e.reason.contains("gpt-4o-mini-transcribe"), "{}", e.reason);
        }
        for (slip, meant) in [
            ("gpt-4o-transcribe ", "gpt-4o-transcribe"),
            ("Whisper-1", "whisper-1"),
        ] {
            let e = transcription(slip).unwrap_err();
            assert!(
                e.reason.contains(&format!("did you mean {meant:?}")),
                "{slip:?}: {}",
                e.reason
            );
        }
    }

    #[test]
    fn a_fallback_dial_number_that_is_not_e164_is_set_aside_not_dialled() {
        assert_eq!(
            from(&[("FALLBACK_DIAL_NUMBER", "+81312345678")])
                .fallback_dial_number
                .as_deref(),
            Some("+81312345678")
        );
        for bad in [
            "03-1234-5678",
            "0312345678",
            "+81 3 1234 5678",
            "+0312345678",
            "</Dial>",
        ] {
            let c = from(&[("FALLBACK_DIAL_NUMBER", bad)]);
            assert_eq!(c.fallback_dial_number, None, "{bad} is not dialled");
            let e = &c.ignored[0];
            assert_eq!(e.field, "FALLBACK_DIAL_NUMBER", "{bad}");
            assert!(e.reason.contains("E.164"), "{}", e.reason);
        }
        // The domestic 0 kept after +81: E.164 in form, and no number Twilio can dial.
        let c = from(&[("FALLBACK_DIAL_NUMBER", "+810312345678")]);
        assert_eq!(c.fallback_dial_number, None);
        assert!(
            c.ignored[0].reason.contains("write +81312345678"),
            "{:?}",
            c.ignored
        );
    }

    #[test]
    fn e164() {
        assert!(is_e164("+81312345678"));
        assert!(!is_e164("+0312345678"));
        assert!(!is_e164("81312345678"));
        assert!(!is_e164("+8131234567890123"));
        assert!(!is_e164("+81-3-1234"));
    }

    #[test]
    fn the_default_instructions_ask_for_a_word_before_a_slow_tool() {
        // A webhook tool can take seconds: without a word first, the caller hears silence.
        assert!(DEFAULT_INSTRUCTIONS.contains("少々お待ちください"));
        let shipped = include_str!("../wrangler.toml");
        let head = "AGENT_INSTRUCTIONS = \"\"\"";
        let rest = &shipped[shipped.find(head).expect("AGENT_INSTRUCTIONS") + head.len()..];
        let text = &rest[..rest.find("\"\"\"").expect("its end")];
        assert!(text.contains("少々お待ちください"), "{text}");
    }

    #[test]
    fn secrets_do_not_print() {
        let c = from(&[
            ("OPENAI_API_KEY", "sk-very-secret"),
            ("TWILIO_AUTH_TOKEN", "primary-secret"),
            ("TWILIO_AUTH_TOKEN_SECONDARY", "secondary-secret"),
        ]);
        let printed = format!("{c:?}");
        for secret in ["sk-very-secret", "primary-secret", "secondary-secret"] {
            assert!(!printed.contains(secret), "{secret}");
        }
        assert_eq!(c.openai_api_key.expose(), "sk-very-secret");
        assert_eq!(c.twilio_auth_token_secondary.expose(), "secondary-secret");
        assert!(from(&[]).twilio_auth_token_secondary.is_empty());
        assert!(SECRETS.contains(&"TWILIO_AUTH_TOKEN_SECONDARY"));
    }
}
