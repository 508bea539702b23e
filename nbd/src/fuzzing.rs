//! Entry points shared by the `cargo fuzz` target (`nbd/fuzz/`) and the smoke test in the
//! default test suite: arbitrary bytes go through every pure parser, then through a whole
//! server session as the client's side of the stream. Neither may panic or hang.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::device::DeviceCaps;
use crate::export::Export;
use crate::mem::MemDevice;
use crate::proto::*;
use crate::server::{Server, ServerConfig};
use crate::transmission::{check_request, SessionLimits};

/// Size of the device behind the fuzzed session: small, so valid-looking reads stay cheap.
const FUZZ_DEVICE_BYTES: usize = 256 << 10;
/// Most server output `fuzz_session` keeps for inspection.
const FUZZ_OUTPUT_KEEP_BYTES: usize = 1 << 20;
/// A session that does not finish in this time is a hang.
const FUZZ_SESSION_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs `data` through every pure decoder and the request validator.
pub fn fuzz_parsers(data: &[u8]) {
    let _ = parse_info_request(data);
    let _ = parse_meta_context_request(data);
    let _ = parse_export_name(data);
    if let Ok(raw) =
        <&[u8; OPTION_HEADER_BYTES]>::try_from(data.get(..OPTION_HEADER_BYTES).unwrap_or(&[]))
    {
        let _ = OptionHeader::decode(raw);
    }
    let caps = DeviceCaps::default();
    for chunk in data.chunks_exact(REQUEST_HEADER_BYTES) {
        let Ok(raw) = <&[u8; REQUEST_HEADER_BYTES]>::try_from(chunk) else {
            continue;
        };
        if let Ok(h) = RequestHeader::decode(raw) {
            for structured in [false, true] {
                let s = SessionLimits {
                    size_bytes: FUZZ_DEVICE_BYTES as u64,
                    flags: crate::handshake::transmission_flags(&caps, structured),
                    structured,
                    meta_context: structured.then_some(BASE_ALLOCATION_CONTEXT_ID),
                    block: crate::handshake::BlockLimits::from_caps(&caps, 1 << 20),
                };
                let _ = check_request(&h, &s);
            }
        }
    }
}

/// Plays `data` as everything a client sends on one connection (after the server greeting),
/// against a server with one in-memory export named `fuzz` that is also the default.
/// Returns what the server sent back (a bounded prefix), so tests can check a session got deep.
pub fn fuzz_session(data: &[u8]) -> Vec<u8> {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return Vec::new();
    };
    rt.block_on(async {
        let server = Server::new(ServerConfig {
            max_request_bytes: 1 << 20,
            max_inflight_bytes_per_connection: 4 << 20,
            handshake_timeout: Duration::from_secs(2),
            ..ServerConfig::default()
        });
        let device = MemDevice::with_caps(
            FUZZ_DEVICE_BYTES,
            DeviceCaps {
                fast_zero: true,
                ..DeviceCaps::default()
            },
        );
        if server
            .add_export(Export {
                name: "fuzz".into(),
                description: "fuzz target".into(),
                device: Arc::new(device),
            })
            .is_err()
        {
            return Vec::new();
        }
        let _ = server.set_default_export(Some("fuzz".into()));
        let (client, server_side) = tokio::io::duplex(64 << 10);
        let serve = server.handle_connection(server_side, "fuzz");
        let (mut rd, mut wr) = tokio::io::split(client);
        let input = data.to_vec();
        let feed = async move {
            let _ = wr.write_all(&input).await;
            let _ = wr.shutdown().await;
        };
        let drain = async move {
            let mut out = Vec::new();
            let mut buf = vec![0u8; 64 << 10];
            while let Ok(n) = rd.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                // Keep only a bounded prefix; the rest is read and dropped.
                let keep = n.min(FUZZ_OUTPUT_KEEP_BYTES.saturating_sub(out.len()));
                out.extend_from_slice(&buf[..keep]);
            }
            out
        };
        let all = async {
            let (_, _, out) = tokio::join!(serve, feed, drain);
            out
        };
        tokio::time::timeout(FUZZ_SESSION_TIMEOUT, all)
            .await
            .unwrap_or_default()
    })
}

/// Both of the above.
pub fn fuzz_one(data: &[u8]) {
    fuzz_parsers(data);
    let _ = fuzz_session(data);
}
