//! Checks the `[vars]` of a wrangler config as the Worker will read them, before they are
//! deployed: `cargo run --bin check-config -- wrangler.toml [--env NAME]`. `scripts/deploy.sh`
//! runs it and refuses to deploy on a finding.
//!
//! The Worker answers calls whatever its settings: an invalid value is set aside for its
//! default and logged as `config.ignored` on every request. That keeps calls answered, but
//! the setting silently does nothing; here it stops the deploy instead. Also refused: a
//! variable the Worker does not read (a misspelt name would do nothing), and a secret
//! written into `[vars]` (it would be committed with the file).
//!
//! Exit status: 0 when every setting is used as written, 1 on a finding, 2 when the file
//! cannot be read.

#[cfg(target_arch = "wasm32")]
fn main() {}

#[cfg(not(target_arch = "wasm32"))]
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (path, env) = match args.as_slice() {
        [path] => (path.as_str(), None),
        [path, flag, name] if flag == "--env" => (path.as_str(), Some(name.as_str())),
        _ => {
            eprintln!("usage: check-config WRANGLER_TOML [--env NAME]");
            std::process::exit(2);
        }
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("check-config: cannot read {path}: {e}");
            std::process::exit(2);
        }
    };
    match check::findings(&text, env) {
        Err(e) => {
            eprintln!("check-config: {path}: {e}");
            std::process::exit(2);
        }
        Ok((read, findings)) if findings.is_empty() => {
            println!("check-config: {path}: {read} settings in [vars], each used as written");
        }
        Ok((_, findings)) => {
            for f in &findings {
                eprintln!("  {f}");
            }
            eprintln!(
                "check-config: {path}: {} setting(s) above would not be used as written; fix \
                 them before deploying",
                findings.len()
            );
            std::process::exit(1);
        }
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod check {
    use phone_agent_bridge::config::Bridge;
    use std::cell::RefCell;
    use std::collections::BTreeSet;

    /// Read by the Worker outside the bridge's configuration.
    const OTHER_SETTINGS: &[&str] = &["FAULT_INJECT_D1_FAILURES"];
    /// Set with `wrangler secret put` (or `.dev.vars` locally), never in the committed file.
    const SECRETS: &[&str] = &["OPENAI_API_KEY", "TWILIO_AUTH_TOKEN", "ADMIN_TOKEN"];

    /// How many settings the `[vars]` (of `env`, when given: wrangler does not inherit
    /// `[vars]` into an environment) hold, and what is wrong with them.
    pub fn findings(text: &str, env: Option<&str>) -> Result<(usize, Vec<String>), String> {
        let doc: toml::Table = text.parse().map_err(|e| format!("not TOML: {e}"))?;
        let scope = match env {
            None => &doc,
            Some(name) => doc
                .get("env")
                .and_then(|e| e.get(name))
                .and_then(|e| e.as_table())
                .ok_or_else(|| format!("no [env.{name}]"))?,
        };
        let empty = toml::Table::new();
        let vars = match scope.get("vars") {
            None => &empty,
            Some(v) => v.as_table().ok_or("[vars] is not a table")?,
        };
        // As the Worker reads them: text as is, a number or boolean as written, anything
        // else as JSON (see `setting` in src/cloudflare/mod.rs).
        let text_of = |v: &toml::Value| match v {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => serde_json::to_string(other).unwrap_or_default(),
        };
        let asked = RefCell::new(BTreeSet::new());
        let config = Bridge::from_lookup(|name| {
            asked.borrow_mut().insert(name.to_owned());
            vars.get(name).map(text_of)
        });
        let mut findings: Vec<String> = config
            .ignored
            .iter()
            .map(|e| format!("{}: {}", e.field, e.reason))
            .collect();
        let asked = asked.into_inner();
        for (name, value) in vars {
            if SECRETS.contains(&name.as_str()) {
                if !text_of(value).trim().is_empty() {
                    findings.push(format!(
                        "{name}: a secret; remove it from [vars] and set it with \
                         `npx wrangler secret put {name}`"
                    ));
                }
            } else if !asked.contains(name) && !OTHER_SETTINGS.contains(&name.as_str()) {
                findings.push(format!(
                    "{name}: not a setting of this Worker (misspelt?); see the README's \
                     Configuration"
                ));
            }
        }
        Ok((vars.len(), findings))
    }
}
