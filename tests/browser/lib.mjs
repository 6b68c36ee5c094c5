// Shared helpers of the browser tests (chat.test.mjs, docs.test.mjs).
//
// Environment:
//   CHATLOOP_URL   base URL of a running server (tools/suites/browser.sh starts one with
//                  --typing-quiet 1s); when unset, each test file starts its own server.
//   CHATLOOP_BIN   the server binary (default target/release/chatloop), for tests that need a
//                  server with other flags (e.g. --session-ttl 1s).
//   CHROMIUM       the browser (default /usr/bin/chromium); never downloaded.
//   CHATLOOP_TLS_CERT, CHATLOOP_TLS_KEY  the https run (tools/suites/browser.sh): servers this
//                  process starts get --tls-cert/--tls-key (chatloop also reads these two
//                  variables itself), and Chromium ignores certificate errors (the test
//                  certificate is self-signed), so pages load over https and open wss://.
//   SCREENSHOT_DIR where screenshots go (default artifacts/screenshots).
//   UPDATE_DOCS_SCREENSHOT=1  also rewrite docs/screenshot.png (the README picture).
import { spawn } from "node:child_process";
import { mkdirSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");
export const BIN = process.env.CHATLOOP_BIN || path.join(REPO, "target", "release", "chatloop");
export const SHOTS = process.env.SCREENSHOT_DIR || path.join(REPO, "artifacts", "screenshots");
mkdirSync(SHOTS, { recursive: true });

export const TLS = Boolean(process.env.CHATLOOP_TLS_CERT && process.env.CHATLOOP_TLS_KEY);

export const CHROMIUM_ARGS = [
  ...(TLS ? ["--ignore-certificate-errors"] : []),
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

export function launchBrowser() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: CHROMIUM_ARGS,
    timeout: 30_000,
  });
}

// Servers started by this process; killed if it exits without stopping them (a failed
// before() hook, a timeout), so no test leaves a server behind.
const live = new Set();
process.on("exit", () => {
  for (const p of live) p.kill("SIGKILL");
});

// Starts the server binary on 127.0.0.1 with a free port; resolves to {url, proc, stop()}.
// The port is read from the "listening on http(s)://127.0.0.1:PORT" line on stderr (bounded
// wait). In the https run the server inherits CHATLOOP_TLS_CERT/KEY from the environment.
export function startServer(extraArgs = []) {
  return new Promise((resolve, reject) => {
    const proc = spawn(BIN, ["--host", "127.0.0.1", "--port", "0", ...extraArgs], {
      stdio: ["ignore", "ignore", "pipe"],
    });
    live.add(proc);
    proc.on("exit", () => live.delete(proc));
    let buf = "";
    let done = false;
    const timer = setTimeout(() => {
      if (done) return;
      done = true;
      proc.kill("SIGKILL");
      reject(new Error("server did not print its port within 15 s; stderr:\n" + buf));
    }, 15_000);
    proc.on("error", (err) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      reject(err);
    });
    proc.on("exit", (code, sig) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      reject(new Error(`server exited early (code ${code}, signal ${sig}); stderr:\n${buf}`));
    });
    proc.stderr.on("data", (chunk) => {
      buf += chunk.toString();
      if (buf.length > 65536) buf = buf.slice(-65536);
      const m = /listening on (https?:\/\/127\.0\.0\.1:\d+)/.exec(buf);
      if (m && !done) {
        done = true;
        clearTimeout(timer);
        const stop = () =>
          new Promise((res) => {
            if (proc.exitCode !== null || proc.signalCode !== null) return res();
            const t = setTimeout(() => proc.kill("SIGKILL"), 5_000);
            proc.once("exit", () => {
              clearTimeout(t);
              res();
            });
            proc.kill("SIGTERM");
          });
        resolve({ url: m[1], proc, stop });
      }
    });
  });
}

export async function shot(page, name) {
  await page.screenshot({ path: path.join(SHOTS, name + ".png") });
}

// Records everything a page does that a test may want to assert on.
export function watch(page, origin) {
  const w = { requests: [], pageErrors: [], consoleErrors: [], dialogs: [] };
  page.on("request", (r) => w.requests.push(r.url()));
  page.on("pageerror", (e) => w.pageErrors.push(String(e && e.stack ? e.stack : e)));
  page.on("console", (m) => {
    if (m.type() === "error") w.consoleErrors.push(m.text());
  });
  page.on("dialog", (d) => {
    w.dialogs.push(d.type() + ": " + d.message());
    d.dismiss().catch(() => {});
  });
  w.foreign = () =>
    w.requests.filter((u) => {
      if (u.startsWith("data:") || u === "about:blank") return false;
      try {
        const o = new URL(u);
        const same = new URL(origin);
        // ws://host:port is the same origin as http://host:port for this purpose (and
        // wss:// as https://)
        const ws = same.protocol === "https:" ? "wss:" : "ws:";
        return !(o.host === same.host && (o.protocol === same.protocol || o.protocol === ws));
      } catch (_) {
        return true;
      }
    });
  return w;
}
