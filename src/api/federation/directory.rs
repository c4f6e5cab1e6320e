//! The public room directory as other servers read it: `publicRooms`, `GET` and `POST`, from
//! the same directory the client API lists.
//!
//! [Public room directory](https://spec.matrix.org/v1.16/server-server-api/#public-room-directory)

use axum::{Json, Router, extract::State, routing::get};
use serde::Deserialize;
use serde_json::json;

use crate::{
    api::{
        AppState,
        client::directory::{PublicRoomsFilter, parse_flag, parse_limit},
        error::ApiResult,
        extract::{Body, Query},
        federation::XMatrixOrigin,
    },
    rooms::{Rooms, directory::PublicRoomsRequest},
};

/// Routes of this module (all behind the X-Matrix check).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/_matrix/federation/v1/publicRooms", get(get_public_rooms).post(post_public_rooms))
}

#[derive(Deserialize)]
struct PublicRoomsQuery {
    limit: Option<String>,
    since: Option<String>,
    include_all_networks: Option<String>,
}

/// `include_all_networks` and `third_party_instance_id` are read and ignored: Hearth bridges
/// no third-party networks, so with or without them the list is the same.
#[derive(Deserialize, Default)]
struct PublicRoomsBody {
    limit: Option<usize>,
    since: Option<String>,
    filter: Option<PublicRoomsFilter>,
}

/// `GET /_matrix/federation/v1/publicRooms`
async fn get_public_rooms(
    State(rooms): State<Rooms>,
    XMatrixOrigin(origin): XMatrixOrigin,
    Query(query): Query<PublicRoomsQuery>,
) -> ApiResult {
    parse_flag(query.include_all_networks.as_deref())?;
    let request = PublicRoomsRequest {
        limit: parse_limit(query.limit.as_deref())?,
        since: query.since,
        ..PublicRoomsRequest::default()
    };
    tracing::debug!(%origin, "public rooms");
    Ok(Json(json!(rooms.public_rooms(&request)?)))
}

/// `POST /_matrix/federation/v1/publicRooms`
async fn post_public_rooms(
    State(rooms): State<Rooms>,
    XMatrixOrigin(origin): XMatrixOrigin,
    Body(body): Body<PublicRoomsBody>,
) -> ApiResult {
    let filter = body.filter.unwrap_or_default();
    let request = PublicRoomsRequest {
        limit: body.limit,
        since: body.since,
        search: filter.generic_search_term,
        room_types: filter.room_types,
    };
    tracing::debug!(%origin, "public rooms, filtered");
    Ok(Json(json!(rooms.public_rooms(&request)?)))
}
