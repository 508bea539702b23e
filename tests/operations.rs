//! Running a node the way `docs/OPERATIONS.md` says: the example pair configs in `deploy/` pass
//! `--check`, the daemon reports readiness and stopping to systemd's notify socket, and the
//! metrics endpoint shows counters that move while a client does I/O.

#[path = "support/nbd_client.rs"]
mod nbd_client;

use nbd_client::Client;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const READY_TIMEOUT: Duration = Duration::from_secs(20);

fn twinblockd() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_twinblockd"))
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn deploy_pair_configs_pass_check() {
    let d = tempfile::tempdir().unwrap();
    for n in ["node0.toml", "node1.toml"] {
        std::fs::copy(repo().join("deploy").join(n), d.path().join(n)).unwrap();
    }
    std::fs::create_dir(d.path().join("shared")).unwrap();
    let key = d.path().join("pair.key");
    std::fs::write(&key, "0123456789abcdef0123456789abcdef\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    // The mailbox disks are shared disks that exist before the nodes start.
    for m in ["n0-0.img", "n1-0.img"] {
        File::create(d.path().join("shared").join(m))
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
    }
    for (me, partner) in [("node0.toml", "node1.toml"), ("node1.toml", "node0.toml")] {
        for extra in [vec!["--check"], vec!["--check-partner", partner]] {
            let out = Command::new(twinblockd())
                .current_dir(d.path())
                .arg("--config")
                .arg(me)
                .args(&extra)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{me} {extra:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/twinblockd@.service")).unwrap();
    assert!(unit.contains("Type=notify"), "{unit}");
}

/// A node serving one plain image, metrics on `metrics`.
fn plain_node(dir: &Path, nbd: SocketAddr, metrics: SocketAddr) -> PathBuf {
    let cfg = dir.join("node.toml");
    std::fs::write(
        &cfg,
        format!(
            "[node]\nid = 0\n[nbd]\nlisten = [\"{nbd}\"]\n[metrics]\nlisten = \"{metrics}\"\n\
             [[volume]]\nname = \"v\"\nfile = \"v.img\"\nsize = \"16MiB\"\n"
        ),
    )
    .unwrap();
    cfg
}

fn recv_state(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 256];
    let n = sock
        .recv(&mut buf)
        .expect("no notification from twinblockd");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn daemon_tells_systemd_ready_and_stopping() {
    let d = tempfile::tempdir().unwrap();
    let notify = d.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(READY_TIMEOUT)).unwrap();
    let cfg = plain_node(d.path(), free_addr(), free_addr());
    let child = Command::new(twinblockd())
        .arg("--config")
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &notify)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut daemon = Daemon(child);
    assert_eq!(recv_state(&sock), "READY=1");
    Command::new("kill")
        .arg("-TERM")
        .arg(daemon.0.id().to_string())
        .status()
        .unwrap();
    assert_eq!(recv_state(&sock), "STOPPING=1");
    let status = daemon.0.wait().unwrap();
    assert!(status.success(), "{status}");
}

fn scrape(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    text
}

/// The value of the sample line starting with `series ` (0 when absent).
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.parse().unwrap())
}

#[test]
fn metrics_counters_move_during_io() {
    let d = tempfile::tempdir().unwrap();
    let (nbd, metrics) = (free_addr(), free_addr());
    let cfg = plain_node(d.path(), nbd, metrics);
    let log = d.path().join("daemon.log");
    let mut daemon = Daemon(
        Command::new(twinblockd())
            .arg("--config")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let t = Instant::now();
    while TcpStream::connect(metrics).is_err() {
        if let Ok(Some(s)) = daemon.0.try_wait() {
            panic!(
                "twinblockd exited {s}: {}",
                std::fs::read_to_string(&log).unwrap()
            );
        }
        assert!(t.elapsed() < READY_TIMEOUT, "metrics never served");
        std::thread::sleep(Duration::from_millis(50));
    }
    let writes = r#"twinblock_nbd_requests_total{export="v",command="write"}"#;
    let bytes = r#"twinblock_nbd_request_bytes_total{export="v",command="write"}"#;
    let before = scrape(metrics);
    assert!(
        before.contains("# TYPE twinblock_uptime_seconds gauge"),
        "{before}"
    );
    let mut c = Client::connect(nbd, "v").unwrap();
    let mut last = (value(&before, writes), value(&before, bytes));
    for round in 0..3 {
        for i in 0..8u64 {
            c.write((round * 8 + i) * 65536, &[7u8; 65536], false)
                .unwrap();
        }
        // Scraped while the client is connected and writing.
        let now = scrape(metrics);
        let cur = (value(&now, writes), value(&now, bytes));
        assert_eq!(cur.0, last.0 + 8.0, "{now}");
        assert_eq!(cur.1, last.1 + 8.0 * 65536.0, "{now}");
        assert!(
            now.contains(
                r#"twinblock_nbd_request_duration_seconds_count{export="v",command="write"}"#
            ),
            "{now}"
        );
        last = cur;
    }
    c.disconnect();
}

/// A node serving journaled volume `j` on a RAID 1 array over two new images, a CP every 100 ms.
fn journaled_node(dir: &Path, nbd: SocketAddr, metrics: SocketAddr) -> PathBuf {
    let cfg = dir.join("node.toml");
    std::fs::write(
        &cfg,
        format!(
            "[node]\nid = 0\n[nbd]\nlisten = [\"{nbd}\"]\n[metrics]\nlisten = \"{metrics}\"\n\
             [[array]]\nname = \"md0\"\nlevel = 1\ndisks = [\"a.img\", \"b.img\"]\n\
             create = true\ndisk_size = \"16MiB\"\n\
             [[volume]]\nname = \"j\"\narray = \"md0\"\njournal = true\n\
             [nvram]\npath = \"node.nvram\"\nsize = \"8MiB\"\npersistence = \"msync\"\n\
             cp_interval_ms = 100\n"
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn cp_duration_histogram_moves_after_a_consistency_point() {
    let d = tempfile::tempdir().unwrap();
    let (nbd, metrics) = (free_addr(), free_addr());
    let cfg = journaled_node(d.path(), nbd, metrics);
    let log = d.path().join("daemon.log");
    let mut daemon = Daemon(
        Command::new(twinblockd())
            .arg("--config")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let t = Instant::now();
    while TcpStream::connect(metrics).is_err() || TcpStream::connect(nbd).is_err() {
        if let Ok(Some(s)) = daemon.0.try_wait() {
            panic!(
                "twinblockd exited {s}: {}",
                std::fs::read_to_string(&log).unwrap()
            );
        }
        assert!(t.elapsed() < READY_TIMEOUT, "node never served");
        std::thread::sleep(Duration::from_millis(50));
    }
    let count = r#"twinblock_journal_cp_duration_seconds_count{volume="j"}"#;
    let sum = r#"twinblock_journal_cp_duration_seconds_sum{volume="j"}"#;
    let inf = r#"twinblock_journal_cp_duration_seconds_bucket{volume="j",le="+Inf"}"#;
    let cps = r#"twinblock_journal_consistency_points_total{volume="j"}"#;
    let before = scrape(metrics);
    assert!(
        before.contains("# TYPE twinblock_journal_cp_duration_seconds histogram"),
        "{before}"
    );
    let mut c = Client::connect(nbd, "j").unwrap();
    for i in 0..16u64 {
        c.write(i * 65536, &[9u8; 65536], false).unwrap();
    }
    // The interval CP applies the writes; the histogram counts it with the CP counter.
    let t = Instant::now();
    loop {
        let now = scrape(metrics);
        if value(&now, count) > value(&before, count) {
            assert!(value(&now, sum) > 0.0, "{now}");
            assert_eq!(value(&now, inf), value(&now, count), "{now}");
            assert_eq!(value(&now, cps), value(&now, count), "{now}");
            break;
        }
        assert!(
            t.elapsed() < READY_TIMEOUT,
            "no CP counted in the histogram:\n{now}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    c.disconnect();
}

/// A real client (fio's NBD engine) writes for a few seconds; metrics scraped during the run move.
#[test]
fn metrics_counters_move_during_a_fio_run() {
    if Command::new("fio").arg("--version").output().is_err() {
        eprintln!("SKIPPED: fio is not installed (apt-get install fio)");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (nbd, metrics) = (free_addr(), free_addr());
    let cfg = plain_node(d.path(), nbd, metrics);
    let log = d.path().join("daemon.log");
    let mut daemon = Daemon(
        Command::new(twinblockd())
            .arg("--config")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let t = Instant::now();
    while TcpStream::connect(metrics).is_err() || TcpStream::connect(nbd).is_err() {
        if let Ok(Some(s)) = daemon.0.try_wait() {
            panic!(
                "twinblockd exited {s}: {}",
                std::fs::read_to_string(&log).unwrap()
            );
        }
        assert!(t.elapsed() < READY_TIMEOUT, "node never served");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut fio = Command::new("fio")
        .args([
            "--name=metrics",
            "--ioengine=nbd",
            &format!("--uri=nbd://{nbd}/v"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=4",
            "--size=8m",
            "--runtime=8",
            "--time_based",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let writes = r#"twinblock_nbd_requests_total{export="v",command="write"}"#;
    let clients = "twinblock_nbd_clients";
    // Scraped while fio runs: once its writes show, the counter grows between two scrapes and
    // a client is connected.
    let t = Instant::now();
    let first = loop {
        let now = scrape(metrics);
        if value(&now, writes) > 0.0 {
            break now;
        }
        assert!(
            t.elapsed() < Duration::from_secs(8),
            "fio's writes never showed:\n{now}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_millis(500));
    let second = scrape(metrics);
    let status = fio.wait().unwrap();
    assert!(status.success(), "fio failed");
    assert!(value(&second, writes) > value(&first, writes), "{second}");
    assert!(value(&second, clients) >= 1.0, "{second}");
}
