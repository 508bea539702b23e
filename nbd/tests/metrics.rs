//! `Server::metrics_text`: the Prometheus counters move with the traffic a client sends.

mod common;

use std::sync::Arc;

use common::Raw;
use tokio::io::DuplexStream;
use twinblock_nbd::mem::MemDevice;
use twinblock_nbd::proto::*;
use twinblock_nbd::{Export, Server, ServerConfig};

async fn connect(server: &Server) -> Raw<DuplexStream> {
    let (client, server_side) = tokio::io::duplex(1 << 20);
    let s = server.clone();
    tokio::spawn(async move { s.handle_connection(server_side, "test").await });
    Raw::start(client).await
}

/// The value of the sample line starting with `series ` (exact name and labels).
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

#[tokio::test]
async fn scraped_counters_move_with_client_requests() {
    let server = Server::new(ServerConfig {
        max_connections: 1,
        ..ServerConfig::default()
    });
    server
        .add_export(Export {
            name: "vol0".into(),
            description: String::new(),
            device: Arc::new(MemDevice::new(1 << 20)),
        })
        .unwrap();
    let before = server.metrics_text();
    let reads = r#"twinblock_nbd_requests_total{export="vol0",command="read"}"#;
    let read_bytes = r#"twinblock_nbd_request_bytes_total{export="vol0",command="read"}"#;
    let writes = r#"twinblock_nbd_requests_total{export="vol0",command="write"}"#;
    let read_errors = r#"twinblock_nbd_request_errors_total{export="vol0",command="read"}"#;
    let read_latency =
        r#"twinblock_nbd_request_duration_seconds_count{export="vol0",command="read"}"#;
    assert_eq!(value(&before, reads), 0.0);

    let mut c = connect(&server).await;
    c.go("vol0").await.unwrap();
    c.request(NBD_CMD_WRITE, 1, 0, 4096, &[7u8; 4096]).await;
    assert_eq!(c.simple(0).await.0, 0);
    for i in 0..3 {
        c.request(NBD_CMD_READ, 10 + i, 0, 4096, &[]).await;
        assert_eq!(c.simple(4096).await.0, 0);
    }
    c.request(NBD_CMD_READ, 20, 2 << 20, 4096, &[]).await;
    assert_eq!(c.simple(0).await.0, NBD_EINVAL);

    let mut refused = connect(&server).await;
    assert_eq!(
        refused.go("vol0").await.unwrap_err().kind,
        NBD_REP_ERR_POLICY
    );

    let after = server.metrics_text();
    assert_eq!(value(&after, writes), 1.0);
    assert_eq!(value(&after, reads), 4.0, "three served and one refused");
    assert_eq!(value(&after, read_bytes), 3.0 * 4096.0);
    assert_eq!(value(&after, read_errors), 1.0);
    assert_eq!(value(&after, read_latency), 3.0);
    assert_eq!(value(&after, "twinblock_nbd_clients"), 1.0);
    assert_eq!(value(&after, "twinblock_nbd_clients_refused_total"), 1.0);
    assert_eq!(
        value(&after, r#"twinblock_nbd_export_connections{export="vol0"}"#),
        1.0
    );
}
