//! Accounts: registration with user-interactive auth in each registration mode,
//! `register/available`, login and logout, `whoami`, password change, deactivation and device
//! management.
//!
//! [Account registration and management](https://spec.matrix.org/v1.16/client-server-api/#account-registration-and-management),
//! [login](https://spec.matrix.org/v1.16/client-server-api/#login),
//! [device management](https://spec.matrix.org/v1.16/client-server-api/#device-management)

use serde_json::{Value, json};

use crate::harness::{Client, TestServer, assert_error, assert_ok, enc};

fn password_login(user: &str, password: &str) -> Value {
    json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user}, "password": password})
}

async fn login(server: &TestServer, user: &str, password: &str) -> (u16, Value) {
    server.client().post("/_matrix/client/v3/login", password_login(user, password)).await
}

/// Logs in and returns a client with the new token, and the device id.
async fn login_ok(server: &TestServer, user: &str, password: &str) -> (Client, String) {
    let answer = assert_ok(login(server, user, password).await);
    (
        server.client().with_token(answer["access_token"].as_str().expect("access_token")),
        answer["device_id"].as_str().expect("device_id").to_owned(),
    )
}

fn password_auth(user_id: &str, password: &str, session: Option<&str>) -> Value {
    let mut auth = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user_id}, "password": password});
    if let Some(session) = session {
        auth["session"] = json!(session);
    }
    auth
}

#[tokio::test]
async fn register_uia_flow_with_dummy() {
    let server = TestServer::start().await;
    let client = server.client();
    let body = json!({"username": "alice", "password": "pw-alice-1", "initial_device_display_name": "laptop"});
    let (status, challenge) = client.post("/_matrix/client/v3/register", body.clone()).await;
    assert_eq!(status, 401, "{challenge}");
    let session = challenge["session"].as_str().expect("session").to_owned();
    let flows = challenge["flows"].as_array().expect("flows");
    assert!(flows.iter().any(|flow| flow["stages"] == json!(["m.login.dummy"])), "{challenge}");
    assert!(challenge["params"].is_object());
    // Nothing was created by the challenge.
    let available =
        assert_ok(client.get("/_matrix/client/v3/register/available?username=alice").await);
    assert_eq!(available["available"], true);
    let mut body = body;
    body["auth"] = json!({"type": "m.login.dummy", "session": session});
    let answer = assert_ok(client.post("/_matrix/client/v3/register", body).await);
    assert_eq!(answer["user_id"], format!("@alice:{}", server.server_name));
    let token = answer["access_token"].as_str().expect("access_token");
    let device_id = answer["device_id"].as_str().expect("device_id");
    let whoami = assert_ok(client.with_token(token).get("/_matrix/client/v3/account/whoami").await);
    assert_eq!(whoami["user_id"], "@alice:localhost");
    assert_eq!(whoami["device_id"], device_id);
    let device = assert_ok(
        client
            .with_token(token)
            .get(&format!("/_matrix/client/v3/devices/{}", enc(device_id)))
            .await,
    );
    assert_eq!(device["display_name"], "laptop");
    // An unknown session is refused.
    let answer = client
        .post("/_matrix/client/v3/register", json!({"username": "bob", "password": "x", "auth": {"type": "m.login.dummy", "session": "nope"}}))
        .await;
    assert!(answer.0 == 400 || answer.0 == 401, "{answer:?}");
    // A stage that is not offered is refused.
    let answer = client
        .post("/_matrix/client/v3/register", json!({"username": "bob", "password": "x", "auth": {"type": "m.login.registration_token", "token": "t"}}))
        .await;
    assert_eq!(answer.0, 401, "{answer:?}");
    // inhibit_login: an account without a token.
    let answer = assert_ok(
        client
            .post("/_matrix/client/v3/register", json!({"username": "carol", "password": "pw-carol", "inhibit_login": true, "auth": {"type": "m.login.dummy"}}))
            .await,
    );
    assert_eq!(answer["user_id"], "@carol:localhost");
    assert!(answer.get("access_token").is_none());
    assert_ok(login(&server, "carol", "pw-carol").await);
    // Guests are not allowed.
    let answer = client.post("/_matrix/client/v3/register?kind=guest", json!({})).await;
    assert_eq!(answer.0, 403, "{answer:?}");
}

#[tokio::test]
async fn register_closed() {
    let server = TestServer::start_with(&[("HEARTH_REGISTRATION", "closed")]).await;
    let answer = server
        .client()
        .post(
            "/_matrix/client/v3/register",
            json!({"username": "alice", "password": "pw", "auth": {"type": "m.login.dummy"}}),
        )
        .await;
    assert_error(&answer, 403, "M_FORBIDDEN");
    let answer = server
        .client()
        .post("/_matrix/client/v3/register", json!({"username": "alice", "password": "pw"}))
        .await;
    assert_error(&answer, 403, "M_FORBIDDEN");
}

#[tokio::test]
async fn register_with_token() {
    let server = TestServer::start_with(&[
        ("HEARTH_REGISTRATION", "token"),
        ("HEARTH_REGISTRATION_TOKEN", "letmein"),
    ])
    .await;
    let client = server.client();
    let body = json!({"username": "alice", "password": "pw-alice"});
    let (status, challenge) = client.post("/_matrix/client/v3/register", body.clone()).await;
    assert_eq!(status, 401, "{challenge}");
    assert!(
        challenge["flows"]
            .as_array()
            .unwrap()
            .iter()
            .any(|flow| flow["stages"] == json!(["m.login.registration_token"])),
        "{challenge}"
    );
    assert!(
        !challenge["flows"]
            .as_array()
            .unwrap()
            .iter()
            .any(|flow| flow["stages"] == json!(["m.login.dummy"])),
        "dummy not offered"
    );
    let session = challenge["session"].as_str().unwrap().to_owned();
    // Dummy is not enough.
    let mut dummy = body.clone();
    dummy["auth"] = json!({"type": "m.login.dummy", "session": session});
    let (status, answer) = client.post("/_matrix/client/v3/register", dummy).await;
    assert_eq!(status, 401, "{answer}");
    // The wrong token: 401 with an error and the same flows.
    let mut wrong = body.clone();
    wrong["auth"] =
        json!({"type": "m.login.registration_token", "token": "guess", "session": session});
    let (status, answer) = client.post("/_matrix/client/v3/register", wrong).await;
    assert_eq!(status, 401, "{answer}");
    assert_eq!(answer["errcode"], "M_FORBIDDEN");
    assert!(answer["flows"].is_array());
    // Token validity endpoint.
    let valid = assert_ok(
        client
            .get("/_matrix/client/v1/register/m.login.registration_token/validity?token=letmein")
            .await,
    );
    assert_eq!(valid["valid"], true);
    let invalid = assert_ok(
        client
            .get("/_matrix/client/v1/register/m.login.registration_token/validity?token=guess")
            .await,
    );
    assert_eq!(invalid["valid"], false);
    // The right token.
    let mut right = body;
    right["auth"] =
        json!({"type": "m.login.registration_token", "token": "letmein", "session": session});
    let answer = assert_ok(client.post("/_matrix/client/v3/register", right).await);
    assert_eq!(answer["user_id"], "@alice:localhost");
    assert!(answer["access_token"].is_string());
}

#[tokio::test]
async fn register_available() {
    let server = TestServer::start().await;
    server.register("alice").await;
    let client = server.client();
    assert_eq!(
        assert_ok(client.get("/_matrix/client/v3/register/available?username=newbie").await)["available"],
        true
    );
    assert_error(
        &client.get("/_matrix/client/v3/register/available?username=alice").await,
        400,
        "M_USER_IN_USE",
    );
    for bad in ["has space", "ümlaut", "a:b", "@alice", &"x".repeat(300)] {
        let answer = client
            .get(&format!("/_matrix/client/v3/register/available?username={}", enc(bad)))
            .await;
        assert_error(&answer, 400, "M_INVALID_USERNAME");
    }
    let answer = client
        .post(
            "/_matrix/client/v3/register",
            json!({"username": "has space", "password": "pw", "auth": {"type": "m.login.dummy"}}),
        )
        .await;
    assert_error(&answer, 400, "M_INVALID_USERNAME");
}

#[tokio::test]
async fn login_flows_and_password_login() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let flows = assert_ok(server.client().get("/_matrix/client/v3/login").await);
    assert!(
        flows["flows"].as_array().unwrap().iter().any(|flow| flow["type"] == "m.login.password"),
        "{flows}"
    );
    // Full user id and localpart.
    let by_id = assert_ok(login(&server, "@alice:localhost", "secret-password").await);
    assert_eq!(by_id["user_id"], alice.user_id);
    let by_localpart = assert_ok(login(&server, "alice", "secret-password").await);
    assert_eq!(by_localpart["user_id"], alice.user_id);
    assert_ne!(by_id["device_id"], by_localpart["device_id"]);
    assert_ne!(by_id["access_token"], by_localpart["access_token"]);
    // The deprecated top-level `user`.
    let legacy = assert_ok(
        server
            .client()
            .post(
                "/_matrix/client/v3/login",
                json!({"type": "m.login.password", "user": "alice", "password": "secret-password"}),
            )
            .await,
    );
    assert_eq!(legacy["user_id"], alice.user_id);
    // A chosen device id.
    let chosen = assert_ok(
        server
            .client()
            .post("/_matrix/client/v3/login", {
                let mut body = password_login("alice", "secret-password");
                body["device_id"] = json!("MYDEVICE");
                body
            })
            .await,
    );
    assert_eq!(chosen["device_id"], "MYDEVICE");
    // Wrong password, unknown user: both 403 M_FORBIDDEN.
    assert_error(&login(&server, "alice", "wrong").await, 403, "M_FORBIDDEN");
    assert_error(&login(&server, "nobody", "secret-password").await, 403, "M_FORBIDDEN");
    assert_error(
        &login(&server, "@alice:elsewhere.example", "secret-password").await,
        403,
        "M_FORBIDDEN",
    );
    // Unknown login types.
    let answer =
        server.client().post("/_matrix/client/v3/login", json!({"type": "m.login.magic"})).await;
    assert_eq!(answer.0, 400, "{answer:?}");
}

#[tokio::test]
async fn logout_and_logout_all() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let (second, second_device) = login_ok(&server, "alice", "secret-password").await;
    let (third, _) = login_ok(&server, "alice", "secret-password").await;
    // Logout kills that token only, and removes the device.
    assert_ok(second.post("/_matrix/client/v3/logout", json!({})).await);
    assert_error(&second.get("/_matrix/client/v3/account/whoami").await, 401, "M_UNKNOWN_TOKEN");
    assert_ok(third.get("/_matrix/client/v3/account/whoami").await);
    let devices = assert_ok(alice.client.get("/_matrix/client/v3/devices").await);
    assert!(
        !devices["devices"]
            .as_array()
            .unwrap()
            .iter()
            .any(|device| device["device_id"] == second_device),
        "{devices}"
    );
    // logout/all kills every token.
    assert_ok(third.post("/_matrix/client/v3/logout/all", json!({})).await);
    assert_error(&third.get("/_matrix/client/v3/account/whoami").await, 401, "M_UNKNOWN_TOKEN");
    assert_error(
        &alice.client.get("/_matrix/client/v3/account/whoami").await,
        401,
        "M_UNKNOWN_TOKEN",
    );
    // The account is still there.
    let (fourth, _) = login_ok(&server, "alice", "secret-password").await;
    let devices = assert_ok(fourth.get("/_matrix/client/v3/devices").await);
    assert_eq!(devices["devices"].as_array().unwrap().len(), 1, "{devices}");
}

#[tokio::test]
async fn whoami() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let whoami = assert_ok(alice.client.get("/_matrix/client/v3/account/whoami").await);
    assert_eq!(whoami["user_id"], alice.user_id);
    assert_eq!(whoami["device_id"], alice.device_id);
    assert_eq!(whoami["is_guest"], false);
}

#[tokio::test]
async fn change_password() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let (other, _) = login_ok(&server, "alice", "secret-password").await;
    let path = "/_matrix/client/v3/account/password";
    let (status, challenge) =
        alice.client.post(path, json!({"new_password": "new-password"})).await;
    assert_eq!(status, 401, "{challenge}");
    assert!(
        challenge["flows"]
            .as_array()
            .unwrap()
            .iter()
            .any(|flow| flow["stages"] == json!(["m.login.password"]))
    );
    let session = challenge["session"].as_str().unwrap().to_owned();
    // The wrong current password fails the stage.
    let answer = alice
        .client
        .post(path, json!({"new_password": "new-password", "auth": password_auth(&alice.user_id, "wrong", Some(&session))}))
        .await;
    assert_eq!(answer.0, 401, "{answer:?}");
    assert_eq!(answer.1["errcode"], "M_FORBIDDEN");
    // Someone else's password does not prove anything.
    server.register("mallory").await;
    let answer = alice
        .client
        .post(path, json!({"new_password": "new-password", "auth": password_auth("@mallory:localhost", "secret-password", Some(&session))}))
        .await;
    assert_eq!(answer.0, 401, "{answer:?}");
    assert_ok(
        alice
            .client
            .post(path, json!({"new_password": "new-password", "auth": password_auth(&alice.user_id, "secret-password", Some(&session))}))
            .await,
    );
    assert_error(&login(&server, "alice", "secret-password").await, 403, "M_FORBIDDEN");
    assert_ok(login(&server, "alice", "new-password").await);
    // The current device stays, other devices are logged out (logout_devices defaults to true).
    assert_ok(alice.client.get("/_matrix/client/v3/account/whoami").await);
    assert_error(&other.get("/_matrix/client/v3/account/whoami").await, 401, "M_UNKNOWN_TOKEN");
    // logout_devices: false keeps them.
    let (kept, _) = login_ok(&server, "alice", "new-password").await;
    assert_ok(
        alice
            .client
            .post(
                path,
                json!({"new_password": "third-password", "logout_devices": false, "auth": password_auth(&alice.user_id, "new-password", None)}),
            )
            .await,
    );
    assert_ok(kept.get("/_matrix/client/v3/account/whoami").await);
}

#[tokio::test]
async fn deactivate() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room_id = bob.create_room(json!({"preset": "public_chat"})).await;
    alice.join(&room_id).await;
    let path = "/_matrix/client/v3/account/deactivate";
    let (status, challenge) = alice.client.post(path, json!({})).await;
    assert_eq!(status, 401, "{challenge}");
    let answer = alice
        .client
        .post(path, json!({"auth": password_auth(&alice.user_id, "wrong", None)}))
        .await;
    assert_eq!(answer.0, 401);
    assert_ok(
        alice
            .client
            .post(path, json!({"auth": password_auth(&alice.user_id, "secret-password", None)}))
            .await,
    );
    // Token dead, login refused, name still taken, rooms left.
    assert_error(
        &alice.client.get("/_matrix/client/v3/account/whoami").await,
        401,
        "M_UNKNOWN_TOKEN",
    );
    let answer = login(&server, "alice", "secret-password").await;
    assert!(
        answer.0 == 403
            && matches!(answer.1["errcode"].as_str(), Some("M_USER_DEACTIVATED" | "M_FORBIDDEN")),
        "{answer:?}"
    );
    assert_error(
        &server.client().get("/_matrix/client/v3/register/available?username=alice").await,
        400,
        "M_USER_IN_USE",
    );
    let member = assert_ok(
        bob.client
            .get(&crate::harness::state_path(&room_id, "m.room.member", &alice.user_id))
            .await,
    );
    assert_eq!(member["membership"], "leave");
}

#[tokio::test]
async fn devices_list_get_rename_delete() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let (_second, second_device) = login_ok(&server, "alice", "secret-password").await;
    let (third, third_device) = login_ok(&server, "alice", "secret-password").await;
    let (fourth, fourth_device) = login_ok(&server, "alice", "secret-password").await;
    let list = assert_ok(alice.client.get("/_matrix/client/v3/devices").await);
    let ids: Vec<&str> = list["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|device| device["device_id"].as_str().unwrap())
        .collect();
    for device in [alice.device_id.as_str(), &second_device, &third_device, &fourth_device] {
        assert!(ids.contains(&device), "{device} missing: {list}");
    }
    let device_path = |device: &str| format!("/_matrix/client/v3/devices/{}", enc(device));
    // Get and rename.
    let device = assert_ok(alice.client.get(&device_path(&second_device)).await);
    assert_eq!(device["device_id"], second_device);
    assert_ok(
        alice.client.put(&device_path(&second_device), json!({"display_name": "phone"})).await,
    );
    assert_eq!(
        assert_ok(alice.client.get(&device_path(&second_device)).await)["display_name"],
        "phone"
    );
    assert_error(&alice.client.get(&device_path("NOSUCHDEVICE")).await, 404, "M_NOT_FOUND");
    // Another user's devices are not visible.
    let bob = server.register("bob").await;
    assert_error(&bob.client.get(&device_path(&second_device)).await, 404, "M_NOT_FOUND");
    // Delete needs UIA with the password.
    let (status, challenge) = alice.client.delete(&device_path(&third_device), json!({})).await;
    assert_eq!(status, 401, "{challenge}");
    let session = challenge["session"].as_str().unwrap().to_owned();
    let answer = alice
        .client
        .delete(
            &device_path(&third_device),
            json!({"auth": password_auth(&alice.user_id, "wrong", Some(&session))}),
        )
        .await;
    assert_eq!(answer.0, 401);
    assert_ok(third.get("/_matrix/client/v3/account/whoami").await);
    assert_ok(
        alice
            .client
            .delete(
                &device_path(&third_device),
                json!({"auth": password_auth(&alice.user_id, "secret-password", Some(&session))}),
            )
            .await,
    );
    assert_error(&third.get("/_matrix/client/v3/account/whoami").await, 401, "M_UNKNOWN_TOKEN");
    assert_error(&alice.client.get(&device_path(&third_device)).await, 404, "M_NOT_FOUND");
    assert_error(
        &alice.client.delete(&device_path(&third_device), json!({})).await,
        404,
        "M_NOT_FOUND",
    );
    // delete_devices: several at once (unknown ids are ignored).
    let path = "/_matrix/client/v3/delete_devices";
    let body = json!({"devices": [second_device, fourth_device, "UNKNOWN"]});
    let (status, _) = alice.client.post(path, body.clone()).await;
    assert_eq!(status, 401);
    let mut body = body;
    body["auth"] = password_auth(&alice.user_id, "secret-password", None);
    assert_ok(alice.client.post(path, body).await);
    assert_error(&fourth.get("/_matrix/client/v3/account/whoami").await, 401, "M_UNKNOWN_TOKEN");
    let list = assert_ok(alice.client.get("/_matrix/client/v3/devices").await);
    let ids: Vec<&str> = list["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|device| device["device_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![alice.device_id.as_str()]);
}

/// A registration token that looks like a number is still a string token.
#[tokio::test]
async fn register_with_numeric_token() {
    let server = TestServer::start_with(&[
        ("HEARTH_REGISTRATION", "token"),
        ("HEARTH_REGISTRATION_TOKEN", "12345"),
    ])
    .await;
    let body = json!({
        "username": "alice",
        "password": "pw-alice",
        "auth": {"type": "m.login.registration_token", "token": "12345"},
    });
    let answer = assert_ok(server.client().post("/_matrix/client/v3/register", body).await);
    assert_eq!(answer["user_id"], format!("@alice:{}", server.server_name));
}

/// Racing registrations of one name: exactly one wins, the others get `M_USER_IN_USE`, never
/// a 500.
#[tokio::test]
async fn concurrent_registration_of_one_name() {
    let server = TestServer::start().await;
    let mut tasks = Vec::new();
    for index in 0..8 {
        let client = server.client();
        tasks.push(tokio::spawn(async move {
            let body = json!({"username": "racer", "password": format!("pw-{index}"), "auth": {"type": "m.login.dummy"}});
            client.post("/_matrix/client/v3/register", body).await
        }));
    }
    let mut winners = Vec::new();
    for (index, task) in tasks.into_iter().enumerate() {
        let answer = task.await.expect("task");
        match answer.0 {
            200 => winners.push(index),
            _ => assert_error(&answer, 400, "M_USER_IN_USE"),
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    assert_ok(login(&server, "racer", &format!("pw-{}", winners[0])).await);
}
