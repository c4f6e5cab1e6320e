//! OpenID: `POST /user/{userId}/openid/request_token`, only for oneself.

use anyhow::{Result, ensure};
use serde_json::{Value, json};

use super::fixtures::server_name;
use crate::client::{Ctx, enc, str_field, v3};

crate::tests! { "openid";
    request_token_answers_a_bearer_token_of_this_server => "post_matrixclientv3useruseridopenidrequest_token";
    request_token_for_another_user_is_forbidden => "post_matrixclientv3useruseridopenidrequest_token";
}

fn request_token_path(user_id: &str) -> String {
    v3(&format!("/user/{}/openid/request_token", enc(user_id)))
}

async fn request_token_answers_a_bearer_token_of_this_server(ctx: Ctx) -> Result<()> {
    let a = ctx.user().await?;
    let body = a.post(&request_token_path(&a.user_id), json!({})).await?.ok()?;
    ensure!(!str_field(&body, "access_token")?.is_empty(), "empty access_token: {body}");
    ensure!(str_field(&body, "token_type")? == "Bearer", "{body}");
    ensure!(str_field(&body, "matrix_server_name")? == server_name(&a), "{body}");
    let expires_in = body.get("expires_in").and_then(Value::as_u64);
    ensure!(expires_in.is_some_and(|seconds| seconds > 0), "expires_in: {body}");
    Ok(())
}

async fn request_token_for_another_user_is_forbidden(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    a.post(&request_token_path(&b.user_id), json!({})).await?.err(403, "M_FORBIDDEN")?;
    Ok(())
}
