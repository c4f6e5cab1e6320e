//! OpenID: a user requests a token for itself, and a third party checks it with
//! `openid/userinfo`, which takes no X-Matrix signature.
//!
//! [OpenID](https://spec.matrix.org/v1.16/client-server-api/#openid),
//! [userinfo](https://spec.matrix.org/v1.16/server-server-api/#openid)

use serde_json::json;

use crate::harness::{TestServer, assert_error, assert_ok, enc};

#[tokio::test]
async fn openid_tokens_identify_their_user_to_third_parties() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let request =
        |user_id: &str| format!("/_matrix/client/v3/user/{}/openid/request_token", enc(user_id));

    let answer = assert_ok(alice.client.post(&request(&alice.user_id), json!({})).await);
    assert_eq!(answer["token_type"], "Bearer", "{answer}");
    assert_eq!(answer["matrix_server_name"], server.server_name.as_str(), "{answer}");
    assert_eq!(answer["expires_in"], 3600, "{answer}");
    let token = answer["access_token"].as_str().unwrap();

    // The third party has no Matrix credentials: a plain request with the token.
    let anonymous = server.client();
    let userinfo =
        |token: &str| format!("/_matrix/federation/v1/openid/userinfo?access_token={token}");
    let answer = assert_ok(anonymous.get(&userinfo(token)).await);
    assert_eq!(answer, json!({"sub": alice.user_id}));
    // The OpenID token is no access token, and an access token no OpenID token.
    assert_error(
        &anonymous.with_token(token).get("/_matrix/client/v3/account/whoami").await,
        401,
        "M_UNKNOWN_TOKEN",
    );
    assert_error(
        &anonymous.get(&userinfo(alice.client.access_token())).await,
        401,
        "M_UNKNOWN_TOKEN",
    );
    assert_error(&anonymous.get(&userinfo("nonsense")).await, 401, "M_UNKNOWN_TOKEN");
    assert_error(
        &anonymous.get("/_matrix/federation/v1/openid/userinfo").await,
        401,
        "M_UNKNOWN_TOKEN",
    );

    // Only for oneself, and only when logged in.
    assert_error(&bob.client.post(&request(&alice.user_id), json!({})).await, 403, "M_FORBIDDEN");
    assert_error(
        &anonymous.post(&request(&alice.user_id), json!({})).await,
        401,
        "M_MISSING_TOKEN",
    );
    server.stop().await;
}
