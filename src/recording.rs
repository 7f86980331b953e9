//! Call recordings: a stereo WAV (left the caller, right the agent; 8 kHz G.711 μ-law, the
//! bytes both sides carried, not re-encoded) laid out on the call's timeline, in milliseconds
//! from the stream start, with no I/O.
//!
//! - The caller's audio is placed by Twilio's own clock: every `media` frame carries its
//!   `timestamp` (ms from Twilio's stream start), and the first stamped frame ties that
//!   clock to ours (it lands at its arrival; the offset is kept). A frame then sits at its
//!   stamp however late the network brought it: after a stall, TCP delivers the held frames
//!   in a burst, and they, and everything after them, still sit where they were spoken,
//!   against the agent's audio and against OpenAI's input timeline (`audio_start_ms`), which
//!   counts the same frames. Gaps in Twilio's stamps are silence (from half a frame up,
//!   [`STAMP_JITTER_MS`]; less is jitter in the stamps). What is handed out waits up to
//!   [`CALLER_STALL_MS`] for a stalled caller; a frame later than that goes right after
//!   what is placed: kept, and counted as late. A frame whose stamps were placed already
//!   (the same frame delivered again) is left out and counted: kept, it would push all the
//!   caller's audio after it later by its length ([`MAX_REPLAY_BACK_MS`]). (The relay still
//!   passes it to OpenAI, whose input timeline then runs that much ahead of the recording.)
//!   One stamped too far ahead of the clock is left out and counted
//!   ([`MAX_CALLER_AHEAD_MS`]). A frame with no stamp is placed where it arrived: right
//!   after the previous one unless it came later than that by more than
//!   [`CALLER_SLACK_MS`] of jitter, and then the gap is silence.
//! - The agent's audio follows Twilio's playback buffer: a chunk sent at `t` starts at
//!   `max(t, end of what is queued)` and plays at 8 samples per millisecond; a `clear` at `t`
//!   drops everything queued after `t`. The right channel is what the caller heard.
//!
//! [`Recorder`] emits interleaved μ-law only up to the point that can no longer change, so it
//! holds about a second of audio (up to [`MAX_BEHIND_MS`] while the caller's audio is
//! stalled) plus what the agent has queued ahead, however long the call. [`Parts`] cuts
//! that stream into multipart-upload parts (R2: every part but the last of one size, at
//! least 5 MiB). The first one's WAV header needs the final length: it is kept until the
//! end, or, once every checkpoint holding its audio is written ([`FirstPart`]), dropped and
//! rebuilt at the end from those checkpoints ([`Rebuild`]).

use base64::Engine as _;
use std::collections::VecDeque;

pub const SAMPLE_RATE: u32 = 8000;
pub const CHANNELS: u16 = 2;
pub const BITS_PER_SAMPLE: u16 = 8;
/// One stereo sample frame: two μ-law bytes. (Recordings were 16-bit PCM, four bytes a frame,
/// before the change to μ-law: checkpoints of that form are still read, see
/// [`CheckpointId::pcm16`].)
pub const FRAME_BYTES: u64 = 2;
/// 8 kHz: 8 samples (and so 8 μ-law bytes a channel) per millisecond.
pub const SAMPLES_PER_MS: u64 = 8;
/// Stereo μ-law bytes per millisecond: what the recording's data holds of each millisecond.
pub const BYTES_PER_MS: u64 = SAMPLES_PER_MS * FRAME_BYTES;
/// The WAV header: `RIFF`, an 18-byte `fmt ` chunk (a `WAVEFORMATEX`, whose `cbSize` the WAV
/// spec asks of every format but PCM), the `fact` chunk it asks of them too (the length in
/// sample frames), and the `data` chunk's own header. The layout sox and libsndfile write.
pub const HEADER_BYTES: usize = 58;
/// The WAV format tag of G.711 μ-law (`WAVE_FORMAT_MULAW`).
pub const WAVE_FORMAT_MULAW: u16 = 7;
/// Caller frames with no timestamp this much later than the previous frame's end still
/// follow it directly: network jitter, not a gap in the audio.
pub const CALLER_SLACK_MS: u64 = 100;
/// The most after its stamp (on the stream's clock, which starts at Twilio's `start`) the
/// first stamped caller frame is taken to have arrived: one that came later was held up
/// (a retransmit on the new connection, say), and anchoring Twilio's clock to its arrival
/// would place the whole caller channel that much late.
pub const MAX_FIRST_FRAME_DELAY_MS: u64 = 100;
/// A stamp less than this off the end of the previous caller frame is taken as that end:
/// rounding or jitter in the stamps (half a 20 ms frame), not a frame missing, so speech
/// gets no clicks of silence inside it and nothing is counted as late.
pub const STAMP_JITTER_MS: u64 = 10;
/// How long the recording waits for a stalled caller: while no caller audio comes, what is
/// handed out stays this far behind the clock, so frames that TCP held up to this long still
/// land where Twilio's timestamps put them (retransmissions after a lost packet back off to
/// a second or two). Costs only memory while the caller is stalled (this much of each
/// channel, 8 bytes per ms), and bounds how far behind the call the recording is handed out
/// ([`MAX_BEHIND_MS`]).
pub const CALLER_STALL_MS: u64 = 3_000;
/// Audio is handed out in chunks of at least this much (fewer, larger writes)…
pub const EMIT_EVERY_MS: u64 = 1_000;
/// …and at most this much per chunk.
pub const MAX_CHUNK_MS: u64 = 4_000;
/// What the recorder has handed out is never further behind the clock than this, when it is
/// polled as the call goes: it waits [`CALLER_STALL_MS`] at most, then hands out whole
/// chunks of at least [`EMIT_EVERY_MS`].
pub const MAX_BEHIND_MS: u64 = CALLER_STALL_MS + EMIT_EVERY_MS;
/// Agent audio queued further ahead than this is left out of the recording (a runaway
/// response; Twilio would be holding minutes of audio too). Bounds the agent buffer. What
/// is left out still takes its time on the timeline (as silence), so the audio after it
/// sits where it played.
pub const MAX_AGENT_AHEAD_MS: u64 = 2 * 60_000;
/// Caller audio further ahead of the clock than this is left out (a peer flooding frames,
/// or stamping them far in the future).
pub const MAX_CALLER_AHEAD_MS: u64 = 10_000;
/// A caller frame whose stamps lie within those of the stamped frame placed last is one
/// delivered again, and left out, when it goes back no further than this. Twilio's clock
/// only goes forward within a stream; a stamp further back is taken as that clock started
/// again, not as a replay: the frame is kept (after what is placed, counted as late), and so
/// are the frames after it, rather than leaving out the caller's audio until the new clock
/// catches up with the old one.
pub const MAX_REPLAY_BACK_MS: u64 = 10_000;
/// R2's smallest part (every part but the last).
pub const MIN_PART_BYTES: usize = 5 * 1024 * 1024;

/// μ-law silence (decodes to 0): what the recording holds where nobody spoke, or audio is
/// missing.
pub const SILENCE: u8 = 0xFF;

/// Where a call's recording is kept in the bucket.
pub fn key(call_sid: &str) -> String {
    format!("recordings/{call_sid}.wav")
}

// ---- checkpoints ---------------------------------------------------------------------------------

/// A copy of each piece of recorded PCM is kept in the call object's own storage under these
/// keys, in order, until the recording is stored: an object that restarts mid-call (a deploy)
/// loses what it held in memory, and its next instance uploads the recording from them
/// ([`Refill`]: with silence where one is missing).
pub const CHECKPOINT_PREFIX: &str = "rec/";
/// Recorded audio is checkpointed this much at a time (one storage write per 5 s of a call;
/// a restart loses at most this much and what the recorder holds back: about a second, at
/// most [`MAX_BEHIND_MS`]).
pub const CHECKPOINT_EVERY_MS: u64 = 5_000;
/// The same in bytes of stereo PCM.
pub const CHECKPOINT_BYTES: usize = (CHECKPOINT_EVERY_MS * BYTES_PER_MS) as usize;
/// Times an object tries to upload a recording from its checkpoints before it gives up and
/// drops them (R2 refusing for good must not keep the object waking forever).
pub const CHECKPOINT_UPLOAD_TRIES: u32 = 5;
/// Where the count of those tries is kept.
pub const CHECKPOINT_TRIES_KEY: &str = "rec-tries";

/// Written once the recording is stored in full (R2 has the file, the outbox its row), before
/// the checkpoints are deleted in more than one step, and removed last: deleting them can
/// stop partway (a storage error, a restart), and what is left is only the recording's end,
/// which must never be uploaded over the whole file. A live upload's checkpoints are deleted
/// by their keys, after the marker, however few; a recovery's that fit in one deletion with
/// it go in one, atomic, with no marker written ([`clearing`]).
pub const CHECKPOINT_STORED_KEY: &str = "rec-stored";
/// Keys the object's storage deletes in one call (its API's limit).
pub const DELETE_LIMIT: usize = 128;
/// Checkpoints listed to clear them: one more than fit in one deletion with
/// [`CHECKPOINT_TRIES_KEY`] and [`CHECKPOINT_STORED_KEY`], so that a full listing says they
/// do not.
pub const CLEAR_LISTING: usize = DELETE_LIMIT - 1;

/// How an object's checkpoints are deleted (a stored recording's, or ones given up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clearing {
    /// All of them, with the count of tries and the marker, in one deletion: one write, and
    /// nothing is ever left half-deleted (calls up to some ten minutes, at one checkpoint
    /// per [`CHECKPOINT_EVERY_MS`]).
    AtOnce,
    /// The checkpoints in batches, then the count and, last, the marker (a stored recording's
    /// clean-up writes the marker first).
    InBatches,
}

/// How to delete an object's checkpoints, given how many a listing of at most
/// [`CLEAR_LISTING`] of them found.
pub fn clearing(listed: usize) -> Clearing {
    if listed < CLEAR_LISTING {
        Clearing::AtOnce
    } else {
        Clearing::InBatches
    }
}

/// What an object that finds checkpoints and no writer at work does with them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Upload the recording from them; this is try number `attempt` (from 1).
    Upload { attempt: u32 },
    /// Delete them (and the marker and the count of tries) without uploading.
    Clear(Leftover),
}

/// Why checkpoints are deleted without being uploaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leftover {
    /// The recording is stored; these are what a cut-off clean-up left.
    Stored,
    /// They do not start at the recording's start (checkpoint 0), and their keys do not say
    /// where their audio starts: written before keys said so, they may be what a clean-up
    /// from before [`CHECKPOINT_STORED_KEY`] left of a stored recording, and uploading them
    /// would put the call's end at its start, over the file.
    Partial { first: u64 },
    /// R2 refused [`CHECKPOINT_UPLOAD_TRIES`] times.
    Abandoned { tries: u32 },
}

/// Decides what to do with the checkpoints an object holds: `stored` when it holds
/// [`CHECKPOINT_STORED_KEY`], `first` the lowest checkpoint's key, `tries` the uploads
/// tried so far ([`CHECKPOINT_TRIES_KEY`]).
///
/// Checkpoints that do not start at checkpoint 0 but whose keys say where their audio starts
/// are uploaded: checkpoint 0's write failed (it is only logged), and [`Refill`] puts silence
/// of its length first, so the audio after it keeps its place. They cannot be what a
/// clean-up left: keys have said where their audio starts only since the marker is written
/// before any checkpoint of a stored recording is deleted (and is deleted last), or all of
/// them are deleted in one atomic deletion ([`clearing`]), and a
/// clean-up after giving up deletes the count of tries only after the checkpoints. (If the
/// marker's own write fails once the file is stored, `recording.checkpoints_not_cleared`, all
/// the checkpoints stay and the file is stored again from them, as it is from a whole set;
/// with checkpoint 0 lost too, that copy has its silence where the live upload had audio.)
pub fn recovery(stored: bool, first: CheckpointId, tries: u32) -> Recovery {
    if stored {
        Recovery::Clear(Leftover::Stored)
    } else if first.seq != 0 && first.offset.is_none() {
        Recovery::Clear(Leftover::Partial { first: first.seq })
    } else if tries >= CHECKPOINT_UPLOAD_TRIES {
        Recovery::Clear(Leftover::Abandoned { tries })
    } else {
        Recovery::Upload { attempt: tries + 1 }
    }
}

/// The key of the `seq`th checkpoint, whose audio starts `offset` bytes into the recording's
/// PCM: zero-padded, so keys sort in the order they were taken. Checkpoints are not all one
/// length (each holds whole chunks of the recorder, 5 s or a little more, the last one less),
/// so where one starts cannot be told from its number: the offset lets the recovery put
/// silence of exactly the right length where a checkpoint's write failed ([`Refill`]).
pub fn checkpoint_key(seq: u64, offset: u64) -> String {
    format!("{CHECKPOINT_PREFIX}{seq:012}-{offset:012}{MULAW_MARK}")
}

/// Ends the key of a checkpoint of μ-law audio. Keys without it hold 16-bit PCM, as every
/// recording did before: such checkpoints, left by an object that restarted mid-call into
/// this version, are read as μ-law ([`checkpoint_audio`]).
pub const MULAW_MARK: &str = "u";

/// Where a listing of the checkpoints from the `seq`th on starts: just before its key, with
/// or without an offset.
pub fn checkpoint_from(seq: u64) -> String {
    format!("{CHECKPOINT_PREFIX}{seq:012}")
}

/// What a checkpoint's key says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointId {
    pub seq: u64,
    /// Where its audio starts (bytes of the recording's data); `None` in keys written before
    /// they said so (`rec/NNNNNNNNNNNN`).
    pub offset: Option<u64>,
    /// It holds 16-bit PCM (four bytes a stereo frame, offset in those bytes): written before
    /// recordings kept the μ-law ([`MULAW_MARK`]).
    pub pcm16: bool,
}

/// The number and offset of a checkpoint's key, in either form; `None` for any other key.
pub fn checkpoint_id(key: &str) -> Option<CheckpointId> {
    fn digits(s: &str) -> Option<u64> {
        if s.len() != 12 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    }
    let rest = key.strip_prefix(CHECKPOINT_PREFIX)?;
    let (rest, pcm16) = match rest.strip_suffix(MULAW_MARK) {
        Some(rest) => (rest, false),
        None => (rest, true),
    };
    let (seq, offset) = match rest.split_once('-') {
        Some((seq, offset)) => (seq, Some(digits(offset)?)),
        None if pcm16 => (rest, None),
        None => return None,
    };
    Some(CheckpointId {
        seq: digits(seq)?,
        offset,
        pcm16,
    })
}

/// A checkpoint as the recording's data: its key's id and its bytes, those of a 16-bit PCM
/// checkpoint ([`CheckpointId::pcm16`]) turned back into the μ-law they were expanded from
/// (exactly: each PCM sample is a μ-law byte's value), with the offset to match. `None` for
/// a key that is not a checkpoint's.
pub fn checkpoint_audio(key: &str, bytes: Vec<u8>) -> Option<(CheckpointId, Vec<u8>)> {
    let id = checkpoint_id(key)?;
    if !id.pcm16 {
        return Some((id, bytes));
    }
    let mulaw = bytes
        .chunks_exact(2)
        .map(|s| linear_to_ulaw(i16::from_le_bytes([s[0], s[1]])))
        .collect();
    let id = CheckpointId {
        offset: id.offset.map(|o| o / 2),
        pcm16: false,
        ..id
    };
    Some((id, mulaw))
}

/// The last checkpoint an object holds: its key and how many bytes it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastCheckpoint {
    pub id: CheckpointId,
    pub bytes: u64,
}

/// When a call whose pump was lost (the object restarted) ended at the latest, from its
/// recording's checkpoints: the audio they hold ends where the last one (`None` when it
/// wrote none) ends, the pump was gone before [`CHECKPOINT_EVERY_MS`] more was recorded (it
/// would have written the next one), and the recorder is at most [`MAX_BEHIND_MS`] behind
/// the call. Never before the stream started nor after `now_ms`. A call not recorded leaves
/// nothing to go by: `now_ms`.
pub fn lost_pump_ended_by_ms(
    streamed_at_ms: u64,
    recorded: bool,
    last: Option<LastCheckpoint>,
    now_ms: u64,
) -> u64 {
    if !recorded {
        return now_ms.max(streamed_at_ms);
    }
    let saved_ms = match last {
        None => 0,
        Some(LastCheckpoint {
            id:
                CheckpointId {
                    offset: Some(offset),
                    pcm16,
                    ..
                },
            bytes,
        }) => (offset + bytes).div_ceil(if pcm16 {
            2 * BYTES_PER_MS
        } else {
            BYTES_PER_MS
        }),
        // A key from before keys said where their audio starts: a checkpoint is written once
        // CHECKPOINT_EVERY_MS is unsaved, by chunks of at most MAX_CHUNK_MS, so each holds
        // less than the two together (checkpoints hold a little over 5 s each, not 5 s: going
        // by their number alone put an hour's call half a minute early).
        Some(LastCheckpoint { id, .. }) => (id.seq + 1) * (CHECKPOINT_EVERY_MS + MAX_CHUNK_MS),
    };
    let by = streamed_at_ms + saved_ms + CHECKPOINT_EVERY_MS + MAX_BEHIND_MS;
    by.min(now_ms).max(streamed_at_ms)
}

/// The number of a checkpoint's key, in either form; `None` for any other key.
pub fn checkpoint_seq(key: &str) -> Option<u64> {
    checkpoint_id(key).map(|id| id.seq)
}

// ---- the live upload -----------------------------------------------------------------------------

/// Audio waiting for the live upload's writer (R2 slow or stuck) beyond this is not sent to
/// it, so the queue stays bounded.
pub const MAX_QUEUED_BYTES: usize = 2 * 1024 * 1024;

/// What the pump does with a chunk of recorded PCM, besides checkpointing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    /// Send it to the live upload's writer.
    Send,
    /// The writer fell too far behind: abort the live upload now and send it nothing more.
    /// A file with a hole is not a recording; the checkpoints have every chunk, and the
    /// recovery of a failed upload rebuilds the file whole from them.
    Abandon,
    /// The live upload was abandoned: nothing more goes to it.
    Skip,
}

/// Feeds the live upload while its writer keeps up, and gives it up for good, never
/// completing it with a hole, once it does not.
#[derive(Debug, Default)]
pub struct LiveUpload {
    abandoned: bool,
    skipped: u64,
}

impl LiveUpload {
    /// A chunk of `len` bytes, with `queued` bytes sent to the writer and not taken in yet.
    pub fn offer(&mut self, queued: usize, len: usize) -> Feed {
        if self.abandoned {
            self.skipped += len as u64;
            Feed::Skip
        } else if queued + len > MAX_QUEUED_BYTES {
            self.abandoned = true;
            self.skipped += len as u64;
            Feed::Abandon
        } else {
            Feed::Send
        }
    }

    /// Bytes not sent to the live upload (they are in the checkpoints).
    pub fn skipped_bytes(&self) -> u64 {
        self.skipped
    }
}

// ---- G.711 μ-law ---------------------------------------------------------------------------------

/// G.711 μ-law to 16-bit linear PCM (the standard expansion: bias 0x84, bits inverted).
const fn expand(byte: u8) -> i16 {
    let u = !byte;
    let exponent = (u >> 4) & 0x07;
    let mantissa = (u & 0x0F) as i32;
    let magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84;
    if u & 0x80 != 0 {
        -magnitude as i16
    } else {
        magnitude as i16
    }
}

const fn table() -> [i16; 256] {
    let mut t = [0i16; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = expand(i as u8);
        i += 1;
    }
    t
}

static ULAW: [i16; 256] = table();
const _: () = assert!(table()[SILENCE as usize] == 0, "SILENCE is μ-law's zero");

/// Decodes one μ-law byte.
pub fn ulaw_to_linear(byte: u8) -> i16 {
    ULAW[byte as usize]
}

/// Encodes a 16-bit linear sample as μ-law (G.711: clipped, biased by 0x84, the segment and
/// four bits of it, bits inverted). `linear_to_ulaw(ulaw_to_linear(b)) == b` for every byte
/// but 0x7F, "negative zero", which comes back as 0xFF.
pub fn linear_to_ulaw(sample: i16) -> u8 {
    let x = i32::from(sample);
    let sign = if x < 0 { 0x80 } else { 0 };
    let magnitude = x.abs().min(32_635) + 0x84;
    // The segment: where the highest set bit is, from bit 7 (segment 0) to bit 14 (7).
    let exponent = (31 - magnitude.leading_zeros()).saturating_sub(7).min(7);
    let mantissa = (magnitude >> (exponent + 3)) & 0x0F;
    !(sign | (exponent << 4) as u8 | mantissa as u8)
}

// ---- WAV -----------------------------------------------------------------------------------------

/// The header of a μ-law WAV (`WAVE_FORMAT_MULAW`, 2 channels, 8000 Hz, 8 bits a sample)
/// holding `data_bytes` of samples (see [`HEADER_BYTES`]). Sizes past what RIFF can say
/// (4 GiB) are clamped.
pub fn wav_header(data_bytes: u64) -> [u8; HEADER_BYTES] {
    // What the RIFF chunk holds besides the samples: "WAVE" and the three chunks' headers.
    const RIFF_OVERHEAD: u32 = (HEADER_BYTES - 8) as u32;
    let data = u32::try_from(data_bytes)
        .unwrap_or(u32::MAX)
        .min(u32::MAX - RIFF_OVERHEAD);
    let block_align = CHANNELS * BITS_PER_SAMPLE / 8;
    let byte_rate = SAMPLE_RATE * u32::from(block_align);
    let mut h = [0u8; HEADER_BYTES];
    h[0..4].copy_from_slice(b"RIFF");
    h[4..8].copy_from_slice(&(RIFF_OVERHEAD + data).to_le_bytes());
    h[8..12].copy_from_slice(b"WAVE");
    h[12..16].copy_from_slice(b"fmt ");
    h[16..20].copy_from_slice(&18u32.to_le_bytes());
    h[20..22].copy_from_slice(&WAVE_FORMAT_MULAW.to_le_bytes());
    h[22..24].copy_from_slice(&CHANNELS.to_le_bytes());
    h[24..28].copy_from_slice(&SAMPLE_RATE.to_le_bytes());
    h[28..32].copy_from_slice(&byte_rate.to_le_bytes());
    h[32..34].copy_from_slice(&block_align.to_le_bytes());
    h[34..36].copy_from_slice(&BITS_PER_SAMPLE.to_le_bytes());
    // cbSize: no extra format bytes (h[36..38] stays 0).
    h[38..42].copy_from_slice(b"fact");
    h[42..46].copy_from_slice(&4u32.to_le_bytes());
    h[46..50].copy_from_slice(&(data / u32::from(block_align)).to_le_bytes());
    h[50..54].copy_from_slice(b"data");
    h[54..58].copy_from_slice(&data.to_le_bytes());
    h
}

// ---- the timeline --------------------------------------------------------------------------------

/// Both channels of one call on its timeline. Positions are sample indices (8 per ms) from
/// the stream start; everything before `emitted` has been handed out and is gone.
#[derive(Debug)]
pub struct Recorder {
    emitted: u64,
    /// Caller μ-law from `emitted` to `caller_end` (empty when `caller_end <= emitted`).
    caller: VecDeque<u8>,
    caller_end: u64,
    /// False until the first caller frame, which lands at its own arrival.
    caller_heard: bool,
    /// Where Twilio's clock reads 0 on our timeline (samples; negative when it had run longer
    /// than ours at its first stamped frame): set by that frame, then kept.
    origin: Option<i128>,
    /// Caller samples placed later than their timestamp said (see [`Recorder::caller`]).
    late: u64,
    /// Where the stamped caller frame placed last ends on Twilio's clock (samples): a frame
    /// stamped within it was placed already.
    stamped_end: Option<i128>,
    /// Caller frames (and their samples) left out as delivered again.
    replayed_frames: u64,
    replayed: u64,
    /// Agent μ-law from `emitted` on: what is queued at Twilio, as we model it. It may end
    /// before `agent_end`, which counts audio left out too (it plays, as silence here).
    agent: VecDeque<u8>,
    agent_end: u64,
    /// Samples left out (runaway or flooding peers), for the log.
    dropped: u64,
    /// Reused for base64 decoding, so no frame allocates.
    scratch: Vec<u8>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

/// Appends `samples` to `buf`, which covers the timeline from `emitted` on, so that they
/// start at `start`, at or after `*end` (silence fills any gap); `*end` moves to their end.
fn place(buf: &mut VecDeque<u8>, emitted: u64, end: &mut u64, start: u64, samples: &[u8]) {
    let start = start.max(emitted);
    let covered = emitted + buf.len() as u64;
    debug_assert!(start >= covered, "audio is only ever appended");
    let gap = (start - covered) as usize;
    buf.extend(std::iter::repeat_n(SILENCE, gap));
    buf.extend(samples.iter().copied());
    *end = start + samples.len() as u64;
}

impl Recorder {
    pub fn new() -> Self {
        Self {
            emitted: 0,
            caller: VecDeque::new(),
            caller_end: 0,
            caller_heard: false,
            origin: None,
            late: 0,
            stamped_end: None,
            replayed_frames: 0,
            replayed: 0,
            agent: VecDeque::new(),
            agent_end: 0,
            dropped: 0,
            scratch: Vec::new(),
        }
    }

    /// A caller frame (μ-law) that arrived at `at_ms`, stamped by Twilio `stamp_ms` into its
    /// stream when it was.
    ///
    /// A stamped frame goes where its stamp says on Twilio's clock, tied to ours by the first
    /// stamped frame (which lands at its arrival, or [`MAX_FIRST_FRAME_DELAY_MS`] after its
    /// stamp when it came later than that: held up, it does not shift the whole channel):
    /// silence fills a gap in the stamps of
    /// [`STAMP_JITTER_MS`] or more, and a frame stamped less than that off the previous
    /// one's end follows it directly. A frame whose stamps all lie within those of the
    /// stamped frame placed last (at most [`MAX_REPLAY_BACK_MS`] back) was placed already:
    /// delivered again, it is left out and counted ([`Recorder::replayed_frames`]). When
    /// its place is further back than that, behind what is recorded (the frame came more
    /// than [`CALLER_STALL_MS`] late, or Twilio's clock went back further), the frame goes
    /// right after it, as early as it still can, and is counted as late. A frame with no
    /// stamp goes where it arrived (see [`CALLER_SLACK_MS`]). Either is left out, and
    /// counted, when that is more than [`MAX_CALLER_AHEAD_MS`] ahead of its arrival.
    pub fn caller(&mut self, at_ms: u64, stamp_ms: Option<u64>, mulaw: &[u8]) {
        let arrived = at_ms * SAMPLES_PER_MS;
        // Audio is only ever appended: nothing goes before this.
        let free = self.caller_end.max(self.emitted);
        // i128: no stamp, however absurd, overflows.
        let stamp = stamp_ms.map(|ts| i128::from(ts) * i128::from(SAMPLES_PER_MS));
        let len = mulaw.len() as u64;
        if let (Some(stamp), Some(end)) = (stamp, self.stamped_end) {
            let back = i128::from(MAX_REPLAY_BACK_MS * SAMPLES_PER_MS);
            if stamp + i128::from(len) <= end && stamp >= end - back {
                self.replayed_frames += 1;
                self.replayed += len;
                return;
            }
        }
        let (start, late) = match stamp {
            Some(stamp) => {
                let first_delay = i128::from(MAX_FIRST_FRAME_DELAY_MS * SAMPLES_PER_MS);
                let origin = *self
                    .origin
                    .get_or_insert((i128::from(arrived) - stamp).min(first_delay));
                let due = origin + stamp;
                let jitter = i128::from(STAMP_JITTER_MS * SAMPLES_PER_MS);
                // The first frame has no previous one to follow.
                let snap = if self.caller_heard { jitter } else { 0 };
                if due >= i128::from(free) + snap {
                    // Far ahead (or past u64) is left out just below.
                    (u64::try_from(due).unwrap_or(u64::MAX), false)
                } else {
                    (free, due < i128::from(free) - jitter)
                }
            }
            None => {
                let gap = arrived > self.caller_end + CALLER_SLACK_MS * SAMPLES_PER_MS;
                if gap || !self.caller_heard {
                    (arrived, false)
                } else {
                    (self.caller_end, false)
                }
            }
        };
        if start > arrived + MAX_CALLER_AHEAD_MS * SAMPLES_PER_MS {
            self.dropped += len;
            return;
        }
        if late {
            self.late += len;
        }
        place(
            &mut self.caller,
            self.emitted,
            &mut self.caller_end,
            start,
            mulaw,
        );
        self.caller_heard = true;
        if let Some(stamp) = stamp {
            self.stamped_end = Some(stamp + i128::from(len));
        }
    }

    /// When agent audio sent at `at_ms` starts to play: once what is queued has (ms).
    pub fn agent_plays_at_ms(&self, at_ms: u64) -> u64 {
        at_ms.max(self.agent_end / SAMPLES_PER_MS)
    }

    /// Agent audio (μ-law) sent to Twilio at `at_ms`: it plays once what is queued has.
    pub fn agent(&mut self, at_ms: u64, mulaw: &[u8]) {
        let sent = at_ms * SAMPLES_PER_MS;
        let start = sent.max(self.agent_end);
        if start + mulaw.len() as u64 > sent + MAX_AGENT_AHEAD_MS * SAMPLES_PER_MS {
            // Not held, but Twilio plays it: what comes after starts once it has played.
            self.dropped += mulaw.len() as u64;
            self.agent_end = start + mulaw.len() as u64;
            return;
        }
        place(
            &mut self.agent,
            self.emitted,
            &mut self.agent_end,
            start,
            mulaw,
        );
    }

    /// [`Recorder::caller`] for a base64 payload; false (and nothing recorded) when it is
    /// not base64.
    pub fn caller_base64(&mut self, at_ms: u64, stamp_ms: Option<u64>, payload: &str) -> bool {
        let mut buf = std::mem::take(&mut self.scratch);
        let ok = decode_into(payload, &mut buf);
        if ok {
            self.caller(at_ms, stamp_ms, &buf);
        }
        self.scratch = buf;
        ok
    }

    /// [`Recorder::agent`] for a base64 payload.
    pub fn agent_base64(&mut self, at_ms: u64, payload: &str) -> bool {
        let mut buf = std::mem::take(&mut self.scratch);
        let ok = decode_into(payload, &mut buf);
        if ok {
            self.agent(at_ms, &buf);
        }
        self.scratch = buf;
        ok
    }

    /// Twilio was told to `clear` at `at_ms`: agent audio queued after that is never heard.
    pub fn clear(&mut self, at_ms: u64) {
        let cut = (at_ms * SAMPLES_PER_MS).max(self.emitted);
        if self.agent_end > cut {
            self.agent.truncate((cut - self.emitted) as usize);
            self.agent_end = cut;
        }
    }

    /// The timeline up to here can no longer change at `now_ms`: agent audio before now
    /// has played (a later `clear` only cuts after its own time), and caller audio is only
    /// appended, at `caller_end` or later: a stamped frame at its stamp, which is still
    /// free unless the frame comes more than [`CALLER_STALL_MS`] after it; an unstamped one
    /// at `caller_end` or at its arrival, which is now.
    fn horizon(&self, now_ms: u64) -> u64 {
        let now = now_ms * SAMPLES_PER_MS;
        let caller_settled = self
            .caller_end
            .max(now.saturating_sub(CALLER_STALL_MS * SAMPLES_PER_MS));
        caller_settled.min(now)
    }

    /// The next chunk of settled stereo PCM (at least [`EMIT_EVERY_MS`], at most
    /// [`MAX_CHUNK_MS`]), if there is one. Call until `None`.
    pub fn poll(&mut self, now_ms: u64) -> Option<Vec<u8>> {
        let ready = self.horizon(now_ms).saturating_sub(self.emitted);
        if ready < EMIT_EVERY_MS * SAMPLES_PER_MS {
            return None;
        }
        Some(self.emit(ready.min(MAX_CHUNK_MS * SAMPLES_PER_MS)))
    }

    /// The call ended at `end_ms`: the rest of the timeline (agent audio still queued then
    /// was never heard; caller audio already received is kept) and the recording's length.
    pub fn finish(&mut self, end_ms: u64) -> (Vec<u8>, u64) {
        let end = (end_ms * SAMPLES_PER_MS)
            .max(self.caller_end)
            .max(self.emitted);
        let rest = self.emit(end - self.emitted);
        self.caller = VecDeque::new();
        self.agent = VecDeque::new();
        self.scratch = Vec::new();
        (rest, self.emitted / SAMPLES_PER_MS)
    }

    /// Interleaves the next `samples` of both channels (silence where a channel has none).
    fn emit(&mut self, samples: u64) -> Vec<u8> {
        let n = samples as usize;
        // Silence first, so a channel with no audio needs no writes.
        let mut out = vec![SILENCE; n * FRAME_BYTES as usize];
        interleave_into(&mut out, 0, &mut self.caller, n);
        interleave_into(&mut out, 1, &mut self.agent, n);
        self.emitted += samples;
        out
    }

    /// Milliseconds handed out so far.
    pub fn emitted_ms(&self) -> u64 {
        self.emitted / SAMPLES_PER_MS
    }

    /// Samples left out of the recording (see [`MAX_AGENT_AHEAD_MS`], [`MAX_CALLER_AHEAD_MS`]).
    pub fn dropped_samples(&self) -> u64 {
        self.dropped
    }

    /// Caller samples kept but placed later than their timestamp said: they came too late
    /// for their place, or Twilio's clock went back further than a replay does.
    pub fn late_samples(&self) -> u64 {
        self.late
    }

    /// Caller frames left out because their stamps were placed already (see
    /// [`MAX_REPLAY_BACK_MS`]).
    pub fn replayed_frames(&self) -> u64 {
        self.replayed_frames
    }

    /// The samples of those frames.
    pub fn replayed_samples(&self) -> u64 {
        self.replayed
    }

    /// Bytes the recorder holds: the measure of "bounded".
    pub fn buffered_bytes(&self) -> usize {
        self.caller.capacity() + self.agent.capacity() + self.scratch.capacity()
    }
}

/// Writes the first `n` samples of `buf` (fewer if it holds fewer) as byte `channel` of each
/// stereo frame of `out`, and removes them from `buf`.
fn interleave_into(out: &mut [u8], channel: usize, buf: &mut VecDeque<u8>, n: usize) {
    let take = n.min(buf.len());
    let (a, b) = buf.as_slices();
    let frames = out.chunks_exact_mut(FRAME_BYTES as usize);
    for (&byte, frame) in a.iter().chain(b).take(take).zip(frames) {
        frame[channel] = byte;
    }
    buf.drain(..take);
}

/// Standard padded base64 into `buf` (cleared first).
fn decode_into(payload: &str, buf: &mut Vec<u8>) -> bool {
    buf.clear();
    base64::engine::general_purpose::STANDARD
        .decode_vec(payload, buf)
        .is_ok()
}

// ---- multipart upload parts ----------------------------------------------------------------------

/// Parts are held in pieces of at most this many bytes, each allocated once at its full size:
/// the audio is never copied to grow a buffer, freed pieces are reused by the next calls, and
/// a part goes to R2 piece by piece.
pub const PIECE_BYTES: usize = 64 * 1024;

/// One part of the multipart upload: numbered from 1, its bytes in pieces, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub number: u16,
    pub pieces: Vec<Vec<u8>>,
}

impl Part {
    /// Bytes in the part.
    pub fn len(&self) -> usize {
        self.pieces.iter().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.pieces.iter().all(Vec::is_empty)
    }

    /// The part's bytes in one buffer.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.pieces.concat()
    }
}

/// A part being filled: pieces of at most [`PIECE_BYTES`], each filled to its capacity.
#[derive(Debug, Default)]
struct Filling {
    pieces: Vec<Vec<u8>>,
    len: usize,
}

impl Filling {
    /// Appends `data`, which fits in a part of `part_size` bytes.
    fn extend(&mut self, mut data: &[u8], part_size: usize) {
        debug_assert!(self.len + data.len() <= part_size);
        while !data.is_empty() {
            match self.pieces.last_mut() {
                Some(piece) if piece.len() < piece.capacity() => {
                    let n = (piece.capacity() - piece.len()).min(data.len());
                    piece.extend_from_slice(&data[..n]);
                    self.len += n;
                    data = &data[n..];
                }
                _ => self
                    .pieces
                    .push(Vec::with_capacity(PIECE_BYTES.min(part_size - self.len))),
            }
        }
    }

    fn held_bytes(&self) -> usize {
        self.pieces.iter().map(Vec::capacity).sum()
    }
}

/// Cuts the WAV (header then PCM) into parts of `part_size` bytes, the last one shorter.
/// Part 1 starts with the header, which needs the total length: it is kept until
/// [`Parts::finish`] (at most two parts are held, the first and the one filling), unless
/// [`Parts::release_first`] drops it once it is full and its audio is safe in the
/// checkpoints; then one part is held, and part 1 is rebuilt at the end ([`Rebuild`]).
#[derive(Debug)]
pub struct Parts {
    part_size: usize,
    /// `None` once released.
    first: Option<Filling>,
    current: Filling,
    next_number: u16,
    data_bytes: u64,
    ready: VecDeque<Part>,
}

impl Parts {
    /// `part_size` must be at least the header; R2 wants [`MIN_PART_BYTES`] or more.
    pub fn new(part_size: usize) -> Self {
        assert!(part_size > HEADER_BYTES, "a part holds at least the header");
        let mut first = Filling::default();
        first.extend(&[0; HEADER_BYTES], part_size);
        Self {
            part_size,
            first: Some(first),
            current: Filling::default(),
            next_number: 2,
            data_bytes: 0,
            ready: VecDeque::new(),
        }
    }

    /// More PCM, in order.
    pub fn push(&mut self, mut data: &[u8]) {
        self.data_bytes += data.len() as u64;
        let size = self.part_size;
        if let Some(first) = self.first.as_mut().filter(|f| f.len < size) {
            let n = (size - first.len).min(data.len());
            first.extend(&data[..n], size);
            data = &data[n..];
        }
        while !data.is_empty() {
            let n = (size - self.current.len).min(data.len());
            self.current.extend(&data[..n], size);
            data = &data[n..];
            if self.current.len == size {
                let full = std::mem::take(&mut self.current);
                self.ready.push_back(Part {
                    number: self.next_number,
                    pieces: full.pieces,
                });
                self.next_number += 1;
            }
        }
    }

    /// A full part (never part 1) to upload now.
    pub fn poll_part(&mut self) -> Option<Part> {
        self.ready.pop_front()
    }

    /// Bytes of PCM pushed so far.
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    /// Bytes of the whole file.
    pub fn file_bytes(&self) -> u64 {
        HEADER_BYTES as u64 + self.data_bytes
    }

    /// Drops part 1 from memory if it is full and `copies` says every checkpoint holding
    /// its audio is written (see [`FirstPart::may_release`]); [`FirstPart::rebuild`] makes it
    /// again at the end. True once part 1 is released (now or before): [`Parts::finish`]
    /// then leaves it out.
    pub fn release_first(&mut self, copies: &FirstPart) -> bool {
        let full = match &self.first {
            None => return true,
            Some(first) => first.len == self.part_size,
        };
        debug_assert_eq!(copies.pcm_bytes, (self.part_size - HEADER_BYTES) as u64);
        if full && copies.may_release() {
            self.first = None;
            true
        } else {
            false
        }
    }

    /// True once part 1 was released: it is to be rebuilt from the checkpoints.
    pub fn first_released(&self) -> bool {
        self.first.is_none()
    }

    /// Bytes held in memory (capacity, not length).
    pub fn held_bytes(&self) -> usize {
        self.first.as_ref().map_or(0, Filling::held_bytes)
            + self.current.held_bytes()
            + self
                .ready
                .iter()
                .flat_map(|p| &p.pieces)
                .map(Vec::capacity)
                .sum::<usize>()
    }

    /// Every part not handed out yet, by number: part 1 with the real header (unless it was
    /// released), any full part not polled, and the last, shorter part.
    pub fn finish(self) -> Vec<Part> {
        let mut parts = Vec::new();
        if let Some(mut first) = self.first {
            // The first piece holds the whole header: a piece is at least HEADER_BYTES long.
            first.pieces[0][..HEADER_BYTES].copy_from_slice(&wav_header(self.data_bytes));
            parts.push(Part {
                number: 1,
                pieces: first.pieces,
            });
        }
        parts.extend(self.ready);
        if self.current.len > 0 {
            parts.push(Part {
                number: self.next_number,
                pieces: self.current.pieces,
            });
        }
        parts
    }
}

// ---- part 1 from the checkpoints -----------------------------------------------------------------

/// Where part 1's audio (the first `part_size - HEADER_BYTES` bytes of PCM) is kept in the
/// checkpoints, and whether all of it is written, so that part 1 need not stay in memory
/// until the end. The pump says which checkpoint it took ([`FirstPart::taken`], in order,
/// with its length) and how its write went ([`FirstPart::written`], [`FirstPart::lost`]);
/// checkpoints need not line up with the part's end (the last one is read only in part).
#[derive(Debug, Clone)]
pub struct FirstPart {
    /// PCM bytes in part 1.
    pcm_bytes: u64,
    /// PCM bytes checkpointed so far (written or not).
    taken: u64,
    /// The checkpoints that start within part 1, in order.
    copies: Vec<Checkpoint>,
    /// A checkpoint of part 1 was not written: part 1 stays in memory.
    lost: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Checkpoint {
    /// `None` for silence that stands in for checkpoints that are missing (the recovery
    /// fills a gap, [`FirstPart::silence`]): made again without reading anything.
    seq: Option<u64>,
    len: usize,
    written: bool,
}

impl FirstPart {
    /// For parts of `part_size` bytes ([`Parts::new`]).
    pub fn new(part_size: usize) -> Self {
        assert!(part_size > HEADER_BYTES, "a part holds at least the header");
        Self {
            pcm_bytes: (part_size - HEADER_BYTES) as u64,
            taken: 0,
            copies: Vec::new(),
            lost: false,
        }
    }

    /// Checkpoint `seq`, holding the next `len` bytes of PCM, is being written.
    pub fn taken(&mut self, seq: u64, len: usize) {
        debug_assert!(self
            .copies
            .iter()
            .rev()
            .find_map(|c| c.seq)
            .is_none_or(|last| last < seq));
        if self.taken < self.pcm_bytes && len > 0 {
            self.copies.push(Checkpoint {
                seq: Some(seq),
                len,
                written: false,
            });
        }
        self.taken += len as u64;
    }

    /// The next `len` bytes of PCM are silence in no checkpoint: the recovery puts it where
    /// checkpoints are missing ([`Refill`]). Part 1 is made again with the same silence there.
    pub fn silence(&mut self, len: u64) {
        if self.taken < self.pcm_bytes && len > 0 {
            self.copies.push(Checkpoint {
                seq: None,
                // Only what lies in part 1 (a gap may be longer than a part).
                len: (self.pcm_bytes - self.taken).min(len) as usize,
                written: true,
            });
        }
        self.taken += len;
    }

    /// Checkpoint `seq` is written.
    pub fn written(&mut self, seq: u64) {
        if let Some(c) = self.copies.iter_mut().find(|c| c.seq == Some(seq)) {
            c.written = true;
        }
    }

    /// Checkpoint `seq` could not be written. True when it held audio of part 1: part 1
    /// cannot be rebuilt, and stays in memory until the end.
    pub fn lost(&mut self, seq: u64) -> bool {
        let ours = self.copies.iter().any(|c| c.seq == Some(seq));
        self.lost |= ours;
        ours
    }

    /// True when every byte of part 1's audio is in checkpoints whose writes landed: part 1
    /// may leave memory. Never once a write of part 1 failed.
    pub fn may_release(&self) -> bool {
        !self.lost && self.taken >= self.pcm_bytes && self.copies.iter().all(|c| c.written)
    }

    /// What to read back to make part 1 again, for a recording of `data_bytes` of PCM (its
    /// header says so). Only once [`FirstPart::may_release`].
    pub fn rebuild(&self, data_bytes: u64) -> Result<Rebuild, RebuildError> {
        if !self.may_release() || data_bytes < self.pcm_bytes {
            return Err(RebuildError::NotInCheckpoints);
        }
        let part_size = HEADER_BYTES + self.pcm_bytes as usize;
        let mut filling = Filling::default();
        filling.extend(&wav_header(data_bytes), part_size);
        let mut rebuild = Rebuild {
            part_size,
            copies: self.copies.iter().rev().copied().collect(),
            filling,
        };
        rebuild.fill_silence();
        Ok(rebuild)
    }
}

/// Why part 1 could not be made again from the checkpoints (the live upload is then given up:
/// never completed with a wrong part 1).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RebuildError {
    #[error("part 1 is not all in written checkpoints")]
    NotInCheckpoints,
    #[error("checkpoint {expected} was expected, checkpoint {got} came")]
    OutOfOrder { expected: u64, got: u64 },
    #[error("checkpoint {seq} holds {got} bytes; {expected} were written")]
    WrongLength {
        seq: u64,
        expected: usize,
        got: usize,
    },
    #[error("checkpoint {seq} is missing")]
    Missing { seq: u64 },
    #[error("checkpoint {seq} came after part 1 was complete")]
    Unwanted { seq: u64 },
}

/// Part 1 being made again from the checkpoints: the final header, then the checkpoints in
/// order, the last one only up to the part's end, with silence where the recovery put silence
/// for missing checkpoints. The shell reads from [`Rebuild::wants`] on and pushes each
/// checkpoint as read.
#[derive(Debug)]
pub struct Rebuild {
    part_size: usize,
    /// The checkpoints still to come, the next one last.
    copies: Vec<Checkpoint>,
    filling: Filling,
}

impl Rebuild {
    /// The checkpoint to read next; `None` once part 1 is complete.
    pub fn wants(&self) -> Option<u64> {
        self.copies.last().and_then(|c| c.seq)
    }

    /// Puts in the silence that comes next, if any: it is not read.
    fn fill_silence(&mut self) {
        const QUIET: [u8; 4096] = [SILENCE; 4096];
        while let Some(&Checkpoint { seq: None, len, .. }) = self.copies.last() {
            let mut left = (self.part_size - self.filling.len).min(len);
            while left > 0 {
                let n = left.min(QUIET.len());
                self.filling.extend(&QUIET[..n], self.part_size);
                left -= n;
            }
            self.copies.pop();
        }
    }

    /// Checkpoint `seq` as read back: it must be the one wanted, at the length written.
    pub fn push(&mut self, seq: u64, pcm: &[u8]) -> Result<(), RebuildError> {
        let Some(&next) = self.copies.last() else {
            return Err(RebuildError::Unwanted { seq });
        };
        let expected = next
            .seq
            .expect("silence is filled in as soon as it comes next");
        if seq != expected {
            return Err(RebuildError::OutOfOrder { expected, got: seq });
        }
        if pcm.len() != next.len {
            return Err(RebuildError::WrongLength {
                seq,
                expected: next.len,
                got: pcm.len(),
            });
        }
        let n = (self.part_size - self.filling.len).min(pcm.len());
        self.filling.extend(&pcm[..n], self.part_size);
        self.copies.pop();
        self.fill_silence();
        Ok(())
    }

    /// Part 1, once every checkpoint wanted was pushed.
    pub fn finish(self) -> Result<Part, RebuildError> {
        if let Some(seq) = self.wants() {
            return Err(RebuildError::Missing { seq });
        }
        debug_assert_eq!(self.filling.len, self.part_size);
        Ok(Part {
            number: 1,
            pieces: self.filling.pieces,
        })
    }
}

// ---- the recording from its checkpoints -----------------------------------------------------------

/// Where audio is missing from the checkpoints, inside the recording: their writes failed
/// (a write is not waited for, and a failure is only logged). The recovery puts silence of
/// the same length there, so the audio after it stays where it was on the call's timeline
/// (and lines up with the transcript and the events).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    /// The checkpoints missing. Empty when the numbers follow on but the audio does not (the
    /// one before came back shorter than its successor's offset says).
    pub missing: std::ops::Range<u64>,
    /// Where the gap starts, in bytes of PCM from the recording's start.
    pub at: u64,
    /// Its length in bytes of PCM (whole stereo frames).
    pub bytes: u64,
    /// The length came from the numbers alone, in checkpoints whose keys do not say where
    /// they start (written before keys said so): [`CHECKPOINT_BYTES`] per missing checkpoint,
    /// the least each held, so the audio after it is at most a few seconds early, never late.
    pub estimated: bool,
}

/// Where a checkpoint read back goes in the recording.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// Right after the one before it.
    Next,
    /// After silence for the gap before it.
    AfterGap(Gap),
    /// Its key says it starts `by` bytes before the audio read so far ends: the checkpoints
    /// disagree with their keys (a copy longer than written). It goes right after, that much
    /// later than it was.
    Late { by: u64 },
    /// Its number was read already: it is left out.
    Repeat,
}

/// The recording put back together from its checkpoints, as the recovery reads them: in
/// order of number, in batches from [`Refill::from`] on. A number missing inside the sequence
/// becomes silence of exactly the audio missing (from the offsets in the keys), so everything
/// after it keeps its place; so do numbers missing at the start (checkpoint 0 and on), when
/// the first key read says where its audio starts ([`recovery`]). Checkpoints missing at the
/// end leave nothing to fill: the recording ends with the last one written. Part 1's
/// bookkeeping ([`FirstPart`]) learns the same, so that part 1 made again at the end has the
/// same silence in the same place.
#[derive(Debug, Default)]
pub struct Refill {
    next_seq: u64,
    /// PCM placed so far, silence included.
    bytes: u64,
    gaps: Vec<Gap>,
}

impl Refill {
    pub fn new() -> Self {
        Self::default()
    }

    /// The number to list the checkpoints from ([`checkpoint_from`]): the one after the last
    /// read.
    pub fn from(&self) -> u64 {
        self.next_seq
    }

    /// Checkpoint `id`, holding `len` bytes, read next: where it goes. For
    /// [`Place::AfterGap`], silence of the gap's length goes first, then the checkpoint's
    /// audio; for [`Place::Repeat`], nothing. `first` is told the same.
    pub fn push(&mut self, id: CheckpointId, len: usize, first: &mut FirstPart) -> Place {
        if id.seq < self.next_seq {
            return Place::Repeat;
        }
        let missing = self.next_seq..id.seq;
        let (gap_bytes, estimated) = match id.offset {
            Some(offset) if offset < self.bytes => {
                let by = self.bytes - offset;
                self.take(id.seq, len, first);
                return Place::Late { by };
            }
            Some(offset) => (offset - self.bytes, false),
            None => (
                (missing.end - missing.start) * CHECKPOINT_BYTES as u64,
                !missing.is_empty(),
            ),
        };
        let place = if missing.is_empty() && gap_bytes == 0 {
            Place::Next
        } else {
            let gap = Gap {
                missing,
                at: self.bytes,
                bytes: gap_bytes,
                estimated,
            };
            first.silence(gap_bytes);
            self.bytes += gap_bytes;
            self.gaps.push(gap.clone());
            Place::AfterGap(gap)
        };
        self.take(id.seq, len, first);
        place
    }

    fn take(&mut self, seq: u64, len: usize, first: &mut FirstPart) {
        // Every checkpoint read back was written.
        first.taken(seq, len);
        first.written(seq);
        self.bytes += len as u64;
        self.next_seq = seq + 1;
    }

    /// The gaps filled so far, in order.
    pub fn gaps(&self) -> &[Gap] {
        &self.gaps
    }

    /// Bytes of PCM placed so far, silence included.
    pub fn data_bytes(&self) -> u64 {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_pump_s_call_ends_by_the_checkpoint_it_did_not_write() {
        let at = 1_000_000;
        let hour = 3_600_000;
        let last = |seq, offset: Option<u64>, bytes| {
            Some(LastCheckpoint {
                id: CheckpointId {
                    seq,
                    offset,
                    pcm16: false,
                },
                bytes,
            })
        };
        // Checkpoint 1 holds 5.2 s of audio from 5.1 s on: gone before the next 5 s was.
        assert_eq!(
            lost_pump_ended_by_ms(
                at,
                true,
                last(1, Some(5_100 * BYTES_PER_MS), 5_200 * BYTES_PER_MS),
                at + 60_000
            ),
            at + 10_300 + CHECKPOINT_EVERY_MS + MAX_BEHIND_MS
        );
        // An hour in, checkpoints of a little over 5 s each: where the audio ends, not
        // 5 s per checkpoint (which would be 700 × 5 s = 58 min 20 s, 100 s early).
        let offset = (hour - 5_140) * BYTES_PER_MS;
        assert_eq!(
            lost_pump_ended_by_ms(
                at,
                true,
                last(699, Some(offset), 5_140 * BYTES_PER_MS),
                at + 2 * hour
            ),
            at + hour + CHECKPOINT_EVERY_MS + MAX_BEHIND_MS
        );
        // A key that does not say where it starts: at the latest, each holds under 9 s.
        assert_eq!(
            lost_pump_ended_by_ms(at, true, last(1, None, 1), at + 60_000),
            at + 2 * (CHECKPOINT_EVERY_MS + MAX_CHUNK_MS) + CHECKPOINT_EVERY_MS + MAX_BEHIND_MS
        );
        // None: gone within the first 5 s of audio.
        assert_eq!(
            lost_pump_ended_by_ms(at, true, None, at + 60_000),
            at + 5_000 + MAX_BEHIND_MS
        );
        // Never after now, never before the stream started, and nothing to go by unrecorded.
        assert_eq!(
            lost_pump_ended_by_ms(at, true, last(9, Some(0), 1), at + 7_000),
            at + 7_000
        );
        assert_eq!(lost_pump_ended_by_ms(at, true, None, at - 5), at);
        assert_eq!(
            lost_pump_ended_by_ms(at, false, None, at + 60_000),
            at + 60_000
        );
    }

    /// The lowest checkpoint's key in `storage`, as the shell reads it.
    fn first_key<V>(storage: &std::collections::BTreeMap<String, V>) -> CheckpointId {
        storage.keys().find_map(|k| checkpoint_id(k)).unwrap()
    }

    /// The clean-up after a stored recording is cut off partway (oldest checkpoints first,
    /// as the shell deletes them): what is left is the recording's end, and it is deleted,
    /// never uploaded over the whole file.
    #[test]
    fn checkpoints_left_by_a_cut_off_clean_up_are_never_uploaded() {
        let mut storage: std::collections::BTreeMap<String, u32> = (0..40)
            .map(|n| (checkpoint_key(n, n * 160_000), 0))
            .collect();
        assert_eq!(
            recovery(false, first_key(&storage), 0),
            Recovery::Upload { attempt: 1 }
        );
        // Stored: the marker goes in first, then the deletion stops after one batch.
        storage.insert(CHECKPOINT_STORED_KEY.into(), 1);
        let batch: Vec<String> = storage
            .keys()
            .filter(|k| checkpoint_seq(k).is_some())
            .take(16)
            .cloned()
            .collect();
        for k in batch {
            storage.remove(&k);
        }
        let first = first_key(&storage);
        assert_eq!(first.seq, 16);
        let stored = storage.contains_key(CHECKPOINT_STORED_KEY);
        assert_eq!(
            recovery(stored, first, 0),
            Recovery::Clear(Leftover::Stored)
        );
        // Without the marker, left by a version before it: those wrote keys that do not say
        // where their audio starts, and a set of them that does not start at checkpoint 0 is
        // still only the end: dropped, not uploaded.
        let old = CheckpointId {
            seq: 16,
            offset: None,
            pcm16: true,
        };
        assert_eq!(
            recovery(false, old, 0),
            Recovery::Clear(Leftover::Partial { first: 16 })
        );
        let whole = CheckpointId {
            seq: 0,
            offset: Some(0),
            pcm16: false,
        };
        assert_eq!(
            recovery(true, whole, 0),
            Recovery::Clear(Leftover::Stored),
            "stored wins even over a whole set"
        );
        // Given up after its tries: the count of tries is deleted after the checkpoints, so
        // a deletion cut off partway is finished, never uploaded, whatever is left.
        storage.remove(CHECKPOINT_STORED_KEY);
        assert_eq!(
            recovery(false, first_key(&storage), CHECKPOINT_UPLOAD_TRIES),
            Recovery::Clear(Leftover::Abandoned {
                tries: CHECKPOINT_UPLOAD_TRIES
            })
        );
    }

    /// Deleting a stored recording's checkpoints: in one call of the storage API when all of
    /// them fit in it with the two keys beside them, else in batches.
    #[test]
    fn checkpoints_that_fit_in_one_deletion_are_cleared_at_once() {
        assert_eq!(clearing(0), Clearing::AtOnce);
        assert_eq!(clearing(7), Clearing::AtOnce, "a 30 s call");
        let most = DELETE_LIMIT - 2;
        assert_eq!(clearing(most), Clearing::AtOnce);
        assert_eq!(
            most + 2,
            DELETE_LIMIT,
            "the count and the marker fit beside them"
        );
        // A listing of CLEAR_LISTING that came back full may not be all of them.
        assert_eq!(clearing(CLEAR_LISTING), Clearing::InBatches);
        assert!(most < CLEAR_LISTING);
        // What one deletion holds, at a checkpoint per 5 s: over ten minutes of call.
        assert!(most as u64 * CHECKPOINT_EVERY_MS >= 10 * 60_000);
    }

    #[test]
    fn a_recording_r2_keeps_refusing_is_given_up_after_its_tries() {
        let first = CheckpointId {
            seq: 0,
            offset: Some(0),
            pcm16: false,
        };
        for tries in 0..CHECKPOINT_UPLOAD_TRIES {
            assert_eq!(
                recovery(false, first, tries),
                Recovery::Upload { attempt: tries + 1 }
            );
        }
        assert_eq!(
            recovery(false, first, CHECKPOINT_UPLOAD_TRIES),
            Recovery::Clear(Leftover::Abandoned {
                tries: CHECKPOINT_UPLOAD_TRIES
            })
        );
    }

    /// R2 stalls mid-call: once a chunk would go past the writer's queue limit, the live
    /// upload is abandoned (to be rebuilt from the checkpoints), never filled with silence
    /// and completed, even when the writer catches up again.
    #[test]
    fn a_live_upload_that_falls_behind_is_abandoned_not_completed_with_a_hole() {
        let mut live = LiveUpload::default();
        let chunk = 32_000;
        let mut queued = 0;
        let mut feeds = Vec::new();
        for _ in 0..MAX_QUEUED_BYTES / chunk + 3 {
            let feed = live.offer(queued, chunk);
            if feed == Feed::Send {
                queued += chunk; // the writer takes nothing in
            }
            feeds.push(feed);
        }
        let sent = MAX_QUEUED_BYTES / chunk;
        assert!(feeds[..sent].iter().all(|&f| f == Feed::Send));
        assert_eq!(feeds[sent], Feed::Abandon, "abandoned once");
        assert!(feeds[sent + 1..].iter().all(|&f| f == Feed::Skip));
        // The writer catches up: the live upload stays abandoned.
        assert_eq!(live.offer(0, chunk), Feed::Skip);
        assert_eq!(live.skipped_bytes(), 4 * chunk as u64);
    }

    #[test]
    fn checkpoint_keys_sort_in_the_order_taken_and_read_back() {
        let numbers = [0, 1, 9, 10, 99, 100, 12_345, 999_999_999_999];
        // Offsets that grow with the numbers, at different rates: the number sorts first.
        let keys: Vec<String> = numbers
            .iter()
            .map(|&n| checkpoint_key(n, n * 170_000 % 1_000_000_000_000))
            .collect();
        assert_eq!(keys[2], "rec/000000000009-000001530000u");
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(sorted, keys, "lexical order is the order taken");
        for (k, n) in keys.iter().zip(numbers) {
            assert!(k.starts_with(CHECKPOINT_PREFIX));
            assert_eq!(checkpoint_seq(k), Some(n));
            let id = checkpoint_id(k).unwrap();
            assert_eq!(id.offset, Some(n * 170_000 % 1_000_000_000_000));
            assert!(!id.pcm16, "{k}");
            // A listing from the number starts at its key, and after the one before, in
            // either form.
            assert!(checkpoint_from(n) <= *k);
            assert!(checkpoint_from(n) <= format!("{CHECKPOINT_PREFIX}{n:012}"));
            if n > 0 {
                assert!(checkpoint_from(n) > checkpoint_key(n - 1, 999_999_999_999));
                assert!(checkpoint_from(n) > format!("{CHECKPOINT_PREFIX}{:012}", n - 1));
            }
        }
        // Keys written before they carried the offset are read as before.
        assert_eq!(
            checkpoint_id("rec/000000000007"),
            Some(CheckpointId {
                seq: 7,
                offset: None,
                pcm16: true,
            })
        );
        for other in [
            "call",
            "rec/12",
            "rec/00000000001x",
            "rec-tries",
            "rec-stored",
            "rec/0000000000001",
            "rec/000000000001-",
            "rec/000000000001-12",
            "rec/000000000001-00000000001x",
            "rec/000000000001-0000000000001",
            "rec/000000000001-000000000001-000000000001",
            "rec/-000000000001",
            "rec/000000000001u",
            "rec/000000000001-000000000001uu",
        ] {
            assert_eq!(checkpoint_seq(other), None, "{other}");
        }
    }

    /// Left and right channels of interleaved μ-law, decoded.
    fn channels(audio: &[u8]) -> (Vec<i16>, Vec<i16>) {
        assert_eq!(audio.len() % 2, 0, "whole stereo frames");
        audio
            .chunks(2)
            .map(|f| (ulaw_to_linear(f[0]), ulaw_to_linear(f[1])))
            .unzip()
    }

    fn decoded(mulaw: &[u8]) -> Vec<i16> {
        mulaw.iter().map(|&b| ulaw_to_linear(b)).collect()
    }

    /// Recognisable μ-law with no silent byte (0xFF and 0x7F both decode to 0).
    fn tone(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| match seed.wrapping_add(i as u8) {
                0xFF | 0x7F => 0x10,
                b => b,
            })
            .collect()
    }

    /// Everything the recorder gives until the call ends at `end_ms`.
    fn run(rec: &mut Recorder, end_ms: u64) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(chunk) = rec.poll(end_ms) {
            out.extend(chunk);
        }
        let (rest, _) = rec.finish(end_ms);
        out.extend(rest);
        out
    }

    #[test]
    fn mulaw_decodes_by_the_g711_table() {
        assert_eq!(ulaw_to_linear(0xFF), 0);
        assert_eq!(ulaw_to_linear(0x7F), 0);
        assert_eq!(ulaw_to_linear(0x00), -32124);
        assert_eq!(ulaw_to_linear(0x80), 32124);
        assert_eq!(ulaw_to_linear(0xFE), 8);
        assert_eq!(ulaw_to_linear(0x7E), -8);
        assert_eq!(ulaw_to_linear(0xF0), 120);
        assert_eq!(ulaw_to_linear(0x70), -120);
        assert_eq!(ulaw_to_linear(0xEF), 132);
        assert_eq!(ulaw_to_linear(0x0F), -16764);
        // Symmetric, and monotonic within each half.
        for b in 0..=0x7Fu8 {
            assert_eq!(ulaw_to_linear(b), -ulaw_to_linear(b | 0x80), "{b:#x}");
        }
        for b in 0..0x7Fu8 {
            assert!(ulaw_to_linear(b) < ulaw_to_linear(b + 1), "{b:#x}");
            assert!(ulaw_to_linear(b | 0x80) > ulaw_to_linear((b + 1) | 0x80));
        }
    }

    #[test]
    fn mulaw_encodes_back_to_the_byte_it_was_decoded_from() {
        for b in 0..=255u8 {
            let back = linear_to_ulaw(ulaw_to_linear(b));
            // 0x7F is "negative zero": zero comes back as 0xFF, the same silence.
            assert_eq!(back, if b == 0x7F { 0xFF } else { b }, "{b:#04x}");
        }
        // The ends of the 16-bit range clip to the loudest codes; values between codes go to
        // a neighbour.
        assert_eq!(linear_to_ulaw(i16::MAX), 0x80);
        assert_eq!(linear_to_ulaw(i16::MIN), 0x00);
        assert_eq!(linear_to_ulaw(0), 0xFF);
        for x in [1i16, 7, 100, 1_000, 12_345, -1, -100, -12_345] {
            let b = linear_to_ulaw(x);
            let step = (i32::from(ulaw_to_linear(b)) - i32::from(x)).abs();
            assert!(step <= i32::from(x).abs() / 16 + 8, "{x} -> {b:#04x}");
        }
    }

    #[test]
    fn the_recording_holds_the_mulaw_bytes_as_carried() {
        let mut rec = Recorder::new();
        let (caller, agent) = (tone(160, 3), tone(160, 90));
        rec.caller(0, Some(0), &caller);
        rec.agent(0, &agent);
        let (audio, duration) = rec.finish(20);
        assert_eq!(duration, 20);
        assert_eq!(audio.len() as u64, 20 * BYTES_PER_MS);
        let left: Vec<u8> = audio.iter().step_by(2).copied().collect();
        let right: Vec<u8> = audio.iter().skip(1).step_by(2).copied().collect();
        assert_eq!(left, caller, "the caller's bytes, not re-encoded");
        assert_eq!(right, agent, "the agent's bytes, not re-encoded");
        // Where nobody spoke, μ-law silence.
        let mut rec = Recorder::new();
        rec.agent(0, &agent);
        let (audio, _) = rec.finish(20);
        assert!(audio.iter().step_by(2).all(|&b| b == SILENCE));
    }

    #[test]
    fn checkpoints_of_16_bit_pcm_from_before_are_read_as_the_mulaw_they_were() {
        // Written by a version that kept 16-bit PCM (no mark on the key): each sample is a
        // μ-law byte's value, four bytes a stereo frame, the offset in those bytes.
        let mulaw = tone(1_000, 5);
        let pcm16: Vec<u8> = mulaw
            .iter()
            .flat_map(|&b| ulaw_to_linear(b).to_le_bytes())
            .collect();
        let old = "rec/000000000003-000000960000";
        assert!(checkpoint_id(old).unwrap().pcm16);
        let (id, audio) = checkpoint_audio(old, pcm16).unwrap();
        assert_eq!(
            id,
            CheckpointId {
                seq: 3,
                offset: Some(480_000),
                pcm16: false
            }
        );
        assert_eq!(audio, mulaw);
        // The oldest keys, with no offset, hold PCM too.
        let (id, audio) = checkpoint_audio("rec/000000000002", vec![0, 0, 0, 0]).unwrap();
        assert_eq!((id.seq, id.offset, id.pcm16), (2, None, false));
        assert_eq!(audio, [SILENCE, SILENCE]);
        // Ours are taken as they are.
        let key = checkpoint_key(3, 480_000);
        assert_eq!(
            checkpoint_audio(&key, mulaw.clone()),
            Some((checkpoint_id(&key).unwrap(), mulaw))
        );
        assert_eq!(checkpoint_audio("rec-tries", vec![1]), None);
        // A lost pump's end, from the last checkpoint: the same in either form.
        let last = |key: &str, bytes: u64| {
            Some(LastCheckpoint {
                id: checkpoint_id(key).unwrap(),
                bytes,
            })
        };
        let seconds = 5 * BYTES_PER_MS * 1_000;
        assert_eq!(
            lost_pump_ended_by_ms(1_000, true, last(old, 2 * seconds), 10_000_000),
            lost_pump_ended_by_ms(1_000, true, last(&key, seconds), 10_000_000),
        );
    }

    #[test]
    fn wav_header_is_byte_exact() {
        // A second of stereo μ-law: format 7, 2 channels, 8000 Hz, 16 000 bytes a second,
        // 2 bytes a frame, 8 bits a sample, no extra format bytes; 8000 sample frames.
        // Byte for byte what `sox -n -r 8000 -c 2 -e u-law -b 8 x.wav synth 1 sine 440`
        // writes before its samples.
        let h = wav_header(16_000);
        let mut want = Vec::new();
        want.extend_from_slice(b"RIFF");
        want.extend_from_slice(&(50u32 + 16_000).to_le_bytes());
        want.extend_from_slice(b"WAVEfmt ");
        want.extend_from_slice(&[18, 0, 0, 0, 7, 0, 2, 0]);
        want.extend_from_slice(&8000u32.to_le_bytes());
        want.extend_from_slice(&16_000u32.to_le_bytes());
        want.extend_from_slice(&[2, 0, 8, 0, 0, 0]);
        want.extend_from_slice(b"fact");
        want.extend_from_slice(&4u32.to_le_bytes());
        want.extend_from_slice(&8000u32.to_le_bytes());
        want.extend_from_slice(b"data");
        want.extend_from_slice(&16_000u32.to_le_bytes());
        assert_eq!(h.to_vec(), want);
        // Too long for RIFF: clamped, never wrapped.
        let h = wav_header(u64::MAX);
        assert_eq!(&h[4..8], &u32::MAX.to_le_bytes());
        assert_eq!(&h[54..58], &(u32::MAX - 50).to_le_bytes());
        assert_eq!(&h[46..50], &((u32::MAX - 50) / 2).to_le_bytes());
    }

    #[test]
    fn caller_frames_land_where_they_arrived_and_gaps_are_silence() {
        let mut rec = Recorder::new();
        let (a, b, c) = (tone(160, 1), tone(160, 50), tone(160, 100));
        rec.caller(20, None, &a); // 20..40 ms
        rec.caller(45, None, &b); // 5 ms late: jitter, so right after a, 40..60 ms
        rec.caller(500, None, &c); // far later: a gap of silence, 500..520 ms
        let (l, r) = channels(&run(&mut rec, 600));
        assert_eq!(l.len(), 600 * 8);
        assert!(l[..160].iter().all(|&s| s == 0));
        assert_eq!(l[160..320], decoded(&a)[..]);
        assert_eq!(l[320..480], decoded(&b)[..]);
        assert!(l[480..4000].iter().all(|&s| s == 0), "gap is silence");
        assert_eq!(l[4000..4160], decoded(&c)[..]);
        assert!(l[4160..].iter().all(|&s| s == 0));
        assert!(r.iter().all(|&s| s == 0), "no agent audio");
    }

    #[test]
    fn agent_chunks_queue_like_twilios_playback_buffer() {
        let mut rec = Recorder::new();
        let (a, b, c) = (tone(800, 3), tone(800, 90), tone(80, 200));
        rec.agent(0, &a); // plays 0..100 ms
        rec.agent(50, &b); // sent while a plays: 100..200 ms
        rec.agent(300, &c); // queue empty again: 300..310 ms
        let (l, r) = channels(&run(&mut rec, 400));
        assert_eq!(r.len(), 400 * 8);
        assert_eq!(r[..800], decoded(&a)[..]);
        assert_eq!(r[800..1600], decoded(&b)[..]);
        assert!(r[1600..2400].iter().all(|&s| s == 0));
        assert_eq!(r[2400..2480], decoded(&c)[..]);
        assert!(r[2480..].iter().all(|&s| s == 0));
        assert!(l.iter().all(|&s| s == 0));
    }

    #[test]
    fn a_barge_in_clear_cuts_the_agent_channel_where_playback_stood() {
        let mut rec = Recorder::new();
        let greeting = tone(2_000 * 8, 7); // 2 s sent at once at 100 ms
        rec.agent(100, &greeting);
        // The caller talks from 600 ms on; the clear goes out at 700 ms.
        let mut t = 600;
        while t < 1_000 {
            rec.caller(t, None, &tone(160, t as u8));
            t += 20;
        }
        // Polling before the clear hands out only what has already played.
        let mut pcm = Vec::new();
        while let Some(c) = rec.poll(699) {
            pcm.extend(c);
        }
        assert!(pcm.len() as u64 <= 699 * BYTES_PER_MS);
        rec.clear(700);
        // Audio sent after the cut plays from when it was sent.
        let after = tone(400, 33);
        rec.agent(900, &after);
        while let Some(c) = rec.poll(2_000) {
            pcm.extend(c);
        }
        pcm.extend(rec.finish(2_500).0);
        let (l, r) = channels(&pcm);
        assert_eq!(r.len(), 2_500 * 8);
        assert!(r[..800].iter().all(|&s| s == 0));
        assert_eq!(
            r[800..5600],
            decoded(&greeting[..600 * 8])[..],
            "heard up to the cut"
        );
        assert!(
            r[5600..7200].iter().all(|&s| s == 0),
            "silence after the cut"
        );
        assert_eq!(r[7200..7600], decoded(&after)[..]);
        assert!(r[7600..].iter().all(|&s| s == 0), "the rest was never sent");
        assert!(l[4800..8000].iter().any(|&s| s != 0), "the caller is there");
    }

    #[test]
    fn a_clear_drops_whatever_was_still_queued_at_the_end() {
        let mut rec = Recorder::new();
        rec.agent(0, &tone(8_000, 1)); // 1 s
        let (pcm, duration) = rec.finish(400);
        assert_eq!(duration, 400);
        let (_, r) = channels(&pcm);
        assert_eq!(r.len(), 3_200, "audio queued past the end was never heard");
    }

    #[test]
    fn nothing_is_handed_out_that_could_still_change() {
        let mut rec = Recorder::new();
        rec.agent(0, &tone(8 * 6_000, 9)); // 6 s queued
        assert_eq!(rec.poll(500), None, "less than a chunk settled");
        // The caller has sent nothing: a frame the network holds may still come and land
        // up to CALLER_STALL_MS back, so only what lies further back is settled.
        assert_eq!(rec.poll(CALLER_STALL_MS + 900), None);
        let first = rec.poll(CALLER_STALL_MS + 1_100).expect("1.1 s settled");
        assert_eq!(first.len() as u64, 1_100 * BYTES_PER_MS);
        assert_eq!(rec.poll(CALLER_STALL_MS + 1_100), None);
        assert_eq!(rec.emitted_ms(), 1_100);
        // A caller frame arriving now (30 ms after Twilio stamped it) lands at its arrival,
        // after what was handed out.
        let at = CALLER_STALL_MS + 1_150;
        rec.caller(at, Some(at - 30), &tone(160, 4));
        let (rest, duration) = rec.finish(at + 100);
        assert_eq!(duration, at + 100);
        let (l, _) = channels(&rest);
        let from = ms(at - 1_100);
        assert!(l[..from].iter().all(|&s| s == 0));
        assert_eq!(l[from..from + 160], decoded(&tone(160, 4))[..]);
    }

    fn ms(t: u64) -> usize {
        (t * SAMPLES_PER_MS) as usize
    }

    /// Feeds `frames` (stamp, arrival, audio), in order, polling at every 20 ms of the clock
    /// from `from_ms` on, as the call machine does on its other inputs; what is handed out,
    /// and the rest once the call ends at `end_ms`.
    fn play(
        rec: &mut Recorder,
        frames: &[(u64, u64, Vec<u8>)],
        from_ms: u64,
        end_ms: u64,
    ) -> Vec<u8> {
        let mut out = play_on(rec, frames, from_ms, end_ms);
        out.extend(rec.finish(end_ms).0);
        out
    }

    /// [`play`] up to `until_ms`, with the call still going: what was handed out by then.
    fn play_on(
        rec: &mut Recorder,
        frames: &[(u64, u64, Vec<u8>)],
        from_ms: u64,
        until_ms: u64,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        let mut next = 0;
        let mut t = from_ms;
        while t <= until_ms {
            while next < frames.len() && frames[next].1 <= t {
                let (stamp, arrives, audio) = &frames[next];
                rec.caller(*arrives, Some(*stamp), audio);
                next += 1;
            }
            while let Some(chunk) = rec.poll(t) {
                out.extend(chunk);
            }
            t += 20;
        }
        assert_eq!(next, frames.len(), "every frame fed");
        out
    }

    /// Twilio's 20 ms frames for `0..until_ms` of its stream, each arriving `latency_ms`
    /// after its stamp unless `held` says when it comes instead.
    fn twilio_frames(
        until_ms: u64,
        latency_ms: u64,
        held: impl Fn(u64) -> Option<u64>,
    ) -> Vec<(u64, u64, Vec<u8>)> {
        (0..until_ms)
            .step_by(20)
            .map(|ts| {
                let arrives = held(ts + latency_ms).unwrap_or(ts + latency_ms);
                (ts, arrives, tone(160, (ts / 20) as u8))
            })
            .collect()
    }

    /// A stall of less than CALLER_STALL_MS: the frames TCP held come in a burst, and each
    /// still lands where its stamp says, against the agent's audio as it played; nothing
    /// after the stall moves.
    #[test]
    fn frames_held_up_by_the_network_land_at_their_stamps() {
        let stall = 1_000..1_000 + CALLER_STALL_MS - 100;
        let frames = twilio_frames(8_000, 30, |due| stall.contains(&due).then_some(stall.end));
        let mut rec = Recorder::new();
        let reply = tone(8 * 1_000, 77);
        rec.agent(1_500, &reply); // the agent talks during the stall
        let (l, r) = channels(&play(&mut rec, &frames, 0, 8_100));
        assert_eq!(l.len(), ms(8_100));
        assert!(l[..ms(30)].iter().all(|&s| s == 0));
        for (ts, _, audio) in &frames {
            let at = ms(30 + ts); // the first frame came 30 ms after its stamp
            assert_eq!(l[at..at + 160], decoded(audio)[..], "frame stamped {ts}");
        }
        assert_eq!(r[ms(1_500)..ms(2_500)], decoded(&reply)[..]);
        assert_eq!(rec.late_samples(), 0);
        assert_eq!(rec.dropped_samples(), 0);
    }

    /// The first frames held up together (a retransmit as the stream starts): they, and
    /// every frame after them, go by their stamps, not a second late for the whole call.
    #[test]
    fn a_first_frame_held_up_does_not_shift_the_caller_channel() {
        for stall_ms in [1_030, 2_500] {
            let frames = twilio_frames(10_000, 30, |due| (due < stall_ms).then_some(stall_ms));
            let mut rec = Recorder::new();
            let (l, _) = channels(&play(&mut rec, &frames, 0, 10_100));
            for (ts, _, audio) in frames.iter().filter(|f| f.0 % 1_000 == 0) {
                // At its stamp plus MAX_FIRST_FRAME_DELAY_MS: within 100 ms of when it was
                // said, though it arrived up to 2.5 s later.
                let at = ms(ts + MAX_FIRST_FRAME_DELAY_MS);
                assert_eq!(
                    l[at..at + 160],
                    decoded(audio)[..],
                    "frame stamped {ts}, stall {stall_ms}"
                );
            }
            assert_eq!(rec.late_samples(), 0);
            assert_eq!(rec.dropped_samples(), 0);
        }
        // On time, the first frame anchors the clock at its arrival as before.
        let frames = twilio_frames(3_000, 30, |_| None);
        let mut rec = Recorder::new();
        let (l, _) = channels(&play(&mut rec, &frames, 0, 3_100));
        let (_, arrived, audio) = &frames[100];
        assert_eq!(l[ms(*arrived)..ms(*arrived) + 160], decoded(audio)[..]);
    }

    /// Frames that come later than the recording waits: their place was handed out as    /// Frames that come later than the recording waits: their place was handed out as
    /// silence, so they go right after it, as early as they still can, in order and whole;
    /// they and what follows sit later than their stamps by what the wait did not cover (not
    /// by the whole stall), and are counted as late.
    #[test]
    fn frames_later_than_the_wait_are_kept_as_early_as_they_can_go() {
        let stall = 1_000..6_000;
        let frames = twilio_frames(9_000, 0, |due| stall.contains(&due).then_some(stall.end));
        let mut rec = Recorder::new();
        let mut out = Vec::new();
        // Up to the burst: what was handed out by then cannot change.
        for t in (0..stall.end).step_by(20) {
            for (ts, _, audio) in frames.iter().filter(|f| f.1 == t) {
                rec.caller(t, Some(*ts), audio);
            }
            while let Some(chunk) = rec.poll(t) {
                out.extend(chunk);
            }
        }
        let handed_out = out.clone();
        let waited_to = rec.emitted_ms();
        assert!(waited_to > stall.start, "the stall outlasted the wait");
        assert!(waited_to + CALLER_STALL_MS <= stall.end);
        let rest: Vec<_> = frames
            .iter()
            .filter(|f| f.1 >= stall.end)
            .cloned()
            .collect();
        out.extend(play(&mut rec, &rest, stall.end, 9_500));
        assert_eq!(
            out[..handed_out.len()],
            handed_out[..],
            "only ever appended"
        );
        let (l, _) = channels(&out);
        let lag = waited_to - stall.start;
        assert!(lag < stall.end - stall.start - CALLER_STALL_MS + EMIT_EVERY_MS);
        for (ts, _, audio) in &frames {
            let at = if *ts < stall.start {
                ms(*ts)
            } else {
                ms(ts + lag)
            };
            assert_eq!(l[at..at + 160], decoded(audio)[..], "frame stamped {ts}");
        }
        let late = frames.iter().filter(|f| f.0 >= stall.start).count() as u64;
        assert_eq!(rec.late_samples(), late * 160);
        assert_eq!(rec.dropped_samples(), 0);
        assert_eq!(
            l.len(),
            ms(9_000 + lag),
            "the recording runs on to the last frame"
        );
    }

    /// Frames Twilio never sent (its stamps jump): silence in their place, and what follows
    /// keeps its own.
    #[test]
    fn gaps_in_twilios_stamps_are_silence() {
        let frames: Vec<_> = twilio_frames(3_000, 20, |_| None)
            .into_iter()
            .filter(|(ts, _, _)| *ts != 400 && !(1_000..1_500).contains(ts))
            .collect();
        let mut rec = Recorder::new();
        let (l, _) = channels(&play(&mut rec, &frames, 0, 3_100));
        for (ts, _, audio) in &frames {
            let at = ms(20 + ts);
            assert_eq!(l[at..at + 160], decoded(audio)[..], "frame stamped {ts}");
        }
        assert!(l[ms(420)..ms(440)].iter().all(|&s| s == 0), "one frame");
        assert!(
            l[ms(1_020)..ms(1_520)].iter().all(|&s| s == 0),
            "half a second"
        );
        assert_eq!(rec.late_samples(), 0);
    }

    /// Stamps a few milliseconds off the 20 ms beat (rounding, jitter) are not gaps: the
    /// frames follow each other with no silence between them, and none is late; a frame
    /// missing is a gap.
    #[test]
    fn stamps_a_little_off_the_beat_are_jitter_not_gaps() {
        let offsets = [0i64, 3, -2, 9, -9, 1, 0, -4, 7, 2];
        let mut rec = Recorder::new();
        let mut frames = Vec::new();
        for (i, off) in offsets.iter().enumerate() {
            let ts = (20 * i as i64 + 100 + off) as u64;
            let audio = tone(160, 20 * i as u8);
            rec.caller(ts + 30, Some(ts), &audio);
            frames.push(audio);
        }
        // The next one is missing: the one after it is 20 ms further on.
        let last = tone(160, 222);
        rec.caller(350, Some(320), &last);
        let (l, _) = channels(&run(&mut rec, 500));
        let first = ms(130);
        let speech: Vec<i16> = frames.iter().flat_map(|f| decoded(f)).collect();
        assert_eq!(l[first..first + speech.len()], speech[..], "back to back");
        let end = first + speech.len();
        assert!(
            l[end..end + ms(20)].iter().all(|&s| s == 0),
            "the missing frame"
        );
        assert_eq!(l[end + ms(20)..end + ms(40)], decoded(&last)[..]);
        assert_eq!(rec.late_samples(), 0);
    }

    /// Frames Twilio's stamps say were placed already (the same frame delivered again: the
    /// last one, a run of earlier ones, one whose original was handed out) are left out and
    /// counted: every frame Twilio sent once sits at its stamp, nothing after a replay is
    /// pushed later, and nothing is late.
    #[test]
    fn a_frame_delivered_again_is_left_out_and_what_follows_keeps_its_place() {
        let frames = twilio_frames(8_000, 20, |_| None);
        // (after the frame stamped, the stamps sent again, when they come)
        let again: [(u64, &[u64], u64); 3] = [
            (1_000, &[1_000], 1_020),               // the last frame again, at once
            (2_000, &[1_960, 1_980, 2_000], 2_025), // the last three again
            // Further back than the recording waits: its original was handed out.
            (6_000, &[2_500], 6_020),
        ];
        let mut sent = Vec::new();
        for frame in &frames {
            sent.push(frame.clone());
            for (_, stamps, at) in again.iter().filter(|a| a.0 == frame.0) {
                for &ts in *stamps {
                    sent.push((ts, *at, frames[(ts / 20) as usize].2.clone()));
                }
            }
        }
        let mut rec = Recorder::new();
        let (l, _) = channels(&play(&mut rec, &sent, 0, 8_100));
        assert_eq!(l.len(), ms(8_100), "no longer than the call");
        for (ts, _, audio) in &frames {
            let at = ms(20 + ts);
            assert_eq!(l[at..at + 160], decoded(audio)[..], "frame stamped {ts}");
        }
        assert_eq!(rec.replayed_frames(), 5);
        assert_eq!(rec.replayed_samples(), 5 * 160);
        assert_eq!(rec.late_samples(), 0);
        assert_eq!(rec.dropped_samples(), 0);
    }

    /// A stamp further back than a replay goes ([`MAX_REPLAY_BACK_MS`]) is Twilio's clock
    /// started again, not a replay: the frame has no place left on the timeline, so it goes
    /// right after what is placed, never over audio already placed or handed out, counted as
    /// late, and so do the frames of the new clock after it; one of those delivered again is
    /// a replay on the new clock, and left out.
    #[test]
    fn a_clock_that_goes_back_further_than_a_replay_keeps_the_audio_after_it() {
        let first = twilio_frames(MAX_REPLAY_BACK_MS + 2_000, 20, |_| None);
        let mut rec = Recorder::new();
        let mut out = play_on(&mut rec, &first, 0, MAX_REPLAY_BACK_MS + 2_020);
        let placed = ms(MAX_REPLAY_BACK_MS + 2_020);
        let restarted = MAX_REPLAY_BACK_MS + 2_030;
        let (a, b) = (tone(160, 200), tone(160, 220));
        rec.caller(restarted, Some(0), &a);
        rec.caller(restarted + 20, Some(20), &b);
        rec.caller(restarted + 25, Some(20), &b); // a replay on the new clock
        out.extend(rec.finish(restarted + 100).0);
        let (l, _) = channels(&out);
        for (ts, _, audio) in &first {
            let at = ms(20 + ts);
            assert_eq!(l[at..at + 160], decoded(audio)[..], "frame stamped {ts}");
        }
        assert_eq!(
            l[placed..placed + 160],
            decoded(&a)[..],
            "after what was placed"
        );
        assert_eq!(l[placed + 160..placed + 320], decoded(&b)[..]);
        assert!(l[placed + 320..].iter().all(|&s| s == 0), "b once");
        assert_eq!(rec.late_samples(), 320);
        assert_eq!(rec.replayed_frames(), 1);
    }

    /// Frames with no stamp among stamped ones are placed where they arrived.
    #[test]
    fn a_frame_with_no_stamp_goes_where_it_arrived() {
        let mut rec = Recorder::new();
        let (a, b, c, d) = (tone(160, 1), tone(160, 60), tone(160, 120), tone(160, 180));
        rec.caller(20, Some(0), &a); // 20..40 ms
        rec.caller(45, None, &b); // jitter: right after a, 40..60 ms
        rec.caller(300, None, &c); // later than the slack: at its arrival
        rec.caller(320, Some(300), &d); // stamped again: where its stamp says
        let (l, _) = channels(&run(&mut rec, 400));
        assert_eq!(l[ms(20)..ms(40)], decoded(&a)[..]);
        assert_eq!(l[ms(40)..ms(60)], decoded(&b)[..]);
        assert!(l[ms(60)..ms(300)].iter().all(|&s| s == 0));
        assert_eq!(l[ms(300)..ms(320)], decoded(&c)[..]);
        assert_eq!(l[ms(320)..ms(340)], decoded(&d)[..]);
        assert_eq!(rec.late_samples(), 0);
    }

    /// A stamp far ahead of the clock (a lying or flooding peer) is left out and counted, as
    /// unstamped flooding is; no stamp, however large, panics or loses the frames after it.
    #[test]
    fn stamps_far_ahead_of_the_clock_are_left_out_and_counted() {
        let mut rec = Recorder::new();
        let (a, b, c) = (tone(160, 1), tone(160, 60), tone(160, 120));
        rec.caller(20, Some(0), &a);
        rec.caller(40, Some(MAX_CALLER_AHEAD_MS + 1_000), &tone(160, 9));
        rec.caller(40, Some(u64::MAX), &tone(160, 9));
        assert_eq!(rec.dropped_samples(), 320);
        rec.caller(40, Some(20), &b); // the next honest frame keeps its place
                                      // Ahead of the clock but within the bound: kept, at its stamp.
        rec.caller(60, Some(MAX_CALLER_AHEAD_MS - 1_000), &c);
        assert_eq!(rec.dropped_samples(), 320);
        let (pcm, duration) = rec.finish(100);
        assert_eq!(duration, MAX_CALLER_AHEAD_MS - 1_000 + 40);
        let (l, _) = channels(&pcm);
        assert_eq!(l[ms(20)..ms(40)], decoded(&a)[..]);
        assert_eq!(l[ms(40)..ms(60)], decoded(&b)[..]);
        let at = ms(MAX_CALLER_AHEAD_MS - 1_000 + 20);
        assert_eq!(l[at..at + 160], decoded(&c)[..]);

        // Twenty seconds of frames at once, honestly stamped: ten are kept.
        let mut rec = Recorder::new();
        for ts in (0..20_000).step_by(20) {
            rec.caller(0, Some(ts), &tone(160, 3));
        }
        assert_eq!(
            rec.dropped_samples(),
            ms(20_000 - MAX_CALLER_AHEAD_MS - 20) as u64
        );

        // A first frame stamped absurdly far ahead ties the clocks there: the honest stamps
        // after it have no place, so each follows the previous frame; nothing is lost.
        let mut rec = Recorder::new();
        rec.caller(20, Some(u64::MAX), &a);
        rec.caller(40, Some(20), &b);
        rec.caller(60, Some(40), &c);
        let (pcm, duration) = rec.finish(100);
        assert_eq!(duration, 100);
        let (l, _) = channels(&pcm);
        assert_eq!(l[ms(20)..ms(40)], decoded(&a)[..]);
        assert_eq!(l[ms(40)..ms(60)], decoded(&b)[..]);
        assert_eq!(l[ms(60)..ms(80)], decoded(&c)[..]);
        assert_eq!(rec.dropped_samples(), 0);
    }

    /// The first stamped frame lands at its arrival whatever its stamp (Twilio's clock may
    /// have started before ours); the recording ends at the call's end, or at the caller's
    /// last audio when Twilio's stamps put that later.
    #[test]
    fn the_first_stamp_ties_the_clocks_and_the_end_covers_the_last_frame() {
        let mut rec = Recorder::new();
        let (a, b) = (tone(160, 1), tone(160, 60));
        rec.caller(50, Some(5_000), &a); // lands at 50 ms
        rec.caller(60, Some(5_100), &b); // 100 ms on Twilio's clock later: 150 ms
        let (pcm, duration) = rec.finish(120);
        assert_eq!(duration, 170, "the last frame's end");
        let (l, _) = channels(&pcm);
        assert!(l[..ms(50)].iter().all(|&s| s == 0));
        assert_eq!(l[ms(50)..ms(70)], decoded(&a)[..]);
        assert!(l[ms(70)..ms(150)].iter().all(|&s| s == 0));
        assert_eq!(l[ms(150)..ms(170)], decoded(&b)[..]);

        let mut rec = Recorder::new();
        rec.caller(50, Some(0), &a);
        let (_, duration) = rec.finish(2_000);
        assert_eq!(duration, 2_000);
    }

    /// Polled as the call goes, the recorder never hands out less than all but the last
    /// MAX_BEHIND_MS (which `lost_pump_ended_by_ms` counts on), stalls or not.
    #[test]
    fn what_is_handed_out_is_never_more_than_max_behind_the_clock() {
        let stalls = [
            (2_000, 2_500),
            (5_000, 9_000),
            (12_000, 12_020),
            (15_000, 20_000),
        ];
        let frames = twilio_frames(30_000, 40, |due| {
            stalls
                .iter()
                .find(|(from, to)| (*from..*to).contains(&due))
                .map(|&(_, to)| to)
        });
        let mut rec = Recorder::new();
        rec.agent(0, &tone(8 * 3_000, 5));
        let mut next = 0;
        let mut worst = 0;
        for t in (0..=30_000).step_by(20) {
            while next < frames.len() && frames[next].1 <= t {
                let (stamp, arrives, audio) = &frames[next];
                rec.caller(*arrives, Some(*stamp), audio);
                next += 1;
            }
            while rec.poll(t).is_some() {}
            worst = worst.max(t - rec.emitted_ms());
        }
        assert!(worst <= MAX_BEHIND_MS, "{worst} ms behind");
        assert!(worst > CALLER_STALL_MS, "the long stalls were waited on");
    }

    #[test]
    fn base64_payloads_are_decoded_and_bad_ones_refused() {
        let engine = base64::engine::general_purpose::STANDARD;
        let mut rec = Recorder::new();
        assert!(rec.caller_base64(0, None, &engine.encode(tone(160, 2))));
        assert!(rec.agent_base64(0, &engine.encode(tone(160, 5))));
        assert!(!rec.caller_base64(20, None, "not base64!"));
        let (pcm, duration) = rec.finish(20);
        assert_eq!(duration, 20);
        let (l, r) = channels(&pcm);
        assert_eq!(l, decoded(&tone(160, 2)));
        assert_eq!(r, decoded(&tone(160, 5)));
    }

    #[test]
    fn a_two_hour_call_stays_small_and_comes_out_whole() {
        let mut rec = Recorder::new();
        let mut parts = Parts::new(MIN_PART_BYTES);
        let mut uploaded = Vec::new();
        let frame = tone(160, 11);
        let reply = tone(8 * 8_000, 21); // 8 s of agent audio, sent at once
        let end = 2 * 3_600_000;
        let mut max_buffered = 0;
        let mut max_held = 0;
        let mut max_held_released = 0;
        // Each chunk is checkpointed and written at once: part 1 leaves memory once full.
        let mut copies = FirstPart::new(MIN_PART_BYTES);
        let mut seq = 0;
        let mut held = Vec::new();
        let mut t = 0;
        while t < end {
            t += 20;
            // Frames are stamped 20 ms before they arrive. Now and then one is lost, and
            // every ten minutes the network holds them for two seconds.
            if t > 2_000 && t % 600_000 < 2_000 {
                held.push(t - 20);
            } else {
                for stamp in held.drain(..) {
                    rec.caller(t, Some(stamp), &frame);
                }
                if t % 60_000 != 0 {
                    rec.caller(t, Some(t - 20), &frame);
                }
            }
            if t % 30_000 == 0 {
                rec.agent(t, &reply);
            }
            if t % 90_000 == 4_000 {
                rec.clear(t); // a barge-in now and then
            }
            while let Some(chunk) = rec.poll(t) {
                parts.push(&chunk);
                copies.taken(seq, chunk.len());
                copies.written(seq);
                seq += 1;
            }
            while let Some(p) = parts.poll_part() {
                uploaded.push((p.number, p.len()));
            }
            max_buffered = max_buffered.max(rec.buffered_bytes());
            max_held = max_held.max(parts.held_bytes());
            if parts.release_first(&copies) {
                max_held_released = max_held_released.max(parts.held_bytes());
            }
        }
        let (rest, duration) = rec.finish(end);
        parts.push(&rest);
        assert_eq!(duration, end);
        assert_eq!(parts.data_bytes(), end * BYTES_PER_MS);
        assert!(
            max_buffered < 256 * 1024,
            "the recorder held {max_buffered} bytes"
        );
        assert!(
            max_held <= 2 * MIN_PART_BYTES,
            "the parts held {max_held} bytes"
        );
        assert!(
            max_held_released <= MIN_PART_BYTES,
            "the parts held {max_held_released} bytes once part 1 was released"
        );
        let last = parts.finish();
        assert!(last.iter().all(|p| p.number > 1));
        let first = copies.rebuild(end * BYTES_PER_MS).unwrap();
        assert_eq!(first.wants(), Some(0));
        let total: u64 = MIN_PART_BYTES as u64
            + uploaded.iter().map(|(_, n)| *n as u64).sum::<u64>()
            + last.iter().map(|p| p.len() as u64).sum::<u64>();
        assert_eq!(total, HEADER_BYTES as u64 + end * BYTES_PER_MS);
        assert!(uploaded.iter().all(|(_, n)| *n == MIN_PART_BYTES));
        assert_eq!(rec.dropped_samples(), 0);
        assert_eq!(rec.late_samples(), 0);
    }

    #[test]
    fn parts_are_equal_sized_but_the_last_and_reassemble_to_the_file() {
        for part_size in [100usize, 257, 1_000] {
            for total in [0usize, 10, 55, 56, 99, 100, 1_999, 5_000] {
                let data: Vec<u8> = (0..total).map(|i| (i * 7) as u8).collect();
                let mut parts = Parts::new(part_size);
                let mut got = Vec::new();
                for chunk in data.chunks(37) {
                    parts.push(chunk);
                    while let Some(p) = parts.poll_part() {
                        got.push(p);
                    }
                    assert!(parts.held_bytes() <= 2 * part_size.max(64 * 1024));
                }
                assert_eq!(parts.file_bytes(), (HEADER_BYTES + total) as u64);
                got.extend(parts.finish());
                got.sort_by_key(|p| p.number);
                let numbers: Vec<u16> = got.iter().map(|p| p.number).collect();
                assert_eq!(numbers, (1..=got.len() as u16).collect::<Vec<_>>());
                let (last, rest) = got.split_last().unwrap();
                assert!(rest.iter().all(|p| p.len() == part_size));
                assert!(!last.is_empty() && last.len() <= part_size);
                let file: Vec<u8> = got.iter().flat_map(Part::to_bytes).collect();
                assert_eq!(file[..HEADER_BYTES], wav_header(total as u64));
                assert_eq!(file[HEADER_BYTES..], data[..], "{part_size} {total}");
            }
        }
    }

    #[test]
    fn parts_are_held_in_pieces_allocated_once_at_their_size() {
        let mut parts = Parts::new(MIN_PART_BYTES);
        let second = 32_000; // the recorder hands out about a second at a time
        let block: Vec<u8> = (0..second).map(|i| (i % 251) as u8).collect();
        let mut got = Vec::new();
        // Three parts and a bit: 5 MiB is about 164 s of stereo audio.
        for _ in 0..500 {
            parts.push(&block);
            got.extend(std::iter::from_fn(|| parts.poll_part()));
            // Every piece was allocated at its full size: never more held than a piece of
            // slack per part being filled.
            let held = parts.held_bytes();
            let data = parts.file_bytes() as usize - got.iter().map(Part::len).sum::<usize>();
            assert!(held <= data + 2 * PIECE_BYTES, "{held} held for {data}");
        }
        got.extend(parts.finish());
        assert_eq!(got.len(), 4);
        for part in &got {
            let (last, full) = part.pieces.split_last().unwrap();
            assert!(full
                .iter()
                .all(|p| p.len() == PIECE_BYTES && p.capacity() == PIECE_BYTES));
            assert!(!last.is_empty() && last.len() <= PIECE_BYTES);
        }
        got.sort_by_key(|p| p.number);
        let file: Vec<u8> = got.iter().flat_map(Part::to_bytes).collect();
        assert_eq!(file[..HEADER_BYTES], wav_header(500 * second as u64));
        assert!(file[HEADER_BYTES..]
            .chunks(second)
            .all(|c| c == &block[..c.len()]));
    }

    /// The pump and the writer of one recording, as the shell runs them: the pump checkpoints
    /// its audio whenever [`CHECKPOINT_BYTES`] or more is unsaved (so checkpoints are not all
    /// one size and rarely end where part 1 does) and writes land when `land` is called; the
    /// writer's [`Parts`] releases part 1 when it may. `held` is the same audio with part 1
    /// never released: what the writer held before part 1 could be released.
    struct Pipe {
        copies: FirstPart,
        storage: std::collections::BTreeMap<u64, Vec<u8>>,
        pending: Vec<u64>,
        unsaved: Vec<u8>,
        next_seq: u64,
        live: Parts,
        held: Parts,
        uploaded: Vec<Part>,
    }

    impl Pipe {
        fn new(part_size: usize) -> Self {
            Self {
                copies: FirstPart::new(part_size),
                storage: Default::default(),
                pending: Vec::new(),
                unsaved: Vec::new(),
                next_seq: 0,
                live: Parts::new(part_size),
                held: Parts::new(part_size),
                uploaded: Vec::new(),
            }
        }

        fn save(&mut self) {
            if self.unsaved.is_empty() {
                return;
            }
            let seq = self.next_seq;
            self.next_seq += 1;
            self.copies.taken(seq, self.unsaved.len());
            self.storage.insert(seq, std::mem::take(&mut self.unsaved));
            self.pending.push(seq);
        }

        /// A chunk of the recording: checkpointed, then to the writer.
        fn data(&mut self, pcm: &[u8]) {
            self.unsaved.extend_from_slice(pcm);
            if self.unsaved.len() >= CHECKPOINT_BYTES {
                self.save();
            }
            self.live.push(pcm);
            self.held.push(pcm);
            while let Some(p) = self.live.poll_part() {
                self.uploaded.push(p);
            }
            while self.held.poll_part().is_some() {}
            self.live.release_first(&self.copies);
        }

        /// Every write under way lands.
        fn land(&mut self) {
            for seq in std::mem::take(&mut self.pending) {
                self.copies.written(seq);
            }
            self.live.release_first(&self.copies);
        }

        /// Part 1 as rebuilt from the checkpoints, read back in batches of 16 as the shell does.
        fn rebuild(&self) -> Result<Part, RebuildError> {
            let mut rebuild = self.copies.rebuild(self.live.data_bytes())?;
            while let Some(from) = rebuild.wants() {
                let batch: Vec<_> = self.storage.range(from..).take(16).collect();
                if batch.is_empty() {
                    break;
                }
                for (&seq, pcm) in batch {
                    if rebuild.wants().is_none() {
                        break;
                    }
                    rebuild.push(seq, pcm)?;
                }
            }
            rebuild.finish()
        }
    }

    /// Recorder-like chunks: whole stereo frames, 1 to 4 s, not all one size.
    fn chunks(total: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut at = 0usize;
        let mut i = 0usize;
        while at < total {
            let second = (1_000 * BYTES_PER_MS) as usize;
            let frame = FRAME_BYTES as usize;
            let len = (second + (i * 7_919 % (3 * second + 1))) / frame * frame;
            let len = len.min(total - at);
            out.push(
                (at..at + len)
                    .map(|b| (b % 251) as u8 ^ (b >> 16) as u8)
                    .collect(),
            );
            at += len;
            i += 1;
        }
        out
    }

    #[test]
    fn part_1_rebuilt_from_the_checkpoints_is_byte_for_byte_what_was_held() {
        let aligned = HEADER_BYTES + 3 * CHECKPOINT_BYTES;
        for (part_size, seconds) in [
            (MIN_PART_BYTES, 170),
            (MIN_PART_BYTES, 400),
            (aligned, 20),
            (aligned + 4, 20),
            (HEADER_BYTES + 100, 3),
        ] {
            let mut pipe = Pipe::new(part_size);
            let mut chunk_sizes = Vec::new();
            for chunk in chunks(seconds * 32_000) {
                chunk_sizes.push(chunk.len());
                pipe.data(&chunk);
                pipe.land();
            }
            // Done: the tail is checkpointed too.
            pipe.save();
            pipe.land();
            assert!(pipe.live.first_released(), "{part_size}");
            let rebuilt = pipe.rebuild().expect("rebuilt");
            let mut rest = pipe.live.finish();
            assert!(rest.iter().all(|p| p.number > 1), "part 1 is not held");
            let mut held = pipe.held.finish();
            assert_eq!(held[0].number, 1);
            assert_eq!(rebuilt.len(), part_size);
            assert!(rebuilt.to_bytes() == held[0].to_bytes(), "{part_size}");
            assert_eq!(rebuilt, held.remove(0), "the same pieces too");
            assert_eq!(rest, held, "the other parts are untouched");
            // The whole file reassembles to the header and the audio.
            let mut all = pipe.uploaded;
            all.append(&mut rest);
            all.push(rebuilt);
            all.sort_by_key(|p| p.number);
            let file: Vec<u8> = all.iter().flat_map(Part::to_bytes).collect();
            let audio: Vec<u8> = chunks(seconds * 32_000).concat();
            assert_eq!(file[..HEADER_BYTES], wav_header(audio.len() as u64));
            assert!(file[HEADER_BYTES..] == audio[..]);
        }
        // The real sizes: part 1 ends partway into a checkpoint.
        assert_ne!((MIN_PART_BYTES - HEADER_BYTES) % CHECKPOINT_BYTES, 0);
    }

    #[test]
    fn part_1_leaves_memory_only_once_every_checkpoint_of_it_is_written() {
        let mut pipe = Pipe::new(MIN_PART_BYTES);
        let chunk = vec![0x42; 32_000];
        // 170 s with no write landing: part 1 (and the part after it) stay.
        for _ in 0..170 {
            pipe.data(&chunk);
        }
        assert!(!pipe.live.first_released());
        assert!(pipe.live.held_bytes() > MIN_PART_BYTES);
        // The writes land out of order: the last one of part 1 first, then all but one.
        let pending = std::mem::take(&mut pipe.pending);
        let last_of_part_1 = ((MIN_PART_BYTES - HEADER_BYTES) / CHECKPOINT_BYTES) as u64;
        pipe.copies.written(last_of_part_1);
        assert!(!pipe.live.release_first(&pipe.copies));
        for &seq in &pending[1..] {
            pipe.copies.written(seq);
        }
        assert!(
            !pipe.live.release_first(&pipe.copies),
            "checkpoint 0 is not written"
        );
        pipe.copies.written(pending[0]);
        assert!(pipe.live.release_first(&pipe.copies));
        assert!(
            pipe.live.held_bytes() < MIN_PART_BYTES / 4,
            "only part 2 so far"
        );
        // Checkpoints written but part 1 not yet full: it stays until it is.
        let mut short = Pipe::new(MIN_PART_BYTES);
        for _ in 0..100 {
            short.data(&chunk);
            short.land();
        }
        assert!(!short.live.first_released());
        assert!(!short.copies.may_release());
    }

    #[test]
    fn a_lost_checkpoint_of_part_1_keeps_it_in_memory_to_the_end() {
        let mut pipe = Pipe::new(MIN_PART_BYTES);
        let chunk = vec![0x17; 32_000];
        for _ in 0..10 {
            pipe.data(&chunk);
        }
        let lost = pipe.pending.remove(0);
        assert!(pipe.copies.lost(lost), "it held audio of part 1");
        for _ in 0..200 {
            pipe.data(&chunk);
            pipe.land();
        }
        assert!(!pipe.live.first_released());
        assert!(!pipe.copies.may_release());
        assert_eq!(
            pipe.copies.rebuild(pipe.live.data_bytes()).unwrap_err(),
            RebuildError::NotInCheckpoints
        );
        // Part 1 comes out of memory whole, as before.
        let parts = pipe.live.finish();
        assert_eq!(parts[0].number, 1);
        assert_eq!(parts[0].to_bytes(), pipe.held.finish()[0].to_bytes());
        // A checkpoint lost after part 1's audio does not hold part 1 back.
        let mut pipe = Pipe::new(MIN_PART_BYTES);
        for _ in 0..200 {
            pipe.data(&chunk);
        }
        let after = *pipe.pending.last().unwrap();
        assert!(!pipe.copies.lost(after), "no audio of part 1");
        pipe.land();
        assert!(pipe.live.first_released());
        assert!(pipe.rebuild().is_ok());
    }

    #[test]
    fn checkpoints_read_back_wrong_are_refused_not_used() {
        // Checkpoints 0 to 4 of 5 s each; part 1 ends 4 bytes into checkpoint 3.
        let mut pipe = Pipe::new(HEADER_BYTES + 3 * CHECKPOINT_BYTES + 4);
        for i in 0..25u8 {
            pipe.data(&[i; (1_000 * BYTES_PER_MS) as usize]);
            pipe.land();
        }
        assert_eq!(pipe.storage.len(), 5);
        assert!(pipe.live.first_released());
        assert!(pipe.rebuild().is_ok());
        // Shorter than written (a torn write, another recording's copy).
        let mut bad = pipe.storage.clone();
        bad.get_mut(&1).unwrap().pop();
        std::mem::swap(&mut pipe.storage, &mut bad);
        assert!(matches!(
            pipe.rebuild(),
            Err(RebuildError::WrongLength { seq: 1, .. })
        ));
        std::mem::swap(&mut pipe.storage, &mut bad);
        // Missing: the batch skips to the next one, or the storage ends.
        let mut bad = pipe.storage.clone();
        bad.remove(&2);
        std::mem::swap(&mut pipe.storage, &mut bad);
        assert_eq!(
            pipe.rebuild().unwrap_err(),
            RebuildError::OutOfOrder {
                expected: 2,
                got: 3
            }
        );
        pipe.storage.retain(|&seq, _| seq < 3);
        assert_eq!(
            pipe.rebuild().unwrap_err(),
            RebuildError::Missing { seq: 2 }
        );
        std::mem::swap(&mut pipe.storage, &mut bad);
        // Nothing after part 1 is taken in.
        let mut rebuild = pipe.copies.rebuild(pipe.live.data_bytes()).unwrap();
        while let Some(seq) = rebuild.wants() {
            rebuild.push(seq, &pipe.storage[&seq]).unwrap();
        }
        assert_eq!(
            rebuild.push(4, &pipe.storage[&4]),
            Err(RebuildError::Unwanted { seq: 4 })
        );
        assert!(rebuild.finish().is_ok());
    }

    #[test]
    fn a_recording_of_one_part_or_less_keeps_its_shape() {
        // Shorter than a part: part 1 is never released; finish gives the one part.
        let mut pipe = Pipe::new(MIN_PART_BYTES);
        for chunk in chunks(60 * 32_000) {
            pipe.data(&chunk);
            pipe.land();
        }
        pipe.save();
        pipe.land();
        assert!(!pipe.live.first_released());
        let parts = pipe.live.finish();
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].to_bytes(), pipe.held.finish()[0].to_bytes());
        // Exactly one part of audio: released, nothing else to upload, rebuilt whole.
        let part_size = HEADER_BYTES + 3 * CHECKPOINT_BYTES + 8;
        let mut pipe = Pipe::new(part_size);
        pipe.data(&vec![5; part_size - HEADER_BYTES]);
        pipe.save();
        pipe.land();
        assert!(pipe.live.first_released());
        let rebuilt = pipe.rebuild().unwrap();
        assert!(pipe.live.finish().is_empty());
        assert_eq!(rebuilt.to_bytes(), pipe.held.finish()[0].to_bytes());
    }

    // ---- the recording from its checkpoints ----

    type Storage = std::collections::BTreeMap<String, Vec<u8>>;

    /// The checkpoints of a recording of `total` bytes as the pump writes them: whenever
    /// [`CHECKPOINT_BYTES`] or more is unsaved (5 s or a little more each), then the tail,
    /// under keys that say where each starts. And the audio they hold.
    fn checkpointed(total: usize) -> (Storage, Vec<u8>) {
        let mut storage = Storage::new();
        let mut unsaved = Vec::new();
        let mut offset = 0;
        let mut save = |unsaved: &mut Vec<u8>| {
            if !unsaved.is_empty() {
                let key = checkpoint_key(storage.len() as u64, offset);
                offset += unsaved.len() as u64;
                storage.insert(key, std::mem::take(unsaved));
            }
        };
        for chunk in chunks(total) {
            unsaved.extend(chunk);
            if unsaved.len() >= CHECKPOINT_BYTES {
                save(&mut unsaved);
            }
        }
        save(&mut unsaved);
        (storage, chunks(total).concat())
    }

    /// The same checkpoints under keys that do not say where they start (as written before
    /// keys said so).
    fn without_offsets(storage: &Storage) -> Storage {
        storage
            .iter()
            .map(|(k, v)| (checkpoint_from(checkpoint_seq(k).unwrap()), v.clone()))
            .collect()
    }

    fn without(storage: &Storage, missing: &[u64]) -> Storage {
        let mut s = storage.clone();
        s.retain(|k, _| !missing.contains(&checkpoint_seq(k).unwrap()));
        s
    }

    /// Where checkpoint `seq` starts and how long it is.
    fn span(storage: &Storage, seq: u64) -> std::ops::Range<usize> {
        let (k, v) = storage
            .iter()
            .find(|(k, _)| checkpoint_seq(k) == Some(seq))
            .unwrap();
        let at = checkpoint_id(k).unwrap().offset.unwrap() as usize;
        at..at + v.len()
    }

    /// What the recovery stores from `storage`, as the shell and its writer run it: the
    /// checkpoints read `batch` at a time from [`Refill::from`] on, silence sent a checkpoint at
    /// a time for each gap, the parts cut as it goes with part 1 released once it may, and
    /// part 1 made again from the checkpoints at the end. The file, the gaps, and whether part
    /// 1 was made again.
    fn recovered(storage: &Storage, part_size: usize, batch: usize) -> (Vec<u8>, Vec<Gap>, bool) {
        let mut refill = Refill::new();
        let mut first = FirstPart::new(part_size);
        let mut parts = Parts::new(part_size);
        let mut all = Vec::new();
        let mut feed = |pcm: &[u8], parts: &mut Parts, first: &FirstPart| {
            parts.push(pcm);
            all.extend(std::iter::from_fn(|| parts.poll_part()));
            parts.release_first(first);
        };
        loop {
            let read: Vec<(CheckpointId, Vec<u8>)> = storage
                .range(checkpoint_from(refill.from())..)
                .take(batch)
                .map(|(k, v)| (checkpoint_id(k).unwrap(), v.clone()))
                .collect();
            if read.is_empty() {
                break;
            }
            for (id, pcm) in read {
                match refill.push(id, pcm.len(), &mut first) {
                    Place::AfterGap(gap) => {
                        let mut left = gap.bytes;
                        while left > 0 {
                            let n = left.min(CHECKPOINT_BYTES as u64);
                            feed(&vec![SILENCE; n as usize], &mut parts, &first);
                            left -= n;
                        }
                    }
                    Place::Repeat => continue,
                    Place::Next | Place::Late { .. } => {}
                }
                feed(&pcm, &mut parts, &first);
            }
        }
        assert_eq!(refill.data_bytes(), parts.data_bytes());
        let data_bytes = parts.data_bytes();
        let released = parts.first_released();
        all.extend(parts.finish());
        if released {
            let mut rebuild = first
                .rebuild(data_bytes)
                .expect("part 1 from the checkpoints");
            while let Some(from) = rebuild.wants() {
                let read: Vec<_> = storage.range(checkpoint_from(from)..).take(4).collect();
                assert!(!read.is_empty());
                for (k, pcm) in read {
                    if rebuild.wants().is_none() {
                        break;
                    }
                    rebuild.push(checkpoint_seq(k).unwrap(), pcm).unwrap();
                }
            }
            all.push(rebuild.finish().unwrap());
        }
        all.sort_by_key(|p| p.number);
        let numbers: Vec<u16> = all.iter().map(|p| p.number).collect();
        assert_eq!(numbers, (1..=all.len() as u16).collect::<Vec<_>>());
        assert!(all.iter().rev().skip(1).all(|p| p.len() == part_size));
        let file = all.iter().flat_map(Part::to_bytes).collect();
        (file, refill.gaps().to_vec(), released)
    }

    /// The recording as it was, with silence where `missing` were.
    fn with_silence(storage: &Storage, audio: &[u8], missing: &[u64]) -> Vec<u8> {
        let mut file = wav_header(audio.len() as u64).to_vec();
        let mut pcm = audio.to_vec();
        for &seq in missing {
            pcm[span(storage, seq)].fill(SILENCE);
        }
        file.extend(pcm);
        file
    }

    fn gap(storage: &Storage, missing: std::ops::Range<u64>) -> Gap {
        let at = span(storage, missing.start).start as u64;
        let end = span(storage, missing.end - 1).end as u64;
        Gap {
            missing,
            at,
            bytes: end - at,
            estimated: false,
        }
    }

    #[test]
    fn checkpoints_with_none_missing_are_stored_as_before_byte_for_byte() {
        for (part_size, seconds) in [
            (MIN_PART_BYTES, 60),
            (MIN_PART_BYTES, 200),
            (HEADER_BYTES + 3 * CHECKPOINT_BYTES + 4, 30),
        ] {
            let (storage, audio) = checkpointed(seconds * 32_000);
            let mut whole = wav_header(audio.len() as u64).to_vec();
            whole.extend(&audio);
            for batch in [1, 3, 16] {
                for keys in [storage.clone(), without_offsets(&storage)] {
                    let (file, gaps, _) = recovered(&keys, part_size, batch);
                    assert!(file == whole, "{part_size} {seconds} {batch}");
                    assert_eq!(gaps, []);
                }
            }
        }
    }

    #[test]
    fn a_missing_checkpoint_becomes_silence_and_the_audio_after_it_keeps_its_place() {
        let (storage, audio) = checkpointed(80 * 32_000);
        // Checkpoints are not all one length: a number alone does not say where one starts.
        let lengths: Vec<usize> = storage.values().map(Vec::len).collect();
        assert!(lengths.iter().any(|&n| n > CHECKPOINT_BYTES));
        let longest = CHECKPOINT_BYTES + (MAX_CHUNK_MS * BYTES_PER_MS) as usize;
        assert!(lengths[..lengths.len() - 1]
            .iter()
            .all(|n| (CHECKPOINT_BYTES..longest).contains(n)));
        let lost = (0..storage.len() as u64)
            .find(|&seq| seq > 2 && span(&storage, seq).len() > CHECKPOINT_BYTES)
            .unwrap();
        let holed = without(&storage, &[lost]);
        let want = with_silence(&storage, &audio, &[lost]);
        for batch in [1, 2, 3, 16] {
            let (file, gaps, _) = recovered(&holed, MIN_PART_BYTES, batch);
            assert_eq!(file.len(), want.len(), "as long as the call");
            assert!(file == want, "batch {batch}");
            assert_eq!(gaps, [gap(&storage, lost..lost + 1)]);
        }
        // The audio after the gap is where it was, not closed up.
        let after = span(&storage, lost + 1);
        let (file, _, _) = recovered(&holed, MIN_PART_BYTES, 16);
        assert!(file[HEADER_BYTES + after.start..HEADER_BYTES + after.end] == audio[after]);
    }

    #[test]
    fn several_gaps_each_keep_what_follows_in_place() {
        let (storage, audio) = checkpointed(120 * 32_000);
        // One alone, two together, one more; and one each side of a batch's end.
        let missing = [2, 5, 6, 9, 15, 17];
        let holed = without(&storage, &missing);
        let want = with_silence(&storage, &audio, &missing);
        for batch in [1, 2, 3, 4, 16] {
            let (file, gaps, _) = recovered(&holed, MIN_PART_BYTES, batch);
            assert!(file == want, "batch {batch}");
            assert_eq!(
                gaps,
                [
                    gap(&storage, 2..3),
                    gap(&storage, 5..7),
                    gap(&storage, 9..10),
                    gap(&storage, 15..16),
                    gap(&storage, 17..18),
                ]
            );
        }
    }

    #[test]
    fn a_gap_across_the_end_of_a_part_is_silence_in_both_and_part_1_is_still_made_again() {
        // Small parts (3 checkpoints and a bit): gaps across the ends of parts 1, 2 and 3.
        let part_size = HEADER_BYTES + 3 * CHECKPOINT_BYTES + 4;
        let (storage, audio) = checkpointed(90 * 32_000);
        let pcm_per_part = (part_size - HEADER_BYTES) as u64;
        let holding = |at: u64| {
            (0..storage.len() as u64)
                .find(|&seq| span(&storage, seq).contains(&(at as usize)))
                .unwrap()
        };
        let end_1 = holding(pcm_per_part);
        let end_2 = holding(2 * pcm_per_part);
        assert!(end_2 > end_1 + 1);
        for missing in [
            vec![end_1],
            vec![end_1 - 1, end_1, end_1 + 1],
            // Longer than a part: from within part 1 to beyond part 2.
            (end_1..=end_2 + 1).collect(),
            vec![end_1, end_2],
        ] {
            let holed = without(&storage, &missing);
            let want = with_silence(&storage, &audio, &missing);
            for batch in [1, 16] {
                let (file, _, part_1_made_again) = recovered(&holed, part_size, batch);
                assert!(part_1_made_again, "{missing:?}");
                assert!(file == want, "{missing:?} batch {batch}");
            }
        }
        // The real part size: the gap holds part 1's end.
        let (storage, audio) = checkpointed(200 * 32_000);
        let end_1 = (0..storage.len() as u64)
            .find(|&seq| span(&storage, seq).end > MIN_PART_BYTES - HEADER_BYTES)
            .unwrap();
        let missing = [end_1 - 1, end_1];
        let (file, gaps, part_1_made_again) =
            recovered(&without(&storage, &missing), MIN_PART_BYTES, 16);
        assert!(part_1_made_again);
        assert!(file == with_silence(&storage, &audio, &missing));
        assert_eq!(gaps, [gap(&storage, end_1 - 1..end_1 + 1)]);
    }

    /// Checkpoint 0's write failed (a write is only logged) and the object restarted: the
    /// recovery still uploads the recording, with silence of checkpoint 0's length first (the
    /// next key says where its audio starts), so everything after it keeps its place; the
    /// file's header, which no checkpoint holds, is made for the whole length. The same for
    /// the first few missing, in a recording of one part or several. Checkpoints whose keys
    /// do not say where they start are not: they could be the end of a stored recording.
    #[test]
    fn a_missing_first_checkpoint_becomes_silence_and_the_rest_is_recovered() {
        for (seconds, missing, holes) in [
            (200, vec![0], vec![(0, 1)]),
            (200, vec![0, 1, 2], vec![(0, 3)]),
            (30, vec![0], vec![(0, 1)]),
            (30, vec![0, 2], vec![(0, 1), (2, 3)]),
        ] {
            let (storage, audio) = checkpointed(seconds * 32_000);
            let holed = without(&storage, &missing);
            assert_eq!(
                recovery(false, first_key(&holed), 0),
                Recovery::Upload { attempt: 1 },
                "{missing:?}"
            );
            let want = with_silence(&storage, &audio, &missing);
            // Each (first, end) of the checkpoints missing together.
            let holes: Vec<Gap> = holes
                .into_iter()
                .map(|(a, b)| gap(&storage, a..b))
                .collect();
            for batch in [1, 16] {
                let (file, gaps, part_1_made_again) = recovered(&holed, MIN_PART_BYTES, batch);
                // Over a part (about 164 s): part 1 left memory and was made again, its
                // silence included.
                assert_eq!(part_1_made_again, seconds > 170, "{seconds} s");
                assert_eq!(file.len(), want.len(), "as long as the call");
                assert_eq!(file[..HEADER_BYTES], wav_header(audio.len() as u64));
                assert!(file == want, "{missing:?} batch {batch}");
                assert_eq!(gaps, holes);
            }
        }
        let (storage, _) = checkpointed(30 * 32_000);
        let old = without_offsets(&without(&storage, &[0]));
        assert_eq!(
            recovery(false, first_key(&old), 0),
            Recovery::Clear(Leftover::Partial { first: 1 })
        );
    }

    #[test]
    fn checkpoints_missing_at_the_end_only_make_the_recording_shorter() {
        let (storage, audio) = checkpointed(60 * 32_000);
        let last = storage.len() as u64 - 1;
        let holed = without(&storage, &[last - 1, last]);
        let (file, gaps, _) = recovered(&holed, MIN_PART_BYTES, 16);
        let end = span(&storage, last - 2).end;
        let mut want = wav_header(end as u64).to_vec();
        want.extend(&audio[..end]);
        assert!(file == want);
        assert_eq!(gaps, [], "nothing comes after them: nothing to fill");
    }

    /// Checkpoints written before keys said where they start: a gap's length can only be
    /// told from the numbers, [`CHECKPOINT_BYTES`] for each, the least a checkpoint held. The
    /// audio after it is at most the difference early, never late, and the gap says so.
    #[test]
    fn a_gap_in_checkpoints_without_offsets_is_estimated_from_their_numbers() {
        let (storage, audio) = checkpointed(60 * 32_000);
        let lost = (1..storage.len() as u64)
            .find(|&seq| span(&storage, seq).len() > CHECKPOINT_BYTES)
            .unwrap();
        let real = span(&storage, lost);
        let holed = without(&without_offsets(&storage), &[lost]);
        let (file, gaps, _) = recovered(&holed, MIN_PART_BYTES, 16);
        assert_eq!(
            gaps,
            [Gap {
                missing: lost..lost + 1,
                at: real.start as u64,
                bytes: CHECKPOINT_BYTES as u64,
                estimated: true,
            }]
        );
        let early = real.len() - CHECKPOINT_BYTES;
        assert_eq!(file.len(), HEADER_BYTES + audio.len() - early);
        let pcm = &file[HEADER_BYTES..];
        assert!(pcm[..real.start] == audio[..real.start]);
        assert!(pcm[real.start..real.start + CHECKPOINT_BYTES]
            .iter()
            .all(|&b| b == SILENCE));
        assert!(pcm[real.start + CHECKPOINT_BYTES..] == audio[real.end..]);
    }

    #[test]
    fn checkpoints_that_disagree_with_their_keys_are_placed_never_overlapped() {
        let mut first = FirstPart::new(MIN_PART_BYTES);
        let mut refill = Refill::new();
        let id = |seq, offset| CheckpointId {
            seq,
            offset: Some(offset),
            pcm16: false,
        };
        assert_eq!(refill.push(id(0, 0), 1_000, &mut first), Place::Next);
        // Its key says it starts 200 bytes before the one before ends: right after it.
        assert_eq!(
            refill.push(id(1, 800), 1_000, &mut first),
            Place::Late { by: 200 }
        );
        assert_eq!(refill.data_bytes(), 2_000);
        // The numbers follow on but the audio does not (the one before came back short).
        assert_eq!(
            refill.push(id(2, 2_400), 1_000, &mut first),
            Place::AfterGap(Gap {
                missing: 2..2,
                at: 2_000,
                bytes: 400,
                estimated: false
            })
        );
        // A number already read is left out.
        assert_eq!(refill.push(id(2, 2_400), 1_000, &mut first), Place::Repeat);
        assert_eq!(refill.push(id(1, 1_000), 1_000, &mut first), Place::Repeat);
        assert_eq!(refill.data_bytes(), 3_400);
        assert_eq!(refill.from(), 3);
    }

    #[test]
    fn runaway_agent_audio_is_left_out_not_held() {
        let mut rec = Recorder::new();
        let minute = tone(8 * 60_000, 1);
        for _ in 0..10 {
            rec.agent(0, &minute);
        }
        assert_eq!(
            rec.dropped_samples(),
            8 * 8 * 60_000,
            "two minutes ahead at most"
        );
        assert!(rec.buffered_bytes() < 2 * 1024 * 1024);
    }

    /// A 200 s reply streamed at 5x real time (1 s every 200 ms): Twilio plays it from 0 to
    /// 200 s. What goes past the lead cap is left out as silence, and every second that is
    /// kept sits where the caller heard it, never earlier.
    #[test]
    fn agent_audio_past_the_lead_cap_keeps_its_place() {
        let mut rec = Recorder::new();
        let mut pcm = Vec::new();
        let second = |i: u64| {
            let mut s = vec![0x10u8; 8_000];
            s[0] = (i % 100) as u8 + 1; // tells the seconds apart
            s
        };
        for i in 0..200u64 {
            let t = i * 200;
            rec.agent(t, &second(i));
            while let Some(c) = rec.poll(t) {
                pcm.extend(c);
            }
        }
        let mut t = 40_000;
        while t < 260_000 {
            while let Some(c) = rec.poll(t) {
                pcm.extend(c);
            }
            t += 20;
        }
        pcm.extend(rec.finish(260_000).0);
        let (_, r) = channels(&pcm);
        let mut kept = 0;
        for i in 0..200u64 {
            let at = (i * 8_000) as usize;
            let heard = &r[at..at + 8_000];
            if heard.iter().all(|&s| s == 0) {
                continue; // left out
            }
            assert!(heard == &decoded(&second(i))[..], "second {i} out of place");
            kept += 1;
        }
        // Twilio would hold at most MAX_AGENT_AHEAD_MS: the reply is kept until it reaches
        // that lead (second 149 would end 120.2 s ahead), and the rest is silence until it
        // would have ended.
        assert_eq!(kept, 149);
        assert_eq!(rec.dropped_samples(), 51 * 8_000);
        assert!(r[200 * 8_000..].iter().all(|&s| s == 0));
    }

    #[test]
    fn keys_come_from_the_call_sid() {
        assert_eq!(key("CA123"), "recordings/CA123.wav");
    }
}
