"""Shared by the Python tools (tools/mem_storm.py, tools/mem_per_object.py): start a chatloop
on a free loopback port, read its memory, and talk JSON to its REST API over one keep-alive
connection. Import it with `sys.path.insert(0, os.path.join(TOOLS, "lib"))`."""
import http.client
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def start(args, binary=None):
    """Starts `binary` (default: target/release/chatloop) with `--port 0` and `args`; returns
    the process and its port once it logs that it listens, or exits when it never does."""
    binary = binary or os.path.join(ROOT, "target/release/chatloop")
    server = subprocess.Popen([binary, "--port", "0"] + list(args),
                              stderr=subprocess.PIPE, text=True)
    for line in server.stderr:
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if m:
            return server, int(m.group(1))
    server.wait(timeout=5)
    sys.exit("chatloop did not start")


def rss(pid, field="VmRSS"):
    """The process's `field` from /proc/PID/status (VmRSS, RssAnon, ...), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))


class Rest:
    """One keep-alive HTTP connection to the server's REST API."""

    def __init__(self, port):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def post(self, path, body=None, token=None):
        """POSTs `body` (a JSON string or None) with an optional bearer token; returns the
        parsed JSON answer, or raises on a status of 300 or more."""
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = "Bearer " + token
        self.conn.request("POST", path, body=body, headers=headers)
        r = self.conn.getresponse()
        data = r.read()
        if r.status >= 300:
            raise RuntimeError(f"POST {path}: {r.status} {data[:200]!r}")
        return json.loads(data)

    def delete(self, path, token):
        """DELETEs `path` with a bearer token; the answer is read and dropped."""
        self.conn.request("DELETE", path, headers={"Authorization": "Bearer " + token})
        self.conn.getresponse().read()

    def close(self):
        self.conn.close()
