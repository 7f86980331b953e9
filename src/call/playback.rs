//! The playback clock: what of the agent's audio the caller has actually heard.
//!
//! Twilio plays the audio we send in order and echoes each `mark` we place after a chunk
//! once everything before it has played (or when a `clear` flushes it, which is why echoes
//! after a barge-in are ignored). Per conversation item we keep bytes received from
//! OpenAI, bytes sent to Twilio and bytes confirmed played; μ-law at 8 kHz makes every
//! 8 bytes one millisecond, so the arithmetic is exact.
//!
//! Marks are batched: every mark costs a frame each way on Twilio's socket, as much as the
//! audio itself when deltas are small. One goes after [`MARK_EVERY_BYTES`] of an item's
//! audio, before audio of another item, when the item's audio is done, and when audio has
//! waited [`MARK_EVERY_MS`] unmarked. What played is known to the byte at each mark.
//!
//! Between echoes, what played is reckoned on the clock: Twilio plays what it holds at
//! 8 bytes per ms, one piece after the other. The reckoning starts from the last echo (at
//! the time it came back, so it runs behind the truth by the echo's way back) and, for audio
//! sent after the queue had run dry, from its sending plus [`PLAY_LEAD`] (the way there and
//! Twilio's start). It is never ahead of what was sent, nor behind what was confirmed. A
//! barge-in cuts where it stands, and the call's end counts what was heard by it.

use crate::audio::{bytes_to_ms, BYTES_PER_MS};
use crate::ids::{ItemId, Millis};
use std::collections::VecDeque;

/// Agent audio sent without a mark after it is marked once it reaches this much (500 ms)…
pub const MARK_EVERY_BYTES: u64 = 4_000;
/// …or once its first byte went this long ago.
pub const MARK_EVERY_MS: Millis = Millis(500);
/// How long audio sent while Twilio's queue is empty takes to start playing, at most, as
/// the reckoning between echoes counts it: the way to Twilio and its playback's start.
pub const PLAY_LEAD: Millis = Millis(200);

#[derive(Debug, Clone, PartialEq)]
struct Item {
    id: ItemId,
    received: u64,
    sent: u64,
    played: u64,
    audio_done: bool,
    /// Its session is gone (a reconnect): what was sent still plays at Twilio and can be
    /// cleared, but there is no session left to truncate it in.
    orphaned: bool,
}

#[derive(Debug, Clone, PartialEq)]
struct PendingMark {
    seq: u64,
    item: ItemId,
    /// The item's `sent` count right after the chunk this mark follows.
    sent_after: u64,
    /// The same place in the whole stream (every item's audio, in the order sent).
    stream_after: u64,
}

/// A stretch of the stream sent from one item: where it starts and ends in the stream,
/// and the item's own `sent` count at its start.
#[derive(Debug, Clone, PartialEq)]
struct Run {
    item: ItemId,
    start: u64,
    end: u64,
    item_start: u64,
}

/// What an echoed mark meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Echo {
    /// Audio up to this mark has played.
    Played { item: ItemId, played_ms: u64 },
    /// A mark we sent before a `clear`, echoed because the clear flushed it.
    Flushed,
    /// Not a mark of ours.
    Unknown,
}

/// One item cut by a barge-in: the truncate to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    pub item: ItemId,
    pub audio_end_ms: u64,
    /// How much audio the item had when it was cut.
    pub received_ms: u64,
    /// The item belonged to a session since replaced: nothing to truncate.
    pub orphaned: bool,
}

const MARK_PREFIX: &str = "m";
/// Items that were cut, remembered so their late deltas are dropped.
const CUT_MEMORY: usize = 16;

#[derive(Debug, Default)]
pub struct Playback {
    items: VecDeque<Item>,
    marks: VecDeque<PendingMark>,
    next_mark: u64,
    cut: VecDeque<ItemId>,
    /// Audio sent to Twilio with no mark after it yet: its item, bytes and when it began.
    unmarked: Option<(ItemId, u64, Millis)>,
    /// The playback clock between echoes. Positions count bytes of the whole stream sent
    /// to Twilio; times are in bytes too (ms × 8), so that one byte plays per unit.
    clock: Clock,
    /// The stream's runs not yet confirmed played, oldest first.
    runs: VecDeque<Run>,
    /// How often marks go: [`MARK_EVERY_BYTES`] and [`MARK_EVERY_MS`], but for the call
    /// machine's scenario tests (see `with_marks_every`).
    cadence: Cadence,
}

#[derive(Debug, Clone, Copy)]
struct Cadence {
    bytes: u64,
    ms: Millis,
}

impl Default for Cadence {
    fn default() -> Self {
        Cadence {
            bytes: MARK_EVERY_BYTES,
            ms: MARK_EVERY_MS,
        }
    }
}

#[derive(Debug, Default)]
struct Clock {
    /// Bytes sent, and confirmed played, of the whole stream.
    sent: u64,
    confirmed: u64,
    /// When (in bytes of time) everything sent will have played, as reckoned.
    queue_end: u64,
    /// Where in the stream audio was last sent to a queue reckoned empty: until an echo of
    /// audio past it, what follows it is reckoned from its sending, not from an echo.
    resumed_at: u64,
}

impl Clock {
    fn sent(&mut self, bytes: u64, now: Millis) {
        let now = now.0 * BYTES_PER_MS;
        if self.queue_end <= now {
            self.resumed_at = self.sent;
            self.queue_end = now + PLAY_LEAD.0 * BYTES_PER_MS;
        }
        self.queue_end += bytes;
        self.sent += bytes;
    }

    /// Everything up to `at` in the stream has played, as of `now`.
    fn echoed(&mut self, at: u64, now: Millis) {
        self.confirmed = self.confirmed.max(at);
        let from_here = now.0 * BYTES_PER_MS + (self.sent - self.confirmed);
        if self.confirmed > self.resumed_at {
            // Audio sent since the queue last ran dry is playing: what is left of it plays
            // on from here, one piece after the other.
            self.queue_end = from_here;
        } else {
            // The echo is of audio sent before the queue ran dry: it says nothing of when
            // the audio sent after started, but that audio cannot have started before what
            // went before it had played.
            self.queue_end = self.queue_end.max(from_here);
        }
    }

    /// How far the stream has played at `now`, as reckoned.
    fn played(&self, now: Millis) -> u64 {
        let left = self.queue_end.saturating_sub(now.0 * BYTES_PER_MS);
        self.sent.saturating_sub(left).max(self.confirmed)
    }

    /// Twilio's queue was cleared at `now`: nothing sent so far will play.
    fn clear(&mut self, now: Millis) {
        self.confirmed = self.sent;
        self.resumed_at = self.sent;
        self.queue_end = now.0 * BYTES_PER_MS;
    }
}

// The methods an audio delta goes through take the item's id as any `AsRef<str>`: the
// machine hands them the id borrowed from the event's text, so that a delta of an item
// already known allocates no `ItemId`.
impl Playback {
    /// True when audio of this item must no longer be played (it was cut by a barge-in).
    pub fn is_cut(&self, item: &(impl AsRef<str> + ?Sized)) -> bool {
        let item = item.as_ref();
        self.cut.iter().any(|c| c.as_str() == item)
    }

    fn item_mut(&mut self, id: &str) -> &mut Item {
        if let Some(i) = self.items.iter().position(|i| i.id.as_str() == id) {
            return &mut self.items[i];
        }
        self.items.push_back(Item {
            id: ItemId::from(id),
            received: 0,
            sent: 0,
            played: 0,
            audio_done: false,
            orphaned: false,
        });
        self.items.back_mut().expect("just pushed")
    }

    /// Audio for `item` arrived from OpenAI (whether or not it can be sent yet).
    pub fn received(&mut self, item: &(impl AsRef<str> + ?Sized), bytes: u64) {
        self.item_mut(item.as_ref()).received += bytes;
    }

    /// Audio of `item` is about to be sent: if audio of another item is still unmarked, the
    /// mark to send before it (a mark names one item).
    pub fn before_send(&mut self, item: &(impl AsRef<str> + ?Sized)) -> Option<String> {
        match &self.unmarked {
            Some((other, _, _)) if other.as_str() != item.as_ref() => self.flush(),
            _ => None,
        }
    }

    /// Audio for `item` was sent to Twilio at `now`; returns the name of the mark to send
    /// after it, when one is due.
    pub fn sent(
        &mut self,
        item: &(impl AsRef<str> + ?Sized),
        bytes: u64,
        now: Millis,
    ) -> Option<String> {
        let it = self.item_mut(item.as_ref());
        let item_start = it.sent;
        it.sent += bytes;
        let done = it.audio_done;
        let start = self.clock.sent;
        self.clock.sent(bytes, now);
        match self.runs.back_mut() {
            Some(run) if run.item.as_str() == item.as_ref() && run.end == start => {
                run.end = self.clock.sent
            }
            _ => self.runs.push_back(Run {
                item: ItemId::from(item.as_ref()),
                start,
                end: self.clock.sent,
                item_start,
            }),
        }
        let (_, pending, _) = self
            .unmarked
            .get_or_insert_with(|| (ItemId::from(item.as_ref()), 0, now));
        *pending += bytes;
        if done || *pending >= self.cadence.bytes {
            self.flush()
        } else {
            None
        }
    }

    /// The mark for audio that has waited [`MARK_EVERY_MS`] unmarked at `now`, if any.
    pub fn stale_mark(&mut self, now: Millis) -> Option<String> {
        match &self.unmarked {
            Some((_, _, since)) if now.saturating_sub(*since) >= self.cadence.ms => self.flush(),
            _ => None,
        }
    }

    /// The mark for whatever audio is sent and unmarked.
    pub fn flush(&mut self) -> Option<String> {
        let (item, _, _) = self.unmarked.take()?;
        let sent_after = self.items.iter().find(|i| i.id == item)?.sent;
        let seq = self.next_mark;
        self.next_mark += 1;
        self.marks.push_back(PendingMark {
            seq,
            item,
            sent_after,
            stream_after: self.clock.sent,
        });
        Some(format!("{MARK_PREFIX}{seq}"))
    }

    /// OpenAI finished the item's audio: once it has all played, it can be forgotten.
    /// Returns the mark for the item's unmarked tail, if any.
    pub fn audio_done(&mut self, item: &ItemId) -> Option<String> {
        if let Some(it) = self.items.iter_mut().find(|i| &i.id == item) {
            it.audio_done = true;
        }
        let mark = match &self.unmarked {
            Some((i, _, _)) if i == item => self.flush(),
            _ => None,
        };
        self.forget_finished();
        mark
    }

    /// Twilio echoed a mark at `now`.
    pub fn echoed(&mut self, name: &str, now: Millis) -> Echo {
        let Some(seq) = name
            .strip_prefix(MARK_PREFIX)
            .and_then(|s| s.parse::<u64>().ok())
            .filter(|s| name.len() == MARK_PREFIX.len() + s.to_string().len())
        else {
            return Echo::Unknown;
        };
        if seq >= self.next_mark {
            return Echo::Unknown;
        }
        // Marks come back in the order sent; an echo implies all earlier ones played too.
        let Some(pos) = self.marks.iter().position(|m| m.seq == seq) else {
            return Echo::Flushed;
        };
        let mut last = None;
        for m in self.marks.drain(..=pos) {
            if let Some(it) = self.items.iter_mut().find(|i| i.id == m.item) {
                it.played = it.played.max(m.sent_after);
            }
            self.clock.echoed(m.stream_after, now);
            last = Some(m.item);
        }
        let confirmed = self.clock.confirmed;
        while self.runs.front().is_some_and(|r| r.end <= confirmed) {
            self.runs.pop_front();
        }
        let item = last.expect("drained at least one mark");
        let played_ms = self
            .items
            .iter()
            .find(|i| i.id == item)
            .map(|i| bytes_to_ms(i.played))
            .unwrap_or(0);
        self.forget_finished();
        Echo::Played { item, played_ms }
    }

    /// True while some agent audio has been received but not confirmed heard.
    pub fn outstanding(&self) -> bool {
        self.items.iter().any(|i| i.received > i.played)
    }

    /// True while some agent audio received has not played by `now`, even as reckoned:
    /// what a barge-in would cut.
    pub fn unheard(&self, now: Millis) -> bool {
        self.items.iter().any(|i| i.received > self.heard(i, now))
    }

    /// How much of an item has played at `now`: what was confirmed, or what the clock
    /// reckons of the runs sent from it, whichever is more; never more than was sent.
    fn heard(&self, it: &Item, now: Millis) -> u64 {
        let at = self.clock.played(now);
        self.runs
            .iter()
            .filter(|r| r.item == it.id && at > r.start)
            .map(|r| r.item_start + (at.min(r.end) - r.start))
            .fold(it.played, u64::max)
            .min(it.sent)
    }

    /// The caller started talking at `now`: every item with unheard audio is cut where
    /// playback stands. Returns the truncates to send, oldest item first; empty when
    /// nothing was playing. Pending marks become flushes.
    pub fn barge_in(&mut self, now: Millis) -> Vec<Cut> {
        let mut cuts = Vec::new();
        let heard: Vec<u64> = self.items.iter().map(|it| self.heard(it, now)).collect();
        for (it, heard) in self.items.drain(..).zip(heard) {
            if it.received > heard {
                // heard <= sent <= received by construction; the clamp keeps the vendor
                // rule (never past the audio received) even if that ever stopped holding.
                let end = heard.min(it.received);
                cuts.push(Cut {
                    item: it.id.clone(),
                    audio_end_ms: bytes_to_ms(end),
                    received_ms: bytes_to_ms(it.received),
                    orphaned: it.orphaned,
                });
                self.cut.push_back(it.id);
                if self.cut.len() > CUT_MEMORY {
                    self.cut.pop_front();
                }
            }
        }
        self.marks.clear();
        self.unmarked = None;
        self.runs.clear();
        self.clock.clear(now);
        cuts
    }

    /// The items' session is gone (a reconnect). Their audio already sent to Twilio still
    /// plays there, and a barge-in must still be able to clear it; what was received and not
    /// sent never will be. Returns the mark for audio sent and not yet marked, so the end of
    /// the old audio is confirmed too.
    pub fn orphan_items(&mut self) -> Option<String> {
        for it in &mut self.items {
            it.received = it.sent;
            it.audio_done = true;
            it.orphaned = true;
        }
        let mark = self.flush();
        self.forget_finished();
        mark
    }

    /// The items some of whose audio went to Twilio, and how much of it: their id, then the
    /// ms played by `now` (confirmed, or reckoned since), sent and received.
    pub fn sent_items(&self, now: Millis) -> Vec<(ItemId, u64, u64, u64)> {
        self.items
            .iter()
            .filter(|it| it.sent > 0)
            .map(|it| {
                let ms = bytes_to_ms;
                let heard = self.heard(it, now);
                (it.id.clone(), ms(heard), ms(it.sent), ms(it.received))
            })
            .collect()
    }

    /// Milliseconds of audio sent to Twilio and not yet confirmed played.
    pub fn unconfirmed_ms(&self) -> u64 {
        self.items
            .iter()
            .map(|i| bytes_to_ms(i.sent.saturating_sub(i.played)))
            .sum()
    }

    fn forget_finished(&mut self) {
        while let Some(front) = self.items.front() {
            let finished = front.audio_done && front.played >= front.received;
            if finished && !self.marks.iter().any(|m| m.item == front.id) {
                self.items.pop_front();
            } else {
                break;
            }
        }
    }

    /// Marks every `bytes` of audio or `ms`: the call machine's scenario tests script one
    /// mark per chunk of their audio, whatever the cadence in use; the cadence itself is
    /// tested at its value here and end to end.
    #[cfg(test)]
    pub(crate) fn with_marks_every(bytes: u64, ms: Millis) -> Self {
        Playback {
            cadence: Cadence { bytes, ms },
            ..Playback::default()
        }
    }

    #[cfg(test)]
    pub(crate) fn tracked_items(&self) -> usize {
        self.items.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> ItemId {
        ItemId::new(s)
    }

    const T0: Millis = Millis(0);
    /// One mark's worth of audio at the production cadence (500 ms).
    const MARK: u64 = MARK_EVERY_BYTES;

    #[test]
    fn played_ms_follows_echoed_marks() {
        let mut p = Playback::default();
        let a = id("item_a");
        p.received(&a, MARK);
        let m0 = p.sent(&a, MARK, T0).unwrap();
        p.received(&a, 800);
        assert_eq!(p.sent(&a, 800, T0), None, "100 ms is not worth a mark yet");
        let m1 = p.flush().unwrap();
        assert_eq!(
            p.echoed(&m0, Millis(700)),
            Echo::Played {
                item: a.clone(),
                played_ms: 500
            }
        );
        assert!(p.outstanding());
        // Cut as the echo comes: what it confirmed, nothing reckoned yet.
        assert_eq!(
            p.barge_in(Millis(700)),
            vec![Cut {
                item: a.clone(),
                audio_end_ms: 500,
                received_ms: 600,
                orphaned: false,
            }]
        );
        assert!(p.is_cut(&a));
        // The clear flushes m1: its echo is not "played".
        assert_eq!(p.echoed(&m1, Millis(710)), Echo::Flushed);
        assert!(!p.outstanding());
    }

    #[test]
    fn a_later_echo_confirms_earlier_marks() {
        let mut p = Playback::default();
        let a = id("a");
        for _ in 0..3 {
            p.received(&a, MARK);
        }
        let _m0 = p.sent(&a, MARK, T0).unwrap();
        let _m1 = p.sent(&a, MARK, T0).unwrap();
        let m2 = p.sent(&a, MARK, T0).unwrap();
        assert_eq!(
            p.echoed(&m2, Millis(1_700)),
            Echo::Played {
                item: a,
                played_ms: 1_500
            }
        );
        assert_eq!(p.unconfirmed_ms(), 0);
    }

    #[test]
    fn between_echoes_playback_is_reckoned_at_8_bytes_a_ms_from_the_last_echo() {
        let mut p = Playback::default();
        let a = id("a");
        // 2 s sent at once: marks after each 500 ms.
        p.received(&a, 4 * MARK);
        let marks: Vec<String> = (0..4).map(|_| p.sent(&a, MARK, T0).unwrap()).collect();
        p.echoed(&marks[0], Millis(800));
        // 300 ms after the echo of the first 500 ms: 800 ms heard, give or take the echo's
        // way back, which only makes it less.
        let items = p.sent_items(Millis(1_100));
        assert_eq!(items, vec![(a.clone(), 800, 2_000, 2_000)]);
        let cut = p.barge_in(Millis(1_100));
        assert_eq!(cut[0].audio_end_ms, 800);
    }

    #[test]
    fn the_reckoning_never_passes_what_was_sent_nor_falls_behind_what_was_confirmed() {
        let mut p = Playback::default();
        let a = id("a");
        p.received(&a, 2 * MARK);
        let m0 = p.sent(&a, MARK, T0).unwrap();
        // Its echo comes early (the reckoning counted 200 ms for the way there): what
        // Twilio confirmed stands.
        p.echoed(&m0, Millis(300));
        assert_eq!(p.sent_items(Millis(300))[0].1, 500);
        // Long after, only what was sent can have played, though more was received.
        assert_eq!(p.sent_items(Millis(60_000))[0].1, 500);
        assert_eq!(p.barge_in(Millis(60_000))[0].audio_end_ms, 500);
    }

    #[test]
    fn audio_sent_after_the_queue_ran_dry_is_reckoned_from_its_sending() {
        let mut p = Playback::default();
        let (a, b) = (id("a"), id("b"));
        p.received(&a, MARK);
        let ma = p.sent(&a, MARK, T0).unwrap();
        assert_eq!(p.audio_done(&a), None, "a's audio is marked already");
        p.echoed(&ma, Millis(800));
        // Three seconds of silence, then b: its first 200 ms only take it to Twilio.
        p.received(&b, 2 * MARK);
        assert_eq!(p.before_send(&b), None);
        p.sent(&b, MARK, Millis(4_000)).unwrap();
        p.sent(&b, MARK, Millis(4_000)).unwrap();
        assert_eq!(
            p.sent_items(Millis(4_150)),
            vec![(b.clone(), 0, 1_000, 1_000)]
        );
        assert_eq!(p.sent_items(Millis(4_500))[0].1, 300);
        assert_eq!(p.barge_in(Millis(4_500))[0].audio_end_ms, 300);
    }

    /// a (500 ms) sent at 0, then b (500 ms) at 1 000, once the reckoned queue had run dry
    /// (at 700 ms); a's echo comes at `echo_at`. Returns b's id.
    fn b_after_a_dry_spell_and_a_s_echo_at(p: &mut Playback, echo_at: u64) -> ItemId {
        let (a, b) = (id("a"), id("b"));
        p.received(&a, MARK);
        let ma = p.sent(&a, MARK, T0).unwrap();
        p.received(&b, MARK);
        p.sent(&b, MARK, Millis(1_000)).unwrap();
        p.echoed(&ma, Millis(echo_at));
        b
    }

    #[test]
    fn an_echo_from_before_a_dry_spell_does_not_date_the_audio_after_it() {
        let mut p = Playback::default();
        let b = b_after_a_dry_spell_and_a_s_echo_at(&mut p, 1_050);
        // From a's echo b would have played 50 ms by 1 100; from its sending, none yet.
        assert_eq!(p.sent_items(Millis(1_100))[1], (b.clone(), 0, 500, 500));
        assert_eq!(p.sent_items(Millis(1_300))[1].1, 100);
    }

    #[test]
    fn a_late_echo_holds_back_the_audio_queued_after_it() {
        let mut p = Playback::default();
        // a's echo comes only at 1 490: Twilio played a late, and b after it.
        let b = b_after_a_dry_spell_and_a_s_echo_at(&mut p, 1_490);
        assert_eq!(p.sent_items(Millis(1_500))[1], (b.clone(), 10, 500, 500));
        assert_eq!(p.barge_in(Millis(1_500))[0].audio_end_ms, 10);
    }

    #[test]
    fn each_item_gets_its_share_of_the_reckoning() {
        let mut p = Playback::default();
        let (a, b) = (id("a"), id("b"));
        p.received(&a, 800);
        p.received(&b, 2 * MARK);
        assert_eq!(p.sent(&a, 800, T0), None);
        let ma = p.before_send(&b).expect("a's audio is marked before b's");
        p.sent(&b, MARK, T0).unwrap();
        p.sent(&b, MARK, T0).unwrap();
        p.echoed(&ma, Millis(400));
        // 100 ms of a then b, with 250 ms of b played by 650.
        let items = p.sent_items(Millis(650));
        assert_eq!(
            items,
            vec![(a, 100, 100, 100), (b.clone(), 250, 1_000, 1_000)]
        );
        let cuts = p.barge_in(Millis(650));
        assert_eq!(cuts.len(), 1, "a had played in full: {cuts:?}");
        assert_eq!((cuts[0].item.clone(), cuts[0].audio_end_ms), (b, 250));
    }

    #[test]
    fn a_clear_ends_the_reckoning_of_what_it_flushed() {
        let mut p = Playback::default();
        let (a, b) = (id("a"), id("b"));
        p.received(&a, 2 * MARK);
        p.sent(&a, MARK, T0).unwrap();
        p.sent(&a, MARK, T0).unwrap();
        p.barge_in(Millis(300));
        // The next reply's audio starts from its own sending.
        p.received(&b, MARK);
        p.sent(&b, MARK, Millis(1_000)).unwrap();
        assert_eq!(p.sent_items(Millis(1_250)), vec![(b, 50, 500, 500)]);
    }

    #[test]
    fn nothing_playing_means_no_cut() {
        let mut p = Playback::default();
        assert!(p.barge_in(T0).is_empty());
        let a = id("a");
        p.received(&a, 160);
        assert_eq!(p.sent(&a, 160, T0), None, "20 ms is not worth a mark yet");
        let m = p
            .audio_done(&a)
            .expect("the item's tail is marked when it is done");
        p.echoed(&m, Millis(300));
        assert!(!p.outstanding());
        assert!(p.barge_in(Millis(300)).is_empty());
        assert_eq!(p.tracked_items(), 0, "finished items are forgotten");
    }

    #[test]
    fn audio_received_but_never_sent_is_cut_at_zero() {
        let mut p = Playback::default();
        let a = id("a");
        p.received(&a, 4000);
        assert_eq!(
            p.barge_in(Millis(5_000)),
            vec![Cut {
                item: a,
                audio_end_ms: 0,
                received_ms: 500,
                orphaned: false,
            }]
        );
    }

    #[test]
    fn audio_of_a_lost_session_can_still_be_cleared_but_not_truncated() {
        let mut p = Playback::default();
        let a = id("a");
        p.received(&a, 2 * MARK + 2400);
        p.sent(&a, MARK, T0).unwrap();
        assert_eq!(p.sent(&a, 400, T0), None);
        // The session is lost: what was received and not sent never goes out; the 550 ms
        // sent still plays.
        let tail = p.orphan_items().expect("the unmarked 50 ms is marked");
        assert!(p.outstanding());
        assert_eq!(p.unconfirmed_ms(), 550);
        assert_eq!(
            p.barge_in(Millis(100)),
            vec![Cut {
                item: a.clone(),
                audio_end_ms: 0,
                received_ms: 550,
                orphaned: true,
            }]
        );
        assert_eq!(p.echoed(&tail, Millis(200)), Echo::Flushed);
        // Played to the end instead, it is forgotten like any other.
        let mut p = Playback::default();
        p.received(&a, MARK);
        let m = p.sent(&a, MARK, T0).unwrap();
        assert_eq!(p.orphan_items(), None);
        p.echoed(&m, Millis(700));
        assert!(!p.outstanding());
        assert_eq!(p.tracked_items(), 0);
    }

    #[test]
    fn unknown_marks_are_told_apart() {
        let mut p = Playback::default();
        assert_eq!(p.echoed("m0", T0), Echo::Unknown);
        assert_eq!(p.echoed("hello", T0), Echo::Unknown);
        let a = id("a");
        p.received(&a, 8);
        assert_eq!(p.sent(&a, 8, T0), None);
        let m = p.flush().unwrap();
        assert_eq!(p.echoed(&format!("{m}x"), T0), Echo::Unknown);
        assert_eq!(p.echoed("m00", T0), Echo::Unknown);
        assert_eq!(p.echoed("m+0", T0), Echo::Unknown);
        assert!(matches!(p.echoed(&m, T0), Echo::Played { .. }));
        assert_eq!(
            p.echoed(&m, T0),
            Echo::Flushed,
            "a repeated echo changes nothing"
        );
    }

    #[test]
    fn ms_are_floored_never_rounded_up() {
        let mut p = Playback::default();
        let a = id("a");
        p.received(&a, MARK + 7);
        let m = p.sent(&a, MARK + 7, T0).unwrap();
        p.received(&a, 100);
        p.sent(&a, 100, T0);
        p.echoed(&m, Millis(800));
        assert_eq!(p.barge_in(Millis(800))[0].audio_end_ms, 500);
    }

    #[test]
    fn small_chunks_share_a_mark_every_500_ms() {
        let mut p = Playback::default();
        let a = id("a");
        let mut marks = vec![];
        for i in 0..50u64 {
            p.received(&a, 160);
            if let Some(m) = p.sent(&a, 160, Millis(20 * i)) {
                marks.push((i, m));
            }
        }
        // 25 chunks of 20 ms make 500 ms: a mark after the 25th and the 50th.
        assert_eq!(
            marks.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            vec![24, 49]
        );
        assert_eq!(
            p.echoed(&marks[0].1, Millis(1_000)),
            Echo::Played {
                item: a.clone(),
                played_ms: 500
            }
        );
        assert_eq!(p.unconfirmed_ms(), 500);
    }

    #[test]
    fn unmarked_audio_is_marked_before_another_item_and_when_stale() {
        let mut p = Playback::default();
        let (a, b) = (id("a"), id("b"));
        p.received(&a, 160);
        assert_eq!(p.sent(&a, 160, Millis(0)), None);
        assert_eq!(p.before_send(&a), None, "same item: no mark yet");
        let ma = p.before_send(&b).expect("a's audio is marked before b's");
        p.received(&b, 160);
        assert_eq!(p.sent(&b, 160, Millis(10)), None);
        assert_eq!(p.stale_mark(Millis(509)), None);
        let mb = p.stale_mark(Millis(510)).expect("500 ms unmarked");
        assert_eq!(p.stale_mark(Millis(2_000)), None, "nothing left unmarked");
        assert_eq!(
            p.echoed(&ma, Millis(600)),
            Echo::Played {
                item: a,
                played_ms: 20
            }
        );
        assert_eq!(
            p.echoed(&mb, Millis(600)),
            Echo::Played {
                item: b,
                played_ms: 20
            }
        );
        assert!(!p.outstanding());
    }

    #[test]
    fn a_barge_in_forgets_unmarked_audio() {
        let mut p = Playback::default();
        let a = id("a");
        p.received(&a, 2 * MARK);
        let m = p.sent(&a, MARK, T0).unwrap();
        assert_eq!(p.sent(&a, 400, T0), None);
        p.echoed(&m, Millis(700));
        let cuts = p.barge_in(Millis(700));
        assert_eq!(cuts[0].audio_end_ms, 500);
        assert_eq!(p.flush(), None);
    }
}
