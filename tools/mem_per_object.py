#!/usr/bin/env python3
"""Measures chatloop's memory per session and per (empty) room: starts a release server on a
free loopback port, creates sessions and rooms over one keep-alive connection and reads the
server's VmRSS before and after. Usage: tools/mem_per_object.py [sessions] [rooms]"""
import http.client
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SESSIONS = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
ROOMS = int(sys.argv[2]) if len(sys.argv) > 2 else 20_000

# One client creating everything: the per-address and per-session budgets are off.
server = subprocess.Popen([os.path.join(ROOT, "target/release/chatloop"), "--port", "0",
                           "--create-rate", "0", "--max-rooms-per-session", "0"],
                          stderr=subprocess.PIPE, text=True)
try:
    port = None
    for line in server.stderr:
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if m:
            port = int(m.group(1))
            break
    if port is None:
        sys.exit("chatloop did not start")

    def rss():
        with open(f"/proc/{server.pid}/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def post(path, body=None, token=None):
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = "Bearer " + token
        conn.request("POST", path, body=body, headers=headers)
        return json.loads(conn.getresponse().read())

    r0 = rss()
    sids = [post("/sessions", json.dumps({"username": "user%06d" % i}))["session_id"] for i in range(SESSIONS)]
    r1 = rss()
    for i in range(ROOMS):
        post("/rooms", None, sids[i % len(sids)])
    r2 = rss()
    print(f"RSS {r0} B at start; {SESSIONS} sessions: +{(r1 - r0) / SESSIONS:.0f} B each; "
          f"{ROOMS} empty rooms: +{(r2 - r1) / ROOMS:.0f} B each")
finally:
    server.terminate()
    server.wait(timeout=5)
