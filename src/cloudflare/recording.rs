//! Writes a call's recording to R2 as the call goes. The call machine hands out settled
//! stereo μ-law (`Action::RecordingData`); a task of its own cuts it into parts
//! (`crate::recording::Parts`) and uploads each full part at once, so the relay never waits
//! on R2. Part 1 carries the WAV header, which needs the final length: it goes up last,
//! when `Action::RecordingDone` (or the pump stopping without one) completes the upload. A
//! call shorter than one part is a single `put`. Then the key, duration and size go to the
//! call's row through the outbox.
//!
//! Part 1 is not held until then: its audio is in the checkpoints (below). Once part 1 is
//! full and every checkpoint of its audio is written (`crate::recording::FirstPart`, told by
//! each checkpoint's write as it lands), it leaves memory; at the end, after the other parts
//! are up, it is read back from the checkpoints (the final header, then its audio, the last
//! checkpoint only in part) and uploaded before the upload is completed. If a checkpoint of
//! its audio could not be written, part 1 stays in memory to the end instead; if it cannot be
//! read back, the live upload is given up and the recovery below stores the file whole.
//!
//! Memory per call, in the writer: one part (at most 5 MiB: part 1 until its checkpoints are
//! written, a few seconds after it fills, then the part being filled or sent) and at most
//! [`MAX_QUEUED_BYTES`] (2 MiB) waiting for a slow writer, so about 7 MiB however long the
//! call (it was 12), and the same at its end, where the last part goes up before part 1 is
//! read back.
//! Part 1 and the part after it (up to 12 MiB with the queue) are held together only while
//! part 1's checkpoint writes have not landed, or to the end if one of them failed. Parts are
//! held in pieces of 64 KiB that are allocated once each (no buffer grows by copying). A part
//! is streamed to R2 piece by piece (a `FixedLengthStream`), never copied whole, and can be
//! sent again if R2 fails. Audio waiting for a slow writer is capped: past the cap the live
//! upload is given up (aborted, never completed with a hole) and the recovery below rebuilds
//! the file from the checkpoints.
//!
//! The audio is also checkpointed in the call object's storage, 5 s at a time (one write, not
//! waited for) and its tail when the recording completes, and the checkpoints are deleted
//! once the recording is stored. An
//! object that restarted mid-call (a deploy) or whose upload failed finds them ([`recover`]),
//! and uploads the recording from them: the call keeps its audio up to the restart. That
//! upload, too, lets part 1 go once it is full and reads it back at the end. Each checkpoint's
//! key says where its audio starts; where one is missing (its write failed), checkpoint 0
//! included, the upload puts silence of its length (`crate::recording::Refill`), so the audio
//! after it keeps its place.

use super::log;
use super::outbox::Outbox;
use crate::recording::{
    self, Clearing, Feed, FirstPart, Leftover, LiveUpload, Part, Parts, Place, Recovery, Refill,
    BYTES_PER_MS,
};
use crate::store::Record;
use futures::channel::mpsc::{self, UnboundedReceiver, UnboundedSender};
use futures::StreamExt;
use serde_json::json;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;
use worker::wasm_bindgen::JsCast;
use worker::{
    js_sys, wasm_bindgen::JsValue, Bucket, Delay, Env, FixedLengthStream, HttpMetadata,
    ListOptions, MultipartUpload, Storage, UploadedPart,
};

/// The bucket's binding in wrangler.toml.
pub const BINDING: &str = "RECORDINGS";
pub const CONTENT_TYPE: &str = "audio/wav";
/// R2's minimum; every part but the last has exactly this size.
const PART_BYTES: usize = recording::MIN_PART_BYTES;
/// Tries of each R2 call.
const ATTEMPTS: u32 = 3;
use recording::MAX_QUEUED_BYTES;
/// When a failed upload is tried again from the checkpoints.
const RETRY_AFTER: Duration = Duration::from_secs(60);
/// Checkpoints read at once when uploading from them.
const READ_BATCH: usize = 16;
/// Checkpoints read at once when making part 1 again (a few: each is 160 KB, read while the
/// part being made is held).
const REBUILD_BATCH: usize = 4;
/// Keys deleted at once (the storage API's limit).
const DELETE_BATCH: usize = recording::DELETE_LIMIT;

enum Msg {
    Data(Vec<u8>),
    Done {
        duration_ms: u64,
    },
    /// The audio could not be read back, or the live upload fell behind: the upload fails
    /// and the checkpoints stay, for a recovery to store the file whole from them.
    Abort(String),
}

/// The call object's side of its recording: its storage (the checkpoints) and whether a
/// writer of this instance is at work (true until it has stored the recording or failed).
#[derive(Clone)]
pub struct Keep {
    pub storage: Rc<Storage>,
    pub busy: Rc<Cell<bool>>,
}

/// The pump's end of one call's recording.
pub struct Recording {
    call_sid: String,
    bucket: Option<Bucket>,
    outbox: Outbox,
    tx: Option<UnboundedSender<Msg>>,
    finished: bool,
    /// Bytes sent to the writer and not yet taken in (shared with it).
    queued: Rc<Cell<usize>>,
    live: LiveUpload,
    keep: Keep,
    /// Number of the next checkpoint.
    checkpoints: u64,
    /// Bytes of audio checkpointed so far (written or not): where the next checkpoint starts.
    checkpointed: u64,
    /// Audio not checkpointed yet (less than [`recording::CHECKPOINT_BYTES`]).
    unsaved: Vec<u8>,
    /// Which checkpoints hold part 1's audio and whether they are written (shared with the
    /// writer, which drops part 1 from memory once they all are).
    first: Rc<RefCell<FirstPart>>,
    /// The key of every checkpoint taken, in order (shared with the writer, which deletes
    /// them by key once the recording is stored).
    written: Rc<RefCell<Vec<String>>>,
}

impl Recording {
    pub fn new(env: &Env, call_sid: &str, outbox: Outbox, keep: Keep) -> Self {
        Self {
            call_sid: call_sid.to_owned(),
            bucket: env.bucket(BINDING).ok(),
            outbox,
            tx: None,
            finished: false,
            queued: Rc::new(Cell::new(0)),
            live: LiveUpload::default(),
            keep,
            checkpoints: 0,
            checkpointed: 0,
            unsaved: Vec::new(),
            first: Rc::new(RefCell::new(FirstPart::new(PART_BYTES))),
            written: Rc::default(),
        }
    }

    /// Keeps a copy of the audio not checkpointed yet in the object's storage. Not waited for,
    /// and without holding the object's outgoing messages (`allowUnconfirmed`): the audio path
    /// never waits on it. How the write went is told to [`FirstPart`]: part 1 leaves memory
    /// only once every checkpoint of its audio is written.
    fn save_unsaved(&mut self) {
        if self.unsaved.is_empty() {
            return;
        }
        let seq = self.checkpoints;
        let key = recording::checkpoint_key(seq, self.checkpointed);
        self.checkpoints += 1;
        self.checkpointed += self.unsaved.len() as u64;
        self.first.borrow_mut().taken(seq, self.unsaved.len());
        self.written.borrow_mut().push(key.clone());
        let value = js_sys::Uint8Array::from(&self.unsaved[..]);
        self.unsaved.clear();
        let call_sid = self.call_sid.clone();
        let first = self.first.clone();
        match put_unconfirmed(&self.keep.storage, &key, &value) {
            Ok(done) => worker::wasm_bindgen_futures::spawn_local(async move {
                match worker::wasm_bindgen_futures::JsFuture::from(done).await {
                    Ok(_) => first.borrow_mut().written(seq),
                    Err(e) => checkpoint_failed(&call_sid, &first, seq, &key, &format!("{e:?}")),
                }
            }),
            Err(e) => checkpoint_failed(&call_sid, &first, seq, &key, &format!("{e:?}")),
        }
    }

    /// More of the recording, in order.
    pub fn data(&mut self, pcm: Vec<u8>) {
        if self.finished {
            return;
        }
        if self.tx.is_none() {
            self.start();
        }
        if self.tx.is_none() {
            return; // no bucket: nothing is recorded
        }
        self.unsaved.extend_from_slice(&pcm);
        if self.unsaved.len() >= recording::CHECKPOINT_BYTES {
            self.save_unsaved();
        }
        let tx = self.tx.as_ref().expect("started above");
        match self.live.offer(self.queued.get(), pcm.len()) {
            Feed::Send => {
                self.queued.set(self.queued.get() + pcm.len());
                let _ = tx.unbounded_send(Msg::Data(pcm));
            }
            Feed::Abandon => {
                let why = format!(
                    "the writer fell {} bytes behind: the live upload is given up, to be \
                     stored from the checkpoints",
                    self.queued.get()
                );
                log(
                    "warn",
                    "recording.writer_behind",
                    json!({ "call_sid": self.call_sid, "queued_bytes": self.queued.get(),
                            "rebuild_from": "checkpoints" }),
                );
                let _ = tx.unbounded_send(Msg::Abort(why));
            }
            Feed::Skip => {}
        }
    }

    /// The recording is complete.
    pub fn done(&mut self, duration_ms: u64) {
        if self.finished {
            return;
        }
        if self.tx.is_none() {
            // A recording with no audio at all (the call ended as the stream started).
            self.start();
        }
        if let Some(tx) = self.tx.take() {
            // The tail too: should the upload fail, its retry has the whole recording.
            self.save_unsaved();
            let _ = tx.unbounded_send(Msg::Done { duration_ms });
        }
        self.finished = true;
    }

    /// The pump stopped. A recording that was started and not completed is completed now
    /// with what it has, so even a call cut short leaves a playable file.
    pub fn close(&mut self) {
        // Dropping the sender ends the writer's input; it completes the upload.
        if self.tx.take().is_some() {
            self.save_unsaved();
        }
        self.finished = true;
    }

    fn start(&mut self) {
        let Some(bucket) = self.bucket.clone() else {
            log(
                "error",
                "recording.no_bucket",
                json!({ "call_sid": self.call_sid, "binding": BINDING }),
            );
            self.finished = true;
            return;
        };
        let (tx, rx) = mpsc::unbounded();
        self.tx = Some(tx);
        let mut writer = Writer::new(
            &self.call_sid,
            bucket,
            self.queued.clone(),
            self.keep.clone(),
            self.first.clone(),
        );
        writer.written = Some(self.written.clone());
        let outbox = self.outbox.clone();
        worker::wasm_bindgen_futures::spawn_local(writer.run(rx, outbox));
    }
}

fn checkpoint_failed(call_sid: &str, first: &RefCell<FirstPart>, seq: u64, key: &str, error: &str) {
    // Part 1 cannot be made again from the checkpoints: it stays in memory to the end.
    let first_part_kept = first.borrow_mut().lost(seq);
    log(
        "warn",
        "recording.checkpoint_failed",
        json!({ "call_sid": call_sid, "key": key, "error": error,
                "first_part_kept": first_part_kept }),
    );
}

/// `storage.put(key, value, { allowUnconfirmed: true })`, which workers-rs does not offer.
fn put_unconfirmed(
    storage: &Storage,
    key: &str,
    value: &JsValue,
) -> Result<js_sys::Promise, JsValue> {
    let raw: &JsValue = storage.as_raw().as_ref();
    let put: js_sys::Function = js_sys::Reflect::get(raw, &"put".into())?.into();
    let options = js_sys::Object::new();
    js_sys::Reflect::set(&options, &"allowUnconfirmed".into(), &JsValue::TRUE)?;
    put.call3(raw, &key.into(), value, &options)?.dyn_into()
}

/// Up to `limit` checkpoints (keys and values), in order, from the `from`th on.
async fn list_checkpoints(
    storage: &Storage,
    from: u64,
    limit: usize,
) -> worker::Result<js_sys::Map> {
    let start = recording::checkpoint_from(from);
    storage
        .list_with_options(
            ListOptions::new()
                .prefix(recording::CHECKPOINT_PREFIX)
                .start(&start)
                .limit(limit),
        )
        .await
}

/// One entry of a listing of checkpoints as its id and its audio, μ-law whatever form it was
/// kept in ([`recording::checkpoint_audio`]); `None` for a key that is not a checkpoint's.
fn checkpoint_entry(value: &JsValue, key: &JsValue) -> Option<(recording::CheckpointId, Vec<u8>)> {
    recording::checkpoint_audio(&key.as_string()?, js_sys::Uint8Array::new(value).to_vec())
}

/// Up to `limit` checkpoints from number `from` on, in order: (id, audio).
async fn read_checkpoints(
    storage: &Storage,
    from: u64,
    limit: usize,
) -> worker::Result<Vec<(recording::CheckpointId, Vec<u8>)>> {
    let map = list_checkpoints(storage, from, limit).await?;
    let mut out = Vec::new();
    map.for_each(&mut |value, key| out.extend(checkpoint_entry(&value, &key)));
    out.sort_by_key(|(id, _)| id.seq);
    Ok(out)
}

/// True when the object holds checkpoints (of a recording not stored yet, or left by a
/// clean-up that was cut off).
pub async fn has_checkpoints(storage: &Storage) -> worker::Result<bool> {
    Ok(list_checkpoints(storage, 0, 1).await?.size() > 0)
}

/// The number and offset of the lowest checkpoint the object holds, if any.
async fn first_checkpoint(storage: &Storage) -> worker::Result<Option<recording::CheckpointId>> {
    let map = list_checkpoints(storage, 0, 1).await?;
    let mut first = None;
    map.for_each(&mut |_, key| {
        first = key
            .as_string()
            .as_deref()
            .and_then(recording::checkpoint_id);
    });
    Ok(first)
}

/// Deletes every checkpoint with the count of upload tries and the stored marker, and returns
/// how many checkpoints a listing found. `written`: the keys of a live upload's checkpoints,
/// deleted by key after the marker, however few, so they are not listed: a listing reads
/// their audio too, the whole recording, to learn keys the recording already has (a
/// listing after finds none, unless the object held others). Without them (a recovery's, or
/// checkpoints given up), in one deletion, which lands whole or not at all, when they fit in
/// one ([`recording::clearing`]); else in batches. The count and the marker go last,
/// together, so a deletion cut off partway still reads as stored (or given up). `stored`:
/// the recording is stored, and the marker goes first when the deletion takes more than one
/// step.
async fn clear_checkpoints(
    storage: &Storage,
    stored: bool,
    written: &[String],
) -> worker::Result<usize> {
    if written.is_empty() {
        let mut keys = checkpoint_keys(storage, recording::CLEAR_LISTING).await?;
        if recording::clearing(keys.len()) == Clearing::AtOnce {
            let listed = keys.len();
            keys.push(recording::CHECKPOINT_TRIES_KEY.into());
            keys.push(recording::CHECKPOINT_STORED_KEY.into());
            storage.delete_multiple(keys).await?;
            return Ok(listed);
        }
    }
    if stored {
        storage.put(recording::CHECKPOINT_STORED_KEY, true).await?;
    }
    for batch in written.chunks(DELETE_BATCH) {
        storage.delete_multiple(batch.to_vec()).await?;
    }
    let mut listed = 0;
    loop {
        let keys = checkpoint_keys(storage, DELETE_BATCH).await?;
        if keys.is_empty() {
            break;
        }
        listed += keys.len();
        storage.delete_multiple(keys).await?;
    }
    storage
        .delete_multiple(vec![
            recording::CHECKPOINT_TRIES_KEY.to_owned(),
            recording::CHECKPOINT_STORED_KEY.to_owned(),
        ])
        .await?;
    Ok(listed)
}

/// The keys of the first `limit` checkpoints.
async fn checkpoint_keys(storage: &Storage, limit: usize) -> worker::Result<Vec<String>> {
    let map = list_checkpoints(storage, 0, limit).await?;
    Ok(map
        .keys()
        .into_iter()
        .filter_map(|k| k.ok()?.as_string())
        .collect())
}

/// Uploads the recording kept in the object's checkpoints, when there are some and no writer
/// of this instance is at work: the pump that recorded them is gone (the object restarted
/// mid-call), or its upload failed. Checkpoints of a recording already stored, or that do not
/// start at its start and whose keys do not say where they start, are only deleted
/// ([`recording::recovery`]). A checkpoint missing, the first one included, is silence of its
/// length ([`recording::Refill`]). Each try is counted; after
/// [`recording::CHECKPOINT_UPLOAD_TRIES`] the checkpoints are dropped. Returns at once: the
/// upload goes on in a task of its own, and a failure sets the object's alarm to try again.
pub async fn recover(env: &Env, call_sid: &str, outbox: Outbox, keep: Keep) -> worker::Result<()> {
    if keep.busy.get() {
        return Ok(());
    }
    let Some(first) = first_checkpoint(&keep.storage).await? else {
        return Ok(());
    };
    let stored = keep
        .storage
        .get::<bool>(recording::CHECKPOINT_STORED_KEY)
        .await?
        .unwrap_or(false);
    let tries = keep
        .storage
        .get::<u32>(recording::CHECKPOINT_TRIES_KEY)
        .await?
        .unwrap_or(0);
    let attempt = match recording::recovery(stored, first, tries) {
        Recovery::Upload { attempt } => attempt,
        Recovery::Clear(why) => {
            let (level, event) = match why {
                Leftover::Stored => ("info", "recording.leftover_checkpoints_cleared"),
                Leftover::Partial { .. } => ("error", "recording.partial_checkpoints_dropped"),
                Leftover::Abandoned { .. } => ("error", "recording.abandoned"),
            };
            log(
                level,
                event,
                json!({ "call_sid": call_sid, "reason": format!("{why:?}") }),
            );
            return clear_checkpoints(&keep.storage, false, &[])
                .await
                .map(|_| ());
        }
    };
    let Ok(bucket) = env.bucket(BINDING) else {
        log(
            "error",
            "recording.no_bucket",
            json!({ "call_sid": call_sid, "binding": BINDING }),
        );
        return Ok(());
    };
    keep.storage
        .put(recording::CHECKPOINT_TRIES_KEY, attempt)
        .await?;
    // Should the object be restarted while this upload runs (a deploy, an eviction), an
    // alarm brings it back to try again (the tries above bound that): with none pending,
    // nothing else would, and the checkpoints would stay unstored for good.
    if keep.storage.get_alarm().await?.is_none() {
        keep.storage.set_alarm(RETRY_AFTER).await?;
    }
    log(
        "info",
        "recording.recovering",
        json!({ "call_sid": call_sid, "try": attempt }),
    );
    let queued = Rc::new(Cell::new(0));
    let (tx, rx) = mpsc::unbounded();
    // Every checkpoint read is written: part 1 leaves memory here too once it is full, and is
    // read again at the end.
    let first = Rc::new(RefCell::new(FirstPart::new(PART_BYTES)));
    // Where each checkpoint goes, silence for any missing (shared with the writer, whose
    // log line says what was filled).
    let refill = Rc::new(RefCell::new(Refill::new()));
    let mut writer = Writer::new(
        call_sid,
        bucket,
        queued.clone(),
        keep.clone(),
        first.clone(),
    );
    writer.refill = Some(refill.clone());
    worker::wasm_bindgen_futures::spawn_local(writer.run(rx, outbox));
    // The checkpoints are read a few at a time, as fast as the writer takes them in.
    let storage = keep.storage.clone();
    let call_sid = call_sid.to_owned();
    worker::wasm_bindgen_futures::spawn_local(async move {
        let send = |pcm: Vec<u8>| {
            queued.set(queued.get() + pcm.len());
            let _ = tx.unbounded_send(Msg::Data(pcm));
        };
        loop {
            writer_caught_up(&queued).await;
            let from = refill.borrow().from();
            let batch = match read_checkpoints(&storage, from, READ_BATCH).await {
                Ok(b) => b,
                Err(e) => {
                    let _ = tx.unbounded_send(Msg::Abort(format!("read checkpoints: {e}")));
                    return;
                }
            };
            if batch.is_empty() {
                return; // the end of the audio: dropping the sender completes the upload
            }
            for (id, pcm) in batch {
                let place = refill
                    .borrow_mut()
                    .push(id, pcm.len(), &mut first.borrow_mut());
                match place {
                    Place::Next => {}
                    Place::AfterGap(gap) => {
                        let mut fields = gap_json(&gap);
                        fields["call_sid"] = json!(call_sid);
                        log("warn", "recording.checkpoint_gap", fields);
                        // Silence a checkpoint at a time, at the writer's pace.
                        let mut left = gap.bytes;
                        while left > 0 {
                            writer_caught_up(&queued).await;
                            let n = left.min(recording::CHECKPOINT_BYTES as u64);
                            send(vec![recording::SILENCE; n as usize]);
                            left -= n;
                        }
                    }
                    Place::Late { by } => log(
                        "warn",
                        "recording.checkpoint_misplaced",
                        json!({ "call_sid": call_sid, "seq": id.seq, "late_bytes": by }),
                    ),
                    Place::Repeat => continue,
                }
                send(pcm);
            }
        }
    });
    Ok(())
}

/// Waits until the writer has taken in all but [`MAX_QUEUED_BYTES`] of what it was sent.
async fn writer_caught_up(queued: &Cell<usize>) {
    while queued.get() > MAX_QUEUED_BYTES {
        Delay::from(Duration::from_millis(20)).await;
    }
}

/// A gap the recovery filled with silence, for the logs.
fn gap_json(gap: &recording::Gap) -> serde_json::Value {
    json!({
        "missing": gap.missing.clone().collect::<Vec<_>>(),
        "at_ms": gap.at / BYTES_PER_MS,
        "silence_ms": gap.bytes / BYTES_PER_MS,
        "silence_bytes": gap.bytes,
        "length": if gap.estimated { "estimated" } else { "exact" },
    })
}

struct Writer {
    key: String,
    call_sid: String,
    bucket: Bucket,
    upload: Option<MultipartUpload>,
    uploaded: Vec<UploadedPart>,
    queued: Rc<Cell<usize>>,
    keep: Keep,
    first: Rc<RefCell<FirstPart>>,
    /// A recovery's reading of the checkpoints: the gaps it filled with silence.
    refill: Option<Rc<RefCell<Refill>>>,
    /// A live upload's checkpoints, by key (see [`Recording`]); a recovery lists them.
    written: Option<Rc<RefCell<Vec<String>>>>,
}

fn metadata() -> HttpMetadata {
    HttpMetadata {
        content_type: Some(CONTENT_TYPE.into()),
        ..HttpMetadata::default()
    }
}

impl Writer {
    fn new(
        call_sid: &str,
        bucket: Bucket,
        queued: Rc<Cell<usize>>,
        keep: Keep,
        first: Rc<RefCell<FirstPart>>,
    ) -> Self {
        keep.busy.set(true);
        Self {
            key: recording::key(call_sid),
            call_sid: call_sid.to_owned(),
            bucket,
            upload: None,
            uploaded: Vec::new(),
            queued,
            keep,
            first,
            refill: None,
            written: None,
        }
    }

    /// The gaps in the checkpoints filled with silence, for the stored recording's log line
    /// (none in a live upload: it has all the audio).
    fn checkpoint_gaps(&self) -> serde_json::Value {
        let Some(refill) = &self.refill else {
            return json!([]);
        };
        let gaps = refill.borrow();
        gaps.gaps().iter().map(gap_json).collect()
    }

    async fn run(mut self, rx: UnboundedReceiver<Msg>, outbox: Outbox) {
        self.store(rx, outbox).await;
        self.keep.busy.set(false);
    }

    async fn store(&mut self, mut rx: UnboundedReceiver<Msg>, outbox: Outbox) {
        let mut parts = Parts::new(PART_BYTES);
        let mut failure: Option<String> = None;
        let mut duration_ms = None;
        while let Some(msg) = rx.next().await {
            match msg {
                Msg::Data(pcm) => {
                    parts.push(&pcm);
                    self.queued.set(self.queued.get().saturating_sub(pcm.len()));
                    drop(pcm);
                    if !parts.first_released() && parts.release_first(&self.first.borrow()) {
                        log(
                            "info",
                            "recording.first_part_released",
                            json!({ "call_sid": self.call_sid, "bytes": PART_BYTES }),
                        );
                    }
                }
                Msg::Done { duration_ms: d } => {
                    duration_ms = Some(d);
                    break;
                }
                Msg::Abort(e) => {
                    failure.get_or_insert(e);
                    break;
                }
            }
            while let Some(part) = parts.poll_part() {
                if failure.is_none() {
                    if let Err(e) = self.upload_part(part).await {
                        failure = Some(e);
                    }
                }
            }
        }
        let abnormal = duration_ms.is_none();
        let duration_ms = duration_ms.unwrap_or(parts.data_bytes() / BYTES_PER_MS);
        let bytes = parts.file_bytes();
        let rebuilt = parts.first_released();
        let rebuild_from = rebuilt.then_some(parts.data_bytes());
        let result = match failure {
            Some(e) => Err(e),
            None => self.complete(parts.finish(), rebuild_from).await,
        };
        match result {
            Ok(()) => {
                log(
                    "info",
                    "recording.stored",
                    json!({ "call_sid": self.call_sid, "key": self.key, "duration_ms": duration_ms,
                            "bytes": bytes, "cut_short": abnormal,
                            "first_part_from_checkpoints": rebuilt,
                            "checkpoint_gaps": self.checkpoint_gaps() }),
                );
                // Kept (tried until it is) before the checkpoints go: a restart until then
                // stores the file again from them.
                let link = Record::Recording {
                    call_sid: self.call_sid.clone(),
                    key: self.key.clone(),
                    duration_ms,
                    bytes,
                };
                outbox.keep(&link, "the recording's link").await;
                // Stored: the copies in the object's storage have served their purpose. In
                // one deletion, or else the marker first, so that if the deletion stops
                // partway the checkpoints left (the recording's end) are only deleted later,
                // never uploaded over the file. Without it they all stay: a recovery stores
                // the same file again.
                let written = self.written.as_ref().map(|w| w.take()).unwrap_or_default();
                let cleared = clear_checkpoints(&self.keep.storage, true, &written).await;
                // By key, a listing after finds nothing, unless the object held others.
                let others = *cleared.as_ref().unwrap_or(&0);
                if !written.is_empty() && others > 0 {
                    log(
                        "warn",
                        "recording.other_checkpoints_cleared",
                        json!({ "call_sid": self.call_sid, "written": written.len(),
                                "others": others }),
                    );
                }
                if let Err(e) = cleared {
                    log(
                        "warn",
                        "recording.checkpoints_not_cleared",
                        json!({ "call_sid": self.call_sid, "error": e.to_string() }),
                    );
                }
            }
            Err(e) => {
                log(
                    "error",
                    "recording.failed",
                    json!({ "call_sid": self.call_sid, "key": self.key, "error": e,
                            "retry_in_s": RETRY_AFTER.as_secs() }),
                );
                if let Some(upload) = self.upload.take() {
                    let _ = upload.abort().await;
                }
                // The checkpoints stay; the object's alarm tries again from them.
                if let Err(e) = self.keep.storage.set_alarm(RETRY_AFTER).await {
                    log(
                        "error",
                        "recording.retry_not_set",
                        json!({ "call_sid": self.call_sid, "error": e.to_string() }),
                    );
                }
            }
        }
    }

    async fn multipart(&mut self) -> Result<&MultipartUpload, String> {
        if self.upload.is_none() {
            let mut last = String::new();
            for attempt in 0..ATTEMPTS {
                backoff(attempt).await;
                match self
                    .bucket
                    .create_multipart_upload(self.key.clone())
                    .http_metadata(metadata())
                    .execute()
                    .await
                {
                    Ok(u) => {
                        self.upload = Some(u);
                        break;
                    }
                    Err(e) => last = format!("create multipart upload: {e}"),
                }
            }
            if self.upload.is_none() {
                return Err(last);
            }
        }
        Ok(self.upload.as_ref().expect("just created"))
    }

    async fn upload_part(&mut self, part: Part) -> Result<(), String> {
        let number = part.number;
        let pieces = Rc::new(part.pieces);
        let upload = self.multipart().await?;
        let mut last = String::new();
        for attempt in 0..ATTEMPTS {
            backoff(attempt).await;
            match upload.upload_part(number, streamed(&pieces)).await {
                Ok(done) => {
                    self.uploaded.push(done);
                    return Ok(());
                }
                Err(e) => last = format!("upload part {number}: {e}"),
            }
        }
        Err(last)
    }

    /// Uploads the parts not sent yet and completes the upload. `rebuild_first` (the
    /// recording's data length) when part 1 left memory: it is read back from the checkpoints
    /// once the other parts are up (and their memory free), then uploaded; any failure to
    /// read it fails the upload, never completes it without a right part 1.
    async fn complete(
        &mut self,
        mut rest: Vec<Part>,
        rebuild_first: Option<u64>,
    ) -> Result<(), String> {
        if rebuild_first.is_none() && self.upload.is_none() && rest.len() == 1 {
            // Shorter than one part: a single put.
            let part = rest.pop().expect("one part");
            return self.put(part.pieces).await;
        }
        rest.sort_by_key(|p| p.number);
        for part in rest {
            self.upload_part(part).await?;
        }
        if let Some(data_bytes) = rebuild_first {
            let first = self.read_first_part(data_bytes).await?;
            if self.upload.is_none() {
                // Exactly one part long: a single put, as for a shorter call.
                return self.put(first.pieces).await;
            }
            self.upload_part(first).await?;
        }
        let upload = self.upload.take().ok_or("no multipart upload")?;
        let upload_id = upload.upload_id().await;
        let mut parts = std::mem::take(&mut self.uploaded);
        parts.sort_by_key(|p| p.part_number());
        let Err(e) = upload.complete(parts).await else {
            return Ok(());
        };
        // `complete` took the upload: it is aborted by its id, as any failed one is (the
        // retry from the checkpoints opens another), rather than left open for days.
        if let Ok(open) = self.bucket.resume_multipart_upload(&self.key, upload_id) {
            let _ = open.abort().await;
        }
        Err(format!("complete: {e}"))
    }

    /// Part 1 made again from the checkpoints ([`recording::Rebuild`]): the final header, then
    /// each checkpoint of its audio, the last one only up to the part's end.
    async fn read_first_part(&self, data_bytes: u64) -> Result<Part, String> {
        let failed = |e: recording::RebuildError| format!("part 1 from the checkpoints: {e}");
        let mut rebuild = self.first.borrow().rebuild(data_bytes).map_err(failed)?;
        while let Some(from) = rebuild.wants() {
            let map = list_checkpoints(&self.keep.storage, from, REBUILD_BATCH)
                .await
                .map_err(|e| format!("read checkpoints for part 1: {e}"))?;
            if map.size() == 0 {
                break; // finish says which one is missing
            }
            let mut pushed = Ok(());
            map.for_each(&mut |value, key| {
                if pushed.is_err() || rebuild.wants().is_none() {
                    return;
                }
                if let Some((id, audio)) = checkpoint_entry(&value, &key) {
                    pushed = rebuild.push(id.seq, &audio);
                }
            });
            pushed.map_err(failed)?;
        }
        rebuild.finish().map_err(failed)
    }

    async fn put(&self, pieces: Vec<Vec<u8>>) -> Result<(), String> {
        let pieces = Rc::new(pieces);
        let mut last = String::new();
        for attempt in 0..ATTEMPTS {
            backoff(attempt).await;
            match self
                .bucket
                .put(self.key.clone(), streamed(&pieces))
                .http_metadata(metadata())
                .execute()
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) => last = format!("put: {e}"),
            }
        }
        Err(last)
    }
}

/// A part's pieces as a stream of known length: R2 takes it piece by piece, without a copy
/// of the whole part, and the pieces stay for another try.
fn streamed(pieces: &Rc<Vec<Vec<u8>>>) -> FixedLengthStream {
    let len = pieces.iter().map(|p| p.len() as u64).sum();
    let pieces = pieces.clone();
    let stream = futures::stream::unfold(0usize, move |at| {
        let pieces = pieces.clone();
        async move { pieces.get(at).map(|piece| (Ok(piece.clone()), at + 1)) }
    });
    FixedLengthStream::wrap(stream, len)
}

async fn backoff(attempt: u32) {
    if attempt > 0 {
        Delay::from(Duration::from_millis(200 << attempt)).await;
    }
}

// ---- serving ---------------------------------------------------------------------------------------

/// The key of `call_sid`'s recording in R2, from its row in D1 (a 404 when the call or its
/// recording is unknown).
pub async fn key_of(
    env: &Env,
    call_sid: &crate::ids::CallSid,
) -> Result<String, crate::admin::Error> {
    use super::admin::failed;
    let db = super::db::database(env).map_err(failed("D1 binding"))?;
    let rows = super::db::query(&db, &crate::admin::select_recording(call_sid))
        .await
        .map_err(failed("find recording"))?;
    crate::admin::recording_key(call_sid, &rows)
}

/// `GET /api/admin/calls/{CallSid}/recording` (already authorized): the WAV from R2, whole
/// or the one byte range asked for, streamed.
pub async fn serve(
    req: &worker::Request,
    env: &Env,
    call_sid: &crate::ids::CallSid,
) -> Result<worker::Response, crate::admin::Error> {
    use super::admin::{failed, internal};
    use crate::admin::{self, Error};
    let key = &key_of(env, call_sid).await?;
    let bucket = env.bucket(BINDING).map_err(failed("R2 binding"))?;
    let head = bucket
        .head(key)
        .await
        .map_err(failed("recording head"))?
        .ok_or_else(|| {
            log(
                "error",
                "recording.missing",
                json!({ "call_sid": call_sid, "key": key }),
            );
            Error::NotFound(format!(
                "the recording of call {:?} is missing from storage",
                call_sid.as_str()
            ))
        })?;
    let size = head.size();
    let header = req.headers().get("Range").map_err(failed("range header"))?;
    let range = admin::byte_range(header.as_deref(), size)?;
    let head_only = req.method() == worker::Method::Head;
    let get = bucket.get(key);
    let get = match range {
        Some(r) => get.range(worker::Range::OffsetWithLength {
            offset: r.start,
            length: r.len(),
        }),
        None => get,
    };
    let body = if head_only {
        None
    } else {
        let object = get
            .execute()
            .await
            .map_err(failed("recording get"))?
            .ok_or(Error::NotFound("the recording is gone".into()))?;
        Some(
            object
                .body()
                .ok_or_else(|| internal("recording body", "the object has no body"))?
                .response_body()
                .map_err(failed("recording body"))?,
        )
    };
    let (status, length) = match range {
        Some(r) => (206, r.len()),
        None => (200, size),
    };
    let header_err = failed("headers");
    let mut builder = worker::ResponseBuilder::new()
        .with_status(status)
        .with_header("Content-Type", CONTENT_TYPE)
        .and_then(|b| b.with_header("Accept-Ranges", "bytes"))
        .and_then(|b| b.with_header("Content-Length", &length.to_string()))
        .and_then(|b| b.with_header("Cache-Control", "private, no-store"))
        .and_then(|b| b.with_header("ETag", &head.http_etag()))
        .and_then(|b| {
            b.with_header(
                "Content-Disposition",
                &format!("inline; filename=\"{}.wav\"", call_sid.as_str()),
            )
        })
        .map_err(header_err)?;
    if let Some(r) = range {
        builder = builder
            .with_header("Content-Range", &r.content_range(size))
            .map_err(failed("headers"))?;
    }
    Ok(match body {
        Some(body) => builder.body(body),
        None => builder.empty(),
    })
}
