// The API docs page (GET /docs) in a real browser: it renders every operation of /openapi.json,
// logs no error, and makes no request to another origin.
// Run by tools/suites/browser.sh; alone: `node --test docs.test.mjs` (starts its own server).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import path from "node:path";
import { SHOTS, launchBrowser, shot, startServer, watch } from "./lib.mjs";

const METHODS = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];
let base, server, browser, ctx;

before(async () => {
  if (process.env.CHATLOOP_URL) {
    base = process.env.CHATLOOP_URL.replace(/\/$/, "");
  } else {
    server = await startServer();
    base = server.url;
  }
  browser = await launchBrowser();
});

after(async () => {
  if (ctx) await ctx.close().catch(() => {});
  if (browser) await browser.close().catch(() => {});
  if (server) await server.stop();
});

test("/docs renders every operation of /openapi.json, self-contained and error-free", { timeout: 45_000 }, async () => {
  const res = await fetch(base + "/openapi.json", { signal: AbortSignal.timeout(10_000) });
  assert.equal(res.status, 200);
  assert.match(res.headers.get("content-type") || "", /^application\/json/);
  const spec = await res.json();
  assert.match(spec.openapi, /^3\.1\./);
  const expected = [];
  for (const [p, item] of Object.entries(spec.paths || {})) {
    for (const m of Object.keys(item)) if (METHODS.includes(m)) expected.push(m + " " + p);
  }
  expected.sort();
  assert.ok(expected.length >= 10, `the document lists ${expected.length} operations`);

  ctx = await browser.newContext({ viewport: { width: 1200, height: 800 }, colorScheme: "light" });
  const page = await ctx.newPage();
  page.setDefaultTimeout(10_000);
  const w = watch(page, base);
  const resp = await page.goto(base + "/docs");
  assert.equal(resp.status(), 200);
  assert.match(resp.headers()["content-type"] || "", /^text\/html/);
  await page.waitForSelector("body[data-loaded]");
  assert.equal(await page.getAttribute("body", "data-loaded"), "true", await page.textContent("#status"));

  const shown = await page.$$eval("section.op", (els) =>
    els.map((e) => e.dataset.method.toLowerCase() + " " + e.dataset.path),
  );
  assert.equal(new Set(shown).size, shown.length, "no operation is rendered twice");
  assert.deepEqual([...shown].sort(), expected, "rendered operations == operations in /openapi.json");
  // every operation card shows its method and path
  const heads = await page.$$eval("section.op", (els) =>
    els.map((e) => ({
      want: e.dataset.method.toUpperCase() + " " + e.dataset.path,
      got: e.querySelector(".method").textContent + " " + e.querySelector(".op-path").textContent,
    })),
  );
  for (const h of heads) assert.equal(h.got, h.want);
  // schemas section renders every component schema
  const schemas = Object.keys((spec.components && spec.components.schemas) || {});
  const text = await page.textContent("#schemas-section");
  for (const s of schemas) assert.ok(text.includes(s), `schema ${s} is rendered`);

  await page.waitForTimeout(300);
  await shot(page, "docs-top");
  await page.screenshot({ path: path.join(SHOTS, "docs-full.jpg"), fullPage: true, type: "jpeg", quality: 70 });

  assert.ok(w.requests.some((u) => u === base + "/openapi.json"), "the page loaded /openapi.json");
  assert.deepEqual(w.foreign(), [], "requests to another origin");
  assert.deepEqual(w.consoleErrors, [], "console errors");
  assert.deepEqual(w.pageErrors, [], "uncaught errors");
  assert.deepEqual(w.dialogs, [], "dialogs");
});
