//! `CallSession`: the Durable Object that owns one call, named by its CallSid. It accepts
//! Twilio's Media Stream socket only for a call whose signed voice webhook came first,
//! opens the OpenAI socket (as the webhook registers the call: see `preopen`), and pumps
//! both through the core's call machine.

use super::outbox::Outbox;
use super::preopen::Preopen;
use super::recording::{self, Keep, Recording};
use super::socket::{self, Event, Frame, Listeners, Side, Sink};
use super::{bridge_config, log};
use crate::call::{Action, Call, Input, Level, Setup};
use crate::config::Bridge;
use crate::ids::{CallSid, Millis};
use crate::store::Record as StoreRecord;
use crate::webhook::{self, CallState, Registration, StreamRefusal};
use futures::channel::oneshot;
use futures::FutureExt;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Duration;
use worker::*;

/// Internal URL the Worker uses to tell the object a verified call is coming.
pub const REGISTER_URL: &str = "https://call-session/register";
/// Internal URL for a verified Twilio status callback of this call.
pub const STATUS_URL: &str = "https://call-session/status";
/// Internal URL for the records of a call the agent never took (the voice webhook answered
/// with the fallback): the object keeps them, as it keeps status callbacks.
pub const UNSERVED_URL: &str = "https://call-session/unserved";
const CALL_KEY: &str = "call";

/// How often the object checks that a running stream is still served by a live pump.
const WATCH: Duration = Duration::from_secs(60);
/// How long an ended call waits for its records to reach D1 before it stops the watch's
/// alarm; past that, the alarm stays (and flushes what is left when it fires).
const SETTLE: Duration = Duration::from_secs(30);
/// When the alarm tries again what a status callback or a refused stream could not finish
/// (the end of a stream a restart cut, the end of a call whose stream never connected).
const CLEANUP_RETRY: Duration = Duration::from_secs(10);

#[durable_object]
pub struct CallSession {
    state: State,
    env: Env,
    /// True while a stream is being served: a second socket for a live call is refused.
    live: Rc<Cell<bool>>,
    outbox: RefCell<Option<Outbox>>,
    /// True while a writer of this instance is storing the call's recording.
    recording_busy: Rc<Cell<bool>>,
    /// The Realtime socket opened at the webhook, until the stream's pump takes it.
    preopen: RefCell<Option<Preopen>>,
}

impl DurableObject for CallSession {
    fn new(state: State, env: Env) -> Self {
        Self {
            state,
            env,
            live: Rc::new(Cell::new(false)),
            outbox: RefCell::new(None),
            recording_busy: Rc::new(Cell::new(false)),
            preopen: RefCell::new(None),
        }
    }

    async fn fetch(&self, mut req: Request) -> Result<Response> {
        let post = req.method() == Method::Post;
        match req.path().as_str() {
            "/register" if post => {
                let registration: Registration = req.json().await?;
                let storage = self.state.storage();
                // Twilio may retry the webhook: the first registration stands.
                if storage.get::<CallState>(CALL_KEY).await?.is_none() {
                    if !self.outbox().push(&registration.record()).await {
                        return Response::error("call record not kept", 500);
                    }
                    let preopen = self.preopen_for(&registration);
                    storage.put(CALL_KEY, CallState::new(registration)).await?;
                    if let Some(old) = self.preopen.replace(preopen) {
                        old.discard("replaced");
                    }
                }
                Response::empty().map(|r| r.with_status(204))
            }
            "/unserved" if post => {
                // No stream will follow: the records only go through the outbox, which
                // keeps them until D1 takes them.
                let records: Vec<StoreRecord> = req.json().await?;
                let outbox = self.outbox();
                for record in &records {
                    outbox.enqueue(record);
                }
                if !outbox.durable().await {
                    return Response::error("records not kept", 500);
                }
                Response::empty().map(|r| r.with_status(204))
            }
            "/status" if post => {
                let record: StoreRecord = req.json().await?;
                // Twilio does not send a status callback again: whatever fails before its
                // status is kept is logged and left to the alarm, and the status is kept all
                // the same. The answer is about the status alone.
                if let Err(e) = self.before_status(&record).await {
                    log(
                        "error",
                        "call.status_cleanup_failed",
                        serde_json::json!({ "call_sid": record.call_sid(), "error": e.to_string(),
                                            "then": "status kept anyway; the alarm keeps the call's end" }),
                    );
                    self.retry_cleanup(record.call_sid()).await;
                }
                if record.is_final_status() {
                    self.discard_preopen(record.call_sid());
                }
                if !self.outbox().push(&record).await {
                    return Response::error("status not kept", 500);
                }
                Response::empty().map(|r| r.with_status(204))
            }
            _ => self.accept_stream(req).await,
        }
    }

    async fn alarm(&self) -> Result<Response> {
        // The call, named in this alarm's log lines and the outbox's: an object restarted
        // with records waiting knows it only from its stored state. Read before the outbox
        // starts, whose writer logs as soon as it runs.
        let call_sid = match self.state.storage().get::<CallState>(CALL_KEY).await {
            Ok(Some(state)) => Some(state.registration.call.call_sid),
            _ => None,
        };
        let sid = call_sid.as_ref().map(CallSid::as_str);
        let outbox = self.outbox();
        if let Some(sid) = sid {
            outbox.name_call(sid);
        }
        // This alarm is spent: records stored from now on need a new one.
        outbox.alarm_gone();
        // A step that fails is logged and the rest still runs: the records waiting in
        // storage must not wait on the watch's own trouble (an unreadable call state, a
        // storage error), and an error returned would skip them for this alarm.
        if let Err(e) = self.keep_owed_end().await {
            log(
                "error",
                "call.end_not_kept",
                serde_json::json!({ "call_sid": sid, "error": e.to_string(),
                                    "then": "the alarm tries again" }),
            );
            self.set_alarm_or_log(CLEANUP_RETRY, sid).await;
        }
        match self.finalize_orphaned_stream().await {
            Ok(Stream::Live) => self.set_alarm_or_log(WATCH, sid).await,
            Ok(_) => {}
            Err(e) => {
                log(
                    "error",
                    "call.watch_failed",
                    serde_json::json!({ "call_sid": sid, "error": e.to_string(),
                                        "then": "the alarm tries again" }),
                );
                self.set_alarm_or_log(CLEANUP_RETRY, sid).await;
            }
        }
        // What waits in storage, and what is still in memory (storage refused it).
        if let Err(e) = outbox.catch_up().await {
            log(
                "warn",
                "outbox.alarm_flush_failed",
                serde_json::json!({ "call_sid": sid, "error": e.to_string() }),
            );
        }
        self.recover_recording().await;
        // Records still waiting (D1 failed, or the writer is still at them) bring the object
        // back; once they are all in D1 nothing is owed and the alarm is not set again.
        outbox.arm_if_owed().await;
        Response::ok("")
    }
}

/// `Date.now()`, without the `Date` object `worker::Date::now` makes (this runs per frame).
fn now() -> Millis {
    Millis(js_sys::Date::now() as u64)
}

/// The last recording checkpoint in the object's storage, if any: its key and its length.
async fn last_checkpoint(storage: &Storage) -> Result<Option<crate::recording::LastCheckpoint>> {
    let map = storage
        .list_with_options(
            ListOptions::new()
                .prefix(crate::recording::CHECKPOINT_PREFIX)
                .reverse(true)
                .limit(1),
        )
        .await?;
    let mut last = None;
    map.for_each(&mut |value, key| {
        let id = key
            .as_string()
            .as_deref()
            .and_then(crate::recording::checkpoint_id);
        // A Uint8Array or an ArrayBuffer: either says its length without a copy.
        let bytes = js_sys::Reflect::get(&value, &"byteLength".into())
            .ok()
            .and_then(|n| n.as_f64())
            .unwrap_or(0.0) as u64;
        last = id.map(|id| crate::recording::LastCheckpoint { id, bytes });
    });
    Ok(last)
}

/// What [`CallSession::finalize_orphaned_stream`] found.
#[derive(PartialEq)]
enum Stream {
    /// None was ever accepted, or it has ended.
    None,
    /// A pump of this instance serves it.
    Live,
    /// It had started before this instance and was just finalized as interrupted.
    Finalized,
}

impl CallSession {
    /// Starts opening the call's Realtime socket as its webhook registers it (see
    /// `preopen`), unless `OPENAI_PREOPEN_SECONDS` is 0 or the configuration sends every
    /// call to the fallback.
    fn preopen_for(&self, registration: &Registration) -> Option<Preopen> {
        let config = bridge_config(&self.env);
        if config.openai_preopen_ms == 0 || config.fallback_only {
            return None;
        }
        Some(Preopen::start(
            config.realtime_connect_url(&registration.agent.model),
            config.openai_api_key.expose().to_owned(),
            registration.call.call_sid.0.clone(),
            Duration::from_millis(config.openai_preopen_ms),
            crate::call::ahead_of_stream(&registration.agent),
        ))
    }

    /// The call is over before its stream took the socket opened at the webhook (the
    /// caller hung up while Twilio connected, or Twilio could not reach the Worker): the
    /// socket goes now rather than at the end of its hold.
    fn discard_preopen(&self, call_sid: &str) {
        let Some(preopen) = self.preopen.borrow_mut().take() else {
            return;
        };
        if preopen.discard("the call ended") {
            log(
                "info",
                "openai.preopened_unused",
                serde_json::json!({ "call_sid": call_sid,
                                    "then": "closed: the call ended before its media stream came" }),
            );
        }
    }

    /// What a status callback does before Twilio's status is kept. Twilio reports on a call
    /// this object streamed before it restarted (Twilio played the fallback and the call is
    /// over): the stream is ended first, so the call reads as the failure it was, ended when
    /// Twilio said so, rather than waiting for the watch alarm and overwriting Twilio's end
    /// with its own. Twilio's last word on a call whose stream never connected: why the agent
    /// never served it goes on record (else it would read as a plain completed call).
    async fn before_status(&self, record: &StoreRecord) -> Result<()> {
        self.finalize_orphaned_stream().await?;
        let StoreRecord::TwilioStatus {
            status,
            call_duration_s,
            ..
        } = record
        else {
            return Ok(());
        };
        let storage = self.state.storage();
        let Some(mut state) = storage.get::<CallState>(CALL_KEY).await? else {
            return Ok(());
        };
        if let Some(unserved) = state.never_streamed(status, *call_duration_s) {
            log(
                "error",
                "call.never_streamed",
                serde_json::json!({ "call_sid": state.registration.call.call_sid, "status": status }),
            );
            // Marked ended with its end owed before the outbox is asked: Twilio says this
            // once, so an end the outbox does not keep now is handed over again by the alarm.
            if let Err(e) = storage.put(CALL_KEY, &state).await {
                // Not even that: the outbox holds the end in memory and tries it again.
                self.outbox().enqueue(&unserved);
                return Err(e);
            }
        }
        self.keep_owed_end().await
    }

    /// Hands the outbox the end the object decided for the call and stored with it
    /// ([`CallState::end_owed`]), if one is owed, and clears it once the outbox kept it.
    /// Until then the alarm tries again: an error says to set it.
    async fn keep_owed_end(&self) -> Result<()> {
        let storage = self.state.storage();
        let Some(mut state) = storage.get::<CallState>(CALL_KEY).await? else {
            return Ok(());
        };
        let Some(end) = state.end_owed.take() else {
            return Ok(());
        };
        if !self.outbox().push(&end).await {
            return Err(Error::RustError("the call's end was not kept".into()));
        }
        storage.put(CALL_KEY, &state).await
    }

    /// A stream that started but whose pump is gone (this object was restarted, e.g. by a
    /// deploy) is finalized as interrupted, so the call's row does not stay in progress.
    async fn finalize_orphaned_stream(&self) -> Result<Stream> {
        let storage = self.state.storage();
        let Some(mut state) = storage.get::<CallState>(CALL_KEY).await? else {
            return Ok(Stream::None);
        };
        let live = self.live.get();
        let ended_by = match state.streamed_at_ms {
            Some(at) if !live && state.end_reason.is_none() => {
                let last = last_checkpoint(&storage).await.unwrap_or_else(|e| {
                    log(
                        "warn",
                        "recording.checkpoints_unreadable",
                        serde_json::json!({ "call_sid": state.registration.call.call_sid,
                                            "error": e.to_string() }),
                    );
                    None
                });
                let recorded = state.registration.agent.record_calls;
                crate::recording::lost_pump_ended_by_ms(at, recorded, last, now().0)
            }
            _ => now().0,
        };
        let Some(ended) = state.finalize_orphaned(live, ended_by) else {
            let running = state.streamed_at_ms.is_some() && state.end_reason.is_none();
            return Ok(if live && running {
                Stream::Live
            } else {
                Stream::None
            });
        };
        log(
            "error",
            "call.interrupted",
            serde_json::json!({ "call_sid": state.registration.call.call_sid }),
        );
        if !self.outbox().push(&ended).await {
            // Not marked ended then: the next alarm or status callback tries again.
            return Err(Error::RustError(
                "the interrupted call's end was not kept".into(),
            ));
        }
        storage.put(CALL_KEY, &state).await?;
        // What the lost pump recorded is in the object's checkpoints.
        self.recover_recording().await;
        Ok(Stream::Finalized)
    }

    /// Brings the object back by its alarm to finish what a request could not (the end of
    /// a stream a restart cut).
    async fn retry_cleanup(&self, call_sid: &str) {
        self.set_alarm_or_log(CLEANUP_RETRY, Some(call_sid)).await;
    }

    /// Sets the alarm `after` from now; a failure is logged (there is nothing else to do).
    async fn set_alarm_or_log(&self, after: Duration, call_sid: Option<&str>) {
        if let Err(e) = self.state.storage().set_alarm(after).await {
            log(
                "error",
                "storage.set_alarm_failed",
                serde_json::json!({ "call_sid": call_sid, "error": e.to_string() }),
            );
        }
    }

    fn keep(&self) -> Keep {
        Keep {
            storage: Rc::new(self.state.storage()),
            busy: self.recording_busy.clone(),
        }
    }

    /// Uploads a recording left in the object's checkpoints (see `recording::recover`), when
    /// no pump of this instance is recording. A failure is logged; the alarm tries again.
    async fn recover_recording(&self) {
        if self.live.get() {
            return;
        }
        let Ok(Some(state)) = self.state.storage().get::<CallState>(CALL_KEY).await else {
            return;
        };
        let call_sid = &state.registration.call.call_sid;
        if let Err(e) =
            recording::recover(&self.env, call_sid.as_str(), self.outbox(), self.keep()).await
        {
            log(
                "error",
                "recording.recover_failed",
                serde_json::json!({ "call_sid": call_sid, "error": e.to_string() }),
            );
            let _ = self.state.storage().set_alarm(WATCH).await;
        }
    }

    /// The object's outbox, started on first use (and so after a restart).
    fn outbox(&self) -> Outbox {
        self.outbox
            .borrow_mut()
            .get_or_insert_with(|| Outbox::new(self.state.storage(), self.env.clone()))
            .clone()
    }

    async fn accept_stream(&self, req: Request) -> Result<Response> {
        let Some(call_sid) = webhook::stream_call_sid(&req.path()) else {
            return Response::error("Not Found", 404);
        };
        let refuse = |refusal: StreamRefusal| {
            let (status, why) = (refusal.status(), refusal.to_string());
            log(
                "warn",
                "stream.refused",
                serde_json::json!({ "call_sid": call_sid, "status": status, "why": why }),
            );
            Response::error(why, status)
        };
        let storage = self.state.storage();
        let Some(record) = storage.get::<CallState>(CALL_KEY).await? else {
            return refuse(StreamRefusal::NoWebhook);
        };
        if let Err(refusal) = record.admit_stream(&call_sid, self.live.get()) {
            // The call is over whether or not its end can be kept now: the upgrade gets the
            // ended call's answer, and an end not kept is left to the alarm.
            if refusal == StreamRefusal::Interrupted {
                if let Err(e) = self.finalize_orphaned_stream().await {
                    log(
                        "error",
                        "call.stream_cleanup_failed",
                        serde_json::json!({ "call_sid": call_sid, "error": e.to_string(),
                                            "then": "stream refused anyway; the alarm finalizes the stream" }),
                    );
                    self.retry_cleanup(call_sid.as_str()).await;
                }
            }
            return refuse(refusal);
        }
        let config = bridge_config(&self.env);

        let transfer_action = match webhook::transfer_result_url(&config, req.url()?.as_ref()) {
            Ok(url) => url,
            Err(e) => return Response::error(e.to_string(), 400),
        };
        let mut record = record;
        record.streamed_at_ms = Some(now().0);
        storage.put(CALL_KEY, &record).await?;
        storage.set_alarm(WATCH).await?;

        let driver = Driver::default();
        // No await between accept and listen: see socket.rs.
        let opened = WebSocketPair::new().and_then(|pair| {
            pair.server.accept()?;
            let listeners = socket::listen(&pair.server, Side::Twilio, driver.sink())?;
            Ok((pair, listeners))
        });
        let (pair, twilio_listeners) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                // No stream after all: the call must not read as one a restart cut.
                record.streamed_at_ms = None;
                if let Err(e) = storage.put(CALL_KEY, &record).await {
                    log(
                        "error",
                        "storage.write_failed",
                        serde_json::json!({ "call_sid": call_sid, "error": e.to_string() }),
                    );
                }
                return Err(e);
            }
        };
        self.live.set(true);
        let reg = &record.registration;
        let setup = Setup {
            context: crate::tools::CallContext {
                call_sid: call_sid.0.clone(),
                account_sid: reg.call.account_sid.clone(),
                from: reg.call.from.clone(),
                to: reg.call.to.clone(),
                agent_id: reg.agent.id.clone(),
            },
            agent: reg.agent.clone(),
            twilio_rest: crate::twilio::RestConfig {
                base_url: config.twilio_api_base_url.clone(),
                account_sid: config.twilio_account_sid.clone(),
                auth_token: config.twilio_auth_token.clone(),
            },
            idle_timeout: Millis(config.idle_timeout_ms),
            caller_chunk: Millis(config.caller_audio_chunk_ms),
            fallback_twiml: webhook::fallback_twiml(&config, &reg.agent, Some(&transfer_action)),
            transfer_action,
        };
        let call = Call::new(setup, now());
        let pump = Pump {
            call,
            config,
            twilio: pair.server,
            openai: None,
            openai_listeners: None,
            openai_connect: 0,
            preopen: self.preopen.borrow_mut().take(),
            twilio_listeners: Some(twilio_listeners),
            storage: Rc::new(storage),
            record,
            outbox: self.outbox(),
            recording: Recording::new(&self.env, call_sid.as_str(), self.outbox(), self.keep()),
            recording_busy: self.recording_busy.clone(),
            timer: None,
            timers_armed: 0,
            live: self.live.clone(),
            end_pending: false,
            finished: false,
        };
        driver.start(pump);
        Response::from_websocket(pair.client)
    }
}

/// Runs a call's pump where its events arrive. Each event (a frame, a timer, a finished
/// connect or request) is fed to the machine and the actions are carried out before the
/// handler returns: no channel and no task switch per frame, and nothing on the audio path
/// waits (records go to the outbox, the recording to its own task). An event that arrives
/// while the pump is busy (a handler re-entered) is queued and handled right after.
#[derive(Clone, Default)]
struct Driver {
    pump: Rc<RefCell<Option<Pump>>>,
    queue: Rc<RefCell<VecDeque<Event>>>,
}

impl Driver {
    fn sink(&self) -> Sink {
        let me = self.clone();
        Rc::new(move |event| me.deliver(event))
    }

    fn start(&self, pump: Pump) {
        *self.pump.borrow_mut() = Some(pump);
        self.run();
    }

    fn deliver(&self, event: Event) {
        self.queue.borrow_mut().push_back(event);
        self.run();
    }

    /// Handles everything queued, then carries out the actions and sets the timer.
    fn run(&self) {
        let Ok(mut slot) = self.pump.try_borrow_mut() else {
            return; // the pump is running further up the stack; it takes the queue next
        };
        let Some(pump) = slot.as_mut() else {
            // Late events of a finished call. A Realtime socket whose connect was on its way
            // when the call ended (the caller hung up while the session was set up) is closed
            // here: dropped unclosed, it would stay open at OpenAI with nothing to end it.
            let late: Vec<Event> = self.queue.borrow_mut().drain(..).collect();
            for event in late {
                if let Event::OpenAiConnected(_, ws, listeners, _) = event {
                    socket::let_go(&ws, listeners, "call ended");
                }
            }
            return;
        };
        loop {
            pump.perform(self);
            let next = self.queue.borrow_mut().pop_front();
            match next {
                Some(event) => pump.feed(event),
                None => break,
            }
        }
        if pump.call.is_ended() {
            pump.finish();
            // The pump is done: drop it (its sockets' listeners were retired).
            *slot = None;
            self.queue.borrow_mut().clear();
        } else {
            pump.arm_timer(self);
        }
    }
}

/// Drives one call: events in, stamped with the time; actions out, carried out in order.
struct Pump {
    call: Call,
    config: Bridge,
    twilio: WebSocket,
    openai: Option<WebSocket>,
    /// Retired with the socket they listen to, so a replaced session's close is not heard.
    openai_listeners: Option<Listeners>,
    /// Number of the latest OpenAI connect asked for; older ones are discarded.
    openai_connect: u64,
    /// The socket opened at the webhook, for the first connect.
    preopen: Option<Preopen>,
    twilio_listeners: Option<Listeners>,
    storage: Rc<Storage>,
    record: CallState,
    outbox: Outbox,
    recording: Recording,
    /// The armed timer: when it fires, its number, and what cancels it when dropped.
    timer: Option<(Millis, u64, oneshot::Sender<()>)>,
    timers_armed: u64,
    live: Rc<Cell<bool>>,
    /// The call's end is being kept (see `Action::Ended`): the stream stays live until then.
    end_pending: bool,
    finished: bool,
    recording_busy: Rc<Cell<bool>>,
}

impl Pump {
    /// One timer, kept while it fires no later than the machine's deadline: the idle
    /// deadline moves with every agent delta, and re-arming a setTimeout for each would cost
    /// a timer per frame. A timer that fires early is re-armed then.
    fn arm_timer(&mut self, driver: &Driver) {
        match self.call.poll_timeout() {
            None => self.timer = None,
            Some(at) if self.timer.as_ref().is_some_and(|(d, _, _)| *d <= at) => {}
            Some(at) => {
                self.timers_armed += 1;
                let n = self.timers_armed;
                let (cancel, cancelled) = oneshot::channel::<()>();
                self.timer = Some((at, n, cancel));
                let wait = Duration::from_millis(at.0.saturating_sub(now().0));
                let driver = driver.clone();
                wasm_bindgen_futures::spawn_local(async move {
                    let delay = Delay::from(wait).fuse();
                    let mut cancelled = cancelled.fuse();
                    futures::pin_mut!(delay);
                    futures::select! {
                        _ = delay => driver.deliver(Event::Timer(n)),
                        _ = cancelled => {}
                    }
                });
            }
        }
    }

    /// The call is over: its sockets' listeners go, and the recording is completed.
    fn finish(&mut self) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        self.timer = None;
        if let Some(l) = self.openai_listeners.take() {
            l.retire();
        }
        if let Some(l) = self.twilio_listeners.take() {
            l.retire();
        }
        // However the call went, a recording that was started is completed.
        self.recording.close();
        if !self.end_pending {
            self.live.set(false);
        }
    }

    fn drop_openai_listeners(&mut self) {
        if let Some(l) = self.openai_listeners.take() {
            l.retire();
        }
    }

    fn feed(&mut self, event: Event) {
        let t = now();
        match event {
            Event::Socket(side, frame) => {
                let input = match (&side, &frame) {
                    (Side::Twilio, Frame::Text(s)) => Input::TwilioText(s),
                    (Side::Twilio, Frame::Binary(len)) => Input::TwilioBinary { len: *len },
                    (Side::Twilio, Frame::Closed { code, reason }) => Input::TwilioClosed {
                        code: *code,
                        reason,
                    },
                    (Side::OpenAi, Frame::Text(s)) => Input::OpenAiText(s),
                    (Side::OpenAi, Frame::Binary(len)) => Input::OpenAiBinary { len: *len },
                    (Side::OpenAi, Frame::Closed { code, reason }) => {
                        // The peer closed it: nothing more is sent there.
                        self.openai = None;
                        self.drop_openai_listeners();
                        Input::OpenAiClosed {
                            code: *code,
                            reason,
                        }
                    }
                    (_, Frame::Error(message)) => {
                        // A close event follows an error; that is what ends the call.
                        self.log_socket_error(side, message);
                        return;
                    }
                };
                self.call.handle(input, t);
            }
            Event::OpenAiConnected(n, ws, listeners, configured) => {
                // A connect the machine has since given up on (a setup timeout, then a
                // new attempt) must not pass for the current session.
                if self.call.is_ended() || n != self.openai_connect {
                    socket::let_go(&ws, listeners, "superseded");
                    return;
                }
                self.openai = Some(ws);
                self.openai_listeners = Some(listeners);
                let opened = if configured {
                    Input::OpenAiOpenedConfigured
                } else {
                    Input::OpenAiOpened
                };
                self.call.handle(opened, t);
            }
            Event::OpenAiFailed(n, status, reason) => {
                if n == self.openai_connect {
                    self.call.handle(
                        Input::OpenAiConnectFailed {
                            reason: &reason,
                            status,
                        },
                        t,
                    )
                }
            }
            Event::HttpDone(id, outcome) => self.call.handle(
                Input::HttpDone {
                    id,
                    outcome: &outcome,
                },
                t,
            ),
            Event::Timer(n) => {
                if self.timer.as_ref().is_none_or(|(_, armed, _)| *armed != n) {
                    return; // replaced since
                }
                self.timer = None;
                if self.call.poll_timeout().is_some_and(|at| at <= t) {
                    self.call.handle(Input::Timeout, t);
                }
            }
        }
    }

    fn log_socket_error(&self, side: Side, message: &str) {
        log(
            "warn",
            "socket.error",
            serde_json::json!({ "call_sid": self.call.sid(), "side": format!("{side:?}"), "message": message }),
        );
    }

    fn perform(&mut self, driver: &Driver) {
        while let Some(action) = self.call.poll_action() {
            match action {
                Action::SendTwilio(text) => {
                    if let Err(e) = self.twilio.send_with_str(&text) {
                        self.log_socket_error(Side::Twilio, &e.to_string());
                    }
                }
                Action::SendOpenAi(text) => match &self.openai {
                    Some(ws) => {
                        if let Err(e) = ws.send_with_str(&text) {
                            self.log_socket_error(Side::OpenAi, &e.to_string());
                        }
                    }
                    None => self.log_socket_error(Side::OpenAi, "send before the socket opened"),
                },
                Action::ConnectOpenAi { model } => {
                    self.openai_connect += 1;
                    let n = self.openai_connect;
                    self.drop_openai_listeners();
                    if let Some(old) = self.openai.take() {
                        let _ = old.close(Some(1000), Some("replaced"));
                    }
                    let url = self.config.realtime_connect_url(&model);
                    if let Some(preopen) = self.preopen.take() {
                        if preopen.hand_over(&url, n, driver.sink()) {
                            continue;
                        }
                    }
                    let key = self.config.openai_api_key.expose().to_owned();
                    let driver = driver.clone();
                    wasm_bindgen_futures::spawn_local(async move {
                        let event = match connect_openai(&url, &key, driver.sink()).await {
                            Ok((ws, listeners)) => Event::OpenAiConnected(n, ws, listeners, false),
                            Err((status, reason)) => Event::OpenAiFailed(n, status, reason),
                        };
                        driver.deliver(event);
                    });
                }
                Action::CloseOpenAi { code, reason } => {
                    self.drop_openai_listeners();
                    if let Some(ws) = self.openai.take() {
                        let _ = ws.close(Some(code), Some(reason));
                    }
                }
                Action::Http { id, request } => {
                    let driver = driver.clone();
                    wasm_bindgen_futures::spawn_local(async move {
                        let outcome = super::http::send(&request).await;
                        driver.deliver(Event::HttpDone(id, outcome));
                    });
                }
                Action::CloseTwilio { code, reason } => {
                    let _ = self.twilio.close(Some(code), Some(reason));
                }
                Action::Log { level, .. } if level < self.config.log_level => {}
                Action::Log { level, line } => match level {
                    Level::Debug | Level::Info => console_log!("{}", line),
                    Level::Warn => console_warn!("{}", line),
                    Level::Error => console_error!("{}", line),
                },
                Action::Persist(record) => self.outbox.enqueue(&record),
                Action::RecordingData(pcm) => self.recording.data(pcm),
                Action::RecordingDone { duration_ms } => self.recording.done(duration_ms),
                Action::Ended(summary) => {
                    self.record.end_reason = Some(summary.reason.label().to_owned());
                    // Until the stored call reads as ended, the stream counts as live: a
                    // status callback or alarm in between (Twilio's `completed` comes right
                    // after its `stop`, while the last records may wait seconds on D1) would
                    // otherwise take it for a stream lost in a restart and record the call
                    // as `bridge_restarted`.
                    self.end_pending = true;
                    let live = self.live.clone();
                    let record = self.record.clone();
                    let storage = self.storage.clone();
                    let outbox = self.outbox.clone();
                    let recording_busy = self.recording_busy.clone();
                    wasm_bindgen_futures::spawn_local(async move {
                        // The call's last records (its end among them) are kept first:
                        // once the call reads as ended, a restart no longer finalizes it,
                        // so they must not be lost with this instance. Until they are, the
                        // stream counts as live; should the object restart meanwhile, the
                        // call is finalized as interrupted.
                        outbox
                            .until_durable(summary.call_sid.as_str(), "the call's end")
                            .await;
                        let stored = storage.put(CALL_KEY, &record).await;
                        live.set(false);
                        if let Err(e) = stored {
                            log(
                                "error",
                                "storage.write_failed",
                                serde_json::json!({ "call_sid": summary.call_sid, "error": e.to_string() }),
                            );
                            return;
                        }
                        // The stream is over: the watch has nothing left to watch. Its
                        // alarm goes once the recording is stored and the call's last
                        // records reached D1; a write that fails after that sets the
                        // outbox's own retry alarm. A recording that failed keeps its
                        // checkpoints and its retry alarm.
                        let recorded =
                            super::wait_until(SETTLE, Duration::from_millis(100), || {
                                !recording_busy.get()
                            })
                            .await
                                && matches!(recording::has_checkpoints(&storage).await, Ok(false));
                        if recorded && outbox.settled(SETTLE).await {
                            // In the turn the outbox was found settled: a record stored from
                            // now on sets the alarm again, after this deletion.
                            outbox.alarm_gone();
                            if let Err(e) = storage.delete_alarm().await {
                                log(
                                    "warn",
                                    "storage.delete_alarm_failed",
                                    serde_json::json!({ "call_sid": summary.call_sid, "error": e.to_string() }),
                                );
                            }
                        }
                    });
                }
            }
        }
    }
}

/// Opens the Realtime socket: an ordinary fetch with `Upgrade: websocket` and the bearer
/// key (the only header the GA API wants; no `OpenAI-Beta`). A failure comes with the
/// HTTP status of a refused upgrade, when there was an HTTP answer.
pub(super) async fn connect_openai(
    url: &str,
    key: &str,
    sink: Sink,
) -> std::result::Result<(WebSocket, Listeners), (Option<u16>, String)> {
    let failed = |what: &str, e: worker::Error| (None, format!("{what}: {e}"));
    let headers = Headers::new();
    headers
        .set("Upgrade", "websocket")
        .and_then(|_| headers.set("Authorization", &format!("Bearer {key}")))
        .map_err(|e| failed("headers", e))?;
    let mut init = RequestInit::new();
    init.with_headers(headers);
    let req = Request::new_with_init(url, &init).map_err(|e| failed("request", e))?;
    let resp = Fetch::Request(req)
        .send()
        .await
        .map_err(|e| failed("connect", e))?;
    let status = resp.status_code();
    let Some(ws) = resp.websocket() else {
        return Err((Some(status), format!("HTTP {status} on upgrade")));
    };
    ws.accept().map_err(|e| failed("accept", e))?;
    let listeners = socket::listen(&ws, Side::OpenAi, sink).map_err(|e| failed("listen", e))?;
    Ok((ws, listeners))
}
