//! Clients whose socket is bound to another loopback source address before connecting (all
//! of 127.0.0.0/8 is loopback), so that a well-behaved bystander is a different client IP
//! from the attacker. Include with `#[path = "common/bystander.rs"] mod bystander;`.
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr, TcpStream};

use socket2::{Domain, Socket, Type};
use tungstenite::stream::MaybeTlsStream;

use super::common::{Http, Resp, Server, TIMEOUT, Ws};

/// The bystander's address.
pub const BYSTANDER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// A TCP connection to `to` from `from` (any port).
pub fn connect_from(from: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    s.bind(&SocketAddr::from((from, 0)).into())
        .expect("bind to a loopback source address");
    s.connect_timeout(&to.into(), TIMEOUT).expect("connect");
    let stream: TcpStream = s.into();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream
}

/// A keep-alive HTTP client from `from`.
pub fn http_from(s: &Server, from: Ipv4Addr) -> Http {
    let mut h = Http::connect(s.addr);
    h.stream = connect_from(from, s.addr);
    h
}

/// `POST /sessions` from `from` → session id.
#[track_caller]
pub fn session_from(s: &Server, from: Ipv4Addr, name: &str) -> String {
    let body = serde_json::json!({ "username": name }).to_string();
    let r: Resp = http_from(s, from).post_json("/sessions", &body, None);
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["session_id"].as_str().unwrap().to_string()
}

/// Opens a WebSocket at `path` from `from`; `Err(status)` when the upgrade is refused.
pub fn ws_from(s: &Server, from: Ipv4Addr, path: &str) -> Result<Ws, u16> {
    let stream = connect_from(from, s.addr);
    let url = format!("ws://{}{}", s.addr, path);
    match tungstenite::client::client(url.as_str(), MaybeTlsStream::Plain(stream)) {
        Ok((socket, _)) => Ok(Ws { socket }),
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
            Err(resp.status().as_u16())
        }
        Err(e) => panic!("WebSocket handshake from {from} failed: {e}"),
    }
}
