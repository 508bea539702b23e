//! The status record: what each node of the pair says about itself every heartbeat interval.
//!
//! One record goes out on every path (UDP datagram, interconnect frame, mailbox slot on the shared
//! disks) with the same bytes, so one codec serves all three. The layout is fixed, little-endian,
//! 80 bytes for protocol version 1, and documented in `docs/FORMATS.md` ("Status record").
//!
//! # Why the frame is split into an invariant part and a versioned part
//!
//! A node that cannot decode its partner's records must not conclude that the partner is silent:
//! during a rolling upgrade the partner is alive and speaking a newer protocol, and taking it over
//! would be a split brain. So the first 48 bytes (magic, version, record length, pair id, sender,
//! generation, sequence) and the CRC32C in the last four bytes of the record keep their places in
//! every future version. [`decode`] checks that frame and its CRC before it looks at the version,
//! and reports a different version as [`StatusError::VersionMismatch`] carrying a
//! [`ForeignRecord`] (who sent it and its (generation, sequence)), so the receiver can count it as
//! proof of life and block takeover with a named reason instead of treating it as garbage.
//!
//! # Ordering
//!
//! Records order by [`Stamp`] = (generation G, sequence S). G is persisted by the node and
//! increased at every start; S restarts at 1 in every generation and increases with every record.
//! So every record of a later start orders after every record of an earlier one.
//!
//! # API
//!
//! * [`StatusRecord::encode`] -> `[u8; RECORD_BYTES]`;
//! * [`decode`] (any sender) and [`decode_for`] (also checks pair id and sender);
//! * [`StatusRecord::stamp`] for ordering.
//!
//! CRC32C protects against corruption, not forgery: anyone who can reach the UDP port can forge a
//! record. The interconnect authenticates its frames (see the `wire` module); the UDP path and the
//! mailbox are protected only by the network and disk access controls of the deployment.

use thiserror::Error;

/// `TBST`: first four bytes of every status record.
pub const MAGIC: [u8; 4] = *b"TBST";
/// The status protocol (and record layout) version this code speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// Length of a version-1 record in bytes.
pub const RECORD_BYTES: usize = 80;
/// Smallest record length any version may declare: the invariant frame (48 bytes) plus the CRC.
pub const MIN_FRAME_BYTES: usize = 52;
/// Largest record length any version may declare: one 4 KiB mailbox block.
pub const MAX_FRAME_BYTES: usize = 4096;

/// The two nodes of a pair are numbered 0 and 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(u8);

impl NodeId {
    /// Node 0.
    pub const ZERO: NodeId = NodeId(0);
    /// Node 1.
    pub const ONE: NodeId = NodeId(1);

    /// `Some` for 0 and 1, `None` for anything else.
    pub fn new(id: u8) -> Option<NodeId> {
        (id <= 1).then_some(NodeId(id))
    }

    /// The number, 0 or 1.
    pub fn get(self) -> u8 {
        self.0
    }

    /// The other node of the pair.
    pub fn partner(self) -> NodeId {
        NodeId(1 - self.0)
    }
}

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "node {}", self.0)
    }
}

/// (generation, sequence): the total order of one node's records across all paths and restarts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Stamp {
    /// Increased (and persisted) at every start of the node.
    pub generation: u64,
    /// Increased with every record within a generation; starts at 1.
    pub sequence: u64,
}

impl std::fmt::Display for Stamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "({}, {})", self.generation, self.sequence)
    }
}

/// The state a node announces. Sub-steps (waiting out a lease, replaying a journal) are not on the
/// wire; [`StatusFlags`] carries the facts a partner acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WireState {
    /// Serving its own disks only.
    Normal,
    /// Taking over or holding the partner's disks (see [`StatusFlags::HOLDS_PARTNER_DISKS`]).
    Takeover,
    /// Not operational, holds nothing.
    Stopped,
    /// Starting or recovering, serves nothing yet (possibly waiting for giveback).
    Rebooting,
}

impl WireState {
    fn code(self) -> u8 {
        match self {
            WireState::Normal => 1,
            WireState::Takeover => 2,
            WireState::Stopped => 3,
            WireState::Rebooting => 4,
        }
    }

    fn from_code(code: u8) -> Option<WireState> {
        Some(match code {
            1 => WireState::Normal,
            2 => WireState::Takeover,
            3 => WireState::Stopped,
            4 => WireState::Rebooting,
            _ => return None,
        })
    }
}

/// Flag bits of the status record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct StatusFlags(u32);

impl StatusFlags {
    /// The operator disabled takeover on the sender. Like the seed's DISABLE state it blocks
    /// takeover in both directions: the receiver must not take the sender over either.
    pub const TAKEOVER_DISABLED: StatusFlags = StatusFlags(1 << 0);
    /// The sender's NVRAM mirror with its partner is in sync.
    pub const MIRROR_IN_SYNC: StatusFlags = StatusFlags(1 << 1);
    /// The sender is starting, found its disks held by its partner and waits for giveback.
    pub const WAITING_FOR_GIVEBACK: StatusFlags = StatusFlags(1 << 2);
    /// The sender holds the reservations of its partner's disks (it has preempted them). A node
    /// that reads this in a newer record from its partner has lost its disks.
    pub const HOLDS_PARTNER_DISKS: StatusFlags = StatusFlags(1 << 3);
    /// The sender is giving its partner's disks back.
    pub const GIVEBACK_IN_PROGRESS: StatusFlags = StatusFlags(1 << 4);
    /// Every defined bit.
    pub const ALL: StatusFlags = StatusFlags(0b1_1111);

    /// No flag set.
    pub const fn empty() -> StatusFlags {
        StatusFlags(0)
    }

    /// The raw bits.
    pub fn bits(self) -> u32 {
        self.0
    }

    /// `None` if a bit outside [`StatusFlags::ALL`] is set.
    pub fn from_bits(bits: u32) -> Option<StatusFlags> {
        (bits & !Self::ALL.0 == 0).then_some(StatusFlags(bits))
    }

    /// True if every bit of `other` is set here.
    pub fn contains(self, other: StatusFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Sets or clears the bits of `other`.
    pub fn set(&mut self, other: StatusFlags, on: bool) {
        if on {
            self.0 |= other.0;
        } else {
            self.0 &= !other.0;
        }
    }
}

/// Why a node would refuse to take its partner over right now. Carried in the status record as a
/// bit set so `twinctl status` on either node can show both nodes' reasons.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TakeoverBlocked {
    /// The operator disabled takeover on this node.
    DisabledByOperator,
    /// The operator disabled takeover on the partner (that blocks both directions).
    DisabledOnPartner,
    /// The NVRAM mirror is not in sync (this node's view or the partner's last record): the
    /// partner's journal copy here may be missing acknowledged writes.
    MirrorOutOfSync,
    /// The partner speaks another status protocol version.
    VersionMismatch,
    /// The partner was heard on some path within the detection window.
    PartnerHeard,
    /// This node started less than the detection window ago.
    JustStarted,
    /// This node's own mailbox reads fail, so silence on the mailbox path proves nothing.
    MailboxUnreadable,
    /// This node has not heard its partner since it started (partner's lease, version and mirror
    /// state unknown) and does not already hold the partner's disks.
    PartnerNeverHeard,
    /// This node is not in NORMAL (starting, waiting for giveback, already taking over, ...).
    NotNormal,
    /// This node gave the partner's disks back and the partner has not reported NORMAL since.
    GivebackPending,
    /// The previous takeover attempt failed; an operator takeover is needed to try again.
    PreviousAttemptFailed,
    /// This node's own lease has run out (its mailbox writes fail): it could not write the
    /// partner's disks anyway, and the partner cannot see its TAKEOVER announcement there.
    OwnLeaseExpired,
}

impl TakeoverBlocked {
    /// Every reason, in bit order.
    pub const ALL: [TakeoverBlocked; 12] = [
        TakeoverBlocked::DisabledByOperator,
        TakeoverBlocked::DisabledOnPartner,
        TakeoverBlocked::MirrorOutOfSync,
        TakeoverBlocked::VersionMismatch,
        TakeoverBlocked::PartnerHeard,
        TakeoverBlocked::JustStarted,
        TakeoverBlocked::MailboxUnreadable,
        TakeoverBlocked::PartnerNeverHeard,
        TakeoverBlocked::NotNormal,
        TakeoverBlocked::GivebackPending,
        TakeoverBlocked::PreviousAttemptFailed,
        TakeoverBlocked::OwnLeaseExpired,
    ];

    /// The reason's bit in [`StatusRecord::blockers`].
    pub fn bit(self) -> u32 {
        1 << (self as u32)
    }

    /// A short operator-facing explanation.
    pub fn describe(self) -> &'static str {
        match self {
            TakeoverBlocked::DisabledByOperator => "takeover disabled by the operator on this node",
            TakeoverBlocked::DisabledOnPartner => {
                "takeover disabled by the operator on the partner"
            }
            TakeoverBlocked::MirrorOutOfSync => "NVRAM mirror out of sync",
            TakeoverBlocked::VersionMismatch => "partner speaks another status protocol version",
            TakeoverBlocked::PartnerHeard => "partner heard within the detection window",
            TakeoverBlocked::JustStarted => "this node started less than the detection window ago",
            TakeoverBlocked::MailboxUnreadable => "this node cannot read the mailbox disks",
            TakeoverBlocked::PartnerNeverHeard => "partner not heard since this node started",
            TakeoverBlocked::NotNormal => "this node is not in NORMAL",
            TakeoverBlocked::GivebackPending => "giveback done, partner not yet NORMAL",
            TakeoverBlocked::PreviousAttemptFailed => {
                "previous takeover failed; operator takeover needed"
            }
            TakeoverBlocked::OwnLeaseExpired => {
                "this node's own mailbox writes fail (lease expired)"
            }
        }
    }

    /// Bit set of a list of reasons.
    pub fn to_bits(reasons: &[TakeoverBlocked]) -> u32 {
        reasons.iter().fold(0, |acc, r| acc | r.bit())
    }

    /// The reasons of a bit set (unknown bits are ignored; [`decode`] rejects them earlier).
    pub fn from_bits(bits: u32) -> Vec<TakeoverBlocked> {
        Self::ALL
            .iter()
            .copied()
            .filter(|r| bits & r.bit() != 0)
            .collect()
    }

    fn all_bits() -> u32 {
        Self::to_bits(&Self::ALL)
    }
}

/// One decoded (or to-be-encoded) status record of protocol version [`PROTOCOL_VERSION`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StatusRecord {
    /// Identifies the pair; records of another pair are refused.
    pub pair_id: [u8; 16],
    /// The sender.
    pub node_id: NodeId,
    /// The sender's announced state.
    pub state: WireState,
    /// Facts the partner acts on.
    pub flags: StatusFlags,
    /// The sender's (generation, sequence) of this record.
    pub stamp: Stamp,
    /// The newest (generation, sequence) the sender has received from its partner: a piggy-backed
    /// acknowledgement (zero if none yet).
    pub partner_seen: Stamp,
    /// The sender's lease: it writes its disks only within this many milliseconds of the start of
    /// its last successful mailbox write. The partner waits this long (from hearing the sender
    /// last) before it preempts.
    pub lease_ms: u32,
    /// The sender's heartbeat interval.
    pub interval_ms: u32,
    /// Why the sender would refuse to take its partner over now ([`TakeoverBlocked`] bits).
    pub blockers: u32,
}

/// The invariant frame of a record of another protocol version: enough to prove the sender is
/// alive and to name the mismatch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ForeignRecord {
    /// The version the sender speaks.
    pub version: u16,
    /// The pair id in the record.
    pub pair_id: [u8; 16],
    /// The sender's id byte (not validated: other versions might number differently).
    pub node_id: u8,
    /// The record's (generation, sequence).
    pub stamp: Stamp,
}

/// Why a byte string is not an acceptable status record.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum StatusError {
    /// Fewer bytes than the record declares (or than the frame needs).
    #[error(
        "status record truncated: {len} bytes, need {needed}; the sender or the path cut it short"
    )]
    Truncated {
        /// Bytes received.
        len: usize,
        /// Bytes needed.
        needed: usize,
    },
    /// More bytes than the record declares.
    #[error("status record has {extra} bytes after its declared end; refusing a padded or concatenated record")]
    TrailingBytes {
        /// Bytes after the record.
        extra: usize,
    },
    /// Not a status record at all.
    #[error("not a status record: magic {found:02x?}, expected {MAGIC:02x?}")]
    BadMagic {
        /// The first four bytes.
        found: [u8; 4],
    },
    /// The declared length is impossible (or wrong for this version).
    #[error("status record declares length {declared}, which is invalid for version {version}")]
    BadLength {
        /// The length field.
        declared: u16,
        /// The version field.
        version: u16,
    },
    /// Corrupted in transit or on disk.
    #[error("status record CRC32C mismatch: stored {stored:#010x}, computed {computed:#010x}; corrupted in transit or on disk")]
    BadCrc {
        /// CRC in the record.
        stored: u32,
        /// CRC of the bytes.
        computed: u32,
    },
    /// A well-formed record of another protocol version: the sender is alive but speaks another
    /// protocol. Takeover must be blocked (see [`TakeoverBlocked::VersionMismatch`]).
    #[error("status record from node byte {} speaks protocol version {}, this node speaks {PROTOCOL_VERSION}; upgrade both nodes to the same version", .0.node_id, .0.version)]
    VersionMismatch(ForeignRecord),
    /// The sender byte is neither 0 nor 1.
    #[error("status record names sender {0}, a pair has nodes 0 and 1 only")]
    UnknownNode(u8),
    /// The state byte is not a known state.
    #[error("status record has unknown state code {0}")]
    UnknownState(u8),
    /// Undefined flag bits are set.
    #[error("status record has undefined flag bits {0:#x}")]
    UnknownFlags(u32),
    /// Undefined takeover-blocker bits are set.
    #[error("status record has undefined takeover-blocker bits {0:#x}")]
    UnknownBlockers(u32),
    /// Reserved bytes are not zero.
    #[error("status record has non-zero reserved bytes")]
    NonZeroReserved,
    /// Sequence 0 or generation 0: never sent by a correct node.
    #[error("status record has generation {} sequence {}; both start at 1", .0.generation, .0.sequence)]
    ZeroStamp(Stamp),
    /// A record of another pair (a misconfigured or foreign node on the network or disks).
    #[error("status record belongs to pair {found:02x?}, this is pair {expected:02x?}; check the pair id in both nodes' configs")]
    WrongPair {
        /// This node's pair id.
        expected: [u8; 16],
        /// The record's pair id.
        found: [u8; 16],
    },
    /// A record from an unexpected sender (e.g. our own record looped back).
    #[error("status record sent by {found}, expected {expected}")]
    WrongSender {
        /// The partner's id.
        expected: NodeId,
        /// The record's sender.
        found: NodeId,
    },
}

fn crc(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

impl StatusRecord {
    /// The record's (generation, sequence).
    pub fn stamp(&self) -> Stamp {
        self.stamp
    }

    /// The sender's takeover blockers as a list.
    pub fn blocker_list(&self) -> Vec<TakeoverBlocked> {
        TakeoverBlocked::from_bits(self.blockers)
    }

    /// The 80-byte wire and disk form (see `docs/FORMATS.md`, "Status record").
    pub fn encode(&self) -> [u8; RECORD_BYTES] {
        let mut b = [0u8; RECORD_BYTES];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        b[6..8].copy_from_slice(&(RECORD_BYTES as u16).to_le_bytes());
        b[8..24].copy_from_slice(&self.pair_id);
        b[24] = self.node_id.get();
        b[25] = self.state.code();
        // 26..28 reserved, zero.
        b[28..32].copy_from_slice(&self.flags.bits().to_le_bytes());
        b[32..40].copy_from_slice(&self.stamp.generation.to_le_bytes());
        b[40..48].copy_from_slice(&self.stamp.sequence.to_le_bytes());
        b[48..56].copy_from_slice(&self.partner_seen.generation.to_le_bytes());
        b[56..64].copy_from_slice(&self.partner_seen.sequence.to_le_bytes());
        b[64..68].copy_from_slice(&self.lease_ms.to_le_bytes());
        b[68..72].copy_from_slice(&self.interval_ms.to_le_bytes());
        b[72..76].copy_from_slice(&self.blockers.to_le_bytes());
        let c = crc(&b[..RECORD_BYTES - 4]);
        b[RECORD_BYTES - 4..].copy_from_slice(&c.to_le_bytes());
        b
    }
}

/// Checks the invariant frame (magic, length, CRC) and returns the declared version.
fn check_frame(buf: &[u8]) -> Result<u16, StatusError> {
    if buf.len() < 8 {
        return Err(StatusError::Truncated {
            len: buf.len(),
            needed: MIN_FRAME_BYTES,
        });
    }
    let magic = [buf[0], buf[1], buf[2], buf[3]];
    if magic != MAGIC {
        return Err(StatusError::BadMagic { found: magic });
    }
    let version = u16_at(buf, 4);
    let declared = u16_at(buf, 6);
    let len = declared as usize;
    let len_ok = if version == PROTOCOL_VERSION {
        len == RECORD_BYTES
    } else {
        (MIN_FRAME_BYTES..=MAX_FRAME_BYTES).contains(&len)
    };
    if !len_ok {
        return Err(StatusError::BadLength { declared, version });
    }
    if buf.len() < len {
        return Err(StatusError::Truncated {
            len: buf.len(),
            needed: len,
        });
    }
    if buf.len() > len {
        return Err(StatusError::TrailingBytes {
            extra: buf.len() - len,
        });
    }
    let stored = u32_at(buf, len - 4);
    let computed = crc(&buf[..len - 4]);
    if stored != computed {
        return Err(StatusError::BadCrc { stored, computed });
    }
    Ok(version)
}

/// Decodes a record from any sender of any pair. Never panics, whatever the bytes.
pub fn decode(buf: &[u8]) -> Result<StatusRecord, StatusError> {
    let version = check_frame(buf)?;
    let mut pair_id = [0u8; 16];
    pair_id.copy_from_slice(&buf[8..24]);
    let stamp = Stamp {
        generation: u64_at(buf, 32),
        sequence: u64_at(buf, 40),
    };
    if version != PROTOCOL_VERSION {
        return Err(StatusError::VersionMismatch(ForeignRecord {
            version,
            pair_id,
            node_id: buf[24],
            stamp,
        }));
    }
    let node_id = NodeId::new(buf[24]).ok_or(StatusError::UnknownNode(buf[24]))?;
    let state = WireState::from_code(buf[25]).ok_or(StatusError::UnknownState(buf[25]))?;
    if buf[26] != 0 || buf[27] != 0 {
        return Err(StatusError::NonZeroReserved);
    }
    let flag_bits = u32_at(buf, 28);
    let flags = StatusFlags::from_bits(flag_bits).ok_or(StatusError::UnknownFlags(flag_bits))?;
    if stamp.generation == 0 || stamp.sequence == 0 {
        return Err(StatusError::ZeroStamp(stamp));
    }
    let blockers = u32_at(buf, 72);
    if blockers & !TakeoverBlocked::all_bits() != 0 {
        return Err(StatusError::UnknownBlockers(blockers));
    }
    Ok(StatusRecord {
        pair_id,
        node_id,
        state,
        flags,
        stamp,
        partner_seen: Stamp {
            generation: u64_at(buf, 48),
            sequence: u64_at(buf, 56),
        },
        lease_ms: u32_at(buf, 64),
        interval_ms: u32_at(buf, 68),
        blockers,
    })
}

/// Decodes a record and checks that it belongs to `pair_id` and was sent by `expected_sender`.
/// A foreign-version record of another pair is reported as [`StatusError::WrongPair`], not as a
/// version mismatch, so a stranger on the network cannot block our takeover.
pub fn decode_for(
    buf: &[u8],
    pair_id: &[u8; 16],
    expected_sender: NodeId,
) -> Result<StatusRecord, StatusError> {
    match decode(buf) {
        Ok(r) => {
            if r.pair_id != *pair_id {
                return Err(StatusError::WrongPair {
                    expected: *pair_id,
                    found: r.pair_id,
                });
            }
            if r.node_id != expected_sender {
                return Err(StatusError::WrongSender {
                    expected: expected_sender,
                    found: r.node_id,
                });
            }
            Ok(r)
        }
        Err(StatusError::VersionMismatch(f)) if f.pair_id != *pair_id => {
            Err(StatusError::WrongPair {
                expected: *pair_id,
                found: f.pair_id,
            })
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StatusRecord {
        StatusRecord {
            pair_id: [7; 16],
            node_id: NodeId::ONE,
            state: WireState::Takeover,
            flags: StatusFlags::MIRROR_IN_SYNC,
            stamp: Stamp {
                generation: 3,
                sequence: 99,
            },
            partner_seen: Stamp {
                generation: 2,
                sequence: 5,
            },
            lease_ms: 400,
            interval_ms: 100,
            blockers: TakeoverBlocked::PartnerHeard.bit(),
        }
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let r = sample();
        assert_eq!(decode(&r.encode()), Ok(r));
    }

    #[test]
    fn stamps_order_by_generation_then_sequence() {
        let a = Stamp {
            generation: 1,
            sequence: 100,
        };
        let b = Stamp {
            generation: 2,
            sequence: 1,
        };
        assert!(a < b);
        assert!(
            Stamp {
                generation: 2,
                sequence: 2
            } > b
        );
    }

    #[test]
    fn other_version_is_reported_as_mismatch_with_its_sender() {
        let mut b = sample().encode().to_vec();
        b[4..6].copy_from_slice(&2u16.to_le_bytes());
        let c = crc(&b[..RECORD_BYTES - 4]);
        b[RECORD_BYTES - 4..].copy_from_slice(&c.to_le_bytes());
        match decode(&b) {
            Err(StatusError::VersionMismatch(f)) => {
                assert_eq!(f.version, 2);
                assert_eq!(f.node_id, 1);
                assert_eq!(f.stamp, sample().stamp);
            }
            other => panic!("expected a version mismatch, got {other:?}"),
        }
    }

    #[test]
    fn wrong_pair_and_wrong_sender_are_refused() {
        let b = sample().encode();
        assert!(matches!(
            decode_for(&b, &[8; 16], NodeId::ONE),
            Err(StatusError::WrongPair { .. })
        ));
        assert!(matches!(
            decode_for(&b, &[7; 16], NodeId::ZERO),
            Err(StatusError::WrongSender { .. })
        ));
        assert!(decode_for(&b, &[7; 16], NodeId::ONE).is_ok());
    }

    #[test]
    fn truncated_and_padded_records_are_refused() {
        let b = sample().encode();
        assert!(matches!(
            decode(&b[..79]),
            Err(StatusError::Truncated { .. })
        ));
        assert!(matches!(
            decode(&b[..3]),
            Err(StatusError::Truncated { .. })
        ));
        let mut long = b.to_vec();
        long.push(0);
        assert!(matches!(
            decode(&long),
            Err(StatusError::TrailingBytes { extra: 1 })
        ));
    }
}
