//! Memory-only, provably: a whole scenario (sessions, public and private rooms, a rotated
//! invite, a message TTL expiry, chat, typing, history, room and
//! session expiry, session end, shutdown) runs under `strace -f`, and the test fails on any
//! file opened for writing, any write to a file, any file created, renamed or removed, and on
//! any log line (at `trace`, the most verbose level) that contains a username or chat text.
//! It also checks that the process allows no core file (`RLIMIT_CORE` 0, non-dumpable).
//!
//! Needs `strace` (Debian package; `tools/test.sh` installs it).
mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{Server, bearer, wait_for};

const SYSCALLS: &str = "trace=open,openat,openat2,creat,truncate,ftruncate,rename,renameat,\
renameat2,unlink,unlinkat,mkdir,mkdirat,link,linkat,symlink,symlinkat,write,writev,pwrite64,\
pwritev,pwritev2,sendfile,copy_file_range,splice";

/// The pid of `parent`'s first child process (the server under strace).
fn child_of(parent: u32) -> Option<u32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may contain spaces, so split after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) {
            return Some(pid);
        }
    }
    None
}

/// Every line of the trace that touches a file for writing, with the reason.
fn file_writes(trace: &str) -> Vec<String> {
    let mut bad = Vec::new();
    for line in trace.lines() {
        let call = line
            .split_once(' ')
            .map(|(_, rest)| rest.trim_start())
            .unwrap_or(line);
        let name = call.split('(').next().unwrap_or("");
        let why = match name {
            "open" | "openat" | "openat2" => {
                let flags = ["O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND"];
                flags
                    .iter()
                    .any(|f| call.contains(f))
                    .then_some("opened for writing")
            }
            "write" | "writev" | "pwrite64" | "pwritev" | "pwritev2" | "sendfile"
            | "copy_file_range" | "splice" => {
                // With -y the descriptor is annotated: `3<pipe:[..]>`, `7<TCP:[..]>`,
                // `5<anon_inode:[eventfd]>`, or `4</path/of/a/file>` for a file.
                let args = call.split_once('(').map(|(_, a)| a).unwrap_or("");
                args.split(',')
                    .next()
                    .is_some_and(|fd| fd.contains("</"))
                    .then_some("wrote to a file")
            }
            "creat" | "truncate" | "ftruncate" | "rename" | "renameat" | "renameat2" | "unlink"
            | "unlinkat" | "mkdir" | "mkdirat" | "link" | "linkat" | "symlink" | "symlinkat" => {
                Some("changed the file system")
            }
            _ => None,
        };
        if let Some(why) = why {
            bad.push(format!("{why}: {line}"));
        }
    }
    bad
}

#[test]
fn a_whole_scenario_writes_no_file_and_logs_no_user_text() {
    let strace_ok = std::process::Command::new("strace")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        strace_ok,
        "strace is needed for this test (apt-get install strace; tools/test.sh does it)"
    );
    let dir = std::env::temp_dir().join(format!("chatloop-memonly-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let trace_path = dir.join("trace.txt");
    let trace_arg = trace_path.to_string_lossy().to_string();
    let mut s = Server::start_wrapped(
        &[
            "strace", "-f", "-qq", "-y", "-s", "0", "-e", SYSCALLS, "-o", &trace_arg,
        ],
        &[
            "--log-level",
            "trace",
            "--room-ttl",
            "1s",
            "--session-ttl",
            "2s",
            "--notice-delay",
            "0",
            "--min-message-ttl",
            "1s",
        ],
    );
    let server_pid = wait_for(Duration::from_secs(5), || child_of(s.pid()).is_some())
        .and_then(|_| child_of(s.pid()))
        .expect("the server runs as strace's child");

    // No core file: the limit is zero and the process is not dumpable.
    let limits = std::fs::read_to_string(format!("/proc/{server_pid}/limits")).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap_or_default();
    assert!(
        core.split_whitespace().filter(|w| *w == "0").count() >= 2,
        "core file size is not 0/0: {core}"
    );

    // What users send: every name and text is unique, so any trace of it is found.
    let tag = format!("{:08x}", std::process::id().wrapping_mul(2_654_435_761));
    let names = [
        format!("Alice{tag}"),
        format!("Bob{tag}"),
        format!("Carol{tag}"),
    ];
    let texts = [
        format!("first secret {tag}"),
        format!("second secret {tag}"),
        format!("third secret {tag}"),
        format!("fourth secret {tag}"),
    ];
    let (alice, _) = s.session(&names[0]);
    let (bob, _) = s.session(&names[1]);
    let room = s.room(&alice);
    let (mut wa, _) = s.join(&room, &alice);
    let (mut wb, welcome) = s.join(&room, &bob);
    assert_eq!(welcome["type"], "welcome");
    wa.chat_roundtrip(&texts[0]);
    wb.recv_chat(&texts[0]);
    wb.send_json(serde_json::json!({ "type": "typing" }));
    wa.recv_type("typing");
    wb.chat_roundtrip(&texts[1]);
    wa.recv_chat(&texts[1]);
    // Bad input too: an invalid frame and an over-long message are answered, not logged.
    wa.send_text(&format!("not json {}", texts[2]));
    wa.recv_type("error");
    let history = s
        .http()
        .get(&format!("/rooms/{room}/messages"), Some(&alice));
    assert_eq!(history.status, 200);
    assert!(history.text().contains(&texts[1]));
    // A private room with disappearing messages: join with the invite, chat, rotate the
    // invite, wait for the message to expire.
    let r = s.http().post_json(
        "/rooms",
        r#"{"private": true, "message_ttl": 1}"#,
        Some(&alice),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let private = r.json()["room_id"].as_str().unwrap().to_string();
    let invite = r.json()["invite"].as_str().unwrap().to_string();
    let join = s.http().post_json(
        &format!("/rooms/{private}/join"),
        &serde_json::json!({ "invite": invite }).to_string(),
        Some(&bob),
    );
    assert_eq!(join.status, 200, "{}", join.text());
    let (mut pa, _) = s.join(&private, &alice);
    let (mut pb, _) = s.join(&private, &bob);
    pa.chat_roundtrip(&texts[3]);
    pb.recv_chat(&texts[3]);
    let rotated = s
        .http()
        .call("POST", &format!("/rooms/{private}/invite"), Some(&bob));
    assert_eq!(rotated.status, 200, "{}", rotated.text());
    let new_invite = rotated.json()["invite"].as_str().unwrap().to_string();
    pa.recv_type("expired");
    let left = s
        .http()
        .get(&format!("/rooms/{private}/messages"), Some(&alice));
    assert!(!left.text().contains(&texts[3]), "{}", left.text());
    drop((pa, pb));
    drop(wa);
    drop(wb);
    // The room expires 1 s after its last connection closes.
    let gone = wait_for(Duration::from_secs(5), || {
        s.http().get(&format!("/rooms/{room}"), Some(&bob)).status == 404
    });
    assert!(gone.is_some(), "the room did not expire");
    // A session expires 2 s after its last use; another is ended by its owner.
    let (carol, _) = s.session(&names[2]);
    // Every use slides the expiry, so look only once, well after it.
    std::thread::sleep(Duration::from_millis(3_000));
    let me = s.http().get("/sessions/me", Some(&carol));
    assert_eq!(me.status, 401, "the session did not expire: {}", me.text());
    let (erin, _) = s.session("Erin");
    let end = s.http().request(
        "DELETE",
        "/sessions/me",
        &[("Authorization", &bearer(&erin))],
        None,
    );
    assert_eq!(end.status, 200, "{}", end.text());
    // A room still open at shutdown.
    let (dave, _) = s.session("Dave");
    let room2 = s.room(&dave);
    let (mut wd, _) = s.join(&room2, &dave);
    wd.chat_roundtrip(&texts[2]);

    // Shut down with SIGTERM (to the server itself; strace then exits with it).
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &server_pid.to_string()])
        .status();
    let exited = s.signal_and_wait("0", Duration::from_secs(5));
    assert!(
        exited.is_some(),
        "strace did not exit after the server's shutdown"
    );

    let trace = std::fs::read_to_string(&trace_path).expect("strace wrote its trace");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        trace.contains("write") || trace.contains("writev"),
        "the trace saw no writes at all, so it traced nothing:\n{trace}"
    );
    let bad = file_writes(&trace);
    assert!(bad.is_empty(), "file writes:\n{}", bad.join("\n"));

    let log = s.log();
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "not a verbose log:\n{log}"
    );
    let mut leaked = HashSet::new();
    let invites = [invite, new_invite];
    for secret in names.iter().chain(texts.iter()).chain(invites.iter()) {
        if log.contains(secret.as_str()) {
            leaked.insert(secret.clone());
        }
    }
    assert!(leaked.is_empty(), "the log contains {leaked:?}:\n{log}");
}

#[test]
fn the_trace_check_finds_file_writes() {
    // The checker itself must be able to fail.
    let trace = "\
1 openat(AT_FDCWD</>, \"/etc/ld.so.cache\", O_RDONLY|O_CLOEXEC) = 3</etc/ld.so.cache>
1 writev(7<TCP:[127.0.0.1:1->127.0.0.1:2]>, [...], 2) = 100
1 write(2<pipe:[123]>, \"...\"..., 40) = 40
1 openat(AT_FDCWD</>, \"/tmp/x\", O_WRONLY|O_CREAT|O_TRUNC, 0666) = 4</tmp/x>
1 write(4</tmp/x>, \"...\"..., 5) = 5
1 unlink(\"/tmp/y\") = 0";
    let bad = file_writes(trace);
    assert_eq!(bad.len(), 3, "{bad:?}");
}

#[test]
fn lock_memory_locks_the_pages() {
    let s = Server::start(&["--lock-memory"]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", s.pid())).unwrap();
    let locked_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmLck in /proc/PID/status");
    assert!(locked_kb > 0, "nothing locked:\n{status}");
    assert!(s.log().contains("memory locked"), "{}", s.log());
}
