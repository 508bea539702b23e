//! Drives the server with a raw-bytes client over `tokio::io::duplex` (and once over loopback
//! TCP) against in-memory devices: every option, every command, simple and structured replies,
//! out-of-order completion, and the malformed inputs the spec gives answers for.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::Notify;
use twinblock_nbd::mem::MemDevice;
use twinblock_nbd::proto::*;
use twinblock_nbd::{
    BlockDevice, DeviceCaps, DeviceError, DeviceResult, Export, Extent, Server, ServerConfig,
    ZeroFlags,
};

const DEV_BYTES: usize = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(5);

struct Client {
    rd: ReadHalf<DuplexStream>,
    wr: WriteHalf<DuplexStream>,
    task: tokio::task::JoinHandle<Result<(), twinblock_nbd::ConnectionError>>,
}

fn server_with(devices: Vec<(&str, Arc<dyn BlockDevice>)>) -> Server {
    let server = Server::new(ServerConfig::default());
    for (name, device) in devices {
        server
            .add_export(Export {
                name: name.into(),
                description: format!("{name} description"),
                device,
            })
            .unwrap();
    }
    server
}

fn mem_server() -> (Server, Arc<MemDevice>) {
    let dev = Arc::new(MemDevice::new(DEV_BYTES));
    let server = server_with(vec![
        ("disk", dev.clone() as Arc<dyn BlockDevice>),
        ("other", Arc::new(MemDevice::new(8192))),
    ]);
    (server, dev)
}

impl Client {
    /// Connects and consumes the greeting; client flags are not sent yet.
    async fn connect(server: &Server) -> Client {
        let (client, server_side) = tokio::io::duplex(1 << 20);
        let s = server.clone();
        let task = tokio::spawn(async move { s.handle_connection(server_side, "test").await });
        let (mut rd, wr) = tokio::io::split(client);
        let mut greet = [0u8; 18];
        rd.read_exact(&mut greet).await.unwrap();
        assert_eq!(&greet[0..8], &NBD_MAGIC.to_be_bytes());
        assert_eq!(&greet[8..16], &IHAVEOPT.to_be_bytes());
        assert_eq!(
            u16::from_be_bytes([greet[16], greet[17]]),
            NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES
        );
        Client { rd, wr, task }
    }

    /// Connects with fixed newstyle + no zeroes.
    async fn start(server: &Server) -> Client {
        let mut c = Client::connect(server).await;
        c.wr.write_u32(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)
            .await
            .unwrap();
        c
    }

    async fn option(&mut self, option: u32, data: &[u8]) {
        self.wr
            .write_all(
                &OptionHeader {
                    option,
                    len: data.len() as u32,
                }
                .encode(),
            )
            .await
            .unwrap();
        self.wr.write_all(data).await.unwrap();
    }

    async fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        tokio::time::timeout(TIMEOUT, self.rd.read_exact(&mut h))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&h[0..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        self.rd.read_exact(&mut data).await.unwrap();
        (opt, kind, data)
    }

    /// Sends INFO/GO and collects replies up to the final one.
    async fn info(&mut self, option: u32, name: &str, infos: &[u16]) -> (Vec<Vec<u8>>, u32) {
        self.option(option, &info_data(name, infos)).await;
        let mut items = Vec::new();
        loop {
            let (opt, kind, data) = self.option_reply().await;
            assert_eq!(opt, option);
            if kind == NBD_REP_INFO {
                items.push(data);
            } else {
                return (items, kind);
            }
        }
    }

    async fn go(&mut self, name: &str) -> u16 {
        let (items, kind) = self.info(NBD_OPT_GO, name, &[NBD_INFO_BLOCK_SIZE]).await;
        assert_eq!(kind, NBD_REP_ACK);
        let export = items
            .iter()
            .find(|i| i[0..2] == NBD_INFO_EXPORT.to_be_bytes())
            .unwrap();
        u16::from_be_bytes([export[10], export[11]])
    }

    async fn structured(&mut self) {
        self.option(NBD_OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(self.option_reply().await.1, NBD_REP_ACK);
    }

    async fn set_meta(&mut self, export: &str, queries: &[&str]) -> Vec<(u32, String)> {
        self.option(NBD_OPT_SET_META_CONTEXT, &meta_data(export, queries))
            .await;
        self.meta_replies(NBD_OPT_SET_META_CONTEXT).await
    }

    async fn meta_replies(&mut self, option: u32) -> Vec<(u32, String)> {
        let mut out = Vec::new();
        loop {
            let (opt, kind, data) = self.option_reply().await;
            assert_eq!(opt, option);
            match kind {
                NBD_REP_META_CONTEXT => out.push((
                    u32::from_be_bytes(data[0..4].try_into().unwrap()),
                    String::from_utf8(data[4..].to_vec()).unwrap(),
                )),
                NBD_REP_ACK => return out,
                other => panic!("unexpected reply {other:#x}"),
            }
        }
    }

    async fn request(
        &mut self,
        cmd: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let h = RequestHeader {
            flags,
            command: cmd,
            cookie,
            offset,
            len,
        };
        self.wr.write_all(&h.encode()).await.unwrap();
        self.wr.write_all(payload).await.unwrap();
    }

    /// Reads a simple reply; `data_len` bytes follow a successful read.
    async fn simple(&mut self, data_len: usize) -> (u32, u64, Vec<u8>) {
        let mut h = [0u8; 16];
        tokio::time::timeout(TIMEOUT, self.rd.read_exact(&mut h))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&h[0..4], &NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let mut data = vec![0u8; if err == 0 { data_len } else { 0 }];
        self.rd.read_exact(&mut data).await.unwrap();
        (err, cookie, data)
    }

    /// Reads one reply of either kind: (magic, flags, type or errno, cookie, payload).
    /// Simple replies carry no payload here.
    async fn any_reply(&mut self) -> Chunk {
        let mut m = [0u8; 4];
        tokio::time::timeout(TIMEOUT, self.rd.read_exact(&mut m))
            .await
            .unwrap()
            .unwrap();
        let magic = u32::from_be_bytes(m);
        if magic == NBD_SIMPLE_REPLY_MAGIC {
            let mut h = [0u8; 12];
            self.rd.read_exact(&mut h).await.unwrap();
            return Chunk {
                structured: false,
                flags: 0,
                kind: u32::from_be_bytes(h[0..4].try_into().unwrap()),
                cookie: u64::from_be_bytes(h[4..12].try_into().unwrap()),
                payload: vec![],
            };
        }
        assert_eq!(magic, NBD_STRUCTURED_REPLY_MAGIC);
        let mut h = [0u8; 16];
        self.rd.read_exact(&mut h).await.unwrap();
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let mut payload = vec![0u8; len as usize];
        self.rd.read_exact(&mut payload).await.unwrap();
        Chunk {
            structured: true,
            flags: u16::from_be_bytes([h[0], h[1]]),
            kind: u32::from(u16::from_be_bytes([h[2], h[3]])),
            cookie: u64::from_be_bytes(h[4..12].try_into().unwrap()),
            payload,
        }
    }

    /// True once the server has closed its side.
    async fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(TIMEOUT, self.rd.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

#[derive(Debug)]
struct Chunk {
    structured: bool,
    flags: u16,
    kind: u32,
    cookie: u64,
    payload: Vec<u8>,
}

fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        v.extend_from_slice(&i.to_be_bytes());
    }
    v
}

fn meta_data(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = (export.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(export.as_bytes());
    v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        v.extend_from_slice(&(q.len() as u32).to_be_bytes());
        v.extend_from_slice(q.as_bytes());
    }
    v
}

// --- Handshake ------------------------------------------------------------------------------

#[tokio::test]
async fn list_returns_every_export_then_ack() {
    let (server, _) = mem_server();
    let mut c = Client::start(&server).await;
    c.option(NBD_OPT_LIST, &[]).await;
    let mut names = Vec::new();
    loop {
        let (_, kind, data) = c.option_reply().await;
        if kind == NBD_REP_ACK {
            break;
        }
        assert_eq!(kind, NBD_REP_SERVER);
        let n = u32::from_be_bytes(data[0..4].try_into().unwrap()) as usize;
        names.push(String::from_utf8(data[4..4 + n].to_vec()).unwrap());
        assert!(String::from_utf8_lossy(&data[4 + n..]).ends_with("description"));
    }
    assert_eq!(names, vec!["disk", "other"]);
}

#[tokio::test]
async fn list_with_data_is_invalid() {
    let (server, _) = mem_server();
    let mut c = Client::start(&server).await;
    c.option(NBD_OPT_LIST, b"x").await;
    assert_eq!(c.option_reply().await.1, NBD_REP_ERR_INVALID);
}

#[tokio::test]
async fn info_reports_size_flags_name_description_and_block_size() {
    let (server, _) = mem_server();
    let mut c = Client::start(&server).await;
    let (items, kind) = c
        .info(
            NBD_OPT_INFO,
            "disk",
            &[NBD_INFO_NAME, NBD_INFO_DESCRIPTION, NBD_INFO_BLOCK_SIZE],
        )
        .await;
    assert_eq!(kind, NBD_REP_ACK);
    let find = |t: u16| {
        items
            .iter()
            .find(|i| i[0..2] == t.to_be_bytes())
            .unwrap()
            .clone()
    };
    let export = find(NBD_INFO_EXPORT);
    assert_eq!(
        u64::from_be_bytes(export[2..10].try_into().unwrap()),
        DEV_BYTES as u64
    );
    let flags = u16::from_be_bytes([export[10], export[11]]);
    assert_ne!(flags & NBD_FLAG_HAS_FLAGS, 0);
    assert_ne!(flags & NBD_FLAG_SEND_FLUSH, 0);
    assert_eq!(flags & NBD_FLAG_CAN_MULTI_CONN, 0);
    assert_eq!(&find(NBD_INFO_NAME)[2..], b"disk");
    assert_eq!(&find(NBD_INFO_DESCRIPTION)[2..], b"disk description");
    let bs = find(NBD_INFO_BLOCK_SIZE);
    assert_eq!(u32::from_be_bytes(bs[2..6].try_into().unwrap()), 1);
    assert_eq!(u32::from_be_bytes(bs[6..10].try_into().unwrap()), 4096);
    assert_eq!(u32::from_be_bytes(bs[10..14].try_into().unwrap()), 32 << 20);
    // INFO does not enter transmission: another option still works.
    c.option(NBD_OPT_LIST, &[]).await;
    assert_eq!(c.option_reply().await.1, NBD_REP_SERVER);
}

#[tokio::test]
async fn multi_conn_is_advertised_only_when_device_says_so() {
    let caps = DeviceCaps {
        multi_conn: true,
        ..DeviceCaps::default()
    };
    let server = server_with(vec![("mc", Arc::new(MemDevice::with_caps(4096, caps)))]);
    let mut c = Client::start(&server).await;
    assert_ne!(c.go("mc").await & NBD_FLAG_CAN_MULTI_CONN, 0);
}

#[tokio::test]
async fn go_unknown_export_is_err_unknown_and_haggling_continues() {
    let (server, _) = mem_server();
    let mut c = Client::start(&server).await;
    let (items, kind) = c.info(NBD_OPT_GO, "nope", &[]).await;
    assert!(items.is_empty());
    assert_eq!(kind, NBD_REP_ERR_UNKNOWN);
    c.go("disk").await;
}

#[tokio::test]
async fn empty_name_selects_default_export() {
    let (server, _) = mem_server();
    let mut c = Client::start(&server).await;
    assert_eq!(c.info(NBD_OPT_INFO, "", &[]).await.1, NBD_REP_ERR_UNKNOWN);
    server.set_default_export(Some("other".into())).unwrap();
    let (items, kind) = c.info(NBD_OPT_INFO, "", &[NBD_INFO_NAME]).await;
    assert_eq!(kind, NBD_REP_ACK);
    assert!(items
        .iter()
        .any(|i| i[..] == [&NBD_INFO_NAME.to_be_bytes()[..], b"other"].concat()));
}

#[tokio::test]
async fn export_name_enters_transmission_with_padding_unless_no_zeroes() {
    let (server, _) = mem_server();
    for (client_flags, pad) in [
        (NBD_FLAG_C_FIXED_NEWSTYLE, EXPORT_NAME_PADDING_BYTES),
        (NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES, 0),
    ] {
        let mut c = Client::connect(&server).await;
        c.wr.write_u32(client_flags).await.unwrap();
        c.option(NBD_OPT_EXPORT_NAME, b"other").await;
        let mut reply = vec![0u8; 10 + pad];
        c.rd.read_exact(&mut reply).await.unwrap();
        assert_eq!(u64::from_be_bytes(reply[0..8].try_into().unwrap()), 8192);
        assert!(reply[10..].iter().all(|&b| b == 0));
        c.request(NBD_CMD_READ, 0, 5, 0, 512, &[]).await;
        let (err, cookie, data) = c.simple(512).await;
        assert_eq!((err, cookie, data.len()), (0, 5, 512));
    }
}

#[tokio::test]
async fn export_name_for_unknown_export_closes_connection() {
    let (server, _) = mem_server();
    let mut c = Client::start(&server).await;
    c.option(NBD_OPT_EXPORT_NAME, b"missing").await;
    assert!(c.closed().await);
    assert!(matches!(
        c.task.await.unwrap(),
        Err(twinblock_nbd::ConnectionError::UnknownExport(_))
    ));
}

#[tokio::test]
async fn non_fixed_newstyle_client_may_only_send_export_name() {
    let (server, _) = mem_server();
    let mut c = Client::connect(&server).await;
    c.wr.write_u32(0).await.unwrap();
    c.option(NBD_OPT_LIST, &[]).await;
    assert!(c.closed().await);
}

#[tokio::test]
async fn starttls_is_refused_by_policy() {
    let (server, _) = mem_server();
    let mut c = Client::start(&server).await;
    c.option(NBD_OPT_STARTTLS, &[]).await;
    assert_eq!(c.option_reply().await.1, NBD_REP_ERR_POLICY);
    c.go("disk").await;
}

#[tokio::test]
async fn unknown_option_is_unsupported_and_its_data_skipped() {
    let (server, _) = mem_server();
    let mut c = Client::start(&server).await;
    c.option(4242, b"some data the server does not understand")
        .await;
    let (opt, kind, _) = c.option_reply().await;
    assert_eq!((opt, kind), (4242, NBD_REP_ERR_UNSUP));
    c.go("disk").await;
}

#[tokio::test]
async fn option_with_lying_inner_length_is_invalid() {
    let (server, _) = mem_server();
    let mut c = Client::start(&server).await;
    let mut data = info_data("disk", &[]);
    data[0..4].copy_from_slice(&1000u32.to_be_bytes());
    c.option(NBD_OPT_GO, &data).await;
    assert_eq!(c.option_reply().await.1, NBD_REP_ERR_INVALID);
    c.go("disk").await;
}

#[tokio::test]
async fn oversized_option_is_skipped_and_answered_too_big() {
    let (server, _) = mem_server();
    let mut c = Client::start(&server).await;
    let big = vec![0u8; (server.config().max_option_bytes + 1) as usize];
    c.option(NBD_OPT_GO, &big).await;
    assert_eq!(c.option_reply().await.1, NBD_REP_ERR_TOO_BIG);
    c.go("disk").await;
}

#[tokio::test]
async fn option_length_past_end_of_stream_closes_cleanly() {
    let (server, _) = mem_server();
    let mut c = Client::start(&server).await;
    c.wr.write_all(
        &OptionHeader {
            option: NBD_OPT_GO,
            len: 100,
        }
        .encode(),
    )
    .await
    .unwrap();
    c.wr.write_all(b"short").await.unwrap();
    c.wr.shutdown().await.unwrap();
    assert!(c.closed().await);
    assert!(c.task.await.unwrap().is_err());
}

#[tokio::test]
async fn bad_option_magic_closes_connection() {
    let (server, _) = mem_server();
    let mut c = Client::start(&server).await;
    c.wr.write_all(&[0u8; 16]).await.unwrap();
    assert!(c.closed().await);
}

#[tokio::test]
async fn unknown_client_flags_close_connection() {
    let (server, _) = mem_server();
    let mut c = Client::connect(&server).await;
    c.wr.write_u32(1 << 7).await.unwrap();
    assert!(c.closed().await);
    assert!(matches!(
        c.task.await.unwrap(),
        Err(twinblock_nbd::ConnectionError::UnknownClientFlags(0x80))
    ));
}

#[tokio::test]
async fn abort_is_acknowledged_and_connection_closed() {
    let (server, _) = mem_server();
    let mut c = Client::start(&server).await;
    c.option(NBD_OPT_ABORT, &[]).await;
    assert_eq!(c.option_reply().await.1, NBD_REP_ACK);
    assert!(c.closed().await);
    assert!(c.task.await.unwrap().is_ok());
}

#[tokio::test]
async fn structured_reply_with_data_is_invalid() {
    let (server, _) = mem_server();
    let mut c = Client::start(&server).await;
    c.option(NBD_OPT_STRUCTURED_REPLY, b"x").await;
    assert_eq!(c.option_reply().await.1, NBD_REP_ERR_INVALID);
}

#[tokio::test]
async fn meta_context_needs_structured_replies() {
    let (server, _) = mem_server();
    let mut c = Client::start(&server).await;
    c.option(
        NBD_OPT_SET_META_CONTEXT,
        &meta_data("disk", &[BASE_ALLOCATION]),
    )
    .await;
    assert_eq!(c.option_reply().await.1, NBD_REP_ERR_INVALID);
}

#[tokio::test]
async fn list_meta_context_offers_base_allocation() {
    let (server, _) = mem_server();
    let mut c = Client::start(&server).await;
    c.structured().await;
    for queries in [
        &[][..],
        &["base:"][..],
        &["x-other:thing", "base:allocation"][..],
    ] {
        c.option(NBD_OPT_LIST_META_CONTEXT, &meta_data("disk", queries))
            .await;
        let ctx = c.meta_replies(NBD_OPT_LIST_META_CONTEXT).await;
        assert_eq!(ctx, vec![(0, BASE_ALLOCATION.to_string())]);
    }
    c.option(
        NBD_OPT_LIST_META_CONTEXT,
        &meta_data("disk", &["qemu:dirty-bitmap:x"]),
    )
    .await;
    assert!(c.meta_replies(NBD_OPT_LIST_META_CONTEXT).await.is_empty());
    c.option(NBD_OPT_LIST_META_CONTEXT, &meta_data("nope", &[]))
        .await;
    assert_eq!(c.option_reply().await.1, NBD_REP_ERR_UNKNOWN);
}

#[tokio::test]
async fn meta_context_with_lying_query_count_is_invalid() {
    let (server, _) = mem_server();
    let mut c = Client::start(&server).await;
    c.structured().await;
    let mut data = meta_data("disk", &[BASE_ALLOCATION]);
    let at = 4 + 4;
    data[at..at + 4].copy_from_slice(&7u32.to_be_bytes());
    c.option(NBD_OPT_SET_META_CONTEXT, &data).await;
    assert_eq!(c.option_reply().await.1, NBD_REP_ERR_INVALID);
}

#[tokio::test]
async fn handshake_times_out() {
    let server = Server::new(ServerConfig {
        handshake_timeout: Duration::from_millis(50),
        ..ServerConfig::default()
    });
    let mut c = Client::start(&server).await;
    assert!(c.closed().await);
    assert!(matches!(
        c.task.await.unwrap(),
        Err(twinblock_nbd::ConnectionError::HandshakeTimeout(_))
    ));
}

// --- Transmission with simple replies -------------------------------------------------------

#[tokio::test]
async fn simple_replies_cover_every_command() {
    let (server, dev) = mem_server();
    let mut c = Client::start(&server).await;
    c.go("disk").await;
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    c.request(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, 1, 4096, 8192, &pattern)
        .await;
    assert_eq!(c.simple(0).await, (0, 1, vec![]));
    c.request(NBD_CMD_READ, 0, 2, 4096, 8192, &[]).await;
    let (err, cookie, data) = c.simple(8192).await;
    assert_eq!((err, cookie), (0, 2));
    assert_eq!(data, pattern);
    c.request(NBD_CMD_FLUSH, 0, 3, 0, 0, &[]).await;
    assert_eq!(c.simple(0).await.0, 0);
    assert_eq!(dev.flush_count(), 1);
    c.request(
        NBD_CMD_WRITE_ZEROES,
        NBD_CMD_FLAG_NO_HOLE,
        4,
        4096,
        100,
        &[],
    )
    .await;
    assert_eq!(c.simple(0).await.0, 0);
    c.request(NBD_CMD_TRIM, 0, 5, 8192, 4096, &[]).await;
    assert_eq!(c.simple(0).await.0, 0);
    c.request(NBD_CMD_CACHE, 0, 6, 0, 4096, &[]).await;
    assert_eq!(c.simple(0).await.0, 0);
    let contents = dev.contents();
    assert!(contents[4096..4196].iter().all(|&b| b == 0));
    assert_eq!(&contents[4196..8192], &pattern[100..4096]);
    assert!(contents[8192..12288].iter().all(|&b| b == 0));
    // Block status without structured replies / contexts is refused.
    c.request(NBD_CMD_BLOCK_STATUS, 0, 7, 0, 4096, &[]).await;
    assert_eq!(c.simple(0).await.0, NBD_EINVAL);
    c.request(NBD_CMD_DISC, 0, 8, 0, 0, &[]).await;
    assert!(c.closed().await);
    assert!(c.task.await.unwrap().is_ok());

    let stats = server.export_stats("disk").unwrap();
    assert_eq!((stats.read_ops, stats.read_bytes), (1, 8192));
    assert_eq!((stats.write_ops, stats.write_bytes), (1, 8192));
    assert_eq!((stats.flush_ops, stats.trim_ops, stats.zero_ops), (1, 1, 1));
    assert_eq!(stats.errors, 1);
    assert_eq!((stats.connections_total, stats.connections_active), (1, 0));
}

#[tokio::test]
async fn out_of_range_requests_get_spec_errors() {
    let (server, _) = mem_server();
    let mut c = Client::start(&server).await;
    c.go("disk").await;
    let end = DEV_BYTES as u64;
    c.request(NBD_CMD_WRITE, 0, 1, end - 1, 2, &[1, 2]).await;
    assert_eq!(c.simple(0).await.0, NBD_ENOSPC);
    c.request(NBD_CMD_READ, 0, 2, end, 1, &[]).await;
    assert_eq!(c.simple(0).await.0, NBD_EINVAL);
    c.request(NBD_CMD_WRITE_ZEROES, 0, 3, end, 512, &[]).await;
    assert_eq!(c.simple(0).await.0, NBD_ENOSPC);
    c.request(NBD_CMD_TRIM, 0, 4, u64::MAX, 512, &[]).await;
    assert_eq!(c.simple(0).await.0, NBD_EINVAL);
    c.request(42, 0, 5, 0, 0, &[]).await;
    assert_eq!(c.simple(0).await.0, NBD_EINVAL);
    c.request(NBD_CMD_READ, 1 << 12, 6, 0, 1, &[]).await;
    assert_eq!(c.simple(0).await.0, NBD_EINVAL);
    // The stream is still in sync.
    c.request(NBD_CMD_WRITE, 0, 7, 0, 2, &[9, 9]).await;
    assert_eq!(c.simple(0).await, (0, 7, vec![]));
}

#[tokio::test]
async fn oversized_write_is_refused_and_payload_skipped() {
    let server = Server::new(ServerConfig {
        max_request_bytes: 64 << 10,
        ..ServerConfig::default()
    });
    let dev = Arc::new(MemDevice::new(DEV_BYTES));
    server
        .add_export(Export {
            name: "d".into(),
            description: String::new(),
            device: dev.clone(),
        })
        .unwrap();
    let mut c = Client::start(&server).await;
    c.go("d").await;
    let big = vec![0xaau8; 128 << 10];
    c.request(NBD_CMD_WRITE, 0, 1, 0, big.len() as u32, &big)
        .await;
    assert_eq!(c.simple(0).await, (NBD_EINVAL, 1, vec![]));
    assert!(
        dev.contents().iter().all(|&b| b == 0),
        "refused write must not land"
    );
    c.request(NBD_CMD_READ, 0, 2, 0, (128 << 10) as u32, &[])
        .await;
    assert_eq!(c.simple(0).await.0, NBD_EINVAL);
    c.request(NBD_CMD_WRITE, 0, 3, 0, 4, b"abcd").await;
    assert_eq!(c.simple(0).await, (0, 3, vec![]));
}

#[tokio::test]
async fn unaligned_requests_are_refused_when_min_block_is_set() {
    let caps = DeviceCaps {
        min_block: 512,
        ..DeviceCaps::default()
    };
    let server = server_with(vec![("a", Arc::new(MemDevice::with_caps(DEV_BYTES, caps)))]);
    let mut c = Client::start(&server).await;
    c.go("a").await;
    c.request(NBD_CMD_WRITE, 0, 1, 100, 512, &[0u8; 512]).await;
    assert_eq!(c.simple(0).await.0, NBD_EINVAL);
    c.request(NBD_CMD_READ, 0, 2, 512, 512, &[]).await;
    assert_eq!(c.simple(512).await.0, 0);
}

#[tokio::test]
async fn read_only_export_refuses_writes_with_eperm() {
    let caps = DeviceCaps {
        read_only: true,
        ..DeviceCaps::default()
    };
    let server = server_with(vec![(
        "ro",
        Arc::new(MemDevice::with_caps(DEV_BYTES, caps)),
    )]);
    let mut c = Client::start(&server).await;
    let flags = c.go("ro").await;
    assert_ne!(flags & NBD_FLAG_READ_ONLY, 0);
    c.request(NBD_CMD_WRITE, 0, 1, 0, 3, b"abc").await;
    assert_eq!(c.simple(0).await.0, NBD_EPERM);
    c.request(NBD_CMD_READ, 0, 2, 0, 3, &[]).await;
    assert_eq!(c.simple(3).await.0, 0);
}

#[tokio::test]
async fn bad_request_magic_closes_only_that_connection() {
    let (server, _) = mem_server();
    let mut bad = Client::start(&server).await;
    bad.go("disk").await;
    let mut good = Client::start(&server).await;
    good.go("disk").await;
    bad.wr.write_all(&[0x55u8; 28]).await.unwrap();
    assert!(bad.closed().await);
    assert!(matches!(
        bad.task.await.unwrap(),
        Err(twinblock_nbd::ConnectionError::BadRequest(_))
    ));
    good.request(NBD_CMD_READ, 0, 1, 0, 16, &[]).await;
    assert_eq!(good.simple(16).await.0, 0);
}

#[tokio::test]
async fn disconnect_mid_write_payload_ends_connection_cleanly() {
    let (server, dev) = mem_server();
    let mut c = Client::start(&server).await;
    c.go("disk").await;
    c.request(NBD_CMD_WRITE, 0, 1, 0, 4096, &[7u8; 100]).await;
    c.wr.shutdown().await.unwrap();
    assert!(c.closed().await);
    assert!(matches!(
        c.task.await.unwrap(),
        Err(twinblock_nbd::ConnectionError::DisconnectedMidRequest { .. })
    ));
    assert!(dev.contents().iter().all(|&b| b == 0));
    // The server still takes new clients.
    let mut c2 = Client::start(&server).await;
    c2.go("disk").await;
}

#[tokio::test]
async fn disconnect_mid_header_is_a_clean_close() {
    let (server, _) = mem_server();
    let mut c = Client::start(&server).await;
    c.go("disk").await;
    c.wr.write_all(&[0x25, 0x60]).await.unwrap();
    c.wr.shutdown().await.unwrap();
    assert!(c.closed().await);
    assert!(c.task.await.unwrap().is_ok());
}

// --- Structured replies ---------------------------------------------------------------------

#[tokio::test]
async fn structured_read_is_one_offset_data_chunk_and_errors_carry_messages() {
    let (server, _) = mem_server();
    let mut c = Client::start(&server).await;
    c.structured().await;
    let flags = c.go("disk").await;
    assert_ne!(flags & NBD_FLAG_SEND_DF, 0);
    c.request(NBD_CMD_WRITE, 0, 1, 512, 4, b"wxyz").await;
    let r = c.any_reply().await;
    assert_eq!((r.structured, r.kind, r.cookie), (false, 0, 1));

    c.request(NBD_CMD_READ, NBD_CMD_FLAG_DF, 2, 512, 4, &[])
        .await;
    let r = c.any_reply().await;
    assert!(r.structured);
    assert_eq!(r.flags, NBD_REPLY_FLAG_DONE);
    assert_eq!(r.kind, u32::from(NBD_REPLY_TYPE_OFFSET_DATA));
    assert_eq!(&r.payload[0..8], &512u64.to_be_bytes());
    assert_eq!(&r.payload[8..], b"wxyz");

    c.request(NBD_CMD_READ, 0, 3, DEV_BYTES as u64, 4, &[])
        .await;
    let r = c.any_reply().await;
    assert!(
        r.structured,
        "READ errors must be structured once negotiated"
    );
    assert_eq!(r.kind, u32::from(NBD_REPLY_TYPE_ERROR));
    assert_eq!(&r.payload[0..4], &NBD_EINVAL.to_be_bytes());
    let msg_len = u16::from_be_bytes([r.payload[4], r.payload[5]]) as usize;
    assert!(String::from_utf8_lossy(&r.payload[6..6 + msg_len]).contains("past the end"));
}

#[tokio::test]
async fn large_reads_interleave_with_small_ones_in_both_reply_modes() {
    for structured in [false, true] {
        let (server, _) = mem_server();
        let mut c = Client::start(&server).await;
        if structured {
            c.structured().await;
        }
        c.go("disk").await;
        let big: Vec<u8> = (0..(256u32 << 10)).map(|i| (i * 7 % 253) as u8).collect();
        c.request(NBD_CMD_WRITE, 0, 1, 0, big.len() as u32, &big)
            .await;
        c.any_reply().await;
        // A large read (sent by reference) between small ones (copied inline).
        for (cookie, len) in [(2u64, 512u32), (3, 256 << 10), (4, 4096)] {
            c.request(NBD_CMD_READ, 0, cookie, 0, len, &[]).await;
        }
        let mut got = std::collections::HashMap::new();
        for _ in 0..3 {
            if structured {
                let r = c.any_reply().await;
                got.insert(r.cookie, r.payload[8..].to_vec());
            } else {
                // Replies may come in any order; peek at the cookie to know the length.
                let mut h = [0u8; 16];
                c.rd.read_exact(&mut h).await.unwrap();
                let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
                let len = [(2u64, 512usize), (3, 256 << 10), (4, 4096)]
                    .iter()
                    .find(|(k, _)| *k == cookie)
                    .unwrap()
                    .1;
                let mut data = vec![0u8; len];
                c.rd.read_exact(&mut data).await.unwrap();
                got.insert(cookie, data);
            }
        }
        assert_eq!(got[&2], big[..512]);
        assert_eq!(got[&3], big);
        assert_eq!(got[&4], big[..4096]);
    }
}

#[tokio::test]
async fn block_status_reports_holes_and_data() {
    let (server, _) = mem_server();
    let mut c = Client::start(&server).await;
    c.structured().await;
    let ctx = c
        .set_meta("disk", &[BASE_ALLOCATION, "x-unknown:foo"])
        .await;
    assert_eq!(
        ctx,
        vec![(BASE_ALLOCATION_CONTEXT_ID, BASE_ALLOCATION.to_string())]
    );
    c.go("disk").await;
    c.request(NBD_CMD_WRITE, 0, 1, 8192, 4096, &[1u8; 4096])
        .await;
    c.any_reply().await;
    c.request(NBD_CMD_BLOCK_STATUS, 0, 2, 0, 16384, &[]).await;
    let r = c.any_reply().await;
    assert_eq!(r.kind, u32::from(NBD_REPLY_TYPE_BLOCK_STATUS));
    assert_eq!(r.flags, NBD_REPLY_FLAG_DONE);
    let words: Vec<u32> = r
        .payload
        .chunks(4)
        .map(|w| u32::from_be_bytes(w.try_into().unwrap()))
        .collect();
    let hz = NBD_STATE_HOLE | NBD_STATE_ZERO;
    assert_eq!(
        words,
        vec![BASE_ALLOCATION_CONTEXT_ID, 8192, hz, 4096, 0, 4096, hz]
    );

    c.request(NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_REQ_ONE, 3, 0, 16384, &[])
        .await;
    let r = c.any_reply().await;
    assert_eq!(r.payload.len(), 4 + 8, "REQ_ONE returns a single extent");
    c.request(NBD_CMD_BLOCK_STATUS, 0, 4, DEV_BYTES as u64, 1, &[])
        .await;
    let r = c.any_reply().await;
    assert_eq!(r.kind, u32::from(NBD_REPLY_TYPE_ERROR));
    assert_eq!(server.export_stats("disk").unwrap().block_status_ops, 2);
}

#[tokio::test]
async fn trim_and_hole_punching_zeroes_show_as_holes() {
    let (server, _) = mem_server();
    let mut c = Client::start(&server).await;
    c.structured().await;
    c.set_meta("disk", &[BASE_ALLOCATION]).await;
    c.go("disk").await;
    c.request(NBD_CMD_WRITE, 0, 1, 0, 16384, &[3u8; 16384])
        .await;
    c.any_reply().await;
    c.request(NBD_CMD_TRIM, 0, 2, 0, 4096, &[]).await;
    c.any_reply().await;
    c.request(NBD_CMD_WRITE_ZEROES, 0, 3, 8192, 4096, &[]).await;
    c.any_reply().await;
    c.request(
        NBD_CMD_WRITE_ZEROES,
        NBD_CMD_FLAG_NO_HOLE,
        4,
        12288,
        4096,
        &[],
    )
    .await;
    c.any_reply().await;
    c.request(NBD_CMD_BLOCK_STATUS, 0, 5, 0, 16384, &[]).await;
    let r = c.any_reply().await;
    let words: Vec<u32> = r
        .payload
        .chunks(4)
        .map(|w| u32::from_be_bytes(w.try_into().unwrap()))
        .collect();
    let hz = NBD_STATE_HOLE | NBD_STATE_ZERO;
    assert_eq!(words[1..], [4096, hz, 4096, 0, 4096, hz, 4096, 0]);
}

#[tokio::test]
async fn meta_context_for_another_export_does_not_enable_block_status() {
    let (server, _) = mem_server();
    let mut c = Client::start(&server).await;
    c.structured().await;
    c.set_meta("other", &[BASE_ALLOCATION]).await;
    c.go("disk").await;
    c.request(NBD_CMD_BLOCK_STATUS, 0, 1, 0, 4096, &[]).await;
    let r = c.any_reply().await;
    assert_eq!(r.kind, u32::from(NBD_REPLY_TYPE_ERROR));
}

/// A device whose reads at offset 0 wait for a signal, to force out-of-order completion, and
/// whose fast zeroes are refused.
struct GatedDevice {
    inner: MemDevice,
    gate: Notify,
}

#[async_trait]
impl BlockDevice for GatedDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn caps(&self) -> DeviceCaps {
        DeviceCaps {
            fast_zero: true,
            ..self.inner.caps()
        }
    }
    async fn read(&self, offset: u64, len: u32) -> DeviceResult<Bytes> {
        if offset == 0 {
            self.gate.notified().await;
        }
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> DeviceResult<()> {
        self.inner.write(offset, data, fua).await
    }
    async fn flush(&self) -> DeviceResult<()> {
        self.inner.flush().await
    }
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> DeviceResult<()> {
        self.inner.trim(offset, len, fua).await
    }
    async fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> DeviceResult<()> {
        if flags.fast {
            return Err(DeviceError::NotFast);
        }
        self.inner.write_zeroes(offset, len, flags).await
    }
    async fn block_status(&self, offset: u64, len: u32) -> DeviceResult<Vec<Extent>> {
        self.inner.block_status(offset, len).await
    }
}

#[tokio::test]
async fn replies_come_back_out_of_order() {
    let dev = Arc::new(GatedDevice {
        inner: MemDevice::new(DEV_BYTES),
        gate: Notify::new(),
    });
    let server = server_with(vec![("g", dev.clone() as Arc<dyn BlockDevice>)]);
    let mut c = Client::start(&server).await;
    c.go("g").await;
    c.request(NBD_CMD_READ, 0, 100, 0, 512, &[]).await;
    for cookie in 101..110u64 {
        c.request(NBD_CMD_READ, 0, cookie, cookie * 512, 512, &[])
            .await;
    }
    let mut seen = Vec::new();
    for _ in 101..110 {
        seen.push(c.simple(512).await.1);
    }
    assert!(!seen.contains(&100), "the gated read cannot have finished");
    seen.sort_unstable();
    assert_eq!(seen, (101..110).collect::<Vec<_>>());
    dev.gate.notify_one();
    assert_eq!(c.simple(512).await.1, 100);
}

#[tokio::test]
async fn fast_zero_refusal_is_enotsup() {
    let dev = Arc::new(GatedDevice {
        inner: MemDevice::new(DEV_BYTES),
        gate: Notify::new(),
    });
    let server = server_with(vec![("g", dev as Arc<dyn BlockDevice>)]);
    let mut c = Client::start(&server).await;
    let flags = c.go("g").await;
    assert_ne!(flags & NBD_FLAG_SEND_FAST_ZERO, 0);
    c.request(
        NBD_CMD_WRITE_ZEROES,
        NBD_CMD_FLAG_FAST_ZERO,
        1,
        0,
        4096,
        &[],
    )
    .await;
    assert_eq!(c.simple(0).await.0, NBD_ENOTSUP);
    c.request(NBD_CMD_WRITE_ZEROES, 0, 2, 0, 4096, &[]).await;
    assert_eq!(c.simple(0).await.0, 0);
}

#[tokio::test]
async fn removing_export_answers_in_flight_then_closes_and_refuses_new_clients() {
    let dev = Arc::new(GatedDevice {
        inner: MemDevice::new(DEV_BYTES),
        gate: Notify::new(),
    });
    let server = server_with(vec![("g", dev.clone() as Arc<dyn BlockDevice>)]);
    let mut c = Client::start(&server).await;
    c.go("g").await;
    c.request(NBD_CMD_READ, 0, 1, 0, 512, &[]).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    server.remove_export("g").unwrap();
    dev.gate.notify_one();
    assert_eq!(c.simple(512).await, (0, 1, vec![0u8; 512]));
    assert!(c.closed().await);
    let mut c2 = Client::start(&server).await;
    assert_eq!(c2.info(NBD_OPT_GO, "g", &[]).await.1, NBD_REP_ERR_UNKNOWN);
    assert!(server.list_exports().is_empty());
}

#[tokio::test]
async fn many_requests_in_flight_stay_within_budget() {
    let server = Server::new(ServerConfig {
        max_request_bytes: 64 << 10,
        max_inflight_bytes_per_connection: 256 << 10,
        ..ServerConfig::default()
    });
    let dev = Arc::new(MemDevice::new(DEV_BYTES));
    server
        .add_export(Export {
            name: "d".into(),
            description: String::new(),
            device: dev.clone(),
        })
        .unwrap();
    let mut c = Client::start(&server).await;
    c.go("d").await;
    let (mut rd, mut wr) = (c.rd, c.wr);
    let n = 64u64;
    let writer = tokio::spawn(async move {
        for i in 0..n {
            let data = vec![i as u8; 64 << 10];
            let h = RequestHeader {
                flags: 0,
                command: NBD_CMD_WRITE,
                cookie: i,
                offset: (i % 16) * (64 << 10),
                len: 64 << 10,
            };
            wr.write_all(&h.encode()).await.unwrap();
            wr.write_all(&data).await.unwrap();
        }
        wr
    });
    let mut cookies = Vec::new();
    for _ in 0..n {
        let mut h = [0u8; 16];
        tokio::time::timeout(TIMEOUT, rd.read_exact(&mut h))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&h[4..8], &[0, 0, 0, 0]);
        cookies.push(u64::from_be_bytes(h[8..16].try_into().unwrap()));
    }
    writer.await.unwrap();
    cookies.sort_unstable();
    assert_eq!(cookies, (0..n).collect::<Vec<_>>());
}

#[tokio::test]
async fn serve_tcp_accepts_clients_and_stops_on_shutdown() {
    let (server, _) = mem_server();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let s = server.clone();
    let serve = tokio::spawn(async move {
        s.serve_tcp(listener, async {
            let _ = stop_rx.await;
        })
        .await
    });
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut greet = [0u8; 18];
    sock.read_exact(&mut greet).await.unwrap();
    sock.write_u32(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)
        .await
        .unwrap();
    sock.write_all(
        &OptionHeader {
            option: NBD_OPT_EXPORT_NAME,
            len: 4,
        }
        .encode(),
    )
    .await
    .unwrap();
    sock.write_all(b"disk").await.unwrap();
    let mut info = [0u8; 10];
    sock.read_exact(&mut info).await.unwrap();
    sock.write_all(
        &RequestHeader {
            flags: 0,
            command: NBD_CMD_READ,
            cookie: 9,
            offset: 0,
            len: 4,
        }
        .encode(),
    )
    .await
    .unwrap();
    let mut reply = [0u8; 20];
    sock.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply[8..16], &9u64.to_be_bytes());
    stop_tx.send(()).unwrap();
    tokio::time::timeout(TIMEOUT, serve)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let mut b = [0u8; 1];
    assert_eq!(
        sock.read(&mut b).await.unwrap(),
        0,
        "connection closed at shutdown"
    );
}

#[tokio::test]
async fn serve_unix_accepts_clients_and_server_shutdown_closes_them() {
    let (server, _) = mem_server();
    let path = std::env::temp_dir().join(format!("twinblock-nbd-test-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let s = server.clone();
    let serve = tokio::spawn(async move {
        s.serve_unix(listener, async {
            let _ = stop_rx.await;
        })
        .await
    });
    let mut sock = tokio::net::UnixStream::connect(&path).await.unwrap();
    let mut greet = [0u8; 18];
    sock.read_exact(&mut greet).await.unwrap();
    sock.write_u32(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)
        .await
        .unwrap();
    sock.write_all(
        &OptionHeader {
            option: NBD_OPT_EXPORT_NAME,
            len: 4,
        }
        .encode(),
    )
    .await
    .unwrap();
    sock.write_all(b"disk").await.unwrap();
    let mut info = [0u8; 10];
    sock.read_exact(&mut info).await.unwrap();
    assert_eq!(
        u64::from_be_bytes(info[0..8].try_into().unwrap()),
        DEV_BYTES as u64
    );
    server.shutdown();
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(TIMEOUT, sock.read(&mut b))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0, "server shutdown closes transmission connections");
    stop_tx.send(()).unwrap();
    tokio::time::timeout(TIMEOUT, serve)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let _ = std::fs::remove_file(&path);
}
