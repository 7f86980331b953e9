//! Launches the real Worker under `wrangler dev` for the end-to-end tests.
//!
//! wrangler runs the `[build]` command itself (the wasm build takes a minute or more), so one
//! Worker is started per test binary and shared. wrangler and its workerd children run in a
//! process group of their own, led by a small bash watchdog that takes the group down when the
//! test process goes away: statics are never dropped, so `Drop` alone cannot stop a shared
//! Worker. A `WorkerProcess` that is dropped kills its group too.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the build plus startup may take.
pub const READY_TIMEOUT: Duration = Duration::from_secs(300);

/// Settings for one `wrangler dev`.
pub struct WorkerConfig {
    /// The repository root (where wrangler.toml is).
    pub root: PathBuf,
    /// `--var KEY:VALUE` pairs.
    pub vars: Vec<(String, String)>,
    /// Where the log file and the `--persist-to` state go.
    pub scratch_dir: PathBuf,
}

/// A running `wrangler dev`.
pub struct WorkerProcess {
    pub port: u16,
    pub inspector_port: u16,
    pub log_path: PathBuf,
    pub persist_dir: PathBuf,
    child: Child,
}

/// Ports this test process has handed out: to `wrangler dev` and stand-ins ([`free_port`],
/// released before their user binds them) and to the fakes ([`local_listener`], held).
static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());

/// A listener on 127.0.0.1 whose port this test process has not handed out before. The
/// kernel may give a port that [`free_port`] just released to the next bind :0, before its
/// user (`wrangler dev`, the simulator's stand-in) has bound it: such a port is passed over.
pub fn local_listener(what: &str) -> std::net::TcpListener {
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    // Ports passed over stay bound until one is found, so the kernel offers others.
    let mut passed_over = Vec::new();
    loop {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("bind {what} on 127.0.0.1: {e}"));
        let port = listener.local_addr().expect("bound address").port();
        if !given.contains(&port) {
            given.push(port);
            return listener;
        }
        passed_over.push(listener);
    }
}

/// A port that was free a moment ago and that no one else in this test process was given
/// (see [`local_listener`]); released, for a process that binds it itself.
pub fn free_port() -> u16 {
    local_listener("a free port")
        .local_addr()
        .expect("bound address")
        .port()
}

/// Remove ANSI escape sequences (wrangler colours its warnings even with NO_COLOR).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // Parameters and intermediates, then one final byte in @..~.
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn npx(root: &Path) -> Command {
    let mut c = Command::new("npx");
    c.current_dir(root)
        .env("CI", "true")
        .env("WRANGLER_SEND_METRICS", "false")
        .env("NO_COLOR", "1")
        .env("FORCE_COLOR", "0");
    c
}

impl WorkerProcess {
    /// Apply local D1 migrations (when there are any), start `wrangler dev`, and wait until
    /// `GET /healthz` answers 200.
    ///
    /// On a loaded machine wrangler's watcher can report `src/` changed while the dev server
    /// is still starting (nothing changed); the restart then races the first workerd for its
    /// port and wrangler exits. That start is tried once more, on fresh ports; any other
    /// failure, or the same one twice, fails the test.
    pub async fn start(cfg: WorkerConfig) -> Result<WorkerProcess, String> {
        match Self::start_once(&cfg, "wrangler.log").await {
            Err(e) if e.contains("exited") && e.contains("restarting build") => {
                eprintln!(
                    "[e2e] wrangler dev restarted itself while starting and exited; once more:\n{e}"
                );
                Self::start_once(&cfg, "wrangler-again.log").await
            }
            started => started,
        }
    }

    async fn start_once(cfg: &WorkerConfig, log_name: &str) -> Result<WorkerProcess, String> {
        fs::create_dir_all(&cfg.scratch_dir).map_err(|e| e.to_string())?;
        let persist_dir = cfg.scratch_dir.join("state");
        let log_path = cfg.scratch_dir.join(log_name);
        fs::create_dir_all(&persist_dir).map_err(|e| e.to_string())?;

        apply_migrations(
            &cfg.root,
            &persist_dir,
            &cfg.scratch_dir.join("migrations.log"),
        )?;

        let port = free_port();
        let inspector_port = free_port();
        let mut args: Vec<String> = vec![
            "wrangler".into(),
            "dev".into(),
            "--ip".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
            "--inspector-port".into(),
            inspector_port.to_string(),
            "--persist-to".into(),
            persist_dir.display().to_string(),
            "--show-interactive-dev-session=false".into(),
        ];
        for (k, v) in &cfg.vars {
            args.push("--var".into());
            args.push(format!("{k}:{v}"));
        }
        let wrangler_cmd = std::iter::once("npx".to_string())
            .chain(args.iter().cloned())
            .map(|a| sh_quote(&a))
            .collect::<Vec<_>>()
            .join(" ");
        // The watchdog: run wrangler in the background, then wait for either wrangler or the
        // test process to end, and take the whole group down. The TERM trap is set after
        // wrangler started so wrangler keeps the default TERM action.
        let script = format!(
            r#"{wrangler_cmd} </dev/null &
W=$!
trap '' TERM
while kill -0 "$W" 2>/dev/null && kill -0 {test_pid} 2>/dev/null; do sleep 0.5; done
kill -TERM -- -$$ 2>/dev/null
sleep 3
kill -KILL -- -$$ 2>/dev/null
"#,
            test_pid = std::process::id()
        );
        let log =
            File::create(&log_path).map_err(|e| format!("create {}: {e}", log_path.display()))?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new("bash");
        cmd.arg("-c")
            .arg(&script)
            .current_dir(&cfg.root)
            .env("CI", "true")
            .env("WRANGLER_SEND_METRICS", "false")
            .env("NO_COLOR", "1")
            .env("FORCE_COLOR", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        let child = cmd.spawn().map_err(|e| format!("spawn wrangler: {e}"))?;
        let mut worker = WorkerProcess {
            port,
            inspector_port,
            log_path,
            persist_dir,
            child,
        };
        worker.wait_ready(READY_TIMEOUT).await?;
        Ok(worker)
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Everything wrangler (and the Worker's console.log) printed so far, without terminal
    /// colour codes.
    pub fn log(&self) -> String {
        let raw = fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        strip_ansi(&raw)
    }

    /// The first line of the log `found` accepts, and its place in the log, waiting up to
    /// [`super::SOON`] for it (the log comes through a pipe); panics naming `what`.
    pub async fn wait_for_line(&self, what: &str, found: impl Fn(&str) -> bool) -> (usize, String) {
        let deadline = Instant::now() + super::SOON;
        loop {
            if let Some((at, line)) = self.log().lines().enumerate().find(|(_, l)| found(l)) {
                return (at, line.to_owned());
            }
            assert!(
                Instant::now() < deadline,
                "{what} not logged:\n{}",
                self.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// How many lines of the log `found` accepts.
    pub fn count_lines(&self, found: impl Fn(&str) -> bool) -> usize {
        self.log().lines().filter(|l| found(l)).count()
    }

    /// Waits up to [`super::SOON`] until more than `than` lines of the log are ones `found`
    /// accepts; panics naming `what`.
    pub async fn wait_for_more_lines(&self, what: &str, than: usize, found: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + super::SOON;
        while self.count_lines(&found) <= than {
            assert!(
                Instant::now() < deadline,
                "{what} not logged:\n{}",
                self.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last `n` lines of the log (for failure messages), with a warning when wrangler
    /// restarted the Worker during the run (it watches `src/`: editing the sources while the
    /// tests run reloads the Worker and breaks calls in flight).
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let mut tail = lines[lines.len().saturating_sub(n)..].join("\n");
        let after_ready = log.find("Ready on").map(|i| &log[i..]).unwrap_or("");
        if after_ready.contains("restarting build") {
            tail.push_str(
                "\n[e2e] NOTE: wrangler rebuilt and restarted the Worker during this run \
                 (a file under src/ changed); calls in flight were cut.",
            );
        }
        tail
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let url = format!("{}/healthz", self.base_url());
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| e.to_string())?;
        let started = Instant::now();
        let mut last = String::from("no answer yet");
        while started.elapsed() < timeout {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "wrangler dev exited ({status}) before /healthz answered 200; log {}:\n{}",
                    self.log_path.display(),
                    self.log_tail(80)
                ));
            }
            match client.get(&url).send().await {
                Ok(r) if r.status().as_u16() == 200 => {
                    eprintln!(
                        "[e2e] Worker ready on port {} after {:.1}s (log: {})",
                        self.port,
                        started.elapsed().as_secs_f64(),
                        self.log_path.display()
                    );
                    return Ok(());
                }
                Ok(r) => last = format!("status {}", r.status()),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Err(format!(
            "GET {url} did not answer 200 within {timeout:?} (last: {last}); log {}:\n{}",
            self.log_path.display(),
            self.log_tail(80)
        ))
    }

    /// Stop the whole process group (wrangler, workerd, the watchdog).
    pub fn kill(&mut self) {
        let pgid = self.child.id();
        let _ = Command::new("kill")
            .args(["-TERM", "--", &format!("-{pgid}")])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pgid}")])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `wrangler d1 migrations apply DB --local` into the same state directory, when the repo has
/// `.sql` migrations.
pub fn apply_migrations(root: &Path, persist_dir: &Path, log_path: &Path) -> Result<(), String> {
    let dir = root.join("migrations");
    let has_sql = fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .any(|e| e.path().extension().is_some_and(|x| x == "sql"))
        })
        .unwrap_or(false);
    if !has_sql {
        return Ok(());
    }
    let log = File::create(log_path).map_err(|e| e.to_string())?;
    let log2 = log.try_clone().map_err(|e| e.to_string())?;
    let status = npx(root)
        .args([
            "wrangler",
            "d1",
            "migrations",
            "apply",
            "DB",
            "--local",
            "--persist-to",
        ])
        .arg(persist_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        .status()
        .map_err(|e| format!("spawn wrangler d1 migrations apply: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "wrangler d1 migrations apply DB --local failed ({status}):\n{}",
            fs::read_to_string(log_path).unwrap_or_default()
        ))
    }
}

/// A copy of the built Worker in a directory of its own, served by a `wrangler dev` that can
/// be made to reload it (as a new deploy does) without touching anything other Workers serve.
///
/// It holds the repository's `wrangler.toml` without its `[build]` table (so a reload never
/// rebuilds the crate) and a copy of `build/`; migrations, static assets and `node_modules`
/// are links to the repository's. wrangler watches the bundle's inputs: [`Deployment::redeploy`]
/// rewrites `build/index.js`, and wrangler rebundles and restarts workerd, which drops every
/// socket and restarts every Durable Object, keeping their storage.
pub struct Deployment {
    pub dir: PathBuf,
    deploys: std::cell::Cell<u32>,
}

impl Deployment {
    /// Copy the repository's built Worker (`build/`) to `dir`, building it first when the
    /// sources are newer (as `wrangler dev` does; a no-op when it is up to date).
    pub fn copy_of(root: &Path, dir: &Path) -> Result<Deployment, String> {
        let err =
            |what: &str, e: std::io::Error| format!("deployment {}: {what}: {e}", dir.display());
        let built = Command::new("bash")
            .arg("scripts/build.sh")
            .current_dir(root)
            .env("WRANGLER_COMMAND", "dev")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| err("run scripts/build.sh", e))?;
        if !built.status.success() {
            return Err(format!(
                "scripts/build.sh failed:\n{}",
                String::from_utf8_lossy(&built.stderr)
            ));
        }
        let build = root.join("build");
        for f in ["index.js", "index_bg.wasm"] {
            if !build.join(f).is_file() {
                return Err(format!(
                    "{} is missing: build the Worker first (bash scripts/build.sh)",
                    build.join(f).display()
                ));
            }
        }
        fs::create_dir_all(dir).map_err(|e| err("create", e))?;
        copy_dir(&build, &dir.join("build")).map_err(|e| err("copy build/", e))?;
        for link in ["migrations", "public", "node_modules"] {
            std::os::unix::fs::symlink(root.join(link), dir.join(link))
                .map_err(|e| err(link, e))?;
        }
        let toml = fs::read_to_string(root.join("wrangler.toml"))
            .map_err(|e| err("read wrangler.toml", e))?;
        let toml = without_table(&toml, "build")?;
        fs::write(dir.join("wrangler.toml"), toml).map_err(|e| err("write wrangler.toml", e))?;
        Ok(Deployment {
            dir: dir.to_owned(),
            deploys: std::cell::Cell::new(0),
        })
    }

    /// Rewrite the deployment's `wrangler.toml` through `edit` (before its Worker starts, or
    /// while it runs: wrangler then reloads it).
    pub fn edit_config(&self, edit: impl FnOnce(String) -> String) -> Result<(), String> {
        let path = self.dir.join("wrangler.toml");
        let toml = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        replace_file(&path, &edit(toml))
    }

    /// Rewrite the bundle's entry (same code, one comment more) so wrangler reloads it.
    pub fn redeploy(&self) -> Result<(), String> {
        let n = self.deploys.get() + 1;
        self.deploys.set(n);
        let entry = self.dir.join("build/index.js");
        let mut js = fs::read_to_string(&entry).map_err(|e| format!("{}: {e}", entry.display()))?;
        js.push_str(&format!("\n// e2e redeploy {n}\n"));
        replace_file(&entry, &js)
    }
}

/// Writes `path` whole, as one change: a file written in place is empty for a moment, and
/// wrangler's watcher, reading it then, fails the reload ("Missing entry-point").
fn replace_file(path: &Path, contents: &str) -> Result<(), String> {
    let tmp = path.with_extension("e2e-tmp");
    fs::write(&tmp, contents).map_err(|e| format!("{}: {e}", tmp.display()))?;
    fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// `toml` without the top-level table `[name]` (its header and keys, up to the next header).
fn without_table(toml: &str, name: &str) -> Result<String, String> {
    let header = format!("[{name}]");
    let mut out = String::with_capacity(toml.len());
    let (mut skipping, mut found) = (false, false);
    for line in toml.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            skipping = t == header;
            found |= skipping;
        }
        if !skipping {
            out.push_str(line);
            out.push('\n');
        }
    }
    if found {
        Ok(out)
    } else {
        Err(format!("wrangler.toml has no {header} table"))
    }
}
