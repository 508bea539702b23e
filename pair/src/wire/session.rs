//! Per-frame authentication after the handshake (protocol version 2).
//!
//! The handshake proves that both ends hold the pre-shared key, but a frame that follows it is
//! only CRC-checked in version 1: anyone on the link could inject, replay or reorder RECORDs and
//! ACKs. From version 2 every frame after ACCEPT carries a MAC under a key of that connection
//! and direction, over an implicit sequence number:
//!
//! ```text
//! session   = HMAC-SHA256(psk, "twinblock-pair session\0" | HELLO body | CHALLENGE body | AUTH body)
//! key_d2a   = HMAC-SHA256(session, "twinblock-pair dialer to acceptor\0")
//! key_a2d   = HMAC-SHA256(session, "twinblock-pair acceptor to dialer\0")
//! tag       = HMAC-SHA256(key_dir, seq u64 | kind u16 | body_bytes u32 | body after the tag)[..16]
//! ```
//!
//! `seq` counts the frames one side sent on this connection after the handshake, from 0; it is
//! not on the wire, both ends count. So a frame injected without the key fails its tag, a frame
//! sent twice or out of order is checked against the wrong seq and fails too, and a frame
//! recorded on an earlier connection fails because the transcript (both fresh nonces) differs.
//! The frame says it is sealed with flag [`FLAG_MAC`] and carries the tag as the first
//! [`FRAME_MAC_BYTES`] bytes of its body (the CRC covers the tag as well: a corrupted frame is
//! still named as corruption, not as an attack).
//!
//! Sealing and opening are pure (bytes in, bytes out); the node drives them over TCP.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::frame::{frame_header, split_frame, FrameAt, FrameKind, FRAME_HEADER_BYTES};
use super::WireError;

/// Bytes of the truncated HMAC-SHA256 tag each sealed frame carries.
pub const FRAME_MAC_BYTES: usize = 16;
/// Frame flag: the body starts with a [`FRAME_MAC_BYTES`] tag (every frame after the handshake).
pub const FLAG_MAC: u16 = 0x0001;

const LABEL_SESSION: &[u8] = b"twinblock-pair session\0";
const LABEL_D2A: &[u8] = b"twinblock-pair dialer to acceptor\0";
const LABEL_A2D: &[u8] = b"twinblock-pair acceptor to dialer\0";

type HmacSha256 = Hmac<Sha256>;

fn keyed(key: &[u8]) -> HmacSha256 {
    match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC-SHA256 takes keys of any length"),
    }
}

fn tag(parts: &[&[u8]], key: &[u8]) -> [u8; 32] {
    let mut m = keyed(key);
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// The two direction keys of one connection. Their bytes never appear in `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionKeys {
    dialer_to_acceptor: [u8; 32],
    acceptor_to_dialer: [u8; 32],
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKeys(..)")
    }
}

impl SessionKeys {
    /// Derives the keys from the pre-shared key and the handshake transcript (the three bodies
    /// both sides saw, so both derive the same keys and nobody else can).
    pub fn derive(psk: &[u8], hello: &[u8], challenge: &[u8], auth: &[u8]) -> SessionKeys {
        let session = tag(&[LABEL_SESSION, hello, challenge, auth], psk);
        SessionKeys {
            dialer_to_acceptor: tag(&[LABEL_D2A], &session),
            acceptor_to_dialer: tag(&[LABEL_A2D], &session),
        }
    }

    /// The dialer's sealer (what it sends) and opener (what it receives).
    pub fn dialer(&self) -> (FrameSealer, FrameOpener) {
        (
            FrameSealer::new(&self.dialer_to_acceptor),
            FrameOpener::new(&self.acceptor_to_dialer),
        )
    }

    /// The acceptor's sealer and opener.
    pub fn acceptor(&self) -> (FrameSealer, FrameOpener) {
        (
            FrameSealer::new(&self.acceptor_to_dialer),
            FrameOpener::new(&self.dialer_to_acceptor),
        )
    }
}

/// Something that appends frames: [`Plain`] (handshake frames, tests) or a [`FrameSealer`].
pub trait FrameWriter {
    /// Appends the frame's header (and tag, when sealed) for a body made of `parts`, but not
    /// the parts themselves: the caller appends them, or sends them from where they lie.
    fn frame_head(&mut self, out: &mut Vec<u8>, kind: FrameKind, parts: &[&[u8]]);

    /// Appends one whole frame.
    fn frame(&mut self, out: &mut Vec<u8>, kind: FrameKind, parts: &[&[u8]]) {
        self.frame_head(out, kind, parts);
        for p in parts {
            out.extend_from_slice(p);
        }
    }
}

/// Unsealed frames (flags 0): the handshake, and version-1 style tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct Plain;

impl FrameWriter for Plain {
    fn frame_head(&mut self, out: &mut Vec<u8>, kind: FrameKind, parts: &[&[u8]]) {
        let body_len: usize = parts.iter().map(|p| p.len()).sum();
        let h = frame_header(kind, 0, body_len);
        let mut crc = crc32c::crc32c(&h);
        for p in parts {
            crc = crc32c::crc32c_append(crc, p);
        }
        out.extend_from_slice(&h);
        out.extend_from_slice(&crc.to_le_bytes());
    }
}

/// Seals the frames one side sends on one connection.
#[derive(Clone)]
pub struct FrameSealer {
    mac: HmacSha256,
    next_seq: u64,
}

impl std::fmt::Debug for FrameSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FrameSealer(next_seq {})", self.next_seq)
    }
}

/// The MAC input before the body: seq, kind, body length (the tag's own bytes excluded).
fn mac_prefix(seq: u64, kind: FrameKind, body_len: usize) -> [u8; 14] {
    let mut p = [0u8; 14];
    p[..8].copy_from_slice(&seq.to_le_bytes());
    p[8..10].copy_from_slice(&(kind as u16).to_le_bytes());
    p[10..].copy_from_slice(&(body_len as u32).to_le_bytes());
    p
}

impl FrameSealer {
    fn new(key: &[u8; 32]) -> FrameSealer {
        FrameSealer {
            mac: keyed(key),
            next_seq: 0,
        }
    }

    /// Frames sealed so far.
    pub fn sealed(&self) -> u64 {
        self.next_seq
    }
}

impl FrameWriter for FrameSealer {
    fn frame_head(&mut self, out: &mut Vec<u8>, kind: FrameKind, parts: &[&[u8]]) {
        let payload: usize = parts.iter().map(|p| p.len()).sum();
        let body_len = FRAME_MAC_BYTES + payload;
        let mut m = self.mac.clone();
        m.update(&mac_prefix(self.next_seq, kind, body_len));
        for p in parts {
            m.update(p);
        }
        self.next_seq += 1;
        let full: [u8; 32] = m.finalize().into_bytes().into();
        let t = &full[..FRAME_MAC_BYTES];
        let h = frame_header(kind, FLAG_MAC, body_len);
        let mut crc = crc32c::crc32c_append(crc32c::crc32c(&h), t);
        for p in parts {
            crc = crc32c::crc32c_append(crc, p);
        }
        out.extend_from_slice(&h);
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(t);
    }
}

/// Checks the frames one side receives on one connection, in order.
#[derive(Clone)]
pub struct FrameOpener {
    mac: HmacSha256,
    next_seq: u64,
}

impl std::fmt::Debug for FrameOpener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FrameOpener(next_seq {})", self.next_seq)
    }
}

impl FrameOpener {
    fn new(key: &[u8; 32]) -> FrameOpener {
        FrameOpener {
            mac: keyed(key),
            next_seq: 0,
        }
    }

    /// Like [`split_frame`], and the frame must be sealed with the next seq: `Ok(Some)` with
    /// `body_start` past the tag, `Ok(None)` when more bytes are needed, an error (drop the
    /// connection, store nothing) when the frame is unsealed or its tag is wrong.
    pub fn open(&mut self, buf: &[u8]) -> Result<Option<FrameAt>, WireError> {
        let Some(f) = split_frame(buf)? else {
            return Ok(None);
        };
        if f.flags & FLAG_MAC == 0 {
            return Err(WireError::Unsealed { kind: f.kind });
        }
        let body = &buf[f.body_start..f.total];
        if body.len() < FRAME_MAC_BYTES {
            return Err(WireError::Malformed {
                what: "sealed frame",
                detail: format!("{} body bytes, shorter than its tag", body.len()),
            });
        }
        let (t, rest) = body.split_at(FRAME_MAC_BYTES);
        let mut m = self.mac.clone();
        m.update(&mac_prefix(self.next_seq, f.kind, body.len()));
        m.update(rest);
        m.verify_truncated_left(t)
            .map_err(|_| WireError::BadFrameMac {
                kind: f.kind,
                seq: self.next_seq,
            })?;
        self.next_seq += 1;
        debug_assert_eq!(f.body_start, FRAME_HEADER_BYTES);
        Ok(Some(FrameAt {
            body_start: f.body_start + FRAME_MAC_BYTES,
            ..f
        }))
    }

    /// Frames opened so far.
    pub fn opened(&self) -> u64 {
        self.next_seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> SessionKeys {
        SessionKeys::derive(b"0123456789abcdef", b"hello", b"challenge", b"auth")
    }

    fn sealed_frames(n: u8) -> Vec<Vec<u8>> {
        let (mut s, _) = keys().dialer();
        (0..n)
            .map(|i| {
                let mut out = Vec::new();
                s.frame(&mut out, FrameKind::Ack, &[&[i; 16]]);
                out
            })
            .collect()
    }

    #[test]
    fn sealed_frames_open_in_order_on_the_other_side() {
        let (_, mut o) = keys().acceptor();
        for (i, f) in sealed_frames(3).iter().enumerate() {
            let at = o.open(f).unwrap().unwrap();
            assert_eq!(at.kind, FrameKind::Ack);
            assert_eq!(&f[at.body_start..at.total], &[i as u8; 16]);
        }
        assert_eq!(o.opened(), 3);
    }

    #[test]
    fn tampered_body_fails_the_tag_even_with_a_fixed_crc() {
        let (_, mut o) = keys().acceptor();
        let mut f = sealed_frames(1).remove(0);
        let last = f.len() - 1;
        f[last] ^= 1;
        // Recompute the CRC as an attacker could: only the MAC can tell.
        let crc = crc32c::crc32c_append(crc32c::crc32c(&f[..8]), &f[FRAME_HEADER_BYTES..]);
        f[8..12].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            o.open(&f),
            Err(WireError::BadFrameMac { seq: 0, .. })
        ));
    }

    #[test]
    fn replayed_frame_fails_its_tag() {
        let (_, mut o) = keys().acceptor();
        let f = sealed_frames(1).remove(0);
        o.open(&f).unwrap().unwrap();
        assert!(matches!(
            o.open(&f),
            Err(WireError::BadFrameMac { seq: 1, .. })
        ));
    }

    #[test]
    fn reordered_frames_fail_their_tags() {
        let (_, mut o) = keys().acceptor();
        let fs = sealed_frames(2);
        assert!(matches!(o.open(&fs[1]), Err(WireError::BadFrameMac { .. })));
    }

    #[test]
    fn frame_of_another_connection_or_direction_fails() {
        let other = SessionKeys::derive(b"0123456789abcdef", b"hello2", b"challenge", b"auth");
        let (_, mut o) = other.acceptor();
        let f = sealed_frames(1).remove(0);
        assert!(o.open(&f).is_err(), "another transcript's key accepted");
        // The dialer's own opener expects the acceptor's direction key.
        let (_, mut mine) = keys().dialer();
        assert!(mine.open(&f).is_err(), "a reflected frame was accepted");
    }

    #[test]
    fn unsealed_frame_after_the_handshake_is_refused() {
        let (_, mut o) = keys().acceptor();
        let mut f = Vec::new();
        Plain.frame(&mut f, FrameKind::Ack, &[&[0u8; 16]]);
        assert!(matches!(o.open(&f), Err(WireError::Unsealed { .. })));
    }

    #[test]
    fn truncated_sealed_frame_asks_for_more() {
        let (_, mut o) = keys().acceptor();
        let f = sealed_frames(1).remove(0);
        for cut in 0..f.len() {
            assert_eq!(o.open(&f[..cut]), Ok(None));
        }
        assert_eq!(o.opened(), 0);
    }

    #[test]
    fn head_then_parts_equals_the_whole_frame() {
        let (mut a, _) = keys().dialer();
        let (mut b, _) = keys().dialer();
        let mut whole = Vec::new();
        a.frame(&mut whole, FrameKind::Record, &[&[1u8; 24], &[2u8; 64]]);
        let mut head = Vec::new();
        b.frame_head(&mut head, FrameKind::Record, &[&[1u8; 24], &[2u8; 64]]);
        head.extend_from_slice(&[1u8; 24]);
        head.extend_from_slice(&[2u8; 64]);
        assert_eq!(whole, head);
    }
}
