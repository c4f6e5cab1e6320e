//! Hearth's storage layer: RocksDB column families behind a small typed API.
//!
//! The crate knows RocksDB and byte layouts, nothing of HTTP or Matrix error codes.
//! Every table is named after what maps to what (`event_id_to_pdu`, `room_alias_to_room_id`,
//! ...); the list lives in [`TABLES`] so a database opened by a newer binary creates the tables
//! it is missing. A large or hot table is a column family of its own; the small ones share
//! RocksDB's default column family, each under a one-byte tag ([`Home`]), which callers never
//! see.
//! One logical change is one [`Batch`], written atomically with [`Db::write`]; the global
//! stream position, which orders everything `/sync` reports, is bumped inside the same batch
//! by [`Db::write_at_next_position`].
#![warn(missing_docs)]

pub mod keys;

use std::{
    borrow::Cow,
    collections::HashMap,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use rocksdb::{
    BoundColumnFamily, ColumnFamilyDescriptor, DBWithThreadMode, Direction, IteratorMode,
    MultiThreaded, Options, WriteBatch, WriteOptions,
};

/// The schema version this binary writes; older databases are migrated on open.
///
/// 2: the small tables moved from a column family each into the default one, under a tag.
pub const SCHEMA_VERSION: u64 = 2;

/// Where a table's entries live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Home {
    /// A column family of the table's own name. For the large and hot tables: each has its
    /// own memtable, files and compactions, and the point-read ones their memtable filter.
    Own,
    /// RocksDB's default column family, each key behind this one-byte tag. Every column
    /// family costs about 110 KiB of memory even when empty (its statistics, version and
    /// memtable), so the many small tables share one. A tag is never reused or changed.
    Shared(u8),
}

/// Every table the server uses and where it lives. Adding one here is enough: it is created
/// on open (an [`Home::Own`] table as a new column family; a shared one needs a new tag).
pub const TABLES: &[(&str, Home)] = &[
    ("global", Home::Own),
    ("event_id_to_pdu", Home::Own),
    ("event_id_to_meta", Home::Own),
    ("event_id_to_short", Home::Own),
    ("short_to_event_id", Home::Own),
    ("state_key_to_short", Home::Own),
    ("short_to_state_key", Home::Own),
    ("snapshot_to_delta", Home::Own),
    ("room_position_to_event_id", Home::Own),
    ("room_state_key_to_event_id", Home::Own),
    ("user_id_to_account", Home::Shared(1)),
    ("token_hash_to_session", Home::Shared(2)),
    ("user_device_to_device", Home::Shared(3)),
    ("user_filter_to_filter", Home::Shared(4)),
    ("openid_token_hash_to_openid_token", Home::Shared(5)),
    ("uia_session_to_state", Home::Shared(6)),
    ("user_room_type_to_account_data", Home::Shared(7)),
    ("user_position_to_account_data_change", Home::Shared(8)),
    ("txn_to_event_id", Home::Shared(9)),
    ("room_id_to_room", Home::Shared(10)),
    ("room_order_to_historical_event_id", Home::Shared(11)),
    ("user_room_to_membership", Home::Shared(12)),
    ("room_user_to_membership", Home::Shared(13)),
    ("room_alias_to_room_id", Home::Shared(14)),
    ("room_id_alias_to_unit", Home::Shared(15)),
    ("public_room_id_to_unit", Home::Shared(16)),
    ("room_receipt_to_receipt", Home::Shared(17)),
    ("room_position_to_receipt", Home::Shared(18)),
    ("user_id_to_presence", Home::Shared(19)),
    ("event_relations", Home::Shared(20)),
    ("user_device_to_device_keys", Home::Shared(21)),
    ("user_device_algorithm_upload_to_one_time_key", Home::Shared(22)),
    ("user_device_algorithm_to_fallback_key", Home::Shared(23)),
    ("user_kind_to_cross_signing_key", Home::Shared(24)),
    ("position_user_to_key_change", Home::Shared(25)),
    ("destination_id_to_outbound", Home::Shared(26)),
    ("user_id_to_device_list_edu", Home::Shared(27)),
    ("user_id_to_dehydrated_device", Home::Shared(28)),
    ("user_device_position_to_to_device", Home::Shared(29)),
    ("user_device_txn_to_to_device_txn", Home::Shared(30)),
    ("user_device_batch_to_to_device_cursor", Home::Shared(31)),
    ("server_message_to_to_device_message", Home::Shared(32)),
    ("user_to_last_key_change", Home::Shared(33)),
    ("server_name_to_server_keys", Home::Shared(34)),
    ("user_version_to_key_backup_version", Home::Shared(35)),
    ("user_version_room_session_to_room_key", Home::Shared(36)),
];

/// Errors from the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// RocksDB failed.
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    /// A stored value did not decode.
    #[error("corrupt value in {table}: {source}")]
    Corrupt {
        /// The table the value came from.
        table: String,
        /// Why it did not decode.
        #[source]
        source: serde_json::Error,
    },
    /// A value could not be encoded.
    #[error("encoding a value: {0}")]
    Encode(#[source] serde_json::Error),
    /// The database was written by a newer schema than this binary knows.
    #[error("database schema {found} is newer than this binary's {SCHEMA_VERSION}")]
    SchemaTooNew {
        /// The schema version found on disk.
        found: u64,
    },
    /// A table name that is not in [`TABLES`].
    #[error("unknown table {0}")]
    UnknownTable(String),
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

type Rocks = DBWithThreadMode<MultiThreaded>;

/// An open database. Cheap to clone.
#[derive(Clone)]
pub struct Db {
    inner: Arc<Inner>,
}

struct Inner {
    rocks: Rocks,
    /// Each table's home, by name.
    homes: HashMap<&'static str, Home>,
    /// The last stream position that is written and visible.
    position: AtomicU64,
    /// Held while a position is allocated and its batch written, so positions become visible in
    /// order (a reader never sees position n+1 before n).
    write_lock: Mutex<()>,
    /// The next short id to hand out.
    next_short: AtomicU64,
}

/// Tables read mostly one key at a time by ids that are spread over the whole key space (an
/// event's PDU, metadata and short id): their memtables keep a filter of the keys they hold, so
/// a read of a key that was already flushed (most reads) skips searching the memtable.
const POINT_READ_TABLES: &[&str] =
    &["event_id_to_pdu", "event_id_to_meta", "event_id_to_short", "short_to_event_id"];
/// The size of that filter, as a share of the memtable (1/50: 80 KiB for 4 MiB).
const MEMTABLE_FILTER_RATIO: f64 = 0.02;

/// The block cache all tables share.
const BLOCK_CACHE_BYTES: usize = 32 << 20;
/// One table's memtable before it is flushed to disk.
const MEMTABLE_BYTES: usize = 4 << 20;
/// All memtables together; past this, the largest is flushed.
const MEMTABLES_TOTAL_BYTES: usize = 32 << 20;

/// How many entries a migration moves per batch.
const MIGRATION_BATCH: usize = 4096;

/// Whether a write hands its WAL record to the OS before it returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wal {
    /// Before it returns: the write outlives a crash of the process (not of the machine: the
    /// WAL is not synced to the disk on every write).
    Flush,
    /// With the next flushing write or [`Db::flush_wal_buffer`]: for a group of writes that is
    /// answered as one (a federation transaction), which the caller ends with a flush. A crash
    /// of the process before that loses them. The write is visible to reads at once.
    Buffer,
}

const POSITION_KEY: &[u8] = b"stream_position";
const SHORT_KEY: &[u8] = b"next_short";
const SCHEMA_KEY: &[u8] = b"schema_version";

impl Db {
    /// Opens (or creates) the database under `path`, and moves the tables of an older layout
    /// into their homes.
    pub fn open(path: &Path) -> Result<Self> {
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        options.set_compression_type(rocksdb::DBCompressionType::Lz4);
        options.set_max_open_files(512);
        options.set_keep_log_file_num(4);
        // RocksDB's own log at info level dumps every table's options at each start (over
        // 200 KiB) and every flush and compaction: disk that holds no data, counted in S7's
        // bytes per message. Warnings and errors are still written.
        options.set_log_level(rocksdb::LogLevel::Warn);
        // The WAL is handed to the OS by [`Db::write`] itself, or, for [`Wal::Buffer`] writes,
        // once for a whole group of them (a federation transaction's PDUs): a `write(2)` per
        // event was a sixth of receiving a PDU.
        options.set_manual_wal_flush(true);
        options.increase_parallelism(2);
        // Memory: every table would otherwise get its own block cache and 64 MiB memtables,
        // which with dozens of tables grows the process to hundreds of MiB under light load.
        // One cache is shared by all tables, and all memtables together are capped.
        options.set_db_write_buffer_size(MEMTABLES_TOTAL_BYTES);
        let cache = rocksdb::Cache::new_lru_cache(BLOCK_CACHE_BYTES);
        let family_options = |name: &str| {
            let mut table_options = Options::default();
            table_options.set_compression_type(rocksdb::DBCompressionType::Lz4);
            table_options.set_write_buffer_size(MEMTABLE_BYTES);
            let mut block_options = rocksdb::BlockBasedOptions::default();
            block_options.set_block_cache(&cache);
            block_options.set_bloom_filter(10.0, false);
            block_options.set_cache_index_and_filter_blocks(true);
            table_options.set_block_based_table_factory(&block_options);
            if POINT_READ_TABLES.contains(&name) {
                table_options.set_memtable_prefix_bloom_ratio(MEMTABLE_FILTER_RATIO);
                table_options.set_memtable_whole_key_filtering(true);
            }
            table_options
        };
        // The families to open: the default one, every own table's, and whatever the database
        // already has (RocksDB opens all or none), such as a shared table's family from before
        // schema 2.
        let mut families = vec![rocksdb::DEFAULT_COLUMN_FAMILY_NAME.to_owned()];
        families.extend(
            TABLES
                .iter()
                .filter(|(_, home)| *home == Home::Own)
                .map(|(name, _)| (*name).to_owned()),
        );
        // A database that does not exist yet has no families to list.
        for name in Rocks::list_cf(&options, path).unwrap_or_default() {
            if !families.contains(&name) {
                families.push(name);
            }
        }
        let descriptors = families
            .iter()
            .map(|name| ColumnFamilyDescriptor::new(name.as_str(), family_options(name)));
        let rocks = Rocks::open_cf_descriptors(&options, path, descriptors)?;
        let read_u64 = |key: &[u8]| -> Result<Option<u64>> {
            let table = rocks.cf_handle("global").ok_or(Error::UnknownTable("global".into()))?;
            Ok(rocks.get_cf(&table, key)?.as_deref().and_then(keys::decode_u64))
        };
        let schema = read_u64(SCHEMA_KEY)?;
        let position = read_u64(POSITION_KEY)?.unwrap_or(0);
        let next_short = read_u64(SHORT_KEY)?.unwrap_or(1);
        if let Some(found) = schema
            && found > SCHEMA_VERSION
        {
            return Err(Error::SchemaTooNew { found });
        }
        let db = Self {
            inner: Arc::new(Inner {
                rocks,
                homes: TABLES.iter().copied().collect(),
                position: AtomicU64::new(position),
                write_lock: Mutex::new(()),
                next_short: AtomicU64::new(next_short),
            }),
        };
        for (name, home) in TABLES {
            if let Home::Shared(tag) = home
                && families.iter().any(|family| family == name)
            {
                db.move_into_shared(name, *tag)?;
            }
        }
        if schema != Some(SCHEMA_VERSION) {
            let mut batch = db.batch();
            batch.put_raw("global", SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())?;
            db.write(batch)?;
        }
        Ok(db)
    }

    /// Moves a shared table's entries out of the column family it had before schema 2 into the
    /// default family under its tag, then drops the old family. Idempotent: if the process stops
    /// before the drop, the next open copies the same entries again (nothing is served between).
    fn move_into_shared(&self, name: &str, tag: u8) -> Result<()> {
        let rocks = &self.inner.rocks;
        let moved = {
            let old = self.family(name)?;
            let default = self.family(rocksdb::DEFAULT_COLUMN_FAMILY_NAME)?;
            let mut batch = WriteBatch::default();
            let mut moved = 0usize;
            for item in rocks.iterator_cf(&old, IteratorMode::Start) {
                let (key, value) = item?;
                batch.put_cf(&default, tagged(Some(tag), &key), value);
                moved += 1;
                if batch.len() >= MIGRATION_BATCH {
                    rocks.write(std::mem::take(&mut batch))?;
                }
            }
            rocks.write(batch)?;
            moved
        };
        rocks.flush_wal(true)?;
        rocks.drop_cf(name)?;
        tracing::info!(
            table = name,
            entries = moved,
            "moved a table into the shared column family"
        );
        Ok(())
    }

    /// The last stream position whose changes are written and visible.
    pub fn position(&self) -> u64 {
        self.inner.position.load(Ordering::Acquire)
    }

    /// Starts a batch of writes.
    pub fn batch(&self) -> Batch<'_> {
        Batch { db: self, batch: WriteBatch::default() }
    }

    fn family(&self, name: &str) -> Result<Arc<BoundColumnFamily<'_>>> {
        self.inner.rocks.cf_handle(name).ok_or_else(|| Error::UnknownTable(name.to_owned()))
    }

    /// A table's column family, and the tag its keys carry there (`None` for an own table).
    fn table(&self, name: &str) -> Result<(Arc<BoundColumnFamily<'_>>, Option<u8>)> {
        match self.inner.homes.get(name) {
            Some(Home::Own) => Ok((self.family(name)?, None)),
            Some(Home::Shared(tag)) => {
                Ok((self.family(rocksdb::DEFAULT_COLUMN_FAMILY_NAME)?, Some(*tag)))
            }
            None => Err(Error::UnknownTable(name.to_owned())),
        }
    }

    /// Writes a batch atomically, WAL first; the WAL record (with any buffered before it) is
    /// with the OS when this returns ([`Wal::Flush`]).
    pub fn write(&self, batch: Batch<'_>) -> Result<()> {
        self.write_with(batch, Wal::Flush)
    }

    /// Hands the WAL records buffered by [`Wal::Buffer`] writes to the OS.
    pub fn flush_wal_buffer(&self) -> Result<()> {
        self.inner.rocks.flush_wal(false)?;
        Ok(())
    }

    fn write_with(&self, batch: Batch<'_>, wal: Wal) -> Result<()> {
        let mut options = WriteOptions::default();
        options.set_sync(false);
        self.inner.rocks.write_opt(batch.batch, &options)?;
        if wal == Wal::Flush {
            self.flush_wal_buffer()?;
        }
        Ok(())
    }

    /// Allocates the next stream position, lets `fill` add writes for it, and commits them and
    /// the new position in one atomic batch ([`Db::write`]). Returns the position once it is
    /// visible.
    pub fn write_at_next_position<T>(
        &self,
        fill: impl FnOnce(u64, &mut Batch<'_>) -> Result<T>,
    ) -> Result<(u64, T)> {
        self.write_at_next_position_with(Wal::Flush, fill)
    }

    /// [`Db::write_at_next_position`], with its WAL record handed over as `wal` says.
    pub fn write_at_next_position_with<T>(
        &self,
        wal: Wal,
        fill: impl FnOnce(u64, &mut Batch<'_>) -> Result<T>,
    ) -> Result<(u64, T)> {
        let _guard = self.inner.write_lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let position = self.position() + 1;
        let mut batch = self.batch();
        let value = fill(position, &mut batch)?;
        batch.put_raw("global", POSITION_KEY, &position.to_be_bytes())?;
        self.write_with(batch, wal)?;
        self.inner.position.store(position, Ordering::Release);
        Ok((position, value))
    }

    /// Hands out a fresh short id; the counter is persisted with `batch`.
    pub fn next_short(&self, batch: &mut Batch<'_>) -> Result<u64> {
        let short = self.inner.next_short.fetch_add(1, Ordering::AcqRel);
        batch.put_raw("global", SHORT_KEY, &(short + 1).to_be_bytes())?;
        Ok(short)
    }

    /// Reads raw bytes.
    pub fn get_raw(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let (family, tag) = self.table(table)?;
        Ok(self.inner.rocks.get_cf(&family, tagged(tag, key))?)
    }

    /// Reads and decodes a JSON value.
    pub fn get<T: serde::de::DeserializeOwned>(
        &self,
        table: &str,
        key: &[u8],
    ) -> Result<Option<T>> {
        self.read(table, key, |bytes| serde_json::from_slice(bytes))?
            .transpose()
            .map_err(|source| Error::Corrupt { table: table.to_owned(), source })
    }

    /// Reads a value in place (not copied out of RocksDB) and hands it to `decode`.
    pub fn read<T>(
        &self,
        table: &str,
        key: &[u8],
        decode: impl FnOnce(&[u8]) -> T,
    ) -> Result<Option<T>> {
        let (family, tag) = self.table(table)?;
        Ok(self.inner.rocks.get_pinned_cf(&family, tagged(tag, key))?.map(|bytes| decode(&bytes)))
    }

    /// Reads many keys of one table in one batched lookup (RocksDB's `MultiGet`, which shares
    /// the index and filter work between keys), handing each value found to `decode` with the
    /// index of its key. Keys need not be sorted.
    pub fn read_many<K: AsRef<[u8]>>(
        &self,
        table: &str,
        keys: &[K],
        mut decode: impl FnMut(usize, &[u8]),
    ) -> Result<()> {
        let (family, tag) = self.table(table)?;
        let keys: Vec<Cow<'_, [u8]>> = keys.iter().map(|key| tagged(tag, key.as_ref())).collect();
        let values = self.inner.rocks.batched_multi_get_cf(&family, &keys, false);
        for (index, value) in values.into_iter().enumerate() {
            if let Some(bytes) = value? {
                decode(index, &bytes);
            }
        }
        Ok(())
    }

    /// Whether a key exists.
    pub fn contains(&self, table: &str, key: &[u8]) -> Result<bool> {
        // Pinned: the value is looked at in place, not copied out.
        let (family, tag) = self.table(table)?;
        Ok(self.inner.rocks.get_pinned_cf(&family, tagged(tag, key))?.is_some())
    }

    /// All entries whose key starts with `prefix`, in key order.
    pub fn scan_prefix(&self, table: &str, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        self.for_each_prefix(table, prefix, |key, value| {
            out.push((key.to_vec(), value.to_vec()));
            true
        })?;
        Ok(out)
    }

    /// Visits entries whose key starts with `prefix` in key order until `visit` returns false.
    pub fn for_each_prefix(
        &self,
        table: &str,
        prefix: &[u8],
        visit: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<()> {
        self.for_each_prefix_from(table, prefix, prefix, visit)
    }

    /// Visits entries whose key starts with `prefix`, from `start` (inclusive) onwards in key
    /// order, until `visit` returns false.
    pub fn for_each_prefix_from(
        &self,
        table: &str,
        prefix: &[u8],
        start: &[u8],
        visit: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<()> {
        self.walk(table, prefix, start, Direction::Forward, visit)
    }

    /// Visits entries in `[prefix..start]` backwards (from `start`, inclusive, down to the first key
    /// with `prefix`) until `visit` returns false.
    pub fn for_each_prefix_rev(
        &self,
        table: &str,
        prefix: &[u8],
        start: &[u8],
        visit: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<()> {
        self.walk(table, prefix, start, Direction::Reverse, visit)
    }

    fn walk(
        &self,
        table: &str,
        prefix: &[u8],
        start: &[u8],
        direction: Direction,
        mut visit: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<()> {
        let (family, tag) = self.table(table)?;
        let (prefix, start) = (tagged(tag, prefix), tagged(tag, start));
        let skip = usize::from(tag.is_some());
        for item in self.inner.rocks.iterator_cf(&family, IteratorMode::From(&start, direction)) {
            let (key, value) = item?;
            if !key.starts_with(&prefix) || !visit(&key[skip..], &value) {
                break;
            }
        }
        Ok(())
    }

    /// Flushes memtables and the WAL to disk (used on shutdown).
    pub fn flush(&self) -> Result<()> {
        self.inner.rocks.flush_wal(true)?;
        self.inner.rocks.flush_cf(&self.family(rocksdb::DEFAULT_COLUMN_FAMILY_NAME)?)?;
        for (name, home) in TABLES {
            if *home == Home::Own {
                self.inner.rocks.flush_cf(&self.family(name)?)?;
            }
        }
        Ok(())
    }

    /// Writes a consistent online backup (a RocksDB checkpoint) into `path`, which must not exist.
    pub fn checkpoint(&self, path: &Path) -> Result<()> {
        let checkpoint = rocksdb::checkpoint::Checkpoint::new(&self.inner.rocks)?;
        checkpoint.create_checkpoint(path)?;
        Ok(())
    }
}

/// `key` as stored: behind the table's tag in the shared family, as it is in an own one.
fn tagged(tag: Option<u8>, key: &[u8]) -> Cow<'_, [u8]> {
    match tag {
        None => Cow::Borrowed(key),
        Some(tag) => {
            let mut stored = Vec::with_capacity(key.len() + 1);
            stored.push(tag);
            stored.extend_from_slice(key);
            Cow::Owned(stored)
        }
    }
}

/// A set of writes committed atomically by [`Db::write`].
pub struct Batch<'a> {
    db: &'a Db,
    batch: WriteBatch,
}

impl Batch<'_> {
    /// Adds a raw write.
    pub fn put_raw(&mut self, table: &str, key: &[u8], value: &[u8]) -> Result<()> {
        let (family, tag) = self.db.table(table)?;
        self.batch.put_cf(&family, tagged(tag, key), value);
        Ok(())
    }

    /// Adds a JSON-encoded write.
    pub fn put<T: serde::Serialize>(&mut self, table: &str, key: &[u8], value: &T) -> Result<()> {
        let bytes = serde_json::to_vec(value).map_err(Error::Encode)?;
        self.put_raw(table, key, &bytes)
    }

    /// Adds a delete.
    pub fn delete(&mut self, table: &str, key: &[u8]) -> Result<()> {
        let (family, tag) = self.db.table(table)?;
        self.batch.delete_cf(&family, tagged(tag, key));
        Ok(())
    }

    /// Number of writes in the batch.
    pub fn len(&self) -> usize {
        self.batch.len()
    }

    /// Whether the batch has no writes.
    pub fn is_empty(&self) -> bool {
        self.batch.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_survive_reopen_and_batches_are_atomic() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Db::open(dir.path()).unwrap();
            assert_eq!(db.position(), 0);
            let (position, ()) = db
                .write_at_next_position(|position, batch| {
                    batch.put("room_id_to_room", b"!a:x", &position)?;
                    Ok(())
                })
                .unwrap();
            assert_eq!(position, 1);
            let mut batch = db.batch();
            let short = db.next_short(&mut batch).unwrap();
            assert_eq!(short, 1);
            db.write(batch).unwrap();
        }
        let db = Db::open(dir.path()).unwrap();
        assert_eq!(db.position(), 1);
        assert_eq!(db.get::<u64>("room_id_to_room", b"!a:x").unwrap(), Some(1));
        let mut batch = db.batch();
        assert_eq!(db.next_short(&mut batch).unwrap(), 2);
    }

    /// Bytes of the write-ahead log files with the OS.
    fn wal_bytes(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|entry| entry.file_name().to_string_lossy().ends_with(".log"))
            .map(|entry| entry.metadata().unwrap().len())
            .sum()
    }

    #[test]
    fn buffered_writes_reach_the_wal_when_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let start = wal_bytes(dir.path());
        let mut batch = db.batch();
        batch.put("room_id_to_room", b"!a:x", &1u64).unwrap();
        db.write(batch).unwrap();
        let after_write = wal_bytes(dir.path());
        assert!(after_write > start, "a plain write is with the OS: {start} -> {after_write}");

        let (first, ()) = db
            .write_at_next_position_with(Wal::Buffer, |position, batch| {
                batch.put("room_id_to_room", b"!b:x", &position)
            })
            .unwrap();
        let (position, ()) = db
            .write_at_next_position_with(Wal::Buffer, |_, batch| {
                batch.put("room_id_to_room", b"!c:x", &3u64)
            })
            .unwrap();
        // Visible at once, but not yet in the log file.
        assert_eq!(db.position(), position);
        assert_eq!(db.get::<u64>("room_id_to_room", b"!b:x").unwrap(), Some(first));
        assert_eq!(db.get::<u64>("room_id_to_room", b"!c:x").unwrap(), Some(3));
        assert_eq!(wal_bytes(dir.path()), after_write);
        db.flush_wal_buffer().unwrap();
        let flushed = wal_bytes(dir.path());
        assert!(flushed > after_write, "{after_write} -> {flushed}");
        drop(db);
        let db = Db::open(dir.path()).unwrap();
        assert_eq!(db.position(), position);
        assert_eq!(db.get::<u64>("room_id_to_room", b"!c:x").unwrap(), Some(3));
    }

    #[test]
    fn prefix_scans_stop_at_the_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let mut batch = db.batch();
        for key in [&b"a\xffone"[..], b"a\xfftwo", b"b\xffthree"] {
            batch.put_raw("global", key, b"v").unwrap();
        }
        db.write(batch).unwrap();
        let found = db.scan_prefix("global", b"a\xff").unwrap();
        assert_eq!(found.len(), 2);
        let mut backwards = Vec::new();
        db.for_each_prefix_rev("global", b"a\xff", b"a\xff\xff", |key, _| {
            backwards.push(key.to_vec());
            true
        })
        .unwrap();
        assert_eq!(backwards, vec![b"a\xfftwo".to_vec(), b"a\xffone".to_vec()]);
    }

    #[test]
    fn batched_reads_find_what_single_reads_find() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        // Some keys flushed to a table file, some only in the memtable (with its key filter).
        let mut batch = db.batch();
        for index in 0..100u32 {
            batch
                .put_raw(
                    "event_id_to_pdu",
                    format!("$flushed{index}").as_bytes(),
                    &index.to_be_bytes(),
                )
                .unwrap();
        }
        db.write(batch).unwrap();
        db.flush().unwrap();
        let mut batch = db.batch();
        batch.put_raw("event_id_to_pdu", b"$fresh", b"fresh").unwrap();
        db.write(batch).unwrap();
        let keys = ["$flushed7", "$missing", "$fresh", "$flushed99", "$flushed7"];
        let mut found = vec![None; keys.len()];
        db.read_many("event_id_to_pdu", &keys, |index, bytes| found[index] = Some(bytes.to_vec()))
            .unwrap();
        for (key, batched) in keys.iter().zip(&found) {
            assert_eq!(batched, &db.get_raw("event_id_to_pdu", key.as_bytes()).unwrap(), "{key}");
        }
        assert_eq!(found[1], None);
        assert_eq!(found[2].as_deref(), Some(&b"fresh"[..]));
        assert!(db.read_many("no_such_table", &keys, |_, _| {}).is_err());
    }

    #[test]
    fn shared_tables_keep_to_their_own_keys() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        // Neighbouring tags, the same keys in each.
        let (first, second) = ("user_id_to_account", "token_hash_to_session");
        let mut batch = db.batch();
        for table in [first, second] {
            for key in [&b"@a"[..], b"@b", b"\xff"] {
                batch.put_raw(table, key, table.as_bytes()).unwrap();
            }
        }
        db.write(batch).unwrap();
        let all = db.scan_prefix(first, b"").unwrap();
        let keys: Vec<&[u8]> = all.iter().map(|(key, _)| key.as_slice()).collect();
        assert_eq!(keys, vec![&b"@a"[..], b"@b", b"\xff"], "keys come back without the tag");
        assert!(all.iter().all(|(_, value)| value == first.as_bytes()));
        let mut backwards = Vec::new();
        db.for_each_prefix_rev(second, b"", b"\xff\xff", |key, value| {
            assert_eq!(value, second.as_bytes());
            backwards.push(key.to_vec());
            true
        })
        .unwrap();
        assert_eq!(backwards, vec![b"\xff".to_vec(), b"@b".to_vec(), b"@a".to_vec()]);
        let mut batch = db.batch();
        batch.delete(first, b"@a").unwrap();
        db.write(batch).unwrap();
        assert_eq!(db.get_raw(first, b"@a").unwrap(), None);
        assert_eq!(db.get_raw(second, b"@a").unwrap().as_deref(), Some(second.as_bytes()));
        let mut found = Vec::new();
        db.read_many(second, &[&b"@b"[..], b"@a"], |index, _| found.push(index)).unwrap();
        assert_eq!(found, vec![0, 1]);
    }

    #[test]
    fn a_schema_1_database_moves_its_small_tables_into_the_shared_family() {
        let dir = tempfile::tempdir().unwrap();
        let legacy = "user_id_to_account";
        {
            // The layout before schema 2: every table its own column family.
            let mut options = Options::default();
            options.create_if_missing(true);
            options.create_missing_column_families(true);
            let rocks = Rocks::open_cf(&options, dir.path(), ["global", legacy]).unwrap();
            let (global, accounts) =
                (rocks.cf_handle("global").unwrap(), rocks.cf_handle(legacy).unwrap());
            rocks.put_cf(&global, SCHEMA_KEY, 1u64.to_be_bytes()).unwrap();
            rocks.put_cf(&global, POSITION_KEY, 7u64.to_be_bytes()).unwrap();
            for index in 0..(MIGRATION_BATCH + 10) {
                rocks.put_cf(&accounts, format!("@user{index:05}"), b"{}").unwrap();
            }
        }
        for _ in 0..2 {
            let db = Db::open(dir.path()).unwrap();
            assert_eq!(db.position(), 7);
            assert_eq!(db.scan_prefix(legacy, b"@user").unwrap().len(), MIGRATION_BATCH + 10);
            assert_eq!(db.get_raw(legacy, b"@user00003").unwrap().as_deref(), Some(&b"{}"[..]));
            assert_eq!(
                db.get_raw("global", SCHEMA_KEY).unwrap().as_deref().and_then(keys::decode_u64),
                Some(SCHEMA_VERSION)
            );
            drop(db);
            let families = Rocks::list_cf(&Options::default(), dir.path()).unwrap();
            assert!(!families.iter().any(|name| name == legacy), "{families:?}");
        }
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Db::open(dir.path()).unwrap();
            let mut batch = db.batch();
            batch.put_raw("global", SCHEMA_KEY, &(SCHEMA_VERSION + 1).to_be_bytes()).unwrap();
            db.write(batch).unwrap();
        }
        assert!(matches!(Db::open(dir.path()), Err(Error::SchemaTooNew { .. })));
    }

    #[test]
    fn unknown_tables_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        assert!(matches!(db.get_raw("nope", b"k"), Err(Error::UnknownTable(_))));
    }
}
