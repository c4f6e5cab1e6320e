//! The one place where errors become Matrix errors: an `errcode`, an `error` text and an HTTP
//! status, as the spec names them.
//!
//! [Standard error response](https://spec.matrix.org/v1.16/client-server-api/#standard-error-response)

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde_json::{Map, Value, json};

/// An error answered to a client or peer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: Map<String, Value>,
}

impl ApiError {
    /// An error with the given status, errcode and text.
    pub fn new(status: StatusCode, errcode: &str, error: impl Into<String>) -> Self {
        let mut body = Map::new();
        body.insert("errcode".into(), errcode.into());
        body.insert("error".into(), Value::String(error.into()));
        Self { status, body }
    }

    /// Adds a field to the error body.
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.body.insert(key.into(), value.into());
        self
    }

    /// The errcode, for tests and logs.
    pub fn errcode(&self) -> &str {
        self.body.get("errcode").and_then(Value::as_str).unwrap_or("")
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// 403 `M_FORBIDDEN`.
    pub fn forbidden(error: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "M_FORBIDDEN", error)
    }
    /// 404 `M_NOT_FOUND`.
    pub fn not_found(error: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "M_NOT_FOUND", error)
    }
    /// 400 `M_BAD_JSON`.
    pub fn bad_json(error: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_BAD_JSON", error)
    }
    /// 400 `M_NOT_JSON`.
    pub fn not_json(error: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_NOT_JSON", error)
    }
    /// 400 `M_INVALID_PARAM`.
    pub fn invalid_param(error: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_INVALID_PARAM", error)
    }
    /// 400 `M_MISSING_PARAM`.
    pub fn missing_param(error: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_MISSING_PARAM", error)
    }
    /// 401 `M_UNAUTHORIZED`: a federation request without a valid signature.
    pub fn unauthorized(error: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED", error)
    }
    /// 401 `M_MISSING_TOKEN`.
    pub fn missing_token() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN", "Missing access token")
    }
    /// 401 `M_UNKNOWN_TOKEN` (not a soft logout).
    pub fn unknown_token() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN", "Unknown access token")
            .with("soft_logout", false)
    }
    /// 404 `M_UNRECOGNIZED` for unknown endpoints.
    pub fn unrecognized() -> Self {
        Self::new(StatusCode::NOT_FOUND, "M_UNRECOGNIZED", "Unrecognized request")
    }
    /// 405 `M_UNRECOGNIZED` for a known path with the wrong method.
    pub fn method_not_allowed() -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, "M_UNRECOGNIZED", "Method not allowed")
    }
    /// 413 `M_TOO_LARGE`.
    pub fn too_large() -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE", "Request body too large")
    }
    /// 400 `M_USER_IN_USE`.
    pub fn user_in_use() -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_USER_IN_USE", "User ID already taken")
    }
    /// 400 `M_INVALID_USERNAME`.
    pub fn invalid_username(error: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_INVALID_USERNAME", error)
    }
    /// 400 `M_UNSUPPORTED_ROOM_VERSION`.
    pub fn unsupported_room_version(error: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_UNSUPPORTED_ROOM_VERSION", error)
    }
    /// 400 `M_ROOM_IN_USE`.
    pub fn room_in_use(error: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_ROOM_IN_USE", error)
    }
    /// 409 `M_UNKNOWN` for a conflicting resource (alias already taken).
    pub fn conflict(error: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "M_UNKNOWN", error)
    }
    /// 400 `M_UNKNOWN` for a request that is well-formed but cannot be done.
    pub fn bad_request(error: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_UNKNOWN", error)
    }
    /// 403 `M_USER_DEACTIVATED`.
    pub fn user_deactivated() -> Self {
        Self::new(StatusCode::FORBIDDEN, "M_USER_DEACTIVATED", "This account has been deactivated")
    }
    /// 401 user-interactive authentication challenge: the body is the flow state, plus an
    /// error when a stage failed.
    pub fn user_interactive(state: Value, failure: Option<(&str, &str)>) -> Self {
        let mut body = match state {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        if let Some((errcode, error)) = failure {
            body.insert("errcode".into(), errcode.into());
            body.insert("error".into(), error.into());
        }
        Self { status: StatusCode::UNAUTHORIZED, body }
    }
    /// 500 `M_UNKNOWN`: the cause is logged with its chain, the client learns nothing more.
    pub fn internal(source: impl std::error::Error) -> Self {
        let mut chain = source.to_string();
        let mut next = source.source();
        while let Some(cause) = next {
            chain.push_str(": ");
            chain.push_str(&cause.to_string());
            next = cause.source();
        }
        tracing::error!(error = %chain, "internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "M_UNKNOWN", "Internal server error")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(Value::Object(self.body))).into_response()
    }
}

impl From<storage::Error> for ApiError {
    fn from(error: storage::Error) -> Self {
        Self::internal(error)
    }
}

impl From<federation::Error> for ApiError {
    fn from(error: federation::Error) -> Self {
        Self::internal(error)
    }
}

/// A failed X-Matrix check of an inbound federation request.
#[derive(Debug)]
pub struct XMatrixError(pub federation::Error);

impl From<XMatrixError> for ApiError {
    fn from(XMatrixError(error): XMatrixError) -> Self {
        use federation::Error;
        match error {
            Error::WrongDestination { destination } => {
                Self::forbidden(format!("Request is for {destination}, not this server"))
            }
            Error::KeyStore(_) => Self::internal(error),
            Error::MalformedAuthorization(reason) => {
                Self::unauthorized(format!("Bad X-Matrix authorization: {reason}"))
            }
            Error::InvalidSignature { .. } => Self::unauthorized("Invalid request signature"),
            error => {
                // The origin's keys could not be had (unreachable, unknown key, bad answer):
                // the request cannot be authenticated.
                tracing::info!(%error, "federation request not authenticated");
                Self::unauthorized("Cannot verify the request signature")
            }
        }
    }
}

impl From<crate::accounts::AccountError> for ApiError {
    fn from(error: crate::accounts::AccountError) -> Self {
        use crate::accounts::AccountError;
        match error {
            AccountError::UserInUse => Self::user_in_use(),
            AccountError::InvalidUsername(reason) => Self::invalid_username(reason),
            AccountError::UnknownUser => Self::not_found("Unknown user"),
            AccountError::UnknownDevice => Self::not_found("Unknown device"),
            AccountError::Storage(source) => Self::internal(source),
            AccountError::Hash(reason) => Self::internal(std::io::Error::other(reason)),
        }
    }
}

impl From<crate::edus::EduError> for ApiError {
    fn from(error: crate::edus::EduError) -> Self {
        match error {
            crate::edus::EduError::Storage(source) => Self::internal(source),
            crate::edus::EduError::Room(source) => source.into(),
        }
    }
}

impl From<crate::rooms::RoomError> for ApiError {
    fn from(error: crate::rooms::RoomError) -> Self {
        use crate::rooms::RoomError;
        match error {
            RoomError::NotFound => Self::not_found("Room not found"),
            RoomError::EventNotFound => Self::not_found("Event not found"),
            RoomError::Forbidden(reason) => Self::forbidden(reason),
            RoomError::BadEvent(reason) => Self::bad_json(reason),
            RoomError::UnsupportedRoomVersion(version) => {
                Self::unsupported_room_version(format!("Room version {version} is not supported"))
            }
            RoomError::AliasInUse => Self::room_in_use("Room alias already taken"),
            RoomError::TooLarge => {
                Self::new(StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE", "Event is too large")
            }
            RoomError::InvalidAlias(reason) => Self::invalid_param(reason),
            RoomError::InvalidParam(reason) => Self::invalid_param(reason),
            RoomError::Signing(source) => Self::internal(source),
            RoomError::Storage(source) => Self::internal(source),
            RoomError::Pdu(source) => Self::internal(source),
            RoomError::Remote(reason) => {
                Self::not_found(format!("No server could help with this room: {reason}"))
            }
        }
    }
}

impl From<crate::rooms::ingest::IngestError> for ApiError {
    fn from(error: crate::rooms::ingest::IngestError) -> Self {
        use crate::rooms::ingest::IngestError;
        match error {
            IngestError::UnknownRoom => Self::not_found("Room not found"),
            IngestError::Malformed(reason) => Self::bad_json(reason),
            IngestError::Room(source) => source.into(),
            refused => Self::forbidden(refused.to_string()),
        }
    }
}

impl From<crate::rooms::peers::PeerError> for ApiError {
    fn from(error: crate::rooms::peers::PeerError) -> Self {
        use crate::rooms::peers::PeerError;
        match error {
            PeerError::NotFound => Self::not_found("Not found"),
            PeerError::Forbidden(reason) => Self::forbidden(reason),
            PeerError::IncompatibleRoomVersion(version) => Self::new(
                StatusCode::BAD_REQUEST,
                "M_INCOMPATIBLE_ROOM_VERSION",
                format!("The room's version {version} is not one the server supports"),
            )
            .with("room_version", version.to_string()),
            PeerError::BadEvent(reason) => Self::bad_json(reason),
            PeerError::WrongMembership(reason) => Self::invalid_param(reason),
            PeerError::Ingest(source) => source.into(),
            PeerError::Room(source) => source.into(),
        }
    }
}

impl From<crate::remote_directory::RemoteDirectoryError> for ApiError {
    fn from(error: crate::remote_directory::RemoteDirectoryError) -> Self {
        use crate::remote_directory::RemoteDirectoryError;
        match error {
            RemoteDirectoryError::AliasNotFound => Self::not_found("Room alias not found"),
            RemoteDirectoryError::AliasUnreachable(source) => {
                tracing::info!(error = %source, "remote alias query failed");
                Self::not_found("Room alias not found: its server could not be asked")
            }
            RemoteDirectoryError::Refused { status, errcode, error } => Self::new(
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                &errcode,
                error,
            ),
            RemoteDirectoryError::Unreachable(source) => {
                tracing::info!(error = %source, "remote room list request failed");
                Self::new(StatusCode::BAD_GATEWAY, "M_UNKNOWN", "Failed to fetch the room list")
            }
        }
    }
}

impl From<crate::e2ee::E2eeError> for ApiError {
    fn from(error: crate::e2ee::E2eeError) -> Self {
        use crate::e2ee::E2eeError;
        match error {
            E2eeError::InvalidKeys(reason) => Self::invalid_param(reason),
            E2eeError::InvalidSignature(reason) => {
                Self::new(StatusCode::BAD_REQUEST, "M_INVALID_SIGNATURE", reason)
            }
            E2eeError::Storage(source) => Self::internal(source),
        }
    }
}

impl From<crate::key_backup::KeyBackupError> for ApiError {
    fn from(error: crate::key_backup::KeyBackupError) -> Self {
        use crate::key_backup::KeyBackupError;
        match error {
            KeyBackupError::NoBackup => Self::not_found("No current backup version"),
            KeyBackupError::UnknownVersion => Self::not_found("Unknown backup version"),
            KeyBackupError::WrongVersion { current_version } => Self::new(
                StatusCode::FORBIDDEN,
                "M_WRONG_ROOM_KEYS_VERSION",
                "Wrong backup version",
            )
            .with("current_version", current_version),
            KeyBackupError::VersionMismatch => {
                Self::invalid_param("The version in the body does not match the path")
            }
            KeyBackupError::AlgorithmMismatch => {
                Self::invalid_param("The algorithm does not match the backup's")
            }
            KeyBackupError::KeyNotFound => Self::not_found("No key for that session"),
            KeyBackupError::Storage(source) => Self::internal(source),
        }
    }
}

/// One entry of the `failures` of `keys/signatures/upload`: `errcode` and `error`.
pub fn signature_failure(failure: crate::e2ee::SignatureFailure) -> Value {
    use crate::e2ee::SignatureFailure;
    let (errcode, error) = match failure {
        SignatureFailure::MissingSignature => {
            ("M_INVALID_SIGNATURE", "The object has no signature by the uploader")
        }
        SignatureFailure::InvalidSignature => {
            ("M_INVALID_SIGNATURE", "The signature does not verify with a key of the uploader")
        }
        SignatureFailure::UnknownKey => ("M_NOT_FOUND", "Unknown device or key"),
    };
    json!({"errcode": errcode, "error": error})
}

/// An empty JSON object, the answer of many endpoints.
pub fn empty_object() -> Json<Value> {
    Json(json!({}))
}

/// Result type of handlers.
pub type ApiResult<T = Json<Value>> = Result<T, ApiError>;
