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
//! waited [`MARK_EVERY_MS`] unmarked. What played is still known to the byte at each mark;
//! between marks it is rounded down, never up.

use crate::audio::bytes_to_ms;
use crate::ids::{ItemId, Millis};
use std::collections::VecDeque;

/// Agent audio sent without a mark after it is marked once it reaches this much (100 ms)…
pub const MARK_EVERY_BYTES: u64 = 800;
/// …or once its first byte went this long ago.
pub const MARK_EVERY_MS: Millis = Millis(100);

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
        it.sent += bytes;
        let done = it.audio_done;
        let (_, pending, _) = self
            .unmarked
            .get_or_insert_with(|| (ItemId::from(item.as_ref()), 0, now));
        *pending += bytes;
        if done || *pending >= MARK_EVERY_BYTES {
            self.flush()
        } else {
            None
        }
    }

    /// The mark for audio that has waited [`MARK_EVERY_MS`] unmarked at `now`, if any.
    pub fn stale_mark(&mut self, now: Millis) -> Option<String> {
        match &self.unmarked {
            Some((_, _, since)) if now.saturating_sub(*since) >= MARK_EVERY_MS => self.flush(),
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

    /// Twilio echoed a mark.
    pub fn echoed(&mut self, name: &str) -> Echo {
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
            last = Some(m.item);
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

    /// The caller started talking: every item with unheard audio is cut where playback
    /// stands. Returns the truncates to send, oldest item first; empty when nothing was
    /// playing. Pending marks become flushes.
    pub fn barge_in(&mut self) -> Vec<Cut> {
        let mut cuts = Vec::new();
        for it in self.items.drain(..) {
            if it.received > it.played {
                // played <= sent <= received by construction; the clamp keeps the vendor
                // rule (never past the audio received) even if that ever stopped holding.
                let end = it.played.min(it.received);
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
    /// ms confirmed played, sent and received.
    pub fn sent_items(&self) -> Vec<(ItemId, u64, u64, u64)> {
        self.items
            .iter()
            .filter(|it| it.sent > 0)
            .map(|it| {
                let ms = bytes_to_ms;
                (it.id.clone(), ms(it.played), ms(it.sent), ms(it.received))
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

    #[test]
    fn played_ms_follows_echoed_marks() {
        let mut p = Playback::default();
        let a = id("item_a");
        p.received(&a, 1600);
        let m0 = p.sent(&a, 1600, T0).unwrap();
        p.received(&a, 800);
        let m1 = p.sent(&a, 800, T0).unwrap();
        assert_eq!(
            p.echoed(&m0),
            Echo::Played {
                item: a.clone(),
                played_ms: 200
            }
        );
        assert!(p.outstanding());
        assert_eq!(
            p.barge_in(),
            vec![Cut {
                item: a.clone(),
                audio_end_ms: 200,
                received_ms: 300,
                orphaned: false,
            }]
        );
        assert!(p.is_cut(&a));
        // The clear flushes m1: its echo is not "played".
        assert_eq!(p.echoed(&m1), Echo::Flushed);
        assert!(!p.outstanding());
    }

    #[test]
    fn a_later_echo_confirms_earlier_marks() {
        let mut p = Playback::default();
        let a = id("a");
        for _ in 0..3 {
            p.received(&a, 800);
        }
        let _m0 = p.sent(&a, 800, T0).unwrap();
        let _m1 = p.sent(&a, 800, T0).unwrap();
        let m2 = p.sent(&a, 800, T0).unwrap();
        assert_eq!(
            p.echoed(&m2),
            Echo::Played {
                item: a,
                played_ms: 300
            }
        );
        assert_eq!(p.unconfirmed_ms(), 0);
    }

    #[test]
    fn nothing_playing_means_no_cut() {
        let mut p = Playback::default();
        assert!(p.barge_in().is_empty());
        let a = id("a");
        p.received(&a, 160);
        assert_eq!(p.sent(&a, 160, T0), None, "20 ms is not worth a mark yet");
        let m = p
            .audio_done(&a)
            .expect("the item's tail is marked when it is done");
        p.echoed(&m);
        assert!(!p.outstanding());
        assert!(p.barge_in().is_empty());
        assert_eq!(p.tracked_items(), 0, "finished items are forgotten");
    }

    #[test]
    fn audio_received_but_never_sent_is_cut_at_zero() {
        let mut p = Playback::default();
        let a = id("a");
        p.received(&a, 4000);
        assert_eq!(
            p.barge_in(),
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
        p.received(&a, 2400);
        p.sent(&a, 800, T0).unwrap();
        assert_eq!(p.sent(&a, 400, T0), None);
        // The session is lost: the 1 s received never goes out, the 150 ms sent still plays.
        let tail = p.orphan_items().expect("the unmarked 50 ms is marked");
        assert!(p.outstanding());
        assert_eq!(p.unconfirmed_ms(), 150);
        assert_eq!(
            p.barge_in(),
            vec![Cut {
                item: a.clone(),
                audio_end_ms: 0,
                received_ms: 150,
                orphaned: true,
            }]
        );
        assert_eq!(p.echoed(&tail), Echo::Flushed);
        // Played to the end instead, it is forgotten like any other.
        let mut p = Playback::default();
        p.received(&a, 800);
        let m = p.sent(&a, 800, T0).unwrap();
        assert_eq!(p.orphan_items(), None);
        p.echoed(&m);
        assert!(!p.outstanding());
        assert_eq!(p.tracked_items(), 0);
    }

    #[test]
    fn unknown_marks_are_told_apart() {
        let mut p = Playback::default();
        assert_eq!(p.echoed("m0"), Echo::Unknown);
        assert_eq!(p.echoed("hello"), Echo::Unknown);
        let a = id("a");
        p.received(&a, 8);
        assert_eq!(p.sent(&a, 8, T0), None);
        let m = p.flush().unwrap();
        assert_eq!(p.echoed(&format!("{m}x")), Echo::Unknown);
        assert_eq!(p.echoed("m00"), Echo::Unknown);
        assert_eq!(p.echoed("m+0"), Echo::Unknown);
        assert!(matches!(p.echoed(&m), Echo::Played { .. }));
        assert_eq!(
            p.echoed(&m),
            Echo::Flushed,
            "a repeated echo changes nothing"
        );
    }

    #[test]
    fn ms_are_floored_never_rounded_up() {
        let mut p = Playback::default();
        let a = id("a");
        p.received(&a, 1607);
        let m = p.sent(&a, 1607, T0).unwrap();
        p.received(&a, 100);
        p.sent(&a, 100, T0);
        p.echoed(&m);
        assert_eq!(p.barge_in()[0].audio_end_ms, 200);
    }

    #[test]
    fn small_chunks_share_a_mark_every_100_ms() {
        let mut p = Playback::default();
        let a = id("a");
        let mut marks = vec![];
        for i in 0..10u64 {
            p.received(&a, 160);
            if let Some(m) = p.sent(&a, 160, Millis(20 * i)) {
                marks.push((i, m));
            }
        }
        // 5 chunks of 20 ms make 100 ms: a mark after the 5th and the 10th.
        assert_eq!(
            marks.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            vec![4, 9]
        );
        assert_eq!(
            p.echoed(&marks[0].1),
            Echo::Played {
                item: a.clone(),
                played_ms: 100
            }
        );
        assert_eq!(p.unconfirmed_ms(), 100);
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
        assert_eq!(p.stale_mark(Millis(109)), None);
        let mb = p.stale_mark(Millis(110)).expect("100 ms unmarked");
        assert_eq!(p.stale_mark(Millis(500)), None, "nothing left unmarked");
        assert_eq!(
            p.echoed(&ma),
            Echo::Played {
                item: a,
                played_ms: 20
            }
        );
        assert_eq!(
            p.echoed(&mb),
            Echo::Played {
                item: b,
                played_ms: 20
            }
        );
        assert!(!p.outstanding());
    }

    #[test]
    fn a_barge_in_forgets_unmarked_audio_and_cuts_at_the_last_mark() {
        let mut p = Playback::default();
        let a = id("a");
        p.received(&a, 1600);
        let m = p.sent(&a, 800, T0).unwrap();
        assert_eq!(p.sent(&a, 400, T0), None);
        p.echoed(&m);
        let cuts = p.barge_in();
        assert_eq!(
            cuts[0].audio_end_ms, 100,
            "unconfirmed audio is not counted as heard"
        );
        assert_eq!(p.flush(), None);
    }
}
