//! Wiring: opens the database and signing key, builds the components (the federation client
//! among them), binds the plain listener and the optional TLS one, and serves until shutdown.

use std::{net::SocketAddr, sync::Arc};

use axum::serve::ListenerExt;
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
    key_backup::KeyBackup,
    notify::Notifier,
    outbox::Outbox,
    rooms::Rooms,
    server_keys::DbKeyStore,
    tls::{TlsError, TlsListener},
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
    /// The federation client could not be built (for example a bad CA file).
    #[error("federation client: {0}")]
    FederationClient(#[source] federation::Error),
    /// The TLS certificate or key could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
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
    sender: federation::Sender,
    listener: TcpListener,
    tls_listener: Option<TlsListener>,
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
        let notifier = Notifier::new();
        let outbox = Outbox::new(db.clone());
        let accounts = Accounts::new(db.clone(), config.server_name.clone());
        let rooms = Rooms::new(
            db.clone(),
            signing_key.clone(),
            config.default_room_version.clone(),
            notifier.clone(),
            outbox.clone(),
            config.ingest_limits(),
        );
        let ephemeral = Ephemeral::new(db.clone(), notifier.clone());
        let account_data = AccountData::new(db.clone(), notifier.clone());
        let e2ee = E2ee::new(db.clone(), notifier.clone());
        let federation = federation::Client::new(
            signing_key.clone(),
            Arc::new(DbKeyStore::new(db.clone())),
            config.federation_client(),
        )
        .map_err(ServerError::FederationClient)?;
        let sender =
            federation::Sender::new(federation.clone(), Arc::new(outbox.clone()), config.sender());
        outbox.attach(sender.clone());
        let key_backup = KeyBackup::new(db.clone());
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| ServerError::Listen { address: config.listen, source })?;
        let tls_listener = match (config.tls_listen, &config.tls_cert, &config.tls_key) {
            (Some(address), Some(cert), Some(key)) => {
                let tls_config = crate::tls::server_config(cert, key)?;
                let tcp = TcpListener::bind(address)
                    .await
                    .map_err(|source| ServerError::Listen { address, source })?;
                Some(TlsListener::new(tcp, tls_config))
            }
            _ => None,
        };
        let state = AppState {
            config: Arc::new(config),
            accounts,
            rooms,
            ephemeral,
            account_data,
            e2ee,
            key_backup,
            uia: UiaSessions::default(),
            unread: Default::default(),
            notifier,
            remote: crate::remote::over_federation(federation.clone()),
            signing_key,
            federation,
        };
        Ok(Self { state, sender, listener, tls_listener, db })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, std::io::Error> {
        self.listener.local_addr()
    }

    /// The address the TLS listener bound, if there is one.
    pub fn tls_local_addr(&self) -> Option<Result<SocketAddr, std::io::Error>> {
        use axum::serve::Listener;
        self.tls_listener.as_ref().map(Listener::local_addr)
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
        let (stopping, stopped) = tokio::sync::watch::channel(false);
        // Background work: the outbound federation sender.
        let stop_background = Arc::new(tokio::sync::Notify::new());
        let mut background = tokio::task::JoinSet::new();
        let sender = self.sender.clone();
        let stop_sender = stop_background.clone();
        background.spawn(async move { sender.run(stop_sender).await });
        let trigger = async move {
            shutdown.await;
            // Long polls answer at once instead of holding the shutdown up.
            notifier.close();
            let _ = stopping.send(true);
        };
        let wait_for = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        };
        let app = api::router(self.state);
        let plain = axum::serve(
            self.listener,
            app.clone().into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(wait_for(stopped.clone()));
        let tls = async {
            let Some(tls_listener) = self.tls_listener else { return Ok(()) };
            let tls_address = axum::serve::Listener::local_addr(&tls_listener)
                .map_err(|source| ServerError::Listen { address, source })?;
            tracing::info!(address = %tls_address, "serving TLS");
            // `tap_io` gives the TLS listener the connect-info (peer address) of a TCP one.
            axum::serve(
                tls_listener.tap_io(|_| {}),
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(wait_for(stopped))
            .await
            .map_err(|source| ServerError::Listen { address: tls_address, source })
        };
        let servers = async {
            tokio::join!(
                async { plain.await.map_err(|source| ServerError::Listen { address, source }) },
                tls
            )
        };
        tokio::pin!(servers);
        // Normally the trigger fires and both listeners drain; should they stop on their own,
        // the wait for the trigger ends with them.
        let (plain_result, tls_result) = tokio::select! {
            results = &mut servers => results,
            () = trigger => servers.await,
        };
        let result = plain_result.and(tls_result);
        stop_background.notify_one();
        while background.join_next().await.is_some() {}
        if let Err(error) = self.db.flush() {
            tracing::error!(%error, "flushing the database on shutdown");
        }
        tracing::info!("stopped");
        result
    }
}
