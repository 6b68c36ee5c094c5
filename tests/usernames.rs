//! Issue 12, finding 12 (usernames): names with invisible formatting characters that spoof
//! (bidi overrides and isolates, zero-width characters, the BOM, the rest of Unicode's Cf,
//! line separators) are refused with 400 and a clear `detail`; names in any script are not.
mod common;

use common::*;
use serde_json::json;

#[test]
fn spoofing_usernames_are_refused_with_400() {
    let s = Server::start(&[]);
    for name in [
        "alice\u{202E}gnp.exe",
        "ad\u{200B}min",
        "\u{2066}bob\u{2069}",
        "\u{FEFF}root",
        "mod\u{200D}erator",
        "eve\u{061C}",
        "x\u{180E}y",
        "ann\u{2028}a",
        "tag\u{E0041}",
    ] {
        let body = json!({ "username": name }).to_string();
        let r = s.http().post_json("/sessions", &body, None);
        assert_eq!(r.status, 400, "{name:?} was accepted: {}", r.text());
        let detail = r.json()["detail"].as_str().unwrap().to_string();
        assert!(detail.contains("formatting characters"), "{detail}");
    }
    // The bystander's names, in several scripts, are fine, and so is everything else.
    for name in ["José", "李雷", "علي", "שרה", "🙂 bob"] {
        let sid = s.session_from(BYSTANDER, name).0;
        let r = s.http_from(BYSTANDER).get("/sessions/me", Some(&sid));
        assert_eq!(r.json()["username"], name);
    }
}
