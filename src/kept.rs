//! Bounded in-memory maps of values read from the store that do not go stale (or that their
//! owner removes when they change). When one is full it is emptied and refilled as values are
//! read again: simple, and its memory stays bounded.

use std::{
    borrow::Borrow,
    collections::HashMap,
    hash::Hash,
    sync::{Mutex, MutexGuard},
};

/// A map of at most `max` entries, shared between threads.
pub struct Kept<K, V> {
    max: usize,
    map: Mutex<HashMap<K, V>>,
}

impl<K: Eq + Hash, V: Clone> Kept<K, V> {
    /// An empty map that keeps at most `max` entries.
    pub fn new(max: usize) -> Self {
        Self { max, map: Mutex::new(HashMap::new()) }
    }

    /// The kept value of `key`.
    pub fn get<Q: Eq + Hash + ?Sized>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        self.lock().get(key).cloned()
    }

    /// Keeps `value` for `key`, emptying the map first when it is full.
    pub fn insert(&self, key: K, value: V) {
        let mut map = self.lock();
        if map.len() >= self.max {
            map.clear();
        }
        map.insert(key, value);
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<K, V>> {
        self.map.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
