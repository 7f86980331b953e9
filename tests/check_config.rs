//! `check-config` (src/bin/check-config.rs), which `scripts/deploy.sh` runs before a deploy:
//! the [vars] of a wrangler config as the Worker will read them. What the Worker would set
//! aside (and answer calls without), a misspelt name and a secret in the file are each
//! named, and refuse the deploy; the shipped wrangler.toml passes.

use std::process::{Command, Output};

fn check(toml: &str, args: &[&str]) -> Output {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("check-config-{}-{n}.toml", std::process::id()));
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_check-config"))
        .arg(&path)
        .args(args)
        .output()
        .expect("check-config runs");
    let _ = std::fs::remove_file(&path);
    out
}

fn said(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_shipped_wrangler_toml_passes() {
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/wrangler.toml")).unwrap();
    let out = check(&shipped, &[]);
    assert!(out.status.success(), "{}", said(&out));
    assert!(
        said(&out).contains("each used as written"),
        "{}",
        said(&out)
    );
}

#[test]
fn every_setting_the_worker_would_not_use_as_written_is_named_and_refused() {
    let out = check(
        r#"
name = "x"
[vars]
AGENT_VOICE = "nova"
AGENT_LANGUAGE = "jp"
IDLE_TIMEOUT_SECONDS = "2"
FALLBACK_DIAL_NUMBER = "03-1234-5678"
LOG_LEVEL = "verbose"
IDLE_TIMEOUT_SECOND = "45"
OPENAI_API_KEY = "sk-in-the-repo"
TWILIO_AUTH_TOKEN = ""
TWILIO_AUTH_TOKEN_SECONDARY = "rotating"
PUBLIC_BASE_URL = "http://phone.example.jp/line"
FAULT_INJECT_D1_FAILURES = "0"
OPENAI_MODEL = "gpt-realtime"
"#,
        &[],
    );
    let text = said(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    for finding in [
        "AGENT_VOICE: unknown voice \"nova\"",
        "AGENT_LANGUAGE: \"jp\" is not an ISO 639-1 language code",
        "did you mean \"ja\"",
        "IDLE_TIMEOUT_SECONDS: \"2\" is not a number from 5 to 600",
        "FALLBACK_DIAL_NUMBER: \"03-1234-5678\" is not an E.164 number",
        "LOG_LEVEL: \"verbose\"",
        "IDLE_TIMEOUT_SECOND: not a setting of this Worker",
        "OPENAI_API_KEY in [vars]: a secret",
        // Even empty: it takes the name `wrangler secret put` needs.
        "TWILIO_AUTH_TOKEN in [vars]: a secret",
        "TWILIO_AUTH_TOKEN_SECONDARY in [vars]: a secret",
        // Twilio opens Media Streams over wss:// only.
        "PUBLIC_BASE_URL: \"http://phone.example.jp/line\" is plain http",
        "10 setting(s)",
    ] {
        assert!(text.contains(finding), "{finding:?} missing from:\n{text}");
    }
    // The test hook left at 0 and a good value are not findings.
    for quiet in ["FAULT_INJECT_D1_FAILURES", "OPENAI_MODEL"] {
        assert!(!text.contains(&format!("{quiet}:")), "{quiet}: {text}");
    }
}

#[test]
fn a_model_the_realtime_api_does_not_have_is_refused_before_the_deploy() {
    // Each would have the server refuse every call of the configured agent.
    let out = check(
        "[vars]\nOPENAI_MODEL = \"gpt-realtme\"\nAGENT_TRANSCRIPTION_MODEL = \"gpt-4o-transcibe\"\n",
        &[],
    );
    let text = said(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    for finding in [
        "OPENAI_MODEL: \"gpt-realtme\" is not a Realtime model",
        "\"gpt-realtime\" is used",
        "AGENT_TRANSCRIPTION_MODEL: \"gpt-4o-transcibe\" is not a transcription model",
        "\"gpt-4o-transcribe\" is used",
    ] {
        assert!(text.contains(finding), "{finding:?} missing from:\n{text}");
    }
    let out = check(
        "[vars]\nOPENAI_MODEL = \"gpt-realtime-mini\"\nAGENT_TRANSCRIPTION_MODEL = \"whisper-1\"\n",
        &[],
    );
    assert!(out.status.success(), "{}", said(&out));
}

#[test]
fn values_written_without_quotes_are_read_as_the_worker_reads_them() {
    // wrangler binds these as a number and a boolean; the Worker reads them as written.
    let out = check(
        "[vars]\nIDLE_TIMEOUT_SECONDS = 45\nFALLBACK_ONLY = true\nAGENT_VAD_THRESHOLD = 0.6\n",
        &[],
    );
    assert!(out.status.success(), "{}", said(&out));
    let out = check(
        "[vars]\nIDLE_TIMEOUT_SECONDS = 4\nLOG_LEVEL = [\"debug\"]\nAGENT_GREETING = { text = \"x\" }\n",
        &[],
    );
    let text = said(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("IDLE_TIMEOUT_SECONDS: \"4\""), "{text}");
    // A table or list is not text: not read as its JSON.
    for name in ["LOG_LEVEL", "AGENT_GREETING"] {
        let line = text.lines().find(|l| l.contains(&format!("{name}: ")));
        assert!(
            line.is_some_and(|l| l.contains("is not text")),
            "{name}: {text}"
        );
    }
}

#[test]
fn an_environment_is_checked_on_its_own_vars() {
    // wrangler does not inherit [vars] into [env.NAME]: only the environment's own count.
    let toml = "[vars]\nAGENT_VOICE = \"nova\"\n[env.staging.vars]\nAGENT_VOICE = \"marin\"\n";
    assert_eq!(check(toml, &[]).status.code(), Some(1));
    let out = check(toml, &["--env", "staging"]);
    assert!(out.status.success(), "{}", said(&out));
    let out = check(toml, &["--env", "production"]);
    assert_eq!(out.status.code(), Some(2), "{}", said(&out));
    assert!(said(&out).contains("no [env.production]"), "{}", said(&out));
    let out = check("[vars\n", &[]);
    assert_eq!(out.status.code(), Some(2), "{}", said(&out));
    assert!(said(&out).contains("not TOML"), "{}", said(&out));
}

#[test]
fn deploy_time_vars_secrets_in_any_environment_and_the_test_hook_are_checked() {
    // `wrangler deploy --var KEY:VALUE` sets a value on top of the file's.
    let toml = "[vars]\nAGENT_VOICE = \"marin\"\n";
    assert!(check(toml, &[]).status.success());
    let out = check(toml, &["--var", "AGENT_VOICE:nova"]);
    assert_eq!(out.status.code(), Some(1), "{}", said(&out));
    assert!(
        said(&out).contains("AGENT_VOICE: unknown voice \"nova\""),
        "{}",
        said(&out)
    );
    // A secret in an environment's vars is in the committed file too, whichever is deployed.
    let out = check("[env.staging.vars]\nOPENAI_API_KEY = \"sk-live\"\n", &[]);
    assert_eq!(out.status.code(), Some(1), "{}", said(&out));
    assert!(
        said(&out).contains("OPENAI_API_KEY in [env.staging.vars]: a secret"),
        "{}",
        said(&out)
    );
    // The fault-injection hooks make every call's first D1 writes fail, or hold every one, or
    // its object's first writes to its storage, or lose the first records handed to call
    // objects.
    for hook in [
        "FAULT_INJECT_D1_FAILURES",
        "FAULT_INJECT_D1_STALL_MS",
        "FAULT_INJECT_D1_HANGS",
        "FAULT_INJECT_STORAGE_FAILURES",
        "FAULT_INJECT_CALL_OBJECT_FAILURES",
    ] {
        let out = check(&format!("[vars]\n{hook} = 5\n"), &[]);
        assert_eq!(out.status.code(), Some(1), "{}", said(&out));
        assert!(
            said(&out).contains(&format!("{hook}: a test hook")),
            "{}",
            said(&out)
        );
    }
}

#[test]
fn the_slow_d1_lookup_hook_is_refused_like_the_failure_hook() {
    // It slows down every call's agent lookup: never to be deployed, in the file or by --var.
    for (toml, args) in [
        (
            "[vars]\nFAULT_INJECT_D1_LOOKUP_DELAY_MS = \"20000\"\n",
            &[][..],
        ),
        ("[vars]\nFAULT_INJECT_D1_LOOKUP_DELAY_MS = 500\n", &[][..]),
        (
            "[vars]\nAGENT_VOICE = \"marin\"\n",
            &["--var", "FAULT_INJECT_D1_LOOKUP_DELAY_MS:20000"][..],
        ),
    ] {
        let out = check(toml, args);
        let text = said(&out);
        assert_eq!(out.status.code(), Some(1), "{toml} {args:?}: {text}");
        assert!(
            text.contains("FAULT_INJECT_D1_LOOKUP_DELAY_MS: a test hook"),
            "{text}"
        );
        assert!(!text.contains("not a setting of this Worker"), "{text}");
    }
    // Left at 0 or empty it does nothing, and is no finding.
    for value in ["\"0\"", "\"\"", "0"] {
        let out = check(
            &format!("[vars]\nFAULT_INJECT_D1_LOOKUP_DELAY_MS = {value}\n"),
            &[],
        );
        assert!(out.status.success(), "{value}: {}", said(&out));
    }
}
