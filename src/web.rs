//! The pages the server ships (the demo chat page, the API docs page, the OpenAPI document)
//! and the security headers every HTML answer carries.
//!
//! Both pages are self-contained: one inline `<style>` and one inline `<script>` each, no
//! other origin. So their Content-Security-Policy allows nothing but those exact inline
//! blocks (by SHA-256 hash, computed here from the pages themselves, so an edited page can
//! never drift from its policy), requests to the page's own origin (REST and the WebSocket),
//! and the `data:` favicon. No framing (`frame-ancestors 'none'`, `X-Frame-Options` for old
//! browsers), no `<base>`, no form posts.

use std::sync::OnceLock;

use sha2::{Digest, Sha256};

/// The demo chat page, served at `/`.
pub const INDEX_HTML: &str = include_str!("web/index.html");
/// The API documentation page, served at `/docs`.
pub const DOCS_HTML: &str = include_str!("web/docs.html");
/// The OpenAPI 3 document of the REST API, served at `/openapi.json`.
pub const OPENAPI_JSON: &str = include_str!("web/openapi.json");

/// Complete header lines (`Name: value\r\n`) for every `text/html` response.
pub fn html_headers() -> &'static str {
    static HEADERS: OnceLock<String> = OnceLock::new();
    HEADERS.get_or_init(|| {
        format!(
            "Content-Security-Policy: {}\r\nX-Frame-Options: DENY\r\n",
            content_security_policy(&[INDEX_HTML, DOCS_HTML])
        )
    })
}

/// The policy that lets `pages` run and nothing else.
pub fn content_security_policy(pages: &[&str]) -> String {
    let hashes = |tag: &str| {
        let mut v: Vec<String> = pages
            .iter()
            .flat_map(|p| inline_blocks(p, tag))
            .map(|b| format!("'sha256-{}'", base64(&Sha256::digest(b.as_bytes()))))
            .collect();
        v.dedup();
        if v.is_empty() {
            "'none'".to_string()
        } else {
            v.join(" ")
        }
    };
    format!(
        "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; img-src data:; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        hashes("script"),
        hashes("style")
    )
}

/// The text of each inline `<tag>...</tag>` element of `html` (elements with a `src` are
/// not inline and are skipped).
fn inline_blocks<'a>(html: &'a str, tag: &str) -> Vec<&'a str> {
    let open = format!("<{tag}");
    let close = format!("</{tag}");
    let mut out = Vec::new();
    let mut rest = html;
    while let Some(at) = rest.find(&open) {
        let after = &rest[at + open.len()..];
        // `<scriptx` is another element; `<script>` or `<script ...>` is ours.
        if !after.starts_with(['>', ' ', '\t', '\n', '\r']) {
            rest = after;
            continue;
        }
        let Some(gt) = after.find('>') else { break };
        let attrs = &after[..gt];
        let body = &after[gt + 1..];
        let Some(end) = body.find(&close) else { break };
        if !attrs.contains("src=") {
            out.push(&body[..end]);
        }
        rest = &body[end..];
    }
    out
}

/// Standard base64 with padding.
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(c.get(1).copied().unwrap_or(0)) << 8)
            | u32::from(c.get(2).copied().unwrap_or(0));
        for i in 0..4 {
            if i <= c.len() {
                s.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_and_sha256_match_the_known_values() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        // The CSP spec's own example: sha256 of `alert('Hello, world.');`.
        assert_eq!(
            base64(&Sha256::digest(b"alert('Hello, world.');")),
            "qznLcsROx4GACP2dm0UCKCzCG+HiZ1guq6ZZDob/Tng="
        );
    }

    #[test]
    fn the_policy_names_exactly_the_inline_blocks() {
        let page = "<html><head><style>a{}</style><script src=\"x.js\"></script>\
                    <scripts></scripts></head><body><script>one()</script>\
                    <script type=\"module\">two()</script></body></html>";
        assert_eq!(inline_blocks(page, "script"), ["one()", "two()"]);
        assert_eq!(inline_blocks(page, "style"), ["a{}"]);
        let csp = content_security_policy(&[page]);
        let h = |s: &str| format!("'sha256-{}'", base64(&Sha256::digest(s.as_bytes())));
        assert!(
            csp.contains(&format!("script-src {} {};", h("one()"), h("two()"))),
            "{csp}"
        );
        assert!(csp.contains(&format!("style-src {};", h("a{}"))), "{csp}");
        assert!(!csp.contains("unsafe"), "{csp}");
        assert_eq!(
            content_security_policy(&["<p>static</p>"]),
            "default-src 'none'; script-src 'none'; style-src 'none'; connect-src 'self'; \
             img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        );
    }

    #[test]
    fn both_shipped_pages_have_one_inline_script_and_style_and_nothing_external() {
        for page in [INDEX_HTML, DOCS_HTML] {
            assert_eq!(inline_blocks(page, "script").len(), 1);
            assert_eq!(inline_blocks(page, "style").len(), 1);
            assert!(!page.contains("src=\"http"), "an external script or image");
            assert!(
                !page.contains("<link rel=\"stylesheet\""),
                "an external style sheet"
            );
        }
        let h = html_headers();
        assert_eq!(h.matches("'sha256-").count(), 4, "{h}");
        assert!(h.ends_with("\r\nX-Frame-Options: DENY\r\n"));
    }
}
