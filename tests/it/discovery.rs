//! Discovery: `/_matrix/client/versions`, the `.well-known` files and `capabilities`.
//!
//! [Server discovery](https://spec.matrix.org/v1.16/client-server-api/#server-discovery),
//! [capabilities](https://spec.matrix.org/v1.16/client-server-api/#capabilities-negotiation)

use crate::harness::{TestServer, assert_error, assert_ok};

#[tokio::test]
async fn versions_without_auth() {
    let server = TestServer::start().await;
    let answer = assert_ok(server.client().get("/_matrix/client/versions").await);
    let versions: Vec<&str> = answer["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(versions.contains(&"v1.16"), "{answer}");
    assert!(answer["unstable_features"].is_object() || answer.get("unstable_features").is_none());
}

#[tokio::test]
async fn well_known_files() {
    let server = TestServer::start_with(&[
        ("HEARTH_PUBLIC_BASE_URL", "https://matrix.example.org"),
        ("HEARTH_WELL_KNOWN_SERVER", "matrix.example.org:443"),
    ])
    .await;
    let client = assert_ok(server.client().get("/.well-known/matrix/client").await);
    assert_eq!(client["m.homeserver"]["base_url"], "https://matrix.example.org");
    let federation = assert_ok(server.client().get("/.well-known/matrix/server").await);
    assert_eq!(federation["m.server"], "matrix.example.org:443");
    // Defaults: the client file names an http(s) base URL, the server file the server name
    // with the federation port.
    let server = TestServer::start().await;
    let client = assert_ok(server.client().get("/.well-known/matrix/client").await);
    let base_url = client["m.homeserver"]["base_url"].as_str().expect("base_url");
    assert!(base_url.starts_with("http://") || base_url.starts_with("https://"), "{client}");
    let federation = assert_ok(server.client().get("/.well-known/matrix/server").await);
    assert_eq!(federation["m.server"], format!("{}:8448", server.server_name));
}

#[tokio::test]
async fn capabilities() {
    let server = TestServer::start_with(&[("HEARTH_DEFAULT_ROOM_VERSION", "10")]).await;
    assert_error(
        &server.client().get("/_matrix/client/v3/capabilities").await,
        401,
        "M_MISSING_TOKEN",
    );
    let alice = server.register("alice").await;
    let answer = assert_ok(alice.client.get("/_matrix/client/v3/capabilities").await);
    let capabilities = &answer["capabilities"];
    assert_eq!(capabilities["m.change_password"]["enabled"], true);
    assert_eq!(capabilities["m.room_versions"]["default"], "10", "{answer}");
    let available = capabilities["m.room_versions"]["available"].as_object().expect("available");
    for version in ["1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11"] {
        assert_eq!(
            available.get(version).and_then(|v| v.as_str()),
            Some("stable"),
            "{version}: {answer}"
        );
    }
    // The configured default is what createRoom uses.
    let room_id = alice.create_room(serde_json::json!({})).await;
    let create = assert_ok(
        alice.client.get(&crate::harness::state_path(&room_id, "m.room.create", "")).await,
    );
    assert_eq!(create["room_version"], "10");
}
