// Private, end-to-end encrypted and disappearing rooms on the demo page (issue 14).
// Run by tools/suites/browser.sh; alone: `node --test e2e.test.mjs` (starts its own server).
//
// Alice creates a room (private and encrypted by default; messages disappear after 5 s), bob
// opens her link, they chat in plaintext on screen while GET /rooms/{id}/messages (fetched by
// the test with bob's session) holds only ciphertext; carol, given the link without its key,
// sees placeholders; after the TTL the messages vanish from both screens.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { launchBrowser, shot, startServer, watch } from "./lib.mjs";

const STEP = { timeout: 45_000 };
let browser, base;
const servers = [];
const ctxs = [];
let A, B, C, wA, wB, wC;
let roomId, link, bobSession;

async function newPage(origin) {
  const ctx = await browser.newContext({ viewport: { width: 1000, height: 650 }, locale: "en-US", timezoneId: "UTC" });
  ctxs.push(ctx);
  const page = await ctx.newPage();
  page.setDefaultTimeout(10_000);
  return { page, w: watch(page, origin) };
}

async function pickName(page, name) {
  await page.waitForSelector("#view-name:not([hidden])");
  await page.fill("#name", name);
  await page.click("#start");
}

async function waitInRoom(page) {
  await page.waitForSelector("#view-room:not([hidden])");
  await page.waitForSelector("#message:not([disabled])");
  await page.waitForSelector('#conn[data-state="online"]');
}

function bodies(page) {
  return page.$$eval("#messages li.msg .body", (l) => l.map((b) => b.textContent));
}

function waitForBody(page, text) {
  return page.waitForFunction(
    (t) => Array.from(document.querySelectorAll("#messages li.msg .body")).some((b) => b.textContent === t),
    text,
  );
}

async function send(page, text) {
  await page.fill("#message", text);
  await page.press("#message", "Enter");
}

before(async () => {
  if (process.env.CHATLOOP_URL) {
    base = process.env.CHATLOOP_URL.replace(/\/$/, "");
  } else {
    const s = await startServer([]);
    servers.push(s);
    base = s.url;
  }
  browser = await launchBrowser();
  ({ page: A, w: wA } = await newPage(base));
  ({ page: B, w: wB } = await newPage(base));
  ({ page: C, w: wC } = await newPage(base));
});

after(async () => {
  for (const c of ctxs) await c.close().catch(() => {});
  if (browser) await browser.close().catch(() => {});
  for (const s of servers) await s.stop();
});

test("alice creates a private encrypted room whose messages disappear after 5 s", STEP, async () => {
  await A.goto(base + "/");
  await pickName(A, "alice");
  await A.waitForSelector("#view-lobby:not([hidden])");
  await A.selectOption("#message-ttl", "5");
  await A.click("#create-room");
  await waitInRoom(A);
  roomId = (await A.textContent("#room-id")).trim();
  link = (await A.textContent("#share-link")).trim();
  const hash = new URL(link).hash;
  assert.match(hash, /^#room=[0-9a-f]{10}&invite=[A-Za-z0-9_-]{22}&key=[A-Za-z0-9_-]{43}$/);
  const note = await A.textContent("#e2e-note");
  assert.match(note, /End-to-end encrypted/);
  assert.match(note, /display names/, "says what the server still sees");
  assert.match(note, /5 seconds/);
  // Neither the invite nor the key ever went to the server: no request carried them.
  const invite = /invite=([^&]+)/.exec(hash)[1];
  const key = /key=([^&]+)/.exec(hash)[1];
  assert.deepEqual(wA.requests.filter((u) => u.includes(key)), [], "the key left the browser");
  assert.deepEqual(wA.requests.filter((u) => u.includes(invite)), [], "the invite was put in a URL");
});

test("bob joins from the link, carol from the link without its key", STEP, async () => {
  await B.goto(link);
  await pickName(B, "bob");
  await waitInRoom(B);
  bobSession = await B.evaluate(() => JSON.parse(sessionStorage.getItem("chatloop.session")).session_id);
  const noKey = link.replace(/&key=[^&]+/, "");
  await C.goto(noKey);
  await pickName(C, "carol");
  await waitInRoom(C);
  assert.match(await C.textContent("#e2e-note"), /no key/);
  // Without the invite the room does not exist for others.
  const nobody = await fetch(`${base}/rooms/${roomId}`);
  assert.equal(nobody.status, 404);
});

test("they chat in plaintext; the server holds only ciphertext; carol sees placeholders", STEP, async () => {
  await send(A, "meet at the old mill");
  await send(B, "bring the map ✓");
  for (const p of [A, B]) {
    await waitForBody(p, "meet at the old mill");
    await waitForBody(p, "bring the map ✓");
  }
  const r = await fetch(`${base}/rooms/${roomId}/messages`, { headers: { Authorization: `Bearer ${bobSession}` } });
  assert.equal(r.status, 200);
  const stored = (await r.json()).messages.filter((m) => m.type === "chat").map((m) => m.message);
  assert.equal(stored.length, 2, JSON.stringify(stored));
  for (const m of stored) {
    assert.match(m, /^e2e1:[A-Za-z0-9+/]+=*$/, "only ciphertext is stored");
    assert.ok(!m.includes("mill") && !m.includes("map"), m);
  }
  assert.notEqual(stored[0].slice(5, 21), stored[1].slice(5, 21), "a fresh nonce per message");
  await C.waitForFunction(() => document.querySelectorAll("#messages li.msg").length >= 2);
  const shown = await bodies(C);
  for (const b of shown) {
    assert.match(b, /^Encrypted message/, "a clear placeholder");
    assert.ok(!b.includes("e2e1:"), "no ciphertext on screen");
    assert.ok(!b.includes("mill"));
  }
  const count = await A.$$eval("#messages li.msg .countdown", (l) => l.map((c) => c.textContent));
  assert.ok(count.length >= 2 && count.every((t) => /disappear/.test(t)), JSON.stringify(count));
  await shot(A, "e2e-01-alice");
  await shot(C, "e2e-02-carol-no-key");
});

test("after the TTL the messages disappear from every screen and from history", STEP, async () => {
  for (const p of [A, B, C]) {
    await p.waitForFunction(() => document.querySelectorAll("#messages li.msg").length === 0, null, {
      timeout: 15_000,
    });
  }
  const r = await fetch(`${base}/rooms/${roomId}/messages`, { headers: { Authorization: `Bearer ${bobSession}` } });
  const left = (await r.json()).messages.filter((m) => m.type === "chat");
  assert.deepEqual(left, []);
  for (const w of [wA, wB, wC]) {
    assert.deepEqual(w.pageErrors, []);
    assert.deepEqual(w.consoleErrors.filter((e) => !/404/.test(e)), []);
    assert.deepEqual(w.foreign(), []);
  }
});
