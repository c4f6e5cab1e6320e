//! Wiring: opens the database and signing key, builds the components, binds the listener and
//! serves until shutdown.

use std::{net::SocketAddr, sync::Arc};

use federation::ServerSigningKey;
use storage::Db;
use tokio::net::TcpListener;

use crate::{
    account_data::AccountData,
    accounts::Accounts,
    api::{self, AppState, uia::UiaSessions},
    config::Config,
    e2ee::E2ee,
    ephemeral::Ephemeral,
    notify::Notifier,
    rooms::{Rooms, ingest::Remote},
};

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The database could not be opened.
    #[error("opening the database at {path}: {source}")]
    Database {
        /// Where.
        path: String,
        /// Why.
        #[source]
        source: storage::Error,
    },
    /// The signing key could not be loaded.
    #[error(transparent)]
    SigningKey(#[from] federation::Error),
    /// Binding or serving failed.
    #[error("listener {address}: {source}")]
    Listen {
        /// The address.
        address: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A server ready to serve: components built, listener bound.
pub struct Server {
    state: AppState,
    listener: TcpListener,
    db: Db,
}

/// Opens the database of a config (also used by the `user` commands).
pub fn open_database(config: &Config) -> Result<Db, ServerError> {
    let path = config.database_path();
    Db::open(&path)
        .map_err(|source| ServerError::Database { path: path.display().to_string(), source })
}

impl Server {
    /// Opens storage, loads or makes the signing key, and binds the listener.
    pub async fn bind(config: Config) -> Result<Self, ServerError> {
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|source| ServerError::Listen { address: config.listen, source })?;
        let db = open_database(&config)?;
        let signing_key = Arc::new(ServerSigningKey::load_or_generate(
            &config.signing_key_path(),
            config.server_name.clone(),
        )?);
        let notifier = Notifier::new(db.position());
        let accounts = Accounts::new(db.clone(), config.server_name.clone());
        let rooms = Rooms::new(
            db.clone(),
            signing_key.clone(),
            config.default_room_version.clone(),
            notifier.clone(),
        );
        let ephemeral = Ephemeral::new(db.clone(), notifier.clone());
        let account_data = AccountData::new(db.clone(), notifier.clone());
        let e2ee = E2ee::new(db.clone(), notifier.clone());
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| ServerError::Listen { address: config.listen, source })?;
        let state = AppState {
            config: Arc::new(config),
            accounts,
            rooms,
            ephemeral,
            account_data,
            e2ee,
            uia: UiaSessions::default(),
            notifier,
            remote: Remote::local_only(&signing_key),
            signing_key,
        };
        Ok(Self { state, listener, db })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, std::io::Error> {
        self.listener.local_addr()
    }

    /// The accounts component (for the first-start notice).
    pub fn accounts(&self) -> &Accounts {
        &self.state.accounts
    }

    /// The room core (tests feed it remote PDUs directly, where the transport would).
    pub fn rooms(&self) -> &Rooms {
        &self.state.rooms
    }

    /// Serves until `shutdown` resolves, then finishes in-flight requests and flushes the
    /// database.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let address = self
            .listener
            .local_addr()
            .map_err(|source| ServerError::Listen { address: self.state.config.listen, source })?;
        tracing::info!(%address, server_name = %self.state.config.server_name, "serving");
        let notifier = self.state.notifier.clone();
        let shutdown = async move {
            shutdown.await;
            // Long polls answer at once instead of holding the shutdown up.
            notifier.close();
        };
        let app = api::router(self.state);
        let result =
            axum::serve(self.listener, app.into_make_service_with_connect_info::<SocketAddr>())
                .with_graceful_shutdown(shutdown)
                .await
                .map_err(|source| ServerError::Listen { address, source });
        if let Err(error) = self.db.flush() {
            tracing::error!(%error, "flushing the database on shutdown");
        }
        tracing::info!("stopped");
        result
    }
}
