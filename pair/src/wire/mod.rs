//! The interconnect wire protocol between the two nodes of a pair: an authenticated, versioned
//! handshake, then length-prefixed, CRC-checked frames carrying journal records, acknowledgements,
//! log resets, resynchronisation markers and status records.
//!
//! Everything here is pure (bytes in, typed values or typed errors out) so that it can be fuzzed
//! and property-tested; the node's `src/pair/` drives it over TCP. `docs/FORMATS.md`
//! ("Interconnect") documents every byte.
//!
//! | module | holds |
//! | --- | --- |
//! | [`frame`] | the frame envelope: length, kind, flags, CRC32C; splitting a byte stream into frames |
//! | [`messages`] | the frames exchanged after the handshake (RECORD, ACK, LOG_RESET, STATUS, ...) |
//! | [`handshake`] | HELLO / CHALLENGE / AUTH / ACCEPT / REJECT, the HMAC challenge-response and the two state machines |
//! | [`session`] | per-frame MACs after the handshake: session keys from the transcript, sealing and opening with an implicit sequence number |
//!
//! The handshake authenticates both ends with a pre-shared key: each side sends a fresh random
//! nonce and proves knowledge of the key with an HMAC-SHA256 over the whole exchange so far,
//! which includes the other side's nonce. A recorded handshake therefore cannot be replayed (the
//! fresh nonce of the live side is not in the recording), and the acceptor also remembers recent
//! dialer nonces to name a replayed HELLO as such. Frames after the handshake carry a CRC32C
//! against corruption and, from version 2, a MAC under a key derived from the handshake with an
//! implicit sequence number ([`session`]), so a frame cannot be injected, replayed or reordered
//! (version 3: an AES-256-GCM tag, cheaper per byte than the HMAC-SHA256 of version 2).

pub mod frame;
pub mod handshake;
pub mod messages;
pub mod session;

pub use frame::{
    check_frame_crc, encode_frame, locate_frame, split_frame, FrameKind, FRAME_HEADER_BYTES,
    MAX_FRAME_BODY_BYTES,
};
pub use handshake::{
    Acceptor, AcceptorAwaitAuth, Dialer, DialerAwaitAccept, HandshakeFailure, Identity, PairKey,
    PeerSession, RejectReason, SeenNonces, VolumeAnnounce, NONCE_BYTES,
};
pub use messages::{FetchBegin, LogReset, Message, RecordFrame, RecordRef};
pub use session::{
    FrameOpener, FrameSealer, FrameWriter, Plain, SessionKeys, FLAG_MAC, FRAME_MAC_BYTES,
};

/// Version of the interconnect protocol described here; both ends must speak the same one.
/// 2: frames after the handshake are sealed (flag `FLAG_MAC`, a tag in front of the body).
/// 3: the tag is AES-256-GCM's instead of truncated HMAC-SHA256 ([`session`]); a version-2 peer
/// is refused in the handshake (its tags would not verify).
pub const PROTOCOL_VERSION: u32 = 3;
/// First bytes of a HELLO and a CHALLENGE body.
pub const HANDSHAKE_MAGIC: [u8; 8] = *b"TWBLPAIR";
/// Largest journal record a RECORD frame carries (header, payload, padding, trailing zero header).
pub const MAX_RECORD_BYTES: usize = 8 * 1024 * 1024;
/// Largest STATUS payload.
pub const MAX_STATUS_BYTES: usize = 4096;
/// Most journaled volumes one node announces.
pub const MAX_VOLUMES: usize = 256;
/// Longest volume name (same limit as the node's config).
pub const MAX_VOLUME_NAME_BYTES: usize = 64;
/// Longest REJECT message text.
pub const MAX_REJECT_TEXT_BYTES: usize = 256;

/// Why bytes from the peer were refused. Every variant means: drop the connection, store nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame of {body_bytes} bytes exceeds the limit of {max} bytes")]
    TooLarge { body_bytes: u64, max: u64 },
    #[error("frame CRC mismatch (stored {stored:#010x}, computed {computed:#010x}): corrupted on the link")]
    BadCrc { stored: u32, computed: u32 },
    #[error("{kind:?} frame number {seq} of this connection failed its MAC: injected, replayed or reordered on the link; dropping the connection")]
    BadFrameMac { kind: FrameKind, seq: u64 },
    #[error(
        "unsealed {kind:?} frame after the handshake (a peer of protocol version 1, or injected)"
    )]
    Unsealed { kind: FrameKind },
    #[error("unknown frame kind {0}")]
    UnknownKind(u16),
    #[error("frame flags {0:#06x} are not supported (0 or 1)")]
    BadFlags(u16),
    #[error("malformed {what} frame: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error("not a twinblock interconnect peer (bad handshake magic)")]
    BadMagic,
    #[error("protocol version mismatch: we speak {ours}, the peer speaks {theirs}; upgrade both nodes to the same release")]
    VersionMismatch { ours: u32, theirs: u32 },
    #[error(
        "peer belongs to pair {found}, we are pair {expected}: check [pair].pair_id on both nodes"
    )]
    WrongPair { expected: String, found: String },
    #[error(
        "peer claims node id {found}, expected {expected}: check node.id and [pair].partner_id"
    )]
    WrongNode { expected: u32, found: u32 },
    #[error("peer expects to talk to node {found}, but we are node {expected}: check [pair].partner_address")]
    WrongTarget { expected: u32, found: u32 },
    #[error("authentication failed: the peer does not hold our pre-shared key (check [pair].key_file on both nodes)")]
    AuthFailed,
    #[error("replayed handshake: this HELLO nonce was already used")]
    ReplayedHandshake,
    #[error("unexpected {got:?} frame while {state}")]
    Unexpected { got: FrameKind, state: &'static str },
    #[error("the peer rejected the handshake: {reason:?}: {text}")]
    Rejected { reason: RejectReason, text: String },
}

/// Helpers for little-endian fields; callers check lengths first.
pub(crate) fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

pub(crate) fn get_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

pub(crate) fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// A pair id as UUID text (for messages).
pub fn format_id(id: &[u8; 16]) -> String {
    let h: String = id.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}
