//! The client side of WebSocket framing, in a file of its own so that the unit tests of
//! `src/ws.rs` build their frames with the same code as the integration tests (they include it
//! with `#[path]`); it uses nothing but `std`.

/// A client's WebSocket frame: `first` (FIN, RSV bits, opcode) as given, the payload length
/// in the shortest form, and the payload masked with `mask` (`None`: sent unmasked, which a
/// server must refuse).
pub fn client_frame(first: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut f = vec![first];
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => f.push(mask_bit | n as u8),
        n if n <= 0xffff => {
            f.push(mask_bit | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(mask_bit | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(key) => {
            f.extend_from_slice(&key);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => f.extend_from_slice(payload),
    }
    f
}
