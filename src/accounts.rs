//! Local accounts: users with argon2 password hashes, their devices and access tokens (stored
//! only as SHA-256 hashes), profiles, sync filters, and the OpenID tokens with which a user
//! proves its identity to a third party (also stored hashed, with their expiry).

use std::time::{SystemTime, UNIX_EPOCH};

use argon2::{
    Argon2, PasswordHash, PasswordHasher, PasswordVerifier,
    password_hash::{SaltString, rand_core::OsRng},
};
use rand::{Rng, distributions::Alphanumeric};
use ruma::{DeviceId, OwnedDeviceId, OwnedServerName, OwnedUserId, UserId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use storage::{Db, keys};

/// What can go wrong with accounts.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// The user id is taken.
    #[error("user id already taken")]
    UserInUse,
    /// The localpart is not allowed.
    #[error("invalid username: {0}")]
    InvalidUsername(String),
    /// The user does not exist.
    #[error("no such user")]
    UnknownUser,
    /// The device does not exist.
    #[error("no such device")]
    UnknownDevice,
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] storage::Error),
    /// Hashing failed.
    #[error("password hashing: {0}")]
    Hash(String),
}

/// A stored account.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Account {
    /// The argon2 PHC string; `None` for accounts without a password (deactivated).
    pub password_hash: Option<String>,
    /// Server admin.
    #[serde(default)]
    pub is_admin: bool,
    /// Deactivated accounts cannot log in and are never reused.
    #[serde(default)]
    pub deactivated: bool,
    /// Profile display name.
    #[serde(default)]
    pub displayname: Option<String>,
    /// Profile avatar (an `mxc://` URI).
    #[serde(default)]
    pub avatar_url: Option<String>,
    /// When the account was made (ms since the epoch).
    #[serde(default)]
    pub created_ts: u64,
}

/// A stored device.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Device {
    /// The device id.
    pub device_id: OwnedDeviceId,
    /// Its name, set by the user.
    pub display_name: Option<String>,
    /// Hash of its current access token.
    pub token_hash: String,
    /// Last time it was used (ms).
    pub last_seen_ts: Option<u64>,
}

/// Who an access token belongs to.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Session {
    /// The user.
    pub user_id: OwnedUserId,
    /// The device.
    pub device_id: OwnedDeviceId,
    /// Filled in on lookup.
    #[serde(default, skip_serializing)]
    pub is_admin: bool,
}

/// The accounts component.
#[derive(Clone)]
pub struct Accounts {
    db: Db,
    server_name: OwnedServerName,
    /// Serializes the final check-and-write of new accounts.
    create_lock: std::sync::Arc<std::sync::Mutex<()>>,
    /// Where passwords are hashed and checked.
    password_thread: PasswordThread,
}

/// A job for the password thread.
type PasswordJob = Box<dyn FnOnce() + Send>;

/// One dedicated thread for argon2. Each hash needs a 19 MiB block of memory; the C allocator
/// keeps such a block in the arena of whichever thread freed it, so hashing on the runtime's
/// blocking pool would leave up to one block per pool thread resident for good. On one thread
/// the block is allocated once and reused.
#[derive(Clone)]
struct PasswordThread {
    jobs: std::sync::mpsc::Sender<PasswordJob>,
}

impl PasswordThread {
    fn start() -> Self {
        let (jobs, queue) = std::sync::mpsc::channel::<PasswordJob>();
        // The thread ends when the last `Accounts` (and so the last sender) is dropped.
        let spawned = std::thread::Builder::new().name("passwords".to_owned()).spawn(move || {
            while let Ok(job) = queue.recv() {
                job();
            }
        });
        if let Err(error) = spawned {
            tracing::error!(%error, "could not start the password thread");
        }
        Self { jobs }
    }

    /// Runs `work` on the password thread and returns its result.
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, AccountError> {
        let (reply, result) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = reply.send(work());
            }))
            .map_err(|_| AccountError::Hash("the password thread has stopped".to_owned()))?;
        result.await.map_err(|_| AccountError::Hash("the password thread dropped a job".to_owned()))
    }
}

const ACCOUNTS: &str = "user_id_to_account";
const SESSIONS: &str = "token_hash_to_session";
const DEVICES: &str = "user_device_to_device";
const FILTERS: &str = "user_filter_to_filter";
const OPENID_TOKENS: &str = "openid_token_hash_to_openid_token";

/// How long an OpenID token is valid, in seconds.
pub const OPENID_TOKEN_LIFETIME_S: u64 = 3600;

/// A stored OpenID token: whose it is, and until when.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct OpenIdToken {
    user_id: OwnedUserId,
    expires_at_ms: u64,
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|duration| duration.as_millis() as u64)
        .unwrap_or(0)
}

/// A random alphanumeric string.
pub fn random_string(length: usize) -> String {
    rand::thread_rng().sample_iter(&Alphanumeric).take(length).map(char::from).collect()
}

fn token_hash(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    digest.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Whether a localpart is allowed for new accounts
/// ([user identifiers](https://spec.matrix.org/v1.16/appendices/#user-identifiers)).
pub fn valid_localpart(localpart: &str) -> bool {
    !localpart.is_empty()
        && localpart.bytes().all(|byte| {
            byte.is_ascii_lowercase() || byte.is_ascii_digit() || b"._=-/+".contains(&byte)
        })
}

impl Accounts {
    /// The accounts component over `db`.
    pub fn new(db: Db, server_name: OwnedServerName) -> Self {
        Self {
            db,
            server_name,
            create_lock: Default::default(),
            password_thread: PasswordThread::start(),
        }
    }

    /// This server's name.
    pub fn server_name(&self) -> &OwnedServerName {
        &self.server_name
    }

    /// A user id on this server from a localpart, checking it is allowed.
    pub fn user_id_for(&self, localpart: &str) -> Result<OwnedUserId, AccountError> {
        if !valid_localpart(localpart) {
            return Err(AccountError::InvalidUsername(
                "User ID can only contain characters a-z, 0-9, or '=_-./+'".into(),
            ));
        }
        let user_id = UserId::parse(format!("@{localpart}:{}", self.server_name))
            .map_err(|error| AccountError::InvalidUsername(error.to_string()))?;
        if user_id.as_str().len() > 255 {
            return Err(AccountError::InvalidUsername("User ID is too long".into()));
        }
        Ok(user_id)
    }

    /// Parses what a client gave as a user (full id or localpart) into a local user id.
    pub fn parse_user(&self, user: &str) -> Option<OwnedUserId> {
        if user.starts_with('@') {
            let user_id = UserId::parse(user.to_lowercase()).ok()?;
            (user_id.server_name() == self.server_name).then_some(user_id)
        } else {
            UserId::parse(format!("@{}:{}", user.to_lowercase(), self.server_name)).ok()
        }
    }

    /// The stored account.
    pub fn account(&self, user_id: &UserId) -> Result<Option<Account>, AccountError> {
        Ok(self.db.get(ACCOUNTS, user_id.as_bytes())?)
    }

    /// Whether the user exists here (deactivated accounts too: their ids are never reused).
    pub fn exists(&self, user_id: &UserId) -> Result<bool, AccountError> {
        Ok(self.db.contains(ACCOUNTS, user_id.as_bytes())?)
    }

    /// All local user ids.
    pub fn all_users(&self) -> Result<Vec<(OwnedUserId, Account)>, AccountError> {
        let mut users = Vec::new();
        for (key, value) in self.db.scan_prefix(ACCOUNTS, b"")? {
            let (Ok(user_id), Ok(account)) = (
                UserId::parse(String::from_utf8_lossy(&key).as_ref()),
                serde_json::from_slice::<Account>(&value),
            ) else {
                continue;
            };
            users.push((user_id, account));
        }
        Ok(users)
    }

    /// Creates an account. The password is hashed with argon2 off the async runtime.
    pub async fn create(
        &self,
        user_id: &UserId,
        password: Option<&str>,
        is_admin: bool,
    ) -> Result<(), AccountError> {
        if self.exists(user_id)? {
            return Err(AccountError::UserInUse);
        }
        let password_hash = match password {
            Some(password) => Some(self.hash_password(password).await?),
            None => None,
        };
        let account = Account {
            password_hash,
            is_admin,
            displayname: Some(user_id.localpart().to_owned()),
            created_ts: now_ms(),
            ..Account::default()
        };
        // The check above keeps the slow hash off taken names; this one, under the lock, makes
        // the claim atomic against concurrent registrations of the same name.
        let _guard = self.create_lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if self.exists(user_id)? {
            return Err(AccountError::UserInUse);
        }
        let mut batch = self.db.batch();
        batch.put(ACCOUNTS, user_id.as_bytes(), &account)?;
        self.db.write(batch)?;
        Ok(())
    }

    /// Writes a changed account record.
    pub fn put_account(&self, user_id: &UserId, account: &Account) -> Result<(), AccountError> {
        let mut batch = self.db.batch();
        batch.put(ACCOUNTS, user_id.as_bytes(), account)?;
        self.db.write(batch)?;
        Ok(())
    }

    /// Whether `password` is the user's password. Deactivated accounts never match.
    pub async fn check_password(
        &self,
        user_id: &UserId,
        password: &str,
    ) -> Result<bool, AccountError> {
        let Some(account) = self.account(user_id)? else { return Ok(false) };
        let Some(hash) = account.password_hash.filter(|_| !account.deactivated) else {
            return Ok(false);
        };
        let password = password.to_owned();
        self.password_thread
            .run(move || {
                PasswordHash::new(&hash)
                    .map(|parsed| {
                        Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok()
                    })
                    .unwrap_or(false)
            })
            .await
    }

    async fn hash_password(&self, password: &str) -> Result<String, AccountError> {
        let password = password.to_owned();
        self.password_thread
            .run(move || {
                let salt = SaltString::generate(&mut OsRng);
                Argon2::default()
                    .hash_password(password.as_bytes(), &salt)
                    .map(|hash| hash.to_string())
                    .map_err(|error| AccountError::Hash(error.to_string()))
            })
            .await?
    }

    /// Sets a new password.
    pub async fn set_password(&self, user_id: &UserId, password: &str) -> Result<(), AccountError> {
        let mut account = self.account(user_id)?.ok_or(AccountError::UnknownUser)?;
        account.password_hash = Some(self.hash_password(password).await?);
        self.put_account(user_id, &account)
    }

    /// Creates (or re-keys) a device and returns its id and a new access token.
    pub fn create_device(
        &self,
        user_id: &UserId,
        device_id: Option<OwnedDeviceId>,
        display_name: Option<String>,
    ) -> Result<(OwnedDeviceId, String), AccountError> {
        let device_id = device_id.unwrap_or_else(|| random_string(10).to_uppercase().into());
        let token = format!("hth_{}", random_string(40));
        let hash = token_hash(&token);
        let key = keys::join(&[user_id.as_bytes(), device_id.as_bytes()]);
        let mut batch = self.db.batch();
        let display_name = match self.db.get::<Device>(DEVICES, &key)? {
            Some(old) => {
                batch.delete(SESSIONS, old.token_hash.as_bytes())?;
                display_name.or(old.display_name)
            }
            None => display_name,
        };
        let device = Device {
            device_id: device_id.clone(),
            display_name,
            token_hash: hash.clone(),
            last_seen_ts: Some(now_ms()),
        };
        batch.put(DEVICES, &key, &device)?;
        batch.put(
            SESSIONS,
            hash.as_bytes(),
            &Session { user_id: user_id.to_owned(), device_id: device_id.clone(), is_admin: false },
        )?;
        self.db.write(batch)?;
        Ok((device_id, token))
    }

    /// Registers a device that no one logs in with (a dehydrated device): it has keys and
    /// receives to-device messages, but no access token reaches it.
    pub fn create_device_without_login(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
        display_name: Option<String>,
    ) -> Result<(), AccountError> {
        let key = keys::join(&[user_id.as_bytes(), device_id.as_bytes()]);
        let device = Device {
            device_id: device_id.to_owned(),
            display_name,
            token_hash: String::new(),
            last_seen_ts: None,
        };
        let mut batch = self.db.batch();
        batch.put(DEVICES, &key, &device)?;
        self.db.write(batch)?;
        Ok(())
    }

    /// Who a token belongs to, if anyone (deactivated users have no valid tokens).
    pub fn session_for_token(&self, token: &str) -> Result<Option<Session>, AccountError> {
        let Some(mut session) = self.db.get::<Session>(SESSIONS, token_hash(token).as_bytes())?
        else {
            return Ok(None);
        };
        let Some(account) = self.account(&session.user_id)? else { return Ok(None) };
        if account.deactivated {
            return Ok(None);
        }
        session.is_admin = account.is_admin;
        Ok(Some(session))
    }

    /// The user's devices.
    pub fn devices(&self, user_id: &UserId) -> Result<Vec<Device>, AccountError> {
        let prefix = keys::prefix(&[user_id.as_bytes()]);
        let mut devices = Vec::new();
        for (_, value) in self.db.scan_prefix(DEVICES, &prefix)? {
            if let Ok(device) = serde_json::from_slice(&value) {
                devices.push(device);
            }
        }
        Ok(devices)
    }

    /// One device.
    pub fn device(
        &self,
        user_id: &UserId,
        device_id: &str,
    ) -> Result<Option<Device>, AccountError> {
        Ok(self.db.get(DEVICES, &keys::join(&[user_id.as_bytes(), device_id.as_bytes()]))?)
    }

    /// Renames a device.
    pub fn rename_device(
        &self,
        user_id: &UserId,
        device_id: &str,
        display_name: Option<String>,
    ) -> Result<(), AccountError> {
        let key = keys::join(&[user_id.as_bytes(), device_id.as_bytes()]);
        let mut device: Device = self.db.get(DEVICES, &key)?.ok_or(AccountError::UnknownDevice)?;
        device.display_name = display_name;
        let mut batch = self.db.batch();
        batch.put(DEVICES, &key, &device)?;
        self.db.write(batch)?;
        Ok(())
    }

    /// Deletes a device and its access token.
    pub fn delete_device(&self, user_id: &UserId, device_id: &str) -> Result<(), AccountError> {
        let key = keys::join(&[user_id.as_bytes(), device_id.as_bytes()]);
        let Some(device) = self.db.get::<Device>(DEVICES, &key)? else {
            return Err(AccountError::UnknownDevice);
        };
        let mut batch = self.db.batch();
        batch.delete(SESSIONS, device.token_hash.as_bytes())?;
        batch.delete(DEVICES, &key)?;
        self.db.write(batch)?;
        Ok(())
    }

    /// Deletes all devices, except `keep` if given.
    pub fn delete_all_devices(
        &self,
        user_id: &UserId,
        keep: Option<&str>,
    ) -> Result<(), AccountError> {
        for device in self.devices(user_id)? {
            if Some(device.device_id.as_str()) != keep {
                self.delete_device(user_id, device.device_id.as_str())?;
            }
        }
        Ok(())
    }

    /// Deactivates an account: no password, no devices, never reusable.
    pub fn deactivate(&self, user_id: &UserId) -> Result<(), AccountError> {
        let mut account = self.account(user_id)?.ok_or(AccountError::UnknownUser)?;
        self.delete_all_devices(user_id, None)?;
        account.deactivated = true;
        account.password_hash = None;
        account.displayname = None;
        account.avatar_url = None;
        self.put_account(user_id, &account)
    }

    /// Stores a sync filter and returns its id.
    pub fn create_filter(
        &self,
        user_id: &UserId,
        filter: &serde_json::Value,
    ) -> Result<String, AccountError> {
        let filter_id = random_string(12);
        let mut batch = self.db.batch();
        batch.put(FILTERS, &keys::join(&[user_id.as_bytes(), filter_id.as_bytes()]), filter)?;
        self.db.write(batch)?;
        Ok(filter_id)
    }

    /// A stored sync filter.
    pub fn filter(
        &self,
        user_id: &UserId,
        filter_id: &str,
    ) -> Result<Option<serde_json::Value>, AccountError> {
        Ok(self.db.get(FILTERS, &keys::join(&[user_id.as_bytes(), filter_id.as_bytes()]))?)
    }

    /// A new OpenID token for `user_id`, valid for [`OPENID_TOKEN_LIFETIME_S`]. Expired tokens
    /// are swept out at the same time, so the table holds about an hour's worth.
    ///
    /// [OpenID](https://spec.matrix.org/v1.16/client-server-api/#openid)
    pub fn create_openid_token(&self, user_id: &UserId) -> Result<String, AccountError> {
        let token = random_string(40);
        let now = now_ms();
        let mut batch = self.db.batch();
        for (key, value) in self.db.scan_prefix(OPENID_TOKENS, b"")? {
            let expired = serde_json::from_slice::<OpenIdToken>(&value)
                .map_or(true, |stored| stored.expires_at_ms <= now);
            if expired {
                batch.delete(OPENID_TOKENS, &key)?;
            }
        }
        let stored = OpenIdToken {
            user_id: user_id.to_owned(),
            expires_at_ms: now + OPENID_TOKEN_LIFETIME_S * 1000,
        };
        batch.put(OPENID_TOKENS, token_hash(&token).as_bytes(), &stored)?;
        self.db.write(batch)?;
        Ok(token)
    }

    /// The user an OpenID token was issued to, if it is known and has not expired.
    pub fn openid_token_user(&self, token: &str) -> Result<Option<OwnedUserId>, AccountError> {
        let key = token_hash(token);
        let Some(stored) = self.db.get::<OpenIdToken>(OPENID_TOKENS, key.as_bytes())? else {
            return Ok(None);
        };
        if stored.expires_at_ms <= now_ms() {
            let mut batch = self.db.batch();
            batch.delete(OPENID_TOKENS, key.as_bytes())?;
            self.db.write(batch)?;
            return Ok(None);
        }
        Ok(Some(stored.user_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accounts() -> (tempfile::TempDir, Accounts) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        (dir, Accounts::new(db, "example.org".try_into().unwrap()))
    }

    #[tokio::test]
    async fn passwords_are_hashed_and_checked() {
        let (_dir, accounts) = accounts();
        let user_id = accounts.user_id_for("alice").unwrap();
        accounts.create(&user_id, Some("secret"), false).await.unwrap();
        let stored = accounts.account(&user_id).unwrap().unwrap();
        assert!(stored.password_hash.unwrap().starts_with("$argon2"));
        assert!(accounts.check_password(&user_id, "secret").await.unwrap());
        assert!(!accounts.check_password(&user_id, "wrong").await.unwrap());
        assert!(matches!(
            accounts.create(&user_id, None, false).await,
            Err(AccountError::UserInUse)
        ));
    }

    #[tokio::test]
    async fn tokens_are_stored_hashed_and_die_with_their_device() {
        let (_dir, accounts) = accounts();
        let user_id = accounts.user_id_for("bob").unwrap();
        accounts.create(&user_id, Some("pw"), false).await.unwrap();
        let (device_id, token) = accounts.create_device(&user_id, None, None).unwrap();
        assert!(accounts.db.get_raw(SESSIONS, token.as_bytes()).unwrap().is_none());
        assert_eq!(accounts.session_for_token(&token).unwrap().unwrap().device_id, device_id);
        accounts.delete_device(&user_id, device_id.as_str()).unwrap();
        assert!(accounts.session_for_token(&token).unwrap().is_none());
    }

    #[tokio::test]
    async fn openid_tokens_are_stored_hashed_and_expire() {
        let (_dir, accounts) = accounts();
        let user_id = accounts.user_id_for("carol").unwrap();
        let token = accounts.create_openid_token(&user_id).unwrap();
        assert!(accounts.db.get_raw(OPENID_TOKENS, token.as_bytes()).unwrap().is_none());
        assert_eq!(accounts.openid_token_user(&token).unwrap(), Some(user_id.clone()));
        assert_eq!(accounts.openid_token_user("unknown").unwrap(), None);
        // An expired token is refused, and forgotten.
        let expired = OpenIdToken { user_id: user_id.clone(), expires_at_ms: now_ms() - 1 };
        let mut batch = accounts.db.batch();
        batch.put(OPENID_TOKENS, token_hash("old").as_bytes(), &expired).unwrap();
        accounts.db.write(batch).unwrap();
        assert_eq!(accounts.openid_token_user("old").unwrap(), None);
        assert!(
            accounts.db.get_raw(OPENID_TOKENS, token_hash("old").as_bytes()).unwrap().is_none()
        );
    }

    #[test]
    fn localparts_follow_the_grammar() {
        let (_dir, accounts) = accounts();
        for good in ["alice", "a.b_c=d-e/f+g", "0"] {
            assert!(accounts.user_id_for(good).is_ok(), "{good}");
        }
        for bad in ["", "a b", "a:b", "ünï", "@a"] {
            assert!(accounts.user_id_for(bad).is_err(), "{bad}");
        }
    }
}
