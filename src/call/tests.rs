//! Scenario tests of the call machine on a simulated clock: each reads as a script of
//! what arrives when and what the machine must do.

use super::*;
use crate::store::{Role, TranscriptionUsage};
use crate::twilio::RestConfig;
use base64::Engine;

const SID: &str = "CA00000000000000000000000000000001";
const STREAM: &str = "MZ00000000000000000000000000000001";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// `n` bytes of a recognisable pattern.
fn audio(n: usize, seed: u8) -> String {
    b64(&(0..n)
        .map(|i| seed.wrapping_add(i as u8))
        .collect::<Vec<_>>())
}

fn start() -> String {
    format!(
        r#"{{"event":"start","sequenceNumber":"1","start":{{"accountSid":"AC1","streamSid":"{STREAM}","callSid":"{SID}","tracks":["inbound"],"mediaFormat":{{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}},"customParameters":{{"From":"+819012345678","To":"+815012345678"}}}},"streamSid":"{STREAM}"}}"#
    )
}

fn media(payload: &str) -> String {
    format!(
        r#"{{"event":"media","sequenceNumber":"2","media":{{"track":"inbound","chunk":"1","timestamp":"20","payload":"{payload}"}},"streamSid":"{STREAM}"}}"#
    )
}

fn mark(name: &str) -> String {
    format!(
        r#"{{"event":"mark","sequenceNumber":"3","streamSid":"{STREAM}","mark":{{"name":"{name}"}}}}"#
    )
}

fn session_updated(out_format: &str) -> String {
    format!(
        r#"{{"type":"session.updated","event_id":"e1","session":{{"id":"sess_1","type":"realtime","audio":{{"input":{{"format":{{"type":"audio/pcmu"}}}},"output":{{"format":{{"type":"{out_format}"}},"voice":"marin"}}}}}}}}"#
    )
}

fn delta(item: &str, payload: &str) -> String {
    format!(
        r#"{{"type":"response.output_audio.delta","event_id":"e","response_id":"resp_1","item_id":"{item}","output_index":0,"content_index":0,"delta":"{payload}"}}"#
    )
}

fn speech_started() -> String {
    r#"{"type":"input_audio_buffer.speech_started","event_id":"e","audio_start_ms":1000,"item_id":"item_user"}"#.into()
}

const IDLE: Millis = Millis(30_000);
const FALLBACK_TWIML: &str = "<Response><Say language=\"ja-JP\">申し訳ございません</Say><Dial>+81300000000</Dial></Response>";
const TRANSFER_ACTION: &str = "https://bridge.example/api/twilio/transfer-result";

fn setup(agent: Agent) -> Setup {
    Setup {
        context: CallContext {
            call_sid: SID.into(),
            account_sid: "AC1".into(),
            from: "+819012345678".into(),
            to: "+815012345678".into(),
            agent_id: agent.id.clone(),
        },
        agent,
        twilio_rest: RestConfig {
            base_url: "https://api.twilio.test".into(),
            account_sid: "AC1".into(),
            auth_token: crate::config::Secret::new("tok"),
        },
        idle_timeout: IDLE,
        // Each frame goes on as it comes (`CALLER_AUDIO_CHUNK_MS` = 20), so that the scripts
        // see one append per frame; gathering frames has tests of its own (relay).
        caller_chunk: Millis(20),
        fallback_twiml: FALLBACK_TWIML.into(),
        transfer_action: TRANSFER_ACTION.into(),
    }
}

/// The scenarios' mark cadence: one mark per 100 ms of audio, so that each chunk of their
/// scripts (100 ms or more) is followed by its own mark. The production cadence
/// (`playback::MARK_EVERY_BYTES`) has its own tests (`Sim::production_marks`).
const SCENARIO_MARK_BYTES: u64 = 800;

/// The call machine plus a clock; every step returns the non-log actions it produced.
struct Sim {
    call: Call,
    now: Millis,
    logs: Vec<String>,
    records: Vec<Record>,
    /// The recording's PCM so far, and its length once complete (see record_tests).
    recording: Vec<u8>,
    recording_done: Option<u64>,
    /// The events logged at `Info` or above, in order.
    info_events: Vec<String>,
    /// The server confirms each item of ours at once (`conversation.item.added`), as it
    /// does when nothing else is under way; off, the test confirms them itself.
    confirm_items: bool,
    confirmed: u64,
}

impl Sim {
    /// A call of `agent` at time 0, its first actions not yet taken. Its marks go every
    /// 100 ms of audio (see `Sim::production_marks`).
    fn of(agent: Agent) -> Self {
        let mut call = Call::new(setup(agent), Millis(0));
        call.playback = Playback::with_marks_every(SCENARIO_MARK_BYTES, Millis(100));
        Sim {
            call,
            now: Millis(0),
            logs: vec![],
            records: vec![],
            recording: vec![],
            recording_done: None,
            info_events: vec![],
            confirm_items: true,
            confirmed: 0,
        }
    }

    fn new() -> Self {
        let mut sim = Sim::of(Agent::default());
        let first = sim.drain();
        assert_eq!(
            first,
            vec![Action::ConnectOpenAi {
                model: "gpt-realtime".into()
            }]
        );
        sim
    }

    /// Marks go as in production, from now on.
    fn production_marks(&mut self) -> &mut Self {
        self.call.playback = Playback::default();
        self
    }

    /// A call whose session is ready and whose stream has started; returns after the
    /// greeting request.
    fn live() -> Self {
        let mut sim = Sim::new();
        sim.openai_opened();
        sim.openai(&session_updated("audio/pcmu"));
        sim.twilio(&start());
        sim
    }

    fn at(&mut self, ms: u64) -> &mut Self {
        assert!(ms >= self.now.0, "time runs forward");
        self.now = Millis(ms);
        self
    }

    fn drain(&mut self) -> Vec<Action> {
        let mut out = vec![];
        while let Some(a) = self.call.poll_action() {
            match a {
                Action::Log { line, level } => {
                    let v: Value = serde_json::from_str(&line).expect("log lines are JSON");
                    assert_eq!(v["call_sid"], SID, "every log line names the call");
                    if level >= Level::Info {
                        let event = v["event"].as_str().expect("an event").to_owned();
                        self.info_events.push(event);
                    }
                    self.logs.push(line)
                }
                Action::Persist(r) => self.records.push(r),
                Action::RecordingData(pcm) => {
                    assert!(self.recording_done.is_none(), "no audio after the end");
                    self.recording.extend(pcm)
                }
                Action::RecordingDone { duration_ms } => {
                    assert!(self.recording_done.is_none(), "one end");
                    self.recording_done = Some(duration_ms)
                }
                other => out.push(other),
            }
        }
        out
    }

    fn input(&mut self, input: Input<'_>) -> Vec<Action> {
        self.call.handle(input, self.now);
        let mut out = self.drain();
        if self.confirm_items {
            for added in self.confirmations(&out) {
                self.call.handle(Input::OpenAiText(&added), self.now);
                out.extend(self.drain());
            }
        }
        out
    }

    /// The server's `conversation.item.added` for each item of ours among `out`, in order.
    fn confirmations(&mut self, out: &[Action]) -> Vec<String> {
        let mut added = vec![];
        for a in out {
            let Action::SendOpenAi(text) = a else {
                continue;
            };
            let v: Value = serde_json::from_str(text).unwrap();
            if v["type"] != "conversation.item.create" {
                continue;
            }
            let mut item = v["item"].clone();
            let ours = item["type"] == "function_call_output"
                || item["role"] == "system"
                || (item["role"] == "user" && item["content"][0]["type"] == "input_text");
            if ours {
                self.confirmed += 1;
                item["id"] = json!(format!("item_ours_{}", self.confirmed));
                added.push(json!({ "type": "conversation.item.added", "item": item }).to_string());
            }
        }
        added
    }

    fn twilio(&mut self, text: &str) -> Vec<Action> {
        self.input(Input::TwilioText(text))
    }

    fn openai(&mut self, text: &str) -> Vec<Action> {
        self.input(Input::OpenAiText(text))
    }

    fn openai_opened(&mut self) -> Vec<Action> {
        self.input(Input::OpenAiOpened)
    }

    /// Sends one agent audio chunk and returns the mark name the machine placed after it.
    fn agent_chunk(&mut self, item: &str, payload: &str) -> String {
        let out = self.openai(&delta(item, payload));
        assert_eq!(out.len(), 2, "media then mark: {out:?}");
        let Action::SendTwilio(m) = &out[0] else {
            panic!("{out:?}")
        };
        let m: Value = serde_json::from_str(m).unwrap();
        assert_eq!(m["event"], "media");
        assert_eq!(
            m["media"]["payload"], payload,
            "agent audio is relayed unchanged"
        );
        mark_name(&out[1])
    }

    fn logged(&self, event: &str) -> Vec<Value> {
        self.logs
            .iter()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|v| v["event"] == event)
            .collect()
    }
}

const STOP: &str = r#"{"event":"stop","sequenceNumber":"99","streamSid":"MZ00000000000000000000000000000001","stop":{"accountSid":"AC1","callSid":"CA00000000000000000000000000000001"}}"#;

/// The fallback redirect among `out`: a Twilio REST call update whose TwiML is the
/// fallback. Returns its request id.
fn expect_redirect(out: &[Action]) -> u64 {
    let http = http_of(out);
    assert_eq!(http.len(), 1, "one redirect: {out:?}");
    let (id, r) = &http[0];
    assert_eq!(r.method, "POST");
    assert_eq!(
        r.url,
        format!("https://api.twilio.test/2010-04-01/Accounts/AC1/Calls/{SID}.json")
    );
    let form: Vec<(String, String)> = form_urlencoded::parse(r.body.as_bytes())
        .into_owned()
        .collect();
    assert_eq!(form, [("Twiml".to_owned(), FALLBACK_TWIML.to_owned())]);
    *id
}

impl Sim {
    /// The session was lost while the call was ending and nothing more is wanted of the
    /// agent: no new session is asked for, and no redirect to the fallback goes to Twilio.
    fn expect_no_new_session(out: &[Action], what: &str) {
        assert!(
            !out.iter()
                .any(|a| matches!(a, Action::ConnectOpenAi { .. })),
            "{what}: no new session: {out:?}"
        );
        assert!(http_of(out).is_empty(), "{what}: no redirect: {out:?}");
    }

    /// The connect under way is refused for good (HTTP 401: the key revoked, say), and no
    /// other is tried. What the call did then.
    fn connect_refused_for_good(&mut self) -> Vec<Action> {
        let out = self.input(Input::OpenAiConnectFailed {
            reason: "HTTP 401 on upgrade",
            status: Some(401),
        });
        assert!(
            !out.iter()
                .any(|a| matches!(a, Action::ConnectOpenAi { .. })),
            "{out:?}"
        );
        out
    }

    /// The Realtime session closes under the call (1011 `server_error`). What the call did.
    fn lose_session(&mut self) -> Vec<Action> {
        self.input(Input::OpenAiClosed {
            code: 1011,
            reason: "server_error",
        })
    }

    /// [`Sim::lose_session`], and the first new connect goes out at once.
    fn lose_session_and_reconnect(&mut self) {
        let out = self.lose_session();
        self.expect_reconnect(out, 1);
    }

    /// After a lost session: a new connect, at once or (for later attempts) when the
    /// machine's timer says.
    fn expect_reconnect(&mut self, out: Vec<Action>, attempt: u32) {
        let connects = |out: &[Action]| {
            out.iter()
                .filter(|a| matches!(a, Action::ConnectOpenAi { .. }))
                .count()
        };
        if attempt == 1 {
            assert_eq!(connects(&out), 1, "first attempt at once: {out:?}");
            return;
        }
        assert_eq!(connects(&out), 0, "attempt {attempt} waits: {out:?}");
        let due = self.call.poll_timeout().expect("a timer for the attempt");
        assert!(due > self.now, "attempt {attempt} is delayed");
        self.at(due.0);
        let out = self.input(Input::Timeout);
        assert_eq!(connects(&out), 1, "attempt {attempt}: {out:?}");
    }

    fn redirect_answered(&mut self, id: u64, status: u16) -> Vec<Action> {
        let outcome = http::Outcome::Response {
            status,
            body: "{}".into(),
        };
        self.input(Input::HttpDone {
            id,
            outcome: &outcome,
        })
    }

    /// The call has ended, and its record says it failed, why, and the particulars.
    /// How the call ended, by its label; `None` while it goes on.
    fn end_label(&self) -> Option<&'static str> {
        self.call.end_reason().map(EndReason::label)
    }

    fn assert_failed(&self, reason: &str, detail: &str) {
        assert_eq!(self.end_label(), Some(reason));
        let ended = self
            .records
            .iter()
            .find_map(|r| match r {
                Record::CallEnded {
                    end_reason,
                    end_detail,
                    failed,
                    ..
                } => Some((end_reason.clone(), end_detail.clone(), *failed)),
                _ => None,
            })
            .expect("an end record");
        assert_eq!(ended, (reason.to_owned(), Some(detail.to_owned()), true));
    }
}

fn mark_name(a: &Action) -> String {
    let Action::SendTwilio(m) = a else {
        panic!("{a:?}")
    };
    let m: Value = serde_json::from_str(m).unwrap();
    assert_eq!(m["event"], "mark");
    assert_eq!(m["streamSid"], STREAM);
    m["mark"]["name"].as_str().unwrap().to_owned()
}

fn json_of(a: &Action) -> Value {
    match a {
        Action::SendTwilio(s) | Action::SendOpenAi(s) => serde_json::from_str(s).unwrap(),
        other => panic!("not a send: {other:?}"),
    }
}

fn is_greeting(a: &Action) -> bool {
    matches!(a, Action::SendOpenAi(_)) && json_of(a)["type"] == "response.create"
}

// ---- session setup and greeting ----

#[test]
fn session_update_is_sent_when_the_socket_opens() {
    let mut sim = Sim::new();
    let out = sim.openai_opened();
    assert_eq!(out.len(), 1);
    let v = json_of(&out[0]);
    assert_eq!(v["type"], "session.update");
    assert_eq!(v["session"]["type"], "realtime");
    assert_eq!(
        v["session"]["audio"]["output"]["format"]["type"],
        "audio/pcmu"
    );
}

/// What the default agent's greeting asks for: its instructions, then the greeting.
fn default_greeting_instructions() -> String {
    let a = Agent::default();
    format!("{}\n\n{}", a.instructions, a.greeting)
}

#[test]
fn greeting_waits_for_both_session_ready_and_start() {
    // Session first, then start.
    let mut sim = Sim::new();
    sim.openai_opened();
    assert!(sim.openai(&session_updated("audio/pcmu")).is_empty());
    let out = sim.twilio(&start());
    assert_eq!(out.len(), 1);
    assert!(is_greeting(&out[0]));
    assert_eq!(
        json_of(&out[0])["response"]["instructions"],
        default_greeting_instructions()
    );

    // Start first, then session.
    let mut sim = Sim::new();
    assert!(sim.twilio(&start()).is_empty());
    sim.openai_opened();
    let out = sim.openai(&session_updated("audio/pcmu"));
    assert!(is_greeting(&out[0]));
    // Only once, whatever else arrives.
    assert!(sim.openai(&session_updated("audio/pcmu")).is_empty());
}

/// A socket the shell opened ahead of the stream carries what `ahead_of_stream` gave, which
/// is what the machine sends on a socket it opens itself; handed over, it is not configured
/// again, and the session it confirms greets once the stream has started.
#[test]
fn a_socket_configured_ahead_of_the_stream_is_not_configured_again() {
    let mut plain = Sim::new();
    let sent: Vec<String> = plain
        .openai_opened()
        .into_iter()
        .map(|a| match a {
            Action::SendOpenAi(text) => text,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(ahead_of_stream(&Agent::default()), sent);

    let mut sim = Sim::new();
    let out = sim.input(Input::OpenAiOpenedConfigured);
    assert!(out.is_empty(), "configured again: {out:?}");
    // Its session.updated, held by the shell and handed on, before the stream's start.
    assert!(sim.openai(&session_updated("audio/pcmu")).is_empty());
    let out = sim.twilio(&start());
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(is_greeting(&out[0]));

    // A configuration the server did not take is as bad as ever, and a session that never
    // confirms it times out as any other.
    let mut sim = Sim::new();
    sim.twilio(&start());
    sim.input(Input::OpenAiOpenedConfigured);
    let out = sim.openai(&session_updated("audio/pcm"));
    assert!(out.iter().all(|a| !is_greeting(a)));
    expect_redirect(&out);
    let mut sim = Sim::new();
    sim.input(Input::OpenAiOpenedConfigured);
    assert_eq!(sim.call.poll_timeout(), Some(SESSION_SETUP_TIMEOUT));
}

#[test]
fn session_without_pcmu_output_never_reaches_the_caller() {
    let mut sim = Sim::new();
    sim.twilio(&start());
    sim.openai_opened();
    // The server kept its 24 kHz PCM default (protocol.md D3.4).
    let out = sim.openai(&session_updated("audio/pcm"));
    assert!(
        out.iter().all(|a| !is_greeting(a)),
        "no greeting on a session that would play noise"
    );
    let id = expect_redirect(&out);
    sim.redirect_answered(id, 200);
    sim.twilio(STOP);
    sim.assert_failed(
        "openai_session_rejected",
        "session formats in=Some(\"audio/pcmu\") out=Some(\"audio/pcm\"), need audio/pcmu",
    );
}

#[test]
fn audio_before_session_updated_is_dropped_not_played() {
    let mut sim = Sim::new();
    sim.twilio(&start());
    sim.openai_opened();
    let out = sim.openai(&delta("item_a", &audio(160, 1)));
    assert!(out.is_empty());
    assert_eq!(
        sim.call.stats().dropped["openai_audio_before_session_ready"],
        1
    );
}

#[test]
fn rejected_session_update_ends_the_call_with_the_error_code() {
    let mut sim = Sim::new();
    sim.twilio(&start());
    sim.openai_opened();
    let out = sim.openai(r#"{"type":"error","event_id":"e","error":{"type":"invalid_request_error","code":"unknown_parameter","message":"Unknown parameter: 'session.voice'.","param":"session.voice","event_id":"evt_bridge_session_update"}}"#);
    assert!(out.iter().any(|a| matches!(a, Action::CloseOpenAi { .. })));
    // A rejected configuration stays rejected: no new session, the fallback at once.
    assert!(!out
        .iter()
        .any(|a| matches!(a, Action::ConnectOpenAi { .. })));
    let id = expect_redirect(&out);
    assert_eq!(sim.logged("openai.error")[0]["code"], "unknown_parameter");
    sim.redirect_answered(id, 200);
    sim.twilio(STOP);
    sim.assert_failed("openai_session_rejected", "unknown_parameter");
}

#[test]
fn other_errors_are_logged_and_the_call_goes_on() {
    let mut sim = Sim::live();
    let out = sim.openai(r#"{"type":"error","error":{"type":"invalid_request_error","code":"conversation_already_has_active_response","message":"busy","param":null,"event_id":null}}"#);
    assert!(out.is_empty());
    assert!(!sim.call.is_ended());
    assert_eq!(
        sim.logged("openai.error")[0]["code"],
        "conversation_already_has_active_response"
    );
}

#[test]
fn session_that_never_gets_ready_times_out() {
    let mut sim = Sim::new();
    sim.twilio(&start());
    sim.openai_opened();
    assert_eq!(sim.call.poll_timeout(), Some(SESSION_SETUP_TIMEOUT));
    sim.at(9_999);
    assert!(sim.input(Input::Timeout).is_empty());
    sim.at(10_000);
    // First a new session is tried, for as long as the reconnect window allows.
    let out = sim.input(Input::Timeout);
    assert!(
        out.iter()
            .any(|a| matches!(a, Action::ConnectOpenAi { .. })),
        "{out:?}"
    );
    assert!(!sim.call.is_ended());
    let window_end = 10_000 + control::RECONNECT_WINDOW.0;
    assert_eq!(sim.call.poll_timeout(), Some(Millis(window_end)));
    sim.at(window_end);
    let out = sim.input(Input::Timeout);
    let id = expect_redirect(&out);
    sim.redirect_answered(id, 200);
    sim.twilio(STOP);
    sim.assert_failed("openai_session_timeout", "no usable session within 10 s");
    assert_eq!(sim.call.poll_timeout(), None);
}

#[test]
fn ready_session_cancels_the_setup_timeout() {
    let mut sim = Sim::live();
    // While the greeting is asked for, only the call's time limit (its wrap-up) is due...
    let max = u64::from(Agent::default().max_call_seconds) * 1000;
    assert_eq!(
        sim.call.poll_timeout(),
        Some(Millis(max - control::WRAP_UP_BEFORE.0))
    );
    // ...and once it is done, the idle check.
    sim.openai(r#"{"type":"response.created","response":{"id":"resp_g"}}"#);
    sim.openai(r#"{"type":"response.done","response":{"id":"resp_g","status":"completed"}}"#);
    assert_eq!(sim.call.poll_timeout(), Some(IDLE));
}

// ---- relay ----

#[test]
fn caller_audio_before_the_session_is_ready_is_held_then_sent_in_order() {
    let mut sim = Sim::new();
    sim.twilio(&start());
    let frames: Vec<String> = (0..50).map(|i| audio(160, i)).collect();
    for (i, f) in frames.iter().enumerate() {
        sim.at(i as u64 * 20);
        assert!(sim.twilio(&media(f)).is_empty(), "held, not sent");
    }
    sim.openai_opened();
    let out = sim.openai(&session_updated("audio/pcmu"));
    assert!(is_greeting(&out[0]), "greeting goes before held audio");
    let sent: Vec<String> = out[1..]
        .iter()
        .map(|a| {
            let v = json_of(a);
            assert_eq!(v["type"], "input_audio_buffer.append");
            v["audio"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(sent, frames, "every held frame, unchanged, in order");
    // Afterwards frames go straight through.
    let f = audio(160, 99);
    let out = sim.twilio(&media(&f));
    assert_eq!(json_of(&out[0])["audio"], f);
    assert_eq!(sim.call.stats().caller_frames, 51);
}

#[test]
fn held_caller_audio_is_bounded_dropping_the_oldest() {
    let mut sim = Sim::new();
    sim.twilio(&start());
    let frame_bytes = 160u64;
    let frames = MAX_PENDING_INPUT_BYTES / frame_bytes + 10;
    for i in 0..frames {
        sim.twilio(&media(&audio(160, i as u8)));
    }
    assert_eq!(sim.call.stats().dropped["caller_audio_overflow"], 10);
    sim.openai_opened();
    let out = sim.openai(&session_updated("audio/pcmu"));
    assert_eq!(out.len() as u64, 1 + MAX_PENDING_INPUT_BYTES / frame_bytes);
    // The oldest ten went; the first kept is frame 10.
    assert_eq!(json_of(&out[1])["audio"], audio(160, 10));
}

#[test]
fn agent_audio_is_relayed_unchanged_each_followed_by_a_mark() {
    let mut sim = Sim::live();
    sim.at(700);
    let chunks: Vec<String> = (0..5).map(|i| audio(800 + i * 8, i as u8)).collect();
    let mut marks = vec![];
    for c in &chunks {
        marks.push(sim.agent_chunk("item_a", c));
    }
    let unique: std::collections::HashSet<_> = marks.iter().collect();
    assert_eq!(unique.len(), marks.len(), "each mark names its own chunk");
    assert_eq!(sim.call.stats().first_audio_ms, Some(700));
    assert_eq!(sim.call.stats().agent_frames, 5);
}

#[test]
fn beta_named_audio_deltas_are_relayed_too() {
    let mut sim = Sim::live();
    let text = delta("item_a", &audio(800, 3))
        .replace("response.output_audio.delta", "response.audio.delta");
    assert_eq!(sim.openai(&text).len(), 2);
}

/// The events of a Twilio send list, in order: "media" or the mark's name.
fn twilio_events(out: &[Action]) -> Vec<String> {
    out.iter()
        .filter(|a| matches!(a, Action::SendTwilio(_)))
        .map(|a| {
            let v = json_of(a);
            match v["event"].as_str().unwrap() {
                "mark" => v["mark"]["name"].as_str().unwrap().to_owned(),
                e => e.to_owned(),
            }
        })
        .collect()
}

#[test]
fn small_deltas_share_one_mark_per_100_ms_and_the_tail_is_marked_when_done() {
    let mut sim = Sim::live();
    let mut events = vec![];
    for i in 0..12u64 {
        sim.at(1000 + 20 * i);
        events.extend(twilio_events(
            &sim.openai(&delta("item_s", &audio(160, i as u8))),
        ));
    }
    // 12 × 20 ms: a mark after the 5th and the 10th delta, two deltas still unmarked.
    let media = "media".to_owned();
    let expected: Vec<String> = [
        vec![media.clone(); 5],
        vec!["m0".into()],
        vec![media.clone(); 5],
        vec!["m1".into()],
        vec![media.clone(); 2],
    ]
    .concat();
    assert_eq!(events, expected);
    let done = r#"{"type":"response.output_audio.done","event_id":"e","response_id":"resp_1","item_id":"item_s","output_index":0,"content_index":0}"#;
    assert_eq!(twilio_events(&sim.openai(done)), vec!["m2".to_owned()]);
    // Twilio played the first 100 ms when the caller barged in: truncated there, exactly.
    sim.twilio(&mark("m0"));
    let out = sim.openai(&speech_started());
    assert_eq!(json_of(&out[1])["audio_end_ms"], 100);
}

#[test]
fn a_paused_response_has_its_unmarked_audio_marked_100_ms_later() {
    let mut sim = Sim::live();
    sim.at(1000);
    assert_eq!(
        twilio_events(&sim.openai(&delta("item_p", &audio(160, 1)))),
        vec!["media"]
    );
    sim.at(1099);
    let f = audio(160, 2);
    assert!(twilio_events(&sim.twilio(&media(&f))).is_empty());
    sim.at(1100);
    // The next input of any kind (here a caller frame) carries the mark.
    assert_eq!(twilio_events(&sim.twilio(&media(&f))), vec!["m0"]);
    sim.twilio(&mark("m0"));
    assert!(
        sim.openai(&speech_started()).is_empty(),
        "all heard: nothing to cut"
    );
}

// ---- barge-in ----

/// A call in which the agent sent `chunks` chunks of 200 ms (1600 bytes) for `item_a`
/// and Twilio confirmed `played` of them.
fn playing(chunks: usize, played: usize) -> (Sim, Vec<String>) {
    let mut sim = Sim::live();
    let marks: Vec<String> = (0..chunks)
        .map(|i| sim.agent_chunk("item_a", &audio(1600, i as u8)))
        .collect();
    for (i, m) in marks.iter().take(played).enumerate() {
        sim.at(200 * (i as u64 + 1));
        assert!(sim.twilio(&mark(m)).is_empty());
    }
    (sim, marks)
}

#[test]
fn barge_in_clears_twilio_then_truncates_at_the_ms_played() {
    let (mut sim, _) = playing(10, 3);
    sim.at(650);
    let out = sim.openai(&speech_started());
    assert_eq!(out.len(), 3, "{out:?}");
    assert_eq!(
        json_of(&out[0]),
        json!({"event":"clear","streamSid":STREAM})
    );
    // 600 ms confirmed by the echo at 600, and 50 ms played since.
    assert_eq!(
        json_of(&out[1]),
        json!({"type":"conversation.item.truncate","item_id":"item_a","content_index":0,"audio_end_ms":650})
    );
    // Then the item as the server now holds it, for the transcript of what was heard.
    assert_eq!(
        json_of(&out[2]),
        json!({"type":"conversation.item.retrieve","item_id":"item_a"})
    );
    assert_eq!(sim.call.stats().barge_ins, 1);
}

#[test]
fn with_marks_every_500_ms_a_barge_in_between_echoes_cuts_where_playback_stands() {
    let mut sim = Sim::live();
    sim.production_marks();
    // The agent's audio comes at twice real time, 20 ms a delta every 10 ms, from 1 000:
    // a mark goes after each 500 ms of it, not after each delta.
    let mut marks = vec![];
    for i in 0..60u64 {
        sim.at(1_000 + 10 * i);
        let out = sim.openai(&delta("item_a", &audio(160, i as u8)));
        let names: Vec<String> = out.iter().skip(1).map(mark_name).collect();
        marks.extend(names);
    }
    assert_eq!(marks.len(), 2, "{marks:?}");
    // The first 500 ms played from 1 200 (its way to Twilio reckoned at 200 ms); its echo
    // comes back at 1 750.
    sim.at(1_750);
    assert!(sim.twilio(&mark(&marks[0])).is_empty());
    // The caller talks 330 ms later, before the next echo: cut at 500 + 330 ms.
    sim.at(2_080);
    let out = sim.openai(&speech_started());
    assert_eq!(
        sends_of(&out, "conversation.item.truncate")[0]["audio_end_ms"],
        830
    );
}

#[test]
fn marks_flushed_by_the_clear_do_not_count_as_played() {
    let (mut sim, marks) = playing(10, 3);
    sim.openai(&speech_started());
    // Twilio echoes every pending mark when it clears; they are neither played nor unknown.
    for m in &marks[3..] {
        assert!(sim.twilio(&mark(m)).is_empty());
    }
    assert!(!sim.call.stats().dropped.contains_key("twilio_unknown_mark"));
    // Nothing is playing now: a second speech_started does nothing.
    assert!(sim.openai(&speech_started()).is_empty());
    assert_eq!(sim.call.stats().barge_ins, 1);
}

#[test]
fn later_audio_of_a_cut_item_is_dropped_and_the_next_item_plays() {
    let (mut sim, _) = playing(4, 1);
    sim.openai(&speech_started());
    assert!(sim.openai(&delta("item_a", &audio(1600, 7))).is_empty());
    assert_eq!(sim.call.stats().dropped["openai_audio_after_barge_in"], 1);
    // The answer to what the caller said next plays normally.
    sim.agent_chunk("item_b", &audio(1600, 8));
}

#[test]
fn speech_when_nothing_is_playing_sends_no_clear_and_no_truncate() {
    let mut sim = Sim::live();
    assert!(sim.openai(&speech_started()).is_empty());
    // All audio played: still nothing to cut.
    let (mut sim, _) = playing(3, 3);
    assert!(sim.openai(&speech_started()).is_empty());
    assert_eq!(sim.call.stats().barge_ins, 0);
}

#[test]
fn speech_long_after_the_agent_s_audio_played_out_sends_no_clear_though_its_mark_is_still_out() {
    let (mut sim, _) = playing(3, 2);
    // The third chunk's echo never came, but 600 ms of audio sent at 0 has played by 10 s.
    sim.at(10_000);
    assert!(sim.openai(&speech_started()).is_empty());
    assert_eq!(sim.call.stats().barge_ins, 0);
}

#[test]
fn truncate_never_exceeds_the_audio_received_for_the_item() {
    // protocol.md D3.5: "Audio content of 2450ms is already shorter than 2535ms".
    // Odd-sized chunks: 2450 ms received = 19600 bytes in 7 uneven chunks, all played
    // but the last one's mark.
    let mut sim = Sim::live();
    let sizes = [2801u64, 2799, 2800, 2800, 2800, 2800, 2800];
    let marks: Vec<String> = sizes
        .iter()
        .map(|&n| sim.agent_chunk("item_a", &audio(n as usize, 1)))
        .collect();
    for m in &marks[..6] {
        sim.twilio(&mark(m));
    }
    let out = sim.openai(&speech_started());
    let end = json_of(&out[1])["audio_end_ms"].as_u64().unwrap();
    assert_eq!(end, (sizes[..6].iter().sum::<u64>()) / 8);
    assert!(end <= sizes.iter().sum::<u64>() / 8);
}

#[test]
fn a_mark_confirms_everything_before_it() {
    let (mut sim, marks) = playing(5, 0);
    // Twilio's echoes for marks 0 and 1 were lost; mark 2 arrives.
    sim.twilio(&mark(&marks[2]));
    let out = sim.openai(&speech_started());
    assert_eq!(json_of(&out[1])["audio_end_ms"], 600);
}

#[test]
fn barge_in_before_the_stream_started_cuts_at_zero_without_clear() {
    let mut sim = Sim::new();
    sim.openai_opened();
    sim.openai(&session_updated("audio/pcmu"));
    // A response (not the greeting) arrives before Twilio's start: it is held.
    assert!(sim.openai(&delta("item_a", &audio(1600, 1))).is_empty());
    let out = sim.openai(&speech_started());
    assert_eq!(out.len(), 1, "no stream, so no clear: {out:?}");
    assert_eq!(json_of(&out[0])["audio_end_ms"], 0);
    // The held audio was discarded with the cut.
    let out = sim.twilio(&start());
    assert!(
        out.iter().all(|a| matches!(a, Action::SendOpenAi(_))),
        "{out:?}"
    );
}

#[test]
fn agent_audio_held_until_start_is_flushed_in_order_with_marks() {
    let mut sim = Sim::new();
    sim.openai_opened();
    sim.openai(&session_updated("audio/pcmu"));
    let chunks: Vec<String> = (0..3).map(|i| audio(800, i)).collect();
    for c in &chunks {
        assert!(sim.openai(&delta("item_a", c)).is_empty());
    }
    sim.at(300);
    let out = sim.twilio(&start());
    let medias: Vec<Value> = out
        .iter()
        .filter_map(|a| match a {
            Action::SendTwilio(_) => Some(json_of(a)),
            _ => None,
        })
        .collect();
    assert_eq!(medias.len(), 6);
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(medias[2 * i]["media"]["payload"], c.as_str());
        assert_eq!(medias[2 * i + 1]["event"], "mark");
    }
    assert_eq!(sim.call.stats().first_audio_ms, Some(0));
}

// ---- bad input ----

#[test]
fn bad_frames_from_either_side_are_counted_and_the_call_goes_on() {
    let mut sim = Sim::live();
    let bad_twilio = [
        "not json",
        r#"{"event":"media","media":{}}"#,
        r#"{"event":"media","media":{"payload":"@@@@"}}"#,
        r#"{"event":"mark","mark":{"name":"m999"}}"#,
        r#"{"event":"surprise"}"#,
    ];
    for f in bad_twilio {
        assert!(sim.twilio(f).is_empty(), "{f}");
    }
    sim.twilio(&start());
    assert!(sim.input(Input::TwilioBinary { len: 10 }).is_empty());
    for f in [
        "{",
        r#"{"type":"response.output_audio.delta","item_id":"i","delta":"not base64!"}"#,
    ] {
        assert!(sim.openai(f).is_empty(), "{f}");
    }
    assert!(sim.input(Input::OpenAiBinary { len: 3 }).is_empty());
    let huge = format!(
        "{{\"event\":\"media\",\"pad\":\"{}\"}}",
        "x".repeat(MAX_FRAME_BYTES)
    );
    assert!(sim.twilio(&huge).is_empty());

    let d = &sim.call.stats().dropped;
    for reason in [
        "twilio_malformed_frame",
        "twilio_invalid_base64",
        "twilio_unknown_mark",
        "twilio_unknown_event",
        "twilio_second_start",
        "twilio_binary_frame",
        "twilio_oversized_frame",
        "openai_malformed_event",
        "openai_invalid_base64",
        "openai_binary_frame",
    ] {
        assert!(
            d.get(reason).copied().unwrap_or(0) >= 1,
            "{reason} not counted: {d:?}"
        );
    }
    assert!(!sim.call.is_ended());
    // And the relay still works.
    let f = audio(160, 5);
    assert_eq!(json_of(&sim.twilio(&media(&f))[0])["audio"], f);
    sim.agent_chunk("item_z", &audio(800, 6));
}

#[test]
fn media_before_start_is_held_and_relayed_in_order_once_it_comes() {
    let mut sim = Sim::new();
    sim.openai_opened();
    sim.openai(&session_updated("audio/pcmu"));
    let (a, b) = (audio(160, 1), audio(160, 2));
    assert!(sim.twilio(&media(&a)).is_empty());
    assert!(sim.twilio(&media(&b)).is_empty());
    let out = sim.twilio(&start());
    let appended: Vec<Value> = out
        .iter()
        .filter(|a| matches!(a, Action::SendOpenAi(_)))
        .map(json_of)
        .filter(|v| v["type"] == "input_audio_buffer.append")
        .map(|v| v["audio"].clone())
        .collect();
    assert_eq!(appended, vec![json!(a), json!(b)]);
    assert_eq!(sim.call.stats().caller_frames, 2);
    assert!(sim.call.stats().dropped.is_empty());
}

#[test]
fn media_before_start_is_held_at_most_two_seconds_and_counted_if_start_never_comes() {
    let mut sim = Sim::new();
    // 2 s of 20 ms frames fit; the next 5 push the oldest out.
    for i in 0..105u8 {
        assert!(sim.twilio(&media(&audio(160, i))).is_empty());
    }
    assert_eq!(sim.call.stats().dropped["twilio_media_before_start"], 5);
    sim.twilio(r#"{"event":"stop"}"#);
    assert_eq!(sim.call.stats().dropped["twilio_media_before_start"], 105);
}

#[test]
fn a_start_for_another_call_is_refused() {
    let mut sim = Sim::new();
    sim.twilio(&start().replace(SID, "CAother"));
    assert_eq!(sim.call.stats().dropped["twilio_start_for_other_call"], 1);
    assert!(sim.twilio(&media(&audio(160, 0))).is_empty());
}

#[test]
fn repeated_bad_frames_do_not_flood_the_log() {
    let mut sim = Sim::live();
    let before = sim.logs.len();
    for _ in 0..1000 {
        sim.twilio("garbage");
    }
    assert_eq!(sim.call.stats().dropped["twilio_malformed_frame"], 1000);
    assert!(sim.logs.len() - before <= 30, "{}", sim.logs.len() - before);
}

// ---- lifecycle ----

#[test]
fn twilio_stop_closes_openai_at_once_and_ends_the_call() {
    let mut sim = Sim::live();
    sim.at(5_000);
    let out = sim.twilio(r#"{"event":"stop","sequenceNumber":"9","stop":{"accountSid":"AC1","callSid":"CA1"},"streamSid":"MZ1"}"#);
    assert_eq!(
        out[0],
        Action::CloseOpenAi {
            code: 1000,
            reason: "call ended".into()
        }
    );
    let Some(Action::Ended(summary)) = out.last() else {
        panic!("{out:?}")
    };
    assert_eq!(summary.reason, EndReason::TwilioStop);
    assert_eq!(
        summary.stream_sid.as_ref().map(|s| s.as_str()),
        Some(STREAM)
    );
    assert_eq!(summary.session_id.as_deref(), Some("sess_1"));
    assert_eq!(summary.ended_at, Millis(5_000));
    // Anything later is ignored.
    assert!(sim.twilio(&media(&audio(160, 0))).is_empty());
    assert!(sim
        .input(Input::OpenAiClosed {
            code: 1000,
            reason: ""
        })
        .is_empty());
}

#[test]
fn twilio_socket_close_closes_openai() {
    let mut sim = Sim::live();
    let out = sim.input(Input::TwilioClosed {
        code: 1006,
        reason: "",
    });
    assert!(matches!(out[0], Action::CloseOpenAi { .. }));
    assert!(!out.iter().any(|a| matches!(a, Action::CloseTwilio { .. })));
    assert_eq!(
        sim.call.end_reason(),
        Some(&EndReason::TwilioSocketClosed { code: 1006 })
    );
}

#[test]
fn openai_close_mid_call_is_logged_with_code_and_hands_the_caller_to_the_fallback() {
    let mut sim = Sim::live();
    let close = Input::OpenAiClosed {
        code: 4000,
        reason: "invalid_request_error.beta_api_shape_disabled",
    };
    // A new session is tried up to MAX_RECONNECTS times within the window...
    for attempt in 1..=control::MAX_RECONNECTS {
        let out = sim.input(close);
        sim.expect_reconnect(out, attempt);
        sim.openai_opened();
    }
    // ...then the caller is redirected to the fallback TwiML.
    let out = sim.input(close);
    assert!(
        !out.iter().any(|a| matches!(a, Action::CloseOpenAi { .. })),
        "already closed"
    );
    let id = expect_redirect(&out);
    let log = &sim.logged("openai.closed")[0];
    assert_eq!(log["code"], 4000);
    assert_eq!(
        log["reason"],
        "invalid_request_error.beta_api_shape_disabled"
    );
    sim.redirect_answered(id, 200);
    sim.twilio(STOP);
    sim.assert_failed(
        "openai_closed",
        "closed with code 4000: invalid_request_error.beta_api_shape_disabled",
    );
}

#[test]
fn a_refused_key_is_not_tried_again_and_the_caller_gets_the_fallback_at_once() {
    let mut sim = Sim::new();
    sim.twilio(&start());
    let out = sim.connect_refused_for_good();
    let id = expect_redirect(&out);
    assert!(!sim.call.is_ended(), "the stream stays up for the redirect");
    sim.redirect_answered(id, 200);
    // Twilio stops the stream once the redirect takes hold.
    sim.twilio(STOP);
    sim.assert_failed("openai_connect_failed", "HTTP 401 on upgrade");
    let kinds: Vec<String> = events(&sim.records).into_iter().map(|e| e.1).collect();
    assert_eq!(kinds, ["fallback", "fallback_redirect"]);
}

#[test]
fn a_busy_or_unreachable_server_is_tried_again_with_pauses_then_the_caller_gets_the_fallback() {
    for status in [Some(429), Some(503), None] {
        let mut sim = Sim::new();
        sim.twilio(&start());
        let failed = Input::OpenAiConnectFailed {
            reason: "refused",
            status,
        };
        for attempt in 1..=control::MAX_RECONNECTS {
            let out = sim.input(failed);
            sim.expect_reconnect(out, attempt);
        }
        assert!(
            sim.now < control::RECONNECT_WINDOW,
            "the attempts fit in the window"
        );
        let out = sim.input(failed);
        let id = expect_redirect(&out);
        sim.redirect_answered(id, 200);
        sim.twilio(STOP);
        sim.assert_failed("openai_connect_failed", "refused");
    }
}

#[test]
fn a_failed_redirect_closes_the_stream_so_twilio_plays_the_fallback_after_connect() {
    let mut sim = Sim::live();
    let out = sim.openai(
        r#"{"type":"error","error":{"type":"invalid_request_error","code":"session_expired","message":"Your session hit the maximum duration of 60 minutes."}}"#,
    );
    sim.expect_reconnect(out, 1);
    // The new socket never opens and the window runs out.
    sim.at(control::RECONNECT_WINDOW.0);
    let out = sim.input(Input::Timeout);
    let id = expect_redirect(&out);
    let out = sim.redirect_answered(id, 401);
    assert!(
        out.iter()
            .any(|a| matches!(a, Action::CloseTwilio { code: 1011, .. })),
        "{out:?}"
    );
    // Recorded for what lost the session, not for the attempt that then timed out.
    sim.assert_failed("openai_closed", "closed with code 1000: session_expired");
    let fallback = &sim.logged("call.fallback")[0];
    assert_eq!(fallback["last_failure"], "no usable session within 10 s");
}

#[test]
fn a_redirect_that_gets_no_answer_or_no_stop_still_ends_the_call() {
    // No answer to the request at all.
    let mut sim = Sim::live();
    sim.input(Input::OpenAiConnectFailed {
        reason: "HTTP 403 on upgrade",
        status: Some(403),
    });
    let due = sim.call.poll_timeout().expect("a deadline");
    assert_eq!(due, sim.now + fallback::REDIRECT_TIMEOUT);
    sim.at(due.0);
    let out = sim.input(Input::Timeout);
    assert!(out
        .iter()
        .any(|a| matches!(a, Action::CloseTwilio { code: 1011, .. })));
    sim.assert_failed("openai_connect_failed", "HTTP 403 on upgrade");
    let kinds: Vec<String> = events(&sim.records).into_iter().map(|e| e.1).collect();
    assert_eq!(kinds, ["fallback", "fallback_redirect"]);

    // Accepted, but Twilio never stops the stream.
    let mut sim = Sim::live();
    let out = sim.input(Input::OpenAiConnectFailed {
        reason: "HTTP 403 on upgrade",
        status: Some(403),
    });
    let id = expect_redirect(&out);
    sim.at(100);
    sim.redirect_answered(id, 200);
    let due = sim.call.poll_timeout().expect("a deadline");
    assert_eq!(due, Millis(100) + fallback::STOP_TIMEOUT);
    sim.at(due.0);
    sim.input(Input::Timeout);
    sim.assert_failed("openai_connect_failed", "HTTP 403 on upgrade");
}

#[test]
fn caller_audio_during_the_redirect_goes_nowhere_and_the_socket_closing_ends_the_call() {
    let mut sim = Sim::live();
    let out = sim.input(Input::OpenAiConnectFailed {
        reason: "HTTP 404 on upgrade",
        status: Some(404),
    });
    let id = expect_redirect(&out);
    let out = sim.twilio(&media("AAAA"));
    assert!(out.is_empty(), "{out:?}");
    assert!(sim.call.stats().dropped.is_empty(), "not bad input");
    sim.redirect_answered(id, 200);
    sim.input(Input::TwilioClosed {
        code: 1000,
        reason: "",
    });
    sim.assert_failed("openai_connect_failed", "HTTP 404 on upgrade");
}

#[test]
fn frames_read_while_no_session_is_open_change_nothing() {
    let mut sim = Sim::new();
    sim.twilio(&start());
    // Not open yet.
    assert!(sim.openai(&session_updated("audio/pcmu")).is_empty());
    let failed = Input::OpenAiConnectFailed {
        reason: "HTTP 503 on upgrade",
        status: Some(503),
    };
    let out = sim.input(failed);
    sim.expect_reconnect(out, 1);
    sim.input(failed);
    // Waiting to try again: left over from a closed socket, it must not pass for a session.
    assert!(sim.openai(&session_updated("audio/pcmu")).is_empty());
    assert!(sim.input(Input::OpenAiBinary { len: 3 }).is_empty());
    assert!(sim.call.stats().dropped.is_empty());
    assert!(sim.logged("openai.session.updated").is_empty());
}

#[test]
fn a_stop_that_overtakes_the_redirect_answer_still_records_the_failure() {
    let mut sim = Sim::live();
    let out = sim.input(Input::OpenAiConnectFailed {
        reason: "HTTP 401 on upgrade",
        status: Some(401),
    });
    let id = expect_redirect(&out);
    sim.twilio(STOP);
    sim.assert_failed("openai_connect_failed", "HTTP 401 on upgrade");
    let redirect = events(&sim.records)
        .into_iter()
        .find(|e| e.1 == "fallback_redirect")
        .expect("the redirect is in the event log");
    assert_eq!(redirect.2["twilio"], "stream ended before the REST answer");
    // The answer, when it comes, changes nothing.
    assert!(sim.redirect_answered(id, 200).is_empty());
}

#[test]
fn losing_the_session_while_a_hang_up_is_with_twilio_is_no_failure() {
    let mut sim = Sim::greeted(agent_with_tools());
    sim.response("resp_1");
    sim.function_call("end_call", r#"{"reason":"用件終了"}"#);
    sim.response_done("resp_1");
    // The goodbye, with no audio: the hang-up goes to Twilio at once.
    sim.response("resp_2");
    let out = sim.response_done("resp_2");
    let (id, _) = http_of(&out)[0].clone();
    let out = sim.input(Input::OpenAiClosed {
        code: 1000,
        reason: "",
    });
    Sim::expect_no_new_session(&out, "the hang-up is with Twilio");
    let ok = http::Outcome::Response {
        status: 200,
        body: "{}".into(),
    };
    sim.input(Input::HttpDone { id, outcome: &ok });
    sim.twilio(STOP);
    assert_eq!(sim.end_label(), Some("agent_hangup"));
}

/// The one request among `out` that carries out `tool` (`end_call` or `transfer_call`) at
/// Twilio: the hang-up, or the transfer to the agent's number. Returns its id.
fn ending_request(out: &[Action], tool: &str) -> u64 {
    let reqs = http_of(out);
    assert_eq!(reqs.len(), 1, "{tool}: {out:?}");
    let body = &reqs[0].1.body;
    if tool == "end_call" {
        assert_eq!(body, "Status=completed");
    } else {
        assert!(body.starts_with("Twiml="), "{body}");
        assert!(body.contains("81312345678"), "the transfer number: {body}");
    }
    reqs[0].0
}

/// The agent calls `tool` and says its piece (audio, not yet played); returns the mark
/// that confirms it played.
fn ending_said_not_played(sim: &mut Sim, tool: &str) -> String {
    sim.response("resp_1");
    sim.function_call(tool, "{}");
    sim.response_done("resp_1");
    sim.response("resp_2");
    let m = sim.agent_chunk("item_bye", &audio(1600, 9));
    let out = sim.response_done("resp_2");
    assert!(http_of(&out).is_empty(), "not played yet: {out:?}");
    m
}

#[test]
fn a_session_lost_for_good_after_the_goodbye_was_said_lets_it_play_and_ends_as_planned() {
    for tool in ["end_call", "transfer_call"] {
        let mut sim = Sim::greeted(agent_with_tools());
        let m = ending_said_not_played(&mut sim, tool);
        sim.at(500);
        let out = sim.lose_session();
        // Nothing more is wanted of the agent: no new session, no apology over the goodbye.
        Sim::expect_no_new_session(&out, tool);
        assert!(
            !out.iter().any(|a| matches!(a, Action::CloseTwilio { .. })),
            "{tool}: {out:?}"
        );
        let lost = sim.logged("call.agent_lost_while_finishing");
        assert_eq!(lost.len(), 1, "{tool}");
        assert_eq!(lost[0]["reason"], "openai_closed");
        // Once it has played, the ending goes out as planned.
        sim.at(1_000);
        let out = sim.twilio(&mark(&m));
        let id = ending_request(&out, tool);
        rest_answers(&mut sim, id, 200);
        sim.twilio(STOP);
        let want = if tool == "end_call" {
            "agent_hangup"
        } else {
            "transferred"
        };
        assert_eq!(sim.end_label(), Some(want), "{tool}");
        let kinds: Vec<String> = events(&sim.records).into_iter().map(|e| e.1).collect();
        assert!(
            !kinds.iter().any(|k| k.starts_with("fallback")),
            "{tool}: {kinds:?}"
        );
    }
}

/// When a call with a 35 s time limit is told to wrap up: half-way, its limit being under a
/// minute.
const WRAP_UP_AT_35: u64 = 17_500;

/// A call with a 35 s time limit whose reply `resp_w` (the wrap-up's, asked for at
/// [`WRAP_UP_AT_35`]) is under way: 200 ms of its audio sent and not yet played. The sim, and
/// the mark that follows that audio.
fn reply_under_way_before_the_time_limit() -> (Sim, String) {
    let mut sim = Sim::greeted(Agent {
        max_call_seconds: 35,
        ..agent_with_tools()
    });
    sim.at(WRAP_UP_AT_35);
    let out = sim.input(Input::Timeout);
    assert_eq!(sends_of(&out, "response.create").len(), 1, "{out:?}");
    sim.response("resp_w");
    let m = sim.agent_chunk("item_w", &audio(1600, 3));
    (sim, m)
}

#[test]
fn a_reconnect_failing_for_good_once_the_time_limit_s_end_is_draining_does_not_redirect() {
    // The wrap-up, said and not yet played.
    let (mut sim, m) = reply_under_way_before_the_time_limit();
    sim.response_done("resp_w");
    // The session is lost, and a new one is on its way when the time limit's end comes.
    sim.at(34_000);
    sim.lose_session_and_reconnect();
    sim.at(35_000);
    let out = sim.input(Input::Timeout);
    assert!(http_of(&out).is_empty(), "the wrap-up still plays: {out:?}");
    // The key is refused on the reconnect: the end goes ahead all the same.
    let out = sim.input(Input::OpenAiConnectFailed {
        reason: "401 Unauthorized",
        status: Some(401),
    });
    assert!(http_of(&out).is_empty(), "no redirect: {out:?}");
    assert!(sim.call.poll_timeout().is_some());
    let out = sim.twilio(&mark(&m));
    let id = ending_request(&out, "end_call");
    rest_answers(&mut sim, id, 200);
    sim.twilio(STOP);
    assert_eq!(sim.end_label(), Some("agent_hangup"));
    let lost = sim.logged("call.agent_lost_while_finishing");
    assert_eq!(lost.len(), 1);
    assert_eq!(lost[0]["reason"], "openai_closed", "what lost it first");
}

#[test]
fn a_delayed_reconnect_attempt_due_once_the_ending_is_draining_is_not_made() {
    let (mut sim, m) = reply_under_way_before_the_time_limit();
    sim.response_done("resp_w");
    sim.at(34_800);
    sim.lose_session_and_reconnect();
    // The first attempt is refused for a passing reason: the next waits 0.5 s, past the
    // time limit's end.
    let out = sim.input(Input::OpenAiConnectFailed {
        reason: "503",
        status: Some(503),
    });
    assert!(!out
        .iter()
        .any(|a| matches!(a, Action::ConnectOpenAi { .. })));
    let out = sim.run_until(35_500);
    assert!(
        !out.iter()
            .any(|a| matches!(a, Action::ConnectOpenAi { .. })),
        "{out:?}"
    );
    assert!(http_of(&out).is_empty(), "{out:?}");
    assert_eq!(sim.logged("call.agent_lost_while_finishing").len(), 1);
    let out = sim.twilio(&mark(&m));
    assert_eq!(http_of(&out)[0].1.body, "Status=completed", "{out:?}");
}

#[test]
fn a_reconnect_that_comes_up_once_the_time_limit_s_end_is_draining_is_not_used() {
    let (mut sim, m) = reply_under_way_before_the_time_limit();
    // Lost mid-reply (a reply the new session would be asked to go on with), a second
    // before the time limit's end; the first attempt goes out at once.
    sim.at(34_000);
    sim.lose_session_and_reconnect();
    sim.at(35_000);
    let out = sim.input(Input::Timeout);
    assert!(http_of(&out).is_empty(), "the reply still plays: {out:?}");
    // The new session comes up: nothing is wanted of it, so it is neither seeded nor
    // asked to speak (the agent would talk past the limit), but closed.
    sim.at(35_100);
    sim.openai_opened();
    let out = sim.openai(&session_updated("audio/pcmu"));
    assert!(sends_of(&out, "response.create").is_empty(), "{out:?}");
    assert!(
        sends_of(&out, "conversation.item.create").is_empty(),
        "{out:?}"
    );
    assert!(
        out.iter().any(|a| matches!(a, Action::CloseOpenAi { .. })),
        "{out:?}"
    );
    assert!(http_of(&out).is_empty(), "no redirect: {out:?}");
    let lost = sim.logged("call.agent_lost_while_finishing");
    assert_eq!(lost.len(), 1);
    assert_eq!(lost[0]["reason"], "openai_closed", "what lost it first");
    // The hang-up follows the old reply's last mark.
    sim.at(35_200);
    let out = sim.twilio(&mark(&m));
    let id = ending_request(&out, "end_call");
    rest_answers(&mut sim, id, 200);
    sim.twilio(STOP);
    assert_eq!(sim.end_label(), Some("agent_hangup"));
}

#[test]
fn usage_is_summed_over_responses() {
    let mut sim = Sim::live();
    for _ in 0..2 {
        sim.openai(
            r#"{"type":"response.created","response":{"id":"resp_1","status":"in_progress"}}"#,
        );
        sim.openai(r#"{"type":"response.done","response":{"id":"resp_1","status":"completed","usage":{"total_tokens":253,"input_tokens":132,"output_tokens":121}}}"#);
    }
    assert_eq!(sim.call.stats().tokens.total_tokens, 506);
    assert_eq!(sim.call.stats().responses, 2);
    assert_eq!(
        sim.logged("openai.response.done")[1]["usage"]["output_tokens"],
        121
    );
}

#[test]
fn a_session_that_never_got_ready_is_closed_before_the_next_is_opened() {
    // Found by the call_machine fuzz target: the setup timeout asked for a new socket
    // while the old one stayed open, so two sockets were live and the old one's late
    // events could be taken for the new session's.
    let mut sim = Sim::new();
    sim.twilio(&start());
    sim.openai_opened();
    sim.at(SESSION_SETUP_TIMEOUT.0);
    let out = sim.input(Input::Timeout);
    let close = out
        .iter()
        .position(|a| matches!(a, Action::CloseOpenAi { .. }))
        .expect("the old socket is closed");
    let connect = out
        .iter()
        .position(|a| matches!(a, Action::ConnectOpenAi { .. }))
        .expect("a new one is asked for");
    assert!(close < connect, "{out:?}");
    // And when the window runs out, nothing is closed twice.
    sim.at(SESSION_SETUP_TIMEOUT.0 + control::RECONNECT_WINDOW.0);
    let out = sim.input(Input::Timeout);
    let closes = out
        .iter()
        .filter(|a| matches!(a, Action::CloseOpenAi { .. }))
        .count();
    assert_eq!(closes, 1, "{out:?}");
    let id = expect_redirect(&out);
    sim.redirect_answered(id, 200);
    sim.twilio(STOP);
    sim.assert_failed("openai_session_timeout", "no usable session within 10 s");
}

#[test]
fn absurd_usage_counts_saturate_instead_of_overflowing() {
    // Found by the call_machine fuzz target: two responses whose usage adds past u64::MAX.
    let mut sim = Sim::live();
    for _ in 0..2 {
        sim.openai(r#"{"type":"response.done","response":{"id":"r","usage":{"total_tokens":18446744073709551615,"input_tokens":18446744073709551615,"output_tokens":1}}}"#);
    }
    let tokens = sim.call.stats().tokens;
    assert_eq!(tokens.total_tokens, u64::MAX);
    assert_eq!(tokens.input_tokens, u64::MAX);
    assert_eq!(tokens.output_tokens, 2);
    assert!(!sim.call.is_ended(), "the call goes on");
}

#[test]
fn a_turn_is_logged_at_debug_and_the_call_s_milestones_at_info() {
    // Every line costs CPU where logs are collected: a call says what matters once, and
    // the detail of each turn only when LOG_LEVEL=debug.
    let mut sim = Sim::new();
    sim.twilio(r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#);
    sim.openai_opened();
    sim.openai(r#"{"type":"session.created","session":{"id":"sess_1","model":"gpt-realtime"}}"#);
    sim.openai(&session_updated("audio/pcmu"));
    sim.twilio(&start());
    for turn in 0..3 {
        sim.openai(&speech_started());
        sim.openai(r#"{"type":"input_audio_buffer.speech_stopped","audio_end_ms":2000,"item_id":"item_user"}"#);
        sim.openai(r#"{"type":"input_audio_buffer.committed","item_id":"item_user"}"#);
        sim.openai(r#"{"type":"conversation.item.input_audio_transcription.completed","item_id":"item_user","transcript":"もしもし"}"#);
        let id = format!("resp_{turn}");
        sim.response(&id);
        let played = sim.agent_chunk(&format!("item_{turn}"), &audio(800, turn));
        sim.openai(&format!(r#"{{"type":"response.output_audio_transcript.done","item_id":"item_{turn}","transcript":"はい"}}"#));
        sim.response_done(&id);
        sim.twilio(&mark(&played));
    }
    sim.twilio(STOP);
    let debug = [
        "twilio.connected",
        "openai.connected",
        "openai.session.created",
        "openai.speech_started",
        "openai.caller_transcript",
        "openai.response.created",
        "openai.agent_transcript",
    ];
    for event in debug {
        assert!(!sim.logged(event).is_empty(), "{event} is still logged");
        assert!(
            !sim.info_events.iter().any(|e| e == event),
            "{event} at info"
        );
    }
    assert_eq!(
        sim.info_events,
        [
            "call.accepted",
            "openai.session.updated",
            "twilio.start",
            "bridge.first_agent_audio",
            "openai.response.done",
            "openai.response.done",
            "openai.response.done",
            "twilio.stop",
            "call.ended",
        ]
    );
}

#[test]
fn logs_never_hold_audio() {
    let mut sim = Sim::live();
    let payload = audio(1600, 42);
    sim.twilio(&media(&payload));
    sim.agent_chunk("item_a", &payload);
    sim.openai(&speech_started());
    sim.twilio(r#"{"event":"stop"}"#);
    for l in &sim.logs {
        assert!(!l.contains(&payload[..40]), "audio in log: {l}");
    }
}

// ---- the record ----

fn transcript(records: &[Record]) -> Vec<(u64, Role, String, u64, bool)> {
    // Later writes of the same seq replace earlier ones, as the upsert does.
    let mut by_seq = std::collections::BTreeMap::new();
    for r in records {
        if let Record::Transcript {
            seq,
            role,
            text,
            offset_ms,
            interrupted,
            ..
        } = r
        {
            by_seq.insert(*seq, (*seq, *role, text.clone(), *offset_ms, *interrupted));
        }
    }
    by_seq.into_values().collect()
}

fn events(records: &[Record]) -> Vec<(u64, String, Value)> {
    records
        .iter()
        .filter_map(|r| match r {
            Record::Event {
                seq, kind, detail, ..
            } => Some((*seq, kind.clone(), detail.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn a_conversation_is_recorded_in_conversation_order_with_the_cut_turn_flagged() {
    let mut sim = Sim::new();
    sim.openai_opened();
    sim.openai(r#"{"type":"session.created","session":{"id":"sess_9","type":"realtime"}}"#);
    sim.at(100);
    sim.twilio(&start());
    sim.openai(&session_updated("audio/pcmu"));
    // The greeting: an assistant item, 2 chunks of 200 ms, both heard.
    sim.at(400);
    sim.openai(r#"{"type":"response.output_item.added","item":{"id":"item_g","type":"message","role":"assistant"}}"#);
    sim.openai(r#"{"type":"response.output_audio_transcript.delta","item_id":"item_g","delta":"お電話ありがとうございます。"}"#);
    let m1 = sim.agent_chunk("item_g", &audio(1600, 1));
    let m2 = sim.agent_chunk("item_g", &audio(1600, 2));
    sim.openai(r#"{"type":"response.output_audio_transcript.done","item_id":"item_g","transcript":"お電話ありがとうございます。"}"#);
    sim.at(600);
    sim.twilio(&mark(&m1));
    sim.at(800);
    sim.twilio(&mark(&m2));
    // The caller speaks; their item is committed; the reply starts before the
    // transcription of what they said arrives.
    sim.at(1500);
    sim.openai(
        r#"{"type":"input_audio_buffer.speech_started","audio_start_ms":1350,"item_id":"item_u"}"#,
    );
    sim.at(2500);
    sim.openai(
        r#"{"type":"input_audio_buffer.committed","item_id":"item_u","previous_item_id":"item_g"}"#,
    );
    sim.openai(r#"{"type":"conversation.item.added","item":{"id":"item_u","type":"message","role":"user"}}"#);
    sim.openai(r#"{"type":"response.output_item.added","item":{"id":"item_r","type":"message","role":"assistant"}}"#);
    sim.openai(r#"{"type":"response.output_audio_transcript.delta","item_id":"item_r","delta":"ご予約ですね。お日にちはいつがよろしいでしょうか。"}"#);
    sim.at(2600);
    let r1 = sim.agent_chunk("item_r", &audio(1600, 3));
    sim.agent_chunk("item_r", &audio(1600, 4));
    sim.agent_chunk("item_r", &audio(1600, 5));
    sim.agent_chunk("item_r", &audio(1600, 6));
    sim.openai(r#"{"type":"conversation.item.input_audio_transcription.completed","item_id":"item_u","content_index":0,"transcript":"予約をお願いしたいです","usage":{"type":"tokens","input_tokens":17,"output_tokens":9,"total_tokens":26,"input_token_details":{"text_tokens":0,"audio_tokens":17}}}"#);
    sim.at(2800);
    sim.twilio(&mark(&r1));
    // The caller talks over the reply after 300 of its 800 ms (200 confirmed, 100 since).
    sim.at(2900);
    sim.openai(
        r#"{"type":"input_audio_buffer.speech_started","audio_start_ms":2750,"item_id":"item_u2"}"#,
    );
    sim.openai(r#"{"type":"conversation.item.retrieved","item":{"id":"item_r","type":"message","role":"assistant","content":[{"type":"output_audio","transcript":"ご予約ですね。"}]}}"#);
    sim.openai(r#"{"type":"response.done","response":{"id":"resp_2","status":"cancelled","status_details":{"type":"cancelled","reason":"turn_detected"},"usage":{"total_tokens":100,"input_tokens":60,"output_tokens":40}}}"#);
    sim.at(9100);
    sim.twilio(r#"{"event":"stop"}"#);
    // The caller was still talking: their words so far are asked to be committed, and the
    // server has nothing more.
    sim.openai(FINAL_COMMIT_REFUSED);

    assert_eq!(
        transcript(&sim.records),
        vec![
            (
                0,
                Role::Agent,
                "お電話ありがとうございます。".into(),
                300,
                false
            ),
            (
                1,
                Role::Caller,
                "予約をお願いしたいです".into(),
                1350,
                false
            ),
            (2, Role::Agent, "ご予約ですね。".into(), 2500, true),
        ]
    );
    let ev = events(&sim.records);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0].1, "barge_in");
    assert_eq!(ev[0].2["item_id"], "item_r");
    assert_eq!(ev[0].2["audio_end_ms"], 300);

    assert!(sim.records.contains(&Record::SessionId {
        call_sid: SID.into(),
        session_id: "sess_9".into()
    }));
    assert!(sim.records.contains(&Record::CallConnected {
        call_sid: SID.into(),
        stream_sid: STREAM.into(),
        at_ms: 100
    }));
    let Some(Record::CallEnded {
        duration_ms,
        end_reason,
        failed,
        total_tokens,
        first_audio_ms,
        barge_ins,
        transcription,
        ..
    }) = sim.records.last()
    else {
        panic!("{:?}", sim.records.last())
    };
    assert_eq!(*duration_ms, Some(9000));
    assert_eq!(end_reason, "twilio_stop");
    assert!(!failed);
    assert_eq!(*total_tokens, 100);
    assert_eq!(*first_audio_ms, Some(300));
    assert_eq!(*barge_ins, 1);
    // The transcription model's tokens, apart from the session's.
    assert_eq!(
        *transcription,
        TranscriptionUsage {
            input_tokens: 17,
            output_tokens: 9,
            audio_ms: 0
        }
    );
}

#[test]
fn the_transcriptions_usage_is_summed_into_the_calls_end_and_an_odd_one_costs_no_words() {
    let mut sim = Sim::greeted(Agent::default());
    for (item, text, usage) in [
        (
            "item_a",
            "もしもし",
            r#","usage":{"type":"tokens","input_tokens":20,"output_tokens":4,"total_tokens":24}"#,
        ),
        // whisper-1 is billed by the audio's length.
        (
            "item_b",
            "予約です",
            r#","usage":{"type":"duration","seconds":2.4}"#,
        ),
        (
            "item_c",
            "明日の七時",
            r#","usage":{"type":"tokens","input_tokens":31,"output_tokens":6,"total_tokens":37}"#,
        ),
        // A shape this bridge does not know counts as nothing; the words are kept.
        (
            "item_d",
            "二名です",
            r#","usage":{"type":"tokens","input_tokens":"many","output_tokens":-1}"#,
        ),
        (
            "item_e",
            "はい",
            r#","usage":{"type":"credits","credits":3}"#,
        ),
        ("item_f", "以上です", ""),
    ] {
        sim.openai(&format!(
            r#"{{"type":"conversation.item.added","item":{{"id":"{item}","type":"message","role":"user"}}}}"#
        ));
        sim.openai(&format!(
            r#"{{"type":"conversation.item.input_audio_transcription.completed","item_id":"{item}","content_index":0,"transcript":"{text}"{usage}}}"#
        ));
    }
    sim.twilio(STOP);
    let said: Vec<String> = transcript(&sim.records)
        .into_iter()
        .filter(|e| e.1 == Role::Caller)
        .map(|e| e.2)
        .collect();
    assert_eq!(
        said,
        [
            "もしもし",
            "予約です",
            "明日の七時",
            "二名です",
            "はい",
            "以上です"
        ]
    );
    let Some(Record::CallEnded { transcription, .. }) = sim.records.last() else {
        panic!("{:?}", sim.records.last())
    };
    assert_eq!(
        *transcription,
        TranscriptionUsage {
            input_tokens: 51,
            output_tokens: 10,
            audio_ms: 2_400
        }
    );
}

#[test]
fn failures_and_bad_input_leave_events() {
    let mut sim = Sim::live();
    sim.twilio("garbage");
    sim.openai(r#"{"type":"conversation.item.input_audio_transcription.failed","item_id":"item_u","content_index":0,"error":{"type":"transcription_error","code":"audio_unintelligible","message":"x"}}"#);
    sim.openai(r#"{"type":"error","error":{"type":"invalid_request_error","code":"invalid_value","message":"bad"}}"#);
    sim.input(Input::OpenAiClosed {
        code: 1011,
        reason: "server error",
    });
    let failed = Input::OpenAiConnectFailed {
        reason: "HTTP 503",
        status: Some(503),
    };
    sim.input(failed);
    sim.at(control::RECONNECT_WINDOW.0);
    let out = sim.input(failed);
    let id = expect_redirect(&out);
    sim.redirect_answered(id, 200);
    sim.twilio(STOP);
    let kinds: Vec<String> = events(&sim.records).into_iter().map(|e| e.1).collect();
    assert_eq!(
        kinds,
        [
            "transcription_failed",
            "openai_error",
            "reconnect",
            "reconnect",
            "fallback",
            "fallback_redirect",
            "dropped_input"
        ]
    );
    let Some(Record::CallEnded {
        failed, end_reason, ..
    }) = sim.records.last()
    else {
        panic!()
    };
    assert!(failed);
    assert_eq!(end_reason, "openai_closed", "what lost the session first");
    let seqs: Vec<u64> = events(&sim.records).into_iter().map(|e| e.0).collect();
    assert_eq!(
        seqs,
        [0, 1, 2, 3, 4, 5, 6],
        "event seqs are dense and ordered"
    );
}

// ---- call control: tools, DTMF, limits, a lost session ----

fn agent_with_tools() -> Agent {
    Agent {
        tools: vec![
            json!({"type":"end_call"}),
            json!({"type":"transfer_call"}),
            json!({"type":"function","name":"lookup_customer","description":"顧客を検索",
                   "parameters":{"type":"object","properties":{"phone":{"type":"string"}}},
                   "url":"https://crm.example.jp/tools/lookup","timeout_ms":3000}),
        ],
        transfer_number: Some("+81312345678".into()),
        tool_secret: Some(crate::config::Secret::new("0123456789abcdef")),
        ..Agent::default()
    }
}

impl Sim {
    fn live_with(agent: Agent) -> Self {
        let mut sim = Sim::of(agent);
        sim.drain();
        sim.openai_opened();
        sim.openai(&session_updated("audio/pcmu"));
        let out = sim.twilio(&start());
        assert!(is_greeting(&out[0]));
        sim
    }

    /// [`Sim::live_with`], once the greeting's response (`resp_g`, no audio) is done.
    fn greeted(agent: Agent) -> Self {
        let mut sim = Sim::live_with(agent);
        sim.response("resp_g");
        sim.response_done("resp_g");
        sim
    }

    fn response(&mut self, id: &str) {
        self.openai(&format!(
            r#"{{"type":"response.created","response":{{"id":"{id}","status":"in_progress"}}}}"#
        ));
    }

    fn response_done(&mut self, id: &str) -> Vec<Action> {
        self.openai(&format!(
            r#"{{"type":"response.done","response":{{"id":"{id}","status":"completed"}}}}"#
        ))
    }

    fn function_call(&mut self, name: &str, args: &str) -> Vec<Action> {
        let v = json!({"type":"response.function_call_arguments.done","response_id":"r",
                       "item_id":"fc_1","output_index":0,"call_id":"call_1","name":name,
                       "arguments":args});
        self.openai(&v.to_string())
    }
}

fn sends_of(out: &[Action], kind: &str) -> Vec<Value> {
    out.iter()
        .filter(|a| matches!(a, Action::SendOpenAi(_) | Action::SendTwilio(_)))
        .map(json_of)
        .filter(|v| v["type"] == kind || v["event"] == kind)
        .collect()
}

fn http_of(out: &[Action]) -> Vec<(u64, http::Request)> {
    out.iter()
        .filter_map(|a| match a {
            Action::Http { id, request } => Some((*id, request.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn end_call_says_goodbye_then_hangs_up_once_twilio_played_it() {
    let mut sim = Sim::greeted(agent_with_tools());
    sim.response("resp_1");
    let out = sim.function_call("end_call", r#"{"reason":"用件終了"}"#);
    let output = sends_of(&out, "conversation.item.create");
    assert_eq!(output[0]["item"]["type"], "function_call_output");
    assert_eq!(output[0]["item"]["call_id"], "call_1");
    assert!(
        sends_of(&out, "response.create").is_empty(),
        "never while a response is active"
    );
    let out = sim.response_done("resp_1");
    assert_eq!(sends_of(&out, "response.create").len(), 1, "the goodbye");
    sim.response("resp_2");
    let m = sim.agent_chunk("item_bye", &audio(1600, 9));
    let out = sim.response_done("resp_2");
    assert!(http_of(&out).is_empty(), "the goodbye has not played yet");
    sim.at(1_000);
    let out = sim.twilio(&mark(&m));
    let reqs = http_of(&out);
    assert_eq!(reqs.len(), 1);
    let (id, req) = &reqs[0];
    assert_eq!(
        req.url,
        "https://api.twilio.test/2010-04-01/Accounts/AC1/Calls/CA00000000000000000000000000000001.json"
    );
    assert_eq!(req.body, "Status=completed");
    assert_eq!(req.header("Authorization"), Some("Basic QUMxOnRvaw=="));
    let ok = http::Outcome::Response {
        status: 200,
        body: "{}".into(),
    };
    sim.input(Input::HttpDone {
        id: *id,
        outcome: &ok,
    });
    sim.twilio(r#"{"event":"stop"}"#);
    assert_eq!(sim.end_label(), Some("agent_hangup"));
    let kinds: Vec<String> = events(&sim.records).into_iter().map(|e| e.1).collect();
    assert_eq!(kinds, ["tool_call", "hangup"]);
    let tool = &events(&sim.records)[0].2;
    assert_eq!(tool["name"], "end_call");
    assert_eq!(tool["arguments"]["reason"], "用件終了");
}

#[test]
fn transfer_call_announces_then_redirects_to_the_transfer_number() {
    let mut sim = Sim::greeted(agent_with_tools());
    sim.response("resp_1");
    sim.function_call("transfer_call", "{}");
    sim.response_done("resp_1");
    sim.response("resp_2");
    // The notice produced no audio: nothing to wait for.
    let out = sim.response_done("resp_2");
    let reqs = http_of(&out);
    assert_eq!(reqs.len(), 1);
    let form: Vec<(String, String)> = form_urlencoded::parse(reqs[0].1.body.as_bytes())
        .into_owned()
        .collect();
    assert_eq!(
        form,
        [(
            "Twiml".to_owned(),
            format!(
                "<Response><Dial action=\"{TRANSFER_ACTION}\" method=\"POST\">+81312345678</Dial></Response>"
            )
        )]
    );
    let ok = http::Outcome::Response {
        status: 200,
        body: "{}".into(),
    };
    sim.input(Input::HttpDone {
        id: reqs[0].0,
        outcome: &ok,
    });
    sim.twilio(r#"{"event":"stop"}"#);
    assert_eq!(
        sim.call.end_reason(),
        Some(&EndReason::Transferred {
            to: "+81312345678".into()
        })
    );
    assert_eq!(events(&sim.records)[1].1, "transfer");
}

#[test]
fn transfer_without_a_number_tells_the_model_and_goes_on() {
    let mut agent = agent_with_tools();
    agent.transfer_number = None;
    let mut sim = Sim::live_with(agent);
    let out = sim.function_call("transfer_call", "{}");
    let output = &sends_of(&out, "conversation.item.create")[0];
    assert!(output["item"]["output"]
        .as_str()
        .unwrap()
        .contains("No transfer number"));
    sim.response("r");
    let out = sim.response_done("r");
    assert!(http_of(&out).is_empty());
}

#[test]
fn a_webhook_tool_runs_without_stalling_audio_and_its_answer_goes_back_to_the_model() {
    let mut sim = Sim::greeted(agent_with_tools());
    sim.response("resp_1");
    sim.at(2_000);
    let out = sim.function_call("lookup_customer", r#"{"phone":"+819012345678"}"#);
    let reqs = http_of(&out);
    assert_eq!(reqs.len(), 1);
    let (id, req) = reqs[0].clone();
    assert_eq!(req.url, "https://crm.example.jp/tools/lookup");
    assert_eq!(req.timeout_ms, 3000);
    let body: Value = serde_json::from_str(&req.body).unwrap();
    assert_eq!(body["arguments"]["phone"], "+819012345678");
    assert_eq!(body["call"]["from"], "+819012345678");
    assert_eq!(body["call"]["call_sid"], SID);
    assert_eq!(
        req.header(crate::tools::SIGNATURE_HEADER).unwrap(),
        crate::tools::signature("0123456789abcdef", &req.body)
    );
    // While the tool runs, audio flows both ways.
    let f = audio(160, 3);
    assert_eq!(json_of(&sim.twilio(&media(&f))[0])["audio"], f);
    sim.agent_chunk("item_x", &audio(800, 4));
    // The response ends before the tool answers: no response.create yet.
    let out = sim.response_done("resp_1");
    assert!(sends_of(&out, "response.create").is_empty());
    sim.at(2_450);
    let outcome = http::Outcome::Response {
        status: 200,
        body: r#"{"name":"山田太郎","vip":true}"#.into(),
    };
    let out = sim.input(Input::HttpDone {
        id,
        outcome: &outcome,
    });
    let created = sends_of(&out, "conversation.item.create");
    assert_eq!(
        created[0]["item"]["output"],
        r#"{"name":"山田太郎","vip":true}"#
    );
    assert_eq!(sends_of(&out, "response.create").len(), 1);
    let ev = &events(&sim.records)[0].2;
    assert_eq!(ev["name"], "lookup_customer");
    assert_eq!(ev["ok"], true);
    assert_eq!(ev["duration_ms"], 450);
}

#[test]
fn a_failed_or_slow_webhook_tool_becomes_an_error_output() {
    let mut sim = Sim::live_with(agent_with_tools());
    let out = sim.function_call("lookup_customer", "{}");
    let (id, _) = http_of(&out)[0].clone();
    let timeout = http::Outcome::Failed {
        reason: "timeout".into(),
    };
    let out = sim.input(Input::HttpDone {
        id,
        outcome: &timeout,
    });
    let output = sends_of(&out, "conversation.item.create")[0]["item"]["output"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(output.contains("3000 ms"), "{output}");
    assert_eq!(events(&sim.records)[0].2["ok"], false);
    // Unknown tools and invalid arguments are answered at once, without any request.
    let out = sim.function_call("no_such_tool", "{}");
    assert!(http_of(&out).is_empty());
    assert!(
        sends_of(&out, "conversation.item.create")[0]["item"]["output"]
            .as_str()
            .unwrap()
            .contains("no tool named")
    );
    let out = sim.function_call("lookup_customer", "{not json");
    assert!(http_of(&out).is_empty());
}

#[test]
fn a_tool_still_running_when_the_call_ends_is_recorded_with_what_it_was_asked() {
    let mut sim = Sim::greeted(agent_with_tools());
    sim.response("resp_1");
    let out = sim.function_call("lookup_customer", r#"{"phone":"+8190"}"#);
    let (id, _) = http_of(&out)[0].clone();
    // The caller hangs up while the webhook is at work (it may well act all the same).
    sim.at(500);
    sim.twilio(STOP);
    let tool: Vec<Value> = events(&sim.records)
        .into_iter()
        .filter(|e| e.1 == "tool_call")
        .map(|e| e.2)
        .collect();
    assert_eq!(tool.len(), 1, "{:?}", events(&sim.records));
    let t = &tool[0];
    assert_eq!(t["name"], "lookup_customer");
    assert_eq!(t["arguments"]["phone"], "+8190");
    assert_eq!(t["ok"], false);
    assert_eq!(t["answered"], false);
    assert_eq!(t["duration_ms"], 500);
    let output: Value = serde_json::from_str(t["output"].as_str().unwrap()).unwrap();
    assert_eq!(output["error"], "the call ended before the tool answered");
    assert_eq!(sim.logged("tool.unanswered").len(), 1);
    // Its answer, when it comes, finds no call.
    let records = sim.records.len();
    sim.at(900);
    sim.input(Input::HttpDone {
        id,
        outcome: &http::Outcome::Response {
            status: 200,
            body: "{\"booked\":true}".into(),
        },
    });
    assert_eq!(sim.records.len(), records);
}

#[test]
fn a_refused_response_create_is_asked_again_after_the_active_one() {
    let mut sim = Sim::greeted(agent_with_tools());
    // A tool result asks for a response; server VAD started one at the same moment.
    let out = sim.function_call("no_such_tool", "{}");
    assert_eq!(sends_of(&out, "response.create").len(), 1);
    sim.openai(r#"{"type":"error","error":{"type":"invalid_request_error","code":"conversation_already_has_active_response","message":"busy"}}"#);
    sim.response("resp_vad");
    let out = sim.response_done("resp_vad");
    assert_eq!(sends_of(&out, "response.create").len(), 1, "asked again");
}

#[test]
fn a_refused_greeting_is_not_asked_for_again() {
    // The caller spoke first: the server's own response to them is active when the
    // greeting's response.create arrives.
    let mut sim = Sim::live_with(agent_with_tools());
    sim.openai(r#"{"type":"error","error":{"type":"invalid_request_error","code":"conversation_already_has_active_response","message":"busy","event_id":"evt_bridge_greeting"}}"#);
    sim.response("resp_vad");
    let out = sim.response_done("resp_vad");
    assert!(sends_of(&out, "response.create").is_empty(), "{out:?}");
}

#[test]
fn dtmf_reaches_the_model_as_a_message_and_is_recorded() {
    let mut sim = Sim::greeted(Agent::default());
    let out = sim.twilio(r#"{"event":"dtmf","streamSid":"MZ","sequenceNumber":"5","dtmf":{"track":"inbound_track","digit":"5"}}"#);
    let item = &sends_of(&out, "conversation.item.create")[0]["item"];
    assert_eq!(item["role"], "user");
    assert!(item["content"][0]["text"]
        .as_str()
        .unwrap()
        .contains("「5」"));
    assert_eq!(sends_of(&out, "response.create").len(), 1);
    assert_eq!(events(&sim.records)[0].1, "dtmf");
    assert_eq!(events(&sim.records)[0].2["digit"], "5");
}

#[test]
fn the_time_limit_warns_then_hangs_up() {
    let agent = Agent {
        max_call_seconds: 60,
        ..Agent::default()
    };
    let mut sim = Sim::greeted(agent);
    // Keep the line busy so the idle check stays out of the way: a short turn of the
    // caller's every second, which the server answers.
    for t in (1..=59).map(|s| s * 1_000) {
        sim.at(t);
        if t == 30_000 {
            let out = sim.input(Input::Timeout);
            let sys = &sends_of(&out, "conversation.item.create")[0]["item"];
            assert_eq!(sys["role"], "system");
            assert_eq!(sends_of(&out, "response.create").len(), 1);
            sim.response("resp_w");
            sim.response_done("resp_w");
        }
        sim.openai(r#"{"type":"input_audio_buffer.speech_started","audio_start_ms":1}"#);
        sim.openai(r#"{"type":"input_audio_buffer.speech_stopped","audio_end_ms":2}"#);
        sim.openai(r#"{"type":"input_audio_buffer.committed","item_id":"item_u"}"#);
        sim.response("resp_turn");
        sim.response_done("resp_turn");
    }
    sim.at(60_000);
    let out = sim.input(Input::Timeout);
    ending_request(&out, "end_call");
    let kinds: Vec<String> = events(&sim.records).into_iter().map(|e| e.1).collect();
    assert_eq!(kinds, ["wrap_up", "max_duration"]);
}

#[test]
fn a_silent_line_gets_a_check_in_then_a_goodbye() {
    let mut sim = Sim::greeted(Agent::default());
    assert_eq!(sim.call.poll_timeout(), Some(IDLE));
    sim.at(IDLE.0);
    let out = sim.input(Input::Timeout);
    // What to say goes into the conversation; the response keeps the agent's instructions.
    let note = &sends_of(&out, "conversation.item.create")[0]["item"];
    assert_eq!(note["role"], "system");
    assert!(note["content"][0]["text"]
        .as_str()
        .unwrap()
        .contains("無言"));
    let ask = &sends_of(&out, "response.create")[0];
    assert!(ask.get("response").is_none(), "{ask}");
    sim.response("resp_c");
    sim.response_done("resp_c");
    sim.at(2 * IDLE.0);
    let out = sim.input(Input::Timeout);
    assert_eq!(sends_of(&out, "response.create").len(), 1, "goodbye");
    sim.response("resp_bye");
    let out = sim.response_done("resp_bye");
    assert_eq!(http_of(&out)[0].1.body, "Status=completed");
    let kinds: Vec<String> = events(&sim.records).into_iter().map(|e| e.1).collect();
    assert_eq!(kinds, ["idle_check_in", "idle_hangup"]);
}

/// The text of the system messages among `out`.
fn system_notes(out: &[Action]) -> Vec<String> {
    sends_of(out, "conversation.item.create")
        .iter()
        .filter(|v| v["item"]["role"] == "system")
        .map(|v| v["item"]["content"][0]["text"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn a_goodbye_said_before_end_call_is_not_asked_for_again() {
    let mut sim = Sim::greeted(agent_with_tools());
    // The model says goodbye, then calls end_call in the same response.
    sim.response("resp_1");
    let m = sim.agent_chunk("item_bye", &audio(1600, 9));
    let out = sim.function_call("end_call", "{}");
    let output = &sends_of(&out, "conversation.item.create")[0]["item"];
    assert_eq!(output["type"], "function_call_output");
    let out = sim.response_done("resp_1");
    assert!(
        sends_of(&out, "response.create").is_empty(),
        "no second goodbye"
    );
    assert!(http_of(&out).is_empty(), "the goodbye has not played yet");
    sim.at(300);
    let out = sim.twilio(&mark(&m));
    assert_eq!(http_of(&out)[0].1.body, "Status=completed");
}

#[test]
fn a_transfer_announced_before_the_call_is_not_announced_again() {
    let mut sim = Sim::greeted(agent_with_tools());
    sim.response("resp_1");
    let m = sim.agent_chunk("item_notice", &audio(800, 2));
    sim.function_call("transfer_call", "{}");
    let out = sim.response_done("resp_1");
    assert!(sends_of(&out, "response.create").is_empty());
    let out = sim.twilio(&mark(&m));
    assert!(http_of(&out)[0].1.body.starts_with("Twiml="));
}

/// A greeted call whose line stayed silent: checked in on, then (another idle timeout on)
/// the idle goodbye asked for.
fn idle_goodbye_asked(agent: Agent) -> Sim {
    let mut sim = Sim::greeted(agent);
    sim.at(IDLE.0);
    sim.input(Input::Timeout);
    sim.response("resp_c");
    sim.response_done("resp_c");
    sim.at(2 * IDLE.0);
    sim.input(Input::Timeout);
    sim
}

#[test]
fn a_caller_who_speaks_during_the_idle_goodbye_is_not_hung_up_on() {
    let mut sim = idle_goodbye_asked(Agent::default());
    sim.response("resp_bye");
    sim.agent_chunk("item_bye", &audio(1600, 9));
    // "Hello? I'm still here": the server cancels the goodbye (interrupt_response).
    sim.at(2 * IDLE.0 + 100);
    let out = sim.openai(&speech_started());
    assert_eq!(sends_of(&out, "clear").len(), 1, "the goodbye stops");
    let notes = system_notes(&out);
    assert_eq!(notes.len(), 1, "{out:?}");
    assert!(notes[0].contains("end_call"), "{notes:?}");
    let out = sim.openai(r#"{"type":"response.done","response":{"id":"resp_bye","status":"cancelled","status_details":{"type":"cancelled","reason":"turn_detected"}}}"#);
    assert!(http_of(&out).is_empty(), "no hang-up: {out:?}");
    // The conversation goes on: the server answers the caller's turn.
    sim.response("resp_answer");
    let m = sim.agent_chunk("item_answer", &audio(800, 1));
    let out = sim.response_done("resp_answer");
    assert!(http_of(&out).is_empty());
    let out = sim.twilio(&mark(&m));
    assert!(http_of(&out).is_empty());
    let kinds: Vec<String> = events(&sim.records).into_iter().map(|e| e.1).collect();
    assert_eq!(
        kinds,
        [
            "idle_check_in",
            "idle_hangup",
            "ending_called_off",
            "barge_in"
        ]
    );
    assert_eq!(events(&sim.records)[2].2["finish"], "hangup");
    // A silent line is still looked after: check-in, then goodbye, again.
    assert!(sim.call.poll_timeout().is_some());
}

#[test]
fn an_idle_goodbye_whose_response_calls_end_call_first_is_still_said() {
    let mut sim = idle_goodbye_asked(agent_with_tools());
    // Asked to say goodbye, the model calls end_call before any words.
    sim.response("resp_bye");
    let out = sim.function_call("end_call", "{}");
    assert!(http_of(&out).is_empty(), "{out:?}");
    let out = sim.response_done("resp_bye");
    assert!(http_of(&out).is_empty(), "not hung up in silence: {out:?}");
    assert_eq!(sends_of(&out, "response.create").len(), 1, "{out:?}");
    // The next response says it; once it has played, the call is hung up.
    sim.response("resp_bye2");
    let m = sim.agent_chunk("item_bye", &audio(800, 1));
    sim.response_done("resp_bye2");
    ends_once_played(&mut sim, &m, "end_call", "agent_hangup");
}

#[test]
fn words_over_a_goodbye_said_in_full_do_not_cut_it_and_the_call_ends_as_said() {
    let mut sim = Sim::greeted(agent_with_tools());
    sim.response("resp_1");
    sim.function_call("end_call", "{}");
    sim.response_done("resp_1");
    sim.response("resp_2");
    let m = sim.agent_chunk("item_bye", &audio(1600, 9));
    sim.response_done("resp_2");
    // The goodbye is fully generated and still playing when the caller says "はい、
    // ありがとうございました" over it, as callers do.
    sim.at(50);
    let out = sim.openai(&speech_started());
    assert!(out.is_empty(), "no clear, no truncate, no note: {out:?}");
    // The server answers those words by itself: that response is cancelled, and its audio
    // (what comes before the cancel lands) is not played.
    let out = sim.openai(
        r#"{"type":"response.created","response":{"id":"resp_vad","status":"in_progress"}}"#,
    );
    let cancel = sends_of(&out, "response.cancel");
    assert_eq!(cancel.len(), 1, "{out:?}");
    assert_eq!(cancel[0]["response_id"], "resp_vad");
    let late = delta("item_vad", &audio(800, 3)).replace("resp_1", "resp_vad");
    assert!(sim.openai(&late).is_empty());
    assert_eq!(sim.call.stats().dropped["agent_audio_after_goodbye"], 1);
    // Nor is its transcript, if the server sends it before the cancel lands: the caller
    // never heard those words.
    let said_before = transcript(&sim.records);
    assert!(sim
        .openai(
            r#"{"type":"response.output_audio_transcript.done","event_id":"e","response_id":"resp_vad","item_id":"item_vad","output_index":0,"content_index":0,"transcript":"かしこまりました。"}"#,
        )
        .is_empty());
    assert_eq!(
        sim.call.stats().dropped["agent_transcript_after_goodbye"],
        1
    );
    assert_eq!(transcript(&sim.records), said_before);
    let out = sim.openai(
        r#"{"type":"response.done","response":{"id":"resp_vad","status":"cancelled","status_details":{"type":"cancelled","reason":"client_cancelled"}}}"#,
    );
    assert!(sends_of(&out, "response.create").is_empty(), "{out:?}");
    // The goodbye plays out; then the call is hung up.
    sim.at(1_000);
    let out = sim.twilio(&mark(&m));
    assert_eq!(http_of(&out)[0].1.body, "Status=completed");
    assert!(!sim
        .info_events
        .iter()
        .any(|e| e == "control.ending_called_off"));
}

/// end_call, then the goodbye (resp_2) said in full and still playing when the caller
/// speaks over it and the server starts a response to their words (resp_vad, cancelled).
/// Returns the goodbye's mark.
fn caller_over_a_goodbye_said_in_full(sim: &mut Sim) -> String {
    sim.response("resp_1");
    sim.function_call("end_call", "{}");
    sim.response_done("resp_1");
    sim.response("resp_2");
    let m = sim.agent_chunk("item_bye", &audio(1600, 9));
    sim.response_done("resp_2");
    sim.at(50);
    sim.openai(&speech_started());
    let out = sim.openai(
        r#"{"type":"response.created","response":{"id":"resp_vad","status":"in_progress"}}"#,
    );
    assert_eq!(sends_of(&out, "response.cancel").len(), 1);
    m
}

fn call_of(resp: &str, name: &str) -> String {
    json!({"type":"response.function_call_arguments.done","response_id":resp,
           "item_id":"fc_9","output_index":0,"call_id":"call_9","name":name,
           "arguments":r#"{"date":"2026-11-02"}"#})
    .to_string()
}

#[test]
fn a_tool_called_by_a_response_cancelled_over_the_goodbye_is_not_run() {
    let mut sim = Sim::greeted(agent_with_tools());
    let m = caller_over_a_goodbye_said_in_full(&mut sim);
    // The cancelled response had already called a tool (a booking change, say) that
    // nobody heard of, let alone confirmed.
    let out = sim.openai(&call_of("resp_vad", "lookup_customer"));
    assert!(
        out.is_empty(),
        "webhook run for a silenced response: {out:?}"
    );
    assert_eq!(sim.call.stats().dropped["function_call_after_goodbye"], 1);
    let out = sim.openai(r#"{"type":"response.done","response":{"id":"resp_vad","status":"cancelled","status_details":{"type":"cancelled","reason":"client_cancelled"}}}"#);
    assert!(out.is_empty(), "{out:?}");
    sim.at(1_000);
    let out = sim.twilio(&mark(&m));
    let reqs = http_of(&out);
    assert_eq!(reqs[0].1.body, "Status=completed");
    sim.redirect_answered(reqs[0].0, 200);
    sim.twilio(STOP);
    let kinds: Vec<String> = events(&sim.records).into_iter().map(|e| e.1).collect();
    assert_eq!(
        kinds,
        ["tool_call", "hangup", "dropped_input"],
        "only end_call ran"
    );
}

#[test]
fn an_end_call_in_a_response_cancelled_over_the_goodbye_asks_for_nothing_more() {
    let mut sim = Sim::greeted(agent_with_tools());
    caller_over_a_goodbye_said_in_full(&mut sim);
    let out = sim.openai(&call_of("resp_vad", "end_call"));
    assert!(out.is_empty(), "{out:?}");
    let out = sim.openai(r#"{"type":"response.done","response":{"id":"resp_vad","status":"cancelled","status_details":{"type":"cancelled","reason":"client_cancelled"}}}"#);
    assert!(
        sends_of(&out, "response.create").is_empty(),
        "another response over the goodbye: {out:?}"
    );
}

#[test]
fn a_caller_who_speaks_before_the_goodbye_is_said_in_full_keeps_the_call() {
    let mut sim = Sim::greeted(agent_with_tools());
    sim.response("resp_1");
    sim.function_call("end_call", "{}");
    sim.response_done("resp_1");
    sim.response("resp_2");
    sim.agent_chunk("item_bye", &audio(1600, 9));
    // The goodbye is still being generated when the caller speaks: the server cancels it.
    sim.at(50);
    let out = sim.openai(&speech_started());
    assert!(http_of(&out).is_empty(), "no hang-up: {out:?}");
    assert_eq!(system_notes(&out).len(), 1);
    assert_eq!(
        sends_of(&out, "conversation.item.truncate").len(),
        1,
        "the goodbye is cut where it stood"
    );
    sim.openai(
        r#"{"type":"response.done","response":{"id":"resp_2","status":"cancelled","status_details":{"type":"cancelled","reason":"turn_detected"}}}"#,
    );
    // Later, the model ends the call again; this time it goes through.
    sim.response("resp_3");
    sim.function_call("end_call", "{}");
    let out = sim.response_done("resp_3");
    assert_eq!(sends_of(&out, "response.create").len(), 1);
    sim.response("resp_4");
    let out = sim.response_done("resp_4");
    assert_eq!(http_of(&out)[0].1.body, "Status=completed");
}

#[test]
fn a_transfer_called_off_by_the_caller_tells_the_model_it_did_not_happen() {
    let mut sim = Sim::greeted(agent_with_tools());
    sim.response("resp_1");
    sim.function_call("transfer_call", "{}");
    sim.response_done("resp_1");
    // The notice was asked for; the caller speaks before it starts.
    let out = sim.openai(&speech_started());
    let notes = system_notes(&out);
    assert!(notes[0].contains("transfer_call"), "{notes:?}");
    sim.response("resp_vad");
    let out = sim.response_done("resp_vad");
    assert!(http_of(&out).is_empty(), "not transferred");
    assert!(
        sends_of(&out, "response.create").is_empty(),
        "the notice is no longer asked for"
    );
}

#[test]
fn the_time_limit_s_end_is_not_called_off_by_speech() {
    let agent = Agent {
        max_call_seconds: 60,
        ..Agent::default()
    };
    let mut sim = Sim::live_with(agent);
    sim.at(30_000);
    sim.input(Input::Timeout);
    // A reply starts to play just before the time limit's end.
    sim.at(59_900);
    sim.response("resp_r");
    sim.agent_chunk("item_r", &audio(1600, 1));
    sim.response_done("resp_r");
    sim.at(60_000);
    let out = sim.input(Input::Timeout);
    assert!(http_of(&out).is_empty(), "the reply is still playing");
    let out = sim.openai(&speech_started());
    assert!(system_notes(&out).is_empty());
    assert_eq!(http_of(&out)[0].1.body, "Status=completed", "{out:?}");
}

/// A call of 35 s whose wrap-up (at [`WRAP_UP_AT_35`]) has been said and heard, and whose last reply
/// (`resp_1`, started at 34 s) is still playing when the time limit's end comes: the
/// ending drains, the hang-up waiting for that reply's mark, which is returned.
fn time_limit_draining(sim: &mut Sim, also: impl FnOnce(&mut Sim)) -> String {
    sim.at(WRAP_UP_AT_35);
    let out = sim.input(Input::Timeout);
    assert_eq!(system_notes(&out).len(), 1, "the wrap-up: {out:?}");
    sim.response("resp_w");
    let w = sim.agent_chunk("item_w", &audio(800, 3));
    sim.response_done("resp_w");
    sim.twilio(&mark(&w));
    sim.at(34_000);
    sim.response("resp_1");
    let m = sim.agent_chunk("item_1", &audio(1600, 4));
    also(sim);
    sim.response_done("resp_1");
    m
}

#[test]
fn a_tool_answering_once_the_time_limit_s_end_has_come_makes_the_agent_say_nothing() {
    let agent = Agent {
        max_call_seconds: 35,
        ..agent_with_tools()
    };
    let mut sim = Sim::greeted(agent);
    let mut lookup = None;
    let m = time_limit_draining(&mut sim, |sim| {
        let out = sim.function_call("lookup_customer", r#"{"phone":"+819012345678"}"#);
        lookup = Some(http_of(&out)[0].0);
    });
    sim.at(35_000);
    let out = sim.input(Input::Timeout);
    assert!(http_of(&out).is_empty(), "the reply still plays: {out:?}");
    // The lookup answers while the reply plays out: the agent is not asked to speak past
    // the limit, nor told the answer; the answer is kept.
    sim.at(35_300);
    let out = sim.input(Input::HttpDone {
        id: lookup.expect("the lookup ran"),
        outcome: &tool_answer(),
    });
    assert!(sends_of(&out, "response.create").is_empty(), "{out:?}");
    assert!(
        sends_of(&out, "conversation.item.create").is_empty(),
        "{out:?}"
    );
    let kept: Vec<Value> = events(&sim.records)
        .into_iter()
        .filter(|e| e.1 == "tool_call")
        .map(|e| e.2)
        .collect();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0]["name"], "lookup_customer");
    assert_eq!(kept[0]["output"], r#"{"name":"山田太郎"}"#);
    // The hang-up follows the reply's mark.
    sim.at(35_400);
    let out = sim.twilio(&mark(&m));
    ending_request(&out, "end_call");
    assert!(sends_of(&out, "response.create").is_empty(), "{out:?}");
}

#[test]
fn a_response_starting_once_the_time_limit_s_end_has_come_is_cancelled_unheard() {
    let agent = Agent {
        max_call_seconds: 35,
        ..Agent::default()
    };
    let mut sim = Sim::greeted(agent);
    let m = time_limit_draining(&mut sim, |_| {});
    // A key pressed just before the end asks for a response, which the server starts just
    // after it.
    sim.at(34_900);
    let out = sim.twilio(r#"{"event":"dtmf","streamSid":"MZ","sequenceNumber":"5","dtmf":{"track":"inbound_track","digit":"1"}}"#);
    assert_eq!(sends_of(&out, "response.create").len(), 1, "{out:?}");
    sim.at(35_000);
    let out = sim.input(Input::Timeout);
    assert!(http_of(&out).is_empty(), "the reply still plays: {out:?}");
    sim.at(35_050);
    let out = sim
        .openai(r#"{"type":"response.created","response":{"id":"resp_k","status":"in_progress"}}"#);
    let cancel = sends_of(&out, "response.cancel");
    assert_eq!(cancel.len(), 1, "{out:?}");
    assert_eq!(cancel[0]["response_id"], "resp_k");
    // What it says before the cancel lands is not played, nor taken for what was said.
    let late = delta("item_k", &audio(800, 5)).replace("resp_1", "resp_k");
    assert!(sim.openai(&late).is_empty());
    assert_eq!(sim.call.stats().dropped["agent_audio_after_goodbye"], 1);
    let said_before = transcript(&sim.records);
    sim.openai(
        r#"{"type":"response.output_audio_transcript.done","event_id":"e","response_id":"resp_k","item_id":"item_k","output_index":0,"content_index":0,"transcript":"1番ですね。"}"#,
    );
    assert_eq!(transcript(&sim.records), said_before);
    let out = sim.openai(
        r#"{"type":"response.done","response":{"id":"resp_k","status":"cancelled","status_details":{"type":"cancelled","reason":"client_cancelled"}}}"#,
    );
    assert!(sends_of(&out, "response.create").is_empty(), "{out:?}");
    assert!(http_of(&out).is_empty(), "the reply still plays: {out:?}");
    // The hang-up follows the reply's mark, as planned.
    sim.at(35_400);
    let out = sim.twilio(&mark(&m));
    let id = ending_request(&out, "end_call");
    rest_answers(&mut sim, id, 200);
    sim.twilio(STOP);
    assert_eq!(sim.end_label(), Some("agent_hangup"));
}

#[test]
fn a_close_without_stop_after_the_hang_up_is_still_the_agents_hang_up() {
    let mut sim = Sim::greeted(agent_with_tools());
    sim.function_call("end_call", "{}");
    sim.response("resp_bye");
    let out = sim.response_done("resp_bye");
    assert_eq!(http_of(&out).len(), 1);
    sim.input(Input::TwilioClosed {
        code: 1000,
        reason: "",
    });
    assert_eq!(sim.end_label(), Some("agent_hangup"));
}

#[test]
fn a_response_create_refused_for_another_reason_does_not_block_later_ones() {
    let mut sim = Sim::greeted(agent_with_tools());
    let out = sim.function_call("no_such_tool", "{}");
    assert_eq!(
        sends_of(&out, "response.create")[0]["event_id"],
        "evt_bridge_response"
    );
    sim.openai(r#"{"type":"error","error":{"type":"invalid_request_error","code":"invalid_value","message":"nope","event_id":"evt_bridge_response"}}"#);
    // A keypad press later still gets its answer.
    let out = sim.twilio(
        r#"{"event":"dtmf","streamSid":"MZ","dtmf":{"track":"inbound_track","digit":"1"}}"#,
    );
    assert_eq!(sends_of(&out, "response.create").len(), 1, "{out:?}");
}

#[test]
fn a_refused_goodbye_does_not_hold_up_the_hang_up() {
    let mut sim = Sim::greeted(agent_with_tools());
    let out = sim.function_call("end_call", "{}");
    assert_eq!(sends_of(&out, "response.create").len(), 1, "the goodbye");
    let out = sim.openai(r#"{"type":"error","error":{"type":"server_error","code":"server_error","message":"x","event_id":"evt_bridge_response"}}"#);
    assert_eq!(http_of(&out)[0].1.body, "Status=completed");
}

#[test]
fn an_agent_in_another_language_is_told_things_in_english() {
    let agent = Agent {
        language: "en".into(),
        ..Agent::default()
    };
    let mut sim = Sim::greeted(agent);
    let out = sim.twilio(
        r#"{"event":"dtmf","streamSid":"MZ","dtmf":{"track":"inbound_track","digit":"7"}}"#,
    );
    let item = &sends_of(&out, "conversation.item.create")[0]["item"];
    assert_eq!(
        item["content"][0]["text"],
        r#"(The caller pressed "7" on the phone's keypad.)"#
    );
    sim.response("resp_d");
    sim.response_done("resp_d");
    sim.at(IDLE.0 + 1);
    let out = sim.input(Input::Timeout);
    assert!(system_notes(&out)[0].starts_with("The caller has been silent"));
}

#[test]
fn a_failed_response_is_logged_with_its_error() {
    let mut sim = Sim::live_with(Agent::default());
    sim.response("resp_g");
    sim.openai(r#"{"type":"response.done","response":{"id":"resp_g","status":"failed","status_details":{"type":"failed","error":{"type":"server_error","code":"internal_error"}}}}"#);
    let done = &sim.logged("openai.response.done")[0];
    assert_eq!(done["status"], "failed");
    assert_eq!(done["error"], "server_error: internal_error");
}

#[test]
fn speech_resets_the_idle_check() {
    let mut sim = Sim::greeted(Agent::default());
    sim.at(IDLE.0 - 2_001);
    sim.openai(r#"{"type":"input_audio_buffer.speech_started","audio_start_ms":1}"#);
    sim.at(IDLE.0 - 1);
    sim.openai(r#"{"type":"input_audio_buffer.speech_stopped","audio_end_ms":2001}"#);
    assert_eq!(sim.call.poll_timeout(), Some(Millis(2 * IDLE.0 - 1)));
}

impl Sim {
    /// Lets the clock run to `until`, handling every timeout that falls due on the way;
    /// returns what the machine did.
    fn run_until(&mut self, until: u64) -> Vec<Action> {
        let mut out = vec![];
        for _ in 0..1_000 {
            match self.call.poll_timeout() {
                Some(t) if t.0 <= until => {
                    let t = t.0.max(self.now.0);
                    self.at(t);
                    out.extend(self.input(Input::Timeout));
                }
                _ => break,
            }
        }
        self.at(until);
        out.extend(self.input(Input::Timeout));
        out
    }
}

#[test]
fn a_caller_still_speaking_is_not_checked_in_on_nor_hung_up_on() {
    let mut sim = Sim::greeted(Agent::default());
    sim.at(1_000);
    sim.openai(&speech_started());
    // A long turn, or a line whose `speech_stopped` is slow to come: no "are you still
    // there?" over the caller's words, and no idle goodbye after it.
    let out = sim.run_until(1_000 + 2 * IDLE.0 + 1);
    assert!(
        sends_of(&out, "conversation.item.create").is_empty(),
        "{out:?}"
    );
    assert!(sends_of(&out, "response.create").is_empty(), "{out:?}");
    assert!(http_of(&out).is_empty(), "{out:?}");
    assert!(events(&sim.records).is_empty(), "{:?}", sim.records);
    // Their turn ends: the silence counts from then.
    sim.at(1_000 + 2 * IDLE.0 + 500);
    sim.openai(r#"{"type":"input_audio_buffer.speech_stopped","audio_end_ms":61000}"#);
    sim.response("resp_answer");
    sim.response_done("resp_answer");
    let done = sim.now;
    assert_eq!(sim.call.poll_timeout(), Some(done + IDLE));
}

#[test]
fn speech_that_never_stops_lets_the_line_go_idle_after_the_bound() {
    let mut sim = Sim::greeted(Agent::default());
    sim.at(1_000);
    sim.openai(&speech_started());
    // A noisy line, or a lost `speech_stopped`: the speech counts as activity only up to
    // SPEECH_IDLE_LIMIT from its start, then the line idles as any silent one.
    let due = Millis(1_000) + control::SPEECH_IDLE_LIMIT + IDLE;
    assert_eq!(sim.call.poll_timeout(), Some(due));
    let out = sim.run_until(due.0 - 1);
    assert!(sends_of(&out, "response.create").is_empty(), "{out:?}");
    sim.at(due.0);
    let out = sim.input(Input::Timeout);
    assert_eq!(system_notes(&out).len(), 1, "the check-in: {out:?}");
    assert_eq!(sends_of(&out, "response.create").len(), 1, "{out:?}");
    sim.response("resp_c");
    sim.response_done("resp_c");
    let out = sim.run_until(due.0 + IDLE.0);
    assert_eq!(
        sends_of(&out, "response.create").len(),
        1,
        "the goodbye: {out:?}"
    );
    sim.response("resp_bye");
    let out = sim.response_done("resp_bye");
    assert_eq!(http_of(&out)[0].1.body, "Status=completed");
    let kinds: Vec<String> = events(&sim.records).into_iter().map(|e| e.1).collect();
    assert_eq!(kinds, ["idle_check_in", "idle_hangup"]);
}

#[test]
fn an_expired_session_is_replaced_and_seeded_with_the_conversation() {
    let mut sim = Sim::live_with(Agent::default());
    sim.response("resp_g");
    sim.openai(r#"{"type":"response.output_item.added","item":{"id":"item_g","type":"message","role":"assistant"}}"#);
    sim.openai(r#"{"type":"response.output_audio_transcript.done","item_id":"item_g","transcript":"お電話ありがとうございます。"}"#);
    sim.response_done("resp_g");
    sim.openai(r#"{"type":"conversation.item.added","item":{"id":"item_u","type":"message","role":"user"}}"#);
    sim.openai(r#"{"type":"conversation.item.input_audio_transcription.completed","item_id":"item_u","transcript":"予約したいです"}"#);
    sim.at(3_600_000);
    let out = sim.openai(r#"{"type":"error","error":{"type":"invalid_request_error","code":"session_expired","message":"Your session hit the maximum duration of 60 minutes."}}"#);
    assert!(out.iter().any(|a| matches!(a, Action::CloseOpenAi { .. })));
    assert!(out
        .iter()
        .any(|a| matches!(a, Action::ConnectOpenAi { .. })));
    // The caller keeps talking meanwhile: held, not lost.
    let f = audio(160, 7);
    assert!(sim.twilio(&media(&f)).is_empty());
    sim.at(3_600_400);
    let out = sim.openai_opened();
    assert_eq!(json_of(&out[0])["type"], "session.update");
    sim.at(3_600_600);
    let out = sim.openai(&session_updated("audio/pcmu").replace("sess_1", "sess_2"));
    let sent: Vec<Value> = out.iter().map(json_of).collect();
    assert_eq!(sent[0]["item"]["role"], "assistant");
    assert_eq!(
        sent[0]["item"]["content"][0]["text"],
        "お電話ありがとうございます。"
    );
    assert_eq!(sent[1]["item"]["role"], "user");
    assert_eq!(sent[1]["item"]["content"][0]["text"], "予約したいです");
    assert_eq!(sent[2]["audio"], f.as_str(), "then the held audio");
    assert!(
        !sent.iter().any(|v| v["type"] == "response.create"),
        "no second greeting"
    );
    let ev = events(&sim.records);
    let reconnected = ev.iter().find(|e| e.1 == "reconnected").unwrap();
    assert_eq!(reconnected.2["gap_ms"], 600);
    assert_eq!(
        reconnected.2["session_id"], "sess_2",
        "the new session is named"
    );
    assert!(!sim.call.is_ended());
}

#[test]
fn after_a_reconnect_the_old_session_s_audio_can_be_cleared_and_caller_turns_keep_their_time() {
    let mut sim = Sim::greeted(Agent::default());
    // Twilio sends caller audio all along, 20 ms every 20 ms.
    let mut t = 0;
    let mut caller_until = |sim: &mut Sim, end: u64| {
        while t < end {
            sim.at(t);
            sim.twilio(&media(&audio(160, 1)));
            t += 20;
        }
    };
    caller_until(&mut sim, 9_000);
    // The agent sends 1 s of audio, which Twilio is still playing when the session is lost.
    sim.response("resp_1");
    sim.openai(r#"{"type":"response.output_item.added","item":{"id":"item_a","type":"message","role":"assistant"}}"#);
    for i in 0..10u8 {
        sim.agent_chunk("item_a", &audio(800, i));
    }
    caller_until(&mut sim, 9_500);
    sim.at(9_500);
    sim.lose_session_and_reconnect();
    // The caller talks on while the new session comes up: held, then heard first.
    caller_until(&mut sim, 10_100);
    sim.openai_opened();
    sim.openai(&session_updated("audio/pcmu"));
    // The caller interrupts what is still playing: Twilio is told to clear it; the new
    // session has no such item to truncate.
    let out = sim.openai(
        r#"{"type":"input_audio_buffer.speech_started","audio_start_ms":300,"item_id":"item_u2"}"#,
    );
    assert_eq!(sends_of(&out, "clear").len(), 1, "{out:?}");
    assert!(sends_of(&out, "conversation.item.truncate").is_empty());
    assert!(sends_of(&out, "conversation.item.retrieve").is_empty());
    // The new session counts its audio from where it took over (9 500 ms into the call),
    // so the caller's turn is at 9 800 ms, not 300 ms.
    sim.openai(r#"{"type":"conversation.item.added","item":{"id":"item_u2","type":"message","role":"user"}}"#);
    sim.openai(r#"{"type":"conversation.item.input_audio_transcription.completed","item_id":"item_u2","transcript":"もしもし"}"#);
    let offset = sim
        .records
        .iter()
        .find_map(|r| match r {
            Record::Transcript {
                text, offset_ms, ..
            } if text == "もしもし" => Some(*offset_ms),
            _ => None,
        })
        .expect("the caller's turn");
    assert_eq!(offset, 9_800);
}

/// A reply sent while earlier audio (a filler before a tool's answer) still plays at Twilio
/// is placed where the caller hears it: after that audio, as the recording has it, so the
/// review page's click on the line plays that line.
#[test]
fn an_agent_turn_queued_behind_earlier_audio_is_placed_where_it_is_heard() {
    let mut sim = Sim::greeted(Agent::default());
    sim.at(1_000);
    sim.response("resp_1");
    // 1 s of filler, sent at once.
    for i in 0..10u8 {
        sim.agent_chunk("item_filler", &audio(800, i));
    }
    sim.openai(r#"{"type":"response.output_audio_transcript.done","item_id":"item_filler","response_id":"resp_1","transcript":"少々お待ちください。"}"#);
    sim.response_done("resp_1");
    // The answer, 200 ms later: it plays once the filler has, at 2 000 ms.
    sim.at(1_200);
    sim.response("resp_2");
    sim.agent_chunk("item_answer", &audio(800, 20));
    sim.openai(r#"{"type":"response.output_audio_transcript.done","item_id":"item_answer","response_id":"resp_2","transcript":"三時のご予約です。"}"#);
    let at = |text: &str| {
        transcript(&sim.records)
            .into_iter()
            .find(|t| t.2 == text)
            .map(|t| t.3)
            .expect(text)
    };
    assert_eq!(at("少々お待ちください。"), 1_000);
    assert_eq!(at("三時のご予約です。"), 2_000);
}

mod recording;

#[test]
fn a_short_time_limit_s_wrap_up_comes_half_way_not_at_the_greeting() {
    // With a limit under a minute, 30 s before its end would be at (or before) the start:
    // the agent would be told to close the call as it greets the caller.
    assert_eq!(control::wrap_up_before(30), Millis(15_000));
    assert_eq!(control::wrap_up_before(35), Millis(35_000 - WRAP_UP_AT_35));
    assert_eq!(control::wrap_up_before(60), control::WRAP_UP_BEFORE);
    assert_eq!(control::wrap_up_before(600), control::WRAP_UP_BEFORE);
    let mut sim = Sim::greeted(Agent {
        max_call_seconds: 30,
        ..Agent::default()
    });
    assert_eq!(sim.call.poll_timeout(), Some(Millis(15_000)));
    sim.at(14_999);
    let out = sim.input(Input::Timeout);
    assert!(system_notes(&out).is_empty(), "{out:?}");
    sim.at(15_000);
    let out = sim.input(Input::Timeout);
    assert_eq!(system_notes(&out).len(), 1, "{out:?}");
    assert_eq!(sends_of(&out, "response.create").len(), 1, "{out:?}");
}

#[test]
fn a_wrap_up_due_while_the_session_is_replaced_is_said_once_the_new_one_is_ready() {
    let agent = Agent {
        max_call_seconds: 30,
        ..Agent::default()
    };
    let mut sim = Sim::greeted(agent);
    sim.at(14_000);
    sim.lose_session_and_reconnect();
    // The wrap-up falls due with no session to hear it.
    sim.at(15_000);
    let out = sim.input(Input::Timeout);
    assert!(system_notes(&out).is_empty(), "{out:?}");
    assert!(sends_of(&out, "response.create").is_empty(), "{out:?}");
    assert_ne!(
        sim.call.poll_timeout(),
        Some(Millis(15_000)),
        "no busy loop"
    );
    let kinds: Vec<String> = events(&sim.records).into_iter().map(|e| e.1).collect();
    assert_eq!(kinds, ["reconnect", "wrap_up"]);
    sim.at(15_500);
    sim.openai_opened();
    let out = sim.openai(&session_updated("audio/pcmu"));
    let notes = system_notes(&out);
    assert_eq!(notes.len(), 1, "{out:?}");
    assert!(notes[0].contains("制限時間"), "{notes:?}");
    assert_eq!(sends_of(&out, "response.create").len(), 1, "{out:?}");
}

#[test]
fn a_stop_that_overtakes_the_rest_answer_still_ends_as_the_agents_hang_up() {
    let mut sim = Sim::greeted(agent_with_tools());
    sim.response("resp_1");
    sim.function_call("end_call", "{}");
    sim.response_done("resp_1");
    sim.response("resp_2");
    let out = sim.response_done("resp_2");
    assert_eq!(http_of(&out).len(), 1);
    sim.twilio(r#"{"event":"stop"}"#);
    assert_eq!(sim.end_label(), Some("agent_hangup"));
    let kinds: Vec<String> = events(&sim.records).into_iter().map(|e| e.1).collect();
    assert_eq!(kinds, ["tool_call", "hangup"]);
}

/// The agent says goodbye and calls `end_call`; returns the hang-up request once the
/// goodbye has played.
fn goodbye_played(sim: &mut Sim) -> u64 {
    sim.function_call("end_call", "{}");
    sim.response("resp_2");
    let m = sim.agent_chunk("item_bye", &audio(1600, 9));
    sim.response_done("resp_2");
    sim.at(1_000);
    let out = sim.twilio(&mark(&m));
    ending_request(&out, "end_call")
}

/// Twilio's REST API answers request `id` with `status`.
fn rest_answers(sim: &mut Sim, id: u64, status: u16) -> Vec<Action> {
    let outcome = http::Outcome::Response {
        status,
        body: "{}".into(),
    };
    sim.input(Input::HttpDone {
        id,
        outcome: &outcome,
    })
}

#[test]
fn a_hang_up_twilio_could_not_take_for_a_passing_reason_is_asked_again() {
    let mut sim = Sim::greeted(agent_with_tools());
    let id = goodbye_played(&mut sim);
    let out = rest_answers(&mut sim, id, 503);
    assert!(out.is_empty(), "no fallback yet: {out:?}");
    assert_eq!(sim.call.poll_timeout(), Some(Millis(2_000)));
    // The caller says "はい" over the end: the hang-up stands, Twilio was already asked.
    sim.openai(
        r#"{"type":"input_audio_buffer.speech_started","audio_start_ms":900,"item_id":"item_u"}"#,
    );
    sim.at(2_000);
    let out = sim.input(Input::Timeout);
    let id = ending_request(&out, "end_call");
    let timed_out = http::Outcome::Failed {
        reason: "timed out".into(),
    };
    sim.input(Input::HttpDone {
        id,
        outcome: &timed_out,
    });
    assert_eq!(sim.call.poll_timeout(), Some(Millis(5_000)));
    sim.at(5_000);
    let out = sim.input(Input::Timeout);
    let (id, _) = http_of(&out)[0].clone();
    rest_answers(&mut sim, id, 200);
    sim.twilio(r#"{"event":"stop"}"#);
    sim.openai(FINAL_COMMIT_REFUSED);
    assert_eq!(sim.end_label(), Some("agent_hangup"));
    let hangup = events(&sim.records)
        .into_iter()
        .find(|e| e.1 == "hangup")
        .expect("the hang-up event");
    assert_eq!(hangup.2["attempts"], 3);
    assert!(!sim.info_events.iter().any(|e| e == "ending_called_off"));
}

#[test]
fn a_transfer_twilio_refused_is_not_recorded_as_made_when_the_caller_hangs_up_before_the_retry() {
    // The notice said (no audio: the request goes at once), then Twilio answers 503.
    let transfer_asked = |sim: &mut Sim| {
        sim.response("resp_1");
        sim.function_call("transfer_call", "{}");
        sim.response_done("resp_1");
        sim.response("resp_2");
        ending_request(&sim.response_done("resp_2"), "transfer_call")
    };
    let mut sim = Sim::greeted(agent_with_tools());
    let id = transfer_asked(&mut sim);
    rest_answers(&mut sim, id, 503);
    // The caller hangs up while the retry waits: Twilio put no one through.
    sim.at(500);
    sim.twilio(STOP);
    assert_eq!(sim.end_label(), Some("twilio_stop"));
    let transfer = events(&sim.records)
        .into_iter()
        .find(|e| e.1 == "transfer")
        .expect("the transfer event");
    assert_eq!(transfer.2["ok"], false, "{:?}", transfer.2);

    // No answer at all (a timeout): Twilio may have put them through.
    let mut sim = Sim::greeted(agent_with_tools());
    let id = transfer_asked(&mut sim);
    let timed_out = http::Outcome::Failed {
        reason: "timed out".into(),
    };
    sim.input(Input::HttpDone {
        id,
        outcome: &timed_out,
    });
    sim.at(500);
    sim.twilio(STOP);
    assert_eq!(sim.end_label(), Some("transferred"));
}

#[test]
fn a_hang_up_twilio_keeps_failing_hands_the_caller_to_the_fallback_after_three_tries() {
    let mut sim = Sim::greeted(agent_with_tools());
    let mut id = goodbye_played(&mut sim);
    for at in [2_000, 5_000] {
        rest_answers(&mut sim, id, 500);
        sim.at(at);
        id = http_of(&sim.input(Input::Timeout))[0].0;
    }
    let out = rest_answers(&mut sim, id, 500);
    assert!(out
        .iter()
        .any(|a| matches!(a, Action::CloseTwilio { code: 1011, .. })));
    assert_eq!(sim.end_label(), Some("call_control_failed"));
}

#[test]
fn a_hang_up_refused_for_good_is_not_asked_again() {
    let mut sim = Sim::greeted(agent_with_tools());
    let id = goodbye_played(&mut sim);
    let out = rest_answers(&mut sim, id, 401);
    assert!(out
        .iter()
        .any(|a| matches!(a, Action::CloseTwilio { code: 1011, .. })));
}

#[test]
fn a_tool_answering_after_the_transfer_went_to_twilio_makes_the_agent_say_nothing() {
    let mut sim = Sim::greeted(agent_with_tools());
    sim.response("resp_1");
    let out = sim.function_call("lookup_customer", r#"{"phone":"+819012345678"}"#);
    let (lookup, _) = http_of(&out)[0].clone();
    let transfer = json!({"type":"response.function_call_arguments.done","response_id":"resp_1",
                          "item_id":"fc_2","output_index":1,"call_id":"call_2",
                          "name":"transfer_call","arguments":"{}"});
    sim.openai(&transfer.to_string());
    let out = sim.response_done("resp_1");
    assert!(
        sends_of(&out, "response.create").is_empty(),
        "the notice waits for the lookup"
    );
    // The lookup takes longer than the notice may: the transfer goes without it.
    let deadline = sim.call.poll_timeout().expect("the goodbye's deadline");
    sim.at(deadline.0);
    let out = sim.input(Input::Timeout);
    let reqs = http_of(&out);
    assert_eq!(reqs.len(), 1, "{out:?}");
    assert!(reqs[0].1.body.starts_with("Twiml="));
    // Its answer comes while Twilio redirects the call: the model is not asked to speak.
    sim.at(deadline.0 + 3_000);
    let answer = http::Outcome::Response {
        status: 200,
        body: r#"{"name":"山田"}"#.into(),
    };
    let out = sim.input(Input::HttpDone {
        id: lookup,
        outcome: &answer,
    });
    assert!(sends_of(&out, "response.create").is_empty(), "{out:?}");
    assert!(
        sends_of(&out, "conversation.item.create").is_empty(),
        "{out:?}"
    );
    let tool_events = events(&sim.records)
        .into_iter()
        .filter(|e| e.1 == "tool_call")
        .count();
    assert_eq!(tool_events, 2, "the lookup's answer is still kept");
}

fn lookup_then_session_lost(sim: &mut Sim) -> u64 {
    sim.response("resp_1");
    sim.at(1_000);
    let out = sim.function_call("lookup_customer", r#"{"phone":"+819012345678"}"#);
    let (id, _) = http_of(&out)[0].clone();
    sim.response_done("resp_1");
    sim.at(1_500);
    sim.lose_session_and_reconnect();
    id
}

fn tool_answer() -> http::Outcome {
    http::Outcome::Response {
        status: 200,
        body: r#"{"name":"山田太郎"}"#.into(),
    }
}

#[test]
fn a_tool_answering_after_its_session_was_lost_is_told_to_the_new_one() {
    let mut sim = Sim::greeted(agent_with_tools());
    let id = lookup_then_session_lost(&mut sim);
    sim.openai_opened();
    let out = sim.openai(&session_updated("audio/pcmu"));
    assert!(
        sends_of(&out, "response.create").is_empty(),
        "the model waits for the lookup, as it would have"
    );
    sim.at(2_000);
    let out = sim.input(Input::HttpDone {
        id,
        outcome: &tool_answer(),
    });
    assert!(
        sends_of(&out, "conversation.item.create")
            .iter()
            .all(|v| v["item"]["type"] != "function_call_output"),
        "the new session has no call to attach an output to: {out:?}"
    );
    let notes = system_notes(&out);
    assert_eq!(notes.len(), 1, "{out:?}");
    assert!(notes[0].contains("lookup_customer") && notes[0].contains("山田太郎"));
    assert_eq!(sends_of(&out, "response.create").len(), 1);
    let tool = events(&sim.records)
        .into_iter()
        .find(|e| e.1 == "tool_call")
        .expect("the tool's event");
    assert_eq!(tool.2["after_reconnect"], true);
    assert_eq!(tool.2["ok"], true);
}

#[test]
fn a_tool_answering_while_the_session_is_being_replaced_is_told_once_it_is_ready() {
    let mut sim = Sim::greeted(agent_with_tools());
    let id = lookup_then_session_lost(&mut sim);
    let out = sim.input(Input::HttpDone {
        id,
        outcome: &tool_answer(),
    });
    assert!(
        !out.iter().any(|a| matches!(a, Action::SendOpenAi(_))),
        "{out:?}"
    );
    sim.openai_opened();
    let out = sim.openai(&session_updated("audio/pcmu"));
    let notes = system_notes(&out);
    assert_eq!(notes.len(), 1, "{out:?}");
    assert!(notes[0].contains("山田太郎"));
    assert_eq!(sends_of(&out, "response.create").len(), 1);
}

#[test]
fn a_refused_transfer_hands_the_caller_to_the_fallback() {
    let mut sim = Sim::greeted(agent_with_tools());
    sim.function_call("transfer_call", "{}");
    sim.response("resp_2");
    let out = sim.response_done("resp_2");
    let (id, _) = http_of(&out)[0].clone();
    let refused = http::Outcome::Response {
        status: 400,
        body: "{}".into(),
    };
    let out = sim.input(Input::HttpDone {
        id,
        outcome: &refused,
    });
    assert!(out
        .iter()
        .any(|a| matches!(a, Action::CloseTwilio { code: 1011, .. })));
    assert_eq!(sim.end_label(), Some("call_control_failed"));
}

#[test]
fn every_end_reason_s_label_is_listed_for_the_review_page() {
    let s = || String::from("x");
    let all = [
        EndReason::TwilioStop,
        EndReason::TwilioSocketClosed { code: 1006 },
        EndReason::OpenAiClosed {
            code: 1011,
            reason: s(),
        },
        EndReason::OpenAiConnectFailed { reason: s() },
        EndReason::SessionSetupTimeout,
        EndReason::SessionRejected { reason: s() },
        EndReason::AgentHangup { why: s() },
        EndReason::CallControlFailed { what: s() },
        EndReason::Transferred { to: s() },
        EndReason::ResponseFailed { error: s() },
    ];
    for r in &all {
        // A new reason fails to compile here: add it to `all` above and to LABELS.
        match r {
            EndReason::TwilioStop
            | EndReason::TwilioSocketClosed { .. }
            | EndReason::OpenAiClosed { .. }
            | EndReason::OpenAiConnectFailed { .. }
            | EndReason::SessionSetupTimeout
            | EndReason::SessionRejected { .. }
            | EndReason::AgentHangup { .. }
            | EndReason::CallControlFailed { .. }
            | EndReason::Transferred { .. }
            | EndReason::ResponseFailed { .. } => {}
            // Labelled as its cause, one of the above.
            EndReason::FailedWhileEnding { .. } => {}
        }
    }
    let lost = EndReason::FailedWhileEnding {
        cause: Box::new(all[2].clone()),
        then: s(),
    };
    assert_eq!(lost.label(), "openai_closed");
    assert!(lost.is_failure());
    let mut labels: Vec<_> = all.iter().map(EndReason::label).collect();
    let mut listed = EndReason::LABELS.to_vec();
    labels.sort_unstable();
    listed.sort_unstable();
    assert_eq!(labels, listed);
}

#[test]
fn an_event_type_the_bridge_does_not_know_is_counted_and_logged_and_known_unused_ones_are_not() {
    let mut sim = Sim::live();
    // Known, and of no use to a phone call: passed over quietly.
    for kind in openai::UNUSED_EVENTS {
        sim.openai(&format!(r#"{{"type":"{kind}","event_id":"e1"}}"#));
        assert!(sim.logged("bridge.dropped").is_empty(), "{kind}");
    }
    // A renamed audio event would leave the caller in silence: it must show.
    sim.openai(r#"{"type":"response.output_audio.chunk","event_id":"e2","delta":"AAAA"}"#);
    let dropped = sim.logged("bridge.dropped");
    assert_eq!(dropped.len(), 1, "{dropped:?}");
    assert_eq!(dropped[0]["reason"], "openai_unknown_event");
    assert_eq!(dropped[0]["detail"]["type"], "response.output_audio.chunk");
    sim.twilio(STOP);
    let counted: Vec<Value> = events(&sim.records)
        .into_iter()
        .filter(|e| e.1 == "dropped_input")
        .map(|e| e.2)
        .collect();
    assert_eq!(counted, [json!({ "openai_unknown_event": 1 })]);
}

mod caller_chunks;
mod failed_responses;
mod held_responses;
mod interrupted_calls;
mod reconnect;

/// The tool call was answered, once, with `ok: true`.
fn answered_ok(out: &[Action]) {
    let outputs = sends_of(out, "conversation.item.create");
    assert_eq!(outputs.len(), 1, "{out:?}");
    let output = outputs[0]["item"]["output"].as_str().unwrap();
    assert!(output.contains(r#""ok":true"#), "{output}");
}

/// Just after the idle goodbye's deadline, the mark `m` of the ending's words echoes: the
/// `tool`'s request goes to Twilio, which carries it out, and the call ends as `label`.
fn ends_once_played(sim: &mut Sim, m: &str, tool: &str, label: &str) {
    sim.at(2 * IDLE.0 + 500);
    let id = ending_request(&sim.twilio(&mark(m)), tool);
    rest_answers(sim, id, 200);
    sim.twilio(STOP);
    assert_eq!(sim.end_label(), Some(label));
}

#[test]
fn a_transfer_asked_for_as_the_idle_goodbye_starts_is_made() {
    let mut sim = idle_goodbye_asked(agent_with_tools());
    // The caller comes back with "担当者と話したい" just as the goodbye is asked for, and the
    // model transfers instead of saying goodbye: the transfer is what happens.
    sim.response("resp_bye");
    let out = sim.function_call("transfer_call", "{}");
    assert!(http_of(&out).is_empty(), "{out:?}");
    answered_ok(&out);
    let out = sim.response_done("resp_bye");
    assert_eq!(sends_of(&out, "response.create").len(), 1, "{out:?}");
    sim.response("resp_notice");
    let m = sim.agent_chunk("item_notice", &audio(800, 1));
    sim.response_done("resp_notice");
    ends_once_played(&mut sim, &m, "transfer_call", "transferred");
}

#[test]
fn a_response_that_calls_end_call_then_transfer_call_transfers() {
    let mut sim = idle_goodbye_asked(agent_with_tools());
    // The same response says goodbye, calls end_call, then transfer_call: the last word is
    // what happens (the words were said).
    sim.response("resp_bye");
    let m = sim.agent_chunk("item_bye", &audio(800, 1));
    let out = sim.function_call("end_call", "{}");
    assert!(http_of(&out).is_empty(), "{out:?}");
    let out = sim.function_call("transfer_call", "{}");
    answered_ok(&out);
    sim.response_done("resp_bye");
    ends_once_played(&mut sim, &m, "transfer_call", "transferred");
}

#[test]
fn a_transfer_asked_for_once_the_goodbye_is_said_is_recorded_as_not_done() {
    let mut sim = idle_goodbye_asked(agent_with_tools());
    sim.response("resp_bye");
    let m = sim.agent_chunk("item_bye", &audio(800, 1));
    sim.response_done("resp_bye");
    // The goodbye is said in full and plays; a late transfer_call does not change the ending.
    let out = sim.function_call("transfer_call", "{}");
    assert!(http_of(&out).is_empty(), "{out:?}");
    let tool: Vec<Value> = events(&sim.records)
        .into_iter()
        .filter(|e| e.1 == "tool_call")
        .map(|e| e.2)
        .collect();
    assert_eq!(tool.len(), 1, "{tool:?}");
    assert_eq!(tool[0]["ok"], false, "{tool:?}");
    assert!(
        tool[0]["output"].as_str().unwrap().contains("hung up"),
        "{tool:?}"
    );
    ends_once_played(&mut sim, &m, "end_call", "agent_hangup");
}

/// The caller's turn `item_u` is committed at 5 s; its transcription has not come yet.
fn caller_turn_committed_untranscribed() -> Sim {
    let mut sim = Sim::greeted(agent_with_tools());
    sim.at(4_000);
    sim.openai(
        r#"{"type":"input_audio_buffer.speech_started","audio_start_ms":3900,"item_id":"item_u"}"#,
    );
    sim.at(5_000);
    sim.openai(
        r#"{"type":"input_audio_buffer.speech_stopped","audio_end_ms":4900,"item_id":"item_u"}"#,
    );
    sim.openai(r#"{"type":"input_audio_buffer.committed","item_id":"item_u"}"#);
    sim
}

fn call_ended(records: &[Record]) -> Option<(u64, Option<u64>, String)> {
    records.iter().find_map(|r| match r {
        Record::CallEnded {
            at_ms,
            duration_ms,
            end_reason,
            ..
        } => Some((*at_ms, *duration_ms, end_reason.clone())),
        _ => None,
    })
}

#[test]
fn a_caller_who_hangs_up_right_after_speaking_keeps_their_last_words_in_the_record() {
    let mut sim = caller_turn_committed_untranscribed();
    // 「では失礼します」, and the caller hangs up before its transcription comes.
    sim.at(5_200);
    let out = sim.twilio(STOP);
    assert_eq!(sim.end_label(), None, "the transcription is waited for");
    assert!(
        !out.iter().any(|a| matches!(a, Action::CloseOpenAi { .. })),
        "{out:?}"
    );
    assert_eq!(sim.call.poll_timeout(), Some(Millis(5_200 + 3_000)));
    // The server answers the turn meanwhile: nothing of it goes anywhere, no tool runs.
    sim.at(5_400);
    let out = sim.openai(&delta("item_a", &audio(800, 1)));
    assert!(sends_of(&out, "media").is_empty(), "{out:?}");
    let out = sim.function_call("lookup_customer", "{}");
    assert!(http_of(&out).is_empty(), "{out:?}");
    // The transcription comes: it is kept, and the call ends as of Twilio's stop.
    sim.at(5_900);
    let out = sim.openai(r#"{"type":"conversation.item.input_audio_transcription.completed","item_id":"item_u","content_index":0,"transcript":"では失礼します"}"#);
    assert!(
        out.iter().any(|a| matches!(a, Action::CloseOpenAi { .. })),
        "{out:?}"
    );
    assert_eq!(sim.end_label(), Some("twilio_stop"));
    let words: Vec<String> = transcript(&sim.records)
        .into_iter()
        .filter(|t| t.1 == Role::Caller)
        .map(|t| t.2)
        .collect();
    assert_eq!(words, ["では失礼します"]);
    let (at_ms, _, reason) = call_ended(&sim.records).expect("the call's end");
    assert_eq!((at_ms, reason.as_str()), (5_200, "twilio_stop"));
}

/// The server's refusal of the commit asked for when the caller hung up mid-turn: it had
/// nothing to commit (it had just committed the turn itself, or heard only a noise).
const FINAL_COMMIT_REFUSED: &str = r#"{"type":"error","error":{"type":"invalid_request_error","code":"input_audio_buffer_commit_empty","message":"buffer too small","event_id":"evt_bridge_final_commit"}}"#;

/// The caller starts speaking (`item_u`) at 4 s and hangs up mid-sentence at 5 s, before
/// the server heard them stop: returns what the stop produced.
fn caller_hangs_up_mid_sentence(sim: &mut Sim) -> Vec<Action> {
    sim.at(4_000);
    sim.openai(
        r#"{"type":"input_audio_buffer.speech_started","audio_start_ms":3900,"item_id":"item_u"}"#,
    );
    sim.at(5_000);
    sim.twilio(STOP)
}

#[test]
fn a_caller_who_hangs_up_mid_sentence_keeps_the_words_they_said() {
    let mut sim = Sim::greeted(agent_with_tools());
    let out = caller_hangs_up_mid_sentence(&mut sim);
    // Their words so far are made a turn, so that they are transcribed.
    assert_eq!(
        sends_of(&out, "input_audio_buffer.commit"),
        [json!({"type":"input_audio_buffer.commit","event_id":"evt_bridge_final_commit"})]
    );
    assert_eq!(sim.end_label(), None, "the turn is waited for");
    sim.at(5_100);
    sim.openai(r#"{"type":"input_audio_buffer.committed","item_id":"item_u"}"#);
    assert_eq!(sim.end_label(), None, "and then its transcription");
    sim.at(5_700);
    let out = sim.openai(r#"{"type":"conversation.item.input_audio_transcription.completed","item_id":"item_u","content_index":0,"transcript":"それでお願いしま"}"#);
    assert!(
        out.iter().any(|a| matches!(a, Action::CloseOpenAi { .. })),
        "{out:?}"
    );
    let words: Vec<(String, u64)> = transcript(&sim.records)
        .into_iter()
        .filter(|t| t.1 == Role::Caller)
        .map(|t| (t.2, t.3))
        .collect();
    assert_eq!(words, [("それでお願いしま".to_owned(), 3_900)]);
    let (at_ms, _, reason) = call_ended(&sim.records).expect("the call's end");
    assert_eq!((at_ms, reason.as_str()), (5_000, "twilio_stop"));
    assert!(sim.logged("call.caller_transcript_missing").is_empty());
}

#[test]
fn a_final_commit_the_server_refuses_ends_the_call_at_once() {
    let mut sim = Sim::greeted(agent_with_tools());
    caller_hangs_up_mid_sentence(&mut sim);
    // The server had just committed the turn itself: its transcription is what is waited
    // for, and the empty commit is refused.
    sim.at(5_050);
    sim.openai(r#"{"type":"input_audio_buffer.committed","item_id":"item_u"}"#);
    sim.openai(FINAL_COMMIT_REFUSED);
    assert_eq!(sim.end_label(), None);
    sim.at(5_300);
    sim.openai(r#"{"type":"conversation.item.input_audio_transcription.completed","item_id":"item_u","content_index":0,"transcript":"はい"}"#);
    assert_eq!(sim.end_label(), Some("twilio_stop"));
    // Refused with nothing committed (the caller's speech was a noise): the end is not held.
    let mut sim = Sim::greeted(agent_with_tools());
    caller_hangs_up_mid_sentence(&mut sim);
    sim.at(5_050);
    sim.openai(FINAL_COMMIT_REFUSED);
    assert_eq!(sim.end_label(), Some("twilio_stop"));
    let (at_ms, ..) = call_ended(&sim.records).expect("the call's end");
    assert_eq!(at_ms, 5_000);
    assert!(sim.logged("call.caller_transcript_missing").is_empty());
}

#[test]
fn a_final_commit_never_answered_ends_the_call_after_the_tail_and_says_so() {
    let mut sim = Sim::greeted(agent_with_tools());
    caller_hangs_up_mid_sentence(&mut sim);
    sim.at(7_999);
    sim.input(Input::Timeout);
    assert_eq!(sim.end_label(), None);
    sim.at(8_000);
    sim.input(Input::Timeout);
    assert_eq!(sim.end_label(), Some("twilio_stop"));
    let missing = sim.logged("call.caller_transcript_missing");
    assert_eq!(missing.len(), 1);
    assert_eq!(missing[0]["uncommitted"], true);
}

#[test]
fn a_last_transcription_that_never_comes_ends_the_call_after_the_tail() {
    let mut sim = caller_turn_committed_untranscribed();
    sim.at(5_200);
    sim.twilio(STOP);
    sim.input(Input::TwilioClosed {
        code: 1000,
        reason: "",
    });
    assert_eq!(sim.end_label(), None);
    sim.at(8_199);
    sim.input(Input::Timeout);
    assert_eq!(sim.end_label(), None);
    sim.at(8_200);
    let out = sim.input(Input::Timeout);
    assert_eq!(sim.end_label(), Some("twilio_stop"));
    assert!(
        !out.iter().any(|a| matches!(a, Action::CloseTwilio { .. })),
        "Twilio's socket is gone: {out:?}"
    );
    assert_eq!(sim.logged("call.caller_transcript_missing").len(), 1);
    assert_eq!(call_ended(&sim.records).map(|e| e.0), Some(5_200));
}

#[test]
fn a_session_that_closes_in_the_tail_ends_the_call_at_once() {
    let mut sim = caller_turn_committed_untranscribed();
    sim.at(5_200);
    sim.twilio(STOP);
    sim.at(5_300);
    let out = sim.input(Input::OpenAiClosed {
        code: 1000,
        reason: "",
    });
    assert_eq!(sim.end_label(), Some("twilio_stop"));
    assert!(
        !out.iter().any(|a| matches!(a, Action::CloseOpenAi { .. })),
        "already closed: {out:?}"
    );
}

#[test]
fn a_caller_whose_words_are_transcribed_ends_the_call_at_once() {
    let mut sim = caller_turn_committed_untranscribed();
    sim.openai(r#"{"type":"conversation.item.input_audio_transcription.completed","item_id":"item_u","transcript":"はい"}"#);
    sim.at(5_200);
    sim.twilio(STOP);
    assert_eq!(sim.end_label(), Some("twilio_stop"));
}

#[test]
fn a_caller_turn_whose_transcription_failed_keeps_its_place_in_the_record() {
    let mut sim = caller_turn_committed_untranscribed();
    // The server answers the turn; its transcription then fails.
    sim.response("resp_a");
    sim.agent_chunk("item_a", &audio(800, 1));
    sim.openai(r#"{"type":"response.output_audio_transcript.done","response_id":"resp_a","item_id":"item_a","content_index":0,"transcript":"少々お待ちください。"}"#);
    sim.response_done("resp_a");
    sim.at(6_000);
    sim.openai(r#"{"type":"conversation.item.input_audio_transcription.failed","item_id":"item_u","content_index":0,"error":{"type":"transcription_error","code":"audio_unintelligible","message":"x"}}"#);
    let turns: Vec<(Role, String)> = transcript(&sim.records)
        .into_iter()
        .map(|t| (t.1, t.2))
        .collect();
    assert_eq!(
        turns,
        [
            (Role::Caller, "（文字起こしできませんでした）".to_owned()),
            (Role::Agent, "少々お待ちください。".to_owned()),
        ]
    );
    // Nothing is owed any more: a hang-up now ends the call at once.
    sim.twilio(STOP);
    assert_eq!(sim.end_label(), Some("twilio_stop"));
}

#[test]
fn an_agent_turn_the_caller_hung_up_on_is_kept_as_heard() {
    let mut sim = Sim::greeted(agent_with_tools());
    sim.at(1_000);
    sim.response("resp_a");
    // 3 s of audio, all sent at once, and its transcript, written whole.
    let m1 = sim.agent_chunk("item_a", &audio(8_000, 1));
    sim.agent_chunk("item_a", &audio(16_000, 2));
    let text = "本日はご予約ありがとうございます。当日はお気をつけてお越しください。";
    sim.openai(&format!(r#"{{"type":"response.output_audio_transcript.done","response_id":"resp_a","item_id":"item_a","content_index":0,"transcript":"{text}"}}"#));
    sim.response_done("resp_a");
    assert_eq!(
        transcript(&sim.records).last().map(|t| t.2.as_str()),
        Some(text)
    );
    // The first second played; the caller hangs up.
    sim.at(2_000);
    sim.twilio(&mark(&m1));
    sim.at(2_100);
    sim.twilio(STOP);
    assert_eq!(sim.end_label(), Some("twilio_stop"));
    let (_, role, kept, _, cut) = transcript(&sim.records).pop().unwrap();
    assert_eq!(role, Role::Agent);
    assert!(cut, "marked cut");
    // 1.1 s of 3 s heard (1 s confirmed, 100 ms since): the start of the text, about that
    // share of it.
    let chars = text.chars().count();
    assert_eq!(
        kept,
        text.chars().take(chars * 1_100 / 3_000).collect::<String>()
    );
}

#[test]
fn an_agent_turn_all_but_played_at_the_hang_up_stays_whole() {
    let mut sim = Sim::greeted(agent_with_tools());
    sim.at(1_000);
    sim.response("resp_a");
    let m1 = sim.agent_chunk("item_a", &audio(8_000, 1));
    sim.agent_chunk("item_a", &audio(800, 2));
    let text = "失礼いたします。";
    sim.openai(&format!(r#"{{"type":"response.output_audio_transcript.done","response_id":"resp_a","item_id":"item_a","content_index":0,"transcript":"{text}"}}"#));
    sim.response_done("resp_a");
    // The last 100 ms's mark has not come back when the caller hangs up.
    sim.at(2_100);
    sim.twilio(&mark(&m1));
    sim.twilio(STOP);
    let (_, _, kept, _, cut) = transcript(&sim.records).pop().unwrap();
    assert_eq!((kept.as_str(), cut), (text, false));
}

#[test]
fn without_a_recording_an_agent_turn_is_placed_when_it_starts_to_play() {
    let mut sim = Sim::greeted(Agent {
        record_calls: false,
        ..agent_with_tools()
    });
    let said = |sim: &mut Sim, item: &str, text: &str| {
        sim.openai(&format!(r#"{{"type":"response.output_audio_transcript.done","response_id":"r","item_id":"{item}","content_index":0,"transcript":"{text}"}}"#));
    };
    // A filler: 6 s of audio, all sent at once, while a tool runs.
    sim.at(1_000);
    sim.response("resp_1");
    sim.agent_chunk("item_wait", &audio(48_000, 1));
    said(&mut sim, "item_wait", "少々お待ちください。");
    sim.response_done("resp_1");
    // The answer's audio goes out a second later, and plays once the filler has.
    sim.at(2_000);
    sim.response("resp_2");
    sim.agent_chunk("item_answer", &audio(8_000, 2));
    said(&mut sim, "item_answer", "ご予約を承りました。");
    let at: Vec<(String, u64)> = transcript(&sim.records)
        .into_iter()
        .map(|t| (t.2, t.3))
        .collect();
    let wait = at.iter().find(|t| t.0 == "少々お待ちください。").unwrap().1;
    let answer = at.iter().find(|t| t.0 == "ご予約を承りました。").unwrap().1;
    assert_eq!(answer - wait, 6_000, "{at:?}");
}

#[test]
fn the_recording_ends_with_twilio_s_end_not_with_the_transcript_tail() {
    let mut sim = caller_turn_committed_untranscribed();
    sim.at(5_200);
    sim.twilio(STOP);
    let before = sim.recording.len();
    // The tail runs its course: nothing more of the recording is handed out meanwhile.
    for t in [6_000, 7_000, 8_000] {
        sim.at(t);
        sim.input(Input::Timeout);
        assert_eq!(sim.recording.len(), before, "at {t}");
    }
    sim.at(8_200);
    sim.input(Input::Timeout);
    assert_eq!(sim.end_label(), Some("twilio_stop"));
    let duration = sim.recording_done.expect("the recording is complete");
    assert_eq!(
        sim.recording.len() as u64,
        duration * crate::recording::BYTES_PER_MS,
        "its audio is as long as it says"
    );
    let (_, call_ms, _) = call_ended(&sim.records).unwrap();
    assert_eq!(
        Some(duration),
        call_ms,
        "as long as the call, to Twilio's end"
    );
}
