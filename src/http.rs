//! HTTP/1.1: request parsing with `httparse` under size limits, and response writing.
//!
//! Parsing borrows from the input buffer and keeps only the headers chatloop acts on.
//! Responses always carry `Date`, `Content-Length` (except 204/101, which must not) and the
//! CORS header, so that a browser client sees every error, not a CORS failure.

/// The methods chatloop routes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `GET`.
    Get,
    /// `HEAD`: answered like `GET` without the body.
    Head,
    /// `POST`.
    Post,
    /// `DELETE`.
    Delete,
    /// `OPTIONS`: the CORS preflight.
    Options,
    /// Any other method (the router answers it 405 on a known path).
    Other,
}

/// A parsed request head; the body follows in the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    /// The method.
    pub method: Method,
    /// The path, percent-escapes left as they are (`/rooms/abc`).
    pub path: &'a str,
    /// The query string after `?`, without it (empty when none).
    pub query: &'a str,
    /// `Content-Length` (0 when absent); never above the parser's `max_body`.
    pub content_length: usize,
    /// The raw `Authorization` value, if any.
    pub authorization: Option<&'a [u8]>,
    /// The connection stays open after the answer: HTTP/1.1 unless `Connection: close`, HTTP/1.0
    /// only with `Connection: keep-alive`.
    pub keep_alive: bool,
    /// `Upgrade: websocket` was asked for.
    pub upgrade: bool,
    /// `Connection` carries the `Upgrade` token (RFC 6455 section 4.2.1).
    pub connection_upgrade: bool,
    /// The raw `Sec-WebSocket-Key` (trimmed), if any.
    pub ws_key: Option<&'a [u8]>,
    /// The raw `Sec-WebSocket-Version` (trimmed), if any.
    pub ws_version: Option<&'a [u8]>,
    /// The first `permessage-deflate` offer in `Sec-WebSocket-Extensions` (over all its
    /// lines, in order) that the server can honour.
    pub ws_deflate: Option<crate::deflate::Agreed>,
    /// `Expect: 100-continue` was sent: the client waits for a `100 Continue` before the body.
    pub expect_continue: bool,
    /// `X-Forwarded-For` values, in order (the last [`MAX_FORWARDED`] header lines).
    pub forwarded_for: Forwarded<'a>,
}

/// `X-Forwarded-For` header lines kept per request. The client's address is found walking
/// from the right (`proxy::forwarded_client`), so only the last lines matter.
pub const MAX_FORWARDED: usize = 8;

/// A request's `X-Forwarded-For` values, without allocation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Forwarded<'a> {
    values: [&'a [u8]; MAX_FORWARDED],
    len: usize,
}

impl<'a> Forwarded<'a> {
    fn push(&mut self, v: &'a [u8]) {
        if self.len == MAX_FORWARDED {
            self.values.rotate_left(1);
            self.len -= 1;
        }
        self.values[self.len] = v;
        self.len += 1;
    }

    /// The values in header order.
    pub fn values(&self) -> impl DoubleEndedIterator<Item = &'a [u8]> + '_ {
        self.values[..self.len].iter().copied()
    }
}

/// A request that cannot be served; the connection is answered and closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// The head grew past `max_head` (431).
    HeadTooLarge,
    /// `Content-Length` above `max_body` (413).
    BodyTooLarge,
    /// `Transfer-Encoding` of any kind (411): only `Content-Length` bodies are read.
    Chunked,
    /// Malformed or contradictory (400), with the `detail` to send.
    BadRequest(&'static str),
    /// Not HTTP/1.0 or 1.1 (505).
    Version,
}

impl ParseError {
    /// The error response to send before closing.
    pub fn response(self) -> Response {
        match self {
            ParseError::HeadTooLarge => Response::error(431, "Request header fields too large"),
            ParseError::BodyTooLarge => Response::error(413, "Request body too large"),
            ParseError::Chunked => Response::error(
                411,
                "Chunked request bodies are not supported: send Content-Length",
            ),
            ParseError::BadRequest(why) => Response::error(400, why),
            ParseError::Version => Response::error(505, "Only HTTP/1.0 and HTTP/1.1 are supported"),
        }
    }
}

const MAX_HEADERS: usize = 64;

/// Parses a request head at the front of `buf`. `Ok(None)`: incomplete, read more.
/// On success returns the request and the length of its head (the body starts there).
pub fn parse(
    buf: &[u8],
    max_head: usize,
    max_body: usize,
) -> Result<Option<(Request<'_>, usize)>, ParseError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() > max_head {
                Err(ParseError::HeadTooLarge)
            } else {
                Ok(None)
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(ParseError::HeadTooLarge),
        Err(httparse::Error::Version) => return Err(ParseError::Version),
        Err(_) => return Err(ParseError::BadRequest("Malformed HTTP request")),
    };
    if head_len > max_head {
        return Err(ParseError::HeadTooLarge);
    }
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(ParseError::BadRequest("Malformed HTTP request"));
    };
    let method = match method {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "POST" => Method::Post,
        "DELETE" => Method::Delete,
        "OPTIONS" => Method::Options,
        _ => Method::Other,
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut r = Request {
        method,
        path,
        query,
        content_length: 0,
        authorization: None,
        keep_alive: minor == 1,
        upgrade: false,
        connection_upgrade: false,
        ws_key: None,
        ws_version: None,
        ws_deflate: None,
        expect_continue: false,
        forwarded_for: Forwarded::default(),
    };
    let mut seen_length: Option<usize> = None;
    for h in req.headers.iter() {
        let v = h.value;
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            let n = parse_length(v).ok_or(ParseError::BadRequest("Invalid Content-Length"))?;
            if seen_length.is_some_and(|s| s != n) {
                return Err(ParseError::BadRequest("Conflicting Content-Length headers"));
            }
            seen_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(ParseError::Chunked);
        } else if name.eq_ignore_ascii_case("authorization") {
            r.authorization = Some(v);
        } else if name.eq_ignore_ascii_case("connection") {
            for token in v.split(|b| *b == b',') {
                let t = token.trim_ascii();
                if t.eq_ignore_ascii_case(b"close") {
                    r.keep_alive = false;
                } else if t.eq_ignore_ascii_case(b"keep-alive") {
                    r.keep_alive = true;
                } else if t.eq_ignore_ascii_case(b"upgrade") {
                    r.connection_upgrade = true;
                }
            }
        } else if name.eq_ignore_ascii_case("upgrade") {
            r.upgrade = v
                .split(|b| *b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"websocket"));
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            r.ws_key = Some(v.trim_ascii());
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            r.ws_version = Some(v.trim_ascii());
        } else if name.eq_ignore_ascii_case("sec-websocket-extensions") {
            if r.ws_deflate.is_none() {
                r.ws_deflate = crate::deflate::negotiate(v);
            }
        } else if name.eq_ignore_ascii_case("expect") {
            r.expect_continue = v.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            r.forwarded_for.push(v);
        }
    }
    r.content_length = seen_length.unwrap_or(0);
    if r.content_length > max_body {
        return Err(ParseError::BodyTooLarge);
    }
    Ok(Some((r, head_len)))
}

fn parse_length(v: &[u8]) -> Option<usize> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// A response body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// No body.
    Empty,
    /// A body compiled into the binary (pages, the OpenAPI document), queued without a copy.
    Static(&'static [u8]),
    /// A body built for this response.
    Owned(Vec<u8>),
}

impl Body {
    fn bytes(&self) -> &[u8] {
        match self {
            Body::Empty => &[],
            Body::Static(b) => b,
            Body::Owned(b) => b,
        }
    }
}

/// A response to write. `extra` holds complete header lines (`Name: value\r\n`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The `Content-Type` (ignored for 204 and 101, which carry no body).
    pub content_type: &'static str,
    /// The body.
    pub body: Body,
    /// Complete extra header lines (`Name: value\r\n`), written as they are.
    pub extra: &'static str,
    /// A `Retry-After` header, in seconds (429, 503).
    pub retry_after: Option<u32>,
    /// Close the connection after this response (`Connection: close`).
    pub close: bool,
}

/// The JSON content type.
pub const JSON: &str = "application/json";

impl Response {
    /// A JSON response with an owned body.
    pub fn json(status: u16, body: Vec<u8>) -> Response {
        Response {
            status,
            content_type: JSON,
            body: Body::Owned(body),
            extra: "",
            retry_after: None,
            close: false,
        }
    }

    /// A response with a static body of `content_type`.
    pub fn static_body(status: u16, content_type: &'static str, body: &'static [u8]) -> Response {
        Response {
            status,
            content_type,
            body: Body::Static(body),
            extra: "",
            retry_after: None,
            close: false,
        }
    }

    /// `{"detail": "..."}` with this status.
    pub fn error(status: u16, detail: &str) -> Response {
        let mut body = Vec::with_capacity(detail.len() + 16);
        body.extend_from_slice(b"{\"detail\":");
        crate::protocol::json_str(&mut body, detail);
        body.push(b'}');
        Response::json(status, body)
    }

    /// Room for what [`write_response_parts`] writes of this response (a copied body
    /// included), so that the buffer is allocated once: the head's fixed part is under 320
    /// bytes.
    pub fn size_hint(&self) -> usize {
        let copied = match &self.body {
            Body::Owned(b) => b.len(),
            Body::Static(_) | Body::Empty => 0,
        };
        let html = if self.content_type.starts_with("text/html") {
            crate::web::html_headers().len()
        } else {
            0
        };
        320 + self.content_type.len() + self.extra.len() + html + copied
    }

    /// The same response with `extra` header lines.
    pub fn with_extra(mut self, extra: &'static str) -> Response {
        self.extra = extra;
        self
    }

    /// The same response, closing the connection after it.
    pub fn closing(mut self) -> Response {
        self.close = true;
        self
    }
}

/// Writes a response. `date` is the cached `Date` value; `head` leaves the body out.
pub fn write_response(out: &mut Vec<u8>, r: &Response, date: &[u8], keep_alive: bool, head: bool) {
    if let Some(body) = write_response_parts(out, r, date, keep_alive, head) {
        out.extend_from_slice(body);
    }
}

/// Writes a response like [`write_response`], except a static body: that is returned instead,
/// for the caller to queue after the head without copying it.
pub fn write_response_parts(
    out: &mut Vec<u8>,
    r: &Response,
    date: &[u8],
    keep_alive: bool,
    head: bool,
) -> Option<&'static [u8]> {
    let body = r.body.bytes();
    // Byte pushes, not `write!`: the formatting machinery showed in REST profiles.
    out.extend_from_slice(b"HTTP/1.1 ");
    push_decimal(out, u64::from(r.status));
    out.push(b' ');
    out.extend_from_slice(reason(r.status).as_bytes());
    out.extend_from_slice(b"\r\nDate: ");
    out.extend_from_slice(date);
    out.extend_from_slice(COMMON_HEADERS.as_bytes());
    if r.status != 204 && r.status != 101 {
        out.extend_from_slice(b"Content-Type: ");
        out.extend_from_slice(r.content_type.as_bytes());
        out.extend_from_slice(b"\r\nContent-Length: ");
        push_decimal(out, body.len() as u64);
        out.extend_from_slice(b"\r\n");
    }
    if r.content_type.starts_with("text/html") {
        out.extend_from_slice(crate::web::html_headers().as_bytes());
    }
    out.extend_from_slice(r.extra.as_bytes());
    if let Some(s) = r.retry_after {
        out.extend_from_slice(b"Retry-After: ");
        push_decimal(out, u64::from(s));
        out.extend_from_slice(b"\r\n");
    }
    if !keep_alive || r.close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if head || r.status == 204 || r.status == 101 {
        return None;
    }
    match r.body {
        Body::Static(b) => Some(b),
        _ => {
            out.extend_from_slice(body);
            None
        }
    }
}

/// Appends `n` in decimal.
pub fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[at..]);
}

/// Headers on every response: CORS (browsers may read `Retry-After` and `WWW-Authenticate`
/// too, so a web client can honour a 429 or tell a 401's cause) and no MIME sniffing.
const COMMON_HEADERS: &str = "\r\nAccess-Control-Allow-Origin: *\r\n\
Access-Control-Expose-Headers: Retry-After, WWW-Authenticate\r\n\
X-Content-Type-Options: nosniff\r\n";

/// The CORS preflight answer's extra headers.
pub const PREFLIGHT: &str = "Access-Control-Allow-Methods: GET, POST, DELETE, HEAD, OPTIONS\r\n\
Access-Control-Allow-Headers: Authorization, Content-Type\r\nAccess-Control-Max-Age: 86400\r\n";

/// The reason phrase of a status code (`Unknown` for codes chatloop never sends).
pub fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        422 => "Unprocessable Content",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// The raw value (not percent-decoded) of the first `name` parameter in `query`; `Some("")`
/// for a bare `name` without `=`.
pub fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(buf: &[u8]) -> (Request<'_>, usize) {
        parse(buf, 16 * 1024, 64 * 1024).unwrap().unwrap()
    }

    #[test]
    fn parses_a_request_with_the_headers_we_use() {
        let raw = b"POST /sessions?x=1 HTTP/1.1\r\nHost: a\r\ncontent-length: 5\r\nAuthorization: Bearer t\r\n\r\nhello";
        let (r, n) = ok(raw);
        assert_eq!(r.method, Method::Post);
        assert_eq!((r.path, r.query), ("/sessions", "x=1"));
        assert_eq!(r.content_length, 5);
        assert_eq!(r.authorization, Some(&b"Bearer t"[..]));
        assert!(r.keep_alive);
        assert_eq!(&raw[n..], b"hello");
    }

    #[test]
    fn x_forwarded_for_lines_are_kept_in_order_the_last_eight() {
        let (r, _) = ok(b"GET / HTTP/1.1\r\nX-Forwarded-For: 1.1.1.1, 2.2.2.2\r\nx-forwarded-for: 3.3.3.3\r\n\r\n");
        let v: Vec<&[u8]> = r.forwarded_for.values().collect();
        assert_eq!(v, [&b"1.1.1.1, 2.2.2.2"[..], b"3.3.3.3"]);
        let mut raw = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..12 {
            raw.extend_from_slice(format!("X-Forwarded-For: 10.0.0.{i}\r\n").as_bytes());
        }
        raw.extend_from_slice(b"\r\n");
        let (r, _) = ok(&raw);
        let v: Vec<String> = r
            .forwarded_for
            .values()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect();
        assert_eq!(v.len(), MAX_FORWARDED);
        assert_eq!(v.first().map(String::as_str), Some("10.0.0.4"));
        assert_eq!(v.last().map(String::as_str), Some("10.0.0.11"));
        assert_eq!(
            ok(b"GET / HTTP/1.1\r\n\r\n")
                .0
                .forwarded_for
                .values()
                .count(),
            0
        );
    }

    #[test]
    fn keep_alive_rules() {
        assert!(
            !ok(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
                .0
                .keep_alive
        );
        assert!(!ok(b"GET / HTTP/1.0\r\n\r\n").0.keep_alive);
        assert!(
            ok(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
                .0
                .keep_alive
        );
        let (r, _) = ok(
            b"GET /ws/x HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\nUpgrade: WebSocket\r\n\r\n",
        );
        assert!(r.upgrade && r.connection_upgrade);
        assert!(
            !ok(b"GET /ws/x HTTP/1.1\r\nUpgrade: websocket\r\n\r\n")
                .0
                .connection_upgrade
        );
    }

    #[test]
    fn incomplete_and_limits() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\nHost:", 1024, 10), Ok(None));
        let big = [b"GET / HTTP/1.1\r\nX: ".as_slice(), &[b'a'; 2000]].concat();
        assert_eq!(parse(&big, 1024, 10), Err(ParseError::HeadTooLarge));
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: 11\r\n\r\n", 1024, 10),
            Err(ParseError::BodyTooLarge)
        );
        assert_eq!(
            parse(
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                1024,
                10
            ),
            Err(ParseError::Chunked)
        );
        assert!(matches!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 1024, 10),
            Err(ParseError::BadRequest(_))
        ));
        assert!(matches!(
            parse(
                b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                1024,
                10
            ),
            Err(ParseError::BadRequest(_))
        ));
        assert!(matches!(
            parse(b"\x00\x01garbage\r\n\r\n", 1024, 10),
            Err(ParseError::BadRequest(_))
        ));
        let many: Vec<u8> = [
            b"GET / HTTP/1.1\r\n".to_vec(),
            b"A: b\r\n".repeat(100),
            b"\r\n".to_vec(),
        ]
        .concat();
        assert_eq!(parse(&many, 100_000, 10), Err(ParseError::HeadTooLarge));
    }

    #[test]
    fn writes_responses_with_date_length_and_cors() {
        let mut out = Vec::new();
        write_response(
            &mut out,
            &Response::error(404, "Room not found"),
            b"DATE",
            true,
            false,
        );
        let s = String::from_utf8(out).unwrap();
        assert!(
            s.starts_with("HTTP/1.1 404 Not Found\r\nDate: DATE\r\n"),
            "{s}"
        );
        assert!(s.contains("Access-Control-Allow-Origin: *\r\n"));
        assert!(s.contains("Content-Length: 27\r\n"));
        assert!(s.ends_with("\r\n\r\n{\"detail\":\"Room not found\"}"));
        let mut out = Vec::new();
        write_response(
            &mut out,
            &Response::static_body(200, "text/plain", b"x"),
            b"D",
            false,
            true,
        );
        let s = String::from_utf8(out).unwrap();
        assert!(
            s.contains("Content-Length: 1\r\n")
                && s.contains("Connection: close\r\n")
                && s.ends_with("\r\n\r\n")
        );
    }

    #[test]
    fn decimals_and_status_lines() {
        for n in [0u64, 7, 10, 99, 100, 65_535, 1_000_000, u64::MAX] {
            let mut out = b"x".to_vec();
            push_decimal(&mut out, n);
            assert_eq!(out, format!("x{n}").into_bytes());
        }
        let mut out = Vec::new();
        let r = Response {
            retry_after: Some(30),
            ..Response::error(599, "odd")
        };
        write_response(&mut out, &r, b"D", true, false);
        assert!(
            out.len() <= r.size_hint(),
            "{} > {}",
            out.len(),
            r.size_hint()
        );
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("HTTP/1.1 599 Unknown\r\nDate: D\r\n"), "{s}");
        assert!(s.contains("Retry-After: 30\r\n") && s.contains("Content-Length: 16\r\n"));
    }

    #[test]
    fn query_params() {
        assert_eq!(query_param("session_id=abc&since=x", "since"), Some("x"));
        assert_eq!(query_param("session_id", "session_id"), Some(""));
        assert_eq!(query_param("", "a"), None);
    }
}
