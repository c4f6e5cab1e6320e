//! Server discovery and capabilities: `versions`, `.well-known`, `capabilities`.
//!
//! [Server discovery](https://spec.matrix.org/v1.16/client-server-api/#server-discovery)

use std::sync::Arc;

use axum::{Json, Router, extract::State, routing::get};
use serde_json::{Value, json};

use crate::{
    api::{AppState, error::ApiResult, extract::Auth},
    config::Config,
    rooms::create::creatable_versions,
};

/// Routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/_matrix/client/versions", get(versions))
        .route("/.well-known/matrix/client", get(well_known_client))
        .route("/.well-known/matrix/server", get(well_known_server))
        .route("/_matrix/client/v3/capabilities", get(capabilities))
}

/// `GET /_matrix/client/versions`
async fn versions() -> Json<Value> {
    Json(json!({
        "versions": [
            "r0.6.1", "v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6", "v1.7", "v1.8", "v1.9",
            "v1.10", "v1.11", "v1.12", "v1.13", "v1.14", "v1.15", "v1.16"
        ],
        "unstable_features": {"org.matrix.msc3814": true}
    }))
}

/// `GET /.well-known/matrix/client`
async fn well_known_client(State(config): State<Arc<Config>>) -> Json<Value> {
    let base_url =
        config.public_base_url.clone().unwrap_or_else(|| format!("http://{}", config.listen));
    Json(json!({"m.homeserver": {"base_url": base_url}}))
}

/// `GET /.well-known/matrix/server`
async fn well_known_server(State(config): State<Arc<Config>>) -> Json<Value> {
    let server = config.well_known_server.clone().unwrap_or_else(|| {
        if config.server_name.port().is_some() {
            config.server_name.to_string()
        } else {
            format!("{}:8448", config.server_name)
        }
    });
    Json(json!({"m.server": server}))
}

/// `GET /_matrix/client/v3/capabilities`
async fn capabilities(State(config): State<Arc<Config>>, _auth: Auth) -> ApiResult {
    let available: serde_json::Map<String, Value> = creatable_versions()
        .into_iter()
        .map(|version| (version.to_string(), json!("stable")))
        .collect();
    Ok(Json(json!({
        "capabilities": {
            "m.change_password": {"enabled": true},
            "m.room_versions": {"default": config.default_room_version, "available": available},
            "m.set_displayname": {"enabled": true},
            "m.set_avatar_url": {"enabled": true},
            "m.3pid_changes": {"enabled": false},
            "m.get_login_token": {"enabled": false},
        }
    })))
}
