// The matrix-js-sdk scenario (the engine of Element Web) against a running homeserver.
// Run by `conformance client-js`, which starts the server, installs Node 22 and matrix-js-sdk
// into $HOME/.cache/hearth-js-client, registers two users and passes them as one JSON argument:
//   node scenario.mjs '{"base_url": "...", "users": [{"user_id", "password"}, {...}]}'
// Prints `PASS name`, `FAIL name: reason` or `SKIP name: reason` per step; later steps are
// skipped once one fails, since each builds on the one before.
// The `e2ee_*` steps log both users in again as new devices with the SDK's Rust crypto
// (`initRustCrypto`, in-memory store) and exchange messages in an encrypted room: each side
// must decrypt the other's, while the server only ever holds `m.room.encrypted`.

import * as sdk from "matrix-js-sdk";

const out = (line) => process.stdout.write(line + "\n");
// The SDK logs through console and loglevel; keep stdout for results only.
for (const name of ["log", "info", "debug", "warn", "trace"]) console[name] = () => {};
try {
  sdk.logger?.setLevel?.("error");
} catch {}

const input = JSON.parse(process.argv[2]);
const baseUrl = input.base_url;
const [aliceCreds, bobCreds] = input.users;
const STEP_TIMEOUT_MS = 20000;

/** Polls `check` until it returns a truthy value, or fails with `what` after the timeout. */
async function waitFor(what, check, timeoutMs = STEP_TIMEOUT_MS) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/** A client API request with `client`'s access token, outside the SDK: what the server holds. */
async function raw(client, method, path, body) {
  const response = await fetch(`${baseUrl}${path}`, {
    method,
    headers: { authorization: `Bearer ${client.getAccessToken()}`, "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  if (!response.ok) throw new Error(`${method} ${path}: ${response.status} ${text.slice(0, 300)}`);
  return JSON.parse(text);
}

async function login(creds) {
  const anonymous = sdk.createClient({ baseUrl });
  const answer = await anonymous.loginRequest({
    type: "m.login.password",
    identifier: { type: "m.id.user", user: creds.user_id },
    password: creds.password,
    initial_device_display_name: "conformance js-sdk",
  });
  if (answer.user_id !== creds.user_id) throw new Error(`logged in as ${answer.user_id}`);
  return sdk.createClient({
    baseUrl,
    accessToken: answer.access_token,
    userId: answer.user_id,
    deviceId: answer.device_id,
  });
}

async function started(client) {
  await client.startClient({ initialSyncLimit: 10 });
  await waitFor("the first sync to finish", () => client.getSyncState() === "SYNCING" || client.getSyncState() === "PREPARED");
}

const timelineBodies = (client, roomId) =>
  (client.getRoom(roomId)?.getLiveTimeline().getEvents() ?? [])
    .filter((event) => event.getType() === "m.room.message")
    .map((event) => event.getContent().body);

/** Whether `observer`'s server lists `client`'s device with keys (uploaded by its crypto). */
async function deviceKeysUploaded(observer, client) {
  const userId = client.getUserId();
  const answer = await raw(observer, "POST", "/_matrix/client/v3/keys/query", { device_keys: { [userId]: [] } });
  const keys = answer.device_keys?.[userId]?.[client.getDeviceId()];
  return Boolean(keys?.keys?.[`curve25519:${client.getDeviceId()}`]);
}

/** Waits until `client` has decrypted the event `eventId` of `roomId` and returns it. */
async function decrypted(client, roomId, eventId) {
  let last = "not in the timeline";
  try {
    return await waitFor(`the decryption of ${eventId}`, async () => {
      const event = client.getRoom(roomId)?.findEventById(eventId);
      if (!event) return null;
      await client.decryptEventIfNeeded(event);
      if (event.isDecryptionFailure() || event.getType() !== "m.room.message") {
        last = `type ${event.getType()}, failure ${event.decryptionFailureReason}`;
        return null;
      }
      return event;
    }, 30000);
  } catch (error) {
    throw new Error(`${error.message} (last seen: ${last})`);
  }
}

/** `sender` sends `body` in the encrypted room; `receiver` must decrypt it. */
async function sendAndDecrypt(sender, receiver, body) {
  const roomId = state.encryptedRoomId;
  const { event_id: eventId } = await sender.sendTextMessage(roomId, body);
  const event = await decrypted(receiver, roomId, eventId);
  if (!event.isEncrypted()) throw new Error(`${eventId} arrived in clear`);
  if (event.getContent().body !== body) throw new Error(`decrypted body ${JSON.stringify(event.getContent().body)}`);
  if (event.getSender() !== sender.getUserId()) throw new Error(`sender ${event.getSender()}`);
  // What the server stores and serves is ciphertext only.
  const path = `/_matrix/client/v3/rooms/${encodeURIComponent(roomId)}/event/${encodeURIComponent(eventId)}`;
  const stored = await raw(receiver, "GET", path);
  if (stored.type !== "m.room.encrypted" || stored.content?.algorithm !== "m.megolm.v1.aes-sha2"
      || typeof stored.content?.ciphertext !== "string" || "body" in (stored.content ?? {})) {
    throw new Error(`the server holds ${JSON.stringify(stored).slice(0, 300)}`);
  }
}

const state = {};
const steps = [
  ["login_with_password", async () => {
    state.alice = await login(aliceCreds);
    state.bob = await login(bobCreds);
  }],
  ["sync_loop_starts", async () => {
    await started(state.alice);
    await started(state.bob);
  }],
  ["create_room", async () => {
    const { room_id } = await state.alice.createRoom({ name: "js-sdk scenario", preset: "private_chat" });
    state.roomId = room_id;
    await waitFor("the room in alice's store", () => state.alice.getRoom(room_id));
  }],
  ["invite_reaches_invitee", async () => {
    await state.alice.invite(state.roomId, bobCreds.user_id);
    await waitFor("bob's invite", () => state.bob.getRoom(state.roomId)?.getMyMembership() === "invite");
  }],
  ["join_room", async () => {
    await state.bob.joinRoom(state.roomId);
    await waitFor("bob joined in alice's view", () =>
      state.alice.getRoom(state.roomId)?.getMember(bobCreds.user_id)?.membership === "join");
  }],
  ["message_arrives_through_sync_loop", async () => {
    await state.alice.sendTextMessage(state.roomId, "hello from alice");
    await waitFor("alice's message at bob", () => timelineBodies(state.bob, state.roomId).includes("hello from alice"));
  }],
  ["reply_arrives_at_sender", async () => {
    await state.bob.sendTextMessage(state.roomId, "hello from bob");
    await waitFor("bob's reply at alice", () => timelineBodies(state.alice, state.roomId).includes("hello from bob"));
  }],
  ["paginate_history_back_to_creation", async () => {
    for (let index = 0; index < 15; index++) {
      await state.alice.sendTextMessage(state.roomId, `history ${index}`);
    }
    // A fresh client with a short initial timeline has to paginate to see the start.
    const late = await login(bobCreds);
    await late.startClient({ initialSyncLimit: 3 });
    try {
      await waitFor("the room in the late client", () => late.getRoom(state.roomId));
      const room = late.getRoom(state.roomId);
      await waitFor("history back to the create event", async () => {
        const events = room.getLiveTimeline().getEvents();
        if (events.some((event) => event.getType() === "m.room.create")) return true;
        await late.scrollback(room, 10);
        return false;
      });
      const bodies = timelineBodies(late, state.roomId);
      if (!bodies.includes("hello from alice") || !bodies.includes("history 14")) {
        throw new Error(`paginated timeline lacks messages: ${JSON.stringify(bodies)}`);
      }
    } finally {
      late.stopClient();
    }
  }],
  ["display_name_change_seen_by_other", async () => {
    await state.alice.setDisplayName("Alice via js-sdk");
    await waitFor("alice's new name at bob", () =>
      state.bob.getRoom(state.roomId)?.getMember(aliceCreds.user_id)?.name === "Alice via js-sdk");
  }],
  ["typing_seen_by_other", async () => {
    await state.alice.sendTyping(state.roomId, true, 30000);
    await waitFor("alice typing at bob", () =>
      state.bob.getRoom(state.roomId)?.getMember(aliceCreds.user_id)?.typing === true);
    await state.alice.sendTyping(state.roomId, false, 0);
    await waitFor("alice stopped typing at bob", () =>
      state.bob.getRoom(state.roomId)?.getMember(aliceCreds.user_id)?.typing === false);
  }],
  ["leave_room", async () => {
    await state.bob.leave(state.roomId);
    await waitFor("bob's leave in alice's view", () =>
      state.alice.getRoom(state.roomId)?.getMember(bobCreds.user_id)?.membership === "leave");
    state.alice.stopClient();
    state.bob.stopClient();
  }],
  ["e2ee_rust_crypto_uploads_device_keys", async () => {
    // Crypto must be set up before the first sync, so these are new devices.
    state.alice = await login(aliceCreds);
    state.bob = await login(bobCreds);
    for (const client of [state.alice, state.bob]) {
      await client.initRustCrypto({ useIndexedDB: false });
      await started(client);
    }
    await waitFor("alice's device keys on the server", () => deviceKeysUploaded(state.bob, state.alice));
    await waitFor("bob's device keys on the server", () => deviceKeysUploaded(state.alice, state.bob));
  }],
  ["e2ee_create_encrypted_room", async () => {
    const { room_id } = await state.alice.createRoom({
      name: "js-sdk encrypted",
      preset: "private_chat",
      initial_state: [{ type: "m.room.encryption", state_key: "", content: { algorithm: "m.megolm.v1.aes-sha2" } }],
    });
    state.encryptedRoomId = room_id;
    await waitFor("the encrypted room in alice's store", async () =>
      state.alice.getRoom(room_id) && (await state.alice.getCrypto().isEncryptionEnabledInRoom(room_id)));
  }],
  ["e2ee_invitee_joins_encrypted_room", async () => {
    const roomId = state.encryptedRoomId;
    await state.alice.invite(roomId, bobCreds.user_id);
    await waitFor("bob's invite", () => state.bob.getRoom(roomId)?.getMyMembership() === "invite");
    await state.bob.joinRoom(roomId);
    await waitFor("bob joined in alice's view", () =>
      state.alice.getRoom(roomId)?.getMember(bobCreds.user_id)?.membership === "join");
    await waitFor("encryption enabled in bob's view", () => state.bob.getCrypto().isEncryptionEnabledInRoom(roomId));
  }],
  ["e2ee_message_decrypted_by_recipient", async () => {
    await sendAndDecrypt(state.alice, state.bob, "secret from alice");
  }],
  ["e2ee_reply_decrypted_by_sender", async () => {
    await sendAndDecrypt(state.bob, state.alice, "secret reply from bob");
  }],
  ["e2ee_server_holds_only_ciphertext", async () => {
    const path = `/_matrix/client/v3/rooms/${encodeURIComponent(state.encryptedRoomId)}/messages?dir=b&limit=100`;
    const { chunk } = await raw(state.alice, "GET", path);
    const encrypted = chunk.filter((event) => event.type === "m.room.encrypted");
    const clear = chunk.filter((event) => event.type === "m.room.message");
    if (encrypted.length !== 2 || clear.length !== 0) {
      throw new Error(`/messages holds ${encrypted.length} encrypted and ${clear.length} clear messages`);
    }
  }],
];

let failed = null;
for (const [name, run] of steps) {
  const full = `js_sdk::${name}`;
  if (failed) {
    out(`SKIP ${full}: an earlier step failed (${failed})`);
    continue;
  }
  try {
    await Promise.race([
      run(),
      new Promise((_, reject) => setTimeout(() => reject(new Error("step timed out after 60 s")), 60000)),
    ]);
    out(`PASS ${full}`);
  } catch (error) {
    const reason = String(error?.message ?? error).replace(/\s+/g, " ");
    out(`FAIL ${full}: ${reason}`);
    failed = name;
  }
}
state.alice?.stopClient();
state.bob?.stopClient();
process.exit(0);
