//! Per-frame authentication after the handshake (protocol version 3).
//!
//! The handshake proves that both ends hold the pre-shared key, but a frame that follows it is
//! only CRC-checked in version 1: anyone on the link could inject, replay or reorder RECORDs and
//! ACKs. From version 2 every frame after ACCEPT carries a MAC under a key of that connection
//! and direction, over an implicit sequence number. Version 3 keeps the keys and the framing of
//! version 2 and changes the tag from truncated HMAC-SHA256 to the AES-256-GCM tag:
//!
//! ```text
//! session   = HMAC-SHA256(psk, "twinblock-pair session\0" | HELLO body | CHALLENGE body | AUTH body)
//! key_d2a   = HMAC-SHA256(session, "twinblock-pair dialer to acceptor\0")
//! key_a2d   = HMAC-SHA256(session, "twinblock-pair acceptor to dialer\0")
//! nonce     = 0u32 | seq u64                        (12 bytes)
//! tag       = AES-256-GCM(key_dir, nonce, aad = kind u16 | body_bytes u32,
//!                         plaintext = body after the tag).tag   (16 bytes; the ciphertext is
//!                                                               dropped, the body goes in clear)
//! ```
//!
//! Why GCM: the tag is computed over every byte of every RECORD on both nodes, and on a mirrored
//! write at queue depth 32 HMAC-SHA256 was the largest single cost of the receiving daemon (about
//! 3 us per 4 KiB record on each side, even with the CPU's SHA extensions), where AES-GCM with
//! AES-NI and carry-less multiply runs about three times faster. Encrypting the body maps it
//! one-to-one onto a ciphertext under a given key and nonce, so GCM's authentication of the
//! ciphertext authenticates the body; the tag is secure as long as a nonce is never used twice
//! under one key, which holds because `seq` only counts up and every connection derives fresh
//! keys from fresh nonces.
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
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use sha2::Sha256;

use super::frame::{
    check_frame_crc, frame_header, locate_frame, FrameAt, FrameKind, FRAME_HEADER_BYTES,
};
use super::WireError;

/// Bytes of the AES-256-GCM tag each sealed frame carries.
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

/// The per-frame MAC of one direction of one connection: the AES-256-GCM tag of the message
/// body (as plaintext, whose ciphertext is dropped) and its kind and length (as the 6 bytes of
/// associated data), under the frame's seq as nonce. The body goes in as plaintext rather than
/// as associated data because ring runs its fast stitched AES-GCM code on the plaintext only
/// (associated data is hashed one block per call: slower than HMAC-SHA256 on a 4 KiB record,
/// where the plaintext path is about three times faster than HMAC).
#[derive(Clone)]
struct FrameMac {
    key: LessSafeKey,
}

impl FrameMac {
    fn new(key: &[u8; 32]) -> FrameMac {
        match UnboundKey::new(&AES_256_GCM, key) {
            Ok(k) => FrameMac {
                key: LessSafeKey::new(k),
            },
            Err(_) => unreachable!("AES-256-GCM takes 32-byte keys"),
        }
    }

    /// The tag of a frame whose message body is in `body`; `body` is overwritten (GCM encrypts
    /// it in place; the ciphertext is dropped), so callers pass a scratch copy.
    fn tag(
        &self,
        seq: u64,
        kind: FrameKind,
        body_len: usize,
        body: &mut [u8],
    ) -> [u8; FRAME_MAC_BYTES] {
        let mut nonce = [0u8; NONCE_LEN];
        nonce[4..].copy_from_slice(&seq.to_le_bytes());
        let fields = mac_fields(kind, body_len);
        match self.key.seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&fields),
            body,
        ) {
            Ok(t) => {
                let mut out = [0u8; FRAME_MAC_BYTES];
                out.copy_from_slice(t.as_ref());
                out
            }
            // Only for inputs over GCM's limit (64 GiB), far beyond MAX_FRAME_BODY_BYTES.
            Err(_) => unreachable!("frame body of {} bytes exceeds AES-GCM's limit", body.len()),
        }
    }
}

/// The MAC's associated data: kind and body length (the tag's own bytes included in the length).
fn mac_fields(kind: FrameKind, body_len: usize) -> [u8; 6] {
    let mut p = [0u8; 6];
    p[..2].copy_from_slice(&(kind as u16).to_le_bytes());
    p[2..].copy_from_slice(&(body_len as u32).to_le_bytes());
    p
}

/// Compares two tags in constant time (no early exit on the first differing byte).
fn tags_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Seals the frames one side sends on one connection.
#[derive(Clone)]
pub struct FrameSealer {
    mac: FrameMac,
    next_seq: u64,
    /// A copy of the message body for the MAC to encrypt in place (see [`FrameMac`]); kept to
    /// reuse its allocation.
    scratch: Vec<u8>,
}

impl std::fmt::Debug for FrameSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FrameSealer(next_seq {})", self.next_seq)
    }
}

impl FrameSealer {
    fn new(key: &[u8; 32]) -> FrameSealer {
        FrameSealer {
            mac: FrameMac::new(key),
            next_seq: 0,
            scratch: Vec::new(),
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
        self.scratch.clear();
        for p in parts {
            self.scratch.extend_from_slice(p);
        }
        let t = self
            .mac
            .tag(self.next_seq, kind, body_len, &mut self.scratch);
        self.next_seq += 1;
        let h = frame_header(kind, FLAG_MAC, body_len);
        let mut crc = crc32c::crc32c_append(crc32c::crc32c(&h), &t);
        for p in parts {
            crc = crc32c::crc32c_append(crc, p);
        }
        out.extend_from_slice(&h);
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&t);
    }
}

/// Checks the frames one side receives on one connection, in order.
#[derive(Clone)]
pub struct FrameOpener {
    mac: FrameMac,
    next_seq: u64,
    /// A copy of the message body for the MAC (see [`FrameSealer`]'s).
    scratch: Vec<u8>,
}

impl std::fmt::Debug for FrameOpener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FrameOpener(next_seq {})", self.next_seq)
    }
}

impl FrameOpener {
    fn new(key: &[u8; 32]) -> FrameOpener {
        FrameOpener {
            mac: FrameMac::new(key),
            next_seq: 0,
            scratch: Vec::new(),
        }
    }

    /// Like [`split_frame`](super::frame::split_frame), and the frame must be sealed with the next seq: `Ok(Some)` with
    /// `body_start` past the tag, `Ok(None)` when more bytes are needed, an error (drop the
    /// connection, store nothing) when the frame is unsealed or its tag is wrong.
    ///
    /// The tag is checked first and the frame CRC only when the tag fails (to name the failure:
    /// a frame whose CRC also fails was corrupted, one whose CRC holds was tampered with): the
    /// tag covers every byte the CRC does and more, so a good tag makes the CRC pass redundant.
    pub fn open(&mut self, buf: &[u8]) -> Result<Option<FrameAt>, WireError> {
        let Some(f) = locate_frame(buf)? else {
            return Ok(None);
        };
        if f.flags & FLAG_MAC == 0 {
            check_frame_crc(buf, &f)?;
            return Err(WireError::Unsealed { kind: f.kind });
        }
        let body = &buf[f.body_start..f.total];
        if body.len() < FRAME_MAC_BYTES {
            check_frame_crc(buf, &f)?;
            return Err(WireError::Malformed {
                what: "sealed frame",
                detail: format!("{} body bytes, shorter than its tag", body.len()),
            });
        }
        let (t, rest) = body.split_at(FRAME_MAC_BYTES);
        self.scratch.clear();
        self.scratch.extend_from_slice(rest);
        let expected = self
            .mac
            .tag(self.next_seq, f.kind, body.len(), &mut self.scratch);
        if !tags_equal(t, &expected) {
            check_frame_crc(buf, &f)?;
            return Err(WireError::BadFrameMac {
                kind: f.kind,
                seq: self.next_seq,
            });
        }
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
    fn corrupted_sealed_frame_is_named_a_crc_error() {
        // A flipped body bit without a recomputed CRC: corruption, not an attack.
        let (_, mut o) = keys().acceptor();
        let mut f = sealed_frames(1).remove(0);
        let last = f.len() - 1;
        f[last] ^= 1;
        assert!(matches!(o.open(&f), Err(WireError::BadCrc { .. })));
        assert_eq!(o.opened(), 0);
    }

    #[test]
    fn sealed_frame_is_checked_by_its_tag_not_its_crc() {
        // Only the CRC field damaged: the tag vouches for every byte it covers, so the frame
        // opens (the CRC is read only to name a failed tag).
        let (_, mut o) = keys().acceptor();
        let mut f = sealed_frames(1).remove(0);
        f[8] ^= 1;
        let at = o.open(&f).unwrap().unwrap();
        assert_eq!(&f[at.body_start..at.total], &[0u8; 16]);
    }

    #[test]
    fn frame_kind_is_covered_by_the_tag() {
        // The same body under another kind (CRC recomputed): the tag binds the kind too.
        let (_, mut o) = keys().acceptor();
        let mut f = sealed_frames(1).remove(0);
        f[4..6].copy_from_slice(&(FrameKind::Status as u16).to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&f[..8]), &f[FRAME_HEADER_BYTES..]);
        f[8..12].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            o.open(&f),
            Err(WireError::BadFrameMac {
                kind: FrameKind::Status,
                seq: 0
            })
        ));
    }

    #[test]
    fn large_record_body_in_parts_opens_whole() {
        // A RECORD-sized frame sealed from two parts (fields, record bytes), as the sender does.
        let (mut s, _) = keys().dialer();
        let (_, mut o) = keys().acceptor();
        let record = vec![0xA5u8; 4096 + 64];
        let mut out = Vec::new();
        s.frame(&mut out, FrameKind::Record, &[&[3u8; 24], &record]);
        let at = o.open(&out).unwrap().unwrap();
        assert_eq!(at.total, out.len());
        assert_eq!(&out[at.body_start + 24..at.total], &record[..]);
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
