//! The fixed-newstyle handshake: greeting, client flags and option haggling up to the moment
//! the client enters transmission (`NBD_OPT_EXPORT_NAME`, or `NBD_OPT_GO` answered with ACK).
//!
//! Supported options: `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO` (with `NBD_INFO_EXPORT`,
//! `NAME`, `DESCRIPTION`, `BLOCK_SIZE`), `STRUCTURED_REPLY`, `LIST_META_CONTEXT` and
//! `SET_META_CONTEXT` (`base:allocation` only). `STARTTLS` is refused with
//! `NBD_REP_ERR_POLICY` (TLS is not configured); any other option gets `NBD_REP_ERR_UNSUP`.
//! Option data longer than `max_option_bytes` is skipped without buffering and answered
//! `NBD_REP_ERR_TOO_BIG`; malformed option data gets `NBD_REP_ERR_INVALID`.

use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tracing::{debug, warn};

use crate::device::DeviceCaps;
use crate::error::ConnectionError;
use crate::export::{ExportEntry, ExportRegistry};
use crate::proto::*;

/// The smallest maximum payload we will ever advertise (the spec's preferred-block floor).
const MIN_ADVERTISED_MAX_BYTES: u32 = 4096;
/// The spec's cap on an advertised minimum block size.
const MAX_MIN_BLOCK_BYTES: u32 = 1 << 16;

/// Handshake limits, taken from `ServerConfig`.
#[derive(Debug, Clone, Copy)]
pub struct HandshakeLimits {
    pub max_option_bytes: u32,
    pub max_options: u32,
    pub max_request_bytes: u32,
}

/// Size constraints in force for one export, as advertised in `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLimits {
    pub min_bytes: u32,
    pub preferred_bytes: u32,
    pub max_bytes: u32,
}

impl BlockLimits {
    /// Sanitises the device's wishes into values the spec allows: min a power of two no larger
    /// than 64 KiB, preferred a power of two >= max(min, 512), max >= preferred and no larger
    /// than the server's request limit.
    pub fn from_caps(caps: &DeviceCaps, max_request_bytes: u32) -> Self {
        let min_bytes = if caps.min_block.is_power_of_two() {
            caps.min_block.min(MAX_MIN_BLOCK_BYTES)
        } else {
            1
        };
        let floor = min_bytes.max(512);
        let preferred_bytes = if caps.preferred_block.is_power_of_two() {
            caps.preferred_block.max(floor)
        } else {
            4096u32.max(floor)
        };
        let max_bytes = caps
            .max_block
            .min(max_request_bytes)
            .max(MIN_ADVERTISED_MAX_BYTES)
            .max(preferred_bytes);
        BlockLimits {
            min_bytes,
            preferred_bytes,
            max_bytes,
        }
    }
}

/// Transmission flags for a device; `SEND_DF` only makes sense with structured replies.
pub fn transmission_flags(caps: &DeviceCaps, structured: bool) -> u16 {
    let mut flags = NBD_FLAG_HAS_FLAGS;
    let set = |flags: &mut u16, cond: bool, bit: u16| {
        if cond {
            *flags |= bit;
        }
    };
    set(&mut flags, caps.read_only, NBD_FLAG_READ_ONLY);
    set(&mut flags, caps.flush, NBD_FLAG_SEND_FLUSH);
    set(&mut flags, caps.fua && !caps.read_only, NBD_FLAG_SEND_FUA);
    set(&mut flags, caps.rotational, NBD_FLAG_ROTATIONAL);
    set(&mut flags, caps.trim && !caps.read_only, NBD_FLAG_SEND_TRIM);
    let zeroes = caps.write_zeroes && !caps.read_only;
    set(&mut flags, zeroes, NBD_FLAG_SEND_WRITE_ZEROES);
    set(
        &mut flags,
        zeroes && caps.fast_zero,
        NBD_FLAG_SEND_FAST_ZERO,
    );
    set(&mut flags, structured, NBD_FLAG_SEND_DF);
    set(&mut flags, caps.multi_conn, NBD_FLAG_CAN_MULTI_CONN);
    set(&mut flags, caps.cache, NBD_FLAG_SEND_CACHE);
    flags
}

/// What the handshake settled for the transmission phase.
pub struct Negotiated {
    pub entry: Arc<ExportEntry>,
    pub structured: bool,
    /// Context id of `base:allocation` when the client selected it for this export.
    pub meta_context: Option<u32>,
    pub flags: u16,
    pub limits: BlockLimits,
}

/// How option haggling ended without entering transmission.
pub enum Outcome {
    Transmission(Negotiated),
    /// The client sent `NBD_OPT_ABORT` (or closed the socket between options).
    Aborted,
}

struct State {
    structured: bool,
    /// `base:allocation` selected by the last `SET_META_CONTEXT`, and for which export.
    meta: Option<(Arc<ExportEntry>, u32)>,
    no_zeroes: bool,
}

/// Runs the server side of the handshake.
pub async fn negotiate<R, W>(
    reader: &mut BufReader<R>,
    writer: &mut BufWriter<W>,
    registry: &ExportRegistry,
    limits: HandshakeLimits,
) -> Result<Outcome, ConnectionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let io = ConnectionError::io;
    let mut greeting = BytesMut::with_capacity(18);
    greeting.put_u64(NBD_MAGIC);
    greeting.put_u64(IHAVEOPT);
    greeting.put_u16(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
    writer.write_all(&greeting).await.map_err(io("greeting"))?;
    writer.flush().await.map_err(io("greeting"))?;

    let client_flags = reader.read_u32().await.map_err(io("client flags"))?;
    if client_flags & !KNOWN_CLIENT_FLAGS != 0 {
        return Err(ConnectionError::UnknownClientFlags(client_flags));
    }
    let fixed = client_flags & NBD_FLAG_C_FIXED_NEWSTYLE != 0;
    let mut state = State {
        structured: false,
        meta: None,
        no_zeroes: client_flags & NBD_FLAG_C_NO_ZEROES != 0,
    };

    let mut out = BytesMut::with_capacity(4096);
    for _ in 0..limits.max_options {
        let mut raw = [0u8; OPTION_HEADER_BYTES];
        match reader.read_exact(&mut raw).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                debug!("client closed the connection during option haggling");
                return Ok(Outcome::Aborted);
            }
            Err(e) => return Err(io("option header")(e)),
        }
        let header = OptionHeader::decode(&raw).map_err(ConnectionError::BadOption)?;
        if !fixed && header.option != NBD_OPT_EXPORT_NAME {
            return Err(ConnectionError::NotFixedNewstyle(header.option));
        }
        if header.len > limits.max_option_bytes {
            if header.option == NBD_OPT_EXPORT_NAME {
                return Err(ConnectionError::ExportNameTooLong(header.len));
            }
            warn!(
                option = header.option,
                len = header.len,
                "option data longer than {} bytes skipped",
                limits.max_option_bytes
            );
            let skipped = tokio::io::copy(
                &mut (&mut *reader).take(u64::from(header.len)),
                &mut tokio::io::sink(),
            )
            .await
            .map_err(io("oversized option data"))?;
            if skipped != u64::from(header.len) {
                return Ok(Outcome::Aborted);
            }
            out.clear();
            put_option_reply_message(
                &mut out,
                header.option,
                NBD_REP_ERR_TOO_BIG,
                "option data too long",
            );
            send(writer, &out).await?;
            continue;
        }
        let mut data = vec![0u8; header.len as usize];
        reader
            .read_exact(&mut data)
            .await
            .map_err(io("option data"))?;

        out.clear();
        let next = handle_option(header.option, &data, registry, limits, &mut state, &mut out)?;
        send(writer, &out).await?;
        match next {
            Next::Continue => {}
            Next::Abort => return Ok(Outcome::Aborted),
            Next::Transmission(n) => return Ok(Outcome::Transmission(n)),
        }
    }
    Err(ConnectionError::TooManyOptions(limits.max_options))
}

async fn send<W: AsyncWrite + Unpin>(
    writer: &mut BufWriter<W>,
    out: &[u8],
) -> Result<(), ConnectionError> {
    writer
        .write_all(out)
        .await
        .map_err(ConnectionError::io("option reply"))?;
    writer
        .flush()
        .await
        .map_err(ConnectionError::io("option reply"))
}

enum Next {
    Continue,
    Abort,
    Transmission(Negotiated),
}

/// Answers one option into `out`. Pure apart from reading the registry.
fn handle_option(
    option: u32,
    data: &[u8],
    registry: &ExportRegistry,
    limits: HandshakeLimits,
    state: &mut State,
    out: &mut BytesMut,
) -> Result<Next, ConnectionError> {
    let invalid = |out: &mut BytesMut, msg: &str| {
        warn!(option, "invalid option data: {msg}");
        put_option_reply_message(out, option, NBD_REP_ERR_INVALID, msg);
        Ok(Next::Continue)
    };
    match option {
        NBD_OPT_EXPORT_NAME => {
            let name = parse_export_name(data).map_err(ConnectionError::BadOption)?;
            let entry = registry
                .lookup(&name)
                .ok_or(ConnectionError::UnknownExport(name))?;
            let n = negotiated(entry, state, limits);
            out.put_u64(n.entry.export.device.size());
            out.put_u16(n.flags);
            if !state.no_zeroes {
                out.put_bytes(0, EXPORT_NAME_PADDING_BYTES);
            }
            Ok(Next::Transmission(n))
        }
        NBD_OPT_ABORT => {
            put_option_reply(out, option, NBD_REP_ACK, 0);
            Ok(Next::Abort)
        }
        NBD_OPT_LIST => {
            if !data.is_empty() {
                return invalid(out, "NBD_OPT_LIST takes no data");
            }
            for (name, description) in registry.names() {
                put_rep_server(out, &name, &description);
            }
            put_option_reply(out, option, NBD_REP_ACK, 0);
            Ok(Next::Continue)
        }
        NBD_OPT_STARTTLS => {
            if !data.is_empty() {
                return invalid(out, "NBD_OPT_STARTTLS takes no data");
            }
            warn!("client asked for TLS, which is not configured");
            put_option_reply_message(
                out,
                option,
                NBD_REP_ERR_POLICY,
                "TLS is not configured on this server",
            );
            Ok(Next::Continue)
        }
        NBD_OPT_INFO | NBD_OPT_GO => {
            let req = match parse_info_request(data) {
                Ok(r) => r,
                Err(e) => return invalid(out, &e.to_string()),
            };
            let Some(entry) = registry.lookup(&req.name) else {
                warn!(export = %req.name, "client asked for an unknown export");
                put_option_reply_message(
                    out,
                    option,
                    NBD_REP_ERR_UNKNOWN,
                    &format!("no export named {:?}", req.name),
                );
                return Ok(Next::Continue);
            };
            let n = negotiated(entry, state, limits);
            put_info_export(out, option, n.entry.export.device.size(), n.flags);
            if req.requested(NBD_INFO_NAME) {
                put_info_string(out, option, NBD_INFO_NAME, &n.entry.export.name);
            }
            if req.requested(NBD_INFO_DESCRIPTION) && !n.entry.export.description.is_empty() {
                put_info_string(
                    out,
                    option,
                    NBD_INFO_DESCRIPTION,
                    &n.entry.export.description,
                );
            }
            put_info_block_size(
                out,
                option,
                n.limits.min_bytes,
                n.limits.preferred_bytes,
                n.limits.max_bytes,
            );
            put_option_reply(out, option, NBD_REP_ACK, 0);
            if option == NBD_OPT_GO {
                Ok(Next::Transmission(n))
            } else {
                Ok(Next::Continue)
            }
        }
        NBD_OPT_STRUCTURED_REPLY => {
            if !data.is_empty() {
                return invalid(out, "NBD_OPT_STRUCTURED_REPLY takes no data");
            }
            state.structured = true;
            put_option_reply(out, option, NBD_REP_ACK, 0);
            Ok(Next::Continue)
        }
        NBD_OPT_LIST_META_CONTEXT | NBD_OPT_SET_META_CONTEXT => {
            let set = option == NBD_OPT_SET_META_CONTEXT;
            if set {
                // The spec: SET replaces the previous selection even when it fails.
                state.meta = None;
            }
            if !state.structured {
                return invalid(out, "structured replies must be negotiated first");
            }
            let req = match parse_meta_context_request(data) {
                Ok(r) => r,
                Err(e) => return invalid(out, &e.to_string()),
            };
            let Some(entry) = registry.lookup(&req.export) else {
                put_option_reply_message(
                    out,
                    option,
                    NBD_REP_ERR_UNKNOWN,
                    &format!("no export named {:?}", req.export),
                );
                return Ok(Next::Continue);
            };
            if meta_queries_select_allocation(&req.queries, set) {
                let id = if set { BASE_ALLOCATION_CONTEXT_ID } else { 0 };
                put_meta_context(out, option, id, BASE_ALLOCATION);
                if set {
                    state.meta = Some((entry, BASE_ALLOCATION_CONTEXT_ID));
                }
            }
            put_option_reply(out, option, NBD_REP_ACK, 0);
            Ok(Next::Continue)
        }
        _ => {
            debug!(option, "unsupported option");
            put_option_reply_message(out, option, NBD_REP_ERR_UNSUP, "option not supported");
            Ok(Next::Continue)
        }
    }
}

/// Whether a list of metadata context queries selects `base:allocation`. In
/// `LIST_META_CONTEXT` zero queries or the `base:` wildcard match it; in `SET_META_CONTEXT`
/// only the exact name does. Queries for other namespaces are ignored, as the spec requires.
pub fn meta_queries_select_allocation(queries: &[String], set: bool) -> bool {
    if queries.is_empty() {
        return !set;
    }
    queries
        .iter()
        .any(|q| q == BASE_ALLOCATION || (!set && q == BASE_NAMESPACE_QUERY))
}

fn negotiated(entry: Arc<ExportEntry>, state: &State, limits: HandshakeLimits) -> Negotiated {
    let caps = entry.export.device.caps();
    let meta_context = match &state.meta {
        Some((e, id)) if Arc::ptr_eq(e, &entry) => Some(*id),
        _ => None,
    };
    Negotiated {
        structured: state.structured,
        meta_context,
        flags: transmission_flags(&caps, state.structured),
        limits: BlockLimits::from_caps(&caps, limits.max_request_bytes),
        entry,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_follow_caps() {
        let caps = DeviceCaps::default();
        let f = transmission_flags(&caps, false);
        assert_ne!(f & NBD_FLAG_SEND_FLUSH, 0);
        assert_ne!(f & NBD_FLAG_SEND_FUA, 0);
        assert_ne!(f & NBD_FLAG_SEND_TRIM, 0);
        assert_ne!(f & NBD_FLAG_SEND_WRITE_ZEROES, 0);
        assert_ne!(f & NBD_FLAG_SEND_CACHE, 0);
        assert_eq!(
            f & NBD_FLAG_CAN_MULTI_CONN,
            0,
            "multi-conn only when the device says so"
        );
        assert_eq!(f & NBD_FLAG_SEND_DF, 0, "DF needs structured replies");
        assert_eq!(f & NBD_FLAG_SEND_FAST_ZERO, 0);
        assert_ne!(transmission_flags(&caps, true) & NBD_FLAG_SEND_DF, 0);
    }

    #[test]
    fn read_only_device_advertises_no_write_commands() {
        let caps = DeviceCaps {
            read_only: true,
            fast_zero: true,
            multi_conn: true,
            rotational: true,
            ..DeviceCaps::default()
        };
        let f = transmission_flags(&caps, true);
        assert_ne!(f & NBD_FLAG_READ_ONLY, 0);
        assert_ne!(f & NBD_FLAG_CAN_MULTI_CONN, 0);
        assert_ne!(f & NBD_FLAG_ROTATIONAL, 0);
        for bit in [
            NBD_FLAG_SEND_TRIM,
            NBD_FLAG_SEND_WRITE_ZEROES,
            NBD_FLAG_SEND_FAST_ZERO,
            NBD_FLAG_SEND_FUA,
        ] {
            assert_eq!(f & bit, 0);
        }
    }

    #[test]
    fn block_limits_are_sanitised_to_spec_ranges() {
        let caps = DeviceCaps {
            min_block: 3,
            preferred_block: 100,
            max_block: 10,
            ..DeviceCaps::default()
        };
        let l = BlockLimits::from_caps(&caps, 32 << 20);
        assert_eq!(
            l,
            BlockLimits {
                min_bytes: 1,
                preferred_bytes: 4096,
                max_bytes: 4096
            }
        );
        let caps = DeviceCaps {
            min_block: 1 << 20,
            ..DeviceCaps::default()
        };
        let l = BlockLimits::from_caps(&caps, 32 << 20);
        assert_eq!(l.min_bytes, 1 << 16);
        assert!(l.preferred_bytes >= l.min_bytes && l.max_bytes >= l.preferred_bytes);
    }

    #[test]
    fn block_limits_cap_max_at_server_request_limit() {
        let l = BlockLimits::from_caps(&DeviceCaps::default(), 1 << 20);
        assert_eq!(l.max_bytes, 1 << 20);
    }

    #[test]
    fn meta_context_queries_follow_list_and_set_rules() {
        let q = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(meta_queries_select_allocation(&[], false));
        assert!(!meta_queries_select_allocation(&[], true));
        assert!(meta_queries_select_allocation(&q(&["base:"]), false));
        assert!(!meta_queries_select_allocation(&q(&["base:"]), true));
        assert!(meta_queries_select_allocation(
            &q(&["qemu:dirty", "base:allocation"]),
            true
        ));
        assert!(!meta_queries_select_allocation(
            &q(&["base:bogus", "nope"]),
            true
        ));
    }
}
