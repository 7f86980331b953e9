//! End-to-end tests of the call simulator (`npm run call -- --offline`): the real Worker in
//! `wrangler dev`, pointed at the simulator's stand-in Realtime server, gets a call placed
//! the way Twilio places it, with the Japanese caller sample. Checks that the call completes,
//! that the agent's audio written to the WAV is the stand-in's tones, and that the transcript
//! printed — live from the stand-in and as stored by the Worker — has the stand-in's lines.
//! The same with the caller on a microphone (`--mic`, here a stand-in capture command that
//! speaks the sample in real time) who hangs up with Ctrl-C, the agent heard on a speaker
//! command; the clear refusal when there is no microphone; and keypad presses (`--press`,
//! or keys typed during a microphone call) that make the stand-in call the agent's end_call
//! and transfer_call, which the Worker carries out through the simulator's Twilio REST API.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use support::admin::events_of;
use support::tool_server::{ToolAnswer, ToolServer};
use support::wav;
use support::worker::{free_port, WorkerConfig, WorkerProcess};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

const TWILIO_AUTH_TOKEN: &str = "twilio-sim-token-SECRET-111";
const ADMIN_TOKEN: &str = "admin-sim-token-SECRET-222";
const OPENAI_API_KEY: &str = "sk-sim-SECRET-333";

/// The stand-in's tones (scripts/sim/standin.mjs): greeting C-E-G, answer 440 + 880 Hz.
const STANDIN_TONES_HZ: [f64; 5] = [440.0, 523.0, 659.0, 784.0, 880.0];

/// Power of the `hz` component of `x` (Goertzel).
fn goertzel(x: &[i16], hz: f64, rate: f64) -> f64 {
    let coeff = 2.0 * (2.0 * std::f64::consts::PI * hz / rate).cos();
    let (mut s1, mut s2) = (0.0f64, 0.0f64);
    for &v in x {
        let s0 = v as f64 / 32768.0 + coeff * s1 - s2;
        s2 = s1;
        s1 = s0;
    }
    s1 * s1 + s2 * s2 - coeff * s1 * s2
}

/// True when the strongest component of `x` is one of the stand-in's tones, well above any
/// other frequency of the telephone band.
fn is_standin_tone(x: &[i16]) -> (bool, f64) {
    let tone = STANDIN_TONES_HZ
        .iter()
        .map(|&hz| goertzel(x, hz, 8000.0))
        .fold(0.0, f64::max);
    let other = (8..=152)
        .map(|i| i as f64 * 25.0)
        .filter(|f| STANDIN_TONES_HZ.iter().all(|t| (f - t).abs() > 60.0))
        .map(|hz| goertzel(x, hz, 8000.0))
        .fold(0.0, f64::max);
    let ratio = tone / other.max(1e-12);
    (ratio > 5.0, ratio)
}

/// At least `min_loud` loud 100 ms windows in `agent`, and they are the stand-in's tones. A
/// window that straddles the start or end of a tone (or a barge-in cut) smears its spectrum
/// (rectangular window), so a few of those may fall under the ratio: one in ten is allowed.
fn assert_standin_tones(what: &str, agent: &[i16], min_loud: usize) {
    let mut loud = 0;
    let mut not_tone = Vec::new();
    for w in agent.chunks(800) {
        let rms = (w.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / w.len() as f64).sqrt();
        if rms < 1000.0 || w.len() < 800 {
            continue;
        }
        loud += 1;
        let (ok, ratio) = is_standin_tone(w);
        if !ok {
            not_tone.push(format!("{ratio:.1}"));
        }
    }
    assert!(
        loud >= min_loud,
        "{what}: expected ≥ {min_loud} loud 100 ms windows of stand-in tones, found {loud}"
    );
    assert!(
        not_tone.len() * 10 <= loud,
        "{what}: {} of {loud} loud 100 ms windows are not stand-in tones (tone/other power {})",
        not_tone.len(),
        not_tone.join(", ")
    );
}

/// The samples of a 16-bit PCM mono WAV the simulator wrote, after checking its format.
fn mono_8k(path: &Path) -> Vec<i16> {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let (channels, rate, _, _, bits, _) = wav::parse_header(&b);
    assert_eq!((rate, channels, bits), (8000, 1, 16), "{}", path.display());
    wav::data(&b)
        .chunks_exact(2)
        .map(|c| i16::from_le_bytes([c[0], c[1]]))
        .collect()
}

/// The repository, with the simulator's sample and node packages in place.
fn checked_root() -> PathBuf {
    let root = support::repo_root();
    let sample = root.join("samples/caller-ja.wav");
    assert!(
        sample.is_file(),
        "{} is missing: run bash scripts/make-sample.sh",
        sample.display()
    );
    assert!(
        root.join("node_modules/ws/package.json").is_file(),
        "node_modules/ws is missing: run bash scripts/setup.sh"
    );
    root
}

/// The Worker in `wrangler dev`, pointed at a stand-in on `standin_port` for OpenAI and
/// Twilio's REST API alike (as `npm run dev:offline` starts it).
async fn start_worker(root: &Path, standin_port: u16, scratch: &Path) -> WorkerProcess {
    start_worker_with(root, standin_port, scratch, &[]).await
}

/// The same, with `extra` vars besides.
async fn start_worker_with(
    root: &Path,
    standin_port: u16,
    scratch: &Path,
    extra: &[(&str, &str)],
) -> WorkerProcess {
    let mut vars: Vec<(String, String)> = vec![
        ("OPENAI_API_KEY".into(), OPENAI_API_KEY.into()),
        ("TWILIO_AUTH_TOKEN".into(), TWILIO_AUTH_TOKEN.into()),
        ("ADMIN_TOKEN".into(), ADMIN_TOKEN.into()),
        (
            "OPENAI_REALTIME_URL".into(),
            format!("ws://127.0.0.1:{standin_port}/v1/realtime"),
        ),
        (
            "TWILIO_API_BASE_URL".into(),
            format!("http://127.0.0.1:{standin_port}/twilio"),
        ),
    ];
    vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    WorkerProcess::start(WorkerConfig {
        root: root.to_path_buf(),
        vars,
        scratch_dir: scratch.to_path_buf(),
    })
    .await
    .unwrap_or_else(|e| panic!("the Worker did not start:\n{e}"))
}

/// `node scripts/call.mjs ARGS`, with the Worker's secrets in its environment: they come
/// from --var, not from .dev.vars, and the environment wins over .dev.vars.
fn simulator(root: &Path, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("node");
    cmd.current_dir(root)
        .arg("scripts/call.mjs")
        .args(args)
        .env("TWILIO_AUTH_TOKEN", TWILIO_AUTH_TOKEN)
        .env("ADMIN_TOKEN", ADMIN_TOKEN)
        // Paths are the test's own: not relative to wherever `npm test` was started.
        .env_remove("INIT_CWD")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Seconds of caller audio the simulator sent, from its call summary.
fn caller_seconds_sent(stdout: &str) -> Option<f64> {
    stdout
        .lines()
        .find_map(|l| {
            let l = l.strip_prefix("call summary: ")?;
            l.split(" media frames sent").next()?.parse::<f64>().ok()
        })
        .map(|frames| frames * 0.02)
}

/// Each of `lines` is somewhere in what the simulator printed.
fn assert_said(stdout: &str, lines: &[&str], context: impl Fn() -> String) {
    for expected in lines {
        assert!(
            stdout.contains(expected),
            "no {expected:?} in:\n{}",
            context()
        );
    }
}

/// What the simulator printed, and the Worker's log, for a failure message.
fn context(output: &Output, worker: Option<&WorkerProcess>) -> String {
    format!(
        "--- simulator stdout ---\n{}\n--- stderr ---\n{}\n--- Worker log tail ---\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        worker.map(|w| w.log_tail(60)).unwrap_or_default()
    )
}

/// The lines printed live, before the summary, that come from the stand-in for `who`.
fn live_standin_lines<'a>(stdout: &'a str, who: &str) -> Vec<&'a str> {
    stdout
        .lines()
        .take_while(|l| !l.starts_with("call summary"))
        .filter(|l| l.contains(&format!("] {who} ")) && l.contains("[stand-in]"))
        .collect()
}

/// The stored call (as the simulator printed it from the admin API) ended with Twilio's
/// stop and holds the stand-in's greeting, its answer and the caller's turn.
fn assert_stored_call(stdout: &str, context: &dyn Fn() -> String) {
    assert!(
        stdout.contains("stored call record: status=completed end_reason=twilio_stop"),
        "the stored call should have ended by Twilio's stop:\n{}",
        context()
    );
    // What the call cost, as stored: the stand-in bills its transcriptions by time, as
    // whisper-1 does (the seconds of caller audio it heard).
    let transcribed_s = stdout
        .lines()
        .find_map(|l| {
            let l = l.trim().strip_prefix("tokens: session ")?;
            let (_, rest) = l.split_once(" out, ")?;
            rest.strip_suffix(" s of audio")?.parse::<f64>().ok()
        })
        .unwrap_or_else(|| panic!("no stored tokens printed:\n{}", context()));
    assert!(
        transcribed_s >= 1.0,
        "{transcribed_s} s transcribed:\n{}",
        context()
    );
    let stored = stdout
        .split("stored transcript (GET /api/admin/calls/")
        .nth(1)
        .unwrap_or_else(|| panic!("no stored transcript printed:\n{}", context()));
    let count = |who: &str| {
        stored
            .lines()
            .filter(|l| l.contains(&format!(" {who} ")) && l.contains("[stand-in]"))
            .count()
    };
    assert!(
        count("agent") >= 2 && count("caller") >= 1,
        "stored transcript should hold the stand-in's greeting, answer and the caller's turn:\n{}",
        context()
    );
}

/// One offline call from `audio` through the Worker at `url` (the simulator's stand-in on
/// `standin_port`), with `args` besides, however it ends; what the simulator printed.
async fn offline_run(
    root: &Path,
    url: &str,
    standin_port: u16,
    audio: &Path,
    args: &[&str],
) -> (Output, String) {
    let port = standin_port.to_string();
    let mut all = vec![
        "--offline",
        "--audio",
        audio.to_str().unwrap(),
        "--standin-port",
        &port,
        "--url",
        url,
    ];
    all.extend_from_slice(args);
    let run = simulator(root, &all).output();
    let output = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the simulator did not finish within 120 s")
        .expect("run node scripts/call.mjs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    (output, stdout)
}

/// One offline call from the sample through `worker` (the stand-in on `standin_port`), with
/// `args` besides; what the simulator printed. It must have succeeded.
async fn offline_call(
    root: &Path,
    worker: &WorkerProcess,
    standin_port: u16,
    args: &[&str],
) -> (Output, String) {
    let sample = root.join("samples/caller-ja.wav");
    let (output, stdout) = offline_run(root, &worker.base_url(), standin_port, &sample, args).await;
    assert!(
        output.status.success(),
        "the simulator failed ({}):\n{}",
        output.status,
        context(&output, Some(worker))
    );
    (output, stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulator_places_an_offline_call_through_the_worker() {
    let root = checked_root();
    let standin_port = free_port();
    let scratch = support::scratch_dir("e2e-simulator");
    let worker = start_worker(&root, standin_port, &scratch).await;

    let out = scratch.join("agent.wav");
    let recording = scratch.join("call.wav");
    let (output, stdout) = offline_call(
        &root,
        &worker,
        standin_port,
        &[
            "--out",
            out.to_str().unwrap(),
            "--recording",
            recording.to_str().unwrap(),
        ],
    )
    .await;
    let context = || context(&output, Some(&worker));

    // The call went the way a Twilio call goes, to its end.
    assert_said(
        &stdout,
        &[
            "TwiML: <Stream url=\"ws://127.0.0.1:",
            "the Worker connected to the stand-in",
            "in=audio/pcmu out=audio/pcmu",
            "caller starts speaking",
            "Twilio: stop (the caller hung up)",
        ],
        context,
    );

    // The live transcript: the stand-in's greeting and answer, and what it "heard".
    let agent_lines = live_standin_lines(&stdout, "agent");
    assert!(
        agent_lines.len() >= 2,
        "expected the greeting and an answer from the stand-in:\n{}",
        context()
    );
    assert!(
        agent_lines.iter().any(|l| l.contains("heard ")),
        "the stand-in should answer what it heard:\n{}",
        context()
    );
    assert!(
        !live_standin_lines(&stdout, "caller").is_empty(),
        "the caller's turn (the sample), as the stand-in transcribed it:\n{}",
        context()
    );
    assert_stored_call(&stdout, &context);

    // The agent's audio: 8 kHz 16-bit mono, and it is the stand-in's tones.
    let agent = mono_8k(&out);
    assert!(
        agent.len() > 8000 * 2,
        "at least 2 s of agent audio on the timeline, got {} samples",
        agent.len()
    );
    assert_standin_tones("the agent's audio", &agent, 15);

    // The recording: caller on the left (the sample), agent on the right.
    let both = std::fs::read(&recording).unwrap();
    let (channels, rate, ..) = wav::parse_header(&both);
    assert_eq!((rate, channels), (8000, 2));
    let (left, _) = wav::channels(&both);
    let left_loud = left.iter().filter(|v| v.unsigned_abs() > 2000).count();
    assert!(
        left_loud > 4000,
        "the caller's speech should be on the left channel"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_who_talks_over_the_greeting_interrupts_it() {
    let root = checked_root();
    let standin_port = free_port();
    let scratch = support::scratch_dir("e2e-simulator-barge-in");
    let worker = start_worker(&root, standin_port, &scratch).await;
    let out = scratch.join("agent.wav");
    // The caller starts 1 s into the greeting, while it plays, however long the greeting
    // took to start (at once, the stand-in's VAD would cancel it before it made a sound:
    // nothing to interrupt).
    let (output, stdout) = offline_call(
        &root,
        &worker,
        standin_port,
        &["--lead-in", "1", "--out", out.to_str().unwrap()],
    )
    .await;
    let context = || context(&output, Some(&worker));
    // The Worker cleared Twilio's playback of the greeting; its marks came back flushed.
    assert!(
        stdout.contains("Twilio: clear (barge-in)"),
        "no clear:\n{}",
        context()
    );
    let marks = stdout
        .lines()
        .find(|l| l.contains("marks:") && l.contains("flushed by"))
        .unwrap_or_else(|| panic!("no marks summary:\n{}", context()));
    assert!(
        !marks.contains("flushed by 0 clear"),
        "{marks}\n{}",
        context()
    );
    assert!(
        !stdout.contains("protocol problems"),
        "the Worker broke Twilio's protocol:\n{}",
        context()
    );
    // The stored call counts the barge-in and keeps the cut greeting as interrupted.
    let record = stdout
        .lines()
        .find(|l| l.starts_with("stored call record:"))
        .unwrap_or_else(|| panic!("no stored call:\n{}", context()));
    assert!(!record.contains("barge_ins=0"), "{record}\n{}", context());
    assert!(
        stdout
            .split("stored transcript (GET /api/admin/calls/")
            .nth(1)
            .is_some_and(|t| t
                .lines()
                .any(|l| l.contains(" agent ") && l.contains("(interrupted)"))),
        "the cut greeting should be stored as interrupted:\n{}",
        context()
    );
}

/// `seconds` of silence as an 8 kHz 16-bit mono WAV at `path`.
fn write_silence(path: &Path, seconds: u32) {
    let data_len = seconds * 8000 * 2;
    let mut b = Vec::with_capacity(44 + data_len as usize);
    b.extend_from_slice(b"RIFF");
    b.extend_from_slice(&(36 + data_len).to_le_bytes());
    b.extend_from_slice(b"WAVEfmt ");
    b.extend_from_slice(&16u32.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes()); // PCM
    b.extend_from_slice(&1u16.to_le_bytes()); // mono
    b.extend_from_slice(&8000u32.to_le_bytes());
    b.extend_from_slice(&16000u32.to_le_bytes());
    b.extend_from_slice(&2u16.to_le_bytes());
    b.extend_from_slice(&16u16.to_le_bytes());
    b.extend_from_slice(b"data");
    b.extend_from_slice(&data_len.to_le_bytes());
    b.resize(44 + data_len as usize, 0);
    std::fs::write(path, b).unwrap();
}

/// The CallSid the simulator printed (`call CA…: from → to`).
fn printed_call_sid(stdout: &str) -> Option<String> {
    stdout.lines().find_map(|l| {
        let sid = l.strip_prefix("call ")?.split(':').next()?;
        sid.starts_with("CA").then(|| sid.to_owned())
    })
}

/// The call the simulator printed the sid of, read back through the admin API once D1 has
/// it ended: its sid and detail.
async fn stored_ended_call(
    admin: &support::admin::Admin,
    stdout: &str,
    context: &dyn Fn() -> String,
) -> (String, serde_json::Value) {
    let call_sid =
        printed_call_sid(stdout).unwrap_or_else(|| panic!("no call sid:\n{}", context()));
    let detail = admin
        .wait_call(&call_sid, "the call ended", Duration::from_secs(30), |d| {
            !d["call"]["ended_at"].is_null()
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", context()));
    (call_sid, detail)
}

/// Simulator options for a caller who stays on the line for a minute after their audio.
const STAYS_A_MINUTE: [&str; 4] = ["--tail", "60", "--max-tail", "60"];

/// The caller's side of the call (what the simulator sent) ended before `limit_s` seconds:
/// the call was ended for them. Returns how long it was.
fn assert_ended_before(stdout: &str, limit_s: f64, context: &dyn Fn() -> String) -> f64 {
    let sent_s =
        caller_seconds_sent(stdout).unwrap_or_else(|| panic!("no call summary:\n{}", context()));
    assert!(
        sent_s < limit_s,
        "the call went on for {sent_s} s\n{}",
        context()
    );
    sent_s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_hangs_up_a_silent_call_through_the_simulated_twilio_rest_api() {
    let root = checked_root();
    let standin_port = free_port();
    let scratch = support::scratch_dir("e2e-simulator-agent-hangup");
    // The shortest idle time: 5 s of silence makes the agent check in, 5 s more say goodbye
    // and hang up through Twilio's REST API (the simulator's, on the stand-in's port).
    let worker = start_worker_with(
        &root,
        standin_port,
        &scratch,
        &[("IDLE_TIMEOUT_SECONDS", "5")],
    )
    .await;
    let silence = scratch.join("silence.wav");
    write_silence(&silence, 1);
    let out = scratch.join("agent.wav");
    // A caller who says nothing and would stay on the line for a minute.
    let (output, stdout) = offline_run(
        &root,
        &worker.base_url(),
        standin_port,
        &silence,
        &[&STAYS_A_MINUTE[..], &["--out", out.to_str().unwrap()]].concat(),
    )
    .await;
    let context = || context(&output, Some(&worker));
    assert_eq!(output.status.code(), Some(0), "{}", context());
    assert_said(
        &stdout,
        &[
            "Twilio REST: Status=completed — the agent hung up",
            "Twilio: stop (the agent hung up)",
            "the agent hung up (Twilio's REST API, played by the simulator)",
            "stored call record: status=completed end_reason=agent_hangup",
        ],
        context,
    );
    assert!(
        !stdout.contains("refused the Worker's call update"),
        "{}",
        context()
    );
    // The stream ended well before the caller's minute of silence.
    let sent_s = assert_ended_before(&stdout, 45.0, &context);

    // Read back through the admin API: completed, ended by the agent's hang-up.
    let admin = support::admin::Admin::new(&worker.base_url(), ADMIN_TOKEN);
    let (call_sid, detail) = stored_ended_call(&admin, &stdout, &context).await;
    assert_eq!(detail["call"]["status"], "completed", "{detail:#}");
    assert_eq!(detail["call"]["end_reason"], "agent_hangup", "{detail:#}");
    // Twilio's status callback, posted by the simulator once the stream ended, was taken.
    assert!(
        stdout.contains("Twilio: status callback (CallStatus=completed, CallDuration="),
        "{}",
        context()
    );
    let detail = admin
        .wait_call(
            &call_sid,
            "Twilio's duration",
            Duration::from_secs(30),
            |d| d["call"]["twilio_duration_s"].is_u64(),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", context()));
    let twilio_s = detail["call"]["twilio_duration_s"].as_u64().unwrap() as f64;
    assert!(
        (twilio_s - sent_s).abs() <= 5.0,
        "Twilio's duration {twilio_s} s for a call of {sent_s} s\n{detail:#}"
    );
}

/// Changes the seeded default agent through the admin API: `fields`, as a PUT takes them.
async fn update_default_agent(worker: &WorkerProcess, fields: serde_json::Value) {
    let admin = support::admin::Admin::new(&worker.base_url(), ADMIN_TOKEN);
    let put = admin
        .put("/api/admin/agents/default", &fields)
        .await
        .expect("PUT the default agent");
    assert_eq!(put.status, 200, "{}", put.text);
}

/// One offline call through `worker` in which the caller makes the `presses` (`--press`
/// values: keys once their audio has ended, or `KEYS@S`), then would stay on the line for a
/// minute: the agent's tool must end it long before. Checks that the simulator printed
/// `said`; returns the stored call once it has ended.
async fn keypad_call(
    root: &Path,
    worker: &WorkerProcess,
    standin_port: u16,
    out: &Path,
    presses: &[&str],
    said: &[&str],
) -> serde_json::Value {
    let mut args = STAYS_A_MINUTE.to_vec();
    for press in presses {
        args.extend(["--press", press]);
    }
    args.extend(["--out", out.to_str().unwrap()]);
    let (output, stdout) = offline_call(root, worker, standin_port, &args).await;
    let context = || context(&output, Some(worker));
    assert_said(&stdout, said, context);
    assert_ended_before(&stdout, 30.0, &context);
    let admin = support::admin::Admin::new(&worker.base_url(), ADMIN_TOKEN);
    stored_ended_call(&admin, &stdout, &context).await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keypad_presses_make_the_offline_agent_hang_up_or_transfer_through_the_simulated_twilio_rest_api(
) {
    let root = checked_root();
    let standin_port = free_port();
    let scratch = support::scratch_dir("e2e-simulator-keypad-tools");
    let worker = start_worker(&root, standin_port, &scratch).await;
    let out = scratch.join("agent.wav");

    // #: the stand-in calls end_call, which the seeded default agent has.
    let detail = keypad_call(
        &root,
        &worker,
        standin_port,
        &out,
        &["#"],
        &[
            "caller presses # on the keypad (Twilio: dtmf)",
            "agent  (calls the tool end_call ",
            "agent  [stand-in] お電話ありがとうございました。",
            "Twilio REST: Status=completed — the agent hung up",
            "stored call record: status=completed end_reason=agent_hangup",
        ],
    )
    .await;
    assert_eq!(detail["call"]["end_reason"], "agent_hangup", "{detail:#}");
    assert_eq!(
        events_of(&detail, "dtmf")[0]["detail"]["digit"],
        "#",
        "{detail:#}"
    );
    assert_eq!(
        events_of(&detail, "tool_call")[0]["detail"]["name"],
        "end_call",
        "{detail:#}"
    );

    // 0: transfer_call, once the agent has it and a number to transfer to.
    let staff = "+81312340099";
    update_default_agent(
        &worker,
        serde_json::json!({
            "tools": [{"type": "end_call"}, {"type": "transfer_call"}],
            "transfer_number": staff,
        }),
    )
    .await;
    let detail = keypad_call(
        &root,
        &worker,
        standin_port,
        &out,
        &["0"],
        &[
            "caller presses 0 on the keypad (Twilio: dtmf)",
            "agent  (calls the tool transfer_call ",
            "agent  [stand-in] 担当者におつなぎします。",
            &format!("Twilio REST: new TwiML — the agent transferred the call to {staff}"),
            &format!("<Dial> {staff} (Twilio would dial this number now)"),
            "stored call record: status=completed end_reason=transferred",
            &format!("the agent transferred the call to {staff} (Twilio's REST API, played by the simulator)"),
        ],
    )
    .await;
    assert_eq!(detail["call"]["end_reason"], "transferred", "{detail:#}");
    let event = &events_of(&detail, "transfer")[0];
    assert_eq!(event["detail"]["ok"], true, "{event}");
    assert_eq!(event["detail"]["reason"]["to"], staff, "{event}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keypad_press_calls_the_agents_webhook_tool_and_the_offline_agent_says_its_answer() {
    let root = checked_root();
    let standin_port = free_port();
    let scratch = support::scratch_dir("e2e-simulator-keypad-webhook");
    let worker = start_worker(&root, standin_port, &scratch).await;
    let out = scratch.join("agent.wav");
    let secret = "tool-secret-e2e-simulator-0123456789";
    let tools = ToolServer::start(support::background_runtime(), secret);
    let answer = r#"{"name":"山田太郎","vip":true}"#;
    tools.answer("/tools/lookup", ToolAnswer::ok(answer));
    update_default_agent(
        &worker,
        serde_json::json!({
            "tools": [
                {"type": "end_call"},
                {"type": "function", "name": "lookup_customer",
                 "description": "顧客情報を電話番号で検索します。",
                 "parameters": {"type": "object", "properties": {"phone": {"type": "string"}},
                                "required": ["phone"]},
                 "url": tools.url("/tools/lookup")},
            ],
            "tool_secret": secret,
        }),
    )
    .await;

    // 1 once the caller's audio has ended: the agent's first own tool, the webhook; # well
    // after, to hang up.
    let detail = keypad_call(
        &root,
        &worker,
        standin_port,
        &out,
        &["1", "#@15"],
        &[
            "caller presses 1 on the keypad (Twilio: dtmf)",
            r#"agent  (calls the tool lookup_customer {"phone":"[stand-in]"})"#,
            &format!("agent  [stand-in] lookup_customer の結果を受け取りました: {answer} "),
            "caller presses # on the keypad (Twilio: dtmf)",
            "agent  (calls the tool end_call ",
            "stored call record: status=completed end_reason=agent_hangup",
        ],
    )
    .await;
    let sid = detail["call"]["call_sid"]
        .as_str()
        .expect("call_sid")
        .to_owned();
    let requests = tools.requests();
    assert_eq!(requests.len(), 1, "one webhook request: {requests:#?}");
    let req = &requests[0];
    assert!(req.signature_ok, "signed with the agent's secret: {req:#?}");
    assert_eq!(req.json["tool"], "lookup_customer", "{}", req.body);
    assert_eq!(
        req.json["arguments"],
        serde_json::json!({"phone": "[stand-in]"}),
        "{}",
        req.body
    );
    assert_eq!(req.json["call"]["call_sid"], sid.as_str(), "{}", req.body);
    assert_eq!(req.json["call"]["agent_id"], "default", "{}", req.body);
    let called: Vec<_> = events_of(&detail, "tool_call")
        .iter()
        .map(|e| e["detail"]["name"].clone())
        .collect();
    assert_eq!(called, ["lookup_customer", "end_call"], "{detail:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_call_to_a_worker_that_uses_another_realtime_server_fails_loudly() {
    let root = checked_root();
    // The Worker talks to a Realtime server of its own (as `npm run dev` with a real key
    // talks to OpenAI): here a second stand-in, run alone, which answers with audio too.
    let other_port = free_port();
    let mut other = tokio::process::Command::new("node")
        .current_dir(&root)
        .args([
            "scripts/sim/standin.mjs",
            "--quiet",
            "--port",
            &other_port.to_string(),
        ])
        .env("TWILIO_AUTH_TOKEN", TWILIO_AUTH_TOKEN)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("run the other stand-in");
    let mut other_out = BufReader::new(other.stdout.take().unwrap()).lines();
    let listening = tokio::time::timeout(Duration::from_secs(30), other_out.next_line())
        .await
        .ok()
        .and_then(|l| l.ok().flatten())
        .unwrap_or_default();
    assert!(
        listening.contains("stand-in Realtime server"),
        "{listening:?}"
    );
    let scratch = support::scratch_dir("e2e-simulator-not-offline");
    let worker = start_worker(&root, other_port, &scratch).await;

    // The simulator's own stand-in, which the Worker never reaches.
    let standin_port = free_port();
    let sample = root.join("samples/caller-ja.wav");
    let out = scratch.join("agent.wav");
    let (output, stdout) = offline_run(
        &root,
        &worker.base_url(),
        standin_port,
        &sample,
        &["--out", out.to_str().unwrap()],
    )
    .await;
    let _ = other.start_kill();
    let context = || context(&output, Some(&worker));
    assert_eq!(output.status.code(), Some(2), "{}", context());
    assert_said(
        &stdout,
        &[
            "--offline, but the Worker NEVER connected to the stand-in",
            "most likely the REAL OpenAI Realtime API",
            "npm run dev:offline",
        ],
        context,
    );
    assert!(
        !stdout.contains("the Worker connected to the stand-in"),
        "{}",
        context()
    );
}

/// Processes whose command line holds `tag` (from /proc).
fn processes_tagged(tag: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(tag) && !c.contains("call.mjs"))
        .collect()
}

/// A simulator on the microphone (`--mic`, the test's capture command: the sample spoken
/// after 2 s of a quiet room, then the quiet room for as long as it is listened to; `tag`
/// finds it and its shell afterwards), against `worker` and its stand-in, its stdin a pipe.
/// Once the stand-in has answered what it heard and that answer has had time to play,
/// `then` is done to it (Ctrl-C, or keys typed); then what it printed is read to its end.
/// Returns its output, once the stand-in answered and the simulator exited 0.
async fn mic_call(
    root: &Path,
    worker: &WorkerProcess,
    standin_port: u16,
    tag: &str,
    args: &[&str],
    then: impl FnOnce(&mut tokio::process::Child) -> futures::future::BoxFuture<'_, ()>,
) -> Output {
    let mic = format!("node tests/support/fake_mic.mjs samples/caller-ja.wav 2 {tag}");
    let port = standin_port.to_string();
    let base_url = worker.base_url();
    let mut child = simulator(
        root,
        &[
            &["--offline", "--mic-command", &mic][..],
            &["--standin-port", &port, "--url", &base_url],
            args,
        ]
        .concat(),
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("run node scripts/call.mjs");

    // Read what it prints as it comes.
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut stderr = child.stderr.take().unwrap();
    let stderr_task = tokio::spawn(async move {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s).await;
        s
    });
    let mut stdout = String::new();
    let answered = tokio::time::timeout(Duration::from_secs(90), async {
        while let Ok(Some(line)) = lines.next_line().await {
            stdout.push_str(&line);
            stdout.push('\n');
            if line.contains("] agent ") && line.contains("heard ") {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    if answered {
        tokio::time::sleep(Duration::from_secs(4)).await;
        then(&mut child).await;
    } else {
        let _ = child.start_kill();
    }
    let status = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(line)) = lines.next_line().await {
            stdout.push_str(&line);
            stdout.push('\n');
        }
        child.wait().await
    })
    .await
    .expect("the simulator did not end within 60 s of what was done to it")
    .expect("wait for the simulator");
    let stderr = stderr_task.await.unwrap();
    let output = Output {
        status,
        stdout: stdout.into_bytes(),
        stderr: stderr.into_bytes(),
    };
    let context = || context(&output, Some(worker));
    assert!(
        answered,
        "the stand-in never answered the caller:\n{}",
        context()
    );
    assert!(
        output.status.success(),
        "the simulator failed ({}):\n{}",
        output.status,
        context()
    );
    output
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulator_talks_from_a_microphone_and_hangs_up_at_ctrl_c() {
    let root = checked_root();
    let standin_port = free_port();
    let scratch = support::scratch_dir("e2e-simulator-mic");
    let worker = start_worker(&root, standin_port, &scratch).await;

    let out = scratch.join("agent.wav");
    let speaker_out = scratch.join("speaker.ulaw");
    let tag = format!("mic-tag-{}", std::process::id());
    let speaker = format!("cat > '{}'", speaker_out.display());
    // The caller hangs up with Ctrl-C (SIGINT).
    let output = mic_call(
        &root,
        &worker,
        standin_port,
        &tag,
        &[
            "--speaker-command",
            &speaker,
            "--out",
            out.to_str().unwrap(),
        ],
        |child| {
            Box::pin(async move {
                let pid = child.id().expect("the simulator is running").to_string();
                let kill = std::process::Command::new("kill")
                    .args(["-INT", &pid])
                    .status()
                    .expect("kill -INT");
                assert!(kill.success(), "kill -INT {pid}");
            })
        },
    )
    .await;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let context = || context(&output, Some(&worker));
    assert_said(
        &stdout,
        &[
            "caller audio: the microphone (`node tests/support/fake_mic.mjs",
            "the microphone is live",
            "speaker: `cat > ",
            "Twilio: stop (the caller hung up)",
        ],
        context,
    );
    assert!(
        stderr.contains("Ctrl-C: the caller hangs up"),
        "the Ctrl-C should be acknowledged:\n{}",
        context()
    );
    assert!(
        !live_standin_lines(&stdout, "caller").is_empty(),
        "the stand-in should have heard the caller's turn from the microphone:\n{}",
        context()
    );
    assert_stored_call(&stdout, &context);

    // What Twilio played went to the WAV and, in real time, to the speaker: a continuous
    // stream (silence between turns) as long as the call, holding the same tones.
    let agent = mono_8k(&out);
    assert_standin_tones("the agent's audio", &agent, 15);
    let speaker = std::fs::read(&speaker_out).expect("the speaker command's output");
    let streamed_s = stdout
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("speaker: ")?
                .strip_suffix(" s played")
        })
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no speaker summary:\n{}", context()));
    assert!(
        (speaker.len() as f64 / 8000.0 - streamed_s).abs() < 0.1,
        "the speaker got {} bytes for {streamed_s} s played",
        speaker.len()
    );
    let sent_s =
        caller_seconds_sent(&stdout).unwrap_or_else(|| panic!("no call summary:\n{}", context()));
    assert!(
        (streamed_s - sent_s).abs() < 1.0,
        "the speaker played {streamed_s} s in a call of {sent_s} s of caller audio"
    );
    // The speaker carried exactly that audio: 25 ms from the middle of each loud 100 ms
    // of the WAV is found in it (a piece of the timeline may sit a sample off its
    // neighbour, so a few may not match).
    let heard = wav::decoded(&speaker);
    let needles: Vec<&[i16]> = agent
        .chunks_exact(800)
        .filter(|w| w.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / 800.0 > 1e6)
        .map(|w| &w[300..500])
        .collect();
    let found = needles
        .iter()
        .filter(|n| wav::find(&heard, n, 0).is_some())
        .count();
    assert!(
        needles.len() >= 15 && found * 10 >= needles.len() * 8,
        "{found} of {} pieces of the agent's audio found in what the speaker played",
        needles.len()
    );

    // The microphone's program (and the shell around it) is stopped with the call.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let left = processes_tagged(&tag);
    assert!(left.is_empty(), "left running: {left:?}");
}

/// On the microphone, keys typed during the call (here piped into the simulator's stdin)
/// are pressed on the keypad: `#` makes the stand-in call the agent's end_call, and the call
/// ends with the agent's hang-up, no Ctrl-C needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_typed_during_a_microphone_call_are_pressed_on_the_keypad() {
    use tokio::io::AsyncWriteExt;
    let root = checked_root();
    let standin_port = free_port();
    let scratch = support::scratch_dir("e2e-simulator-mic-keys");
    let worker = start_worker(&root, standin_port, &scratch).await;
    let out = scratch.join("agent.wav");
    let tag = format!("mic-keys-tag-{}", std::process::id());
    let output = mic_call(
        &root,
        &worker,
        standin_port,
        &tag,
        &["--no-speaker", "--out", out.to_str().unwrap()],
        |child| {
            Box::pin(async move {
                let stdin = child.stdin.as_mut().expect("the simulator's stdin");
                stdin.write_all(b"#\n").await.expect("type #");
                stdin.flush().await.expect("flush");
            })
        },
    )
    .await;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let context = || context(&output, Some(&worker));
    assert_said(
        &stdout,
        &[
            "keys 0-9, * and # are pressed on the keypad; Ctrl-C hangs up",
            "caller presses # on the keypad (Twilio: dtmf)",
            "agent  (calls the tool end_call ",
            "Twilio REST: Status=completed — the agent hung up",
            "keypad: 1 key(s) pressed",
            "stored call record: status=completed end_reason=agent_hangup",
        ],
        context,
    );
    let admin = support::admin::Admin::new(&worker.base_url(), ADMIN_TOKEN);
    let detail = stored_ended_call(&admin, &stdout, &context).await.1;
    assert_eq!(
        events_of(&detail, "dtmf")[0]["detail"]["digit"],
        "#",
        "{detail:#}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let left = processes_tagged(&tag);
    assert!(left.is_empty(), "left running: {left:?}");
}

#[tokio::test]
async fn simulator_refuses_clearly_without_a_microphone() {
    let root = checked_root();
    // A capture program that finds no device.
    let output = simulator(
        &root,
        &[
            "--mic-command",
            "echo 'ALSA lib pcm.c: Unknown PCM default' >&2; exit 1",
            "--url",
            "http://127.0.0.1:9",
        ],
    )
    .output()
    .await
    .expect("run node scripts/call.mjs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{}", context(&output, None));
    assert!(
        stderr.contains("no microphone could be opened") && stderr.contains("Unknown PCM default"),
        "{}",
        context(&output, None)
    );

    // No capture program at all: PATH holds node only.
    let bin = support::scratch_dir("e2e-simulator-path");
    std::fs::create_dir_all(&bin).unwrap();
    let node = std::process::Command::new("sh")
        .args(["-c", "command -v node"])
        .output()
        .unwrap();
    let node = String::from_utf8_lossy(&node.stdout).trim().to_owned();
    std::os::unix::fs::symlink(&node, bin.join("node")).unwrap();
    let output = simulator(&root, &["--mic", "--url", "http://127.0.0.1:9"])
        .env("PATH", &bin)
        .output()
        .await
        .expect("run node scripts/call.mjs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{}", context(&output, None));
    assert!(
        stderr.contains("no program to capture the microphone was found")
            && stderr.contains("apt-get install sox"),
        "{}",
        context(&output, None)
    );
}
