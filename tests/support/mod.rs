//! Harness for the end-to-end tests: the real Worker in `wrangler dev` between a fake Twilio
//! and a fake OpenAI Realtime server, both speaking over real sockets on 127.0.0.1.
//!
//! One Worker and one fake OpenAI are shared by all tests of a binary ([`harness`]); each test
//! uses its own CallSid, and claims "its" OpenAI session (see `fake_openai::FakeOpenAi::claim`).

#![allow(dead_code)]

pub mod admin;
pub mod fake_openai;
pub mod fake_twilio;
pub mod fake_twilio_rest;
pub mod local_http;
pub mod tool_server;
pub mod wav;
pub mod worker;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fake_openai::{FakeOpenAi, Session, SessionScript};
use fake_twilio::{CallIds, MediaStream, Twiml};
use tokio::task::JoinHandle;
use worker::{WorkerConfig, WorkerProcess};

/// Recognizable fake secrets: they must never show up in the Worker's log.
pub const OPENAI_API_KEY: &str = "sk-test-e2e-SECRET-123";
pub const TWILIO_AUTH_TOKEN: &str = "twilio-e2e-token-SECRET-456";
pub const OPENAI_MODEL: &str = "gpt-realtime";

/// Generous bound for anything that should happen "soon" (shared, noisy 2-core machines).
pub const SOON: Duration = Duration::from_secs(30);

/// The shared Worker and fake OpenAI.
pub struct Harness {
    pub worker: WorkerProcess,
    pub openai: FakeOpenAi,
}

/// A runtime that outlives every `#[tokio::test]` runtime, for the servers the tests share.
pub fn background_runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("e2e-fake-openai")
            .enable_all()
            .build()
            .expect("background runtime")
    })
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh scratch directory for one Worker's log and state, named after `label`.
pub fn scratch_dir(label: &str) -> PathBuf {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis();
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{label}-{}-{stamp}", std::process::id()))
}

/// Start (once per test binary) the fake OpenAI and the Worker; later callers wait for the
/// first one and share the result, including a failure.
pub async fn harness() -> &'static Harness {
    static HARNESS: tokio::sync::OnceCell<Result<Harness, String>> =
        tokio::sync::OnceCell::const_new();
    shared_harness(&HARNESS, "e2e-bridge", Vec::new).await
}

/// The Worker a test binary shares, kept in `cell`: started (labelled `label`, with `vars`)
/// by the first caller; later callers wait for it and share the result, failure included.
pub async fn shared_harness(
    cell: &'static tokio::sync::OnceCell<Result<Harness, String>>,
    label: &str,
    vars: impl FnOnce() -> Vec<(String, String)>,
) -> &'static Harness {
    let h = cell.get_or_init(|| Harness::start(label, vars())).await;
    match h {
        Ok(h) => h,
        Err(e) => panic!("the Worker under test ({label}) did not start:\n{e}"),
    }
}

/// One call in progress: Twilio's side and the OpenAI session the Worker opened for it.
pub struct Call {
    pub ids: CallIds,
    pub from: String,
    pub to: String,
    pub twiml: Twiml,
    pub twilio: MediaStream,
    pub openai: Arc<Session>,
    /// When the test handed Twilio's `start` frame to the stream (the Worker receives it later).
    pub start_sent_at: Instant,
    /// The caller-audio task when `CallSpec::caller_audio` was given (returns the payloads sent).
    pub caller_audio: Option<JoinHandle<Vec<String>>>,
}

/// How to start a call.
pub struct CallSpec {
    pub from: String,
    pub to: String,
    pub script: SessionScript,
    /// Audio the caller starts sending (paced, 20 ms frames) right after `start`, before the
    /// Worker's OpenAI session is up.
    pub caller_audio: Option<Vec<u8>>,
}

impl Default for CallSpec {
    fn default() -> Self {
        CallSpec {
            from: "+15551230001".into(),
            to: "+81312345678".into(),
            script: SessionScript::new(),
            caller_audio: None,
        }
    }
}

impl Harness {
    /// Start a fake OpenAI and a Worker wired to it (the fake secrets, the fake's URL, the
    /// model), plus `extra_vars` (e.g. `ADMIN_TOKEN`, `FAULT_INJECT_D1_FAILURES`; one that
    /// names a variable already set replaces it), with its own scratch directory (log and
    /// local D1 state) named after `label`.
    pub async fn start(label: &str, extra_vars: Vec<(String, String)>) -> Result<Harness, String> {
        Harness::start_from(scratch_dir(label), repo_root(), extra_vars).await
    }

    /// Like [`Harness::start`], but `wrangler dev` serves the Worker in `root` (a
    /// `worker::Deployment`, say) and keeps its log and state in `scratch_dir`.
    pub async fn start_from(
        scratch_dir: PathBuf,
        root: PathBuf,
        extra_vars: Vec<(String, String)>,
    ) -> Result<Harness, String> {
        let openai = FakeOpenAi::start(background_runtime());
        let mut vars = vec![
            ("OPENAI_API_KEY".into(), OPENAI_API_KEY.into()),
            ("TWILIO_AUTH_TOKEN".into(), TWILIO_AUTH_TOKEN.into()),
            ("OPENAI_REALTIME_URL".into(), openai.realtime_url()),
            ("OPENAI_MODEL".into(), OPENAI_MODEL.into()),
            // Each caller frame goes on as it comes, so that a test can wait for the append
            // of the frame it sent (see `e2e_persistence::sync_twilio`). The default, 40 ms
            // at a time, has its own test (`e2e_bridge`, `chunked_harness`): give this an
            // empty value for it.
            ("CALLER_AUDIO_CHUNK_MS".into(), "20".into()),
            // The Realtime socket is opened when the stream comes, not at the webhook: the
            // fake hands the session it scripts to whichever connection comes during a
            // claim, and tests post webhooks without one. The default (the socket opened at
            // the webhook) has its own tests (`e2e_bridge`, `preopen_harness`), which claim
            // before they post: give this an empty value for it.
            ("OPENAI_PREOPEN_SECONDS".into(), "0".into()),
        ];
        vars.retain(|(name, _)| !extra_vars.iter().any(|(extra, _)| extra == name));
        vars.extend(extra_vars);
        let cfg = WorkerConfig {
            root,
            vars,
            scratch_dir,
        };
        let worker = WorkerProcess::start(cfg).await?;
        Ok(Harness { worker, openai })
    }

    pub fn base_url(&self) -> String {
        self.worker.base_url()
    }

    /// None of `secrets` appears anywhere in the Worker's log so far (and the log is not
    /// simply empty).
    pub fn assert_log_clean(&self, secrets: &[&str]) {
        let log = self.worker.log();
        assert!(
            log.contains("Ready on"),
            "the captured log looks empty:\n{log}"
        );
        for secret in secrets {
            let lines: Vec<&str> = log.lines().filter(|l| l.contains(secret)).collect();
            assert!(
                lines.is_empty(),
                "{secret:?} appears in the Worker log ({}):\n{}",
                self.worker.log_path.display(),
                lines.join("\n")
            );
        }
    }

    pub fn voice_url(&self) -> String {
        format!("{}/api/twilio/voice", self.base_url())
    }

    pub fn status_url(&self) -> String {
        format!("{}/api/twilio/status", self.base_url())
    }

    pub fn transfer_result_url(&self) -> String {
        format!("{}/api/twilio/transfer-result", self.base_url())
    }

    /// Post what Twilio asks a transfer's `<Dial action>` once the person's line has ended,
    /// signed as Twilio signs it.
    pub async fn post_transfer_result(
        &self,
        params: &[(String, String)],
    ) -> fake_twilio::HttpReply {
        let url = self.transfer_result_url();
        let sig = fake_twilio::sign(TWILIO_AUTH_TOKEN, &url, params);
        fake_twilio::post_form(&url, params, Some(&sig))
            .await
            .unwrap_or_else(|e| panic!("transfer result: {e}"))
    }

    /// Post Twilio's status callback with these form `params`, signed over the exact URL and
    /// params (as Twilio does).
    pub async fn post_status(&self, params: &[(String, String)]) -> fake_twilio::HttpReply {
        let url = self.status_url();
        let sig = fake_twilio::sign(TWILIO_AUTH_TOKEN, &url, params);
        fake_twilio::post_form(&url, params, Some(&sig))
            .await
            .unwrap_or_else(|e| panic!("status callback: {e}"))
    }

    /// The Stream url the Worker is expected to put in its TwiML for this call.
    pub fn expected_stream_url(&self, call_sid: &str) -> String {
        format!(
            "ws://127.0.0.1:{}/api/twilio/media-stream/{call_sid}",
            self.worker.port
        )
    }

    /// Post the signed voice webhook for a new call, as Twilio does; the Worker's answer.
    pub async fn post_voice(&self, ids: &CallIds, from: &str, to: &str) -> fake_twilio::HttpReply {
        let params = fake_twilio::voice_params(ids, from, to);
        let url = self.voice_url();
        let sig = fake_twilio::sign(TWILIO_AUTH_TOKEN, &url, &params);
        fake_twilio::post_form(&url, &params, Some(&sig))
            .await
            .unwrap_or_else(|e| panic!("voice webhook: {e}"))
    }

    /// Post the signed voice webhook for a new call and parse the TwiML (asserting 200).
    pub async fn answer_call(&self, ids: &CallIds, from: &str, to: &str) -> Twiml {
        let reply = self.post_voice(ids, from, to).await;
        assert_eq!(
            reply.status,
            200,
            "signed voice webhook for {} answered {}: {}\nWorker log tail:\n{}",
            ids.call_sid,
            reply.status,
            reply.body,
            self.worker.log_tail(40)
        );
        fake_twilio::parse_twiml(&reply.body).unwrap_or_else(|e| {
            panic!(
                "voice webhook answer is not the expected TwiML: {e}\n{}",
                reply.body
            )
        })
    }

    /// Open the signed media stream for `twiml`'s Stream url.
    pub async fn open_stream(&self, twiml: &Twiml) -> MediaStream {
        let sig = fake_twilio::sign(TWILIO_AUTH_TOKEN, &twiml.stream_url, &[]);
        match MediaStream::connect(&twiml.stream_url, Some(&sig)).await {
            Ok(s) => s,
            Err(e) => panic!(
                "media stream {} was not accepted: {e:?}\nWorker log tail:\n{}",
                twiml.stream_url,
                self.worker.log_tail(40)
            ),
        }
    }

    /// Webhook, media stream, `connected` + `start` (+ caller audio), and the OpenAI session
    /// the Worker opened for this call.
    pub async fn start_call(&self, spec: CallSpec) -> Call {
        let ids = CallIds::new();
        let twiml = self.answer_call(&ids, &spec.from, &spec.to).await;
        let claim = self.openai.claim(spec.script).await;
        let twilio = self.open_stream(&twiml).await;
        twilio.send_connected();
        let start_sent_at = Instant::now();
        twilio.send_start(&ids, &twiml.parameters);
        let caller_audio = spec.caller_audio.map(|a| twilio.play_caller_audio(a));
        let openai = match claim.session(SOON).await {
            Ok(s) => s,
            Err(e) => panic!("{e}\nWorker log tail:\n{}", self.worker.log_tail(40)),
        };
        Call {
            ids,
            from: spec.from,
            to: spec.to,
            twiml,
            twilio,
            openai,
            start_sent_at,
            caller_audio,
        }
    }
}

/// Sends `req` to the Worker, and once more should `wrangler dev` itself answer it with its
/// 503 ("Your worker restarted mid-request. Please try sending the request again"): its
/// runtime was restarted under the request. That answer is plain text; every 503 of the
/// Worker's own is JSON, and is returned as it came.
pub async fn send(req: reqwest::RequestBuilder) -> reqwest::Result<reqwest::Response> {
    let again = req.try_clone();
    let resp = req.send().await?;
    let from_wrangler = resp.status() == 503
        && !resp
            .headers()
            .get("content-type")
            .and_then(|t| t.to_str().ok())
            .is_some_and(|t| t.starts_with("application/json"));
    match again {
        Some(again) if from_wrangler => {
            eprintln!(
                "[e2e] {}: 503 from wrangler dev itself; sent again",
                resp.url()
            );
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            again.send().await
        }
        _ => Ok(resp),
    }
}

/// A log line (at `LOG_LEVEL=debug`) of a call object's outbox starting a write straight to
/// D1 of records it holds in memory.
fn direct_d1_write(line: &str) -> bool {
    line.contains(r#""outbox.d1_write""#) && line.contains(r#""from":"memory""#)
}

impl Harness {
    /// The writes straight to D1 the Worker's call objects have started so far (its
    /// `LOG_LEVEL` must be `debug`).
    pub fn direct_d1_writes(&self) -> usize {
        self.worker.count_lines(direct_d1_write)
    }

    /// Waits until more than `than` writes straight to D1 have started: `what` is under way.
    pub async fn direct_d1_write_started(&self, what: &str, than: usize) {
        self.worker
            .wait_for_more_lines(what, than, direct_d1_write)
            .await;
    }

    /// The call object's storage as `wrangler dev` keeps it: one SQLite file per object,
    /// named in `__miniflare_do_name`; its keys and values in `_cf_KV`, its alarm in
    /// `_cf_METADATA`.
    pub fn call_object_db(&self, call_sid: &str) -> rusqlite::Connection {
        let dir = self
            .worker
            .persist_dir
            .join("v3/do/phone-agent-bridge-CallSession");
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|x| x != "sqlite")
                || path.file_stem().is_some_and(|s| s == "metadata")
            {
                continue;
            }
            let db = rusqlite::Connection::open(&path).unwrap();
            let name: Option<String> = db
                .query_row("SELECT name FROM __miniflare_do_name", [], |r| r.get(0))
                .ok();
            if name.as_deref() == Some(call_sid) {
                return db;
            }
        }
        panic!(
            "no Durable Object storage for {call_sid} in {}",
            dir.display()
        )
    }

    /// The keys in the call object's storage, in order.
    pub fn call_object_keys(&self, call_sid: &str) -> Vec<String> {
        let db = self.call_object_db(call_sid);
        let mut keys = db.prepare("SELECT key FROM _cf_KV ORDER BY key").unwrap();
        let rows = keys.query_map([], |r| r.get::<_, String>(0)).unwrap();
        rows.map(|k| k.unwrap()).collect()
    }
}

/// `n` chunks of μ-law test audio of `len` bytes each; chunk `i` is recognizable: it starts
/// with `tag`, the chunk number (big-endian u16), and then a pattern that depends on both.
pub fn tagged_chunks(tag: u8, n: usize, len: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            (0..len)
                .map(|j| match j {
                    0 => tag,
                    1 => (i >> 8) as u8,
                    2 => i as u8,
                    _ => (tag as usize * 31 + i * 7 + j * 13) as u8,
                })
                .collect()
        })
        .collect()
}

/// Unwrap a wait result, adding the Worker's log tail to the failure message.
pub fn ok<T>(h: &Harness, r: Result<T, String>) -> T {
    match r {
        Ok(t) => t,
        Err(e) => panic!("{e}\nWorker log tail:\n{}", h.worker.log_tail(60)),
    }
}
