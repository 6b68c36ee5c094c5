#!/usr/bin/env python3
"""Measures chatloop's memory per session and per (empty) room: starts a release server on a
free loopback port, creates sessions and rooms over one keep-alive connection and reads the
server's VmRSS before and after. Usage: tools/mem_per_object.py [sessions] [rooms]
(CHATLOOP_BIN picks another binary, e.g. an older build to compare with)."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
import chatloop  # noqa: E402 (tools/lib/chatloop.py)

SESSIONS = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
ROOMS = int(sys.argv[2]) if len(sys.argv) > 2 else 20_000

# One client creating everything: the per-address and per-session budgets are off.
server, port = chatloop.start(
    ["--create-rate", "0", "--max-rooms-per-session", "0"], os.environ.get("CHATLOOP_BIN")
)
try:
    def rss():
        return chatloop.rss(server.pid)

    post = chatloop.Rest(port).post

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
