//! End-to-end encryption, the server's part: device and one-time keys (upload, query, claim,
//! fallback keys), key changes in `keys/changes` and sync `device_lists`, send-to-device
//! messages, cross-signing keys (behind user-interactive auth once they exist) and signatures,
//! and server-side key backups (versions and keys).

use anyhow::{Result, ensure};
use ruma::{CanonicalJsonObject, signatures::Ed25519KeyPair};
use serde_json::{Value, json};

use super::fixtures::{password_auth, two_in_public_room, uia_session};
use crate::client::{Ctx, User, enc, pointer_key, str_field, v3};

crate::tests! { "e2ee";
    keys_upload_counts_one_time_keys => "post_matrixclientv3keysupload";
    keys_query_returns_own_device_keys => "post_matrixclientv3keysquery";
    keys_query_returns_other_users_device_keys => "post_matrixclientv3keysquery";
    keys_query_limits_to_the_named_devices => "post_matrixclientv3keysquery";
    keys_claim_hands_out_each_one_time_key_once => "post_matrixclientv3keysclaim";
    keys_claim_falls_back_to_the_fallback_key => "post_matrixclientv3keysclaim";
    keys_claim_without_keys_leaves_the_device_out => "post_matrixclientv3keysclaim";
    sync_reports_one_time_key_counts_and_fallback_types => "extensions-to-sync";
    keys_changes_lists_a_room_mate_whose_keys_changed => "get_matrixclientv3keyschanges";
    sync_device_lists_changed_for_a_room_mate => "extensions-to-sync";
    sync_device_lists_left_when_no_room_is_shared => "extensions-to-sync";
    to_device_is_delivered_once => "put_matrixclientv3sendtodeviceeventtypetxnid";
    to_device_same_txn_is_sent_once => "put_matrixclientv3sendtodeviceeventtypetxnid";
    to_device_wildcard_reaches_every_device => "put_matrixclientv3sendtodeviceeventtypetxnid";
    cross_signing_keys_upload_then_query => "post_matrixclientv3keysdevice_signingupload";
    cross_signing_replace_requires_user_interactive_auth => "post_matrixclientv3keysdevice_signingupload";
    user_signing_key_is_shown_only_to_its_owner => "post_matrixclientv3keysquery";
    signatures_upload_signs_a_device_with_the_self_signing_key => "post_matrixclientv3keyssignaturesupload";
    signatures_upload_reports_a_bad_signature => "post_matrixclientv3keyssignaturesupload";
    key_backup_without_version_is_not_found => "get_matrixclientv3room_keysversion";
    key_backup_version_create_get_and_latest => "post_matrixclientv3room_keysversion";
    key_backup_version_update_checks_version_and_algorithm => "put_matrixclientv3room_keysversionversion";
    key_backup_version_delete_forgets_it_and_its_keys => "delete_matrixclientv3room_keysversionversion";
    key_backup_keys_put_get_delete_with_count_and_etag => "put_matrixclientv3room_keyskeys";
    key_backup_keys_only_go_to_the_latest_version => "put_matrixclientv3room_keyskeysroomidsessionid";
    key_backup_keys_keep_the_better_session => "server-side-key-backups",
        deviation = "\"if they have the same values for is_verified, then it will keep the key with a lower first_message_index\"; Synapse 1.163 also takes a key with a lower forwarded_count at a higher first_message_index, and an unverified key with a lower first_message_index over a verified one, so only the cases where both agree are checked";
    key_backup_keys_missing_session_is_not_found => "get_matrixclientv3room_keyskeysroomidsessionid";
    key_backup_keys_room_without_keys_has_empty_sessions => "get_matrixclientv3room_keyskeysroomid";
}

const ALGORITHM: &str = "m.megolm_backup.v1.curve25519-aes-sha2";

fn device_keys(user: &User) -> Value {
    json!({
        "user_id": user.user_id,
        "device_id": user.device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {
            format!("curve25519:{}", user.device_id): format!("curve-{}", user.device_id),
            format!("ed25519:{}", user.device_id): format!("ed-{}", user.device_id),
        },
        "signatures": {user.user_id.clone(): {format!("ed25519:{}", user.device_id): "sig"}},
    })
}

/// A signed key object, as `signed_curve25519` one-time and fallback keys are: `key` and
/// `signatures` are required.
fn signed_key(user: &User, key: &str, fallback: bool) -> Value {
    let mut object = json!({
        "key": key,
        "signatures": {user.user_id.clone(): {format!("ed25519:{}", user.device_id): "sig"}},
    });
    if fallback {
        object["fallback"] = json!(true);
    }
    object
}

fn one_time_keys(user: &User, ids: &[&str]) -> Value {
    let keys: serde_json::Map<String, Value> = ids
        .iter()
        .map(|id| {
            (format!("signed_curve25519:{id}"), signed_key(user, &format!("otk-{id}"), false))
        })
        .collect();
    Value::Object(keys)
}

fn fallback_key(user: &User) -> Value {
    json!({"signed_curve25519:fb": signed_key(user, "fallback-key", true)})
}

async fn upload(user: &User, body: Value) -> Result<Value> {
    user.post(&v3("/keys/upload"), body).await?.ok()
}

async fn query(querier: &User, owner: &User, devices: Value) -> Result<Value> {
    querier
        .post(&v3("/keys/query"), json!({"device_keys": {owner.user_id.clone(): devices}}))
        .await?
        .ok()
}

/// One claim of a `signed_curve25519` key of `owner`'s device: the map of key ids to keys, or
/// `Null` when the device was left out.
async fn claim(claimer: &User, owner: &User) -> Result<Value> {
    let body = json!({"one_time_keys": {owner.user_id.clone(): {owner.device_id.clone(): "signed_curve25519"}}});
    let answer = claimer.post(&v3("/keys/claim"), body).await?.ok()?;
    let pointer =
        format!("/one_time_keys/{}/{}", pointer_key(&owner.user_id), pointer_key(&owner.device_id));
    Ok(answer.pointer(&pointer).cloned().unwrap_or(Value::Null))
}

async fn keys_upload_counts_one_time_keys(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let answer = upload(
        &user,
        json!({"device_keys": device_keys(&user), "one_time_keys": one_time_keys(&user, &["a", "b"])}),
    )
    .await?;
    ensure!(
        answer.pointer("/one_time_key_counts/signed_curve25519") == Some(&json!(2)),
        "{answer}"
    );
    let answer = upload(&user, json!({"one_time_keys": one_time_keys(&user, &["c"])})).await?;
    ensure!(
        answer.pointer("/one_time_key_counts/signed_curve25519") == Some(&json!(3)),
        "{answer}"
    );
    Ok(())
}

async fn keys_query_returns_own_device_keys(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    upload(&user, json!({"device_keys": device_keys(&user)})).await?;
    let answer = query(&user, &user, json!([])).await?;
    let keys = answer
        .pointer(&format!(
            "/device_keys/{}/{}",
            pointer_key(&user.user_id),
            pointer_key(&user.device_id)
        ))
        .ok_or_else(|| anyhow::anyhow!("own device missing: {answer}"))?;
    let key_id = format!("ed25519:{}", user.device_id);
    ensure!(keys["keys"][&key_id] == json!(format!("ed-{}", user.device_id)), "{keys}");
    ensure!(keys["signatures"][&user.user_id][&key_id] == "sig", "{keys}");
    Ok(())
}

async fn keys_query_returns_other_users_device_keys(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    upload(&a, json!({"device_keys": device_keys(&a)})).await?;
    let answer = query(&b, &a, json!([])).await?;
    let keys = &answer["device_keys"][&a.user_id][&a.device_id];
    ensure!(
        keys["user_id"] == a.user_id.as_str() && keys["device_id"] == a.device_id.as_str(),
        "{answer}"
    );
    ensure!(keys["algorithms"].as_array().is_some_and(|list| list.len() == 2), "{keys}");
    Ok(())
}

async fn keys_query_limits_to_the_named_devices(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let other = user.second_device().await?;
    upload(&user, json!({"device_keys": device_keys(&user)})).await?;
    upload(&other, json!({"device_keys": device_keys(&other)})).await?;
    let all = query(&user, &user, json!([])).await?;
    let devices = all["device_keys"][&user.user_id].as_object().map(|devices| devices.len());
    ensure!(devices == Some(2), "both devices expected: {all}");
    let one = query(&user, &user, json!([other.device_id])).await?;
    let devices: Vec<&String> = one["device_keys"][&user.user_id]
        .as_object()
        .map(|d| d.keys().collect())
        .unwrap_or_default();
    ensure!(devices == vec![&other.device_id], "only {} expected: {one}", other.device_id);
    Ok(())
}

async fn keys_claim_hands_out_each_one_time_key_once(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    upload(&a, json!({"one_time_keys": one_time_keys(&a, &["x", "y"])})).await?;
    let first = claim(&b, &a).await?;
    let second = claim(&b, &a).await?;
    let ids = |claimed: &Value| -> Vec<String> {
        claimed.as_object().map(|keys| keys.keys().cloned().collect()).unwrap_or_default()
    };
    let (first_ids, second_ids) = (ids(&first), ids(&second));
    ensure!(first_ids.len() == 1 && second_ids.len() == 1, "{first} / {second}");
    ensure!(first_ids != second_ids, "the same key was claimed twice: {first_ids:?}");
    let third = claim(&b, &a).await?;
    ensure!(ids(&third).is_empty(), "only two keys were uploaded, a third was claimed: {third}");
    Ok(())
}

async fn keys_claim_falls_back_to_the_fallback_key(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    let fallback = fallback_key(&a);
    upload(&a, json!({"one_time_keys": one_time_keys(&a, &["only"]), "fallback_keys": fallback}))
        .await?;
    let first = claim(&b, &a).await?;
    ensure!(first.get("signed_curve25519:only").is_some(), "one-time key first: {first}");
    for _ in 0..2 {
        let next = claim(&b, &a).await?;
        ensure!(
            next.pointer("/signed_curve25519:fb/key") == Some(&json!("fallback-key")),
            "fallback expected: {next}"
        );
    }
    Ok(())
}

async fn keys_claim_without_keys_leaves_the_device_out(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    let claimed = claim(&b, &a).await?;
    ensure!(
        claimed.is_null() || claimed.as_object().is_some_and(|keys| keys.is_empty()),
        "{claimed}"
    );
    Ok(())
}

async fn sync_reports_one_time_key_counts_and_fallback_types(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let fallback = fallback_key(&user);
    upload(
        &user,
        json!({"one_time_keys": one_time_keys(&user, &["a", "b", "c"]), "fallback_keys": fallback}),
    )
    .await?;
    let sync = user.initial_sync().await?;
    ensure!(
        sync.pointer("/device_one_time_keys_count/signed_curve25519") == Some(&json!(3)),
        "{sync}"
    );
    ensure!(sync["device_unused_fallback_key_types"] == json!(["signed_curve25519"]), "{sync}");
    Ok(())
}

fn changed(body: &Value, pointer: &str, user_id: &str) -> bool {
    body.pointer(pointer)
        .and_then(Value::as_array)
        .is_some_and(|users| users.iter().any(|u| u == user_id))
}

async fn keys_changes_lists_a_room_mate_whose_keys_changed(ctx: Ctx) -> Result<()> {
    let (a, b, _room_id) = two_in_public_room(&ctx).await?;
    let before = str_field(&b.initial_sync().await?, "next_batch")?.to_owned();
    upload(&a, json!({"device_keys": device_keys(&a)})).await?;
    let after = str_field(&b.initial_sync().await?, "next_batch")?.to_owned();
    let answer = b
        .get(&v3(&format!("/keys/changes?from={}&to={}", enc(&before), enc(&after))))
        .await?
        .ok()?;
    ensure!(changed(&answer, "/changed", &a.user_id), "{} missing from {answer}", a.user_id);
    Ok(())
}

/// Syncs incrementally from `since` until `found` holds on an answer (20 s at most).
async fn sync_from_until(
    user: &User,
    since: String,
    what: &str,
    found: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut since = since;
    loop {
        let sync = user.sync(&format!("since={}&timeout=1000", enc(&since))).await?;
        if found(&sync) {
            return Ok(sync);
        }
        ensure!(std::time::Instant::now() < deadline, "timed out waiting for {what}: last {sync}");
        since = str_field(&sync, "next_batch")?.to_owned();
    }
}

async fn sync_device_lists_changed_for_a_room_mate(ctx: Ctx) -> Result<()> {
    let (a, b, _room_id) = two_in_public_room(&ctx).await?;
    let since = str_field(&b.initial_sync().await?, "next_batch")?.to_owned();
    upload(&a, json!({"device_keys": device_keys(&a)})).await?;
    sync_from_until(&b, since, "device_lists.changed", |sync| {
        changed(sync, "/device_lists/changed", &a.user_id)
    })
    .await?;
    Ok(())
}

async fn sync_device_lists_left_when_no_room_is_shared(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    upload(&a, json!({"device_keys": device_keys(&a)})).await?;
    let since = str_field(&b.initial_sync().await?, "next_batch")?.to_owned();
    a.leave(&room_id).await?;
    sync_from_until(&b, since, "device_lists.left", |sync| {
        changed(sync, "/device_lists/left", &a.user_id)
    })
    .await?;
    Ok(())
}

fn to_device_events(sync: &Value) -> Vec<Value> {
    sync.pointer("/to_device/events").and_then(Value::as_array).cloned().unwrap_or_default()
}

async fn send_to_device(sender: &User, txn: &str, messages: Value) -> Result<()> {
    sender
        .put(&v3(&format!("/sendToDevice/org.example.test/{txn}")), json!({"messages": messages}))
        .await?
        .ok()?;
    Ok(())
}

async fn to_device_is_delivered_once(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    let since = str_field(&b.initial_sync().await?, "next_batch")?.to_owned();
    send_to_device(&a, "once", json!({b.user_id.clone(): {b.device_id.clone(): {"n": 1}}})).await?;
    let sync = b.sync(&format!("since={}&timeout=5000", enc(&since))).await?;
    let events = to_device_events(&sync);
    ensure!(events.len() == 1, "one message expected: {sync}");
    ensure!(
        events[0]["sender"] == a.user_id.as_str() && events[0]["type"] == "org.example.test",
        "{}",
        events[0]
    );
    ensure!(events[0]["content"] == json!({"n": 1}), "{}", events[0]);
    let next = str_field(&sync, "next_batch")?;
    let again = b.sync(&format!("since={}&timeout=0", enc(next))).await?;
    ensure!(to_device_events(&again).is_empty(), "delivered twice: {again}");
    Ok(())
}

async fn to_device_same_txn_is_sent_once(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    let since = str_field(&b.initial_sync().await?, "next_batch")?.to_owned();
    let messages = json!({b.user_id.clone(): {b.device_id.clone(): {"n": 1}}});
    send_to_device(&a, "same", messages.clone()).await?;
    send_to_device(&a, "same", messages).await?;
    send_to_device(&a, "different", json!({b.user_id.clone(): {b.device_id.clone(): {"n": 2}}}))
        .await?;
    // Everything queued for the device, across as many syncs as it takes to see the last one.
    let mut events = Vec::new();
    let mut since = since;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !events.iter().any(|event: &Value| event["content"]["n"] == 2) {
        ensure!(std::time::Instant::now() < deadline, "timed out; seen {events:?}");
        let sync = b.sync(&format!("since={}&timeout=1000", enc(&since))).await?;
        events.extend(to_device_events(&sync));
        since = str_field(&sync, "next_batch")?.to_owned();
    }
    let ones = events.iter().filter(|event| event["content"]["n"] == 1).count();
    ensure!(ones == 1, "the repeated transaction was delivered {ones} times: {events:?}");
    Ok(())
}

async fn to_device_wildcard_reaches_every_device(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    let b2 = b.second_device().await?;
    send_to_device(&a, "all", json!({b.user_id.clone(): {"*": {"to": "all"}}})).await?;
    for device in [&b, &b2] {
        device
            .sync_until("", "the wildcard message", |sync| {
                to_device_events(sync)
                    .iter()
                    .any(|event| event["content"]["to"] == "all")
                    .then_some(())
            })
            .await?;
    }
    Ok(())
}

/// An ed25519 key pair named by its unpadded base64 public key, as cross-signing keys are.
struct SigningKey {
    pair: Ed25519KeyPair,
    public: String,
}

fn signing_key() -> Result<SigningKey> {
    let der = Ed25519KeyPair::generate();
    let public_bytes = Ed25519KeyPair::from_der(&der, "x".into())?.public_key().to_vec();
    let public =
        ruma::serde::Base64::<ruma::serde::base64::Standard, _>::new(public_bytes).encode();
    Ok(SigningKey { pair: Ed25519KeyPair::from_der(&der, public.clone())?, public })
}

fn sign(object: &mut Value, signer: &str, key: &SigningKey) -> Result<()> {
    let mut canonical: CanonicalJsonObject = serde_json::from_value(object.clone())?;
    ruma::signatures::sign_json(signer, &key.pair, &mut canonical)?;
    *object = serde_json::to_value(canonical)?;
    Ok(())
}

fn cross_signing_key(
    user: &User,
    usage: &str,
    key: &SigningKey,
    master: Option<&SigningKey>,
) -> Result<Value> {
    let mut object = json!({
        "user_id": user.user_id,
        "usage": [usage],
        "keys": {format!("ed25519:{}", key.public): key.public},
    });
    if let Some(master) = master {
        sign(&mut object, &user.user_id, master)?;
    }
    Ok(object)
}

struct CrossSigning {
    master: SigningKey,
    self_signing: SigningKey,
    user_signing: SigningKey,
}

/// Uploads a fresh set of cross-signing keys, answering user-interactive auth with the
/// password when the server asks (the first upload may go without).
async fn set_up_cross_signing(user: &User) -> Result<CrossSigning> {
    let keys = CrossSigning {
        master: signing_key()?,
        self_signing: signing_key()?,
        user_signing: signing_key()?,
    };
    let mut body = json!({
        "master_key": cross_signing_key(user, "master", &keys.master, None)?,
        "self_signing_key": cross_signing_key(user, "self_signing", &keys.self_signing, Some(&keys.master))?,
        "user_signing_key": cross_signing_key(user, "user_signing", &keys.user_signing, Some(&keys.master))?,
    });
    let answer = user.post(&v3("/keys/device_signing/upload"), body.clone()).await?;
    if answer.status == 401 {
        let session = uia_session(&answer.body)?;
        body["auth"] = password_auth(user, Some(&session));
        user.post(&v3("/keys/device_signing/upload"), body).await?.ok()?;
    } else {
        answer.ok()?;
    }
    Ok(keys)
}

async fn cross_signing_keys_upload_then_query(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    let keys = set_up_cross_signing(&a).await?;
    let answer = query(&b, &a, json!([])).await?;
    let master = &answer["master_keys"][&a.user_id];
    ensure!(
        master["keys"][format!("ed25519:{}", keys.master.public)] == keys.master.public.as_str(),
        "{answer}"
    );
    ensure!(master["usage"] == json!(["master"]), "{master}");
    let self_signing = &answer["self_signing_keys"][&a.user_id];
    ensure!(
        self_signing["keys"][format!("ed25519:{}", keys.self_signing.public)]
            == keys.self_signing.public.as_str(),
        "{answer}"
    );
    let signature = format!("ed25519:{}", keys.master.public);
    ensure!(self_signing["signatures"][&a.user_id][&signature].is_string(), "{self_signing}");
    Ok(())
}

async fn cross_signing_replace_requires_user_interactive_auth(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    set_up_cross_signing(&user).await?;
    let replacement = signing_key()?;
    let mut body = json!({"master_key": cross_signing_key(&user, "master", &replacement, None)?});
    let answer = user.post(&v3("/keys/device_signing/upload"), body.clone()).await?.status(401)?;
    let session = uia_session(&answer)?;
    body["auth"] = password_auth(&user, Some(&session));
    user.post(&v3("/keys/device_signing/upload"), body).await?.ok()?;
    let answer = query(&user, &user, json!([])).await?;
    let master = &answer["master_keys"][&user.user_id]["keys"];
    ensure!(
        master[format!("ed25519:{}", replacement.public)] == replacement.public.as_str(),
        "{answer}"
    );
    Ok(())
}

async fn user_signing_key_is_shown_only_to_its_owner(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    let keys = set_up_cross_signing(&a).await?;
    let own = query(&a, &a, json!([])).await?;
    let user_signing = &own["user_signing_keys"][&a.user_id];
    ensure!(
        user_signing["keys"][format!("ed25519:{}", keys.user_signing.public)]
            == keys.user_signing.public.as_str(),
        "{own}"
    );
    let other = query(&b, &a, json!([])).await?;
    ensure!(
        other.pointer(&format!("/user_signing_keys/{}", pointer_key(&a.user_id))).is_none(),
        "{other}"
    );
    Ok(())
}

async fn signatures_upload_signs_a_device_with_the_self_signing_key(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    upload(&a, json!({"device_keys": device_keys(&a)})).await?;
    let keys = set_up_cross_signing(&a).await?;
    let mut signed = device_keys(&a);
    signed.as_object_mut().map(|object| object.remove("signatures"));
    sign(&mut signed, &a.user_id, &keys.self_signing)?;
    let answer = a
        .post(
            &v3("/keys/signatures/upload"),
            json!({a.user_id.clone(): {a.device_id.clone(): signed}}),
        )
        .await?
        .ok()?;
    let failures = answer.get("failures").cloned().unwrap_or(json!({}));
    ensure!(failures.as_object().is_none_or(|failures| failures.is_empty()), "{answer}");
    let seen = query(&b, &a, json!([])).await?;
    let signatures = &seen["device_keys"][&a.user_id][&a.device_id]["signatures"][&a.user_id];
    ensure!(signatures[format!("ed25519:{}", keys.self_signing.public)].is_string(), "{seen}");
    ensure!(
        signatures[format!("ed25519:{}", a.device_id)] == "sig",
        "the device's own signature stays: {seen}"
    );
    Ok(())
}

async fn signatures_upload_reports_a_bad_signature(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    upload(&user, json!({"device_keys": device_keys(&user)})).await?;
    let keys = set_up_cross_signing(&user).await?;
    let mut signed = device_keys(&user);
    signed.as_object_mut().map(|object| object.remove("signatures"));
    // Signed by a key that is not the self-signing key, under the self-signing key's name.
    let impostor = signing_key()?;
    sign(&mut signed, &user.user_id, &impostor)?;
    let forged =
        signed["signatures"][&user.user_id][format!("ed25519:{}", impostor.public)].clone();
    signed["signatures"] =
        json!({user.user_id.clone(): {format!("ed25519:{}", keys.self_signing.public): forged}});
    let answer = user
        .post(
            &v3("/keys/signatures/upload"),
            json!({user.user_id.clone(): {user.device_id.clone(): signed}}),
        )
        .await?
        .ok()?;
    let failure = &answer["failures"][&user.user_id][&user.device_id];
    ensure!(failure["errcode"].is_string(), "a failure for the device expected: {answer}");
    let seen = query(&user, &user, json!([])).await?;
    let signatures =
        &seen["device_keys"][&user.user_id][&user.device_id]["signatures"][&user.user_id];
    ensure!(
        signatures.get(format!("ed25519:{}", keys.self_signing.public)).is_none(),
        "forged signature stored: {seen}"
    );
    Ok(())
}

fn backup_key(
    first_message_index: u64,
    forwarded_count: u64,
    is_verified: bool,
    tag: &str,
) -> Value {
    json!({
        "first_message_index": first_message_index,
        "forwarded_count": forwarded_count,
        "is_verified": is_verified,
        "session_data": {"ephemeral": "e", "ciphertext": tag, "mac": "m"},
    })
}

async fn create_backup(user: &User, public_key: &str) -> Result<String> {
    let answer = user
        .post(
            &v3("/room_keys/version"),
            json!({"algorithm": ALGORITHM, "auth_data": {"public_key": public_key}}),
        )
        .await?
        .ok()?;
    Ok(str_field(&answer, "version")?.to_owned())
}

fn session_path(room_id: &str, session_id: &str, version: &str) -> String {
    v3(&format!("/room_keys/keys/{}/{}?version={}", enc(room_id), enc(session_id), enc(version)))
}

const BACKUP_ROOM: &str = "!backup:example.org";

async fn key_backup_without_version_is_not_found(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    user.get(&v3("/room_keys/version")).await?.err(404, "M_NOT_FOUND")?;
    user.get(&v3("/room_keys/version/12345")).await?.err(404, "M_NOT_FOUND")?;
    Ok(())
}

async fn key_backup_version_create_get_and_latest(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let first = create_backup(&user, "first").await?;
    let second = create_backup(&user, "second").await?;
    ensure!(first != second, "two versions share {first}");
    let latest = user.get(&v3("/room_keys/version")).await?.ok()?;
    ensure!(latest["version"] == second.as_str() && latest["algorithm"] == ALGORITHM, "{latest}");
    ensure!(latest["auth_data"]["public_key"] == "second" && latest["count"] == 0, "{latest}");
    ensure!(latest["etag"].is_string(), "etag must be a string: {latest}");
    let older = user.get(&v3(&format!("/room_keys/version/{}", enc(&first)))).await?.ok()?;
    ensure!(
        older["version"] == first.as_str() && older["auth_data"]["public_key"] == "first",
        "{older}"
    );
    Ok(())
}

async fn key_backup_version_update_checks_version_and_algorithm(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let version = create_backup(&user, "before").await?;
    let path = v3(&format!("/room_keys/version/{}", enc(&version)));
    user.put(
        &path,
        json!({"algorithm": ALGORITHM, "auth_data": {"public_key": "after"}, "version": version}),
    )
    .await?
    .ok()?;
    let info = user.get(&path).await?.ok()?;
    ensure!(info["auth_data"]["public_key"] == "after", "{info}");
    user.put(&path, json!({"algorithm": ALGORITHM, "auth_data": {}, "version": "not-this-one"}))
        .await?
        .err(400, "M_INVALID_PARAM")?;
    Ok(())
}

async fn key_backup_version_delete_forgets_it_and_its_keys(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let version = create_backup(&user, "doomed").await?;
    user.put(&session_path(BACKUP_ROOM, "s", &version), backup_key(0, 0, false, "x"))
        .await?
        .ok()?;
    let path = v3(&format!("/room_keys/version/{}", enc(&version)));
    user.delete(&path).await?.ok()?;
    user.get(&path).await?.err(404, "M_NOT_FOUND")?;
    user.get(&v3("/room_keys/version")).await?.err(404, "M_NOT_FOUND")?;
    user.get(&session_path(BACKUP_ROOM, "s", &version)).await?.err(404, "M_NOT_FOUND")?;
    Ok(())
}

async fn key_backup_keys_put_get_delete_with_count_and_etag(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let version = create_backup(&user, "k").await?;
    let query = format!("?version={}", enc(&version));
    let one = user
        .put(&session_path(BACKUP_ROOM, "s1", &version), backup_key(0, 0, false, "one"))
        .await?
        .ok()?;
    ensure!(one["count"] == 1 && one["etag"].is_string(), "{one}");
    let room_path = v3(&format!("/room_keys/keys/{}{query}", enc(BACKUP_ROOM)));
    let two = user
        .put(&room_path, json!({"sessions": {"s2": backup_key(0, 0, false, "two")}}))
        .await?
        .ok()?;
    ensure!(two["count"] == 2 && two["etag"] != one["etag"], "{two} after {one}");
    let all_path = v3(&format!("/room_keys/keys{query}"));
    let other_room = "!other:example.org";
    let three = user
        .put(
            &all_path,
            json!({"rooms": {other_room: {"sessions": {"s3": backup_key(0, 0, false, "three")}}}}),
        )
        .await?
        .ok()?;
    ensure!(three["count"] == 3, "{three}");
    let info = user.get(&v3("/room_keys/version")).await?.ok()?;
    ensure!(info["count"] == 3 && info["etag"] == three["etag"], "{info} vs {three}");

    let all = user.get(&all_path).await?.ok()?;
    let sessions = &all["rooms"][BACKUP_ROOM]["sessions"];
    ensure!(
        sessions["s1"] == backup_key(0, 0, false, "one")
            && sessions["s2"]["session_data"]["ciphertext"] == "two",
        "{all}"
    );
    ensure!(
        all["rooms"][other_room]["sessions"]["s3"]["session_data"]["ciphertext"] == "three",
        "{all}"
    );
    let room = user.get(&room_path).await?.ok()?;
    ensure!(room["sessions"].as_object().is_some_and(|sessions| sessions.len() == 2), "{room}");
    let single = user.get(&session_path(BACKUP_ROOM, "s2", &version)).await?.ok()?;
    ensure!(single == backup_key(0, 0, false, "two"), "{single}");

    let after = user.delete(&session_path(BACKUP_ROOM, "s1", &version)).await?.ok()?;
    ensure!(after["count"] == 2, "{after}");
    let after = user.delete(&room_path).await?.ok()?;
    ensure!(after["count"] == 1, "{after}");
    let after = user.delete(&all_path).await?.ok()?;
    ensure!(after["count"] == 0 && after["etag"].is_string(), "{after}");
    let all = user.get(&all_path).await?.ok()?;
    ensure!(all["rooms"].as_object().is_some_and(|rooms| rooms.is_empty()), "{all}");
    Ok(())
}

async fn key_backup_keys_only_go_to_the_latest_version(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let old = create_backup(&user, "old").await?;
    let current = create_backup(&user, "current").await?;
    let body = user
        .put(&session_path(BACKUP_ROOM, "s", &old), backup_key(0, 0, false, "x"))
        .await?
        .err(403, "M_WRONG_ROOM_KEYS_VERSION")?;
    ensure!(body["current_version"].is_string(), "current_version expected: {body}");
    user.put(&session_path(BACKUP_ROOM, "s", &current), backup_key(0, 0, false, "x"))
        .await?
        .ok()?;
    Ok(())
}

async fn stored_tag(user: &User, version: &str) -> Result<Value> {
    let answer = user.get(&session_path(BACKUP_ROOM, "s", version)).await?.ok()?;
    Ok(answer["session_data"]["ciphertext"].clone())
}

async fn key_backup_keys_keep_the_better_session(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let version = create_backup(&user, "k").await?;
    let path = session_path(BACKUP_ROOM, "s", &version);
    user.put(&path, backup_key(5, 2, false, "start")).await?.ok()?;
    for (data, expected) in [
        (backup_key(6, 3, false, "higher-index"), "start"),
        (backup_key(5, 3, false, "more-forwarded"), "start"),
        (backup_key(5, 1, false, "less-forwarded"), "less-forwarded"),
        (backup_key(4, 9, false, "lower-index"), "lower-index"),
        (backup_key(9, 9, true, "verified"), "verified"),
        (backup_key(9, 9, false, "unverified"), "verified"),
    ] {
        user.put(&path, data).await?.ok()?;
        let stored = stored_tag(&user, &version).await?;
        ensure!(stored == expected, "expected {expected} kept, got {stored}");
    }
    Ok(())
}

async fn key_backup_keys_missing_session_is_not_found(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let version = create_backup(&user, "k").await?;
    user.get(&session_path(BACKUP_ROOM, "nothing-here", &version))
        .await?
        .err(404, "M_NOT_FOUND")?;
    Ok(())
}

async fn key_backup_keys_room_without_keys_has_empty_sessions(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let version = create_backup(&user, "k").await?;
    let path = v3(&format!("/room_keys/keys/{}?version={}", enc(BACKUP_ROOM), enc(&version)));
    let answer = user.get(&path).await?.ok()?;
    ensure!(answer == json!({"sessions": {}}), "{answer}");
    Ok(())
}
