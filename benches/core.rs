//! The call core's cost per relayed frame each way and per barge-in, in time and in heap
//! allocations. A plain harness (no criterion): it prints figures and asserts nothing about
//! time.
//!
//!   cargo bench --bench core            # full run, native (a few seconds)
//!   cargo test --benches                # (and `cargo test --all-targets`) one quick pass
//!
//! The same file is built for wasm32-wasip1 by `benches/wasm` and run in V8 (Node's WASI) by
//! `bash scripts/bench.sh`: the core's cost in the engine workerd embeds.
//!
//! What one "frame" costs here is everything the shell asks of the core for it: `handle`
//! plus draining every action it produced (the strings the shell would send, log lines,
//! records). Caller → agent: one Twilio `media` frame (20 ms, 160 bytes of μ-law). Agent →
//! caller: one `response.output_audio.delta` of 20 ms plus its share of the `mark` echoes
//! Twilio sends back (one mark per 100 ms of audio, so one echo per five deltas). Barge-in:
//! `speech_started` while 500 ms of agent audio is unheard, plus the echoes of the marks the
//! `clear` flushed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use base64::Engine as _;
use phone_agent_bridge::call::{Action, Call, Input, Setup};
use phone_agent_bridge::config::{Agent, Secret};
use phone_agent_bridge::ids::Millis;
use phone_agent_bridge::tools::CallContext;
use phone_agent_bridge::twilio::RestConfig;

// ---- allocation counting ----------------------------------------------------------------

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static ALLOC_BYTES: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        ALLOC_BYTES.fetch_add(layout.size() as u64, Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        ALLOC_BYTES.fetch_add(new_size as u64, Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> (u64, u64) {
    (ALLOCS.load(Relaxed), ALLOC_BYTES.load(Relaxed))
}

// ---- the call under test ------------------------------------------------------------------

const SID: &str = "CA00000000000000000000000000000001";
const STREAM: &str = "MZ00000000000000000000000000000001";

/// The one place that knows how the core builds a call (its constructor changes as it grows).
fn new_call(record: bool) -> Call {
    let agent = Agent {
        record_calls: record,
        ..Agent::default()
    };
    Call::new(
        Setup {
            context: CallContext {
                call_sid: SID.into(),
                account_sid: "AC00000000000000000000000000000001".into(),
                from: "+819012345678".into(),
                to: "+815012345678".into(),
                agent_id: agent.id.clone(),
            },
            agent,
            twilio_rest: RestConfig {
                base_url: "https://api.twilio.test".into(),
                account_sid: String::new(),
                auth_token: Secret::new("bench"),
            },
            idle_timeout: Millis(3_600_000),
            caller_chunk: Millis(phone_agent_bridge::call::CALLER_CHUNK_DEFAULT_MS),
            fallback_twiml: "<Response><Say>sorry</Say></Response>".into(),
            transfer_action: "https://bridge.example/api/twilio/transfer-result".into(),
        },
        Millis(0),
    )
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// 20 ms of μ-law that is not silence.
fn frame_payload(seed: u8) -> String {
    b64(&(0..160u32)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect::<Vec<_>>())
}

fn twilio_media(payload: &str, seq: u64) -> String {
    format!(
        r#"{{"event":"media","sequenceNumber":"{seq}","media":{{"track":"inbound","chunk":"{seq}","timestamp":"{}","payload":"{payload}"}},"streamSid":"{STREAM}"}}"#,
        seq * 20
    )
}

fn twilio_mark(name: &str, seq: u64) -> String {
    format!(
        r#"{{"event":"mark","sequenceNumber":"{seq}","streamSid":"{STREAM}","mark":{{"name":{}}}}}"#,
        serde_json::to_string(name).unwrap()
    )
}

fn openai_delta(item: &str, payload: &str, n: u64) -> String {
    format!(
        r#"{{"type":"response.output_audio.delta","event_id":"event_{n}","response_id":"resp_1","item_id":"{item}","output_index":0,"content_index":0,"delta":"{payload}"}}"#
    )
}

fn speech_started(item: &str, ms: u64) -> String {
    format!(
        r#"{{"type":"input_audio_buffer.speech_started","event_id":"event_s{ms}","audio_start_ms":{ms},"item_id":"{item}"}}"#
    )
}

/// What ends a response's audio: `response.output_audio.done`, the transcript, `response.done`.
fn response_end(item: &str) -> Vec<String> {
    let ids =
        format!(r#""response_id":"resp_1","item_id":"{item}","output_index":0,"content_index":0"#);
    vec![
        format!(r#"{{"type":"response.output_audio.done","event_id":"e_ad",{ids}}}"#),
        format!(r#"{{"type":"response.output_audio_transcript.done","event_id":"e_td",{ids},"transcript":"はい、承知いたしました。"}}"#),
        r#"{"type":"response.done","event_id":"e_rd","response":{"object":"realtime.response","id":"resp_1","status":"completed","status_details":null,"output":[],"usage":{"total_tokens":10,"input_tokens":5,"output_tokens":5}}}"#.to_string(),
    ]
}

const SESSION_UPDATED: &str = r#"{"type":"session.updated","event_id":"e1","session":{"id":"sess_1","type":"realtime","object":"realtime.session","model":"gpt-realtime","output_modalities":["audio"],"audio":{"input":{"format":{"type":"audio/pcmu"},"turn_detection":{"type":"server_vad"}},"output":{"format":{"type":"audio/pcmu"},"voice":"marin"}}}}"#;

fn start_frame() -> String {
    format!(
        r#"{{"event":"start","sequenceNumber":"1","start":{{"accountSid":"AC00000000000000000000000000000001","streamSid":"{STREAM}","callSid":"{SID}","tracks":["inbound"],"mediaFormat":{{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}},"customParameters":{{"From":"+819012345678","To":"+815012345678"}}}},"streamSid":"{STREAM}"}}"#
    )
}

/// Drains every action as the shell would, keeping the mark names sent to Twilio.
/// Carries out the machine's actions: keeps the `mark` frames sent to Twilio (moved into
/// `marks`, which has room: nothing of the harness allocates while a figure is timed; read
/// their names with [`mark_name`] afterwards) and drops the rest.
fn drain(call: &mut Call, marks: &mut Vec<String>) -> usize {
    let mut n = 0;
    while let Some(a) = call.poll_action() {
        n += 1;
        match a {
            Action::SendTwilio(s) if s.starts_with(r#"{"event":"mark""#) => {
                assert!(marks.len() < marks.capacity(), "room for the marks");
                marks.push(s);
            }
            a => {
                black_box(a);
            }
        }
    }
    n
}

/// The name of a `mark` frame kept by [`drain`].
fn mark_name(frame: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(frame).unwrap();
    v["mark"]["name"].as_str().unwrap().to_owned()
}

/// A call with the session ready and the stream started (greeting requested).
fn live_call_with(record: bool) -> Call {
    let mut call = new_call(record);
    let mut sink = Vec::with_capacity(64);
    drain(&mut call, &mut sink);
    call.handle(Input::OpenAiOpened, Millis(1));
    call.handle(Input::OpenAiText(SESSION_UPDATED), Millis(2));
    let start = start_frame();
    call.handle(Input::TwilioText(&start), Millis(3));
    drain(&mut call, &mut sink);
    call
}

/// A live call of the default agent (which records calls).
fn live_call() -> Call {
    live_call_with(true)
}

// ---- measuring ----------------------------------------------------------------------------

struct Figure {
    name: &'static str,
    ns: f64,
    ns_min: f64,
    allocs: f64,
    bytes: f64,
}

/// Runs `batch` (which does `per_batch` units and returns the time spent on the measured
/// part) for about `budget`, in `samples` samples; reports the median and the best sample.
fn measure(
    name: &'static str,
    per_batch: u64,
    budget: Duration,
    samples: usize,
    mut batch: impl FnMut() -> (Duration, u64, u64),
) -> Figure {
    // Warm-up.
    batch();
    let mut per_unit = Vec::new();
    let mut total_allocs = 0u64;
    let mut total_bytes = 0u64;
    let mut units = 0u64;
    for _ in 0..samples {
        let t_end = Instant::now() + budget / samples as u32;
        let mut spent = Duration::ZERO;
        let mut n = 0u64;
        loop {
            let (d, a, b) = batch();
            spent += d;
            n += per_batch;
            total_allocs += a;
            total_bytes += b;
            if Instant::now() >= t_end {
                break;
            }
        }
        units += n;
        per_unit.push(spent.as_nanos() as f64 / n as f64);
    }
    per_unit.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Figure {
        name,
        ns: per_unit[per_unit.len() / 2],
        ns_min: per_unit[0],
        allocs: total_allocs as f64 / units as f64,
        bytes: total_bytes as f64 / units as f64,
    }
}

/// Time and allocations of `f`.
fn timed<T>(f: impl FnOnce() -> T) -> (Duration, u64, u64, T) {
    let (a0, b0) = allocs();
    let t = Instant::now();
    let out = f();
    let d = t.elapsed();
    let (a1, b1) = allocs();
    (d, a1 - a0, b1 - b0, out)
}

/// Agent → caller: an audio delta becomes media (every fifth also a mark); Twilio echoes the
/// marks. Pushes the frame's figure and the delta / echo split.
fn agent_to_caller(
    figures: &mut Vec<Figure>,
    names: [&'static str; 3],
    record: bool,
    budget: Duration,
    samples: usize,
) {
    let mut call = live_call_with(record);
    let payloads: Vec<String> = (0..50u8).map(frame_payload).collect();
    let mut item_no = 0u64;
    let mut now = 10u64;
    let mut seq = 2u64;
    let mut marks = Vec::with_capacity(64);
    let mut echoes: Vec<String> = Vec::with_capacity(64);
    // The delta and the echo apart (warm-up batch included: averages, not medians).
    let mut split = [(Duration::ZERO, 0u64, 0u64); 2];
    let mut split_units = 0u64;
    let fig = measure(names[0], 50, budget, samples, || {
        // One 1 s "response" per batch: 50 deltas of a fresh item, then their 50 echoes.
        // A call lasts 20 responses, so per-call state stays the size of a real call's.
        item_no += 1;
        if item_no.is_multiple_of(20) {
            // A new call starts at 0: its clock must too, or the recorder would fill the
            // time since with silence (hours of it, after a while of benchmarking).
            call = live_call_with(record);
            now = 10;
        }
        let item = format!("item_{item_no}");
        let deltas: Vec<String> = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| openai_delta(&item, p, i as u64))
            .collect();
        marks.clear();
        let (d1, a1, b1, _) = timed(|| {
            for dl in &deltas {
                now += 1;
                call.handle(Input::OpenAiText(dl), Millis(now));
                drain(&mut call, &mut marks);
            }
        });
        echoes.clear();
        for m in &marks {
            seq += 1;
            echoes.push(twilio_mark(&mark_name(m), seq));
        }
        let mut sink = Vec::with_capacity(64);
        let (d2, a2, b2, _) = timed(|| {
            // Each echo comes once its 100 ms of audio played: time runs as in a real call.
            for e in &echoes {
                now += 100;
                call.handle(Input::TwilioText(e), Millis(now));
                drain(&mut call, &mut sink);
            }
        });
        split[0] = (split[0].0 + d1, split[0].1 + a1, split[0].2 + b1);
        split[1] = (split[1].0 + d2, split[1].1 + a2, split[1].2 + b2);
        split_units += 50;
        // The response's end (not timed): lets the core forget the item.
        for ev in response_end(&item) {
            call.handle(Input::OpenAiText(&ev), Millis(now));
            drain(&mut call, &mut sink);
        }
        (d1 + d2, a1 + a2, b1 + b2)
    });
    figures.push(fig);
    for (name, (d, a, b)) in [
        "  of which the delta (avg)",
        "  of which the mark echo (avg)",
    ]
    .into_iter()
    .zip(split)
    {
        let per = |x: f64| x / split_units as f64;
        figures.push(Figure {
            name,
            ns: per(d.as_nanos() as f64),
            ns_min: f64::NAN,
            allocs: per(a as f64),
            bytes: per(b as f64),
        });
    }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test` runs bench targets without it: then one
    // quick pass that only checks the harness works.
    let full = std::env::args().any(|a| a == "--bench");
    let (budget, samples) = if full {
        (Duration::from_millis(1500), 15)
    } else {
        (Duration::from_millis(30), 3)
    };
    let mut figures = Vec::new();

    // Caller → agent: Twilio media frames become input_audio_buffer.append events, two
    // frames to one at the default `CALLER_AUDIO_CHUNK_MS` (the figure is per frame).
    {
        let mut call = live_call();
        let payloads: Vec<String> = (0..50u8).map(frame_payload).collect();
        let frames: Vec<String> = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| twilio_media(p, i as u64 + 2))
            .collect();
        let mut marks = Vec::with_capacity(64);
        let mut now = 10u64;
        figures.push(measure("caller→agent frame", 50, budget, samples, || {
            let (d, a, b, _) = timed(|| {
                for f in &frames {
                    now += 20;
                    call.handle(Input::TwilioText(f), Millis(now));
                    drain(&mut call, &mut marks);
                }
            });
            (d, a, b)
        }));
    }

    agent_to_caller(
        &mut figures,
        [
            "agent→caller frame",
            "  of which the delta (avg)",
            "  of which the mark echo (avg)",
        ],
        true,
        budget,
        samples,
    );
    agent_to_caller(
        &mut figures,
        [
            "agent→caller, recording off",
            "  of which the delta (avg)",
            "  of which the mark echo (avg)",
        ],
        false,
        budget,
        samples,
    );

    // Barge-in: speech_started with 500 ms unheard, then the flushed marks' echoes.
    {
        let mut call = live_call();
        let payloads: Vec<String> = (0..50u8).map(frame_payload).collect();
        let mut item_no = 0u64;
        let mut now = 10u64;
        let mut seq = 2u64;
        figures.push(measure("barge-in", 1, budget, samples, || {
            item_no += 1;
            if item_no.is_multiple_of(20) {
                call = live_call();
                now = 10;
            }
            let item = format!("item_b{item_no}");
            let mut marks = Vec::with_capacity(64);
            // 1 s of agent audio; the first half is heard (echoed), the rest is not.
            for (i, p) in payloads.iter().enumerate() {
                now += 1;
                let dl = openai_delta(&item, p, i as u64);
                call.handle(Input::OpenAiText(&dl), Millis(now));
                drain(&mut call, &mut marks);
            }
            let mut sink = Vec::with_capacity(64);
            let half = marks.len() / 2;
            for m in &marks[..half] {
                seq += 1;
                now += 20;
                let e = twilio_mark(&mark_name(m), seq);
                call.handle(Input::TwilioText(&e), Millis(now));
                drain(&mut call, &mut sink);
            }
            let flushed: Vec<String> = marks[half..]
                .iter()
                .map(|m| {
                    seq += 1;
                    twilio_mark(&mark_name(m), seq)
                })
                .collect();
            let speech = speech_started(&format!("item_u{item_no}"), now);
            let (d, a, b, _) = timed(|| {
                now += 1;
                call.handle(Input::OpenAiText(&speech), Millis(now));
                drain(&mut call, &mut sink);
                for e in &flushed {
                    call.handle(Input::TwilioText(e), Millis(now));
                    drain(&mut call, &mut sink);
                }
            });
            (d, a, b)
        }));
    }

    // The parsers alone, to show where a frame's time goes.
    {
        let media = twilio_media(&frame_payload(1), 7);
        figures.push(measure(
            "  twilio::parse(media)",
            1000,
            budget,
            samples,
            || {
                let (d, a, b, _) = timed(|| {
                    for _ in 0..1000 {
                        black_box(phone_agent_bridge::twilio::parse(black_box(&media)).is_ok());
                    }
                });
                (d, a, b)
            },
        ));
        let delta = openai_delta("item_1", &frame_payload(2), 1);
        figures.push(measure(
            "  openai::parse(delta)",
            1000,
            budget,
            samples,
            || {
                let (d, a, b, _) = timed(|| {
                    for _ in 0..1000 {
                        black_box(phone_agent_bridge::openai::parse(black_box(&delta)).is_ok());
                    }
                });
                (d, a, b)
            },
        ));
    }

    println!(
        "call core, {} ({}; {} build)",
        if cfg!(target_arch = "wasm32") {
            "wasm in V8 (Node, WASI)"
        } else {
            "native"
        },
        if full { "full run" } else { "quick pass" },
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    println!(
        "{:<31} {:>12} {:>12} {:>8} {:>12}",
        "what", "ns (median)", "ns (best)", "allocs", "alloc bytes"
    );
    for f in &figures {
        let best = if f.ns_min.is_nan() {
            "-".to_string()
        } else {
            format!("{:.0}", f.ns_min)
        };
        println!(
            "{:<31} {:>12.0} {:>12} {:>8.1} {:>12.0}",
            f.name, f.ns, best, f.allocs, f.bytes
        );
    }
    println!(
        "(per frame, per barge-in, or per parse; allocs and bytes are heap allocations, averaged)"
    );
}
