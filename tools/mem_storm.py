#!/usr/bin/env python3
"""Does memory come back after a storm? Starts a release server on a free loopback port with
a 2 s room lifetime, reads its VmRSS idle, then runs a storm: SESSIONS sessions, ROOMS rooms
each given HISTORY chat messages over a WebSocket, and one room with MEMBERS members at once.
Then every socket closes, every session is ended (DELETE /sessions/me), the rooms expire, and
VmRSS is read again, every second for a while. Prints the idle baseline, the peak and the final figure (and their ratio).

Usage: tools/mem_storm.py [sessions] [rooms] [history] [members] [extra chatloop args...]
Defaults: 50000 20000 10 1000. Runs target/release/chatloop (cargo build --release) or
$CHATLOOP_BIN.
"""
import base64
import json
import os
import socket
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
import chatloop  # noqa: E402 (tools/lib/chatloop.py)

ARGS = sys.argv[1:]
SESSIONS = int(ARGS[0]) if len(ARGS) > 0 else 50_000
ROOMS = int(ARGS[1]) if len(ARGS) > 1 else 20_000
HISTORY = int(ARGS[2]) if len(ARGS) > 2 else 10
MEMBERS = int(ARGS[3]) if len(ARGS) > 3 else 1000
EXTRA = ARGS[4:]
ROOM_TTL = 2

ARGV = ["--room-ttl", f"{ROOM_TTL}s",
        "--create-rate", "0", "--chat-rate", "100000", "--chat-burst", "100000",
        "--max-connections", "5000", "--max-connections-per-ip", "0", "--upgrade-rate", "0",
        "--max-rooms-per-session", "0"] + EXTRA
server, port = chatloop.start(ARGV, os.environ.get("CHATLOOP_BIN"))


def rss(field="VmRSS"):
    return chatloop.rss(server.pid, field)


def ws_connect(port, room, sid):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET /ws/{room}?session_id={sid} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            raise RuntimeError("closed during the upgrade")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(head.split(b"\r\n")[0].decode())
    return s


def ws_send(s, text):
    data = text.encode()
    mask = os.urandom(4)
    n = len(data)
    hdr = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n))
    s.sendall(hdr + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))


def drain(s):
    s.setblocking(False)
    try:
        while s.recv(65536):
            pass
    except (BlockingIOError, ConnectionError):
        pass
    s.setblocking(True)


try:
    # The log is not read from here on: send it nowhere so the pipe never fills.
    subprocess.Popen(["cat"], stdin=server.stderr, stdout=subprocess.DEVNULL)

    rest = chatloop.Rest(port)
    post = rest.post

    time.sleep(0.5)
    idle, idle_anon = rss(), rss("RssAnon")
    t0 = time.time()
    sids = [post("/sessions", json.dumps({"username": "user%06d" % i}))["session_id"]
            for i in range(SESSIONS)]
    text = "storm message " + "x" * 100
    for i in range(ROOMS):
        sid = sids[i % len(sids)]
        room = post("/rooms", None, sid)["room_id"]
        s = ws_connect(port, room, sid)
        for _ in range(HISTORY):
            ws_send(s, json.dumps({"type": "chat", "message": text}))
        drain(s)
        s.close()
    owner = sids[0]
    big = post("/rooms", None, owner)["room_id"]
    members = []
    for i in range(MEMBERS):
        sid = sids[(i + 1) % len(sids)]
        post(f"/rooms/{big}/join", "{}", sid)
        members.append(ws_connect(port, big, sid))
        if i % 50 == 0:
            for m in members:
                drain(m)
    for m in members[:20]:
        ws_send(m, json.dumps({"type": "chat", "message": text}))
    time.sleep(0.5)
    for m in members:
        drain(m)
    peak, peak_anon = rss(), rss("RssAnon")
    storm = time.time() - t0
    for m in members:
        m.close()
    # The storm ends: its sessions are ended by their owners, its rooms expire.
    for sid in sids:
        rest.delete("/sessions/me", sid)
    rest.close()
    finals = []
    for _ in range(ROOM_TTL + 14):
        time.sleep(1)
        finals.append(rss())
    final, final_anon = finals[-1], rss("RssAnon")
    print(f"storm: {SESSIONS} sessions, {ROOMS} rooms x {HISTORY} messages, one room of "
          f"{MEMBERS} members, in {storm:.1f} s")
    print(f"RSS idle {idle / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB, "
          f"after expiry {final / 2**20:.1f} MiB ({final / idle:.2f}x idle)")
    print(f"of which anonymous (the heap; the rest is the binary's pages): idle "
          f"{idle_anon / 2**20:.1f} MiB, peak {peak_anon / 2**20:.1f} MiB, after expiry "
          f"{final_anon / 2**20:.1f} MiB ({final_anon / idle_anon:.2f}x idle)")
    print("RSS each second after the storm (MiB): "
          + " ".join(f"{r / 2**20:.1f}" for r in finals))
    hold = float(os.environ.get("MEM_STORM_HOLD", "0"))
    if hold:
        print(f"holding the server (pid {server.pid}) for {hold:.0f} s", flush=True)
        time.sleep(hold)
finally:
    server.terminate()
    server.wait(timeout=5)
