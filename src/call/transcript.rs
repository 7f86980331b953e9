//! The call's transcript in conversation order.
//!
//! Realtime events arrive out of conversation order: a caller's transcription often comes
//! after the agent has started answering. Each item gets its place (`seq`) when it is
//! created, and its text, whenever that arrives, is written at that place. An agent turn
//! cut by a barge-in is written with what was heard: first estimated from the share of its
//! audio that played, then replaced by the server's own truncated transcript (when it has
//! one left: an empty one leaves the estimate).

use crate::ids::ItemId;
use crate::store::Role;
use std::collections::HashMap;

/// A transcript entry to write (or rewrite: same `seq`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub role: Role,
    pub text: String,
    pub offset_ms: u64,
    pub item_id: ItemId,
    pub interrupted: bool,
}

#[derive(Debug, Default)]
struct Item {
    seq: u64,
    role: Option<Role>,
    /// When the item appeared, in ms from the stream start.
    created_ms: u64,
    /// When the turn was heard to begin (caller speech start, first agent audio played).
    offset_ms: Option<u64>,
    /// Agent transcript so far (deltas), or the final one.
    text: String,
    /// Set by a barge-in: ms heard of ms received.
    cut: Option<(u64, u64)>,
    /// The server's truncated transcript has been written: nothing replaces it.
    settled: bool,
    /// Its whole text has been written (before any cut).
    written: bool,
}

#[derive(Debug, Default)]
pub struct Conversation {
    items: HashMap<ItemId, Item>,
    next_seq: u64,
    /// `audio_start_ms` of speech, by the id of the caller item it will become.
    speech_started: HashMap<ItemId, u64>,
}

fn role_of(role: Option<&str>) -> Option<Role> {
    match role {
        Some("user") => Some(Role::Caller),
        Some("assistant") => Some(Role::Agent),
        _ => None,
    }
}

impl Conversation {
    fn item(&mut self, id: &ItemId, now_offset_ms: u64) -> &mut Item {
        // Looked up first: this runs for every agent delta, and an entry needs an owned key.
        if self.items.contains_key(id) {
            return self.items.get_mut(id).expect("just checked");
        }
        let next = &mut self.next_seq;
        self.items.entry(id.clone()).or_insert_with(|| {
            let item = Item {
                seq: *next,
                created_ms: now_offset_ms,
                ..Item::default()
            };
            *next += 1;
            item
        })
    }

    /// A place in the conversation for a message the bridge adds itself (a keypad press):
    /// not transcribed here, but a new session is seeded with it in order.
    pub fn place(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq - 1
    }

    /// The text of an item so far (an agent turn's transcript deltas, or its final text).
    pub fn text(&self, id: &ItemId) -> &str {
        self.items.get(id).map_or("", |i| i.text.trim())
    }

    /// An item appeared; the first sighting fixes its place.
    pub fn added(&mut self, id: &ItemId, role: Option<&str>, now_offset_ms: u64) {
        let speech = self.speech_started.remove(id);
        let item = self.item(id, now_offset_ms);
        if item.role.is_none() {
            item.role = role_of(role);
        }
        if item.offset_ms.is_none() {
            item.offset_ms = speech;
        }
    }

    /// The caller began speaking, `audio_start_ms` into the stream (the server counts from
    /// the first audio its session heard; the machine adds where that was).
    pub fn speech_started(&mut self, id: &ItemId, audio_start_ms: u64) {
        match self.items.get_mut(id) {
            Some(item) => item.offset_ms = Some(audio_start_ms),
            None => {
                self.speech_started.insert(id.clone(), audio_start_ms);
            }
        }
    }

    /// The agent's first audio of this item reached the caller.
    pub fn agent_audio_started(&mut self, id: &ItemId, now_offset_ms: u64) {
        let item = self.item(id, now_offset_ms);
        item.role.get_or_insert(Role::Agent);
        if item.offset_ms.is_none() {
            item.offset_ms = Some(now_offset_ms);
        }
    }

    /// Some of the agent's audio of this item went to the caller.
    pub fn agent_audio_sent(&self, id: &ItemId) -> bool {
        self.items
            .get(id)
            .is_some_and(|item| item.role == Some(Role::Agent) && item.offset_ms.is_some())
    }

    fn entry(id: &ItemId, item: &Item, role: Role, text: String, interrupted: bool) -> Entry {
        Entry {
            seq: item.seq,
            role,
            text,
            offset_ms: item.offset_ms.unwrap_or(item.created_ms),
            item_id: id.clone(),
            interrupted,
        }
    }

    pub fn caller_text(&mut self, id: &ItemId, text: &str, now_offset_ms: u64) -> Option<Entry> {
        let text = text.trim();
        if text.is_empty() {
            return None;
        }
        self.added(id, Some("user"), now_offset_ms);
        let item = &self.items[id];
        Some(Self::entry(id, item, Role::Caller, text.to_owned(), false))
    }

    pub fn agent_delta(&mut self, id: &ItemId, delta: &str, now_offset_ms: u64) {
        let item = self.item(id, now_offset_ms);
        if !item.settled {
            item.text.push_str(delta);
        }
    }

    /// The agent's full transcript of an item. Written as is, unless the item was cut.
    pub fn agent_text(&mut self, id: &ItemId, text: &str, now_offset_ms: u64) -> Option<Entry> {
        self.added(id, Some("assistant"), now_offset_ms);
        let item = self.items.get_mut(id).expect("added above");
        if item.settled {
            return None;
        }
        item.text = text.to_owned();
        match item.cut {
            Some((heard, received)) => Self::estimate(id, item, heard, received),
            None if text.trim().is_empty() => None,
            None => {
                item.written = true;
                Some(Self::entry(
                    id,
                    item,
                    Role::Agent,
                    text.trim().to_owned(),
                    false,
                ))
            }
        }
    }

    /// An agent turn with text whose row is not written yet (no full transcript came, no
    /// cut): one its session or the call ended before it was done.
    pub fn agent_unwritten(&self, id: &ItemId) -> bool {
        self.items.get(id).is_some_and(|item| {
            item.role != Some(Role::Caller)
                && !item.written
                && !item.settled
                && item.cut.is_none()
                && !item.text.trim().is_empty()
        })
    }

    /// An agent turn written whole from its transcript, not cut since.
    pub fn agent_written_whole(&self, id: &ItemId) -> bool {
        self.items.get(id).is_some_and(|item| {
            item.role == Some(Role::Agent) && item.written && !item.settled && item.cut.is_none()
        })
    }

    /// A barge-in cut the item after `heard_ms` of the `received_ms` it had.
    pub fn agent_cut(
        &mut self,
        id: &ItemId,
        heard_ms: u64,
        received_ms: u64,
        now_offset_ms: u64,
    ) -> Option<Entry> {
        let item = self.item(id, now_offset_ms);
        item.role.get_or_insert(Role::Agent);
        item.cut = Some((heard_ms, received_ms));
        let item = &self.items[id];
        Self::estimate(id, item, heard_ms, received_ms)
    }

    /// The share of the text that matches the share of audio heard (speech is spoken at a
    /// steady rate, so this is close); replaced once the server's own text arrives.
    fn estimate(id: &ItemId, item: &Item, heard_ms: u64, received_ms: u64) -> Option<Entry> {
        if heard_ms == 0 {
            // Nothing was heard: no turn to record, but one already written whole (its
            // transcript came before the cut) is rewritten as heard by nobody.
            return item
                .written
                .then(|| Self::entry(id, item, Role::Agent, String::new(), true));
        }
        let chars: Vec<char> = item.text.chars().collect();
        let keep = (chars.len() as u64 * heard_ms.min(received_ms))
            .checked_div(received_ms)
            .map_or(chars.len(), |k| k as usize);
        let text: String = chars[..keep].iter().collect();
        Some(Self::entry(
            id,
            item,
            Role::Agent,
            text.trim().to_owned(),
            true,
        ))
    }

    /// The server's item after a truncate: its transcript is what the caller heard. The
    /// truncate deletes the server's transcript of what was not heard, and can leave none
    /// at all (`""`) of a turn the caller heard part of: the estimate stands then.
    pub fn retrieved(&mut self, id: &ItemId, transcript: Option<&str>) -> Option<Entry> {
        let item = self.items.get_mut(id)?;
        let (heard, _) = item.cut?;
        if heard == 0 {
            return None;
        }
        let text = transcript
            .map(str::trim)
            .filter(|t| !t.is_empty())?
            .to_owned();
        item.settled = true;
        item.text = text.clone();
        let item = &self.items[id];
        Some(Self::entry(id, item, Role::Agent, text, true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> ItemId {
        ItemId::new(s)
    }

    #[test]
    fn late_caller_transcription_keeps_its_place_before_the_reply() {
        let mut c = Conversation::default();
        c.speech_started(&id("u1"), 1200);
        c.added(&id("u1"), Some("user"), 2500);
        c.added(&id("a1"), Some("assistant"), 2600);
        c.agent_audio_started(&id("a1"), 2700);
        let agent = c
            .agent_text(&id("a1"), "はい、承知しました。", 4000)
            .unwrap();
        let caller = c
            .caller_text(&id("u1"), " 予約をお願いします ", 4100)
            .unwrap();
        assert!(caller.seq < agent.seq);
        assert_eq!(caller.text, "予約をお願いします");
        assert_eq!(caller.offset_ms, 1200, "from speech start, not arrival");
        assert_eq!(
            agent.offset_ms, 2700,
            "from when the caller began to hear it"
        );
        assert_eq!(caller.role, Role::Caller);
    }

    #[test]
    fn cut_turn_is_estimated_then_replaced_by_the_servers_text() {
        let mut c = Conversation::default();
        c.added(&id("a1"), Some("assistant"), 0);
        c.agent_delta(&id("a1"), "0123456789", 0);
        let est = c.agent_cut(&id("a1"), 300, 1000, 0).unwrap();
        assert_eq!(est.text, "012");
        assert!(est.interrupted);
        // The full transcript arrives after the cut: still estimated, not written whole.
        let again = c.agent_text(&id("a1"), "0123456789", 50).unwrap();
        assert_eq!(again.text, "012");
        let exact = c.retrieved(&id("a1"), Some("0123")).unwrap();
        assert_eq!((exact.seq, exact.text.as_str()), (est.seq, "0123"));
        assert!(exact.interrupted);
        assert_eq!(c.agent_text(&id("a1"), "0123456789", 60), None, "settled");
    }

    #[test]
    fn an_empty_server_text_after_a_cut_leaves_the_estimate() {
        let mut c = Conversation::default();
        c.added(&id("a1"), Some("assistant"), 0);
        c.agent_delta(&id("a1"), "0123456789", 0);
        let est = c.agent_cut(&id("a1"), 300, 1000, 0).unwrap();
        assert_eq!(est.text, "012");
        assert_eq!(c.retrieved(&id("a1"), Some("")), None);
        assert_eq!(c.retrieved(&id("a1"), Some("  ")), None);
        assert_eq!(c.text(&id("a1")), "0123456789", "not settled on nothing");
        // The full transcript, should it come later, is still cut to the estimate.
        let again = c.agent_text(&id("a1"), "0123456789", 50).unwrap();
        assert_eq!((again.seq, again.text.as_str()), (est.seq, "012"));
    }

    #[test]
    fn a_turn_nobody_heard_is_not_written() {
        let mut c = Conversation::default();
        c.agent_delta(&id("a1"), "こんにちは", 0);
        assert_eq!(c.agent_cut(&id("a1"), 0, 800, 0), None);
        assert_eq!(c.retrieved(&id("a1"), Some("")), None);
        assert_eq!(c.agent_text(&id("a1"), "こんにちは", 0), None);
    }

    #[test]
    fn a_turn_written_whole_then_cut_before_it_was_heard_is_emptied() {
        let mut c = Conversation::default();
        let whole = c.agent_text(&id("a1"), "こんにちは", 0).unwrap();
        let cut = c.agent_cut(&id("a1"), 0, 800, 10).unwrap();
        assert_eq!(
            (cut.seq, cut.text.as_str(), cut.interrupted),
            (whole.seq, "", true)
        );
        assert_eq!(c.retrieved(&id("a1"), Some("")), None);
    }

    #[test]
    fn retrieved_for_an_uncut_item_changes_nothing() {
        let mut c = Conversation::default();
        c.added(&id("a1"), Some("assistant"), 0);
        assert_eq!(c.retrieved(&id("a1"), Some("x")), None);
        assert_eq!(c.retrieved(&id("zz"), Some("x")), None);
    }

    #[test]
    fn empty_transcripts_are_skipped_and_seq_is_stable() {
        let mut c = Conversation::default();
        c.added(&id("u1"), Some("user"), 0);
        assert_eq!(c.caller_text(&id("u1"), "  ", 0), None);
        let e1 = c.caller_text(&id("u1"), "もしもし", 0).unwrap();
        let e2 = c.caller_text(&id("u1"), "もしもし", 0).unwrap();
        assert_eq!(e1.seq, e2.seq);
    }
}
