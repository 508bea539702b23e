//! The fixed-newstyle handshake: greeting, client flags and option haggling up to the moment
//! the client enters transmission (`NBD_OPT_EXPORT_NAME`, or `NBD_OPT_GO` answered with ACK).
//!
//! Supported options: `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO` (with `NBD_INFO_EXPORT`,
//! `NAME`, `DESCRIPTION`, `BLOCK_SIZE`), `STRUCTURED_REPLY`, `LIST_META_CONTEXT` and
//! `SET_META_CONTEXT` (`base:allocation` only), and `STARTTLS` when TLS is configured (refused
//! with `NBD_REP_ERR_POLICY` otherwise); any other option gets `NBD_REP_ERR_UNSUP`. Option data
//! longer than `max_option_bytes` is skipped without buffering and answered
//! `NBD_REP_ERR_TOO_BIG`; malformed option data gets `NBD_REP_ERR_INVALID`.
//!
//! Refusals, checked in this order for every option but `ABORT`: a connection over the server's
//! limit gets its `Refusal` for every option; with TLS required and not yet active, every option
//! but `STARTTLS` gets `NBD_REP_ERR_TLS_REQD`; an export whose allow-list excludes the client
//! answers `NBD_REP_ERR_POLICY` (and is left out of `LIST`). `EXPORT_NAME` cannot carry an
//! error reply, so in each of these cases the connection is closed instead.

use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tracing::{debug, warn};

use crate::access::ClientInfo;
use crate::device::DeviceCaps;
use crate::error::ConnectionError;
use crate::export::{ExportEntry, ExportRegistry};
use crate::proto::*;
use crate::ratelimit::RefusalLogs;
use crate::tls::TlsRequirement;

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

/// How one round of option haggling ended.
pub enum Outcome {
    Transmission(Negotiated),
    /// The client sent `NBD_OPT_ABORT` (or closed the socket between options).
    Aborted,
    /// `NBD_OPT_STARTTLS` was acknowledged: the caller runs the TLS handshake on the stream and
    /// then haggles again from a clean state, as the spec requires.
    StartTls,
}

/// A refusal of every option (for example over the connection limit): the reply type and the
/// message the client sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub reply: u32,
    pub message: &'static str,
}

/// Everything the option handlers consult besides the options themselves.
pub struct Policy<'a> {
    pub registry: &'a ExportRegistry,
    pub limits: HandshakeLimits,
    pub client: &'a ClientInfo,
    /// `None`: TLS is not configured on this server.
    pub tls: Option<TlsRequirement>,
    /// Set when the connection is to be refused whatever it asks.
    pub refusal: Option<Refusal>,
    pub logs: &'a RefusalLogs,
}

impl Policy<'_> {
    fn tls_missing(&self) -> bool {
        self.tls == Some(TlsRequirement::Required) && !self.client.tls
    }

    /// The export, if it exists and this client may use it; logs refusals (rate-limited).
    fn lookup(&self, name: &str) -> Lookup {
        let Some(entry) = self.registry.lookup(name) else {
            return Lookup::Unknown;
        };
        match entry.access.check(self.client) {
            Ok(()) => Lookup::Found(entry),
            Err(why) => {
                if let Some(suppressed) = self.logs.connections.check() {
                    warn!(
                        peer = %self.client.peer,
                        export = %entry.export.name,
                        suppressed,
                        "client refused by the export's allow-list: {why}"
                    );
                }
                Lookup::Denied
            }
        }
    }
}

enum Lookup {
    Found(Arc<ExportEntry>),
    Unknown,
    Denied,
}

/// The client's handshake flags.
#[derive(Debug, Clone, Copy)]
pub struct ClientFlags {
    fixed: bool,
    no_zeroes: bool,
}

struct State {
    structured: bool,
    /// `base:allocation` selected by the last `SET_META_CONTEXT`, and for which export.
    meta: Option<(Arc<ExportEntry>, u32)>,
    no_zeroes: bool,
}

/// Sends the greeting and reads the client's flags.
pub async fn greet<S>(stream: &mut BufReader<S>) -> Result<ClientFlags, ConnectionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let io = ConnectionError::io;
    let mut greeting = BytesMut::with_capacity(18);
    greeting.put_u64(NBD_MAGIC);
    greeting.put_u64(IHAVEOPT);
    greeting.put_u16(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
    stream.write_all(&greeting).await.map_err(io("greeting"))?;
    stream.flush().await.map_err(io("greeting"))?;

    let client_flags = stream.read_u32().await.map_err(io("client flags"))?;
    if client_flags & !KNOWN_CLIENT_FLAGS != 0 {
        return Err(ConnectionError::UnknownClientFlags(client_flags));
    }
    Ok(ClientFlags {
        fixed: client_flags & NBD_FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: client_flags & NBD_FLAG_C_NO_ZEROES != 0,
    })
}

/// Runs option haggling until the client enters transmission, aborts, or switches to TLS.
/// `options_left` counts down across rounds so a STARTTLS does not reset the option limit.
pub async fn negotiate<S>(
    stream: &mut BufReader<S>,
    policy: &Policy<'_>,
    flags: ClientFlags,
    options_left: &mut u32,
) -> Result<Outcome, ConnectionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let io = ConnectionError::io;
    let limits = policy.limits;
    let mut state = State {
        structured: false,
        meta: None,
        no_zeroes: flags.no_zeroes,
    };
    let mut out = BytesMut::with_capacity(4096);
    while *options_left > 0 {
        *options_left -= 1;
        let mut raw = [0u8; OPTION_HEADER_BYTES];
        match stream.read_exact(&mut raw).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                debug!("client closed the connection during option haggling");
                return Ok(Outcome::Aborted);
            }
            Err(e) => return Err(io("option header")(e)),
        }
        let header = OptionHeader::decode(&raw).map_err(ConnectionError::BadOption)?;
        if !flags.fixed && header.option != NBD_OPT_EXPORT_NAME {
            return Err(ConnectionError::NotFixedNewstyle(header.option));
        }
        if header.len > limits.max_option_bytes {
            if header.option == NBD_OPT_EXPORT_NAME {
                return Err(ConnectionError::ExportNameTooLong(header.len));
            }
            debug!(
                option = header.option,
                len = header.len,
                "option data longer than {} bytes skipped",
                limits.max_option_bytes
            );
            let skipped = tokio::io::copy(
                &mut (&mut *stream).take(u64::from(header.len)),
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
            send(stream, &out).await?;
            continue;
        }
        let mut data = vec![0u8; header.len as usize];
        stream
            .read_exact(&mut data)
            .await
            .map_err(io("option data"))?;

        out.clear();
        let next = handle_option(header.option, &data, policy, &mut state, &mut out)?;
        send(stream, &out).await?;
        match next {
            Next::Continue => {}
            Next::Abort => return Ok(Outcome::Aborted),
            Next::StartTls => return Ok(Outcome::StartTls),
            Next::Transmission(n) => return Ok(Outcome::Transmission(n)),
        }
    }
    Err(ConnectionError::TooManyOptions(limits.max_options))
}

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, out: &[u8]) -> Result<(), ConnectionError> {
    stream
        .write_all(out)
        .await
        .map_err(ConnectionError::io("option reply"))?;
    stream
        .flush()
        .await
        .map_err(ConnectionError::io("option reply"))
}

enum Next {
    Continue,
    Abort,
    StartTls,
    Transmission(Negotiated),
}

/// Generic texts for refused exports: the client learns the reply type, the log the reason.
const MSG_NOT_PERMITTED: &str = "access to this export is not permitted";
const MSG_TLS_REQUIRED: &str = "TLS is required: send NBD_OPT_STARTTLS first";

/// Answers one option into `out`. Pure apart from reading the registry and logging.
fn handle_option(
    option: u32,
    data: &[u8],
    policy: &Policy<'_>,
    state: &mut State,
    out: &mut BytesMut,
) -> Result<Next, ConnectionError> {
    let invalid = |out: &mut BytesMut, msg: &str| {
        debug!(option, "invalid option data: {msg}");
        put_option_reply_message(out, option, NBD_REP_ERR_INVALID, msg);
        Ok(Next::Continue)
    };
    if option == NBD_OPT_ABORT {
        put_option_reply(out, option, NBD_REP_ACK, 0);
        return Ok(Next::Abort);
    }
    if let Some(r) = policy.refusal {
        if option == NBD_OPT_EXPORT_NAME {
            return Err(ConnectionError::Refused(r.message));
        }
        put_option_reply_message(out, option, r.reply, r.message);
        return Ok(Next::Continue);
    }
    if option != NBD_OPT_STARTTLS && policy.tls_missing() {
        if option == NBD_OPT_EXPORT_NAME {
            return Err(ConnectionError::TlsRequired);
        }
        put_option_reply_message(out, option, NBD_REP_ERR_TLS_REQD, MSG_TLS_REQUIRED);
        return Ok(Next::Continue);
    }
    match option {
        NBD_OPT_EXPORT_NAME => {
            let name = parse_export_name(data).map_err(ConnectionError::BadOption)?;
            let entry = match policy.lookup(&name) {
                Lookup::Found(e) => e,
                Lookup::Unknown => return Err(ConnectionError::UnknownExport(name)),
                Lookup::Denied => return Err(ConnectionError::AccessDenied(name)),
            };
            let n = negotiated(entry, state, policy.limits);
            out.put_u64(n.entry.export.device.size());
            out.put_u16(n.flags);
            if !state.no_zeroes {
                out.put_bytes(0, EXPORT_NAME_PADDING_BYTES);
            }
            Ok(Next::Transmission(n))
        }
        NBD_OPT_LIST => {
            if !data.is_empty() {
                return invalid(out, "NBD_OPT_LIST takes no data");
            }
            for (name, description) in policy.registry.names_for(policy.client) {
                put_rep_server(out, &name, &description);
            }
            put_option_reply(out, option, NBD_REP_ACK, 0);
            Ok(Next::Continue)
        }
        NBD_OPT_STARTTLS => {
            if !data.is_empty() {
                return invalid(out, "NBD_OPT_STARTTLS takes no data");
            }
            if policy.tls.is_none() {
                debug!(peer = %policy.client.peer, "client asked for TLS, which is not configured");
                put_option_reply_message(
                    out,
                    option,
                    NBD_REP_ERR_POLICY,
                    "TLS is not configured on this server",
                );
                return Ok(Next::Continue);
            }
            if policy.client.tls {
                return invalid(out, "TLS is already active");
            }
            put_option_reply(out, option, NBD_REP_ACK, 0);
            Ok(Next::StartTls)
        }
        NBD_OPT_INFO | NBD_OPT_GO => info_or_go(option, data, policy, state, out),
        NBD_OPT_STRUCTURED_REPLY => {
            if !data.is_empty() {
                return invalid(out, "NBD_OPT_STRUCTURED_REPLY takes no data");
            }
            state.structured = true;
            put_option_reply(out, option, NBD_REP_ACK, 0);
            Ok(Next::Continue)
        }
        NBD_OPT_LIST_META_CONTEXT | NBD_OPT_SET_META_CONTEXT => {
            meta_context(option, data, policy, state, out)
        }
        _ => {
            debug!(option, "unsupported option");
            put_option_reply_message(out, option, NBD_REP_ERR_UNSUP, "option not supported");
            Ok(Next::Continue)
        }
    }
}

/// Answers option data that does not parse with `NBD_REP_ERR_INVALID`.
fn invalid_data(out: &mut BytesMut, option: u32, msg: &str) -> Result<Next, ConnectionError> {
    debug!(option, "invalid option data: {msg}");
    put_option_reply_message(out, option, NBD_REP_ERR_INVALID, msg);
    Ok(Next::Continue)
}

/// `NBD_OPT_INFO` and `NBD_OPT_GO`: the export's size, flags, name, description and block
/// sizes; `GO` then enters transmission.
fn info_or_go(
    option: u32,
    data: &[u8],
    policy: &Policy<'_>,
    state: &mut State,
    out: &mut BytesMut,
) -> Result<Next, ConnectionError> {
    let req = match parse_info_request(data) {
        Ok(r) => r,
        Err(e) => return invalid_data(out, option, &e.to_string()),
    };
    let entry = match policy.lookup(&req.name) {
        Lookup::Found(e) => e,
        Lookup::Unknown => {
            debug!(export = %req.name, "client asked for an unknown export");
            put_option_reply_message(
                out,
                option,
                NBD_REP_ERR_UNKNOWN,
                &format!("no export named {:?}", req.name),
            );
            return Ok(Next::Continue);
        }
        Lookup::Denied => {
            put_option_reply_message(out, option, NBD_REP_ERR_POLICY, MSG_NOT_PERMITTED);
            return Ok(Next::Continue);
        }
    };
    let n = negotiated(entry, state, policy.limits);
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

/// `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
fn meta_context(
    option: u32,
    data: &[u8],
    policy: &Policy<'_>,
    state: &mut State,
    out: &mut BytesMut,
) -> Result<Next, ConnectionError> {
    let set = option == NBD_OPT_SET_META_CONTEXT;
    if set {
        // The spec: SET replaces the previous selection even when it fails.
        state.meta = None;
    }
    let invalid = |out: &mut BytesMut, msg: &str| {
        debug!(option, "invalid option data: {msg}");
        put_option_reply_message(out, option, NBD_REP_ERR_INVALID, msg);
        Ok(Next::Continue)
    };
    if !state.structured {
        return invalid(out, "structured replies must be negotiated first");
    }
    let req = match parse_meta_context_request(data) {
        Ok(r) => r,
        Err(e) => return invalid(out, &e.to_string()),
    };
    let entry = match policy.lookup(&req.export) {
        Lookup::Found(e) => e,
        Lookup::Unknown => {
            put_option_reply_message(
                out,
                option,
                NBD_REP_ERR_UNKNOWN,
                &format!("no export named {:?}", req.export),
            );
            return Ok(Next::Continue);
        }
        Lookup::Denied => {
            put_option_reply_message(out, option, NBD_REP_ERR_POLICY, MSG_NOT_PERMITTED);
            return Ok(Next::Continue);
        }
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
