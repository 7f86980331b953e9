//! Hand-written call scenarios: the seeds of the `call_machine` corpus (written to
//! `corpus/call_machine/` by `cargo run --example seeds`), so the fuzzer starts from live
//! calls, barge-ins, tools, reconnects and recordings instead of having to find them.

use crate::call_machine::*;
use crate::text::Text;

fn t(s: &str) -> Text {
    Text::from(s)
}

fn start() -> Op {
    Op::Twilio(TwilioFrame::Start {
        stream: Sid::Usual,
        other_call: None,
        sid_outside: false,
        no_call_sid: false,
        encoding: None,
        sample_rate: None,
        params: vec![(t("From"), t("+819012345678"))],
    })
}

fn opened() -> Op {
    Op::OpenAiOpened
}

fn session(input: Format, output: Format) -> Op {
    Op::OpenAi(OpenAiEvent::SessionUpdated {
        id: Some(t("sess_1")),
        input,
        output,
    })
}

fn ready() -> Vec<Op> {
    vec![opened(), session(Format::Pcmu, Format::Pcmu)]
}

fn live() -> Vec<Op> {
    let mut ops = ready();
    ops.push(start());
    ops.push(response_created("resp_greet"));
    ops
}

fn delta(item: u8, len: u16) -> Op {
    Op::OpenAi(OpenAiEvent::AudioDelta {
        beta: false,
        item: Item::Pool(item),
        payload: Payload::Audio { len, seed: item },
    })
}

fn caller(len: u16) -> Op {
    Op::Twilio(TwilioFrame::Media {
        payload: Payload::Audio { len, seed: 7 },
        track: Some(t("inbound")),
        timestamp: Some(t("20")),
    })
}

fn echo() -> Op {
    Op::Twilio(TwilioFrame::Mark(MarkName::Next))
}

fn speech(item: u8) -> Op {
    Op::OpenAi(OpenAiEvent::SpeechStarted {
        item: Some(Item::Pool(item)),
        audio_start_ms: Some(1200),
    })
}

fn response_created(id: &str) -> Op {
    Op::OpenAi(OpenAiEvent::ResponseCreated { id: Some(t(id)) })
}

fn response_done(id: &str) -> Op {
    Op::OpenAi(OpenAiEvent::ResponseDone {
        id: Some(t(id)),
        status: Some(t("completed")),
        reason: None,
        usage: Some((253, 132, 121)),
    })
}

fn audio_done(item: u8) -> Op {
    Op::OpenAi(OpenAiEvent::AudioDone {
        beta: false,
        item: Some(Item::Pool(item)),
    })
}

fn function_call(name: ToolName, args: Arguments) -> Op {
    Op::OpenAi(OpenAiEvent::FunctionCall {
        call_id: t("call_1"),
        name,
        arguments: args,
    })
}

fn http_done(ok: bool) -> Op {
    Op::HttpDone {
        pick: 0,
        ok,
        status: 503,
        body: t(r#"{"result":"予約は明日の10時です"}"#),
        failed: false,
    }
}

fn stop() -> Op {
    Op::Twilio(TwilioFrame::Stop)
}

fn scenario(agent: AgentChoice, record: bool, ops: Vec<Op>) -> Scenario {
    Scenario {
        start_ms: 1_767_225_600_000,
        agent,
        idle_s: 5,
        record: if record { 0 } else { 1 },
        ops,
    }
}

fn tools_agent(transfer: bool, secret: bool) -> AgentChoice {
    AgentChoice::Custom {
        model: t("gpt-realtime"),
        greeting: t("お電話ありがとうございます。"),
        semantic_vad: false,
        tools: 0b1111,
        transfer_to: transfer.then(|| t("+81312345678")),
        tool_secret: secret.then(|| t("tool-secret")),
        max_call_s: 0,
    }
}

/// Every seed, by name.
pub fn all() -> Vec<(&'static str, Scenario)> {
    let d = || AgentChoice::Default;
    let mut out = Vec::new();

    // A live call: the agent speaks, part is heard, the caller talks over it.
    let mut ops = live();
    ops.extend([delta(0, 1600), delta(0, 1600), delta(0, 1600), echo()]);
    ops.extend([speech(1), caller(160), caller(160), echo(), echo(), echo()]);
    ops.extend([
        Op::OpenAi(OpenAiEvent::Committed {
            item: Some(Item::Pool(1)),
        }),
        Op::OpenAi(OpenAiEvent::ItemRetrieved {
            item: Item::Pool(0),
            transcript: Some(t("はい、")),
        }),
        Op::OpenAi(OpenAiEvent::InputTranscription {
            item: Some(Item::Pool(1)),
            transcript: t("予約を変更したいです"),
        }),
        delta(2, 800),
        echo(),
        audio_done(2),
        response_done("resp_greet"),
        stop(),
    ]);
    out.push(("live_call_barge_in", scenario(d(), false, ops)));

    // Caller audio gathered 40 ms at a time: pairs of frames in one append, the last frame
    // sent at the hang-up, before the commit of the caller's words.
    let mut ops = live();
    ops.extend([speech(1), caller(160), caller(160), caller(160), stop()]);
    let mut gathered = scenario(d(), false, ops);
    gathered.record = 0b0101;
    out.push(("caller_audio_gathered", gathered));

    // The socket opened at the webhook, configured as it opened: the session is ready
    // before the stream, the greeting follows `start`, and the call never configures it.
    let mut ops = ready();
    ops.extend([
        start(),
        response_created("resp_greet"),
        delta(0, 800),
        echo(),
    ]);
    ops.extend([caller(160), caller(160), stop()]);
    let mut ahead = scenario(d(), false, ops);
    ahead.record |= crate::call_machine::PREOPENED;
    out.push(("configured_ahead_of_the_stream", ahead));

    // Twilio's start before the session: caller audio waits, then flows in order.
    let mut ops = vec![start(), caller(160), caller(160), opened()];
    ops.extend([
        session(Format::Pcmu, Format::Pcmu),
        caller(160),
        delta(0, 320),
        echo(),
        stop(),
    ]);
    out.push(("start_before_session", scenario(d(), false, ops)));

    // Agent audio before start is held, then flushed in order with marks.
    let mut ops = ready();
    ops.extend([delta(0, 800), delta(0, 800), delta(1, 400), start()]);
    ops.extend([echo(), echo(), echo(), audio_done(0), audio_done(1)]);
    ops.push(Op::TwilioClosed {
        code: 1005,
        reason: t(""),
    });
    out.push(("held_agent_audio_flushed", scenario(d(), false, ops)));

    // Held buffers overflow both ways.
    let mut ops = vec![start()];
    ops.extend((0..10).map(|_| caller(16_000)));
    ops.extend(ready());
    out.push(("caller_audio_overflow", scenario(d(), false, ops)));
    let mut ops = ready();
    ops.extend((0..17).map(|i| delta(i % 2, 16_000)));
    ops.extend([start(), speech(3), stop()]);
    out.push(("agent_audio_overflow", scenario(d(), false, ops)));

    // A barge-in before the stream started: cut at 0, no clear.
    let mut ops = ready();
    ops.extend([
        delta(0, 800),
        speech(1),
        start(),
        delta(0, 800),
        delta(1, 160),
    ]);
    out.push(("barge_in_before_start", scenario(d(), false, ops)));

    // The session keeps 24 kHz PCM out; or rejects our update.
    let ops = vec![start(), opened(), session(Format::Pcmu, Format::Pcm)];
    out.push(("session_rejected_pcm", scenario(d(), false, ops)));
    let ops = vec![
        opened(),
        Op::OpenAi(OpenAiEvent::Error {
            code: ErrorCode::Other(Some(t("invalid_value"))),
            message: Some(t("Invalid value: 'audio/pcmu'")),
            ours: true,
        }),
    ];
    out.push(("session_update_error", scenario(d(), false, ops)));
    let mut ops = live();
    ops.push(session(Format::Raw(t("audio/pcm16")), Format::Pcmu));
    out.push(("session_format_lost", scenario(d(), false, ops)));

    // The session never gets ready: a new one is tried, then the call gives up.
    let mut ops = vec![start(), opened(), Op::TimeoutWhenDue, opened()];
    ops.extend([Op::TimeoutWhenDue, Op::TimeoutWhenDue]);
    out.push(("setup_timeout", scenario(d(), false, ops)));
    let mut ops = vec![start(), Op::TimeoutWhenDue, opened()];
    ops.extend([
        session(Format::Pcmu, Format::Pcmu),
        delta(0, 160),
        echo(),
        stop(),
    ]);
    out.push(("setup_timeout_then_ready", scenario(d(), false, ops)));

    // Connecting fails until the attempts are spent; the caller is redirected to the
    // fallback, and Twilio stops the stream.
    let fail = || Op::OpenAiConnectFailed(t("HTTP 429 on upgrade"), Some(429));
    let ops = vec![
        start(),
        fail(),
        fail(),
        Op::TimeoutWhenDue,
        fail(),
        Op::TimeoutWhenDue,
        fail(),
        caller(160),
        http_done(true),
        stop(),
    ];
    out.push(("connect_fails", scenario(d(), false, ops)));
    // A refused key is not tried again; the redirect fails, so the stream is closed.
    let ops = vec![
        start(),
        Op::OpenAiConnectFailed(t("HTTP 401 on upgrade"), Some(401)),
        http_done(false),
    ];
    out.push(("connect_refused_key", scenario(d(), false, ops)));
    // The redirect gets no answer in time.
    let ops = vec![
        start(),
        Op::OpenAiConnectFailed(t("connect: refused"), None),
        Op::AdvanceLong(20_000),
        Op::OpenAiConnectFailed(t("connect: refused"), None),
        Op::TimeoutWhenDue,
    ];
    out.push(("fallback_timeout", scenario(d(), false, ops)));

    // The session is lost mid-call and resumed with the conversation so far.
    let mut ops = live();
    ops.extend([
        delta(0, 800),
        Op::OpenAi(OpenAiEvent::TranscriptDone {
            beta: false,
            item: Some(Item::Pool(0)),
            transcript: t("ご用件をどうぞ。"),
        }),
        Op::OpenAi(OpenAiEvent::InputTranscription {
            item: Some(Item::Pool(1)),
            transcript: t("予約です"),
        }),
        Op::OpenAiClosed {
            code: 1006,
            reason: t("abnormal"),
        },
        caller(160),
        Op::Advance(600),
        opened(),
        session(Format::Pcmu, Format::Pcmu),
        delta(2, 320),
        echo(),
        echo(),
        stop(),
    ]);
    out.push(("openai_lost_and_resumed", scenario(d(), false, ops)));
    // Lost for good: every new session closes too; the caller gets the fallback.
    let closed = || Op::OpenAiClosed {
        code: 1011,
        reason: t("server_error"),
    };
    let mut ops = live();
    ops.extend([closed(), opened(), closed(), Op::TimeoutWhenDue, opened()]);
    ops.extend([closed(), Op::TimeoutWhenDue, opened(), closed()]);
    ops.extend([caller(160), http_done(true), stop()]);
    out.push(("openai_lost_for_good", scenario(d(), false, ops)));
    let mut ops = live();
    ops.extend([
        Op::OpenAi(OpenAiEvent::Error {
            code: ErrorCode::SessionExpired,
            message: Some(t("Your session hit the maximum duration of 60 minutes.")),
            ours: false,
        }),
        opened(),
        session(Format::Pcmu, Format::Pcmu),
        Op::OpenAiClosed {
            code: 1000,
            reason: t("bye"),
        },
        Op::AdvanceLong(10_000),
        Op::OpenAiConnectFailed(t("refused"), None),
        http_done(true),
        stop(),
    ]);
    out.push(("session_expired", scenario(d(), false, ops)));

    // Tools: a webhook, then the agent hangs up after its goodbye has played.
    let mut ops = live();
    ops.extend([
        response_done("resp_greet"),
        function_call(
            ToolName::Lookup,
            Arguments::Object(vec![(t("date"), t("2026-01-01"))]),
        ),
        response_created("resp_2"),
        http_done(true),
        response_done("resp_2"),
        response_created("resp_3"),
        function_call(
            ToolName::EndCall,
            Arguments::Object(vec![(t("reason"), t("done"))]),
        ),
        response_done("resp_3"),
        response_created("resp_bye"),
        delta(4, 1600),
        response_done("resp_bye"),
        echo(),
        http_done(true),
        stop(),
    ]);
    // The same hang-up, which Twilio answers with 503 and then no answer in time: asked
    // again after each, done on the third try; the caller's "はい" over the goodbye changes
    // nothing.
    let mut retried = ops.clone();
    let at = retried.len() - 2;
    retried.splice(
        at..at + 1,
        [
            speech(9),
            http_done(false),
            Op::TimeoutWhenDue,
            Op::HttpDone {
                pick: 0,
                ok: false,
                status: 0,
                body: t("timed out"),
                failed: true,
            },
            Op::TimeoutWhenDue,
            http_done(true),
        ],
    );
    out.push((
        "hangup_rest_retried",
        scenario(tools_agent(false, true), false, retried),
    ));
    out.push((
        "tools_then_hangup",
        scenario(tools_agent(false, true), false, ops),
    ));

    // A transfer Twilio refuses (400: not a passing failure): the caller gets the fallback.
    let mut ops = live();
    ops.extend([
        response_done("resp_greet"),
        function_call(ToolName::TransferCall, Arguments::Empty),
        response_created("resp_t"),
        response_done("resp_t"),
        Op::TimeoutWhenDue,
        Op::HttpDone {
            pick: 0,
            ok: false,
            status: 400,
            body: t(r#"{"code":21220,"message":"Invalid TwiML"}"#),
            failed: false,
        },
    ]);
    out.push((
        "transfer_rest_fails",
        scenario(tools_agent(true, false), false, ops.clone()),
    ));
    *ops.last_mut().expect("ops") = http_done(true);
    ops.push(stop());
    out.push((
        "transfer_done",
        scenario(tools_agent(true, true), false, ops),
    ));
    let mut ops = live();
    ops.extend([
        response_done("resp_greet"),
        function_call(ToolName::TransferCall, Arguments::Empty),
        function_call(ToolName::Raw(t("nope")), Arguments::Raw(t("{not json"))),
        function_call(ToolName::Slow, Arguments::Empty),
        Op::OpenAi(OpenAiEvent::Error {
            code: ErrorCode::ActiveResponse,
            message: None,
            ours: false,
        }),
        Op::HttpDone {
            pick: 0,
            ok: false,
            status: 0,
            body: t("timeout"),
            failed: true,
        },
        Op::TimeoutWhenDue,
        Op::TimeoutWhenDue,
        http_done(true),
        stop(),
    ]);
    out.push((
        "tools_refused_and_failing",
        scenario(tools_agent(false, false), false, ops),
    ));

    // DTMF, then silence: the agent checks in, then says goodbye and hangs up.
    let mut ops = live();
    ops.extend([
        response_done("resp_greet"),
        Op::Twilio(TwilioFrame::Dtmf(t("5"))),
        response_created("resp_d"),
        response_done("resp_d"),
        Op::TimeoutWhenDue,
        response_created("resp_c"),
        response_done("resp_c"),
        Op::TimeoutWhenDue,
        response_created("resp_g"),
        response_done("resp_g"),
        Op::TimeoutWhenDue,
        Op::TimeoutWhenDue,
        http_done(true),
    ]);
    out.push((
        "dtmf_then_idle_hangup",
        scenario(tools_agent(false, false), false, ops),
    ));

    // The call's time limit: wrap-up, then the end.
    let mut ops = live();
    ops.extend([
        response_done("resp_greet"),
        Op::AdvanceLong(1_000),
        Op::TimeoutWhenDue,
        Op::TimeoutWhenDue,
        Op::TimeoutWhenDue,
        Op::TimeoutWhenDue,
        http_done(true),
        stop(),
    ]);
    out.push((
        "max_duration",
        scenario(tools_agent(false, false), false, ops),
    ));

    // A recorded call: both sides, a clear, a jitter gap.
    let mut ops = live();
    for _ in 0..5 {
        ops.extend([caller(160), Op::Advance(20)]);
    }
    ops.extend([delta(0, 8000), Op::Advance(400), speech(1)]);
    ops.extend([Op::Advance(1500), caller(160), Op::Advance(2500), stop()]);
    out.push(("recorded_call", scenario(d(), true, ops)));

    // Everything a peer can get wrong, and the call goes on.
    let mut ops = vec![caller(160), Op::TwilioBinary(320)];
    ops.extend(live());
    ops.extend([
        Op::TwilioRaw(t("not json")),
        Op::OpenAiRaw(t(r#"{"type":"response.output_audio.delta","item_id":"x"}"#)),
        Op::TwilioBinary(160),
        Op::OpenAiBinary(4096),
        Op::TwilioOversized(1),
        Op::OpenAiOversized(0),
        Op::Twilio(TwilioFrame::Incomplete(0)),
        Op::Twilio(TwilioFrame::Incomplete(2)),
        Op::Twilio(TwilioFrame::Unknown(t("surprise"))),
        Op::OpenAi(OpenAiEvent::Other(t("conversation.item.done"))),
        Op::Twilio(TwilioFrame::Media {
            payload: Payload::Raw(t("not base64!")),
            track: None,
            timestamp: Some(t("x")),
        }),
        Op::OpenAi(OpenAiEvent::AudioDelta {
            beta: true,
            item: Item::Raw(t("item_\"odd")),
            payload: Payload::Raw(t("%%%%")),
        }),
        Op::Twilio(TwilioFrame::Mark(MarkName::Raw(t("m+0")))),
        Op::Twilio(TwilioFrame::Mark(MarkName::Numbered(99))),
        start(),
        Op::Twilio(TwilioFrame::Start {
            stream: Sid::Other(t("MZother")),
            other_call: Some(t("CAother")),
            sid_outside: true,
            no_call_sid: false,
            encoding: Some(t("audio/l16")),
            sample_rate: Some(16000),
            params: vec![],
        }),
        Op::OpenAi(OpenAiEvent::AudioDelta {
            beta: true,
            item: Item::Pool(0),
            payload: Payload::Escaped { len: 300, seed: 9 },
        }),
        Op::Twilio(TwilioFrame::Media {
            payload: Payload::Escaped { len: 160, seed: 3 },
            track: None,
            timestamp: None,
        }),
        Op::OpenAi(OpenAiEvent::RateLimits(vec![(t("requests"), Some(1000.0))])),
        Op::OpenAi(OpenAiEvent::ResponseDone {
            id: None,
            status: Some(t("failed")),
            reason: Some(t("turn_detected")),
            usage: Some((u64::MAX, u64::MAX, 1)),
        }),
        Op::OpenAi(OpenAiEvent::ResponseDone {
            id: None,
            status: None,
            reason: None,
            usage: Some((u64::MAX, 1, 1)),
        }),
        Op::Back(5000),
        echo(),
        Op::Timeout,
        stop(),
    ]);
    out.push(("bad_input_everywhere", scenario(d(), false, ops)));

    // The transcript's events, in and out of order.
    let mut ops = live();
    ops.extend([
        speech(1),
        Op::OpenAi(OpenAiEvent::SpeechStopped {
            item: Some(Item::Pool(1)),
            audio_end_ms: Some(2400),
        }),
        Op::OpenAi(OpenAiEvent::ItemAdded {
            name: 0,
            item: Item::Pool(1),
            role: Role::User,
        }),
        Op::OpenAi(OpenAiEvent::ItemAdded {
            name: 2,
            item: Item::Pool(2),
            role: Role::Assistant,
        }),
        Op::OpenAi(OpenAiEvent::TranscriptDelta {
            beta: true,
            item: Some(Item::Pool(2)),
            delta: t("かしこまり"),
        }),
        delta(2, 1600),
        echo(),
        speech(3),
        Op::OpenAi(OpenAiEvent::Truncated {
            item: Some(Item::Pool(2)),
            audio_end_ms: Some(200),
        }),
        Op::OpenAi(OpenAiEvent::TranscriptDone {
            beta: false,
            item: Some(Item::Pool(2)),
            transcript: t("かしこまりました。"),
        }),
        Op::OpenAi(OpenAiEvent::InputTranscriptionFailed {
            item: Some(Item::Pool(3)),
            code: Some(t("audio_unintelligible")),
        }),
        Op::OpenAi(OpenAiEvent::SessionCreated {
            id: Some(t("sess_2")),
        }),
        stop(),
    ]);
    out.push(("transcript_events", scenario(d(), false, ops)));

    // The caller hangs up mid-sentence: their words so far are committed and transcribed,
    // or the commit is refused.
    for refused in [false, true] {
        let mut ops = live();
        ops.extend([speech(1), caller(160), caller(160), stop()]);
        if refused {
            ops.push(Op::OpenAi(OpenAiEvent::Error {
                code: ErrorCode::CommitEmpty,
                message: None,
                ours: false,
            }));
        } else {
            ops.extend([
                Op::OpenAi(OpenAiEvent::Committed {
                    item: Some(Item::Pool(1)),
                }),
                Op::OpenAi(OpenAiEvent::InputTranscription {
                    item: Some(Item::Pool(1)),
                    transcript: t("それでお願いしま"),
                }),
            ]);
        }
        let name = if refused {
            "hang_up_mid_sentence_commit_refused"
        } else {
            "hang_up_mid_sentence"
        };
        out.push((name, scenario(d(), false, ops)));
    }

    out
}
