//! The bookkeeping of a call object's outbox, whose I/O is in `cloudflare::outbox`: which
//! records wait in memory, whether the object's storage may hold some, and what storage
//! confirmed. The shell reports what each write did and asks what to do next; the rules live
//! here, where they are tested:
//! - records go straight to D1 only while storage is known to hold none (they would
//!   overtake those);
//! - a record storage refused stays at the head of the memory queue, is not counted as
//!   stored, and is owed a retry until storage or D1 takes it;
//! - while storage may hold records, or memory holds ones storage refused, the object owes
//!   itself an alarm, so that a restart (a deploy) cannot strand them: set once, before the
//!   first record is written, not per record, and owed again once it fired or was deleted;
//! - records on their way straight to D1 are gathered for [`GATHER_MS`] first, so that those
//!   handed over together (a call's set-up, a turn's transcripts) reach D1 in one write.

use std::collections::VecDeque;

/// How long records are gathered before they go straight to D1, from the first one seen.
/// A call's set-up hands over three records within some 30 ms, the end of a turn two or
/// three: gathered, each such group is one D1 request and one transaction instead of one
/// per record (D1 bills and works per request). They wait in memory this much longer, as
/// records do while a direct write is on its way; what must outlive a restart is made
/// durable by the shell's `durable`, which does not wait for this.
pub const GATHER_MS: u64 = 200;
/// This many records waiting go at once, however recently the first came.
pub const GATHER_MAX: usize = 50;

/// What the object's storage holds of the outbox, as far as this instance knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// Not looked at yet: an earlier instance may have left records.
    Unknown,
    /// Nothing: a flush found it empty, with no write since.
    Empty,
    /// Records, or a write that may have landed.
    Records,
}

/// Where a flush started: whatever storage confirmed after it, the flush may not have seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushMark(u64);

/// One call object's outbox, `T` being a record as the shell keeps it.
#[derive(Debug)]
pub struct Ledger<T> {
    /// Handed over, in neither D1 nor storage yet, oldest first.
    unstored: VecDeque<T>,
    held: Held,
    /// Writes storage confirmed.
    stored: u64,
    /// Storage refused the write of the record now at the head of `unstored`.
    refused: bool,
    /// An alarm of the object is pending: set since it last fired or was deleted.
    alarm: bool,
    /// When the writer first saw the records now waiting to go straight to D1.
    gathering_since: Option<u64>,
}

impl<T> Default for Ledger<T> {
    fn default() -> Self {
        Ledger {
            unstored: VecDeque::new(),
            held: Held::Unknown,
            stored: 0,
            refused: false,
            alarm: false,
            gathering_since: None,
        }
    }
}

impl<T> Ledger<T> {
    pub fn new() -> Self {
        Self::default()
    }

    /// A record handed over, behind those before it.
    pub fn push(&mut self, record: T) {
        self.unstored.push_back(record);
    }

    /// Records in neither D1 nor storage (handed over, or on their way straight to D1).
    pub fn unstored(&self) -> usize {
        self.unstored.len()
    }

    pub fn held(&self) -> Held {
        self.held
    }

    /// Storage refused a write, and the record waits in memory: a retry is owed.
    pub fn refused(&self) -> bool {
        self.refused
    }

    /// Everything waiting, to go straight to D1; `None` while storage may hold records, which
    /// must reach D1 first.
    pub fn take_direct(&mut self) -> Option<Vec<T>> {
        if self.held != Held::Empty {
            return None;
        }
        self.gathering_since = None;
        Some(self.unstored.drain(..).collect())
    }

    /// How long the writer waits, at `now_ms`, before it takes the records waiting for D1:
    /// until [`GATHER_MS`] after it first saw them. 0 when they go now: [`GATHER_MAX`] are
    /// waiting, or they go through storage, whose copies to D1 are batched already.
    pub fn direct_wait_ms(&mut self, now_ms: u64) -> u64 {
        if self.unstored.is_empty() || self.held != Held::Empty || self.unstored.len() >= GATHER_MAX
        {
            return 0;
        }
        let since = *self.gathering_since.get_or_insert(now_ms);
        GATHER_MS.saturating_sub(now_ms.saturating_sub(since))
    }

    /// D1 took what [`Ledger::take_direct`] gave.
    pub fn direct_done(&mut self) {
        self.refused = false;
    }

    /// D1 refused what [`Ledger::take_direct`] gave: it goes back ahead of what came since.
    pub fn direct_failed(&mut self, batch: Vec<T>) {
        for record in batch.into_iter().rev() {
            self.unstored.push_front(record);
        }
    }

    /// The next record to write to storage. Storage counts as holding records from now on: a
    /// write may land even when its answer is lost.
    pub fn next_to_store(&mut self) -> Option<T> {
        let record = self.unstored.pop_front()?;
        self.held = Held::Records;
        if self.unstored.is_empty() {
            self.gathering_since = None;
        }
        Some(record)
    }

    /// Storage confirmed the write of the record [`Ledger::next_to_store`] gave.
    pub fn stored(&mut self) {
        self.stored += 1;
        self.refused = false;
    }

    /// Storage refused it: it is back at the head, not counted, and owed a retry.
    pub fn store_refused(&mut self, record: T) {
        self.unstored.push_front(record);
        self.refused = true;
    }

    /// A flush starts listing storage.
    pub fn flush_mark(&self) -> FlushMark {
        FlushMark(self.stored)
    }

    /// A flush listed `n` records.
    pub fn flush_listed(&mut self, n: usize) {
        if n > 0 {
            self.held = Held::Records;
        }
    }

    /// A flush found storage empty (a short listing, after deleting what it copied). It is,
    /// unless storage confirmed a write since `mark` or one is under way (`storing`).
    pub fn flush_drained(&mut self, mark: FlushMark, storing: bool) {
        if self.stored == mark.0 && !storing {
            self.held = Held::Empty;
        }
    }

    /// An alarm must be set before anything else is done: storage may hold records (or is
    /// about to, see [`Ledger::next_to_store`]), or memory holds some it refused, and no alarm
    /// is known to be pending.
    pub fn alarm_owed(&self) -> bool {
        !self.alarm && (self.held != Held::Empty || self.refused)
    }

    /// The object's alarm is set (or being set).
    pub fn alarm_set(&mut self) {
        self.alarm = true;
    }

    /// The object's alarm fired (its handler is running) or is being deleted: none is pending.
    pub fn alarm_gone(&mut self) {
        self.alarm = false;
    }

    /// Nothing waits in memory or in storage (the shell adds that nothing is on its way).
    pub fn is_idle(&self) -> bool {
        self.held == Held::Empty && self.unstored.is_empty()
    }
}

/// The first pause before a failed write is tried again.
pub const FIRST_BACKOFF_MS: u64 = 500;
/// The longest.
pub const MAX_BACKOFF_MS: u64 = 30_000;

/// The pause before the next try, after `previous_ms` (0 before the first failure).
pub fn backoff_after(previous_ms: u64) -> u64 {
    previous_ms
        .saturating_mul(2)
        .clamp(FIRST_BACKOFF_MS, MAX_BACKOFF_MS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_go_straight_to_d1_only_once_storage_is_known_empty() {
        let mut l = Ledger::new();
        l.push(1);
        // An earlier instance may have left records: these queue behind them.
        assert_eq!(l.held(), Held::Unknown);
        assert_eq!(l.take_direct(), None);
        let mark = l.flush_mark();
        l.flush_listed(0);
        l.flush_drained(mark, false);
        assert_eq!(l.held(), Held::Empty);
        l.push(2);
        assert_eq!(l.take_direct(), Some(vec![1, 2]));
        assert_eq!(l.unstored(), 0);
        // D1 refused them: back ahead of what came meanwhile, in order.
        l.push(3);
        l.direct_failed(vec![1, 2]);
        assert_eq!(l.take_direct(), Some(vec![1, 2, 3]));
        l.direct_done();
        assert!(l.is_idle());
    }

    #[test]
    fn a_stored_record_makes_storage_hold_records_until_a_flush_drains_it() {
        let mut l = Ledger::new();
        l.flush_drained(l.flush_mark(), false);
        l.push("a");
        assert_eq!(l.next_to_store(), Some("a"));
        // From the write on, not only once it is confirmed.
        assert_eq!(l.held(), Held::Records);
        l.stored();
        l.push("b");
        assert_eq!(l.take_direct(), None, "b would overtake a");
        let mark = l.flush_mark();
        l.flush_listed(1);
        l.flush_drained(mark, false);
        assert_eq!(l.held(), Held::Empty);
        assert_eq!(l.take_direct(), Some(vec!["b"]));
    }

    #[test]
    fn a_write_confirmed_during_a_flush_or_still_under_way_keeps_storage_held() {
        let mut l = Ledger::new();
        let mark = l.flush_mark();
        l.flush_listed(0);
        l.push(1);
        l.next_to_store();
        l.stored();
        l.flush_drained(mark, false);
        assert_eq!(l.held(), Held::Records, "the flush did not see 1");
        let mark = l.flush_mark();
        l.push(2);
        l.next_to_store();
        l.flush_drained(mark, true);
        assert_eq!(l.held(), Held::Records, "2 is being written");
    }

    #[test]
    fn a_record_storage_refused_stays_first_is_not_counted_and_is_owed_a_retry() {
        let mut l = Ledger::new();
        l.push(1);
        l.push(2);
        let first = l.next_to_store().unwrap();
        let mark = l.flush_mark();
        l.store_refused(first);
        assert!(l.refused());
        assert_eq!(l.unstored(), 2);
        assert!(!l.is_idle());
        // The next flush finds storage empty, rightly: the record is not there, and it is
        // still owed its retry.
        l.flush_listed(0);
        l.flush_drained(mark, false);
        assert_eq!(l.held(), Held::Empty);
        assert!(l.refused());
        assert!(!l.is_idle());
        // The retry: storage takes it, first.
        assert_eq!(l.next_to_store(), Some(1));
        l.stored();
        assert!(!l.refused());
        assert_eq!(l.next_to_store(), Some(2));
        l.stored();
        assert_eq!(l.unstored(), 0);
    }

    #[test]
    fn a_refused_record_that_reaches_d1_directly_is_owed_nothing_more() {
        let mut l = Ledger::new();
        l.flush_drained(l.flush_mark(), false);
        l.push(1);
        let first = l.next_to_store().unwrap();
        l.store_refused(first);
        l.flush_drained(l.flush_mark(), false);
        let batch = l.take_direct().unwrap();
        l.direct_failed(batch);
        assert!(l.refused(), "still only in memory");
        assert_eq!(l.take_direct(), Some(vec![1]));
        l.direct_done();
        assert!(!l.refused());
        assert!(l.is_idle());
    }

    #[test]
    fn records_put_in_storage_owe_one_alarm_not_one_per_record() {
        let mut l = Ledger::new();
        l.flush_drained(l.flush_mark(), false);
        l.push(1);
        l.push(2);
        assert!(
            !l.alarm_owed(),
            "in memory on their way to D1: nothing to strand"
        );
        l.next_to_store();
        assert!(l.alarm_owed(), "before the first write lands");
        l.alarm_set();
        l.stored();
        l.next_to_store();
        assert!(!l.alarm_owed(), "one is pending");
        l.stored();
        // It fired (the object may have restarted since): records still held owe another.
        l.alarm_gone();
        assert!(l.alarm_owed());
        // Once they reached D1, nothing is owed.
        let mark = l.flush_mark();
        l.flush_listed(2);
        l.flush_drained(mark, false);
        assert!(!l.alarm_owed());
        // A record stored after the alarm was deleted (the call had settled) owes a new one.
        l.push(3);
        l.next_to_store();
        assert!(l.alarm_owed());
    }

    #[test]
    fn records_storage_refused_owe_an_alarm_as_they_wait_in_memory() {
        let mut l = Ledger::new();
        l.flush_drained(l.flush_mark(), false);
        l.push(1);
        let first = l.next_to_store().unwrap();
        l.store_refused(first);
        l.flush_drained(l.flush_mark(), false);
        assert_eq!(l.held(), Held::Empty);
        assert!(l.alarm_owed());
        assert_eq!(l.take_direct(), Some(vec![1]));
        l.direct_done();
        assert!(!l.alarm_owed());
    }

    #[test]
    fn a_new_instance_owes_an_alarm_until_a_flush_finds_storage_empty() {
        // What an earlier instance left, should this one's flush not get to finish.
        let mut l: Ledger<u8> = Ledger::new();
        assert!(l.alarm_owed());
        l.flush_drained(l.flush_mark(), false);
        assert!(!l.alarm_owed());
    }

    /// A drained ledger, as after a flush found storage empty.
    fn drained<T>() -> Ledger<T> {
        let mut l = Ledger::new();
        l.flush_drained(l.flush_mark(), false);
        l
    }

    #[test]
    fn records_going_straight_to_d1_are_gathered_from_the_first_one_seen() {
        let mut l = drained();
        assert_eq!(l.direct_wait_ms(1_000), 0, "nothing waits");
        l.push(1);
        assert_eq!(l.direct_wait_ms(1_000), GATHER_MS);
        // Those handed over meanwhile go with it, at the same deadline.
        l.push(2);
        assert_eq!(l.direct_wait_ms(1_030), GATHER_MS - 30);
        l.push(3);
        assert_eq!(l.direct_wait_ms(1_000 + GATHER_MS), 0);
        assert_eq!(l.direct_wait_ms(5_000), 0, "late, not later");
        assert_eq!(l.take_direct(), Some(vec![1, 2, 3]));
        // The next group is timed from its own first record.
        l.push(4);
        assert_eq!(l.direct_wait_ms(9_000), GATHER_MS);
        assert_eq!(
            l.direct_wait_ms(8_000),
            GATHER_MS,
            "a clock that stepped back"
        );
    }

    #[test]
    fn enough_records_or_records_bound_for_storage_are_not_held_back() {
        let mut l = drained();
        for n in 0..GATHER_MAX {
            l.push(n);
        }
        assert_eq!(l.direct_wait_ms(0), 0);
        // Storage may hold records (a new instance, or one just stored): these go behind
        // them through storage, whose copies to D1 are batched; nothing is gathered.
        let mut l = Ledger::new();
        l.push(1);
        assert_eq!(l.direct_wait_ms(0), 0);
        let mut l = drained();
        l.push(1);
        assert_eq!(l.direct_wait_ms(0), GATHER_MS);
        l.push(2);
        l.next_to_store();
        assert_eq!(l.direct_wait_ms(10), 0, "storage holds 1 now");
        // Stored in full, then drained: a new group starts its own wait.
        l.next_to_store();
        l.stored();
        l.stored();
        l.flush_drained(l.flush_mark(), false);
        l.push(3);
        assert_eq!(l.direct_wait_ms(500), GATHER_MS);
    }

    #[test]
    fn backoff_doubles_from_half_a_second_up_to_thirty() {
        let mut pause = 0;
        let pauses: Vec<u64> = (0..9)
            .map(|_| {
                pause = backoff_after(pause);
                pause
            })
            .collect();
        assert_eq!(
            pauses,
            [500, 1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000, 30_000]
        );
    }
}
