//! The handshake: who the peer is, which protocol it speaks, and proof that it holds the key.
//!
//! ```text
//! dialer D                                   acceptor A
//!   HELLO     {magic, version, pair, D, A, G_D, nonce_D}  ->
//!            <-  CHALLENGE {magic, version, pair, A, D, G_A, nonce_A, mac_A}
//!   AUTH      {mac_D, volumes}                            ->
//!            <-  ACCEPT {}   or   REJECT {reason, version, text}
//! mac_A = HMAC-SHA256(key, "twinblock-pair acceptor\0" | HELLO body | CHALLENGE body before mac_A)
//! mac_D = HMAC-SHA256(key, "twinblock-pair dialer\0" | HELLO body | CHALLENGE body | AUTH body after mac_D)
//! ```
//!
//! Each MAC covers the other side's fresh nonce, so a recording of an earlier handshake (either
//! half) fails against a live peer; the acceptor also remembers recent dialer nonces
//! ([`SeenNonces`]) so a replayed HELLO is named as such. `mac_D` also covers the announced
//! volumes (id, name, generation, log size, store id), so they cannot be altered in flight. MACs
//! are compared in constant time.
//!
//! The two sides are small state machines that consume one frame and produce the next; they do
//! no I/O, so the node drives them over TCP and the tests drive them over byte vectors.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::frame::{encode_frame, FrameKind};
use super::session::SessionKeys;
use super::{
    format_id, get_u16, get_u32, get_u64, WireError, HANDSHAKE_MAGIC, MAX_REJECT_TEXT_BYTES,
    MAX_VOLUMES, MAX_VOLUME_NAME_BYTES, PROTOCOL_VERSION,
};

/// Bytes of each side's random nonce.
pub const NONCE_BYTES: usize = 32;
/// Bytes of an HMAC-SHA256 tag.
const MAC_BYTES: usize = 32;
/// Bytes of a HELLO body (and of a CHALLENGE body before its MAC).
const HELLO_BYTES: usize = 48 + NONCE_BYTES;
/// Fixed bytes of one announced volume before its name.
const VOLUME_FIXED_BYTES: usize = 42;
/// Shortest pre-shared key accepted.
pub const MIN_KEY_BYTES: usize = 16;
/// Dialer nonces the acceptor remembers to detect a replayed HELLO.
pub const SEEN_NONCES_MAX: usize = 4096;

const LABEL_ACCEPTOR: &[u8] = b"twinblock-pair acceptor\0";
const LABEL_DIALER: &[u8] = b"twinblock-pair dialer\0";
const LABEL_FINGERPRINT: &[u8] = b"twinblock-pair key fingerprint\0";

type HmacSha256 = Hmac<Sha256>;

/// The pre-shared key. Its bytes never appear in `Debug` output or messages.
#[derive(Clone)]
pub struct PairKey(Vec<u8>);

impl std::fmt::Debug for PairKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PairKey(fingerprint {})", self.fingerprint())
    }
}

impl PairKey {
    /// A key of at least [`MIN_KEY_BYTES`] bytes.
    pub fn new(bytes: Vec<u8>) -> Result<PairKey, String> {
        if bytes.len() < MIN_KEY_BYTES {
            return Err(format!(
                "the key is {} bytes; use at least {MIN_KEY_BYTES} random bytes \
                 (e.g. `head -c 32 /dev/urandom | base64 > pair.key`)",
                bytes.len()
            ));
        }
        Ok(PairKey(bytes))
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC accepts keys of any length; this cannot fail.
        match HmacSha256::new_from_slice(&self.0) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC-SHA256 takes keys of any length"),
        }
    }

    fn tag(&self, parts: &[&[u8]]) -> [u8; MAC_BYTES] {
        let mut m = self.mac();
        for p in parts {
            m.update(p);
        }
        m.finalize().into_bytes().into()
    }

    fn verify(&self, parts: &[&[u8]], tag: &[u8]) -> Result<(), WireError> {
        let mut m = self.mac();
        for p in parts {
            m.update(p);
        }
        m.verify_slice(tag).map_err(|_| WireError::AuthFailed)
    }

    /// A short, non-secret name of the key (hex of an HMAC over a fixed label), so two configs
    /// can be compared without printing the key.
    pub fn fingerprint(&self) -> String {
        self.tag(&[LABEL_FINGERPRINT])[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// Who this node is, as the handshake states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub pair_id: [u8; 16],
    pub node_id: u32,
    pub partner_id: u32,
    /// The node's generation (orders its restarts).
    pub generation: u64,
}

/// One journaled volume the dialer will mirror, as announced in AUTH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeAnnounce {
    /// The journal's volume id (the `volume` of every frame about it).
    pub volume: u64,
    pub name: String,
    /// Generation of the volume's NVRAM log.
    pub generation: u64,
    /// Bytes of the volume's circular log (the partner's copy has the same size).
    pub log_bytes: u64,
    /// The array the log's records belong to (all zero: unbound).
    pub store_id: [u8; 16],
}

/// What the handshake learned about the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSession {
    pub node_id: u32,
    pub generation: u64,
    /// The dialer's volumes (empty on the dialer's side).
    pub volumes: Vec<VolumeAnnounce>,
    /// The keys that seal the frames after the handshake (see [`super::session`]).
    pub keys: SessionKeys,
}

/// Why an acceptor refuses a dialer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum RejectReason {
    Version = 1,
    Pair = 2,
    Node = 3,
    Auth = 4,
    Replay = 5,
    /// The acceptor cannot keep a copy of an announced volume (see the text).
    Volume = 6,
    Malformed = 7,
    Other = 8,
}

impl RejectReason {
    fn from_u16(v: u16) -> RejectReason {
        match v {
            1 => RejectReason::Version,
            2 => RejectReason::Pair,
            3 => RejectReason::Node,
            4 => RejectReason::Auth,
            5 => RejectReason::Replay,
            6 => RejectReason::Volume,
            7 => RejectReason::Malformed,
            _ => RejectReason::Other,
        }
    }

    fn for_error(e: &WireError) -> RejectReason {
        match e {
            WireError::VersionMismatch { .. } => RejectReason::Version,
            WireError::WrongPair { .. } => RejectReason::Pair,
            WireError::WrongNode { .. } | WireError::WrongTarget { .. } => RejectReason::Node,
            WireError::AuthFailed => RejectReason::Auth,
            WireError::ReplayedHandshake => RejectReason::Replay,
            _ => RejectReason::Malformed,
        }
    }
}

/// A failed acceptor step: the error, and the REJECT frame to send before closing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeFailure {
    pub error: WireError,
    pub reply: Vec<u8>,
}

/// Appends a REJECT frame.
pub fn encode_reject(out: &mut Vec<u8>, reason: RejectReason, text: &str) {
    let mut t = text.as_bytes();
    if t.len() > MAX_REJECT_TEXT_BYTES {
        t = &t[..MAX_REJECT_TEXT_BYTES];
    }
    let mut b = Vec::with_capacity(8 + t.len());
    b.extend_from_slice(&(reason as u16).to_le_bytes());
    b.extend_from_slice(&0u16.to_le_bytes());
    b.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    b.extend_from_slice(t);
    encode_frame(out, FrameKind::Reject, &[&b]);
}

fn decode_reject(body: &[u8]) -> WireError {
    if body.len() < 8 {
        return WireError::Rejected {
            reason: RejectReason::Other,
            text: "(malformed REJECT)".into(),
        };
    }
    let text = String::from_utf8_lossy(&body[8..body.len().min(8 + MAX_REJECT_TEXT_BYTES)]);
    WireError::Rejected {
        reason: RejectReason::from_u16(get_u16(body, 0)),
        text: text.into_owned(),
    }
}

/// Appends an ACCEPT frame.
pub fn encode_accept(out: &mut Vec<u8>) {
    encode_frame(out, FrameKind::Accept, &[]);
}

fn hello_body(me: &Identity, nonce: &[u8; NONCE_BYTES]) -> Vec<u8> {
    let mut b = Vec::with_capacity(HELLO_BYTES + MAC_BYTES);
    b.extend_from_slice(&HANDSHAKE_MAGIC);
    b.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&me.pair_id);
    b.extend_from_slice(&me.node_id.to_le_bytes());
    b.extend_from_slice(&me.partner_id.to_le_bytes());
    b.extend_from_slice(&me.generation.to_le_bytes());
    b.extend_from_slice(nonce);
    b
}

/// Checks a HELLO-shaped body (HELLO, or CHALLENGE's first part) against our identity.
fn check_hello(
    what: &'static str,
    body: &[u8],
    me: &Identity,
) -> Result<(u64, [u8; NONCE_BYTES]), WireError> {
    if body.len() < HELLO_BYTES {
        return Err(WireError::Malformed {
            what,
            detail: format!("{} bytes, expected at least {HELLO_BYTES}", body.len()),
        });
    }
    if body[..8] != HANDSHAKE_MAGIC {
        return Err(WireError::BadMagic);
    }
    let version = get_u32(body, 8);
    if version != PROTOCOL_VERSION {
        return Err(WireError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: version,
        });
    }
    let mut pair = [0u8; 16];
    pair.copy_from_slice(&body[16..32]);
    if pair != me.pair_id {
        return Err(WireError::WrongPair {
            expected: format_id(&me.pair_id),
            found: format_id(&pair),
        });
    }
    let sender = get_u32(body, 32);
    if sender != me.partner_id {
        return Err(WireError::WrongNode {
            expected: me.partner_id,
            found: sender,
        });
    }
    let target = get_u32(body, 36);
    if target != me.node_id {
        return Err(WireError::WrongTarget {
            expected: me.node_id,
            found: target,
        });
    }
    let mut nonce = [0u8; NONCE_BYTES];
    nonce.copy_from_slice(&body[48..48 + NONCE_BYTES]);
    Ok((get_u64(body, 40), nonce))
}

fn expect(kind: FrameKind, want: FrameKind, state: &'static str) -> Result<(), WireError> {
    if kind != want {
        return Err(WireError::Unexpected { got: kind, state });
    }
    Ok(())
}

fn encode_volumes(vols: &[VolumeAnnounce]) -> Result<Vec<u8>, WireError> {
    if vols.len() > MAX_VOLUMES {
        return Err(WireError::Malformed {
            what: "AUTH",
            detail: format!("{} volumes, at most {MAX_VOLUMES}", vols.len()),
        });
    }
    let mut b = Vec::new();
    b.extend_from_slice(&(vols.len() as u32).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    for v in vols {
        if !valid_volume_name(&v.name) {
            return Err(WireError::Malformed {
                what: "AUTH",
                detail: format!("`{}` is not a valid volume name", v.name),
            });
        }
        b.extend_from_slice(&v.volume.to_le_bytes());
        b.extend_from_slice(&v.generation.to_le_bytes());
        b.extend_from_slice(&v.log_bytes.to_le_bytes());
        b.extend_from_slice(&v.store_id);
        b.extend_from_slice(&(v.name.len() as u16).to_le_bytes());
        b.extend_from_slice(v.name.as_bytes());
    }
    Ok(b)
}

/// Largest announced log (the partner's copy is created at this size).
pub const MAX_LOG_BYTES: u64 = 64 << 30;

/// A volume name as the node's config allows it (letters, digits, `-`, `_`, `.`; not `.` or
/// `..`): the receiver makes a file name of it.
pub fn valid_volume_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= MAX_VOLUME_NAME_BYTES
        && n != "."
        && n != ".."
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

fn decode_volumes(b: &[u8]) -> Result<Vec<VolumeAnnounce>, WireError> {
    let bad = |detail: String| WireError::Malformed {
        what: "AUTH",
        detail,
    };
    if b.len() < 8 {
        return Err(bad("volume list truncated".into()));
    }
    let count = get_u32(b, 0) as usize;
    if count > MAX_VOLUMES {
        return Err(bad(format!("{count} volumes, at most {MAX_VOLUMES}")));
    }
    let mut at = 8;
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        if b.len() < at + VOLUME_FIXED_BYTES {
            return Err(bad(format!("volume {i} truncated")));
        }
        let name_len = get_u16(b, at + 40) as usize;
        if name_len == 0 || name_len > MAX_VOLUME_NAME_BYTES {
            return Err(bad(format!("volume {i} name of {name_len} bytes")));
        }
        let name_at = at + VOLUME_FIXED_BYTES;
        let name = b
            .get(name_at..name_at + name_len)
            .ok_or_else(|| bad(format!("volume {i} name truncated")))?;
        let name = std::str::from_utf8(name)
            .ok()
            .filter(|n| valid_volume_name(n))
            .ok_or_else(|| bad(format!("volume {i} name is not a valid volume name")))?;
        let mut store_id = [0u8; 16];
        store_id.copy_from_slice(&b[at + 24..at + 40]);
        let log_bytes = get_u64(b, at + 16);
        if log_bytes == 0 || log_bytes > MAX_LOG_BYTES || !log_bytes.is_multiple_of(64) {
            return Err(bad(format!("volume {i} log of {log_bytes} bytes")));
        }
        let v = VolumeAnnounce {
            volume: get_u64(b, at),
            generation: get_u64(b, at + 8),
            log_bytes,
            store_id,
            name: name.to_string(),
        };
        if out.iter().any(|o: &VolumeAnnounce| o.volume == v.volume) {
            return Err(bad(format!("volume id {} announced twice", v.volume)));
        }
        out.push(v);
        at = name_at + name_len;
    }
    if at != b.len() {
        return Err(bad(format!("{} trailing bytes", b.len() - at)));
    }
    Ok(out)
}

/// The side that opens the connection (the node that ships its records).
#[derive(Debug)]
pub struct Dialer {
    me: Identity,
    key: PairKey,
    hello: Vec<u8>,
}

impl Dialer {
    /// Starts a handshake with a fresh random `nonce`; returns the HELLO frame to send.
    pub fn start(me: Identity, key: PairKey, nonce: [u8; NONCE_BYTES]) -> (Dialer, Vec<u8>) {
        let hello = hello_body(&me, &nonce);
        let mut out = Vec::new();
        encode_frame(&mut out, FrameKind::Hello, &[&hello]);
        (Dialer { me, key, hello }, out)
    }

    /// Checks the CHALLENGE (identity, version, the acceptor's MAC over our nonce); returns the
    /// AUTH frame announcing `volumes`.
    pub fn on_challenge(
        self,
        kind: FrameKind,
        body: &[u8],
        volumes: &[VolumeAnnounce],
    ) -> Result<(DialerAwaitAccept, Vec<u8>), WireError> {
        if kind == FrameKind::Reject {
            return Err(decode_reject(body));
        }
        expect(kind, FrameKind::Challenge, "waiting for CHALLENGE")?;
        let (generation, _nonce) = check_hello("CHALLENGE", body, &self.me)?;
        if body.len() != HELLO_BYTES + MAC_BYTES {
            return Err(WireError::Malformed {
                what: "CHALLENGE",
                detail: format!("{} bytes, expected {}", body.len(), HELLO_BYTES + MAC_BYTES),
            });
        }
        self.key.verify(
            &[LABEL_ACCEPTOR, &self.hello, &body[..HELLO_BYTES]],
            &body[HELLO_BYTES..],
        )?;
        let vols = encode_volumes(volumes)?;
        let mac = self.key.tag(&[LABEL_DIALER, &self.hello, body, &vols]);
        let mut out = Vec::new();
        encode_frame(&mut out, FrameKind::Auth, &[&mac, &vols]);
        let mut auth = mac.to_vec();
        auth.extend_from_slice(&vols);
        let peer = PeerSession {
            node_id: self.me.partner_id,
            generation,
            volumes: Vec::new(),
            keys: SessionKeys::derive(&self.key.0, &self.hello, body, &auth),
        };
        Ok((DialerAwaitAccept { peer }, out))
    }
}

/// The dialer after AUTH, waiting for ACCEPT or REJECT.
#[derive(Debug)]
pub struct DialerAwaitAccept {
    peer: PeerSession,
}

impl DialerAwaitAccept {
    pub fn on_reply(self, kind: FrameKind, body: &[u8]) -> Result<PeerSession, WireError> {
        match kind {
            FrameKind::Accept if body.is_empty() => Ok(self.peer),
            FrameKind::Accept => Err(WireError::Malformed {
                what: "ACCEPT",
                detail: "non-empty body".into(),
            }),
            FrameKind::Reject => Err(decode_reject(body)),
            other => Err(WireError::Unexpected {
                got: other,
                state: "waiting for ACCEPT",
            }),
        }
    }
}

/// Recently seen dialer nonces (bounded, oldest forgotten first).
#[derive(Debug, Default)]
pub struct SeenNonces {
    order: std::collections::VecDeque<[u8; NONCE_BYTES]>,
    set: std::collections::HashSet<[u8; NONCE_BYTES]>,
}

impl SeenNonces {
    /// Remembers `nonce`; false when it was already there.
    pub fn insert(&mut self, nonce: [u8; NONCE_BYTES]) -> bool {
        if !self.set.insert(nonce) {
            return false;
        }
        self.order.push_back(nonce);
        if self.order.len() > SEEN_NONCES_MAX {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

/// The side that accepts the connection (the node that stores the partner's records).
#[derive(Debug)]
pub struct Acceptor {
    me: Identity,
    key: PairKey,
    nonce: [u8; NONCE_BYTES],
}

fn failure(error: WireError) -> HandshakeFailure {
    let mut reply = Vec::new();
    let text = match &error {
        // Say no more than necessary to a peer that failed authentication.
        WireError::AuthFailed => "authentication failed".to_string(),
        e => e.to_string(),
    };
    encode_reject(&mut reply, RejectReason::for_error(&error), &text);
    HandshakeFailure { error, reply }
}

impl Acceptor {
    pub fn new(me: Identity, key: PairKey, nonce: [u8; NONCE_BYTES]) -> Acceptor {
        Acceptor { me, key, nonce }
    }

    /// Checks the HELLO; returns the CHALLENGE frame to send.
    pub fn on_hello(
        self,
        kind: FrameKind,
        body: &[u8],
        seen: &mut SeenNonces,
    ) -> Result<(AcceptorAwaitAuth, Vec<u8>), HandshakeFailure> {
        expect(kind, FrameKind::Hello, "waiting for HELLO").map_err(failure)?;
        let (generation, dialer_nonce) = check_hello("HELLO", body, &self.me).map_err(failure)?;
        if body.len() != HELLO_BYTES {
            return Err(failure(WireError::Malformed {
                what: "HELLO",
                detail: format!("{} bytes, expected {HELLO_BYTES}", body.len()),
            }));
        }
        if !seen.insert(dialer_nonce) {
            return Err(failure(WireError::ReplayedHandshake));
        }
        let mut challenge = hello_body(&self.me, &self.nonce);
        let mac = self.key.tag(&[LABEL_ACCEPTOR, body, &challenge]);
        challenge.extend_from_slice(&mac);
        let mut out = Vec::new();
        encode_frame(&mut out, FrameKind::Challenge, &[&challenge]);
        Ok((
            AcceptorAwaitAuth {
                key: self.key,
                hello: body.to_vec(),
                challenge,
                peer_generation: generation,
                peer_id: self.me.partner_id,
            },
            out,
        ))
    }
}

/// The acceptor after CHALLENGE, waiting for AUTH.
#[derive(Debug)]
pub struct AcceptorAwaitAuth {
    key: PairKey,
    hello: Vec<u8>,
    challenge: Vec<u8>,
    peer_generation: u64,
    peer_id: u32,
}

impl AcceptorAwaitAuth {
    /// Checks the dialer's MAC (over our nonce) and decodes its volumes. The caller then sends
    /// [`encode_accept`] (or a REJECT when it cannot keep a volume's copy).
    pub fn on_auth(self, kind: FrameKind, body: &[u8]) -> Result<PeerSession, HandshakeFailure> {
        expect(kind, FrameKind::Auth, "waiting for AUTH").map_err(failure)?;
        if body.len() < MAC_BYTES {
            return Err(failure(WireError::Malformed {
                what: "AUTH",
                detail: "shorter than its MAC".into(),
            }));
        }
        let (mac, vols) = body.split_at(MAC_BYTES);
        self.key
            .verify(&[LABEL_DIALER, &self.hello, &self.challenge, vols], mac)
            .map_err(failure)?;
        let volumes = decode_volumes(vols).map_err(failure)?;
        Ok(PeerSession {
            node_id: self.peer_id,
            generation: self.peer_generation,
            volumes,
            keys: SessionKeys::derive(&self.key.0, &self.hello, &self.challenge, body),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::frame::split_frame;
    use super::*;
    use proptest::prelude::*;

    const PAIR: [u8; 16] = [5; 16];

    fn id(node: u32) -> Identity {
        Identity {
            pair_id: PAIR,
            node_id: node,
            partner_id: 1 - node,
            generation: 10 + u64::from(node),
        }
    }

    fn key(b: u8) -> PairKey {
        PairKey::new(vec![b; 32]).unwrap()
    }

    fn body(frame: &[u8]) -> (FrameKind, &[u8]) {
        let f = split_frame(frame).unwrap().unwrap();
        assert_eq!(f.total, frame.len());
        (f.kind, &frame[f.body_start..f.total])
    }

    fn vols() -> Vec<VolumeAnnounce> {
        vec![VolumeAnnounce {
            volume: 77,
            name: "r5".into(),
            generation: 4,
            log_bytes: 1 << 20,
            store_id: [3; 16],
        }]
    }

    /// Runs a whole handshake; returns what each side learned or the first error.
    fn run(
        d_id: Identity,
        d_key: PairKey,
        a_id: Identity,
        a_key: PairKey,
        seen: &mut SeenNonces,
        d_nonce: [u8; 32],
    ) -> Result<(PeerSession, PeerSession), WireError> {
        let (d, hello) = Dialer::start(d_id, d_key, d_nonce);
        let a = Acceptor::new(a_id, a_key, [9; 32]);
        let (k, b) = body(&hello);
        let (a, challenge) = a.on_hello(k, b, seen).map_err(|f| f.error)?;
        let (k, b) = body(&challenge);
        let (d, auth) = d.on_challenge(k, b, &vols())?;
        let (k, b) = body(&auth);
        let on_a = a.on_auth(k, b).map_err(|f| f.error)?;
        let mut acc = Vec::new();
        encode_accept(&mut acc);
        let (k, b) = body(&acc);
        let on_d = d.on_reply(k, b)?;
        Ok((on_d, on_a))
    }

    #[test]
    fn matching_nodes_complete_the_handshake_and_learn_the_volumes() {
        let (on_d, on_a) = run(
            id(0),
            key(1),
            id(1),
            key(1),
            &mut SeenNonces::default(),
            [1; 32],
        )
        .unwrap();
        assert_eq!(on_d.node_id, 1);
        assert_eq!(on_d.generation, 11);
        assert_eq!(on_a.node_id, 0);
        assert_eq!(on_a.generation, 10);
        assert_eq!(on_a.volumes, vols());
    }

    #[test]
    fn wrong_key_fails_authentication_on_the_dialer() {
        // The acceptor's MAC over the dialer's nonce does not verify with another key.
        let e = run(
            id(0),
            key(1),
            id(1),
            key(2),
            &mut SeenNonces::default(),
            [1; 32],
        );
        assert_eq!(e.unwrap_err(), WireError::AuthFailed);
    }

    #[test]
    fn wrong_key_fails_authentication_on_the_acceptor() {
        let (_d, hello) = Dialer::start(id(0), key(2), [1; 32]);
        let a = Acceptor::new(id(1), key(1), [9; 32]);
        let mut seen = SeenNonces::default();
        let (k, b) = body(&hello);
        let (a, challenge) = a.on_hello(k, b, &mut seen).unwrap();
        // A dialer with the wrong key cannot produce a valid AUTH; forge one with its key.
        let (k, cb) = body(&challenge);
        let d = Dialer {
            me: id(0),
            key: key(2),
            hello: body(&hello).1.to_vec(),
        };
        assert_eq!(
            d.on_challenge(k, cb, &vols()).unwrap_err(),
            WireError::AuthFailed
        );
        let vols_bytes = encode_volumes(&vols()).unwrap();
        let mac = key(2).tag(&[LABEL_DIALER, body(&hello).1, cb, &vols_bytes]);
        let mut auth = Vec::new();
        encode_frame(&mut auth, FrameKind::Auth, &[&mac, &vols_bytes]);
        let (k, b) = body(&auth);
        let f = a.on_auth(k, b).unwrap_err();
        assert_eq!(f.error, WireError::AuthFailed);
        let (rk, rb) = body(&f.reply);
        assert_eq!(rk, FrameKind::Reject);
        assert!(matches!(
            decode_reject(rb),
            WireError::Rejected {
                reason: RejectReason::Auth,
                ..
            }
        ));
    }

    #[test]
    fn wrong_pair_node_and_version_are_typed_errors() {
        let mut other_pair = id(0);
        other_pair.pair_id = [6; 16];
        let e = run(
            other_pair,
            key(1),
            id(1),
            key(1),
            &mut SeenNonces::default(),
            [1; 32],
        );
        assert!(matches!(e, Err(WireError::WrongPair { .. })), "{e:?}");

        let mut impostor = id(0);
        impostor.node_id = 7;
        let e = run(
            impostor,
            key(1),
            id(1),
            key(1),
            &mut SeenNonces::default(),
            [1; 32],
        );
        assert!(
            matches!(e, Err(WireError::WrongNode { found: 7, .. })),
            "{e:?}"
        );

        // A dialer that thinks it talks to node 0 reached node 1.
        let e = run(
            id(0),
            key(1),
            id(0),
            key(1),
            &mut SeenNonces::default(),
            [1; 32],
        );
        assert!(matches!(e, Err(WireError::WrongNode { .. })), "{e:?}");

        assert_eq!(
            hello_of_version_refused(99).error,
            WireError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: 99
            }
        );
    }

    /// A dialer's HELLO with its version field set to `version`, offered to an acceptor: how
    /// it is refused (the error and the REJECT reply).
    fn hello_of_version_refused(version: u32) -> HandshakeFailure {
        let (_d, mut hello) = Dialer::start(id(0), key(1), [1; 32]);
        // Version field at body offset 8 (frame offset 20); re-encode to keep the CRC valid.
        let mut b = body(&hello).1.to_vec();
        b[8..12].copy_from_slice(&version.to_le_bytes());
        hello.clear();
        encode_frame(&mut hello, FrameKind::Hello, &[&b]);
        let a = Acceptor::new(id(1), key(1), [9; 32]);
        let (k, bb) = body(&hello);
        a.on_hello(k, bb, &mut SeenNonces::default()).unwrap_err()
    }

    #[test]
    fn version_2_peer_is_refused_with_a_version_reject() {
        // Version 2 sealed frames with HMAC-SHA256: a node of that release must not get past
        // the handshake (its tags would fail on the first RECORD instead).
        let f = hello_of_version_refused(2);
        assert_eq!(
            f.error,
            WireError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: 2
            }
        );
        let (rk, rb) = body(&f.reply);
        assert_eq!(rk, FrameKind::Reject);
        assert!(matches!(
            decode_reject(rb),
            WireError::Rejected {
                reason: RejectReason::Version,
                ..
            }
        ));
    }

    #[test]
    fn replayed_hello_is_refused() {
        let mut seen = SeenNonces::default();
        run(id(0), key(1), id(1), key(1), &mut seen, [1; 32]).unwrap();
        let e = run(id(0), key(1), id(1), key(1), &mut seen, [1; 32]);
        assert_eq!(e.unwrap_err(), WireError::ReplayedHandshake);
    }

    #[test]
    fn recorded_auth_fails_against_a_fresh_challenge() {
        // Record a complete handshake, then replay the dialer's frames against an acceptor that
        // forgot the nonce (a restart): its fresh nonce makes the recorded AUTH invalid.
        let (d, hello) = Dialer::start(id(0), key(1), [1; 32]);
        let a = Acceptor::new(id(1), key(1), [9; 32]);
        let (k, b) = body(&hello);
        let (_a, challenge) = a.on_hello(k, b, &mut SeenNonces::default()).unwrap();
        let (k, b) = body(&challenge);
        let (_d, auth) = d.on_challenge(k, b, &vols()).unwrap();

        let fresh = Acceptor::new(id(1), key(1), [8; 32]);
        let (k, b) = body(&hello);
        let (fresh, _) = fresh.on_hello(k, b, &mut SeenNonces::default()).unwrap();
        let (k, b) = body(&auth);
        assert_eq!(
            fresh.on_auth(k, b).unwrap_err().error,
            WireError::AuthFailed
        );
    }

    #[test]
    fn recorded_challenge_fails_against_a_fresh_hello() {
        let (d, hello) = Dialer::start(id(0), key(1), [1; 32]);
        let a = Acceptor::new(id(1), key(1), [9; 32]);
        let (k, b) = body(&hello);
        let (_a, challenge) = a.on_hello(k, b, &mut SeenNonces::default()).unwrap();
        drop(d);
        let (d2, _) = Dialer::start(id(0), key(1), [2; 32]);
        let (k, b) = body(&challenge);
        assert_eq!(
            d2.on_challenge(k, b, &vols()).unwrap_err(),
            WireError::AuthFailed
        );
    }

    #[test]
    fn altered_volume_list_fails_authentication() {
        let (d, hello) = Dialer::start(id(0), key(1), [1; 32]);
        let a = Acceptor::new(id(1), key(1), [9; 32]);
        let (k, b) = body(&hello);
        let (a, challenge) = a.on_hello(k, b, &mut SeenNonces::default()).unwrap();
        let (k, b) = body(&challenge);
        let (_d, auth) = d.on_challenge(k, b, &vols()).unwrap();
        let mut ab = body(&auth).1.to_vec();
        let last = ab.len() - 1;
        ab[last] ^= 1; // a letter of the volume name
        let mut forged = Vec::new();
        encode_frame(&mut forged, FrameKind::Auth, &[&ab]);
        let (k, b) = body(&forged);
        assert_eq!(a.on_auth(k, b).unwrap_err().error, WireError::AuthFailed);
    }

    #[test]
    fn volume_names_that_could_leave_the_copy_directory_are_refused() {
        for bad in ["../etc", "a/b", "..", ".", ""] {
            let mut enc = encode_volumes(&vols()).unwrap();
            let v = VolumeAnnounce {
                name: bad.into(),
                ..vols()[0].clone()
            };
            assert!(encode_volumes(std::slice::from_ref(&v)).is_err(), "{bad}");
            // Hand-built list with the bad name, as a hostile peer would send it.
            enc.truncate(8);
            enc.extend_from_slice(&v.volume.to_le_bytes());
            enc.extend_from_slice(&v.generation.to_le_bytes());
            enc.extend_from_slice(&v.log_bytes.to_le_bytes());
            enc.extend_from_slice(&v.store_id);
            enc.extend_from_slice(&(bad.len() as u16).to_le_bytes());
            enc.extend_from_slice(bad.as_bytes());
            assert!(decode_volumes(&enc).is_err(), "{bad}");
        }
    }

    #[test]
    fn short_keys_are_refused_and_debug_hides_the_key() {
        assert!(PairKey::new(vec![1; 8]).is_err());
        let k = PairKey::new(b"super-secret-key-bytes".to_vec()).unwrap();
        assert!(!format!("{k:?}").contains("secret"));
        assert_eq!(k.fingerprint(), k.clone().fingerprint());
        assert_ne!(k.fingerprint(), key(1).fingerprint());
    }

    #[test]
    fn out_of_order_handshake_frames_are_unexpected() {
        let a = Acceptor::new(id(1), key(1), [9; 32]);
        let f = a
            .on_hello(FrameKind::Auth, &[0; 64], &mut SeenNonces::default())
            .unwrap_err();
        assert!(matches!(f.error, WireError::Unexpected { .. }));
    }

    proptest! {
        #[test]
        fn garbage_hello_never_panics(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let a = Acceptor::new(id(1), key(1), [9; 32]);
            let _ = a.on_hello(FrameKind::Hello, &b, &mut SeenNonces::default());
        }

        #[test]
        fn garbage_challenge_and_auth_never_panic(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let (d, hello) = Dialer::start(id(0), key(1), [1; 32]);
            let _ = d.on_challenge(FrameKind::Challenge, &b, &vols());
            let a = Acceptor::new(id(1), key(1), [9; 32]);
            let (k, hb) = body(&hello);
            let (a, _) = a.on_hello(k, hb, &mut SeenNonces::default()).unwrap();
            let _ = a.on_auth(FrameKind::Auth, &b);
            let _ = decode_volumes(&b);
        }

        #[test]
        fn volume_lists_round_trip(names in proptest::collection::vec("[a-z0-9]{1,64}", 0..8)) {
            let vols: Vec<VolumeAnnounce> = names.iter().enumerate().map(|(i, n)| VolumeAnnounce {
                volume: i as u64, name: n.clone(), generation: i as u64 * 3,
                log_bytes: 4096, store_id: [i as u8; 16],
            }).collect();
            let enc = encode_volumes(&vols).unwrap();
            prop_assert_eq!(decode_volumes(&enc).unwrap(), vols);
        }
    }
}
