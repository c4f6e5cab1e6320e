//! Wakes `/sync` long-polls: every committed change publishes its stream position here, and
//! waiters re-check what concerns them. Event-driven, no polling loop.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use tokio::sync::watch;

/// Publishes the newest committed stream position.
#[derive(Clone)]
pub struct Notifier {
    sender: Arc<watch::Sender<u64>>,
    closed: Arc<AtomicBool>,
}

impl Notifier {
    /// A notifier starting at `position`.
    pub fn new(position: u64) -> Self {
        Self { sender: Arc::new(watch::Sender::new(position)), closed: Arc::default() }
    }

    /// Announces that everything up to `position` is committed.
    pub fn notify(&self, position: u64) {
        self.sender.send_if_modified(|current| {
            if position > *current {
                *current = position;
                true
            } else {
                false
            }
        });
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

    /// A receiver that wakes on every new position.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.sender.subscribe()
    }
}
