//! Settings that do not fit their type are refused at start, never truncated: before,
//! `--chat-rate 4294967297` ran with a chat rate of 1 (the value modulo 2^32).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The binary under test (`CHATLOOP_TEST_BIN` to run an older build), as in tests/common.
fn bin() -> String {
    std::env::var("CHATLOOP_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_chatloop").into())
}

/// Runs `chatloop --port 0 <args>`: `Some(stderr)` if it exited (within 10 s) with an error,
/// `None` if it started serving (then it is killed) or exited cleanly.
fn refusal(args: &[&str]) -> Option<String> {
    let mut child = Command::new(bin())
        .args(["--host", "127.0.0.1", "--port", "0"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            return (!status.success()).then_some(err);
        }
        if Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn rates_and_bursts_too_large_for_their_type_are_refused() {
    for flag in [
        "--chat-rate",
        "--chat-burst",
        "--upgrade-rate",
        "--upgrade-burst",
        "--create-rate",
        "--create-burst",
    ] {
        let err = refusal(&[flag, "4294967297"])
            .unwrap_or_else(|| panic!("{flag} 4294967297 was taken (truncated?)"));
        assert!(
            err.contains(flag) && err.contains("too large"),
            "{flag}: {err}"
        );
    }
}
