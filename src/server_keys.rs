//! Remote server keys persisted in the database: the [`federation::KeyStore`] the federation
//! client fetches and caches through. One row per server in `server_name_to_server_keys`
//! (the latest signed key response plus every key seen, current and old).

use federation::{KeyStore, StoredServerKeys};
use ruma::ServerName;
use storage::Db;

const TABLE: &str = "server_name_to_server_keys";

/// The database-backed key store.
#[derive(Clone)]
pub struct DbKeyStore {
    db: Db,
}

impl DbKeyStore {
    /// A key store over `db`.
    pub fn new(db: Db) -> Self {
        Self { db }
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
        self.db.get(TABLE, server_name.as_bytes()).map_err(store_error)
    }

    fn store_server_keys(
        &self,
        server_name: &ServerName,
        keys: &StoredServerKeys,
    ) -> Result<(), federation::Error> {
        let mut batch = self.db.batch();
        batch.put(TABLE, server_name.as_bytes(), keys).map_err(store_error)?;
        self.db.write(batch).map_err(store_error)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

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
        assert_eq!(store.load_server_keys(server_name!("a.test")).unwrap(), Some(stored));
    }
}
