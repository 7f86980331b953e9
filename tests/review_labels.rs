//! The call-review page (`public/app.js`) names every code the Worker writes, in both of its
//! languages: call statuses, end reasons and event kinds. A code it does not name is shown
//! raw, so a new one added on the Rust side without a label fails here.

use phone_agent_bridge::admin::CALL_STATUSES;
use phone_agent_bridge::call::EndReason;
use phone_agent_bridge::store::EventKind;
use phone_agent_bridge::webhook;

const APP: &str = include_str!("../public/app.js");

/// The text of `table: { … }` inside the page's `CODES[lang]` (the tables hold no braces).
fn table(lang: &str, table: &str) -> &'static str {
    let codes = &APP[APP.find("const CODES = {").expect("CODES in app.js")..];
    let block = &codes[codes
        .find(&format!("\n  {lang}: {{"))
        .unwrap_or_else(|| panic!("CODES.{lang}"))..];
    let start = block
        .find(&format!("\n    {table}: {{"))
        .unwrap_or_else(|| panic!("CODES.{lang}.{table}"));
    let body = &block[start..];
    &body[..body.find('}').expect("the table's end")]
}

fn names(table: &str, code: &str) -> bool {
    [format!(" {code}:"), format!("'{code}':")]
        .iter()
        .any(|key| table.contains(key.as_str()))
}

fn check(what: &str, codes: &[&str]) {
    let mut missing = Vec::new();
    for lang in ["ja", "en"] {
        let t = table(lang, what);
        for code in codes {
            if !names(t, code) {
                missing.push(format!("CODES.{lang}.{what}.{code}"));
            }
        }
    }
    assert!(missing.is_empty(), "public/app.js lacks {missing:?}");
}

#[test]
fn every_call_status_has_a_label_in_both_languages() {
    check("status", &CALL_STATUSES);
}

#[test]
fn every_end_reason_has_a_label_in_both_languages() {
    let mut reasons = EndReason::LABELS.to_vec();
    reasons.extend([
        webhook::INTERRUPTED,
        webhook::FALLBACK_ONLY,
        webhook::OPENAI_URL_INVALID,
        webhook::NOT_REGISTERED,
        webhook::NEVER_STREAMED,
    ]);
    check("end", &reasons);
}

#[test]
fn every_event_kind_has_a_label_in_both_languages() {
    let kinds: Vec<_> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
    check("event", &kinds);
}

#[test]
fn the_check_finds_a_code_the_page_does_not_name() {
    assert!(names(table("en", "end"), "transferred"));
    assert!(!names(table("en", "end"), "no_such_reason"));
    assert!(!names(table("ja", "event"), "transfe"));
}

#[test]
fn the_status_filter_offers_exactly_the_statuses_the_api_takes() {
    let line = APP
        .lines()
        .find(|l| l.starts_with("const STATUSES = ["))
        .expect("STATUSES in app.js");
    let listed: Vec<&str> = line["const STATUSES = [".len()..line.rfind(']').unwrap()]
        .split(',')
        .map(|s| s.trim().trim_matches('\''))
        .collect();
    assert_eq!(listed, CALL_STATUSES);
}
