//! A fake Twilio for the end-to-end tests.
//!
//! - The voice webhook: builds the form Twilio posts, signs it (`X-Twilio-Signature`), posts it
//!   and parses the TwiML answer ([`Twiml`]).
//! - The media stream: opens the `<Stream url>` WebSocket with the signature header and speaks
//!   the Media Streams protocol (`connected`, `start`, real-time paced `media`, `stop`). Each
//!   `media` frame is stamped on Twilio's media clock ([`MediaClock`]).
//! - Twilio's playback buffer: outbound `media` is queued and "played" in real time at
//!   8 bytes/ms (μ-law 8 kHz); a `mark` is echoed once everything queued before it has played;
//!   `clear` empties the queue and echoes every pending mark at once.
//!
//! Everything the Worker sends is recorded in a [`TwilioLog`] with receive times.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

/// μ-law 8 kHz mono: 8 bytes per millisecond.
pub const BYTES_PER_MS: u64 = 8;
/// Twilio sends 20 ms frames: 160 bytes.
pub const FRAME_BYTES: usize = 160;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

// ---- ids and the voice webhook ----------------------------------------------------------------

/// Twilio's identifiers for one call (unique per test).
#[derive(Clone, Debug)]
pub struct CallIds {
    pub call_sid: String,
    pub account_sid: String,
    pub stream_sid: String,
}

impl CallIds {
    pub fn new() -> CallIds {
        CallIds {
            call_sid: unique_sid("CA"),
            account_sid: unique_sid("AC"),
            stream_sid: unique_sid("MZ"),
        }
    }
}

/// `prefix` + 32 hex digits, unique within this machine for a while.
pub fn unique_sid(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let pid = std::process::id() as u64;
    format!(
        "{prefix}{:012x}{:08x}{:012x}",
        nanos & 0xffff_ffff_ffff,
        pid & 0xffff_ffff,
        n
    )
}

/// The form Twilio posts for an incoming call.
pub fn voice_params(ids: &CallIds, from: &str, to: &str) -> Vec<(String, String)> {
    [
        ("AccountSid", ids.account_sid.as_str()),
        ("ApiVersion", "2010-04-01"),
        ("CallSid", ids.call_sid.as_str()),
        ("CallStatus", "ringing"),
        ("Called", to),
        ("Caller", from),
        ("Direction", "inbound"),
        ("From", from),
        ("FromCountry", "US"),
        ("To", to),
        ("ToCountry", "JP"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// The form Twilio posts to a call's status callback (protocol.md C2): the voice webhook's
/// params with this `CallStatus`, plus `CallbackSource`, `SequenceNumber`, `Timestamp`
/// (RFC 2822), and on a terminal status with a duration `CallDuration` (seconds) and, for
/// `completed`, `Duration` (billed minutes).
pub fn status_params(
    ids: &CallIds,
    from: &str,
    to: &str,
    call_status: &str,
    sequence_number: u32,
    call_duration_s: Option<u64>,
) -> Vec<(String, String)> {
    let mut params = voice_params(ids, from, to);
    for (k, v) in params.iter_mut() {
        if k == "CallStatus" {
            *v = call_status.to_string();
        }
    }
    params.push(("CallbackSource".into(), "call-progress-events".into()));
    params.push(("SequenceNumber".into(), sequence_number.to_string()));
    params.push(("Timestamp".into(), rfc2822_now()));
    if let Some(d) = call_duration_s {
        params.push(("CallDuration".into(), d.to_string()));
        if call_status == "completed" {
            params.push(("Duration".into(), d.div_ceil(60).max(1).to_string()));
        }
    }
    params
}

/// The current time as Twilio writes `Timestamp`, e.g. `Sun, 22 Nov 2026 01:32:02 +0000`.
pub fn rfc2822_now() -> String {
    rfc2822(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64,
    )
}

/// Seconds since the Unix epoch in RFC 2822 form, UTC.
pub fn rfc2822(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} +0000",
        WEEKDAYS[days.rem_euclid(7) as usize],
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Twilio's `X-Twilio-Signature` for `url` and the form `params`.
pub fn sign(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    phone_agent_bridge::signature::compute(auth_token, url, params)
}

/// An HTTP answer, reduced to what the tests look at.
#[derive(Clone, Debug)]
pub struct HttpReply {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: String,
}

/// POST a form, with `X-Twilio-Signature: signature` when given.
pub async fn post_form(
    url: &str,
    params: &[(String, String)],
    signature: Option<&str>,
) -> Result<HttpReply, String> {
    send_webhook(url, Some(params), signature).await
}

/// A webhook as Twilio sends it to a number set to HTTP GET: the parameters in the query
/// string, the signature over the whole URL. Returns the URL requested too.
pub async fn get_query(
    url: &str,
    params: &[(String, String)],
    auth_token: &str,
) -> Result<(String, HttpReply), String> {
    let query: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params)
        .finish();
    let url = format!("{url}?{query}");
    let sig = sign(auth_token, &url, &[]);
    let reply = send_webhook(&url, None, Some(&sig)).await?;
    Ok((url, reply))
}

async fn send_webhook(
    url: &str,
    form: Option<&[(String, String)]>,
    signature: Option<&str>,
) -> Result<HttpReply, String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| e.to_string())?;
    let mut req = match form {
        Some(params) => client.post(url).form(params),
        None => client.get(url),
    };
    if let Some(sig) = signature {
        req = req.header("X-Twilio-Signature", sig);
    }
    let method = if form.is_some() { "POST" } else { "GET" };
    let resp = super::send(req)
        .await
        .map_err(|e| format!("{method} {url}: {e}"))?;
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = resp.text().await.map_err(|e| e.to_string())?;
    Ok(HttpReply {
        status,
        content_type,
        body,
    })
}

// ---- TwiML ------------------------------------------------------------------------------------

/// What the tests need from a `<Response><Connect><Stream>` answer.
#[derive(Clone, Debug, Default)]
pub struct Twiml {
    /// The `url` attribute of `<Stream>`, unescaped.
    pub stream_url: String,
    /// `<Parameter name value>` pairs in document order, unescaped.
    pub parameters: Vec<(String, String)>,
    /// Slash-joined element paths in document order, e.g. `Response/Connect/Stream`.
    pub element_paths: Vec<String>,
    /// What Twilio does once the stream ends: the `<Say>` texts with their `voice`
    /// attribute, and the `<Dial>` numbers, after `</Connect>`.
    pub says: Vec<(String, Option<String>)>,
    pub dials: Vec<String>,
}

impl Twiml {
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parse TwiML strictly (well-formed XML, one `<Stream>` under `Response/Connect`).
pub fn parse_twiml(xml: &str) -> Result<Twiml, String> {
    use quick_xml::events::{BytesStart, Event};
    use quick_xml::Reader;

    fn attrs(e: &BytesStart) -> Result<Vec<(String, String)>, String> {
        let mut out = Vec::new();
        for a in e.attributes() {
            let a = a.map_err(|e| format!("bad attribute: {e}"))?;
            let key = String::from_utf8_lossy(a.key.as_ref()).into_owned();
            // XML forbids a raw '<' in attribute values (quick-xml does not check this).
            if a.value.contains(&b'<') {
                return Err(format!("unescaped '<' in the value of {key}"));
            }
            let value = a
                .unescape_value()
                .map_err(|e| format!("bad attribute value of {key}: {e}"))?
                .into_owned();
            out.push((key, value));
        }
        Ok(out)
    }

    let mut reader = Reader::from_str(xml);
    let mut stack: Vec<String> = Vec::new();
    let mut twiml = Twiml::default();
    let mut streams = 0;
    loop {
        let ev = reader.read_event().map_err(|e| {
            format!(
                "TwiML is not well-formed XML at {}: {e}",
                reader.buffer_position()
            )
        })?;
        let (start, empty) = match &ev {
            Event::Start(e) => (Some(e.clone()), false),
            Event::Empty(e) => (Some(e.clone()), true),
            Event::End(_) => {
                stack.pop();
                (None, false)
            }
            Event::Text(t) => {
                // (quick-xml reports entity references as events of their own; the texts
                // checked here have none.)
                let text = t
                    .decode()
                    .map_err(|e| format!("bad text: {e}"))?
                    .into_owned();
                match stack.join("/").as_str() {
                    "Response/Say" => {
                        if let Some(last) = twiml.says.last_mut() {
                            last.0.push_str(&text);
                        }
                    }
                    "Response/Dial" => twiml.dials.push(text),
                    _ => {}
                }
                (None, false)
            }
            Event::Eof => break,
            _ => (None, false),
        };
        if let Some(e) = start {
            let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
            stack.push(name.clone());
            let path = stack.join("/");
            twiml.element_paths.push(path.clone());
            let a = attrs(&e)?;
            let get = |k: &str| a.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
            match path.as_str() {
                "Response/Connect/Stream" => {
                    streams += 1;
                    twiml.stream_url = get("url").ok_or("<Stream> without url")?;
                }
                "Response/Connect/Stream/Parameter" => {
                    let n = get("name").ok_or("<Parameter> without name")?;
                    let v = get("value").ok_or("<Parameter> without value")?;
                    twiml.parameters.push((n, v));
                }
                "Response/Say" => twiml.says.push((String::new(), get("voice"))),
                _ => {}
            }
            if empty {
                stack.pop();
            }
        }
    }
    if !stack.is_empty() {
        return Err(format!("unclosed elements {stack:?}"));
    }
    if streams != 1 {
        return Err(format!(
            "expected exactly one Response/Connect/Stream, found {streams} (elements: {:?})",
            twiml.element_paths
        ));
    }
    Ok(twiml)
}

// ---- the media stream ---------------------------------------------------------------------------

/// Why opening the media stream failed.
#[derive(Debug)]
pub enum ConnectError {
    /// The server answered the upgrade with this non-101 status.
    Refused {
        status: u16,
        body: String,
    },
    Other(String),
}

/// One outbound (Worker → Twilio) `media` frame.
#[derive(Clone, Debug)]
pub struct OutMedia {
    pub at: Instant,
    /// Index in `TwilioLog::frames`.
    pub frame_index: usize,
    pub payload: String,
    pub bytes: Vec<u8>,
}

/// One outbound `mark` frame.
#[derive(Clone, Debug)]
pub struct OutMark {
    pub at: Instant,
    pub frame_index: usize,
    pub name: String,
}

/// A mark this fake echoed back to the Worker.
#[derive(Clone, Debug)]
pub struct Echo {
    pub at: Instant,
    pub name: String,
    /// true: all audio queued before it played; false: flushed by a `clear`.
    pub played: bool,
    /// Total audio played on this stream when echoed, in ms.
    pub played_ms: f64,
}

/// One outbound `clear` frame and what it did to the playback queue.
#[derive(Clone, Debug)]
pub struct Clear {
    pub at: Instant,
    pub frame_index: usize,
    pub played_ms: f64,
    pub flushed_marks: Vec<String>,
    pub discarded_bytes: u64,
}

/// How the media stream socket ended.
#[derive(Clone, Debug)]
pub struct SocketClosed {
    pub at: Instant,
    pub close_frame: Option<(u16, String)>,
    pub error: Option<String>,
}

/// Everything seen on one media stream.
#[derive(Clone, Debug, Default)]
pub struct TwilioLog {
    /// Every frame the Worker sent, parsed (non-JSON text as `Value::String`), in order.
    pub frames: Vec<(Instant, Value)>,
    pub media: Vec<OutMedia>,
    pub marks: Vec<OutMark>,
    pub clears: Vec<Clear>,
    pub echoes: Vec<Echo>,
    /// Every frame this fake sent, in order (with `sequenceNumber`s filled in).
    pub sent: Vec<(Instant, Value)>,
    /// Protocol violations noticed (wrong streamSid, unknown event, bad base64, …).
    pub problems: Vec<String>,
    pub closed: Option<SocketClosed>,
}

impl TwilioLog {
    /// All outbound audio bytes, concatenated in order.
    pub fn media_bytes(&self) -> Vec<u8> {
        self.media
            .iter()
            .flat_map(|m| m.bytes.iter().copied())
            .collect()
    }

    pub fn played_echoes(&self) -> usize {
        self.echoes.iter().filter(|e| e.played).count()
    }

    pub fn event_names(&self) -> Vec<String> {
        self.frames
            .iter()
            .map(|(_, f)| f["event"].as_str().unwrap_or("?").to_string())
            .collect()
    }
}

enum Out {
    /// A frame; the writer fills in `sequenceNumber` (except for `connected`).
    Frame(Value),
    Close,
}

struct StreamShared {
    log: Mutex<TwilioLog>,
    changed: watch::Sender<u64>,
    stream_sid: Mutex<Option<String>>,
    /// Next media `chunk` number (starts at 1).
    next_chunk: AtomicU64,
    clock: Mutex<MediaClock>,
    /// The socket's reader and writer tasks (aborting both drops the TCP connection).
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

/// Twilio's media clock, which stamps each `media` frame (`timestamp`, ms from the stream's
/// start). Twilio's audio runs on whether or not a test sends frames: frames sent back to back
/// (paced in real time, or in a burst) continue the clock, and a frame sent after a pause is
/// stamped at its time, as if the frames of the pause had been lost.
#[derive(Default)]
struct MediaClock {
    /// The `start` (or, without one, the first `media`).
    started: Option<Instant>,
    /// The stamp of the next frame if it comes on time.
    next_ms: u64,
}

impl MediaClock {
    /// A frame sent later than this after the previous one's end marks a pause.
    const PAUSE: Duration = Duration::from_millis(100);

    /// The stamp for a frame of `len` bytes sent at `at`; `stamp` when the sender gives one.
    fn stamp(&mut self, at: Instant, len: usize, stamp: Option<u64>) -> u64 {
        let started = *self.started.get_or_insert(at);
        let now = at.saturating_duration_since(started).as_millis() as u64;
        let stamp = stamp.unwrap_or(if now > self.next_ms + Self::PAUSE.as_millis() as u64 {
            now
        } else {
            self.next_ms
        });
        self.next_ms = self.next_ms.max(stamp + len as u64 / BYTES_PER_MS);
        stamp
    }
}

impl StreamShared {
    fn update<T>(&self, f: impl FnOnce(&mut TwilioLog) -> T) -> T {
        let t = f(&mut self.log.lock().unwrap());
        self.changed.send_modify(|v| *v += 1);
        t
    }
}

/// The fake Twilio end of one media stream. Cheap to clone.
#[derive(Clone)]
pub struct MediaStream {
    out: mpsc::UnboundedSender<Out>,
    shared: Arc<StreamShared>,
}

impl MediaStream {
    /// Open the media stream WebSocket to `url`, sending `X-Twilio-Signature: signature` when given.
    pub async fn connect(url: &str, signature: Option<&str>) -> Result<MediaStream, ConnectError> {
        let mut req = url
            .into_client_request()
            .map_err(|e| ConnectError::Other(format!("bad url {url}: {e}")))?;
        if let Some(sig) = signature {
            req.headers_mut().insert(
                "X-Twilio-Signature",
                HeaderValue::from_str(sig).map_err(|e| ConnectError::Other(e.to_string()))?,
            );
        }
        let connect = tokio_tungstenite::connect_async(req);
        let (ws, _resp) = match tokio::time::timeout(Duration::from_secs(60), connect).await {
            Err(_) => return Err(ConnectError::Other("WebSocket upgrade timed out".into())),
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => {
                let body = resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                return Err(ConnectError::Refused {
                    status: resp.status().as_u16(),
                    body,
                });
            }
            Ok(Err(e)) => return Err(ConnectError::Other(e.to_string())),
            Ok(Ok(x)) => x,
        };
        let shared = Arc::new(StreamShared {
            log: Mutex::new(TwilioLog::default()),
            changed: watch::channel(0).0,
            stream_sid: Mutex::new(None),
            next_chunk: AtomicU64::new(1),
            clock: Mutex::new(MediaClock::default()),
            tasks: Mutex::new(Vec::new()),
        });
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (sink, stream) = ws.split();
        let w = tokio::spawn(write_loop(sink, out_rx, shared.clone()));
        let r = tokio::spawn(read_loop(stream, out_tx.clone(), shared.clone()));
        *shared.tasks.lock().unwrap() = vec![w.abort_handle(), r.abort_handle()];
        Ok(MediaStream {
            out: out_tx,
            shared,
        })
    }

    pub fn send_raw(&self, frame: Value) {
        let _ = self.out.send(Out::Frame(frame));
    }

    pub fn send_connected(&self) {
        self.send_raw(json!({"event": "connected", "protocol": "Call", "version": "1.0.0"}));
    }

    /// `start` with the given ids and `<Parameter>`s (as `customParameters`).
    pub fn send_start(&self, ids: &CallIds, custom_parameters: &[(String, String)]) {
        *self.shared.stream_sid.lock().unwrap() = Some(ids.stream_sid.clone());
        self.shared
            .clock
            .lock()
            .unwrap()
            .started
            .get_or_insert_with(Instant::now);
        let custom: serde_json::Map<String, Value> = custom_parameters
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        self.send_raw(json!({
            "event": "start",
            "start": {
                "accountSid": ids.account_sid,
                "streamSid": ids.stream_sid,
                "callSid": ids.call_sid,
                "tracks": ["inbound"],
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                "customParameters": custom,
            },
            "streamSid": ids.stream_sid,
        }));
    }

    fn stream_sid(&self) -> String {
        self.shared
            .stream_sid
            .lock()
            .unwrap()
            .clone()
            .unwrap_or_default()
    }

    /// One inbound `media` frame, stamped by the media clock; returns the base64 payload sent.
    pub fn send_media(&self, audio: &[u8]) -> String {
        self.send_frame(audio, None).0
    }

    /// One inbound `media` frame stamped `stamp` ms into the stream (by the media clock when
    /// `None`); returns the base64 payload sent, its stamp and its `chunk` number.
    fn send_frame(&self, audio: &[u8], stamp: Option<u64>) -> (String, u64, u64) {
        let chunk = self.shared.next_chunk.fetch_add(1, Ordering::SeqCst);
        let stamp = self
            .shared
            .clock
            .lock()
            .unwrap()
            .stamp(Instant::now(), audio.len(), stamp);
        let payload = b64(audio);
        self.send_raw(json!({
            "event": "media",
            "media": {
                "track": "inbound",
                "chunk": chunk.to_string(),
                "timestamp": stamp.to_string(),
                "payload": payload,
            },
            "streamSid": self.stream_sid(),
        }));
        (payload, stamp, chunk)
    }

    /// Send `audio` as 20 ms frames (160 bytes; the last may be shorter) paced in real time,
    /// the first at once. The task returns the payloads sent, in order.
    pub fn play_caller_audio(&self, audio: Vec<u8>) -> JoinHandle<Vec<String>> {
        self.play_caller_audio_held(audio, Duration::ZERO..Duration::ZERO)
    }

    /// [`MediaStream::play_caller_audio`] through a network that stalls: the frames due in
    /// `held` (from the first frame) are held back and sent at once at its end, stamped as
    /// when they were spoken, as TCP delivers them after a stall. The task returns the
    /// payloads sent, in order.
    pub fn play_caller_audio_held(
        &self,
        audio: Vec<u8>,
        held: std::ops::Range<Duration>,
    ) -> JoinHandle<Vec<String>> {
        let me = self.clone();
        tokio::spawn(async move {
            let t0 = tokio::time::Instant::now();
            let mut sent = Vec::new();
            let mut first_stamp = None;
            for (i, frame) in audio.chunks(FRAME_BYTES).enumerate() {
                let mut due = Duration::from_millis(20 * i as u64);
                if held.contains(&due) {
                    due = held.end;
                }
                tokio::time::sleep_until(t0 + due).await;
                let stamp = first_stamp.map(|s: u64| s + 20 * i as u64);
                let (payload, stamp, _) = me.send_frame(frame, stamp);
                first_stamp.get_or_insert(stamp);
                sent.push(payload);
            }
            sent
        })
    }

    /// [`MediaStream::play_caller_audio`], with some frames delivered twice: after frame
    /// `i` (by index, from 0) of each `(i, again)`, the frames `again` (sent already) go
    /// once more exactly as they went (the same `sequenceNumber`, `chunk`, `timestamp` and
    /// payload). The task returns the payloads of the frames sent once, in order.
    pub fn play_caller_audio_again(
        &self,
        audio: Vec<u8>,
        replays: Vec<(usize, std::ops::RangeInclusive<usize>)>,
    ) -> JoinHandle<Vec<String>> {
        let me = self.clone();
        tokio::spawn(async move {
            let t0 = tokio::time::Instant::now();
            let mut sent = Vec::new();
            let mut chunks = Vec::new();
            let mut first_stamp = None;
            for (i, frame) in audio.chunks(FRAME_BYTES).enumerate() {
                tokio::time::sleep_until(t0 + Duration::from_millis(20 * i as u64)).await;
                let stamp = first_stamp.map(|s: u64| s + 20 * i as u64);
                let (payload, stamp, chunk) = me.send_frame(frame, stamp);
                first_stamp.get_or_insert(stamp);
                sent.push(payload);
                chunks.push(chunk.to_string());
                for (_, again) in replays.iter().filter(|(after, _)| *after == i) {
                    for j in again.clone() {
                        let frame = me.sent_media(&chunks[j]).await;
                        me.send_raw(frame);
                    }
                }
            }
            sent
        })
    }

    /// The `media` frame with this `chunk` as it went out (waits for the writer to send it).
    async fn sent_media(&self, chunk: &str) -> Value {
        loop {
            let found = self
                .shared
                .log
                .lock()
                .unwrap()
                .sent
                .iter()
                .find_map(|(_, f)| {
                    (f["event"] == "media" && f["media"]["chunk"] == chunk).then(|| f.clone())
                });
            if let Some(frame) = found {
                return frame;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    pub fn send_stop(&self, ids: &CallIds) {
        self.send_raw(json!({
            "event": "stop",
            "stop": {"accountSid": ids.account_sid, "callSid": ids.call_sid},
            "streamSid": ids.stream_sid,
        }));
    }

    /// Drop the TCP connection without a close handshake (a lost connection).
    pub fn abort(&self) {
        for t in self.shared.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    /// Close the WebSocket (a normal close frame).
    pub fn close(&self) {
        let _ = self.out.send(Out::Close);
    }

    pub fn log(&self) -> TwilioLog {
        self.shared.log.lock().unwrap().clone()
    }

    /// Wait until `check` returns `Some` on the log (checked at once and after every change).
    pub async fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&TwilioLog) -> Option<T>,
    ) -> Result<T, String> {
        let mut rx = self.shared.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            {
                let log = self.shared.log.lock().unwrap();
                rx.borrow_and_update();
                if let Some(t) = check(&log) {
                    return Ok(t);
                }
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                let log = self.log();
                return Err(format!(
                    "Twilio stream: timed out after {timeout:?} waiting for {what}; frames from the Worker: {:?}; \
                     echoes: {}; problems: {:?}; closed: {:?}",
                    collapse(&log.event_names()),
                    log.echoes.len(),
                    log.problems,
                    log.closed
                ));
            }
        }
    }
}

fn collapse(names: &[String]) -> Vec<String> {
    let mut out: Vec<(String, usize)> = Vec::new();
    for n in names {
        match out.last_mut() {
            Some((last, k)) if last == n => *k += 1,
            _ => out.push((n.clone(), 1)),
        }
    }
    out.into_iter()
        .map(|(n, k)| if k > 1 { format!("{n} ×{k}") } else { n })
        .collect()
}

async fn write_loop<S>(mut sink: S, mut rx: mpsc::UnboundedReceiver<Out>, shared: Arc<StreamShared>)
where
    S: futures::Sink<Message> + Unpin,
    S::Error: std::fmt::Display,
{
    let mut seq: u64 = 0;
    while let Some(out) = rx.recv().await {
        match out {
            Out::Frame(mut frame) => {
                if frame["event"] != "connected" && frame.get("sequenceNumber").is_none() {
                    seq += 1;
                    frame["sequenceNumber"] = json!(seq.to_string());
                }
                let text = frame.to_string();
                shared.update(|log| log.sent.push((Instant::now(), frame)));
                if let Err(e) = sink.send(Message::text(text)).await {
                    shared.update(|log| log.problems.push(format!("send failed: {e}")));
                    break;
                }
            }
            Out::Close => {
                let _ = sink.send(Message::Close(None)).await;
            }
        }
    }
}

enum Queued {
    Audio(u64),
    Mark(String),
}

/// Twilio's playback buffer, played in real time.
struct Player {
    queue: VecDeque<Queued>,
    /// When the audio at the head of the queue started playing.
    head_started: Option<Instant>,
    played_bytes: u64,
}

fn audio_duration(bytes: u64) -> Duration {
    Duration::from_micros(bytes * 1000 / BYTES_PER_MS)
}

impl Player {
    fn new() -> Player {
        Player {
            queue: VecDeque::new(),
            head_started: None,
            played_bytes: 0,
        }
    }

    /// Play up to `now`; returns the marks reached, with the bytes played at that point.
    fn advance(&mut self, now: Instant) -> Vec<(String, u64)> {
        let mut reached = Vec::new();
        loop {
            match self.queue.front() {
                None => {
                    self.head_started = None;
                    break;
                }
                Some(Queued::Mark(_)) => {
                    if let Some(Queued::Mark(name)) = self.queue.pop_front() {
                        reached.push((name, self.played_bytes));
                    }
                }
                Some(Queued::Audio(len)) => {
                    let start = *self.head_started.get_or_insert(now);
                    let end = start + audio_duration(*len);
                    if end <= now {
                        self.played_bytes += len;
                        self.queue.pop_front();
                        self.head_started = Some(end);
                    } else {
                        break;
                    }
                }
            }
        }
        if self.queue.is_empty() {
            self.head_started = None;
        }
        reached
    }

    fn next_deadline(&self) -> Option<Instant> {
        match (self.queue.front(), self.head_started) {
            (Some(Queued::Audio(len)), Some(start)) => Some(start + audio_duration(*len)),
            _ => None,
        }
    }

    /// Bytes played including the partly played head.
    fn played_bytes_at(&self, now: Instant) -> u64 {
        let partial = match (self.queue.front(), self.head_started) {
            (Some(Queued::Audio(len)), Some(start)) => {
                let us = now.saturating_duration_since(start).as_micros() as u64;
                (us * BYTES_PER_MS / 1000).min(*len)
            }
            _ => 0,
        };
        self.played_bytes + partial
    }

    /// Empty the queue; returns (flushed marks, discarded bytes).
    fn clear(&mut self, now: Instant) -> (Vec<String>, u64) {
        let played_total = self.played_bytes_at(now);
        let mut queued = 0;
        let mut marks = Vec::new();
        for q in self.queue.drain(..) {
            match q {
                Queued::Audio(n) => queued += n,
                Queued::Mark(m) => marks.push(m),
            }
        }
        let discarded = queued - (played_total - self.played_bytes);
        self.played_bytes = played_total;
        self.head_started = None;
        (marks, discarded)
    }
}

async fn read_loop<S>(mut stream: S, out: mpsc::UnboundedSender<Out>, shared: Arc<StreamShared>)
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let mut player = Player::new();
    let echo = |name: String, played: bool, played_ms: f64, at: Instant| {
        let sid = shared
            .stream_sid
            .lock()
            .unwrap()
            .clone()
            .unwrap_or_default();
        let _ = out.send(Out::Frame(json!({
            "event": "mark",
            "streamSid": sid,
            "mark": {"name": name},
        })));
        shared.update(|log| {
            log.echoes.push(Echo {
                at,
                name,
                played,
                played_ms,
            })
        });
    };
    let flush_reached = |player: &mut Player, now: Instant| {
        for (name, played_bytes) in player.advance(now) {
            echo(
                name,
                true,
                played_bytes as f64 / BYTES_PER_MS as f64,
                Instant::now(),
            );
        }
    };

    loop {
        let deadline = player.next_deadline();
        let msg = tokio::select! {
            msg = stream.next() => msg,
            _ = tokio::time::sleep_until(deadline.map(tokio::time::Instant::from_std).unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                flush_reached(&mut player, Instant::now());
                continue;
            }
        };
        let now = Instant::now();
        let text = match msg {
            Some(Ok(Message::Text(t))) => t.as_str().to_string(),
            Some(Ok(Message::Binary(b))) => {
                shared.update(|log| {
                    log.problems
                        .push(format!("binary frame of {} bytes", b.len()))
                });
                continue;
            }
            Some(Ok(Message::Close(frame))) => {
                let cf = frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                shared.update(|log| {
                    log.closed.get_or_insert(SocketClosed {
                        at: now,
                        close_frame: cf.or(Some((1005, String::new()))),
                        error: None,
                    });
                });
                continue;
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                shared.update(|log| {
                    log.closed.get_or_insert(SocketClosed {
                        at: now,
                        close_frame: None,
                        error: Some(e.to_string()),
                    });
                });
                break;
            }
            None => {
                shared.update(|log| {
                    log.closed.get_or_insert(SocketClosed {
                        at: now,
                        close_frame: None,
                        error: None,
                    });
                });
                break;
            }
        };
        // Play what finished before this frame arrived, then apply the frame.
        flush_reached(&mut player, now);
        let frame: Value = match serde_json::from_str(&text) {
            Ok(v) => v,
            Err(_) => {
                shared.update(|log| {
                    log.problems.push(format!("non-JSON frame: {text}"));
                    log.frames.push((now, Value::String(text)));
                });
                continue;
            }
        };
        let expected_sid = shared.stream_sid.lock().unwrap().clone();
        let sid_ok = frame["streamSid"].as_str().map(str::to_string) == expected_sid;
        let event = frame["event"].as_str().unwrap_or("").to_string();
        let frame_index = shared.update(|log| {
            if !sid_ok {
                log.problems.push(format!(
                    "{event} frame with streamSid {} (expected {:?})",
                    frame["streamSid"], expected_sid
                ));
            }
            log.frames.push((now, frame.clone()));
            log.frames.len() - 1
        });
        match event.as_str() {
            "media" => {
                let payload = frame["media"]["payload"].as_str().unwrap_or("").to_string();
                match unb64(&payload) {
                    Some(bytes) => {
                        player.queue.push_back(Queued::Audio(bytes.len() as u64));
                        shared.update(|log| {
                            log.media.push(OutMedia {
                                at: now,
                                frame_index,
                                payload,
                                bytes,
                            })
                        });
                    }
                    None => shared.update(|log| {
                        log.problems
                            .push(format!("media payload is not base64: {payload}"))
                    }),
                }
            }
            "mark" => {
                let name = frame["mark"]["name"].as_str().unwrap_or("").to_string();
                player.queue.push_back(Queued::Mark(name.clone()));
                shared.update(|log| {
                    log.marks.push(OutMark {
                        at: now,
                        frame_index,
                        name,
                    })
                });
            }
            "clear" => {
                let (marks, discarded) = player.clear(now);
                let played_ms = player.played_bytes as f64 / BYTES_PER_MS as f64;
                shared.update(|log| {
                    log.clears.push(Clear {
                        at: now,
                        frame_index,
                        played_ms,
                        flushed_marks: marks.clone(),
                        discarded_bytes: discarded,
                    })
                });
                for m in marks {
                    echo(m, false, played_ms, Instant::now());
                }
            }
            other => shared.update(|log| {
                log.problems
                    .push(format!("unexpected event {other:?} from the Worker"))
            }),
        }
        // Starts playing newly queued audio now; echoes a mark queued behind nothing.
        flush_reached(&mut player, now);
    }
}

// Checks of the fake itself (no Worker needed).
#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn fake_twilio_stamps_frames_on_its_media_clock() {
        let t0 = Instant::now();
        let mut clock = MediaClock {
            started: Some(t0),
            ..MediaClock::default()
        };
        // Paced (a little late, as timers are) or in a burst: the clock runs on.
        assert_eq!(clock.stamp(t0 + ms(3), 160, None), 0);
        assert_eq!(clock.stamp(t0 + ms(25), 160, None), 20);
        assert_eq!(clock.stamp(t0 + ms(25), 160, None), 40);
        assert_eq!(clock.stamp(t0 + ms(26), 80, None), 60);
        // After a pause, the frame is stamped at its time.
        assert_eq!(clock.stamp(t0 + ms(500), 160, None), 500);
        assert_eq!(clock.stamp(t0 + ms(521), 160, None), 520);
        // A stamp given is used, and the clock goes on from the latest.
        assert_eq!(clock.stamp(t0 + ms(900), 160, Some(540)), 540);
        assert_eq!(clock.stamp(t0 + ms(900), 160, Some(400)), 400);
        assert_eq!(clock.stamp(t0 + ms(905), 160, None), 905);
        assert_eq!(clock.stamp(t0 + ms(906), 160, None), 925);
    }

    #[test]
    fn fake_twilio_plays_in_real_time_and_echoes_marks_after_their_audio() {
        let t0 = Instant::now();
        let mut p = Player::new();
        p.queue.push_back(Queued::Audio(1600));
        p.queue.push_back(Queued::Mark("a".into()));
        p.queue.push_back(Queued::Audio(800));
        p.queue.push_back(Queued::Mark("b".into()));
        assert!(p.advance(t0).is_empty());
        assert_eq!(p.next_deadline(), Some(t0 + ms(200)));
        assert!(p.advance(t0 + ms(199)).is_empty());
        assert_eq!(p.advance(t0 + ms(200)), vec![("a".to_string(), 1600)]);
        assert_eq!(p.played_bytes_at(t0 + ms(250)), 2000);
        // A late wake-up still plays on the audio's own clock.
        assert_eq!(p.advance(t0 + ms(400)), vec![("b".to_string(), 2400)]);
        assert_eq!(p.next_deadline(), None);
        // A mark behind nothing is echoed at once.
        p.queue.push_back(Queued::Mark("c".into()));
        assert_eq!(p.advance(t0 + ms(500)), vec![("c".to_string(), 2400)]);
    }

    #[test]
    fn fake_twilio_clear_flushes_pending_marks_and_keeps_what_played() {
        let t0 = Instant::now();
        let mut p = Player::new();
        for name in ["a", "b", "c"] {
            p.queue.push_back(Queued::Audio(1600));
            p.queue.push_back(Queued::Mark(name.into()));
        }
        p.advance(t0);
        assert_eq!(p.advance(t0 + ms(250)), vec![("a".to_string(), 1600)]);
        let (marks, discarded) = p.clear(t0 + ms(250));
        assert_eq!(marks, vec!["b".to_string(), "c".to_string()]);
        assert_eq!(discarded, 3 * 1600 - 2000);
        assert_eq!(p.played_bytes, 2000);
        assert!(p.queue.is_empty() && p.next_deadline().is_none());
    }

    #[test]
    fn fake_twilio_writes_rfc2822_timestamps() {
        assert_eq!(rfc2822(0), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(rfc2822(951_782_400), "Tue, 29 Feb 2000 00:00:00 +0000");
        assert_eq!(rfc2822(1_795_311_122), "Sun, 22 Nov 2026 01:32:02 +0000");
    }

    #[test]
    fn fake_twilio_parses_twiml_and_unescapes_attributes() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url="ws://h/p/CA1"><Parameter name="From" value="a&amp;b &lt;&quot;c&apos;&gt;"/></Stream></Connect></Response>"#;
        let t = parse_twiml(xml).unwrap();
        assert_eq!(t.stream_url, "ws://h/p/CA1");
        assert_eq!(t.parameter("From"), Some(r#"a&b <"c'>"#));
        assert!(parse_twiml("<Response><Say>hi</Say></Response>").is_err());
        assert!(parse_twiml(r#"<Response><Connect><Stream url="x"><Parameter name="a" value="<"/></Stream></Connect></Response>"#).is_err());
    }
}
