//! Checks the `[vars]` of a wrangler config as the Worker will read them, before they are
//! deployed: `cargo run --bin check-config -- wrangler.toml [--env NAME] [--var KEY:VALUE]...`
//! (`--var` as `wrangler deploy --var` sets it). `scripts/deploy.sh` runs it and refuses to
//! deploy on a finding.
//!
//! The Worker answers calls whatever its settings: an invalid value is set aside for its
//! default and logged as `config.ignored` on every request. That keeps calls answered, but
//! the setting silently does nothing; here it stops the deploy instead. Also refused: a
//! variable the Worker does not read (a misspelt name would do nothing), a secret written
//! into any `[vars]` of the file (it would be committed with it), and the D1 fault-injection
//! test hooks.
//!
//! Exit status: 0 when every setting is used as written, 1 on a finding, 2 when the file
//! cannot be read.

#[cfg(target_arch = "wasm32")]
fn main() {}

#[cfg(not(target_arch = "wasm32"))]
fn main() {
    let mut args = std::env::args().skip(1);
    let usage = || -> ! {
        eprintln!("usage: check-config WRANGLER_TOML [--env NAME] [--var KEY:VALUE]...");
        std::process::exit(2);
    };
    let path = args.next().unwrap_or_else(|| usage());
    let (mut env, mut overrides) = (None, Vec::new());
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--env" => env = Some(value),
            "--var" => match value.split_once(':') {
                Some((k, v)) => overrides.push((k.to_owned(), v.to_owned())),
                None => usage(),
            },
            _ => usage(),
        }
    }
    let path = path.as_str();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("check-config: cannot read {path}: {e}");
            std::process::exit(2);
        }
    };
    match check::findings(&text, env.as_deref(), &overrides) {
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
    use phone_agent_bridge::config::{Bridge, Setting, FAULT_HOOKS, SECRETS};
    use std::cell::RefCell;
    use std::collections::BTreeSet;

    /// A value as the Worker reads it: text as is, a number or boolean as written, anything
    /// else (a table, an array, a date) not text (see `setting` in src/cloudflare/mod.rs).
    fn setting(v: &toml::Value) -> Setting {
        match v {
            toml::Value::String(s) => Setting::Text(s.clone()),
            toml::Value::Integer(i) => Setting::Text(i.to_string()),
            toml::Value::Float(f) => Setting::Text(f.to_string()),
            toml::Value::Boolean(b) => Setting::Text(b.to_string()),
            other => Setting::NotText(serde_json::to_string(other).unwrap_or_default()),
        }
    }

    /// How many settings the `[vars]` (of `env`, when given: wrangler does not inherit
    /// `[vars]` into an environment), with `overrides` (`wrangler deploy --var`) on top,
    /// hold, and what is wrong with them.
    pub fn findings(
        text: &str,
        env: Option<&str>,
        overrides: &[(String, String)],
    ) -> Result<(usize, Vec<String>), String> {
        let doc: toml::Table = text.parse().map_err(|e| format!("not TOML: {e}"))?;
        let envs = doc.get("env").and_then(|e| e.as_table());
        let scope = match env {
            None => &doc,
            Some(name) => envs
                .and_then(|e| e.get(name))
                .and_then(|e| e.as_table())
                .ok_or_else(|| format!("no [env.{name}]"))?,
        };
        let vars_of = |t: &toml::Table| -> Result<toml::Table, String> {
            match t.get("vars") {
                None => Ok(toml::Table::new()),
                Some(v) => v
                    .as_table()
                    .cloned()
                    .ok_or_else(|| "[vars] is not a table".to_owned()),
            }
        };
        let mut vars = vars_of(scope)?;
        for (k, v) in overrides {
            vars.insert(k.clone(), toml::Value::String(v.clone()));
        }
        let asked = RefCell::new(BTreeSet::new());
        let config = Bridge::from_lookup(|name| {
            asked.borrow_mut().insert(name.to_owned());
            vars.get(name).map(setting)
        });
        let mut findings: Vec<String> = config
            .ignored
            .iter()
            .map(|e| format!("{}: {}", e.field, e.reason))
            .collect();
        let asked = asked.into_inner();
        for name in vars.keys() {
            let known = FAULT_HOOKS.iter().any(|(hook, _)| hook == name)
                || SECRETS.contains(&name.as_str());
            if !asked.contains(name) && !known {
                findings.push(format!(
                    "{name}: not a setting of this Worker (misspelt?); see the README's \
                     Configuration"
                ));
            }
        }
        for (hook, what) in FAULT_HOOKS {
            if let Some(v) = vars.get(*hook) {
                if !matches!(setting(v), Setting::Text(t) if matches!(t.trim(), "" | "0")) {
                    findings.push(format!("{hook}: a test hook ({what}); leave it unset"));
                }
            }
        }
        // A secret in any [vars] of the file is committed with it, and even empty it takes
        // the name `wrangler secret put` needs.
        let mut tables = vec![("[vars]".to_owned(), vars_of(&doc)?)];
        for (name, e) in envs.into_iter().flatten() {
            if let Some(t) = e.as_table() {
                tables.push((format!("[env.{name}.vars]"), vars_of(t)?));
            }
        }
        for (table, vars) in &tables {
            for name in vars.keys().filter(|k| SECRETS.contains(&k.as_str())) {
                findings.push(format!(
                    "{name} in {table}: a secret; remove it and set it with \
                     `npx wrangler secret put {name}`"
                ));
            }
        }
        Ok((vars.len(), findings))
    }
}
