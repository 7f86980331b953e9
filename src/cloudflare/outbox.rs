//! The call's durable outbox: records the core asks to keep reach D1 in the background, in
//! order, and nothing on the audio path waits for them. The call's pump hands records over
//! in memory; while nothing is waiting in the object's own storage they go straight to D1,
//! those handed over within `crate::outbox::GATHER_MS` of each other in one write.
//! Whatever D1 does not accept at once (and what the Worker hands over with `push`) is
//! first written to the object's storage, copied to D1 from there in order and deleted only
//! once D1 has accepted it; a failed D1 write is retried with backoff. Records in storage
//! always have an alarm behind them, set (once, not per record) before the first is written:
//! a restart (a deploy) while they are on their way to D1 would otherwise strand them in an
//! object nothing wakes again; the alarm copies them. A record storage refuses stays in memory
//! and is tried again, the same way. (Storage writes cost the whole object: under load, one
//! per record stalled every call's audio in `wrangler dev`.) What is where, and what is owed,
//! is `crate::outbox::Ledger`'s bookkeeping.

use super::db;
use super::log;
use crate::outbox::{backoff_after, Held, Ledger};
use crate::store::{self, Record, Statement};
use futures::channel::mpsc::{self, UnboundedReceiver, UnboundedSender};
use futures::StreamExt;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;
use worker::{Date, Delay, Env, ListOptions, Storage};

const PREFIX: &str = "outbox:";
/// Entries copied to D1 in one batch (one transaction).
const BATCH: usize = 50;
/// How long [`Outbox::durable`] waits for a direct D1 write already on its way: well
/// inside Twilio's 15 s webhook timeout, since the voice webhook and the status callback
/// wait on it (a webhook Twilio gave up on plays its "application error" to the caller).
pub(crate) const DURABLE_WAIT: Duration = Duration::from_secs(8);
/// The longest a write of the outbox is waited for once it is sent to D1. D1 answers in
/// milliseconds; a write with no answer by then is taken as failed and its records are tried
/// again through storage, as after an error. Without a limit, one write that never answered
/// would hold the outbox (only one write is under way at a time) and every record after it
/// in memory for as long as the object lived. Its statements may still land: each record's
/// statements can be applied twice and in any order (`store::Record::statements`).
pub(crate) const D1_WRITE_LIMIT: Duration = Duration::from_secs(10);
/// When the alarm set behind records put in storage fires: if the object is still up, the
/// writer has long copied them, and the alarm finds nothing to do.
const ALARM_AFTER: Duration = Duration::from_secs(10);

/// What [`Outbox::store`] did.
#[derive(Default)]
struct Stored {
    moved: usize,
    /// Storage refused a write: that record is back at the head of the queue.
    failed: bool,
}

fn key(seq: u64) -> String {
    format!("{PREFIX}{seq:016}")
}

/// A job only one task may do at a time (this is single-threaded): a second task that finds
/// it taken skips it, and the holder releases it when its guard drops, across awaits.
#[derive(Default)]
struct Lock(Cell<bool>);

struct LockGuard<'a>(&'a Cell<bool>);

impl Lock {
    fn try_take(&self) -> Option<LockGuard<'_>> {
        // Lazily: a guard made and dropped for a taken lock would release it.
        (!self.0.replace(true)).then(|| LockGuard(&self.0))
    }

    fn is_taken(&self) -> bool {
        self.0.get()
    }
}

impl Drop for LockGuard<'_> {
    fn drop(&mut self) {
        self.0.set(false);
    }
}

struct Inner {
    storage: Storage,
    env: Env,
    next_seq: Cell<Option<u64>>,
    /// The records handed over (their statements and call) and what storage holds.
    ledger: RefCell<Ledger<(Vec<Statement>, String)>>,
    /// Held while records leave the ledger's memory (to D1 or to storage), so they leave in
    /// order.
    storing: Lock,
    wake: UnboundedSender<()>,
    /// Test hook: fail this many D1 writes (FAULT_INJECT_D1_FAILURES), to prove nothing
    /// is lost when D1 errors.
    injected_failures: Cell<u64>,
    /// Test hook: hold each D1 write this long (FAULT_INJECT_D1_STALL_MS), so that a restart
    /// can land while one is on its way.
    injected_stall: Duration,
    /// Test hook: this many D1 writes get no answer (FAULT_INJECT_D1_HANGS), to prove a
    /// write D1 never answers does not hold the call's records.
    injected_hangs: Cell<u64>,
    /// Test hook: fail this many writes to the object's storage
    /// (FAULT_INJECT_STORAGE_FAILURES), to prove what the object decided is not lost when
    /// storage refuses its records.
    injected_storage_failures: Cell<u64>,
    running: Cell<bool>,
    flushing: Lock,
    /// The call whose records these are (an object serves one call), once known: named in
    /// every log line of the outbox.
    call_sid: RefCell<Option<String>>,
}

/// Cheap to clone; all clones share one queue and one background writer.
#[derive(Clone)]
pub struct Outbox(Rc<Inner>);

impl Outbox {
    pub fn new(storage: Storage, env: Env) -> Self {
        let (wake, rx) = mpsc::unbounded();
        let hook = |name| {
            super::setting_text(&env, name)
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        let injected = hook(crate::config::FAULT_INJECT_D1_FAILURES);
        let injected_stall = Duration::from_millis(hook(crate::config::FAULT_INJECT_D1_STALL_MS));
        let injected_storage = hook(crate::config::FAULT_INJECT_STORAGE_FAILURES);
        let injected_hangs = hook(crate::config::FAULT_INJECT_D1_HANGS);
        let outbox = Outbox(Rc::new(Inner {
            storage,
            env,
            next_seq: Cell::new(None),
            ledger: RefCell::new(Ledger::new()),
            storing: Lock::default(),
            wake,
            injected_failures: Cell::new(injected),
            injected_stall,
            injected_hangs: Cell::new(injected_hangs),
            injected_storage_failures: Cell::new(injected_storage),
            running: Cell::new(false),
            flushing: Lock::default(),
            call_sid: RefCell::new(None),
        }));
        outbox.start(rx);
        // Whatever an earlier instance left queued goes first.
        let _ = outbox.0.wake.unbounded_send(());
        outbox
    }

    /// Names the call whose records these are, for the outbox's log lines: learnt from the
    /// records handed over, or told by an object restarted with records waiting (its alarm
    /// reads the call's stored state).
    pub fn name_call(&self, call_sid: &str) {
        let mut known = self.0.call_sid.borrow_mut();
        if known.is_none() {
            *known = Some(call_sid.to_owned());
        }
    }

    /// A log line of the outbox, naming the call once it is known.
    fn log(&self, level: &str, event: &str, mut fields: serde_json::Value) {
        if let (Some(sid), serde_json::Value::Object(f)) =
            (self.0.call_sid.borrow().as_deref(), &mut fields)
        {
            f.entry("call_sid").or_insert_with(|| sid.into());
        }
        log(level, event, fields);
    }

    fn start(&self, rx: UnboundedReceiver<()>) {
        if self.0.running.replace(true) {
            return;
        }
        let me = self.clone();
        worker::wasm_bindgen_futures::spawn_local(async move { me.writer(rx).await });
    }

    async fn next_seq(&self) -> worker::Result<u64> {
        if let Some(n) = self.0.next_seq.get() {
            return Ok(n);
        }
        // After a restart, continue after what is still queued.
        let last = self
            .0
            .storage
            .list_with_options(ListOptions::new().prefix(PREFIX).reverse(true).limit(1))
            .await?;
        let n = last
            .keys()
            .into_iter()
            .filter_map(|k| k.ok()?.as_string())
            .filter_map(|k| k.strip_prefix(PREFIX)?.parse::<u64>().ok())
            .next()
            .map(|n| n + 1)
            .unwrap_or(0);
        Ok(n)
    }

    /// Queues a record and returns once it is durable (see [`Outbox::durable`]); false,
    /// logged, if it could not be made so.
    pub async fn push(&self, record: &Record) -> bool {
        self.enqueue(record);
        self.durable().await
    }

    /// Waits until every record handed over so far is durable: accepted by D1 (a direct
    /// write already on its way is waited for) or kept in the object's storage. What a
    /// restart must not lose (a status from Twilio, the end of a call about to be marked
    /// ended) goes through here first. False, logged, when storage refused it or a direct
    /// write took longer than [`DURABLE_WAIT`].
    pub async fn durable(&self) -> bool {
        let start = Date::now().as_millis();
        loop {
            if self.0.storing.is_taken() {
                if Date::now().as_millis().saturating_sub(start) > DURABLE_WAIT.as_millis() as u64 {
                    self.log(
                        "error",
                        "outbox.not_durable",
                        serde_json::json!({ "why": "a D1 write took too long" }),
                    );
                    return false;
                }
                Delay::from(Duration::from_millis(10)).await;
                continue;
            }
            if self.0.ledger.borrow().unstored() == 0 {
                return true;
            }
            let stored = self.store().await;
            if stored.moved > 0 || stored.failed {
                // The writer may have looked before these were stored (or refused): it copies
                // them to D1, or tries them again.
                let _ = self.0.wake.unbounded_send(());
            }
            if stored.failed {
                return false;
            }
        }
    }

    /// Waits until every record handed over so far is durable (see [`Outbox::durable`]),
    /// however long that takes: each refusal is logged and tried again after a pause that
    /// grows to [`crate::outbox::MAX_BACKOFF_MS`]. For background work that must not go on
    /// before its records are kept (marking a call ended, a recording stored); `what` names
    /// it in the log.
    pub async fn until_durable(&self, call_sid: &str, what: &str) {
        let mut pause = 0;
        while !self.durable().await {
            pause = backoff_after(pause);
            self.log(
                "error",
                "outbox.not_kept_yet",
                serde_json::json!({ "call_sid": call_sid, "what": what, "retry_in_ms": pause }),
            );
            Delay::from(Duration::from_millis(pause)).await;
        }
    }

    /// Queues a record and returns once it is durable, however long that takes (see
    /// [`Outbox::until_durable`]).
    pub async fn keep(&self, record: &Record, what: &str) {
        self.enqueue(record);
        self.until_durable(record.call_sid(), what).await;
    }

    /// Queues a record without waiting: the call's pump hands records over here so the
    /// audio path never waits on storage. They are stored in the order given, by `push`
    /// or by the background writer, whichever runs first.
    pub fn enqueue(&self, record: &Record) {
        let now = Date::now().as_millis();
        self.name_call(record.call_sid());
        let statements = record.statements(now);
        if statements.is_empty() {
            return;
        }
        self.0
            .ledger
            .borrow_mut()
            .push((statements, record.call_sid().to_owned()));
        let _ = self.0.wake.unbounded_send(());
    }

    /// Sends what was handed over straight to D1 when nothing waits in storage. Returns
    /// false when the records must go through storage instead (a backlog, another mover, or
    /// D1 refused them: then they are back in the queue, in order).
    async fn send_direct(&self) -> bool {
        if self.0.ledger.borrow().held() != Held::Empty {
            return false;
        }
        let Some(_guard) = self.0.storing.try_take() else {
            return false;
        };
        let Some(batch) = self.0.ledger.borrow_mut().take_direct() else {
            return false;
        };
        if batch.is_empty() {
            return true;
        }
        let statements = store::coalesce(batch.iter().flat_map(|(s, _)| s.iter().cloned()));
        match self.write_d1(&statements, "memory", batch.len()).await {
            Ok(()) => {
                self.0.ledger.borrow_mut().direct_done();
                true
            }
            Err(e) => {
                self.log(
                    "warn",
                    "outbox.d1_write_failed",
                    serde_json::json!({ "error": e.to_string(), "then": "kept in storage, retried" }),
                );
                self.0.ledger.borrow_mut().direct_failed(batch);
                false
            }
        }
    }

    /// Writes `statements` (of `records` records, from `from`: memory or storage) to D1 in one
    /// batch. Each write is logged at debug level as it starts: how records group into D1
    /// requests, and a write under way, can be seen (and are, by the tests).
    async fn write_d1(
        &self,
        statements: &[Statement],
        from: &str,
        records: usize,
    ) -> worker::Result<()> {
        self.log(
            "debug",
            "outbox.d1_write",
            serde_json::json!({ "from": from, "records": records, "statements": statements.len() }),
        );
        if !self.0.injected_stall.is_zero() {
            Delay::from(self.0.injected_stall).await;
        }
        if self.0.injected_failures.get() > 0 {
            self.0
                .injected_failures
                .set(self.0.injected_failures.get() - 1);
            return Err(worker::Error::RustError(
                "injected D1 failure (FAULT_INJECT_D1_FAILURES)".into(),
            ));
        }
        let hangs = self.0.injected_hangs.get();
        self.0.injected_hangs.set(hangs.saturating_sub(1));
        let database = db::database(&self.0.env)?;
        let write = async {
            if hangs > 0 {
                futures::future::pending::<()>().await;
            }
            db::batch(&database, statements).await
        };
        super::within(D1_WRITE_LIMIT, write)
            .await
            .unwrap_or_else(|| {
                Err(worker::Error::RustError(format!(
                    "no answer from D1 within {D1_WRITE_LIMIT:?}{}",
                    if hangs > 0 {
                        " (FAULT_INJECT_D1_HANGS)"
                    } else {
                        ""
                    }
                )))
            })
    }

    /// Moves enqueued records into local storage, in order (one mover at a time). A write
    /// storage refuses puts its record back at the head of the queue, uncounted, and stops
    /// there: the writer tries again with its backoff.
    async fn store(&self) -> Stored {
        let mut done = Stored::default();
        let Some(_guard) = self.0.storing.try_take() else {
            return done;
        };
        loop {
            let Some((statements, call_sid)) = self.0.ledger.borrow_mut().next_to_store() else {
                return done;
            };
            self.arm_if_owed().await;
            let text = serde_json::to_string(&statements).expect("statements serialize");
            let result = async {
                let injected = self.0.injected_storage_failures.get();
                if injected > 0 {
                    self.0.injected_storage_failures.set(injected - 1);
                    return Err(worker::Error::RustError(
                        "injected storage failure (FAULT_INJECT_STORAGE_FAILURES)".into(),
                    ));
                }
                let seq = self.next_seq().await?;
                self.0.storage.put(&key(seq), text).await?;
                self.0.next_seq.set(Some(seq + 1));
                Ok::<_, worker::Error>(())
            }
            .await;
            if let Err(e) = result {
                // Local storage failing is as bad as it gets: say so loudly, and keep the
                // record in memory for the next try rather than drop it.
                self.log(
                    "error",
                    "outbox.store_failed",
                    serde_json::json!({ "call_sid": call_sid, "error": e.to_string() }),
                );
                self.0
                    .ledger
                    .borrow_mut()
                    .store_refused((statements, call_sid));
                done.failed = true;
                return done;
            }
            self.0.ledger.borrow_mut().stored();
            done.moved += 1;
        }
    }

    /// One round of getting what was handed over to D1: straight there when nothing waits in
    /// storage, else into storage and from there to D1. An error when D1 or storage failed,
    /// or when storage refused a record, which then waits in memory for the next round.
    pub async fn catch_up(&self) -> worker::Result<()> {
        if !self.send_direct().await {
            self.store().await;
            self.flush().await?;
        }
        if self.0.ledger.borrow().refused() {
            return Err(worker::Error::RustError(
                "storage refused a record: it waits in memory".into(),
            ));
        }
        Ok(())
    }

    async fn writer(self, mut rx: UnboundedReceiver<()>) {
        let mut backoff = 0u64;
        while rx.next().await.is_some() {
            loop {
                // Coalesce wake-ups that came while we were writing.
                while rx.try_recv().is_ok() {}
                // Records bound straight for D1 wait for those that come with them.
                let wait = self
                    .0
                    .ledger
                    .borrow_mut()
                    .direct_wait_ms(Date::now().as_millis());
                if wait > 0 {
                    Delay::from(Duration::from_millis(wait)).await;
                    continue;
                }
                let Err(e) = self.catch_up().await else {
                    backoff = 0;
                    break;
                };
                backoff = backoff_after(backoff);
                let event = if self.0.ledger.borrow().refused() {
                    "outbox.store_retry"
                } else {
                    "outbox.d1_write_failed"
                };
                self.log(
                    "warn",
                    event,
                    serde_json::json!({ "error": e.to_string(), "retry_in_ms": backoff }),
                );
                // If the object is evicted before the retry, the alarm resumes it.
                self.arm_if_owed().await;
                self.wait_storing(&mut rx, Duration::from_millis(backoff))
                    .await;
            }
        }
    }

    /// Waits `pause` before D1 is tried again; records handed over meanwhile (the call goes
    /// on while D1 is down) go to storage as they come, so a restart during a long outage
    /// loses none of them.
    async fn wait_storing(&self, rx: &mut UnboundedReceiver<()>, pause: Duration) {
        use futures::FutureExt;
        let mut pause = Delay::from(pause).fuse();
        loop {
            futures::select! {
                _ = pause => return,
                woken = rx.next() => {
                    if woken.is_none() {
                        return;
                    }
                    self.store().await;
                }
            }
        }
    }

    /// Sets the object's alarm when records may wait in storage (or in memory, refused by it)
    /// and none is known to be pending. Marked set before it is, so that a deletion issued
    /// after this call (see [`Outbox::alarm_gone`]) comes after it too.
    pub async fn arm_if_owed(&self) {
        if !self.0.ledger.borrow().alarm_owed() {
            return;
        }
        self.0.ledger.borrow_mut().alarm_set();
        if let Err(e) = self.0.storage.set_alarm(ALARM_AFTER).await {
            self.0.ledger.borrow_mut().alarm_gone();
            self.log(
                "error",
                "outbox.alarm_not_set",
                serde_json::json!({ "error": e.to_string() }),
            );
        }
    }

    /// The object's alarm fired (call first thing in its handler) or is about to be deleted
    /// (call in the same turn as the deletion): the next record stored sets a new one.
    pub fn alarm_gone(&self) {
        self.0.ledger.borrow_mut().alarm_gone();
    }

    /// Nothing waits to reach D1 and nothing is on its way there: no retry needs the alarm.
    fn is_idle(&self) -> bool {
        self.0.ledger.borrow().is_idle()
            && !self.0.storing.is_taken()
            && !self.0.flushing.is_taken()
    }

    /// Waits up to `limit` for the outbox to be idle (checking every 100 ms); false if it
    /// never was. True comes back in the same turn as the check, so what the caller does
    /// next, before awaiting anything, comes before anything new can queue.
    pub async fn settled(&self, limit: Duration) -> bool {
        super::wait_until(limit, Duration::from_millis(100), || self.is_idle()).await
    }

    /// Copies everything queued to D1, oldest first, deleting what D1 accepted.
    async fn flush(&self) -> worker::Result<()> {
        // One flush at a time (the alarm and the writer may both call this).
        let Some(_guard) = self.0.flushing.try_take() else {
            return Ok(());
        };
        loop {
            let mark = self.0.ledger.borrow().flush_mark();
            let entries = self
                .0
                .storage
                .list_with_options(ListOptions::new().prefix(PREFIX).limit(BATCH))
                .await?;
            let mut keys = Vec::new();
            let mut statements: Vec<Statement> = Vec::new();
            for entry in entries.entries() {
                let pair = worker::js_sys::Array::from(&entry?);
                let (Some(k), Some(v)) = (pair.get(0).as_string(), pair.get(1).as_string()) else {
                    continue;
                };
                match serde_json::from_str::<Vec<Statement>>(&v) {
                    Ok(mut s) => statements.append(&mut s),
                    Err(e) => self.log(
                        "error",
                        "outbox.corrupt_entry",
                        serde_json::json!({ "key": k, "error": e.to_string() }),
                    ),
                }
                keys.push(k);
            }
            self.0.ledger.borrow_mut().flush_listed(keys.len());
            // Storage is drained once a listing was short, nothing was stored since and
            // nothing is being stored now.
            let drained = |me: &Self| {
                let storing = me.0.storing.is_taken();
                me.0.ledger.borrow_mut().flush_drained(mark, storing);
            };
            if keys.is_empty() {
                drained(self);
                return Ok(());
            }
            self.write_d1(&store::coalesce(statements), "storage", keys.len())
                .await?;
            let full = keys.len() >= BATCH;
            self.0.storage.delete_multiple(keys).await?;
            if !full {
                // That was all; whatever was stored since came with a wake-up of its own.
                drained(self);
                return Ok(());
            }
        }
    }
}
