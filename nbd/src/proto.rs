//! NBD wire format: magic numbers, flag bits, message layouts and pure encode/decode.
//!
//! Nothing here does I/O, so every parser can be fed arbitrary bytes in tests and in the fuzz
//! target. Values and layouts follow the NBD protocol specification (fixed newstyle handshake,
//! simple and structured replies). All integers on the wire are big-endian.

use bytes::{BufMut, BytesMut};

// --- Handshake --------------------------------------------------------------------------------

/// `NBDMAGIC`, first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second server magic, and the magic prefixing every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic prefixing every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;

pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;
/// Every client flag this server understands; any other bit means the connection is closed.
pub const KNOWN_CLIENT_FLAGS: u32 = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;

/// Zero padding after the `NBD_OPT_EXPORT_NAME` reply unless `NO_ZEROES` was negotiated.
pub const EXPORT_NAME_PADDING_BYTES: usize = 124;

pub const NBD_OPT_EXPORT_NAME: u32 = 1;
pub const NBD_OPT_ABORT: u32 = 2;
pub const NBD_OPT_LIST: u32 = 3;
pub const NBD_OPT_STARTTLS: u32 = 5;
pub const NBD_OPT_INFO: u32 = 6;
pub const NBD_OPT_GO: u32 = 7;
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;

pub const NBD_REP_ACK: u32 = 1;
pub const NBD_REP_SERVER: u32 = 2;
pub const NBD_REP_INFO: u32 = 3;
pub const NBD_REP_META_CONTEXT: u32 = 4;
const NBD_REP_ERR_BIT: u32 = 1 << 31;
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_ERR_BIT | 1;
pub const NBD_REP_ERR_POLICY: u32 = NBD_REP_ERR_BIT | 2;
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_ERR_BIT | 3;
pub const NBD_REP_ERR_PLATFORM: u32 = NBD_REP_ERR_BIT | 4;
pub const NBD_REP_ERR_TLS_REQD: u32 = NBD_REP_ERR_BIT | 5;
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_ERR_BIT | 6;
pub const NBD_REP_ERR_SHUTDOWN: u32 = NBD_REP_ERR_BIT | 7;
pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = NBD_REP_ERR_BIT | 8;
pub const NBD_REP_ERR_TOO_BIG: u32 = NBD_REP_ERR_BIT | 9;

pub const NBD_INFO_EXPORT: u16 = 0;
pub const NBD_INFO_NAME: u16 = 1;
pub const NBD_INFO_DESCRIPTION: u16 = 2;
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

/// The one metadata context this server offers.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// `base:` as a query: wildcard in `LIST_META_CONTEXT`, ignored in `SET_META_CONTEXT`.
pub const BASE_NAMESPACE_QUERY: &str = "base:";
/// Context id handed out for `base:allocation` by `SET_META_CONTEXT`.
pub const BASE_ALLOCATION_CONTEXT_ID: u32 = 1;
pub const NBD_STATE_HOLE: u32 = 1 << 0;
pub const NBD_STATE_ZERO: u32 = 1 << 1;

/// Longest string (export name, description, query) the spec allows.
pub const MAX_STRING_BYTES: usize = 4096;

// --- Transmission flags (sent in the handshake) -----------------------------------------------

pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// --- Transmission -----------------------------------------------------------------------------

pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const REQUEST_HEADER_BYTES: usize = 28;
pub const OPTION_HEADER_BYTES: usize = 16;
pub const SIMPLE_REPLY_HEADER_BYTES: usize = 16;
pub const STRUCTURED_REPLY_HEADER_BYTES: usize = 20;

pub const NBD_CMD_READ: u16 = 0;
pub const NBD_CMD_WRITE: u16 = 1;
pub const NBD_CMD_DISC: u16 = 2;
pub const NBD_CMD_FLUSH: u16 = 3;
pub const NBD_CMD_TRIM: u16 = 4;
pub const NBD_CMD_CACHE: u16 = 5;
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;

pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;

pub const NBD_REPLY_TYPE_NONE: u16 = 0;
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const NBD_REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const NBD_REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

/// Most block status descriptors the spec lets one chunk carry.
pub const MAX_BLOCK_STATUS_DESCRIPTORS: usize = 1 << 20;

/// A malformed message: what was wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("bad magic {found:#x}, expected {expected:#x}")]
    BadMagic { expected: u64, found: u64 },
    #[error("message too short: {needed} bytes needed, {got} present")]
    Truncated { needed: usize, got: usize },
    #[error("{field} length {len} runs past the end of the option data ({remaining} bytes left)")]
    LengthPastEnd {
        field: &'static str,
        len: u64,
        remaining: usize,
    },
    #[error("{field} is {len} bytes, longer than the {max}-byte limit")]
    StringTooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{field} is not valid UTF-8")]
    NotUtf8 { field: &'static str },
    #[error("{extra} unexpected trailing bytes after {field}")]
    TrailingBytes { field: &'static str, extra: usize },
}

/// A cursor over option data that never reads past the end.
struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, field: &'static str, len: usize) -> Result<&'a [u8], ProtoError> {
        if len > self.data.len() {
            return Err(ProtoError::LengthPastEnd {
                field,
                len: len as u64,
                remaining: self.data.len(),
            });
        }
        let (head, tail) = self.data.split_at(len);
        self.data = tail;
        Ok(head)
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, ProtoError> {
        let b = self.take(field, 2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, ProtoError> {
        let b = self.take(field, 4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A string prefixed by a 32-bit length.
    fn string(&mut self, field: &'static str) -> Result<String, ProtoError> {
        let len = self.u32(field)?;
        if len as usize > self.data.len() {
            return Err(ProtoError::LengthPastEnd {
                field,
                len: u64::from(len),
                remaining: self.data.len(),
            });
        }
        check_string(field, self.take(field, len as usize)?)
    }

    fn finish(self, field: &'static str) -> Result<(), ProtoError> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::TrailingBytes {
                field,
                extra: self.data.len(),
            })
        }
    }
}

fn check_string(field: &'static str, raw: &[u8]) -> Result<String, ProtoError> {
    if raw.len() > MAX_STRING_BYTES {
        return Err(ProtoError::StringTooLong {
            field,
            len: raw.len(),
            max: MAX_STRING_BYTES,
        });
    }
    std::str::from_utf8(raw)
        .map(str::to_owned)
        .map_err(|_| ProtoError::NotUtf8 { field })
}

/// The fixed 16-byte header of a client option; `len` bytes of data follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

impl OptionHeader {
    pub fn decode(buf: &[u8; OPTION_HEADER_BYTES]) -> Result<Self, ProtoError> {
        let magic = u64::from_be_bytes(array_at(buf, 0));
        if magic != IHAVEOPT {
            return Err(ProtoError::BadMagic {
                expected: IHAVEOPT,
                found: magic,
            });
        }
        Ok(OptionHeader {
            option: u32::from_be_bytes(array_at(buf, 8)),
            len: u32::from_be_bytes(array_at(buf, 12)),
        })
    }

    pub fn encode(&self) -> [u8; OPTION_HEADER_BYTES] {
        let mut out = [0u8; OPTION_HEADER_BYTES];
        out[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        out[8..12].copy_from_slice(&self.option.to_be_bytes());
        out[12..16].copy_from_slice(&self.len.to_be_bytes());
        out
    }
}

fn array_at<const N: usize>(buf: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&buf[at..at + N]);
    out
}

/// Data of `NBD_OPT_EXPORT_NAME`: the whole option data is the name.
pub fn parse_export_name(data: &[u8]) -> Result<String, ProtoError> {
    check_string("export name", data)
}

/// Data of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    /// Requested `NBD_INFO_*` types, in the order sent.
    pub info_types: Vec<u16>,
}

impl InfoRequest {
    pub fn requested(&self, info: u16) -> bool {
        self.info_types.contains(&info)
    }
}

pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest, ProtoError> {
    let mut cur = Cursor { data };
    let name = cur.string("export name")?;
    let count = cur.u16("information request count")?;
    let mut info_types = Vec::with_capacity(usize::from(count).min(cur.data.len() / 2));
    for _ in 0..count {
        info_types.push(cur.u16("information request")?);
    }
    cur.finish("information requests")?;
    Ok(InfoRequest { name, info_types })
}

/// Data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: String,
    pub queries: Vec<String>,
}

pub fn parse_meta_context_request(data: &[u8]) -> Result<MetaContextRequest, ProtoError> {
    let mut cur = Cursor { data };
    let export = cur.string("export name")?;
    let count = cur.u32("query count")?;
    // Each query needs at least its 4-byte length, so a count beyond that is a lie.
    let mut queries = Vec::with_capacity((count as usize).min(cur.data.len() / 4));
    for _ in 0..count {
        queries.push(cur.string("metadata context query")?);
    }
    cur.finish("metadata context queries")?;
    Ok(MetaContextRequest { export, queries })
}

/// Fixed 28-byte header of a transmission request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl RequestHeader {
    pub fn decode(buf: &[u8; REQUEST_HEADER_BYTES]) -> Result<Self, ProtoError> {
        let magic = u32::from_be_bytes(array_at(buf, 0));
        if magic != NBD_REQUEST_MAGIC {
            return Err(ProtoError::BadMagic {
                expected: u64::from(NBD_REQUEST_MAGIC),
                found: u64::from(magic),
            });
        }
        Ok(RequestHeader {
            flags: u16::from_be_bytes(array_at(buf, 4)),
            command: u16::from_be_bytes(array_at(buf, 6)),
            cookie: u64::from_be_bytes(array_at(buf, 8)),
            offset: u64::from_be_bytes(array_at(buf, 16)),
            len: u32::from_be_bytes(array_at(buf, 24)),
        })
    }

    pub fn encode(&self) -> [u8; REQUEST_HEADER_BYTES] {
        let mut out = [0u8; REQUEST_HEADER_BYTES];
        out[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.len.to_be_bytes());
        out
    }
}

// --- Encoders (server -> client) --------------------------------------------------------------

/// Option reply header; `len` bytes of data follow.
pub fn put_option_reply(out: &mut BytesMut, option: u32, reply_type: u32, len: u32) {
    out.put_u64(OPTION_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply_type);
    out.put_u32(len);
}

/// An option reply whose data is a human-readable message (errors) or empty (`ACK`).
pub fn put_option_reply_message(out: &mut BytesMut, option: u32, reply_type: u32, msg: &str) {
    let msg = truncate_str(msg, MAX_STRING_BYTES);
    put_option_reply(out, option, reply_type, msg.len() as u32);
    out.put_slice(msg.as_bytes());
}

/// `NBD_REP_SERVER` for `NBD_OPT_LIST`.
pub fn put_rep_server(out: &mut BytesMut, name: &str, description: &str) {
    let name = truncate_str(name, MAX_STRING_BYTES);
    let description = truncate_str(description, MAX_STRING_BYTES);
    let len = 4 + name.len() + description.len();
    put_option_reply(out, NBD_OPT_LIST, NBD_REP_SERVER, len as u32);
    out.put_u32(name.len() as u32);
    out.put_slice(name.as_bytes());
    out.put_slice(description.as_bytes());
}

pub fn put_info_export(out: &mut BytesMut, option: u32, size: u64, transmission_flags: u16) {
    put_option_reply(out, option, NBD_REP_INFO, 12);
    out.put_u16(NBD_INFO_EXPORT);
    out.put_u64(size);
    out.put_u16(transmission_flags);
}

/// `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION`.
pub fn put_info_string(out: &mut BytesMut, option: u32, info: u16, text: &str) {
    let text = truncate_str(text, MAX_STRING_BYTES);
    put_option_reply(out, option, NBD_REP_INFO, 2 + text.len() as u32);
    out.put_u16(info);
    out.put_slice(text.as_bytes());
}

pub fn put_info_block_size(out: &mut BytesMut, option: u32, min: u32, preferred: u32, max: u32) {
    put_option_reply(out, option, NBD_REP_INFO, 14);
    out.put_u16(NBD_INFO_BLOCK_SIZE);
    out.put_u32(min);
    out.put_u32(preferred);
    out.put_u32(max);
}

pub fn put_meta_context(out: &mut BytesMut, option: u32, context_id: u32, name: &str) {
    put_option_reply(out, option, NBD_REP_META_CONTEXT, 4 + name.len() as u32);
    out.put_u32(context_id);
    out.put_slice(name.as_bytes());
}

pub fn put_simple_reply(out: &mut BytesMut, error: u32, cookie: u64) {
    out.put_u32(NBD_SIMPLE_REPLY_MAGIC);
    out.put_u32(error);
    out.put_u64(cookie);
}

pub fn put_structured_header(out: &mut BytesMut, flags: u16, kind: u16, cookie: u64, len: u32) {
    out.put_u32(NBD_STRUCTURED_REPLY_MAGIC);
    out.put_u16(flags);
    out.put_u16(kind);
    out.put_u64(cookie);
    out.put_u32(len);
}

/// A final `NBD_REPLY_TYPE_ERROR` chunk with a message for humans.
pub fn put_structured_error(out: &mut BytesMut, cookie: u64, error: u32, msg: &str) {
    let msg = truncate_str(msg, MAX_STRING_BYTES);
    put_structured_header(
        out,
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_ERROR,
        cookie,
        6 + msg.len() as u32,
    );
    out.put_u32(error);
    out.put_u16(msg.len() as u16);
    out.put_slice(msg.as_bytes());
}

/// Longest prefix of `s` that fits in `max` bytes without splitting a character.
pub fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request_bytes(
        magic: u32,
        flags: u16,
        cmd: u16,
        cookie: u64,
        off: u64,
        len: u32,
    ) -> [u8; 28] {
        let mut b = RequestHeader {
            flags,
            command: cmd,
            cookie,
            offset: off,
            len,
        }
        .encode();
        b[0..4].copy_from_slice(&magic.to_be_bytes());
        b
    }

    #[test]
    fn request_header_round_trips() {
        let h = RequestHeader {
            flags: NBD_CMD_FLAG_FUA,
            command: NBD_CMD_WRITE,
            cookie: 0xdead_beef_0123_4567,
            offset: 1 << 40,
            len: 4096,
        };
        assert_eq!(RequestHeader::decode(&h.encode()), Ok(h));
    }

    #[test]
    fn request_header_rejects_bad_magic() {
        let b = request_bytes(0x2560_9514, 0, 0, 1, 0, 512);
        assert_eq!(
            RequestHeader::decode(&b),
            Err(ProtoError::BadMagic {
                expected: u64::from(NBD_REQUEST_MAGIC),
                found: 0x2560_9514
            })
        );
    }

    #[test]
    fn request_header_rejects_reply_magic_sent_as_request() {
        let b = request_bytes(NBD_SIMPLE_REPLY_MAGIC, 0, 0, 1, 0, 512);
        assert!(matches!(
            RequestHeader::decode(&b),
            Err(ProtoError::BadMagic { .. })
        ));
    }

    #[test]
    fn request_header_keeps_unknown_command_and_flags_for_validation() {
        let b = request_bytes(NBD_REQUEST_MAGIC, 0xffff, 0xffff, 7, u64::MAX, u32::MAX);
        let h = RequestHeader::decode(&b).unwrap();
        assert_eq!(
            (h.flags, h.command, h.offset, h.len),
            (0xffff, 0xffff, u64::MAX, u32::MAX)
        );
    }

    #[test]
    fn option_header_rejects_bad_magic() {
        let mut b = OptionHeader { option: 7, len: 0 }.encode();
        b[0] ^= 1;
        assert!(matches!(
            OptionHeader::decode(&b),
            Err(ProtoError::BadMagic { .. })
        ));
    }

    #[test]
    fn option_header_round_trips() {
        let h = OptionHeader {
            option: NBD_OPT_GO,
            len: 0xffff_ffff,
        };
        assert_eq!(OptionHeader::decode(&h.encode()), Ok(h));
    }

    fn info_bytes(name: &[u8], name_len: u32, infos: &[u16], count: u16) -> Vec<u8> {
        let mut v = name_len.to_be_bytes().to_vec();
        v.extend_from_slice(name);
        v.extend_from_slice(&count.to_be_bytes());
        for i in infos {
            v.extend_from_slice(&i.to_be_bytes());
        }
        v
    }

    #[test]
    fn info_request_parses_name_and_infos() {
        let b = info_bytes(b"disk0", 5, &[NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME], 2);
        let r = parse_info_request(&b).unwrap();
        assert_eq!(r.name, "disk0");
        assert!(r.requested(NBD_INFO_BLOCK_SIZE));
        assert!(!r.requested(NBD_INFO_DESCRIPTION));
    }

    #[test]
    fn info_request_accepts_empty_name_for_default_export() {
        let r = parse_info_request(&info_bytes(b"", 0, &[], 0)).unwrap();
        assert_eq!(r.name, "");
        assert!(r.info_types.is_empty());
    }

    #[test]
    fn info_request_rejects_name_length_past_end() {
        let b = info_bytes(b"disk0", 500, &[], 0);
        assert!(matches!(
            parse_info_request(&b),
            Err(ProtoError::LengthPastEnd {
                field: "export name",
                ..
            })
        ));
    }

    #[test]
    fn info_request_rejects_huge_name_length_without_allocating() {
        let b = info_bytes(b"", u32::MAX, &[], 0);
        assert!(matches!(
            parse_info_request(&b),
            Err(ProtoError::LengthPastEnd { .. })
        ));
    }

    #[test]
    fn info_request_rejects_info_count_past_end() {
        let b = info_bytes(b"a", 1, &[1], 3);
        assert!(matches!(
            parse_info_request(&b),
            Err(ProtoError::LengthPastEnd {
                field: "information request",
                ..
            })
        ));
    }

    #[test]
    fn info_request_rejects_trailing_bytes() {
        let mut b = info_bytes(b"a", 1, &[1], 1);
        b.push(0);
        assert!(matches!(
            parse_info_request(&b),
            Err(ProtoError::TrailingBytes { extra: 1, .. })
        ));
    }

    #[test]
    fn info_request_rejects_missing_count() {
        let b = 1u32
            .to_be_bytes()
            .iter()
            .copied()
            .chain(*b"a")
            .collect::<Vec<_>>();
        assert!(matches!(
            parse_info_request(&b),
            Err(ProtoError::LengthPastEnd { .. })
        ));
    }

    #[test]
    fn info_request_rejects_short_data() {
        assert!(parse_info_request(&[0, 0]).is_err());
        assert!(parse_info_request(&[]).is_err());
    }

    #[test]
    fn info_request_rejects_non_utf8_name() {
        let b = info_bytes(&[0xff, 0xfe], 2, &[], 0);
        assert_eq!(
            parse_info_request(&b),
            Err(ProtoError::NotUtf8 {
                field: "export name"
            })
        );
    }

    #[test]
    fn export_name_rejects_overlong_name() {
        let name = vec![b'a'; MAX_STRING_BYTES + 1];
        assert!(matches!(
            parse_export_name(&name),
            Err(ProtoError::StringTooLong { .. })
        ));
        assert_eq!(parse_export_name(b"x").unwrap(), "x");
    }

    fn meta_bytes(export: &str, queries: &[&str], count: u32) -> Vec<u8> {
        let mut v = (export.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(export.as_bytes());
        v.extend_from_slice(&count.to_be_bytes());
        for q in queries {
            v.extend_from_slice(&(q.len() as u32).to_be_bytes());
            v.extend_from_slice(q.as_bytes());
        }
        v
    }

    #[test]
    fn meta_context_request_parses_queries() {
        let b = meta_bytes("e", &["base:allocation", "qemu:dirty"], 2);
        let r = parse_meta_context_request(&b).unwrap();
        assert_eq!(r.export, "e");
        assert_eq!(r.queries, vec!["base:allocation", "qemu:dirty"]);
    }

    #[test]
    fn meta_context_request_rejects_query_count_that_lies() {
        let b = meta_bytes("e", &["base:allocation"], 1_000_000);
        assert!(matches!(
            parse_meta_context_request(&b),
            Err(ProtoError::LengthPastEnd { .. })
        ));
    }

    #[test]
    fn meta_context_request_rejects_query_length_past_end() {
        let mut b = meta_bytes("e", &[], 1);
        b.extend_from_slice(&100u32.to_be_bytes());
        b.extend_from_slice(b"base:");
        assert!(matches!(
            parse_meta_context_request(&b),
            Err(ProtoError::LengthPastEnd {
                field: "metadata context query",
                ..
            })
        ));
    }

    #[test]
    fn meta_context_request_rejects_trailing_bytes() {
        let mut b = meta_bytes("e", &["base:"], 1);
        b.extend_from_slice(b"zz");
        assert!(matches!(
            parse_meta_context_request(&b),
            Err(ProtoError::TrailingBytes { extra: 2, .. })
        ));
    }

    #[test]
    fn option_reply_encodes_header_then_message() {
        let mut out = BytesMut::new();
        put_option_reply_message(&mut out, NBD_OPT_STARTTLS, NBD_REP_ERR_POLICY, "no");
        assert_eq!(&out[0..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[8..12], &NBD_OPT_STARTTLS.to_be_bytes());
        assert_eq!(&out[12..16], &NBD_REP_ERR_POLICY.to_be_bytes());
        assert_eq!(&out[16..20], &2u32.to_be_bytes());
        assert_eq!(&out[20..], b"no");
    }

    #[test]
    fn structured_error_encodes_length_of_payload() {
        let mut out = BytesMut::new();
        put_structured_error(&mut out, 9, NBD_EINVAL, "bad");
        assert_eq!(out.len(), STRUCTURED_REPLY_HEADER_BYTES + 6 + 3);
        assert_eq!(&out[16..20], &9u32.to_be_bytes());
        assert_eq!(&out[20..24], &NBD_EINVAL.to_be_bytes());
    }

    #[test]
    fn truncate_str_never_splits_a_character() {
        assert_eq!(truncate_str("héllo", 2), "h");
        assert_eq!(truncate_str("abc", 10), "abc");
    }
}
