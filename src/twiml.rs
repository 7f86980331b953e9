//! TwiML documents the bridge answers Twilio's voice webhook with.
//!
//! [`connect_stream`] hands the call to the bridge's Media Stream WebSocket; [`fallback`]
//! is what the caller hears when the bridge cannot take the call (or is transferring it).
//! Every attribute and text value passes through [`quick_xml::escape::escape`], and
//! characters XML cannot carry at all are dropped first, so caller-supplied strings can
//! never change the structure of the document or make it unparseable.

use quick_xml::escape::escape;

const XML_DECLARATION: &str = r#"<?xml version="1.0" encoding="UTF-8"?>"#;

/// Twilio: "The combined length of each `<Parameter>` `name` and `value` attributes must be
/// under 500 characters." The bridge measures in UTF-8 bytes (see [`connect_stream`]).
pub const PARAMETER_MAX_LEN: usize = 499;

/// `<Connect><Stream url=…>` with one `<Parameter>` per `(name, value)` pair, in order.
///
/// `stream_url` must be the `wss://` URL of the bridge without a query string (Twilio does not
/// support one; ids and tokens go in `parameters` and arrive in the `start` frame's
/// `customParameters`). Keep the exact string: the upgrade signature is computed over it.
///
/// Twilio rejects a `<Parameter>` whose name and value together reach 500 characters, so:
/// - a value is truncated (on a char boundary) until `name + value` is at most
///   [`PARAMETER_MAX_LEN`] **UTF-8 bytes**. Bytes are never fewer than chars or UTF-16 units,
///   so the result is under the limit however Twilio counts; the price is that non-ASCII
///   values are cut earlier than strictly necessary;
/// - a parameter whose name is empty, or alone leaves no room for a value, is left out.
///
/// The lengths are those of the unescaped values, which is what Twilio sees after parsing.
pub fn connect_stream(stream_url: &str, parameters: &[(&str, &str)]) -> String {
    let mut out = connect_stream_open(stream_url, parameters);
    out.push_str("</Response>");
    out
}

/// [`connect_stream`] followed by the [`fallback`] verbs. Twilio runs what follows
/// `</Connect>` once the bridge closes the stream, so when the agent side fails mid-call
/// the caller hears the apology (and is transferred) instead of silence; when the caller
/// hangs up, nothing follows.
pub fn connect_stream_then_fallback(
    stream_url: &str,
    parameters: &[(&str, &str)],
    apology: &Apology<'_>,
    dial_number: Option<&str>,
    dial_action: Option<&str>,
) -> String {
    let mut out = connect_stream_open(stream_url, parameters);
    fallback_verbs(&mut out, apology, dial_number, dial_action);
    out.push_str("</Response>");
    out
}

/// The document up to and including `</Connect>`.
fn connect_stream_open(stream_url: &str, parameters: &[(&str, &str)]) -> String {
    let mut out = String::from(XML_DECLARATION);
    out.push_str("<Response><Connect><Stream url=\"");
    out.push_str(&attribute(stream_url));
    out.push_str("\">");
    for &(name, value) in parameters {
        let name = xml_chars(name);
        if name.is_empty() || name.len() >= PARAMETER_MAX_LEN {
            continue;
        }
        let value = xml_chars(value);
        let value = truncate(&value, PARAMETER_MAX_LEN - name.len());
        out.push_str("<Parameter name=\"");
        out.push_str(&attribute(&name));
        out.push_str("\" value=\"");
        out.push_str(&attribute(value));
        out.push_str("\"/>");
    }
    out.push_str("</Stream></Connect>");
    out
}

/// What the caller hears when the agent cannot take (or keep) the call: `message`, read by
/// Twilio's text-to-speech `voice` in `language`. Twilio's default voice (`man`) speaks
/// only a few languages and fails the `<Say>` on others, Japanese among them, so the
/// bridge always names one (a Japanese Amazon Polly voice unless configured otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Apology<'a> {
    pub message: &'a str,
    pub language: &'a str,
    pub voice: &'a str,
}

/// `<Response><Say language=… voice=…>message</Say><Dial>number</Dial></Response>`: the
/// apology, then a transfer to `dial_number`.
///
/// `<Dial>` is emitted only for a non-blank number; without one the call ends after the
/// message. A blank message emits no `<Say>` (an empty one says nothing and risks a TwiML
/// error); a blank language or voice omits that attribute. With `dial_action` (the
/// transfer-result URL), Twilio asks it what to do once the person's line ends, as for a
/// transfer: the caller hears why when nobody answered, instead of being cut off.
pub fn fallback(
    apology: &Apology<'_>,
    dial_number: Option<&str>,
    dial_action: Option<&str>,
) -> String {
    let mut out = String::from("<Response>");
    fallback_verbs(&mut out, apology, dial_number, dial_action);
    out.push_str("</Response>");
    out
}

/// `<Response><Dial action=… method="POST">number</Dial></Response>`: the agent's transfer
/// to a person. When the person's line ends (answered and hung up, busy, no answer, failed)
/// Twilio asks `action` what to do with the caller (see [`transfer_result`]); without it, a
/// transfer nobody answers would simply hang up on the caller.
pub fn transfer(number: &str, action: &str) -> String {
    let mut out = String::from("<Response>");
    dial_verb(&mut out, Some(number), Some(action));
    out.push_str("</Response>");
    out
}

/// The answer to a transfer's `<Dial action>`: when the person answered, the call ends with
/// them (`<Hangup/>`); when they did not, the caller hears `apology` first.
pub fn transfer_result(answered: bool, apology: &Apology<'_>) -> String {
    let mut out = String::from(XML_DECLARATION);
    out.push_str("<Response>");
    if !answered {
        say_verb(&mut out, apology);
    }
    out.push_str("<Hangup/></Response>");
    out
}

fn fallback_verbs(
    out: &mut String,
    apology: &Apology<'_>,
    dial_number: Option<&str>,
    dial_action: Option<&str>,
) {
    say_verb(out, apology);
    dial_verb(out, dial_number, dial_action);
}

fn say_verb(out: &mut String, apology: &Apology<'_>) {
    if !apology.message.trim().is_empty() {
        out.push_str("<Say");
        for (name, value) in [("language", apology.language), ("voice", apology.voice)] {
            let value = value.trim();
            if !value.is_empty() {
                out.push(' ');
                out.push_str(name);
                out.push_str("=\"");
                out.push_str(&attribute(value));
                out.push('"');
            }
        }
        out.push('>');
        out.push_str(&text(apology.message));
        out.push_str("</Say>");
    }
}

/// `<Dial>number</Dial>`, with `action=… method="POST"` when there is an action.
fn dial_verb(out: &mut String, dial_number: Option<&str>, action: Option<&str>) {
    if let Some(number) = dial_number.map(str::trim).filter(|n| !n.is_empty()) {
        out.push_str("<Dial");
        if let Some(action) = action {
            out.push_str(" action=\"");
            out.push_str(&attribute(action));
            out.push_str("\" method=\"POST\"");
        }
        out.push('>');
        out.push_str(&text(number));
        out.push_str("</Dial>");
    }
}

/// An escaped attribute value. Besides `escape`, literal tab, newline and carriage return are
/// written as character references because a parser turns them into spaces inside attributes.
fn attribute(raw: &str) -> String {
    escape(xml_chars(raw))
        .replace('\t', "&#9;")
        .replace('\n', "&#10;")
        .replace('\r', "&#13;")
}

/// Escaped text content. A literal carriage return would be folded into a newline by the
/// parser, so it is written as a character reference.
fn text(raw: &str) -> String {
    escape(xml_chars(raw)).replace('\r', "&#13;")
}

/// `raw` without the characters XML 1.0 cannot contain even escaped (control characters
/// other than tab, newline and carriage return, and U+FFFE/U+FFFF); a document containing
/// one would be rejected whole.
pub(crate) fn xml_chars(raw: &str) -> String {
    raw.chars()
        .filter(|&c| match c {
            '\t' | '\n' | '\r' => true,
            '\u{FFFE}' | '\u{FFFF}' => false,
            c => c >= ' ',
        })
        .collect()
}

/// The longest prefix of `s` of at most `max_bytes` bytes that ends on a char boundary.
fn truncate(s: &str, max_bytes: usize) -> &str {
    &s[..s.floor_char_boundary(max_bytes)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use quick_xml::escape::resolve_predefined_entity;
    use quick_xml::events::Event;
    use quick_xml::Reader;

    /// The document as a flat list of nodes, with every value unescaped, so tests compare
    /// what an XML parser (i.e. Twilio) would see.
    #[derive(Debug, PartialEq)]
    enum Node {
        Open(String, Vec<(String, String)>),
        Close(String),
        Text(String),
    }

    fn open(name: &str, attrs: &[(&str, &str)]) -> Node {
        let attrs = attrs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Node::Open(name.into(), attrs)
    }

    fn close(name: &str) -> Node {
        Node::Close(name.into())
    }

    fn text_node(s: &str) -> Node {
        Node::Text(s.into())
    }

    /// Parses `xml`, panicking on anything malformed. Returns whether it had an XML
    /// declaration, and the nodes.
    fn parse(xml: &str) -> (bool, Vec<Node>) {
        let mut reader = Reader::from_str(xml);
        reader.config_mut().check_end_names = true;
        let mut nodes = Vec::new();
        let mut declaration = false;
        let mut depth = 0usize;
        let push_text = |nodes: &mut Vec<Node>, s: &str| match nodes.last_mut() {
            Some(Node::Text(t)) => t.push_str(s),
            _ => nodes.push(Node::Text(s.to_owned())),
        };
        loop {
            match reader.read_event().expect("well-formed XML") {
                Event::Decl(d) => {
                    assert!(nodes.is_empty(), "declaration must come first");
                    assert_eq!(&*d.version().unwrap(), b"1.0");
                    assert_eq!(&*d.encoding().unwrap().unwrap(), b"UTF-8");
                    declaration = true;
                }
                Event::Start(e) => {
                    depth += 1;
                    nodes.push(element(&e));
                }
                Event::Empty(e) => {
                    nodes.push(element(&e));
                    nodes.push(Node::Close(
                        String::from_utf8(e.name().as_ref().to_vec()).unwrap(),
                    ));
                }
                Event::End(e) => {
                    depth -= 1;
                    nodes.push(Node::Close(
                        String::from_utf8(e.name().as_ref().to_vec()).unwrap(),
                    ));
                }
                Event::Text(t) => {
                    assert!(depth > 0, "text outside the root element");
                    push_text(&mut nodes, &t.decode().unwrap());
                }
                Event::GeneralRef(r) => {
                    let resolved = match r.resolve_char_ref().unwrap() {
                        Some(c) => c.to_string(),
                        None => resolve_predefined_entity(&r.decode().unwrap())
                            .expect("only predefined entities")
                            .to_owned(),
                    };
                    push_text(&mut nodes, &resolved);
                }
                Event::Eof => break,
                other => panic!("unexpected event {other:?}"),
            }
        }
        assert_eq!(depth, 0);
        (declaration, nodes)
    }

    fn element(e: &quick_xml::events::BytesStart<'_>) -> Node {
        let name = String::from_utf8(e.name().as_ref().to_vec()).unwrap();
        let attrs = e
            .attributes()
            .map(|a| {
                let a = a.expect("well-formed attribute");
                let key = String::from_utf8(a.key.as_ref().to_vec()).unwrap();
                (key, a.unescape_value().unwrap().into_owned())
            })
            .collect();
        Node::Open(name, attrs)
    }

    const URL: &str = "wss://bridge.example.com/media-stream";

    #[test]
    fn connect_stream_structure() {
        let xml = connect_stream(URL, &[("tenant", "abc123"), ("callerId", "+15551234567")]);
        assert_eq!(
            xml,
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Connect>\
             <Stream url=\"wss://bridge.example.com/media-stream\">\
             <Parameter name=\"tenant\" value=\"abc123\"/>\
             <Parameter name=\"callerId\" value=\"+15551234567\"/>\
             </Stream></Connect></Response>"
        );
        let (declaration, nodes) = parse(&xml);
        assert!(declaration);
        assert_eq!(
            nodes,
            [
                open("Response", &[]),
                open("Connect", &[]),
                open("Stream", &[("url", URL)]),
                open("Parameter", &[("name", "tenant"), ("value", "abc123")]),
                close("Parameter"),
                open(
                    "Parameter",
                    &[("name", "callerId"), ("value", "+15551234567")]
                ),
                close("Parameter"),
                close("Stream"),
                close("Connect"),
                close("Response"),
            ]
        );
    }

    #[test]
    fn connect_stream_without_parameters() {
        let (_, nodes) = parse(&connect_stream(URL, &[]));
        assert_eq!(
            nodes,
            [
                open("Response", &[]),
                open("Connect", &[]),
                open("Stream", &[("url", URL)]),
                close("Stream"),
                close("Connect"),
                close("Response"),
            ]
        );
    }

    #[test]
    fn connect_stream_escapes_url_and_parameters() {
        let nasty = r#"a&b<c>d"e'f"/><Hangup/>"#;
        let url = "wss://h/p&x=<1>\"'";
        let xml = connect_stream(url, &[(nasty, nasty), ("caller", "+1 & <2>")]);
        for raw in ["<Hangup", "&b", "<c>", "<1>", "\"'"] {
            assert!(!xml.contains(raw), "{raw:?} reached the document: {xml}");
        }
        let (_, nodes) = parse(&xml);
        assert_eq!(
            nodes,
            [
                open("Response", &[]),
                open("Connect", &[]),
                open("Stream", &[("url", url)]),
                open("Parameter", &[("name", nasty), ("value", nasty)]),
                close("Parameter"),
                open("Parameter", &[("name", "caller"), ("value", "+1 & <2>")]),
                close("Parameter"),
                close("Stream"),
                close("Connect"),
                close("Response"),
            ]
        );
    }

    #[test]
    fn attribute_whitespace_survives_and_illegal_characters_are_dropped() {
        let xml = connect_stream(URL, &[("note", "a\tb\nc\r\nd\u{0}e\u{1b}f\u{FFFF}g")]);
        assert!(xml.contains("a&#9;b&#10;c&#13;&#10;d"));
        assert!(!xml.contains('\u{0}') && !xml.contains('\u{1b}') && !xml.contains('\u{FFFF}'));
        let (_, nodes) = parse(&xml);
        assert_eq!(
            nodes[3],
            open(
                "Parameter",
                &[("name", "note"), ("value", "a\tb\nc\r\ndefg")]
            )
        );
    }

    #[test]
    fn japanese_text_survives_unchanged() {
        let message = "ただいま電話が大変混み合っております。担当者におつなぎします。";
        let xml = fallback(&say(message, "ja-JP", ""), Some("+81312345678"), None);
        // Written as is (UTF-8), not as character references.
        assert!(xml.contains(message));
        let (declaration, nodes) = parse(&xml);
        assert!(!declaration);
        assert_eq!(
            nodes,
            [
                open("Response", &[]),
                open("Say", &[("language", "ja-JP")]),
                text_node(message),
                close("Say"),
                open("Dial", &[]),
                text_node("+81312345678"),
                close("Dial"),
                close("Response"),
            ]
        );

        let value = "山田 太郎";
        let (_, nodes) = parse(&connect_stream(URL, &[("名前", value)]));
        assert_eq!(
            nodes[3],
            open("Parameter", &[("name", "名前"), ("value", value)])
        );
    }

    #[test]
    fn fallback_exact_output() {
        assert_eq!(
            fallback(
                &say("申し訳ありません。", "ja-JP", "Polly.Mizuki"),
                Some("+815012345678"),
                None
            ),
            "<Response><Say language=\"ja-JP\" voice=\"Polly.Mizuki\">申し訳ありません。</Say>\
             <Dial>+815012345678</Dial></Response>"
        );
        // With the transfer-result URL, Twilio asks it what to do once the line ends.
        assert_eq!(
            fallback(
                &say("申し訳ありません。", "ja-JP", "Polly.Mizuki"),
                Some("+815012345678"),
                Some("https://bridge.example.com/api/twilio/transfer-result?a=1&b=2")
            ),
            "<Response><Say language=\"ja-JP\" voice=\"Polly.Mizuki\">申し訳ありません。</Say>\
             <Dial action=\"https://bridge.example.com/api/twilio/transfer-result?a=1&amp;b=2\" \
             method=\"POST\">+815012345678</Dial></Response>"
        );
    }

    #[test]
    fn a_transfer_asks_what_to_do_when_the_line_ends() {
        assert_eq!(
            transfer(
                "+81312345678",
                "https://phone.example.jp/api/twilio/transfer-result"
            ),
            "<Response><Dial action=\"https://phone.example.jp/api/twilio/transfer-result\" \
             method=\"POST\">+81312345678</Dial></Response>"
        );
        let (_, nodes) = parse(&transfer("+1<Play/>", "https://x.example/a?b=1&c=\"2\""));
        assert_eq!(
            nodes,
            [
                open("Response", &[]),
                open(
                    "Dial",
                    &[
                        ("action", "https://x.example/a?b=1&c=\"2\""),
                        ("method", "POST")
                    ]
                ),
                text_node("+1<Play/>"),
                close("Dial"),
                close("Response"),
            ]
        );
    }

    #[test]
    fn a_transfer_nobody_answered_apologises_before_hanging_up() {
        let apology = say("担当者が出られません。", "ja-JP", "Polly.Mizuki");
        let (declared, nodes) = parse(&transfer_result(false, &apology));
        assert!(declared);
        assert_eq!(
            nodes,
            [
                open("Response", &[]),
                open("Say", &[("language", "ja-JP"), ("voice", "Polly.Mizuki")]),
                text_node("担当者が出られません。"),
                close("Say"),
                open("Hangup", &[]),
                close("Hangup"),
                close("Response"),
            ]
        );
        let (_, nodes) = parse(&transfer_result(true, &apology));
        assert_eq!(
            nodes,
            [
                open("Response", &[]),
                open("Hangup", &[]),
                close("Hangup"),
                close("Response"),
            ]
        );
    }

    #[test]
    fn fallback_escapes_message_language_and_number() {
        let message = r#"1 < 2 & 3 > 2 "quoted" 'single' </Say><Hangup/>"#;
        let number = r#"+1<Play>&"'</Dial>"#;
        let language = r#"ja-JP" loop="9"#;
        let voice = r#"Polly.Mizuki"><Hangup/><Say voice="x"#;
        let xml = fallback(&say(message, language, voice), Some(number), None);
        assert!(!xml.contains("<Hangup") && !xml.contains("<Play") && !xml.contains("loop=\""));
        let (_, nodes) = parse(&xml);
        assert_eq!(
            nodes,
            [
                open("Response", &[]),
                open("Say", &[("language", language), ("voice", voice)]),
                text_node(message),
                close("Say"),
                open("Dial", &[]),
                text_node(number),
                close("Dial"),
                close("Response"),
            ]
        );
    }

    #[test]
    fn fallback_without_dial() {
        for dial in [None, Some(""), Some("   ")] {
            let xml = fallback(&say("さようなら", "ja-JP", ""), dial, None);
            assert!(!xml.contains("Dial"), "{dial:?}: {xml}");
            let (_, nodes) = parse(&xml);
            assert_eq!(
                nodes,
                [
                    open("Response", &[]),
                    open("Say", &[("language", "ja-JP")]),
                    text_node("さようなら"),
                    close("Say"),
                    close("Response"),
                ]
            );
        }
    }

    #[test]
    fn fallback_blank_message_language_or_voice() {
        assert_eq!(
            fallback(&say("", "ja-JP", "Polly.Mizuki"), Some("+81"), None),
            "<Response><Dial>+81</Dial></Response>"
        );
        assert_eq!(
            fallback(&say(" ", "ja-JP", "x"), None, None),
            "<Response></Response>"
        );
        assert_eq!(
            fallback(&say("hi", "", " "), None, None),
            "<Response><Say>hi</Say></Response>"
        );
    }

    fn say<'a>(message: &'a str, language: &'a str, voice: &'a str) -> Apology<'a> {
        Apology {
            message,
            language,
            voice,
        }
    }

    /// The value of the only `<Parameter>` in `connect_stream(URL, [(name, value)])`.
    fn sent_value(name: &str, value: &str) -> Option<String> {
        let (_, nodes) = parse(&connect_stream(URL, &[(name, value)]));
        nodes.into_iter().find_map(|n| match n {
            Node::Open(tag, attrs) if tag == "Parameter" => {
                assert_eq!(attrs[0], ("name".to_string(), name.to_string()));
                Some(attrs[1].1.clone())
            }
            _ => None,
        })
    }

    #[test]
    fn parameter_at_the_limit_is_kept_whole() {
        let value = "x".repeat(PARAMETER_MAX_LEN - 1);
        assert_eq!(sent_value("n", &value).unwrap(), value);
        // Escaping does not count: Twilio measures the parsed value.
        let value = "&".repeat(PARAMETER_MAX_LEN - 1);
        assert_eq!(sent_value("n", &value).unwrap(), value);
    }

    #[test]
    fn parameter_over_the_limit_is_truncated() {
        let value = "x".repeat(PARAMETER_MAX_LEN);
        assert_eq!(
            sent_value("n", &value).unwrap().len(),
            PARAMETER_MAX_LEN - 1
        );
    }

    #[test]
    fn parameter_truncation_respects_multibyte_characters() {
        // "あ" is 3 bytes: with a 1-byte name, 498 bytes of room hold exactly 166 of them.
        let value = "あ".repeat(200);
        let sent = sent_value("n", &value).unwrap();
        assert_eq!(sent, "あ".repeat(166));
        // With a 2-byte name 497 bytes remain: 165 whole characters, never a split one.
        let sent = sent_value("ab", &value).unwrap();
        assert_eq!(sent, "あ".repeat(165));
        // 4-byte characters after an ASCII prefix.
        let value = format!("{}{}", "x".repeat(490), "😀".repeat(5));
        let sent = sent_value("abc", &value).unwrap();
        assert_eq!(sent, format!("{}{}", "x".repeat(490), "😀"));
        for (name, value) in [("n", "あ".repeat(200)), ("ab", "😀".repeat(200))] {
            let sent = sent_value(name, &value).unwrap();
            assert!(name.len() + sent.len() <= PARAMETER_MAX_LEN);
            assert!(value.starts_with(&sent));
        }
        // A multibyte name counts in bytes too: 499 - 6 leaves room for 164 of "い".
        let sent = sent_value("名前", &"い".repeat(300)).unwrap();
        assert_eq!(sent, "い".repeat(164));
    }

    #[test]
    fn parameter_without_room_for_a_value_is_left_out() {
        let long_name = "n".repeat(PARAMETER_MAX_LEN);
        let xml = connect_stream(URL, &[(&long_name, "v"), ("", "v"), ("ok", "1")]);
        let (_, nodes) = parse(&xml);
        let parameters: Vec<_> = nodes
            .iter()
            .filter(|n| matches!(n, Node::Open(tag, _) if tag == "Parameter"))
            .collect();
        assert_eq!(
            parameters,
            [&open("Parameter", &[("name", "ok"), ("value", "1")])]
        );
        // The longest usable name leaves room for one byte of value.
        let name = "n".repeat(PARAMETER_MAX_LEN - 1);
        assert_eq!(sent_value(&name, "value").unwrap(), "v");
        assert_eq!(sent_value(&name, "あ").unwrap(), "");
    }

    #[test]
    fn fallback_follows_the_stream_inside_one_response() {
        let apology = Apology {
            message: "申し訳ございません。",
            language: "ja-JP",
            voice: "Polly.Mizuki",
        };
        let xml = connect_stream_then_fallback(
            URL,
            &[("From", "+81")],
            &apology,
            Some("+815012345678"),
            None,
        );
        let (_, nodes) = parse(&xml);
        let names: Vec<String> = nodes
            .iter()
            .filter_map(|n| match n {
                Node::Open(name, _) => Some(name.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(
            names,
            ["Response", "Connect", "Stream", "Parameter", "Say", "Dial"]
        );
        assert!(nodes.contains(&Node::Text("申し訳ございません。".into())));
        assert!(nodes.contains(&Node::Text("+815012345678".into())));
        assert!(xml.ends_with("</Connect><Say language=\"ja-JP\" voice=\"Polly.Mizuki\">申し訳ございません。</Say><Dial>+815012345678</Dial></Response>"));
    }
}
