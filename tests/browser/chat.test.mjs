// The demo chat page (GET /) driven in a real browser (Debian's Chromium via playwright-core).
// Run by tools/suites/browser.sh; alone: `node --test chat.test.mjs` (starts its own servers).
//
// Two users in separate browser contexts: alice creates a room, bob joins from the share link,
// they chat, bob types, bob reloads, an HTML payload stays text, bob's socket drops while alice
// keeps talking, and a short-lived session expires. The steps share one room and run in order.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { copyFileSync, statSync } from "node:fs";
import path from "node:path";
import { REPO, SHOTS, launchBrowser, shot, startServer, watch } from "./lib.mjs";

const STEP = { timeout: 45_000 };
const XSS = "<img src=x onerror=alert(1)>";

let browser;
let base; // base URL of the main server (--typing-quiet 1s)
const servers = []; // servers this file started (stopped in after())
const ctxs = [];
let A, B, wA, wB; // pages and their watchers (alice, bob)
let roomId, shareLink;
const sent = []; // chat texts sent to the room so far, in order

// Tracks every WebSocket the page opens, so a test can drop the current one
// (the page itself does not expose its socket).
function trackSockets() {
  const Native = window.WebSocket;
  const all = [];
  class Tracked extends Native {
    constructor(...args) {
      super(...args);
      all.push(this);
    }
  }
  window.WebSocket = Tracked;
  window.__sockets = all;
}

async function newPage(origin) {
  const ctx = await browser.newContext({
    viewport: { width: 1000, height: 650 },
    colorScheme: "light",
    locale: "en-US",
    timezoneId: "UTC",
  });
  ctxs.push(ctx);
  await ctx.addInitScript(trackSockets);
  const page = await ctx.newPage();
  page.setDefaultTimeout(10_000);
  const w = watch(page, origin);
  w.sockets = [];
  page.on("websocket", (ws) => w.sockets.push(ws.url()));
  return { ctx, page, w };
}

async function pickName(page, name) {
  await page.waitForSelector("#view-name:not([hidden])");
  await page.fill("#name", name);
  await page.click("#start");
}

// Waits until the page's socket got its welcome (the composer is enabled only then).
async function waitInRoom(page) {
  await page.waitForSelector("#view-room:not([hidden])");
  await page.waitForSelector("#message:not([disabled])");
  await page.waitForSelector('#conn[data-state="online"]');
}

async function send(page, text) {
  await page.fill("#message", text);
  await page.press("#message", "Enter");
  sent.push(text);
}

// Text bodies of the chat messages shown, in order, and their ids.
function chatList(page) {
  return page.$$eval("#messages li.msg", (lis) =>
    lis.map((li) => ({ id: li.dataset.id, text: li.querySelector(".body").textContent })),
  );
}

function waitForChat(page, text, count = 1) {
  return page.waitForFunction(
    ([t, n]) =>
      Array.from(document.querySelectorAll("#messages li.msg .body")).filter((b) => b.textContent === t)
        .length >= n,
    [text, count],
  );
}

// Ids of everything stored that is shown (chat and join/leave notices), in order.
function shownIds(page) {
  return page.$$eval("#messages li[data-id]", (lis) => lis.map((li) => li.dataset.id));
}

function onlineNames(page) {
  return page.$$eval("#users li", (lis) => lis.map((li) => li.textContent.trim()).sort());
}

function assertNoDuplicates(list, who) {
  const ids = list.map((m) => m.id);
  assert.ok(ids.every((id) => typeof id === "string" && id.length > 0), `${who}: every message has a data-id`);
  assert.equal(new Set(ids).size, ids.length, `${who}: a message is shown twice: ${JSON.stringify(list)}`);
}

before(async () => {
  if (process.env.CHATLOOP_URL) {
    base = process.env.CHATLOOP_URL.replace(/\/$/, "");
  } else {
    const s = await startServer(["--typing-quiet", "1s"]);
    servers.push(s);
    base = s.url;
  }
  browser = await launchBrowser();
  ({ page: A, w: wA } = await newPage(base));
  ({ page: B, w: wB } = await newPage(base));
});

after(async () => {
  for (const c of ctxs) await c.close().catch(() => {});
  if (browser) await browser.close().catch(() => {});
  for (const s of servers) await s.stop();
});

test("alice picks a name and creates a room", STEP, async () => {
  await A.goto(base + "/");
  await shot(A, "chat-01-name");
  await pickName(A, "alice");
  await A.waitForSelector("#view-lobby:not([hidden])");
  assert.equal(await A.textContent("#whoami-name"), "alice");
  await A.click("#create-room");
  await waitInRoom(A);
  roomId = (await A.textContent("#room-id")).trim();
  assert.match(roomId, /^[0-9a-f]{10}$/);
  shareLink = (await A.textContent("#share-link")).trim();
  // A private, end-to-end encrypted room: the invite and the key are in the fragment only.
  assert.match(shareLink, new RegExp(`^${base}/#room=${roomId}&invite=[A-Za-z0-9_-]{22}&key=[A-Za-z0-9_-]{43}$`));
  assert.equal(await A.getAttribute("#share-link", "href"), shareLink);
  assert.equal(new URL(A.url()).hash, new URL(shareLink).hash, "the address bar shows the room");
  await shot(A, "chat-02-alice-room");
});

test("bob joins from the share link and both see each other online", STEP, async () => {
  assert.ok(shareLink, "needs the room of the previous step");
  await B.goto(shareLink);
  await B.waitForSelector("#view-name:not([hidden])");
  assert.match(await B.textContent("#name-hint"), new RegExp(roomId), "the name view says which room");
  await pickName(B, "bob");
  await waitInRoom(B);
  assert.equal((await B.textContent("#room-id")).trim(), roomId);
  for (const [page, who] of [[A, "alice"], [B, "bob"]]) {
    await page.waitForFunction(
      () => {
        const names = Array.from(document.querySelectorAll("#users li"), (li) => li.textContent.trim());
        return names.includes("alice") && names.includes("bob");
      },
      null,
      { timeout: 5_000 },
    );
    assert.deepEqual(await onlineNames(page), ["alice", "bob"], `${who}'s online list`);
    assert.equal(await page.$$eval("#users li.self", (l) => l.map((x) => x.textContent)).then((l) => l.join()), who);
  }
  await A.waitForSelector("#messages li.notice.user_joined >> text=bob has joined");
  await shot(B, "chat-03-bob-joined");
});

test("alice sends a message: bob sees it, alice sees her echo exactly once", STEP, async () => {
  const text = "Hi bob, welcome to chatloop!";
  await send(A, text);
  await waitForChat(B, text);
  await waitForChat(A, text);
  await A.waitForTimeout(400); // a second echo would arrive within this
  const a = (await chatList(A)).filter((m) => m.text === text);
  const b = (await chatList(B)).filter((m) => m.text === text);
  assert.equal(a.length, 1, "alice's echo is shown once");
  assert.equal(b.length, 1, "bob sees the message once");
  assert.equal(a[0].id, b[0].id, "same message id on both pages");
  const meta = await B.$eval(`#messages li.msg[data-id="${b[0].id}"]`, (li) => ({
    author: li.querySelector(".author").textContent,
    mine: li.classList.contains("mine"),
  }));
  assert.deepEqual(meta, { author: "alice", mine: false });
  assert.equal(await A.$eval(`#messages li.msg[data-id="${a[0].id}"]`, (li) => li.classList.contains("mine")), true);
  assert.equal(await A.inputValue("#message"), "", "the composer is emptied after sending");

  await send(B, "Thanks alice! Typing indicators next.");
  await waitForChat(A, sent.at(-1));
  await shot(A, "chat-04-alice-chat");
});

test("bob types: alice sees 'typing', then it goes away (typing_stopped)", STEP, async () => {
  await B.click("#message");
  await B.locator("#message").pressSequentially("hel", { delay: 40 });
  await A.waitForFunction(() => /bob is typing/.test(document.getElementById("typing").textContent), null, {
    timeout: 5_000,
  });
  await shot(A, "chat-05-typing");
  const t0 = Date.now();
  // The server runs with --typing-quiet 1s; the page's own fallback drops a stale indicator only
  // after 6 s, so clearing well before that shows typing_stopped arrived.
  await A.waitForFunction(() => document.getElementById("typing").textContent === "", null, { timeout: 4_500 });
  const quiet = Date.now() - t0;
  assert.ok(quiet < 4_500, `typing indicator cleared after ${quiet} ms`);
  assert.equal(await B.textContent("#typing"), "", "bob never sees his own typing");
  await B.fill("#message", "");
});

test("an HTML message is shown as literal text and runs nothing", STEP, async () => {
  await send(A, XSS);
  for (const [page, w, who] of [[A, wA, "alice"], [B, wB, "bob"]]) {
    await waitForChat(page, XSS);
    const info = await page.$$eval("#messages li.msg .body", (bodies, payload) => {
      const b = bodies.find((x) => x.textContent === payload);
      return { children: b.children.length, html: b.innerHTML };
    }, XSS);
    assert.equal(info.children, 0, `${who}: the body holds only text`);
    assert.equal(info.html, "&lt;img src=x onerror=alert(1)&gt;", `${who}: escaped markup`);
    assert.equal(await page.locator("#messages img").count(), 0, `${who}: no <img> inside #messages`);
    assert.equal(await page.locator("img").count(), 0, `${who}: no <img> anywhere`);
    await page.waitForTimeout(200);
    assert.deepEqual(w.dialogs, [], `${who}: no dialog fired`);
  }
  await shot(B, "chat-06-xss-as-text");
});

test("bob reloads the page and sees the history, without duplicates", STEP, async () => {
  await B.reload();
  await waitInRoom(B);
  await B.waitForFunction((n) => document.querySelectorAll("#messages li.msg").length >= n, sent.length);
  await B.waitForTimeout(300);
  const list = await chatList(B);
  assertNoDuplicates(list, "bob after reload");
  assert.deepEqual(list.map((m) => m.text), sent, "bob sees every earlier message, in order, once");
  assert.deepEqual(await onlineNames(B), ["alice", "bob"]);
  // alice still sees bob (he left and came back)
  await A.waitForFunction(() => {
    const names = Array.from(document.querySelectorAll("#users li"), (li) => li.textContent.trim());
    return names.includes("bob");
  });
  await shot(B, "chat-07-bob-reloaded");
});

test("a dropped socket reconnects with since=: nothing lost, nothing doubled", STEP, async () => {
  const before = await chatList(B);
  const lastSeen = (await shownIds(B)).at(-1);
  const socketsBefore = wB.sockets.length;
  // Drop bob's socket (close code 4000 is "connection lost" to the page, so it reconnects), and
  // take his browser offline so the reconnect waits while alice keeps talking.
  const closed = await B.evaluate(
    () =>
      new Promise((resolve) => {
        const ws = window.__sockets.filter((s) => s.readyState === WebSocket.OPEN).at(-1);
        if (!ws) return resolve(null);
        ws.addEventListener("close", (ev) => resolve(ev.code));
        ws.close(4000, "test: drop");
      }),
  );
  assert.equal(closed, 4000, "bob's socket closed");
  await B.context().setOffline(true);
  await B.waitForSelector('#conn[data-state="offline"]');
  await B.waitForSelector("#messages li.notice.alert >> text=Disconnected");
  await A.waitForSelector("#messages li.notice.user_left >> text=bob has left");

  const away = ["while you were away 1", "while you were away 2", "while you were away 3"];
  for (const t of away) {
    await send(A, t);
    await waitForChat(A, t);
  }
  await shot(B, "chat-08-bob-offline");
  const offline = await chatList(B);
  assert.equal(offline.length, before.length, "bob got nothing while disconnected");

  await B.context().setOffline(false);
  await waitInRoom(B);
  await waitForChat(B, away.at(-1));
  await B.waitForSelector("#messages li.notice >> text=Reconnected.");
  await B.waitForTimeout(400);
  const list = await chatList(B);
  assertNoDuplicates(list, "bob after reconnect");
  assert.deepEqual(list.map((m) => m.text), sent, "bob has every message once, in order");
  const ids = await shownIds(B);
  assert.equal(new Set(ids).size, ids.length, "no stored message (chat or notice) is shown twice");
  const reconnects = wB.sockets.slice(socketsBefore);
  assert.ok(reconnects.length >= 1, "bob opened a new socket");
  const last = new URL(reconnects.at(-1));
  assert.equal(last.searchParams.get("since"), lastSeen, "the reconnect asks for messages since the last one seen");
  assert.deepEqual(await onlineNames(A), ["alice", "bob"]);
  await shot(B, "chat-09-bob-reconnected");
});

test("pages made no request to another origin and threw no error", STEP, async () => {
  // The page picks the socket's scheme from its own: wss:// when served over https.
  const wsScheme = new URL(base).protocol === "https:" ? "wss:" : "ws:";
  for (const [w, who] of [[wA, "alice"], [wB, "bob"]]) {
    assert.ok(w.sockets.length > 0, `${who}: opened no socket`);
    assert.deepEqual(
      w.sockets.filter((u) => new URL(u).protocol !== wsScheme),
      [],
      `${who}: sockets not on ${wsScheme}`,
    );
    assert.deepEqual(w.foreign(), [], `${who}: requests to another origin`);
    assert.deepEqual(w.pageErrors, [], `${who}: uncaught errors`);
    assert.deepEqual(w.dialogs, [], `${who}: dialogs`);
  }
  assert.deepEqual(wA.consoleErrors, [], "alice: console errors");
});

test("an expired session is reported on the next action", STEP, async () => {
  const s = await startServer(["--session-ttl", "1s"]);
  servers.push(s);
  const { page: C, w } = await newPage(s.url);
  await C.goto(s.url + "/");
  await pickName(C, "carol");
  await C.waitForSelector("#view-lobby:not([hidden])");
  await C.waitForTimeout(2_500); // > --session-ttl, with no use in between
  await C.click("#create-room");
  await C.waitForFunction(() => /session expired/i.test(document.getElementById("status").textContent), null, {
    timeout: 5_000,
  });
  assert.equal(await C.getAttribute("#status", "data-kind"), "error");
  await C.waitForSelector("#view-name:not([hidden])");
  assert.equal(await C.isHidden("#whoami"), true, "signed out");
  assert.equal(await C.inputValue("#name"), "carol", "the old name is offered again");
  await shot(C, "chat-10-session-expired");
  // Picking a name again works.
  await C.click("#start");
  await C.waitForSelector("#view-lobby:not([hidden])");
  assert.equal(await C.textContent("#status"), "");
  assert.deepEqual(w.pageErrors, []);
  assert.deepEqual(w.foreign(), []);
});

test("README screenshot of the chat view (1000x650)", STEP, async () => {
  const { page: P } = await newPage(base);
  const { page: Q } = await newPage(base);
  await P.goto(base + "/");
  await pickName(P, "alice");
  await P.click("#create-room");
  await waitInRoom(P);
  const link = (await P.textContent("#share-link")).trim();
  await Q.goto(link);
  await pickName(Q, "bob");
  await waitInRoom(Q);
  const talk = [
    [P, "Hi bob! This room is brand new, share the link with anyone."],
    [Q, "Hey alice, I joined from the link, no sign-up needed."],
    [Q, "How long does the room stay around?"],
    [P, "Until two minutes after the last person leaves. History goes with it."],
    [Q, "Perfect for a quick chat. Typing indicators work too, look:"],
  ];
  for (const [page, text] of talk) {
    await page.fill("#message", text);
    await page.press("#message", "Enter");
    await waitForChat(P, text);
    await waitForChat(Q, text);
  }
  await Q.locator("#message").pressSequentially("nice", { delay: 30 });
  await P.waitForFunction(() => /bob is typing/.test(document.getElementById("typing").textContent));
  await P.mouse.move(0, 0);
  await P.evaluate(() => document.activeElement && document.activeElement.blur());
  const out = path.join(SHOTS, "chat-readme.png");
  await P.screenshot({ path: out });
  const size = statSync(out).size;
  assert.ok(size < 200 * 1024, `screenshot is ${size} bytes (limit 200 KiB)`);
  if (process.env.UPDATE_DOCS_SCREENSHOT === "1") {
    copyFileSync(out, path.join(REPO, "docs", "screenshot.png"));
  }
  await Q.fill("#message", "");
});
