//! Real NBD clients over TLS: libnbd's `nbdinfo` (GnuTLS) and `qemu-img` connect to the server
//! with `NBD_OPT_STARTTLS` using a test CA and certificates made at test time, a plaintext
//! `nbdinfo` is refused when TLS is required, and a client certificate satisfies an export's
//! certificate-name allow-list. A missing tool skips its test with a message, or fails it when
//! `CI` is set.

mod common;

use std::net::SocketAddr;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use common::{require_tool, TempDir, TestPki};
use twinblock_nbd::mem::MemDevice;
use twinblock_nbd::{tls, Access, Export, Server, ServerConfig, TlsRequirement, TlsSettings};

const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
const EXPORT_BYTES: usize = 4 << 20;
const CLIENT_NAME: &str = "backup-host";

/// A TLS-required server on a loopback port with export `vol0` (any client) and `named`
/// (only the test client certificate), and the directory holding the client's files.
struct Running {
    addr: SocketAddr,
    dir: TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn start() -> Running {
    let pki = TestPki::generate(CLIENT_NAME);
    let dir = TempDir::new("tls-interop");
    pki.write_to(&dir.0);
    let config = tls::server_config(
        &dir.0.join("server-cert.pem"),
        &dir.0.join("server-key.pem"),
        Some(&dir.0.join("ca-cert.pem")),
    )
    .unwrap();
    let server = Server::new(ServerConfig {
        tls: Some(TlsSettings {
            requirement: TlsRequirement::Required,
            config,
        }),
        ..ServerConfig::default()
    });
    for (name, access) in [
        ("vol0", Access::default()),
        (
            "named",
            Access {
                cert_names: vec![CLIENT_NAME.into()],
                ..Access::default()
            },
        ),
    ] {
        server
            .add_export_with_access(
                Export {
                    name: name.into(),
                    description: format!("{name} over TLS"),
                    device: Arc::new(MemDevice::new(EXPORT_BYTES)),
                },
                access,
            )
            .unwrap();
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        server
            .serve_tcp(listener, async {
                let _ = rx.await;
            })
            .await
    });
    Running {
        addr,
        dir,
        stop: Some(tx),
        task,
    }
}

impl Running {
    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(15), &mut self.task).await;
    }

    fn dir(&self) -> String {
        self.dir.0.display().to_string()
    }
}

async fn run(program: &str, args: &[String]) -> Output {
    let child = tokio::process::Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(CLIENT_TIMEOUT, child)
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} did not finish in {CLIENT_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn describe(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_connects_over_tls_with_the_test_ca() {
    if !require_tool("nbdinfo") {
        return;
    }
    let r = start().await;
    let uri = format!(
        "nbds://localhost:{}/vol0?tls-certificates={}",
        r.addr.port(),
        r.dir()
    );
    let o = run("nbdinfo", &["--json".into(), uri]).await;
    assert!(o.status.success(), "{}", describe(&o));
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        json["TLS"],
        serde_json::Value::Bool(true),
        "{}",
        describe(&o)
    );
    assert_eq!(json["exports"][0]["export-size"], EXPORT_BYTES as u64);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_from_nbdinfo_satisfies_the_name_allow_list() {
    if !require_tool("nbdinfo") {
        return;
    }
    let r = start().await;
    // The directory holds client-cert.pem / client-key.pem, which libnbd presents.
    let uri = format!(
        "nbds://localhost:{}/named?tls-certificates={}",
        r.addr.port(),
        r.dir()
    );
    let o = run("nbdinfo", &["--size".into(), uri]).await;
    assert!(o.status.success(), "{}", describe(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        EXPORT_BYTES.to_string()
    );

    // Without the client certificate the export is refused.
    let ca_only = TempDir::new("tls-ca-only");
    std::fs::copy(r.dir.0.join("ca-cert.pem"), ca_only.0.join("ca-cert.pem")).unwrap();
    let uri = format!(
        "nbds://localhost:{}/named?tls-certificates={}",
        r.addr.port(),
        ca_only.0.display()
    );
    let o = run("nbdinfo", &["--size".into(), uri]).await;
    assert!(!o.status.success(), "{}", describe(&o));
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_nbdinfo_is_refused_when_tls_is_required() {
    if !require_tool("nbdinfo") {
        return;
    }
    let r = start().await;
    let uri = format!("nbd://127.0.0.1:{}/vol0", r.addr.port());
    let o = run("nbdinfo", &["--size".into(), uri]).await;
    assert!(!o.status.success(), "{}", describe(&o));
    let err = String::from_utf8_lossy(&o.stderr).to_lowercase();
    assert!(
        err.contains("tls"),
        "the refusal mentions TLS: {}",
        describe(&o)
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_connects_over_tls_with_x509_credentials() {
    if !require_tool("qemu-img") {
        return;
    }
    let r = start().await;
    let args: Vec<String> = vec![
        "info".into(),
        "--output=json".into(),
        "--object".into(),
        format!("tls-creds-x509,id=tls0,dir={},endpoint=client", r.dir()),
        "--image-opts".into(),
        format!(
            "driver=nbd,host=127.0.0.1,port={},export=vol0,tls-creds=tls0",
            r.addr.port()
        ),
    ];
    let o = run("qemu-img", &args).await;
    assert!(o.status.success(), "{}", describe(&o));
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        json["virtual-size"],
        EXPORT_BYTES as u64,
        "{}",
        describe(&o)
    );
    r.stop().await;
}
