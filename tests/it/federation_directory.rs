//! The room directory across two real servers on 127.0.0.2 and 127.0.0.3 with TLS:
//! `query/directory` and `publicRooms` served to a signed peer, and the client API of the other
//! server asking them for its users (`GET /directory/room/{alias}`, `publicRooms?server=`).
//!
//! [Room aliases](https://spec.matrix.org/v1.16/server-server-api/#get_matrixfederationv1querydirectory),
//! [public room directory](https://spec.matrix.org/v1.16/server-server-api/#public-room-directory)

use federation::{Error, Method};
use ruma::ServerName;
use serde_json::{Value, json};

use crate::{
    federation_transport::{Pki, client_as, start_on},
    harness::{assert_error, assert_ok, enc},
};

fn room_ids(page: &Value) -> Vec<String> {
    page["chunk"]
        .as_array()
        .unwrap_or_else(|| panic!("no chunk: {page}"))
        .iter()
        .filter_map(|room| room["room_id"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn aliases_and_public_rooms_are_asked_of_their_server() {
    let pki = Pki::new();
    let a = start_on(&pki, "127.0.0.2").await;
    let b = start_on(&pki, "127.0.0.3").await;
    let a_name = <&ServerName>::try_from(a.server_name.as_str()).unwrap();
    let alice = a.register("alice").await;
    let dave = a.register("dave").await;
    let lobby = alice
        .create_room(json!({
            "preset": "public_chat",
            "visibility": "public",
            "room_alias_name": "lobby",
            "name": "Lobby",
            "topic": "Everyone welcome",
        }))
        .await;
    dave.join(&lobby).await;
    let garden = alice
        .create_room(json!({"preset": "public_chat", "visibility": "public", "name": "Garden"}))
        .await;
    let lobby_alias = format!("#lobby:{}", a.server_name);
    let as_b = client_as(&b, &pki, true);

    // query/directory: A answers for its own aliases.
    let path = format!("/_matrix/federation/v1/query/directory?room_alias={}", enc(&lobby_alias));
    let answer = as_b.send_request(a_name, Method::GET, &path, None).await.unwrap();
    assert_eq!(answer["room_id"], lobby.as_str(), "{answer}");
    assert_eq!(answer["servers"], json!([a.server_name]), "{answer}");
    for alias in [format!("#nowhere:{}", a.server_name), format!("#lobby:{}", b.server_name)] {
        let path = format!("/_matrix/federation/v1/query/directory?room_alias={}", enc(&alias));
        match as_b.send_request(a_name, Method::GET, &path, None).await {
            Err(Error::Status { status: 404, body, .. }) => {
                assert!(body.contains("M_NOT_FOUND"), "{body}");
            }
            other => panic!("{alias}: {other:?}"),
        }
    }

    // B's user resolves A's alias through B; unknown and unreachable aliases are not found.
    let bea = b.register("bea").await;
    let directory = |alias: &str| format!("/_matrix/client/v3/directory/room/{}", enc(alias));
    let answer = assert_ok(bea.client.get(&directory(&lobby_alias)).await);
    assert_eq!(answer["room_id"], lobby.as_str(), "{answer}");
    assert_eq!(answer["servers"], json!([a.server_name]), "{answer}");
    let missing = format!("#nowhere:{}", a.server_name);
    assert_error(&bea.client.get(&directory(&missing)).await, 404, "M_NOT_FOUND");
    // Nothing listens on port 1 of 127.0.0.4.
    assert_error(&bea.client.get(&directory("#lobby:127.0.0.4:1")).await, 404, "M_NOT_FOUND");

    // publicRooms over federation, largest room first, in pages.
    let page = as_b
        .send_request(a_name, Method::GET, "/_matrix/federation/v1/publicRooms?limit=1", None)
        .await
        .unwrap();
    assert_eq!(room_ids(&page), vec![lobby.clone()], "{page}");
    assert_eq!(page["total_room_count_estimate"], 2, "{page}");
    assert_eq!(page["chunk"][0]["num_joined_members"], 2, "{page}");
    assert_eq!(page["chunk"][0]["canonical_alias"], lobby_alias.as_str(), "{page}");
    let next = page["next_batch"].as_str().unwrap();
    let path = format!("/_matrix/federation/v1/publicRooms?limit=1&since={next}");
    let page = as_b.send_request(a_name, Method::GET, &path, None).await.unwrap();
    assert_eq!(room_ids(&page), vec![garden.clone()], "{page}");
    assert!(page.get("next_batch").is_none(), "{page}");
    assert!(page["prev_batch"].is_string(), "{page}");
    let body = json!({"filter": {"generic_search_term": "welcome"}, "include_all_networks": false});
    let page = as_b
        .send_request(a_name, Method::POST, "/_matrix/federation/v1/publicRooms", Some(body))
        .await
        .unwrap();
    assert_eq!(room_ids(&page), vec![lobby.clone()], "{page}");
    let path = "/_matrix/federation/v1/publicRooms?since=bogus";
    match as_b.send_request(a_name, Method::GET, path, None).await {
        Err(Error::Status { status: 400, body, .. }) => assert!(body.contains("M_INVALID_PARAM")),
        other => panic!("bogus since: {other:?}"),
    }

    // B's user lists A's rooms through B.
    let server = enc(&a.server_name);
    let page =
        assert_ok(bea.client.get(&format!("/_matrix/client/v3/publicRooms?server={server}")).await);
    assert_eq!(room_ids(&page), [lobby.clone(), garden.clone()], "{page}");
    let page = assert_ok(
        bea.client
            .post(
                &format!("/_matrix/client/v3/publicRooms?server={server}"),
                json!({"limit": 5, "filter": {"generic_search_term": "garden"}}),
            )
            .await,
    );
    assert_eq!(room_ids(&page), vec![garden.clone()], "{page}");
    // Asking another server through B takes an access token.
    let anonymous = b.client();
    let answer = anonymous.get(&format!("/_matrix/client/v3/publicRooms?server={server}")).await;
    assert_error(&answer, 401, "M_MISSING_TOKEN");
    // B's own directory is empty and needs no token.
    let page = assert_ok(anonymous.get("/_matrix/client/v3/publicRooms").await);
    assert!(room_ids(&page).is_empty(), "{page}");
    let answer = bea.client.get("/_matrix/client/v3/publicRooms?server=127.0.0.4:1").await;
    assert_eq!(answer.0, 502, "{}", answer.1);

    b.stop().await;
    a.stop().await;
}
