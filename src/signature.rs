//! Validation of Twilio's `X-Twilio-Signature` header.
//!
//! Twilio signs every webhook request, and the WebSocket upgrade of a Media Stream, with
//! HMAC-SHA1 keyed by the account's auth token. Checking it is the only thing that tells a
//! request really came from Twilio, so both the voice webhook and the `/media-stream`
//! upgrade must pass through here before the bridge spends any money on an OpenAI session.
//!
//! The algorithm is Twilio's `RequestValidator` (protocol.md B5): the signed string is the
//! full URL followed, for each unique parameter name in code-point order, by `name + value`
//! for each unique value of that name in sorted order. Because Twilio drops the port from
//! HTTPS voice callbacks but keeps it elsewhere, validation tries the URL as given, without
//! its port, and with the scheme's default port.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use std::collections::{BTreeMap, BTreeSet};

type HmacSha1 = Hmac<Sha1>;

/// Twilio's signature: base64 of HMAC-SHA1 over the URL followed by the sorted parameters.
///
/// `params` are the form (POST) parameters exactly as received; for a GET webhook they are
/// already in the URL's query string, so pass none.
pub fn compute(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    STANDARD.encode(mac(auth_token, url, params).finalize().into_bytes())
}

/// Whether `signature` (the `X-Twilio-Signature` header) is Twilio's signature of a webhook
/// request to `url` carrying the form parameters `params`.
///
/// `url` must be the public URL Twilio called (scheme, host, path and query string exactly as
/// configured), not one rebuilt by a proxy. An empty auth token never validates anything, and
/// a missing, empty or undecodable signature is simply invalid.
pub fn validate_webhook(
    auth_token: &str,
    url: &str,
    params: &[(String, String)],
    signature: &str,
) -> bool {
    matches_any(auth_token, &port_variants(url), params, signature)
}

/// Whether `signature` is Twilio's signature of the WebSocket upgrade request for a Media
/// Stream whose `<Stream url>` was `stream_url` (a `wss://` URL, exactly as written in the
/// TwiML: Twilio signs that text, so it must not be re-serialised or re-encoded).
///
/// The handshake carries no parameters. Twilio's docs advise also trying the URL with a
/// trailing `/`, and the port quirk of webhooks applies, so those variants are accepted too.
pub fn validate_stream_upgrade(auth_token: &str, stream_url: &str, signature: &str) -> bool {
    let mut candidates = port_variants(stream_url);
    if let Some(slashed) = with_trailing_slash(stream_url) {
        for candidate in port_variants(&slashed) {
            push_unique(&mut candidates, candidate);
        }
    }
    matches_any(auth_token, &candidates, &[], signature)
}

/// HMAC over the signed string, fed piecewise so the (possibly large) string is never built.
fn mac(auth_token: &str, url: &str, params: &[(String, String)]) -> HmacSha1 {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = HmacSha1::new_from_slice(auth_token.as_bytes())
        .expect("HMAC-SHA1 accepts keys of any length");
    mac.update(url.as_bytes());
    // `str`'s ordering is byte order, which for UTF-8 is code-point order: the
    // case-sensitive "Unix-style" sort Twilio uses. The sets drop duplicates as Twilio does.
    let mut by_name: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (name, value) in params {
        by_name.entry(name).or_default().insert(value);
    }
    for (name, values) in by_name {
        for value in values {
            mac.update(name.as_bytes());
            mac.update(value.as_bytes());
        }
    }
    mac
}

fn matches_any(
    auth_token: &str,
    candidates: &[String],
    params: &[(String, String)],
    signature: &str,
) -> bool {
    // With an empty key anyone could forge a signature, so a missing token must fail closed.
    if auth_token.is_empty() {
        return false;
    }
    let Some(expected) = decode_signature(signature) else {
        return false;
    };
    // `verify_slice` compares in constant time, so timing reveals nothing about the correct
    // signature; stopping at the first match only reveals which public URL variant matched.
    candidates
        .iter()
        .any(|url| mac(auth_token, url, params).verify_slice(&expected).is_ok())
}

fn decode_signature(signature: &str) -> Option<Vec<u8>> {
    let signature = signature.trim();
    if signature.is_empty() {
        return None;
    }
    STANDARD.decode(signature).ok()
}

/// The URL as given, then (when it can be parsed) the same without its port, or with the
/// scheme's default port added. Only the port is touched; every other byte is kept as is,
/// because any re-encoding would change what was signed.
fn port_variants(url: &str) -> Vec<String> {
    let mut out = vec![url.to_owned()];
    let Some(parts) = UrlParts::parse(url) else {
        return out;
    };
    match parts.port {
        Some(_) => push_unique(&mut out, parts.with_port(None)),
        None => {
            if let Some(default) = default_port(parts.scheme) {
                push_unique(&mut out, parts.with_port(Some(default)));
            }
        }
    }
    out
}

fn push_unique(list: &mut Vec<String>, item: String) {
    if !list.contains(&item) {
        list.push(item);
    }
}

/// Twilio's helper adds `:443` for `https` and `:80` for anything else; a `wss` URL would then
/// get `:80`, which is never right, so `wss` gets `:443` here and unknown schemes get nothing.
fn default_port(scheme: &str) -> Option<&'static str> {
    match scheme.to_ascii_lowercase().as_str() {
        "https" | "wss" => Some("443"),
        "http" | "ws" => Some("80"),
        _ => None,
    }
}

/// `url` with `/` appended to its path (before any query or fragment), or `None` when the
/// path already ends with one.
fn with_trailing_slash(url: &str) -> Option<String> {
    let path_end = url.find(['?', '#']).unwrap_or(url.len());
    let (head, tail) = url.split_at(path_end);
    if head.ends_with('/') {
        return None;
    }
    Some(format!("{head}/{tail}"))
}

/// `scheme://[userinfo@]host[:port]rest`, split only as far as needed to swap the port.
struct UrlParts<'a> {
    scheme: &'a str,
    /// Everything up to and including `userinfo@`, i.e. what precedes the host.
    before_host: &'a str,
    /// The host, brackets included for an IPv6 literal.
    host: &'a str,
    /// The digits after `host:`; `Some("")` for a bare `host:`.
    port: Option<&'a str>,
    /// Path, query and fragment: whatever follows the authority.
    rest: &'a str,
}

impl<'a> UrlParts<'a> {
    /// `None` for anything that is not an absolute URL with a sensible authority; such a
    /// URL is then only tried exactly as given.
    fn parse(url: &'a str) -> Option<Self> {
        let scheme_end = url.find("://")?;
        let scheme = &url[..scheme_end];
        let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        if !scheme_ok {
            return None;
        }
        let authority_start = scheme_end + 3;
        // As in urlparse, the authority runs until the path, query or fragment starts.
        let authority_len = url[authority_start..]
            .find(['/', '?', '#'])
            .unwrap_or(url.len() - authority_start);
        let authority_end = authority_start + authority_len;
        let authority = &url[authority_start..authority_end];
        // Userinfo may itself contain `:` (a password), so the host starts after the last `@`.
        let host_start = authority_start + authority.rfind('@').map_or(0, |at| at + 1);
        let host_port = &url[host_start..authority_end];

        let (host, port) = if host_port.starts_with('[') {
            // IPv6 literal: its colons are not a port separator.
            let close = host_port.find(']')?;
            let (host, after) = host_port.split_at(close + 1);
            match after {
                "" => (host, None),
                _ => (host, Some(after.strip_prefix(':')?)),
            }
        } else {
            match host_port.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (host_port, None),
            }
        };
        if host.is_empty() || port.is_some_and(|p| !p.bytes().all(|b| b.is_ascii_digit())) {
            return None;
        }
        Some(Self {
            scheme,
            before_host: &url[..host_start],
            host,
            port,
            rest: &url[authority_end..],
        })
    }

    fn with_port(&self, port: Option<&str>) -> String {
        match port {
            Some(port) => format!("{}{}:{}{}", self.before_host, self.host, port, self.rest),
            None => format!("{}{}{}", self.before_host, self.host, self.rest),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "12345";
    const VECTOR_URL: &str = "https://example.com/myapp.php?foo=1&bar=2";
    const VECTOR_SIGNATURE: &str = "L/OH5YylLD5NRKLltdqwSvS0BnU=";

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    fn vector_params() -> Vec<(String, String)> {
        params(&[
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+14158675310"),
            ("Digits", "1234"),
            ("From", "+14158675310"),
            ("To", "+18005551212"),
        ])
    }

    #[test]
    fn twilio_published_test_vector() {
        assert_eq!(
            compute(TOKEN, VECTOR_URL, &vector_params()),
            VECTOR_SIGNATURE
        );
        assert!(validate_webhook(
            TOKEN,
            VECTOR_URL,
            &vector_params(),
            VECTOR_SIGNATURE
        ));
    }

    #[test]
    fn parameter_order_does_not_matter() {
        let mut shuffled = vector_params();
        shuffled.reverse();
        shuffled.swap(0, 2);
        assert_eq!(compute(TOKEN, VECTOR_URL, &shuffled), VECTOR_SIGNATURE);
        assert!(validate_webhook(
            TOKEN,
            VECTOR_URL,
            &shuffled,
            VECTOR_SIGNATURE
        ));
    }

    #[test]
    fn repeated_names_and_values_are_sorted_and_deduplicated() {
        // Expected value computed independently (Python hmac) over
        // "https://example.com/hookB1ayazb2Äx": case-sensitive code-point order, duplicate
        // value "z" signed once.
        let url = "https://example.com/hook";
        let p = params(&[
            ("b", "2"),
            ("a", "z"),
            ("a", "y"),
            ("a", "z"),
            ("B", "1"),
            ("Ä", "x"),
        ]);
        assert_eq!(compute(TOKEN, url, &p), "knA4KPZEMDh4rLeu6HHoY0Jab4U=");
        let deduplicated = params(&[("Ä", "x"), ("a", "y"), ("B", "1"), ("a", "z"), ("b", "2")]);
        assert_eq!(compute(TOKEN, url, &p), compute(TOKEN, url, &deduplicated));
        // A repeated name with a value that is not a duplicate is part of what is signed.
        let mut extra = p.clone();
        extra.push(("a".into(), "w".into()));
        assert_ne!(compute(TOKEN, url, &p), compute(TOKEN, url, &extra));
    }

    #[test]
    fn query_string_is_part_of_what_is_signed() {
        let p = vector_params();
        let other_query = "https://example.com/myapp.php?foo=1&bar=3";
        let no_query = "https://example.com/myapp.php";
        assert!(!validate_webhook(TOKEN, other_query, &p, VECTOR_SIGNATURE));
        assert!(!validate_webhook(TOKEN, no_query, &p, VECTOR_SIGNATURE));
        assert_ne!(compute(TOKEN, no_query, &p), VECTOR_SIGNATURE);
    }

    #[test]
    fn signature_over_url_without_port_validates_request_with_port() {
        // Twilio drops the port from HTTPS voice callbacks before signing.
        let p = vector_params();
        let signed = compute(TOKEN, "https://example.com/myapp.php?foo=1&bar=2", &p);
        assert!(validate_webhook(
            TOKEN,
            "https://example.com:8443/myapp.php?foo=1&bar=2",
            &p,
            &signed
        ));
        assert!(validate_webhook(
            TOKEN,
            "https://example.com:443/myapp.php?foo=1&bar=2",
            &p,
            &signed
        ));
    }

    #[test]
    fn signature_over_url_with_default_port_validates_request_without_port() {
        let p = vector_params();
        let signed = compute(TOKEN, "https://example.com:443/myapp.php?foo=1&bar=2", &p);
        assert!(validate_webhook(TOKEN, VECTOR_URL, &p, &signed));
    }

    #[test]
    fn signature_with_explicit_port_validates_as_given() {
        let p = vector_params();
        let url = "https://example.com:8443/myapp.php";
        assert!(validate_webhook(TOKEN, url, &p, &compute(TOKEN, url, &p)));
        // A non-default port is never invented for a URL that has none.
        let signed = compute(TOKEN, url, &p);
        assert!(!validate_webhook(
            TOKEN,
            "https://example.com/myapp.php",
            &p,
            &signed
        ));
    }

    #[test]
    fn default_port_depends_on_scheme() {
        let p = vector_params();
        let http_80 = compute(TOKEN, "http://example.com:80/hook", &p);
        let http_443 = compute(TOKEN, "http://example.com:443/hook", &p);
        let https_443 = compute(TOKEN, "https://example.com:443/hook", &p);
        let https_80 = compute(TOKEN, "https://example.com:80/hook", &p);
        assert!(validate_webhook(
            TOKEN,
            "http://example.com/hook",
            &p,
            &http_80
        ));
        assert!(!validate_webhook(
            TOKEN,
            "http://example.com/hook",
            &p,
            &http_443
        ));
        assert!(validate_webhook(
            TOKEN,
            "https://example.com/hook",
            &p,
            &https_443
        ));
        assert!(!validate_webhook(
            TOKEN,
            "https://example.com/hook",
            &p,
            &https_80
        ));
    }

    #[test]
    fn port_variants_keep_userinfo_path_and_query() {
        assert_eq!(
            port_variants("https://user:pa:ss@example.com/a/b?x=1:2#f"),
            [
                "https://user:pa:ss@example.com/a/b?x=1:2#f",
                "https://user:pa:ss@example.com:443/a/b?x=1:2#f",
            ]
        );
        assert_eq!(
            port_variants("https://user:pw@example.com:8443?q=1"),
            [
                "https://user:pw@example.com:8443?q=1",
                "https://user:pw@example.com?q=1",
            ]
        );
        assert_eq!(
            port_variants("http://[::1]:8080/x"),
            ["http://[::1]:8080/x", "http://[::1]/x"]
        );
        assert_eq!(
            port_variants("wss://[::1]/x"),
            ["wss://[::1]/x", "wss://[::1]:443/x"]
        );
        // Not something we can split safely: only tried exactly as given.
        assert_eq!(port_variants("/relative/path"), ["/relative/path"]);
        assert_eq!(
            port_variants("https://example.com:abc/x"),
            ["https://example.com:abc/x"]
        );
    }

    #[test]
    fn wrong_token_is_rejected() {
        assert!(!validate_webhook(
            "54321",
            VECTOR_URL,
            &vector_params(),
            VECTOR_SIGNATURE
        ));
    }

    #[test]
    fn tampered_parameter_is_rejected() {
        let mut p = vector_params();
        p[2].1 = "1235".into();
        assert!(!validate_webhook(TOKEN, VECTOR_URL, &p, VECTOR_SIGNATURE));

        let mut added = vector_params();
        added.push(("Extra".into(), "1".into()));
        assert!(!validate_webhook(
            TOKEN,
            VECTOR_URL,
            &added,
            VECTOR_SIGNATURE
        ));

        let removed = &vector_params()[1..];
        assert!(!validate_webhook(
            TOKEN,
            VECTOR_URL,
            removed,
            VECTOR_SIGNATURE
        ));
    }

    #[test]
    fn missing_garbage_or_empty_signature_is_rejected() {
        let p = vector_params();
        for signature in [
            "",
            "   ",
            "not base64 at all!",
            "L/OH5YylLD5NRKLltdqwSvS0BnU",  // padding removed
            "L/OH5YylLD5NRKLltdqwSvS0BnV=", // last character changed
            "L/OH5YylLD5NRKLltdqwSvS0",     // truncated tag
            "AAAAAAAAAAAAAAAAAAAAAAAAAAA=", // right length, wrong value
            "L/OH5YylLD5NRKLltdqwSvS0BnUAAAA=",
        ] {
            assert!(
                !validate_webhook(TOKEN, VECTOR_URL, &p, signature),
                "{signature:?} must not validate"
            );
        }
    }

    #[test]
    fn empty_token_never_validates() {
        let p = vector_params();
        let forged = compute("", VECTOR_URL, &p);
        assert!(!validate_webhook("", VECTOR_URL, &p, &forged));
        let forged = compute("", "wss://bridge.example.com/media-stream", &[]);
        assert!(!validate_stream_upgrade(
            "",
            "wss://bridge.example.com/media-stream",
            &forged
        ));
    }

    #[test]
    fn stream_upgrade_signature_variants() {
        let url = "wss://bridge.example.com/media-stream";
        // Expected value computed independently (Python hmac) over the URL with a trailing `/`.
        let slashed = "cqSp4sENsUimjXHvwr/JyHT2cuM=";
        assert_eq!(
            compute(TOKEN, "wss://bridge.example.com/media-stream/", &[]),
            slashed
        );
        assert!(validate_stream_upgrade(TOKEN, url, slashed));

        let exact = compute(TOKEN, url, &[]);
        assert!(validate_stream_upgrade(TOKEN, url, &exact));

        let with_port = compute(TOKEN, "wss://bridge.example.com:443/media-stream", &[]);
        assert!(validate_stream_upgrade(TOKEN, url, &with_port));
        let with_port_slashed = compute(TOKEN, "wss://bridge.example.com:443/media-stream/", &[]);
        assert!(validate_stream_upgrade(TOKEN, url, &with_port_slashed));

        // The port quirk works the other way round too.
        let url_with_port = "wss://bridge.example.com:443/media-stream";
        assert!(validate_stream_upgrade(TOKEN, url_with_port, &exact));

        // `wss` is never given `:80`, and an `https` rewrite of the URL is a different string.
        let port_80 = compute(TOKEN, "wss://bridge.example.com:80/media-stream", &[]);
        assert!(!validate_stream_upgrade(TOKEN, url, &port_80));
        let https = compute(TOKEN, "https://bridge.example.com/media-stream", &[]);
        assert!(!validate_stream_upgrade(TOKEN, url, &https));

        assert!(!validate_stream_upgrade("54321", url, &exact));
        assert!(!validate_stream_upgrade(TOKEN, url, ""));
        assert!(!validate_stream_upgrade(TOKEN, url, "garbage"));
    }

    #[test]
    fn stream_upgrade_with_host_only_url_tries_root_slash() {
        let url = "wss://bridge.example.com";
        let signed = compute(TOKEN, "wss://bridge.example.com/", &[]);
        assert!(validate_stream_upgrade(TOKEN, url, &signed));
        // An already slashed URL is not given a second slash.
        assert_eq!(with_trailing_slash("wss://h/p/"), None);
        assert_eq!(
            with_trailing_slash("wss://h/p?x=1").as_deref(),
            Some("wss://h/p/?x=1")
        );
    }
}
