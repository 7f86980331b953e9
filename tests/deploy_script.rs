//! The README's deploy command (`scripts/deploy.sh`, `npm run deploy`): it refuses to deploy
//! with the placeholder D1 database id wrangler.toml ships with, saying what to run, and with
//! a real one it checks the [vars] (a setting the Worker would not use as written refuses the
//! deploy) and goes on to `wrangler deploy` (here `--dry-run`, which builds and bundles the
//! Worker as a deploy would, with no account and no network).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn deploy(args: &[&str]) -> Output {
    deploy_with(args, |_| {})
}

fn deploy_with(args: &[&str], env: impl FnOnce(&mut Command)) -> Output {
    let mut cmd = Command::new("bash");
    cmd.arg("scripts/deploy.sh")
        .args(args)
        .current_dir(root())
        .env("CI", "true");
    env(&mut cmd);
    cmd.output().expect("bash scripts/deploy.sh")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// wrangler.toml with its database_id replaced, in the project directory (wrangler resolves
/// the config's paths from where it is); removed when dropped.
struct Config(PathBuf);

impl Config {
    fn with_database_id(name: &str, id: &str) -> Config {
        Config::edited(name, id, |t| t)
    }

    /// As [`Config::with_database_id`], with `edit` applied to the file's text.
    fn edited(name: &str, id: &str, edit: impl Fn(String) -> String) -> Config {
        let shipped = edit(std::fs::read_to_string(root().join("wrangler.toml")).unwrap());
        let placeholder = "00000000-0000-0000-0000-000000000000";
        assert!(
            shipped.contains(placeholder),
            "wrangler.toml lost its placeholder"
        );
        let path = root().join(name);
        std::fs::write(&path, shipped.replace(placeholder, id)).unwrap();
        Config(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Config {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn deploy_refuses_the_placeholder_database_and_says_what_to_run_then_deploys_with_a_real_one() {
    // As shipped: refused before anything is built, with the steps of a first deploy.
    let out = deploy(&["--dry-run"]);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    for step in [
        "npx wrangler d1 create phone-agent-bridge",
        "npx wrangler d1 migrations apply DB --remote",
        "npx wrangler r2 bucket create phone-agent-bridge-recordings",
        "npx wrangler secret put OPENAI_API_KEY",
    ] {
        assert!(said.contains(step), "{step:?} missing from:\n{said}");
    }
    assert!(!said.contains("--dry-run: exiting now"), "{said}");

    // Something pasted that is not a database id.
    let bad = Config::with_database_id(".deploy-test-bad.toml", "paste-the-id-here");
    let out = deploy(&["--config", bad.path().to_str().unwrap(), "--dry-run"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("is not the id"), "{}", text(&out));

    // A real id, but a voice name the Realtime API does not have and a misspelt variable:
    // refused before anything is built, each named.
    let typo = Config::edited(
        ".deploy-test-typo.toml",
        "3f2b9c1e-7a4d-4e8b-9c2f-1a2b3c4d5e6f",
        |t| {
            let t = t.replace("AGENT_VOICE = \"marin\"", "AGENT_VOICE = \"nova\"");
            t.replace("LOG_LEVEL = ", "LOG_LEVL = ")
        },
    );
    let out = deploy(&["--config", typo.path().to_str().unwrap(), "--dry-run"]);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    for finding in [
        "AGENT_VOICE: unknown voice \"nova\"",
        "LOG_LEVL: not a setting",
    ] {
        assert!(said.contains(finding), "{finding:?} missing from:\n{said}");
    }
    assert!(!said.contains("--dry-run: exiting now"), "{said}");

    // A real id: on to wrangler, which builds and bundles the Worker for upload.
    let good = Config::with_database_id(
        ".deploy-test-good.toml",
        "3f2b9c1e-7a4d-4e8b-9c2f-1a2b3c4d5e6f",
    );
    let outdir = std::env::temp_dir().join(format!("deploy-dry-run-{}", std::process::id()));
    let out = deploy(&[
        "--config",
        good.path().to_str().unwrap(),
        "--dry-run",
        "--outdir",
        outdir.to_str().unwrap(),
    ]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("--dry-run: exiting now"), "{said}");
    assert!(
        !said.contains("applying D1 migrations"),
        "a dry run applies nothing: {said}"
    );
    assert!(
        said.contains("env.DB"),
        "the D1 binding is deployed: {said}"
    );
    assert!(
        outdir.join("index.js").is_file(),
        "no bundle in {}",
        outdir.display()
    );
    let _ = std::fs::remove_dir_all(&outdir);
}

#[test]
fn a_deploy_applies_the_d1_migrations_the_database_lacks_before_the_worker() {
    // A deploy for real, with `npx` a stand-in that notes what it was asked and reaches no
    // account: the migrations go first, to the same config's (and environment's) database,
    // then the Worker.
    let good = Config::edited(
        ".deploy-test-migrate.toml",
        "3f2b9c1e-7a4d-4e8b-9c2f-1a2b3c4d5e6f",
        |t| t + "\n[env.staging.vars]\nLOG_LEVEL = \"info\"\n",
    );
    let bin = std::env::temp_dir().join(format!("deploy-npx-{}", std::process::id()));
    std::fs::create_dir_all(&bin).unwrap();
    let asked = bin.join("asked.txt");
    let npx = bin.join("npx");
    std::fs::write(&npx, "#!/bin/sh\necho \"$*\" >> \"$NPX_ASKED\"\n").unwrap();
    std::fs::set_permissions(&npx, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let config = good.path().to_str().unwrap().to_owned();
    for (args, expected) in [
        (
            vec!["--keep-vars"],
            [
                format!("wrangler d1 migrations apply DB --remote -c {config}"),
                format!("wrangler deploy -c {config} --keep-vars"),
            ],
        ),
        // An environment's Worker has its environment's database.
        (
            vec!["--env", "staging"],
            [
                format!("wrangler d1 migrations apply DB --remote -c {config} --env staging"),
                format!("wrangler deploy -c {config} --env staging"),
            ],
        ),
    ] {
        let _ = std::fs::remove_file(&asked);
        let args: Vec<&str> = ["--config", config.as_str()]
            .into_iter()
            .chain(args)
            .collect();
        let out = deploy_with(&args, |cmd| {
            cmd.env("PATH", &path).env("NPX_ASKED", &asked);
        });
        let said = text(&out);
        assert!(out.status.success(), "{args:?}: {said}");
        let asked = std::fs::read_to_string(&asked).unwrap_or_default();
        let lines: Vec<&str> = asked.lines().collect();
        assert_eq!(lines, expected, "{args:?}: {said}");
    }
    let _ = std::fs::remove_dir_all(&bin);
}
