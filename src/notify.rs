//! Wakes `/sync` long-polls: every committed change is announced here, with what it concerns,
//! and waiters re-check what concerns them. Event-driven, no polling loop.
//!
//! An announcement is either for everyone or for one room (an event in it that is not a
//! membership change). A waiter that is in none of the rooms announced since it last looked
//! goes on waiting without building a response: with many clients spread over many rooms,
//! each message used to make every long poll of the server build a whole sync to find
//! nothing in it.

use std::{
    collections::{HashSet, VecDeque},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
};

use ruma::{OwnedRoomId, RoomId};
use tokio::sync::watch;

/// How many announcements are kept for waiters to look through; a waiter that fell further
/// behind than this builds its response without looking.
const RECENT_MAX: usize = 4096;

/// Announces committed changes.
#[derive(Clone)]
pub struct Notifier {
    /// The sequence number of the newest announcement.
    sender: Arc<watch::Sender<u64>>,
    recent: Arc<Mutex<Recent>>,
    closed: Arc<AtomicBool>,
}

/// The newest announcements, oldest first: (sequence number, the room it is limited to).
#[derive(Default)]
struct Recent {
    entries: VecDeque<(u64, Option<OwnedRoomId>)>,
    next: u64,
}

/// Where a waiter is: the last announcement it has looked at.
#[derive(Clone, Copy, Debug)]
pub struct Seen(u64);

impl Notifier {
    /// A notifier with nothing announced yet.
    pub fn new() -> Self {
        Self {
            sender: Arc::new(watch::Sender::new(0)),
            recent: Arc::default(),
            closed: Arc::default(),
        }
    }

    /// Announces a committed change that may concern anyone.
    pub fn notify(&self, position: u64) {
        self.announce(position, None);
    }

    /// Announces a committed event of `room_id` that concerns only those in the room (not a
    /// membership change: that also concerns the member, who may not be in the room yet).
    pub fn notify_room(&self, room_id: &RoomId, position: u64) {
        self.announce(position, Some(room_id.to_owned()));
    }

    fn announce(&self, position: u64, room: Option<OwnedRoomId>) {
        let sequence = {
            let mut recent = self.lock();
            recent.next += 1;
            let sequence = recent.next;
            if recent.entries.len() >= RECENT_MAX {
                recent.entries.pop_front();
            }
            recent.entries.push_back((sequence, room));
            sequence
        };
        tracing::trace!(position, sequence, "change announced");
        // Every announcement wakes the waiters, each of which looks at what it missed.
        self.sender.send_modify(|newest| *newest = (*newest).max(sequence));
    }

    /// Where the announcements are now. Taken before the state a response is built from is
    /// read: a change announced earlier was committed before, so the response holds it, and
    /// one announced later is looked at by the next [`Notifier::concerns`].
    pub fn seen(&self) -> Seen {
        Seen(self.lock().next)
    }

    /// Whether anything announced after `since` may concern a user in `rooms`; `since` moves
    /// to the newest announcement either way.
    pub fn concerns(&self, since: &mut Seen, rooms: &HashSet<OwnedRoomId>) -> bool {
        let recent = self.lock();
        let after = since.0;
        since.0 = recent.next;
        // Dropped announcements may have concerned the user.
        if recent.entries.front().is_some_and(|(oldest, _)| *oldest > after + 1) {
            return true;
        }
        recent
            .entries
            .iter()
            .rev()
            .take_while(|(sequence, _)| *sequence > after)
            .any(|(_, room)| room.as_ref().is_none_or(|room| rooms.contains(room)))
    }

    /// Wakes every waiter for good: the server is shutting down, long polls answer now.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.sender.send_modify(|_| {});
    }

    /// Whether [`Notifier::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// A receiver that wakes on every announcement.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.sender.subscribe()
    }

    fn lock(&self) -> MutexGuard<'_, Recent> {
        self.recent.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Default for Notifier {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(name: &str) -> OwnedRoomId {
        OwnedRoomId::try_from(format!("!{name}:x")).unwrap()
    }

    #[test]
    fn a_waiter_looks_only_when_an_announcement_may_concern_it() {
        let notifier = Notifier::new();
        let mine = HashSet::from([room("mine")]);
        let mut seen = notifier.seen();
        assert!(!notifier.concerns(&mut seen, &mine), "nothing announced");
        notifier.notify_room(&room("other"), 1);
        notifier.notify_room(&room("third"), 2);
        assert!(!notifier.concerns(&mut seen, &mine));
        notifier.notify_room(&room("mine"), 3);
        assert!(notifier.concerns(&mut seen, &mine));
        assert!(!notifier.concerns(&mut seen, &mine), "already looked at");
        notifier.notify(4);
        assert!(notifier.concerns(&mut seen, &mine), "a change for everyone");
        // Announced out of position order: each is still looked at once.
        notifier.notify_room(&room("other"), 6);
        assert!(!notifier.concerns(&mut seen, &mine));
        notifier.notify_room(&room("mine"), 5);
        assert!(notifier.concerns(&mut seen, &mine));
    }

    #[test]
    fn a_waiter_that_fell_behind_the_kept_announcements_looks() {
        let notifier = Notifier::new();
        let mine = HashSet::from([room("mine")]);
        let mut seen = notifier.seen();
        notifier.notify_room(&room("mine"), 1);
        for position in 0..RECENT_MAX as u64 {
            notifier.notify_room(&room("other"), position + 2);
        }
        assert!(notifier.concerns(&mut seen, &mine));
        let mut seen = notifier.seen();
        notifier.notify_room(&room("other"), 10_000);
        assert!(!notifier.concerns(&mut seen, &mine));
    }

    #[tokio::test]
    async fn every_announcement_wakes_the_waiters() {
        let notifier = Notifier::new();
        let mut receiver = notifier.subscribe();
        receiver.borrow_and_update();
        notifier.notify_room(&room("a"), 9);
        assert!(receiver.has_changed().unwrap());
        receiver.borrow_and_update();
        // A lower position than before still wakes.
        notifier.notify(3);
        assert!(receiver.has_changed().unwrap());
    }
}
