"""Used by tools/suites/openapi.sh: the documented answers of GET /ws/{room_id} to good and bad
upgrade requests (docs/API.md: "Not a valid upgrade request: 400 / 426"; unknown session 403;
unknown room 404; RFC 6455 section 4.2.1), one raw HTTP request per case, 127.0.0.1 only.

Usage: ws_upgrade_probe.py PORT ROOM_ID SESSION_ID
Prints one PASS/FAIL line per case on stderr and "OK BAD" (counts) on stdout.
"""

import socket
import sys

NO_SESSION = "00000000-0000-4000-8000-000000000000"
KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def main() -> None:
    port, room, sid = int(sys.argv[1]), sys.argv[2], sys.argv[3]

    def hs(connection="Upgrade", upgrade="websocket", version="13", key=KEY, room=room, sid=sid):
        headers = {"Host": f"127.0.0.1:{port}"}
        for name, value in (
            ("Connection", connection),
            ("Upgrade", upgrade),
            ("Sec-WebSocket-Version", version),
            ("Sec-WebSocket-Key", key),
        ):
            if value is not None:
                headers[name] = value
        return f"/ws/{room}?session_id={sid}", headers

    cases = [
        # (what, (target, headers), allowed statuses)
        ("a valid handshake is accepted", hs(), {101}),
        ("Connection: Upgrade is case-insensitive, in a list", hs(connection="keep-alive, upgrade"), {101}),
        ("Connection without the Upgrade token is refused", hs(connection="keep-alive"), {400, 426}),
        ("no Connection header is refused", hs(connection=None), {400, 426}),
        ("no Upgrade header is refused", hs(upgrade=None), {400, 426}),
        ("Sec-WebSocket-Version 8 is refused", hs(version="8"), {426}),
        ("an invalid Sec-WebSocket-Key is refused", hs(key="short"), {400}),
        ("an unknown session is refused", hs(sid=NO_SESSION), {403}),
        ("an unknown room is refused", hs(room="0000000000"), {404}),
    ]
    ok = bad = 0
    for what, (target, headers), allowed in cases:
        head = f"GET {target} HTTP/1.1\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.settimeout(5)
                s.sendall(head.encode())
                line = s.makefile("rb").readline().decode("latin-1").strip()
            status = int(line.split()[1])
        except Exception as e:  # noqa: BLE001 - any failure is a FAIL line
            status, line = None, f"{type(e).__name__}: {e}"
        if status in allowed:
            ok += 1
            print(f"[openapi] PASS GET /ws: {what} ({status})", file=sys.stderr)
        else:
            bad += 1
            shown = ", ".join(f"{k}: {v}" for k, v in headers.items() if k != "Host")
            path = target.split("?")[0]
            print(
                f"[openapi] FAIL GET /ws: {what}: GET {path}?session_id=<live> [{shown}] "
                f"answered {line!r}, expected {sorted(allowed)}",
                file=sys.stderr,
            )
    print(ok, bad)


if __name__ == "__main__":
    main()
