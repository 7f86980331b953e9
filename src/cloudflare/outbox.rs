//! The call's durable outbox: records the core asks to keep are first written to the
//! Durable Object's own storage, then copied to D1 in the background, in order, and
//! deleted only once D1 has accepted them. A failed D1 write is retried with backoff, and
//! an alarm brings the object back to finish if it is evicted first. Nothing on the audio
//! path waits for D1.

use super::db;
use super::log;
use crate::store::{Record, Statement};
use futures::channel::mpsc::{self, UnboundedReceiver, UnboundedSender};
use futures::StreamExt;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Duration;
use worker::{Date, Delay, Env, ListOptions, Storage};

const PREFIX: &str = "outbox:";
/// Entries copied to D1 in one batch (one transaction).
const BATCH: usize = 50;
const MAX_BACKOFF_MS: u64 = 30_000;

fn key(seq: u64) -> String {
    format!("{PREFIX}{seq:016}")
}

struct Inner {
    storage: Storage,
    env: Env,
    next_seq: Cell<Option<u64>>,
    /// Records handed over with `enqueue`, not yet in storage, oldest first.
    unstored: RefCell<VecDeque<(String, String)>>,
    storing: RefCell<()>,
    wake: UnboundedSender<()>,
    /// Test hook: fail this many D1 writes (FAULT_INJECT_D1_FAILURES), to prove nothing
    /// is lost when D1 errors.
    injected_failures: Cell<u64>,
    running: Cell<bool>,
    flushing: RefCell<()>,
}

/// Cheap to clone; all clones share one queue and one background writer.
#[derive(Clone)]
pub struct Outbox(Rc<Inner>);

impl Outbox {
    pub fn new(storage: Storage, env: Env) -> Self {
        let (wake, rx) = mpsc::unbounded();
        let injected = env
            .var("FAULT_INJECT_D1_FAILURES")
            .ok()
            .and_then(|v| v.to_string().trim().parse().ok())
            .unwrap_or(0);
        let outbox = Outbox(Rc::new(Inner {
            storage,
            env,
            next_seq: Cell::new(None),
            unstored: RefCell::new(VecDeque::new()),
            storing: RefCell::new(()),
            wake,
            injected_failures: Cell::new(injected),
            running: Cell::new(false),
            flushing: RefCell::new(()),
        }));
        outbox.start(rx);
        // Whatever an earlier instance left queued goes first.
        let _ = outbox.0.wake.unbounded_send(());
        outbox
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

    /// Queues a record durably (local storage) and wakes the background writer.
    pub async fn push(&self, record: &Record) {
        self.enqueue(record);
        if self.store().await > 0 {
            // The writer may have looked before these were stored.
            let _ = self.0.wake.unbounded_send(());
        }
    }

    /// Queues a record without waiting: the call's pump hands records over here so the
    /// audio path never waits on storage. They are stored in the order given, by `push`
    /// or by the background writer, whichever runs first.
    pub fn enqueue(&self, record: &Record) {
        let now = Date::now().as_millis();
        let statements = record.statements(now);
        if statements.is_empty() {
            return;
        }
        let text = serde_json::to_string(&statements).expect("statements serialize");
        self.0
            .unstored
            .borrow_mut()
            .push_back((text, record.call_sid().to_owned()));
        let _ = self.0.wake.unbounded_send(());
    }

    /// Moves enqueued records into local storage, in order (one mover at a time); returns
    /// how many it moved.
    async fn store(&self) -> usize {
        let Ok(_guard) = self.0.storing.try_borrow_mut() else {
            return 0;
        };
        let mut moved = 0;
        loop {
            let Some((text, call_sid)) = self.0.unstored.borrow_mut().pop_front() else {
                return moved;
            };
            moved += 1;
            let result = async {
                let seq = self.next_seq().await?;
                self.0.next_seq.set(Some(seq + 1));
                self.0.storage.put(&key(seq), text).await
            }
            .await;
            if let Err(e) = result {
                // Local storage failing is as bad as it gets; say so loudly with what was lost.
                log(
                    "error",
                    "outbox.store_failed",
                    serde_json::json!({ "call_sid": call_sid, "error": e.to_string() }),
                );
            }
        }
    }

    async fn writer(self, mut rx: UnboundedReceiver<()>) {
        let mut backoff = 0u64;
        while rx.next().await.is_some() {
            // Coalesce wake-ups that came while we were writing.
            while rx.try_recv().is_ok() {}
            self.store().await;
            loop {
                match self.flush().await {
                    Ok(()) => {
                        backoff = 0;
                        break;
                    }
                    Err(e) => {
                        backoff = (backoff * 2).clamp(500, MAX_BACKOFF_MS);
                        log(
                            "warn",
                            "outbox.d1_write_failed",
                            serde_json::json!({ "error": e.to_string(), "retry_in_ms": backoff }),
                        );
                        // If the object is evicted before the retry, the alarm resumes it.
                        let _ = self
                            .0
                            .storage
                            .set_alarm(Duration::from_millis(backoff + 1000))
                            .await;
                        Delay::from(Duration::from_millis(backoff)).await;
                    }
                }
            }
        }
    }

    /// Copies everything queued to D1, oldest first, deleting what D1 accepted.
    pub async fn flush(&self) -> worker::Result<()> {
        // One flush at a time (the alarm and the writer may both call this).
        let _guard = match self.0.flushing.try_borrow_mut() {
            Ok(g) => g,
            Err(_) => return Ok(()),
        };
        loop {
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
                    Err(e) => log(
                        "error",
                        "outbox.corrupt_entry",
                        serde_json::json!({ "key": k, "error": e.to_string() }),
                    ),
                }
                keys.push(k);
            }
            if keys.is_empty() {
                return Ok(());
            }
            if self.0.injected_failures.get() > 0 {
                self.0
                    .injected_failures
                    .set(self.0.injected_failures.get() - 1);
                return Err(worker::Error::RustError(
                    "injected D1 failure (FAULT_INJECT_D1_FAILURES)".into(),
                ));
            }
            let database = db::database(&self.0.env)?;
            db::batch(&database, &statements).await?;
            self.0.storage.delete_multiple(keys).await?;
        }
    }
}
