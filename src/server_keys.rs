//! Remote server keys persisted in the database: the [`federation::KeyStore`] the federation
//! client fetches and caches through. One row per server in `server_name_to_server_keys`
//! (the latest signed key response plus every key seen, current and old).
//!
//! Every received PDU asks for its sender's keys, so the rows read are also kept in memory;
//! all writes go through this store, which updates the kept row under the same lock.

use std::sync::{Arc, Mutex, PoisonError};

use federation::{KeyStore, StoredServerKeys};
use ruma::{OwnedServerName, ServerName};
use storage::Db;

use crate::kept::Kept;

const TABLE: &str = "server_name_to_server_keys";

/// The most servers whose keys are kept in memory.
const KEPT_SERVERS_MAX: usize = 1024;

/// The database-backed key store.
#[derive(Clone)]
pub struct DbKeyStore {
    db: Db,
    /// Rows read or written, by server (`None`: no row).
    kept: Arc<Kept<OwnedServerName, Option<StoredServerKeys>>>,
    /// Held while reading a row that is not kept and while writing one, so a read never keeps
    /// a row older than the last write.
    filling: Arc<Mutex<()>>,
}

impl DbKeyStore {
    /// A key store over `db`.
    pub fn new(db: Db) -> Self {
        Self { db, kept: Arc::new(Kept::new(KEPT_SERVERS_MAX)), filling: Arc::default() }
    }
}

fn store_error(error: storage::Error) -> federation::Error {
    federation::Error::KeyStore(Box::new(error))
}

impl KeyStore for DbKeyStore {
    fn load_server_keys(
        &self,
        server_name: &ServerName,
    ) -> Result<Option<StoredServerKeys>, federation::Error> {
        if let Some(row) = self.kept.get(server_name) {
            return Ok(row);
        }
        let _filling = self.filling.lock().unwrap_or_else(PoisonError::into_inner);
        let row: Option<StoredServerKeys> =
            self.db.get(TABLE, server_name.as_bytes()).map_err(store_error)?;
        self.kept.insert(server_name.to_owned(), row.clone());
        Ok(row)
    }

    fn store_server_keys(
        &self,
        server_name: &ServerName,
        keys: &StoredServerKeys,
    ) -> Result<(), federation::Error> {
        let _filling = self.filling.lock().unwrap_or_else(PoisonError::into_inner);
        let mut batch = self.db.batch();
        batch.put(TABLE, server_name.as_bytes(), keys).map_err(store_error)?;
        self.db.write(batch).map_err(store_error)?;
        self.kept.insert(server_name.to_owned(), Some(keys.clone()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use federation::{ServerSigningKey, keys};
    use ruma::server_name;

    use super::*;

    #[test]
    fn keys_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let signing_key = ServerSigningKey::load_or_generate(
            &dir.path().join("k"),
            server_name!("a.test").to_owned(),
        )
        .unwrap();
        let response = keys::own_server_keys(&signing_key, &[], 1000).unwrap();
        let stored = keys::check_server_keys(server_name!("a.test"), response, None, 5).unwrap();
        {
            let store = DbKeyStore::new(Db::open(&dir.path().join("db")).unwrap());
            assert_eq!(store.load_server_keys(server_name!("a.test")).unwrap(), None);
            store.store_server_keys(server_name!("a.test"), &stored).unwrap();
        }
        let store: Arc<dyn KeyStore> =
            Arc::new(DbKeyStore::new(Db::open(&dir.path().join("db")).unwrap()));
        assert_eq!(store.load_server_keys(server_name!("a.test")).unwrap(), Some(stored.clone()));

        // The kept row follows every write, including one after a miss was kept.
        assert_eq!(store.load_server_keys(server_name!("b.test")).unwrap(), None);
        let mut newer = stored.clone();
        newer.valid_until_ts += 1;
        store.store_server_keys(server_name!("b.test"), &newer).unwrap();
        store.store_server_keys(server_name!("a.test"), &newer).unwrap();
        assert_eq!(store.load_server_keys(server_name!("b.test")).unwrap(), Some(newer.clone()));
        assert_eq!(store.load_server_keys(server_name!("a.test")).unwrap(), Some(newer));
    }
}
