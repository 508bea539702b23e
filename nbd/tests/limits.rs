//! The server's limits (issue 12, item 10): the configured maximum request size is advertised
//! and honoured, a connection limit refuses extra clients during the handshake, every command
//! is charged the memory it can allocate, refusal logs are rate-limited, clients get generic
//! error messages, and shutdown closes a client that stopped reading within the grace period.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use common::{LogCapture, Raw};
use tokio::io::DuplexStream;
use twinblock_nbd::mem::MemDevice;
use twinblock_nbd::proto::*;
use twinblock_nbd::{
    BlockDevice, DeviceCaps, DeviceError, DeviceResult, Export, Extent, Server, ServerConfig,
    ZeroFlags,
};

const MIB: u32 = 1 << 20;

fn server(config: ServerConfig, device: Arc<dyn BlockDevice>) -> Server {
    let server = Server::new(config);
    server
        .add_export(Export {
            name: "d".into(),
            description: String::new(),
            device,
        })
        .unwrap();
    server
}

/// Connects a duplex client served by `server` in a task.
async fn connect(server: &Server) -> Raw<DuplexStream> {
    let (client, server_side) = tokio::io::duplex(4 << 20);
    let s = server.clone();
    tokio::spawn(async move { s.handle_connection(server_side, "test").await });
    Raw::start(client).await
}

#[tokio::test]
async fn max_request_above_32_mib_is_advertised_and_served() {
    let len = 40 * MIB;
    let dev = Arc::new(MemDevice::new(48 << 20));
    let s = server(
        ServerConfig {
            max_request_bytes: len,
            ..ServerConfig::default()
        },
        dev,
    );
    let mut c = connect(&s).await;
    let info = c.go("d").await.unwrap();
    assert_eq!(info.block.unwrap().2, len, "NBD_INFO_BLOCK_SIZE maximum");
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    c.request(NBD_CMD_WRITE, 1, 0, len, &data).await;
    assert_eq!(c.simple(0).await.0, 0, "a 40 MiB write is served");
    c.request(NBD_CMD_READ, 2, 0, len, &[]).await;
    let (err, cookie, back) = c.simple(len as usize).await;
    assert_eq!((err, cookie), (0, 2));
    assert!(back == data, "a 40 MiB read returns what was written");
    c.request(NBD_CMD_READ, 3, 0, len + 1, &[]).await;
    assert_eq!(c.simple(0).await.0, NBD_EINVAL, "one byte more is refused");
}

#[tokio::test]
async fn max_request_is_capped_at_the_documented_maximum() {
    let s = server(
        ServerConfig {
            max_request_bytes: 256 * MIB,
            ..ServerConfig::default()
        },
        Arc::new(MemDevice::new(1 << 20)),
    );
    assert_eq!(
        s.config().max_request_bytes,
        twinblock_nbd::MAX_REQUEST_BYTES_LIMIT
    );
    let mut c = connect(&s).await;
    assert_eq!(
        c.go("d").await.unwrap().block.unwrap().2,
        twinblock_nbd::MAX_REQUEST_BYTES_LIMIT
    );
}

#[tokio::test]
async fn clients_over_the_connection_limit_are_refused_during_the_handshake() {
    let logs = LogCapture::default();
    let _guard = logs.install();
    let s = server(
        ServerConfig {
            max_connections: 1,
            ..ServerConfig::default()
        },
        Arc::new(MemDevice::new(1 << 20)),
    );
    let mut first = connect(&s).await;
    first.go("d").await.unwrap();

    let mut second = connect(&s).await;
    let refused = second.go("d").await.unwrap_err();
    assert_eq!(refused.kind, NBD_REP_ERR_POLICY);
    assert!(
        refused.message().contains("connection limit"),
        "{}",
        refused.message()
    );
    assert!(logs.count("nbd.max_connections") >= 1, "{}", logs.text());
    second.option(NBD_OPT_ABORT, &[]).await;
    assert_eq!(second.option_reply().await.kind, NBD_REP_ACK);

    first.request(NBD_CMD_READ, 1, 0, 512, &[]).await;
    assert_eq!(
        first.simple(512).await.0,
        0,
        "the admitted client is unaffected"
    );
    first.request(NBD_CMD_DISC, 2, 0, 0, &[]).await;
    assert!(first.closed().await);

    let deadline = Instant::now() + Duration::from_secs(5);
    while s.active_connections() > 0 {
        assert!(Instant::now() < deadline, "connection slot not given back");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut third = connect(&s).await;
    third.go("d").await.expect("a slot is free again");
}

/// A device that records how many of its slow commands run at once.
struct Probe {
    inner: MemDevice,
    zero_scratch_bytes: u32,
    active: AtomicUsize,
    max_active: AtomicUsize,
}

impl Probe {
    fn new(zero_scratch_bytes: u32) -> Arc<Probe> {
        Arc::new(Probe {
            inner: MemDevice::new(1 << 20),
            zero_scratch_bytes,
            active: AtomicUsize::new(0),
            max_active: AtomicUsize::new(0),
        })
    }

    async fn slow(&self) {
        let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_active.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.active.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl BlockDevice for Probe {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn caps(&self) -> DeviceCaps {
        DeviceCaps {
            zero_scratch_bytes: self.zero_scratch_bytes,
            ..DeviceCaps::default()
        }
    }
    async fn read(&self, offset: u64, len: u32) -> DeviceResult<Bytes> {
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> DeviceResult<()> {
        self.inner.write(offset, data, fua).await
    }
    async fn flush(&self) -> DeviceResult<()> {
        Ok(())
    }
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> DeviceResult<()> {
        self.slow().await;
        self.inner.trim(offset, len, fua).await
    }
    async fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> DeviceResult<()> {
        self.slow().await;
        self.inner.write_zeroes(offset, len, flags).await
    }
    async fn block_status(&self, offset: u64, len: u32) -> DeviceResult<Vec<Extent>> {
        self.slow().await;
        self.inner.block_status(offset, len).await
    }
}

/// The smallest budget: one 4 KiB request plus overhead.
fn tight_budget() -> ServerConfig {
    ServerConfig {
        max_request_bytes: 4096,
        max_inflight_bytes_per_connection: 0,
        ..ServerConfig::default()
    }
}

/// Sends `n` copies of a request at once and waits for every reply; returns how many ran on
/// the device at the same time.
async fn concurrency(probe: &Arc<Probe>, command: u16, structured: bool, n: u64) -> usize {
    let s = server(tight_budget(), probe.clone());
    let mut c = connect(&s).await;
    if structured {
        c.option(NBD_OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(c.option_reply().await.kind, NBD_REP_ACK);
        let mut meta = 1u32.to_be_bytes().to_vec();
        meta.extend_from_slice(b"d");
        meta.extend_from_slice(&1u32.to_be_bytes());
        meta.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
        meta.extend_from_slice(BASE_ALLOCATION.as_bytes());
        c.option(NBD_OPT_SET_META_CONTEXT, &meta).await;
        assert_eq!(c.option_reply().await.kind, NBD_REP_META_CONTEXT);
        assert_eq!(c.option_reply().await.kind, NBD_REP_ACK);
    }
    c.go("d").await.unwrap();
    for i in 0..n {
        c.request(command, i, i * 4096, 4096, &[]).await;
    }
    for _ in 0..n {
        if structured {
            let (flags, kind, _, _) = c.chunk().await;
            assert_eq!(kind, NBD_REPLY_TYPE_BLOCK_STATUS);
            assert_ne!(flags & NBD_REPLY_FLAG_DONE, 0);
        } else {
            assert_eq!(c.simple(0).await.0, 0);
        }
    }
    probe.max_active.load(Ordering::SeqCst)
}

#[tokio::test]
async fn zeroing_is_charged_the_devices_scratch_memory() {
    let charged = Probe::new(4096);
    assert_eq!(
        concurrency(&charged, NBD_CMD_WRITE_ZEROES, false, 3).await,
        1,
        "each 4 KiB zero takes the whole 4.5 KiB budget: they run one at a time"
    );
    assert_eq!(
        concurrency(&Probe::new(4096), NBD_CMD_TRIM, false, 3).await,
        1
    );
    // The same requests on a device that needs no scratch memory overlap, so the test can see
    // concurrency when it happens.
    assert!(concurrency(&Probe::new(0), NBD_CMD_WRITE_ZEROES, false, 3).await > 1);
}

#[tokio::test]
async fn block_status_is_charged_its_extent_lists() {
    assert_eq!(
        concurrency(&Probe::new(0), NBD_CMD_BLOCK_STATUS, true, 3).await,
        1,
        "a 4 KiB block status may carry 4096 extents, more than the budget: one at a time"
    );
}

#[test]
fn request_costs_follow_what_each_command_allocates() {
    use twinblock_nbd::transmission::{request_cost_bytes, Command, REQUEST_OVERHEAD_BYTES};
    let big = u32::MAX;
    assert_eq!(
        request_cost_bytes(Command::Read, 4096, 0, big),
        REQUEST_OVERHEAD_BYTES + 4096
    );
    assert_eq!(
        request_cost_bytes(Command::Write, 100, 0, big),
        REQUEST_OVERHEAD_BYTES + 100
    );
    assert_eq!(
        request_cost_bytes(Command::WriteZeroes, 8 * MIB, 0, big),
        REQUEST_OVERHEAD_BYTES
    );
    assert_eq!(
        request_cost_bytes(Command::WriteZeroes, 8 * MIB, MIB, big),
        REQUEST_OVERHEAD_BYTES + MIB
    );
    assert_eq!(
        request_cost_bytes(Command::Trim, 512, MIB, big),
        REQUEST_OVERHEAD_BYTES + 512
    );
    assert_eq!(
        request_cost_bytes(Command::Cache, 8 * MIB, MIB, big),
        REQUEST_OVERHEAD_BYTES
    );
    assert!(request_cost_bytes(Command::BlockStatus, MIB, 0, big) > 64 << 10);
    assert_eq!(
        request_cost_bytes(Command::Read, 8 * MIB, 0, 4608),
        4608,
        "capped at the budget"
    );
}

#[tokio::test]
async fn refused_requests_log_a_bounded_number_of_lines() {
    let logs = LogCapture::default();
    let _guard = logs.install();
    let s = server(ServerConfig::default(), Arc::new(MemDevice::new(1 << 20)));
    let mut c = connect(&s).await;
    c.go("d").await.unwrap();
    let n = 200;
    for i in 0..n {
        c.request(NBD_CMD_READ, i, 2 << 20, 512, &[]).await;
        assert_eq!(c.simple(0).await.0, NBD_EINVAL);
    }
    let lines = logs.count("request refused");
    assert!(lines >= 1, "refusals are logged at all: {}", logs.text());
    assert!(
        lines <= twinblock_nbd::ratelimit::REFUSAL_LOG_BURST as usize,
        "{lines} log lines for {n} refusals"
    );
}

/// A device whose reads fail with an error naming a member file.
struct Failing;

const SECRET_PATH: &str = "/srv/secret/array0/member3.img";

#[async_trait]
impl BlockDevice for Failing {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn caps(&self) -> DeviceCaps {
        DeviceCaps::default()
    }
    async fn read(&self, _offset: u64, _len: u32) -> DeviceResult<Bytes> {
        Err(DeviceError::Io(std::io::Error::other(format!(
            "read of 512 bytes at 0 on {SECRET_PATH} failed: Input/output error"
        ))))
    }
    async fn write(&self, _offset: u64, _data: Bytes, _fua: bool) -> DeviceResult<()> {
        Err(DeviceError::Other(format!("{SECRET_PATH}: journal full")))
    }
    async fn flush(&self) -> DeviceResult<()> {
        Ok(())
    }
    async fn trim(&self, _offset: u64, _len: u32, _fua: bool) -> DeviceResult<()> {
        Ok(())
    }
    async fn write_zeroes(&self, _offset: u64, _len: u32, _flags: ZeroFlags) -> DeviceResult<()> {
        Ok(())
    }
}

#[tokio::test]
async fn device_error_details_go_to_the_log_not_the_client() {
    let logs = LogCapture::default();
    let _guard = logs.install();
    let s = server(ServerConfig::default(), Arc::new(Failing));
    let mut c = connect(&s).await;
    c.option(NBD_OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(c.option_reply().await.kind, NBD_REP_ACK);
    c.go("d").await.unwrap();
    for (cookie, command) in [(1, NBD_CMD_READ), (2, NBD_CMD_WRITE)] {
        let payload = if command == NBD_CMD_WRITE {
            vec![0u8; 512]
        } else {
            vec![]
        };
        c.request(command, cookie, 0, 512, &payload).await;
        let (_, kind, got, body) = c.chunk().await;
        assert_eq!(got, cookie);
        assert!(
            kind == NBD_REPLY_TYPE_ERROR || kind == NBD_REPLY_TYPE_ERROR_OFFSET,
            "{kind}"
        );
        assert_eq!(&body[0..4], &NBD_EIO.to_be_bytes());
        let text = String::from_utf8_lossy(&body[6..]).into_owned();
        assert!(
            !text.contains("secret") && !text.contains(".img"),
            "client saw {text:?}"
        );
        assert!(!text.is_empty(), "a generic message is still sent");
    }
    assert!(logs.text().contains(SECRET_PATH), "the log has the details");
}

#[tokio::test]
async fn shutdown_closes_a_client_that_stopped_reading_within_the_grace_period() {
    let grace = Duration::from_millis(300);
    let s = server(
        ServerConfig {
            shutdown_grace: grace,
            ..ServerConfig::default()
        },
        Arc::new(MemDevice::new(1 << 20)),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = s.clone();
    let serve = tokio::spawn(async move {
        server
            .serve_tcp(listener, async {
                let _ = stop_rx.await;
            })
            .await
    });
    let sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut c = Raw::start(sock).await;
    c.go("d").await.unwrap();
    // 64 MiB of read replies the client never reads: far more than the socket buffers hold.
    for i in 0..64 {
        c.request(NBD_CMD_READ, i, 0, MIB, &[]).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    stop_tx.send(()).unwrap();
    let bound = grace + Duration::from_secs(3);
    tokio::time::timeout(bound, serve)
        .await
        .expect("serve_tcp returns within the grace period despite the stuck client")
        .unwrap()
        .unwrap();
    assert!(
        started.elapsed() >= grace.mul_f32(0.9),
        "in-flight replies get the grace period"
    );
    drop(c);
}
