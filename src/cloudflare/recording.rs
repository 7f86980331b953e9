//! Writes a call's recording to R2 as the call goes. The call machine hands out settled
//! stereo PCM (`Action::RecordingData`); a task of its own cuts it into parts
//! (`crate::recording::Parts`) and uploads each full part at once, so the relay never waits
//! on R2. Part 1 carries the WAV header, which needs the final length: it is kept and goes up
//! last, when `Action::RecordingDone` (or the pump stopping without one) completes the
//! upload. A call shorter than one part is a single `put`. Then the key, duration and size go
//! to the call's row through the outbox.
//!
//! Memory per call: part 1 and the part being sent or filled (each at most 5 MiB). A part is
//! streamed to R2 in 64 KiB pieces (a `FixedLengthStream`), never copied whole, and can be
//! sent again if R2 fails; audio waiting for a slow writer is capped (then left out as silence).

use super::log;
use super::outbox::Outbox;
use crate::recording::{self, Part, Parts, BYTES_PER_MS};
use crate::store::Record;
use futures::channel::mpsc::{self, UnboundedReceiver, UnboundedSender};
use futures::StreamExt;
use serde_json::json;
use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;
use worker::{Bucket, Delay, Env, FixedLengthStream, HttpMetadata, MultipartUpload, UploadedPart};

/// The bucket's binding in wrangler.toml.
pub const BINDING: &str = "RECORDINGS";
pub const CONTENT_TYPE: &str = "audio/wav";
/// R2's minimum; every part but the last has exactly this size.
const PART_BYTES: usize = recording::MIN_PART_BYTES;
/// Tries of each R2 call.
const ATTEMPTS: u32 = 3;
/// Pieces a part is streamed in.
const STREAM_CHUNK: usize = 64 * 1024;
/// Audio waiting for the writer (R2 slow or stuck) beyond this is replaced by its length
/// of silence, so the queue stays bounded and the file stays aligned.
const MAX_QUEUED_BYTES: usize = 2 * 1024 * 1024;

enum Msg {
    Data(Vec<u8>),
    /// This many bytes of PCM were left out: write silence instead.
    Silence(u64),
    Done {
        duration_ms: u64,
    },
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
    left_out: u64,
}

impl Recording {
    pub fn new(env: &Env, call_sid: &str, outbox: Outbox) -> Self {
        Self {
            call_sid: call_sid.to_owned(),
            bucket: env.bucket(BINDING).ok(),
            outbox,
            tx: None,
            finished: false,
            queued: Rc::new(Cell::new(0)),
            left_out: 0,
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
        let Some(tx) = &self.tx else { return };
        if self.queued.get() + pcm.len() > MAX_QUEUED_BYTES {
            if self.left_out == 0 {
                log(
                    "warn",
                    "recording.writer_behind",
                    json!({ "call_sid": self.call_sid, "queued_bytes": self.queued.get() }),
                );
            }
            self.left_out += pcm.len() as u64;
            let _ = tx.unbounded_send(Msg::Silence(pcm.len() as u64));
            return;
        }
        self.queued.set(self.queued.get() + pcm.len());
        let _ = tx.unbounded_send(Msg::Data(pcm));
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
            let _ = tx.unbounded_send(Msg::Done { duration_ms });
        }
        self.finished = true;
    }

    /// The pump stopped. A recording that was started and not completed is completed now
    /// with what it has, so even a call cut short leaves a playable file.
    pub fn close(&mut self) {
        // Dropping the sender ends the writer's input; it completes the upload.
        self.tx = None;
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
        let writer = Writer {
            key: recording::key(&self.call_sid),
            call_sid: self.call_sid.clone(),
            bucket,
            upload: None,
            uploaded: Vec::new(),
            queued: self.queued.clone(),
        };
        let outbox = self.outbox.clone();
        worker::wasm_bindgen_futures::spawn_local(writer.run(rx, outbox));
    }
}

struct Writer {
    key: String,
    call_sid: String,
    bucket: Bucket,
    upload: Option<MultipartUpload>,
    uploaded: Vec<UploadedPart>,
    queued: Rc<Cell<usize>>,
}

fn metadata() -> HttpMetadata {
    HttpMetadata {
        content_type: Some(CONTENT_TYPE.into()),
        ..HttpMetadata::default()
    }
}

impl Writer {
    async fn run(mut self, mut rx: UnboundedReceiver<Msg>, outbox: Outbox) {
        let mut parts = Parts::new(PART_BYTES);
        let mut failure: Option<String> = None;
        let mut duration_ms = None;
        while let Some(msg) = rx.next().await {
            match msg {
                Msg::Data(pcm) => {
                    parts.push(&pcm);
                    self.queued.set(self.queued.get().saturating_sub(pcm.len()));
                    drop(pcm);
                }
                Msg::Silence(bytes) => parts.push_silence(bytes),
                Msg::Done { duration_ms: d } => {
                    duration_ms = Some(d);
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
        let result = match failure {
            Some(e) => Err(e),
            None => self.complete(parts.finish()).await,
        };
        match result {
            Ok(()) => {
                log(
                    "info",
                    "recording.stored",
                    json!({ "call_sid": self.call_sid, "key": self.key, "duration_ms": duration_ms,
                            "bytes": bytes, "cut_short": abnormal }),
                );
                outbox
                    .push(&Record::Recording {
                        call_sid: self.call_sid.clone(),
                        key: self.key.clone(),
                        duration_ms,
                        bytes,
                    })
                    .await;
            }
            Err(e) => {
                log(
                    "error",
                    "recording.failed",
                    json!({ "call_sid": self.call_sid, "key": self.key, "error": e }),
                );
                if let Some(upload) = self.upload.take() {
                    let _ = upload.abort().await;
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
        let bytes = Rc::new(part.bytes);
        let upload = self.multipart().await?;
        let mut last = String::new();
        for attempt in 0..ATTEMPTS {
            backoff(attempt).await;
            match upload.upload_part(number, streamed(&bytes)).await {
                Ok(done) => {
                    self.uploaded.push(done);
                    return Ok(());
                }
                Err(e) => last = format!("upload part {number}: {e}"),
            }
        }
        Err(last)
    }

    async fn complete(&mut self, mut rest: Vec<Part>) -> Result<(), String> {
        if self.upload.is_none() && rest.len() == 1 {
            // Shorter than one part: a single put.
            let part = rest.pop().expect("one part");
            return self.put(part.bytes).await;
        }
        rest.sort_by_key(|p| p.number);
        for part in rest {
            self.upload_part(part).await?;
        }
        let upload = self.upload.take().ok_or("no multipart upload")?;
        let mut parts = std::mem::take(&mut self.uploaded);
        parts.sort_by_key(|p| p.part_number());
        upload
            .complete(parts)
            .await
            .map(|_| ())
            .map_err(|e| format!("complete: {e}"))
    }

    async fn put(&self, bytes: Vec<u8>) -> Result<(), String> {
        let bytes = Rc::new(bytes);
        let mut last = String::new();
        for attempt in 0..ATTEMPTS {
            backoff(attempt).await;
            match self
                .bucket
                .put(self.key.clone(), streamed(&bytes))
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

/// `bytes` as a stream of known length, in pieces: R2 takes it without a whole copy.
fn streamed(bytes: &Rc<Vec<u8>>) -> FixedLengthStream {
    let len = bytes.len() as u64;
    let bytes = bytes.clone();
    let pieces = futures::stream::unfold(0usize, move |at| {
        let bytes = bytes.clone();
        async move {
            (at < bytes.len()).then(|| {
                let end = (at + STREAM_CHUNK).min(bytes.len());
                (Ok(bytes[at..end].to_vec()), end)
            })
        }
    });
    FixedLengthStream::wrap(pieces, len)
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
    use super::admin::failed;
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
    let get = bucket.get(key);
    let get = match range {
        Some(r) => get.range(worker::Range::OffsetWithLength {
            offset: r.start,
            length: r.len(),
        }),
        None => get,
    };
    let object = get
        .execute()
        .await
        .map_err(failed("recording get"))?
        .ok_or(Error::NotFound("the recording is gone".into()))?;
    let body = object
        .body()
        .ok_or(Error::Internal)?
        .response_body()
        .map_err(failed("recording body"))?;
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
    Ok(builder.body(body))
}
