//! End-to-end test of the call simulator (`npm run call -- --offline`): the real Worker in
//! `wrangler dev`, pointed at the simulator's stand-in Realtime server, gets a call placed
//! the way Twilio places it, with the Japanese caller sample. Checks that the call completes,
//! that the agent's audio written to the WAV is the stand-in's tones, and that the transcript
//! printed — live from the stand-in and as stored by the Worker — has the stand-in's lines.

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use support::worker::{free_port, WorkerConfig, WorkerProcess};

const TWILIO_AUTH_TOKEN: &str = "twilio-sim-token-SECRET-111";
const ADMIN_TOKEN: &str = "admin-sim-token-SECRET-222";
const OPENAI_API_KEY: &str = "sk-sim-SECRET-333";

/// The stand-in's tones (scripts/sim/standin.mjs): greeting C-E-G, answer 440 + 880 Hz.
const STANDIN_TONES_HZ: [f64; 5] = [440.0, 523.0, 659.0, 784.0, 880.0];

/// 16-bit PCM samples and the format of a WAV file.
fn read_wav(path: &Path) -> (u32, u16, u16, Vec<i16>) {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert!(
        b.len() >= 44 && &b[0..4] == b"RIFF" && &b[8..12] == b"WAVE",
        "{} is not a WAV file",
        path.display()
    );
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let (mut rate, mut channels, mut bits, mut data) = (0, 0, 0, None);
    let mut off = 12;
    while off + 8 <= b.len() {
        let id = &b[off..off + 4];
        let size = u32_at(off + 4) as usize;
        let body = off + 8;
        if id == b"fmt " {
            assert_eq!(u16_at(body), 1, "PCM");
            channels = u16_at(body + 2);
            rate = u32_at(body + 4);
            bits = u16_at(body + 14);
        } else if id == b"data" {
            data = Some(&b[body..(body + size).min(b.len())]);
        }
        off = body + size + (size & 1);
    }
    let data = data.expect("data chunk");
    let samples = data
        .chunks_exact(2)
        .map(|c| i16::from_le_bytes([c[0], c[1]]))
        .collect();
    (rate, channels, bits, samples)
}

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

fn scratch_dir() -> PathBuf {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis();
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("e2e-simulator-{}-{stamp}", std::process::id()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulator_places_an_offline_call_through_the_worker() {
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

    let standin_port = free_port();
    let scratch = scratch_dir();
    let worker = WorkerProcess::start(WorkerConfig {
        root: root.clone(),
        vars: vec![
            ("OPENAI_API_KEY".into(), OPENAI_API_KEY.into()),
            ("TWILIO_AUTH_TOKEN".into(), TWILIO_AUTH_TOKEN.into()),
            ("ADMIN_TOKEN".into(), ADMIN_TOKEN.into()),
            (
                "OPENAI_REALTIME_URL".into(),
                format!("ws://127.0.0.1:{standin_port}/v1/realtime"),
            ),
        ],
        scratch_dir: scratch.clone(),
    })
    .await
    .unwrap_or_else(|e| panic!("the Worker did not start:\n{e}"));

    let out = scratch.join("agent.wav");
    let recording = scratch.join("call.wav");
    let run = tokio::process::Command::new("node")
        .current_dir(&root)
        .arg("scripts/call.mjs")
        .args(["--offline", "--audio"])
        .arg(&sample)
        .args(["--standin-port", &standin_port.to_string()])
        .args(["--url", &worker.base_url()])
        .arg("--out")
        .arg(&out)
        .arg("--recording")
        .arg(&recording)
        // The Worker's secrets come from --var, not from .dev.vars: the simulator must get
        // the same ones (the environment wins over .dev.vars).
        .env("TWILIO_AUTH_TOKEN", TWILIO_AUTH_TOKEN)
        .env("ADMIN_TOKEN", ADMIN_TOKEN)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the simulator did not finish within 120 s")
        .expect("run node scripts/call.mjs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let context = || {
        format!(
            "--- simulator stdout ---\n{stdout}\n--- stderr ---\n{stderr}\n--- Worker log tail ---\n{}",
            worker.log_tail(60)
        )
    };
    assert!(
        output.status.success(),
        "the simulator failed ({}):\n{}",
        output.status,
        context()
    );

    // The call went the way a Twilio call goes, to its end.
    for expected in [
        "TwiML: <Stream url=\"ws://127.0.0.1:",
        "the Worker connected to the stand-in",
        "in=audio/pcmu out=audio/pcmu",
        "caller starts speaking",
        "Twilio: stop (the caller hung up)",
    ] {
        assert!(
            stdout.contains(expected),
            "no {expected:?} in:\n{}",
            context()
        );
    }

    // The live transcript: the stand-in's greeting and answer, and what it "heard".
    let live: Vec<&str> = stdout
        .lines()
        .take_while(|l| !l.starts_with("call summary"))
        .collect();
    let agent_lines: Vec<&&str> = live
        .iter()
        .filter(|l| l.contains("] agent ") && l.contains("[stand-in]"))
        .collect();
    let caller_lines: Vec<&&str> = live
        .iter()
        .filter(|l| l.contains("] caller ") && l.contains("[stand-in]"))
        .collect();
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
        !caller_lines.is_empty(),
        "the caller's turn (the sample), as the stand-in transcribed it:\n{}",
        context()
    );

    // The transcript the Worker stored, as the simulator printed it from the admin API.
    let stored = stdout
        .split("stored transcript (GET /api/admin/calls/")
        .nth(1)
        .unwrap_or_else(|| panic!("no stored transcript printed:\n{}", context()));
    assert!(
        stdout.contains("stored call record: status=completed end_reason=twilio_stop"),
        "the stored call should have ended by Twilio's stop:\n{}",
        context()
    );
    let stored_agent = stored
        .lines()
        .filter(|l| l.contains(" agent ") && l.contains("[stand-in]"))
        .count();
    let stored_caller = stored
        .lines()
        .filter(|l| l.contains(" caller ") && l.contains("[stand-in]"))
        .count();
    assert!(
        stored_agent >= 2 && stored_caller >= 1,
        "stored transcript should hold the stand-in's greeting, answer and the caller's turn:\n{}",
        context()
    );

    // The agent's audio: 8 kHz 16-bit mono, and it is the stand-in's tones.
    let (rate, channels, bits, agent) = read_wav(&out);
    assert_eq!((rate, channels, bits), (8000, 1, 16), "agent WAV format");
    assert!(
        agent.len() > 8000 * 2,
        "at least 2 s of agent audio on the timeline, got {} samples",
        agent.len()
    );
    // Split into 100 ms windows; the loud ones must be the stand-in's tones. A window
    // that straddles the start or end of a tone (or a barge-in cut) smears its spectrum
    // (rectangular window), so a few of those may fall under the ratio: allow one in ten.
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
        loud >= 15,
        "expected ≥ 1.5 s of stand-in tones in the agent audio, found {loud} loud 100 ms windows"
    );
    assert!(
        not_tone.len() * 10 <= loud,
        "{} of {loud} loud 100 ms windows of the agent audio are not stand-in tones (tone/other power {})",
        not_tone.len(),
        not_tone.join(", ")
    );

    // The recording: caller on the left (the sample), agent on the right.
    let (rate, channels, _, both) = read_wav(&recording);
    assert_eq!((rate, channels), (8000, 2));
    let left_loud = both
        .chunks_exact(2)
        .filter(|lr| (lr[0] as i32).abs() > 2000)
        .count();
    assert!(
        left_loud > 4000,
        "the caller's speech should be on the left channel"
    );
}
