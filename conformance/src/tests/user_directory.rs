//! User directory search: `POST /user_directory/search`.

use anyhow::{Result, ensure};
use serde_json::{Value, json};

use super::fixtures::two_in_public_room;
use crate::client::{Ctx, User, array, enc, v3};

crate::tests! { "user_directory";
    search_finds_room_mate_by_display_name => "post_matrixclientv3user_directorysearch";
    search_finds_room_mate_by_user_id => "post_matrixclientv3user_directorysearch";
    search_results_have_limited_flag_and_respect_limit => "post_matrixclientv3user_directorysearch";
    search_requires_authentication => "post_matrixclientv3user_directorysearch";
}

async fn search(user: &User, term: &str, limit: u64) -> Result<Value> {
    user.post(&v3("/user_directory/search"), json!({"search_term": term, "limit": limit}))
        .await?
        .ok()
}

fn found(body: &Value, user_id: &str) -> Option<Value> {
    array(body, "/results").iter().find(|r| r.get("user_id") == Some(&json!(user_id))).cloned()
}

async fn search_finds_room_mate_by_display_name(ctx: Ctx) -> Result<()> {
    let (a, b, _room_id) = two_in_public_room(&ctx).await?;
    let name = ctx.unique("Findable");
    b.put(&v3(&format!("/profile/{}/displayname", enc(&b.user_id))), json!({"displayname": name}))
        .await?
        .ok()?;
    let result = crate::client::eventually("b in the user directory", || async {
        Ok(found(&search(&a, &name, 10).await?, &b.user_id))
    })
    .await?;
    ensure!(result.get("display_name") == Some(&json!(name)), "{result}");
    Ok(())
}

async fn search_finds_room_mate_by_user_id(ctx: Ctx) -> Result<()> {
    let (a, b, _room_id) = two_in_public_room(&ctx).await?;
    crate::client::eventually("b in the user directory", || async {
        Ok(found(&search(&a, &b.localpart, 10).await?, &b.user_id))
    })
    .await?;
    Ok(())
}

async fn search_results_have_limited_flag_and_respect_limit(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    let c = ctx.user_named(&format!("{}x", b.localpart)).await?;
    c.join(&room_id).await?;
    let body = crate::client::eventually("two matches in the user directory", || async {
        let body = search(&a, &b.localpart, 10).await?;
        Ok((found(&body, &b.user_id).is_some() && found(&body, &c.user_id).is_some())
            .then_some(body))
    })
    .await?;
    ensure!(body.get("limited") == Some(&json!(false)), "{body}");
    let limited = search(&a, &b.localpart, 1).await?;
    ensure!(array(&limited, "/results").len() == 1, "{limited}");
    ensure!(limited.get("limited") == Some(&json!(true)), "{limited}");
    Ok(())
}

async fn search_requires_authentication(ctx: Ctx) -> Result<()> {
    ctx.post(&v3("/user_directory/search"), json!({"search_term": "x"}))
        .await?
        .err(401, "M_MISSING_TOKEN")?;
    Ok(())
}
