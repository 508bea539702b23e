//! A pair of `twinblockd` processes for the mirror tests: one directory with both nodes' disk
//! images, configs, NVRAM files and the shared key; each node serves a journaled RAID-5 volume
//! (`r0` on node 0, `r1` on node 1). Node 0 reaches node 1's interconnect through a
//! fault-injecting TCP proxy ([`Proxy`]) so a test can cut and restore that link.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::common::free_port;

pub const PAIR_ID: &str = "6f1c0d3e-8a4b-4c2d-9e7f-1a2b3c4d5e6f";
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A TCP proxy that forwards to `target` until cut; while cut it drops every connection.
pub struct Proxy {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    live: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    pub fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let cut = Arc::new(AtomicBool::new(false));
        let live: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (c, l) = (cut.clone(), live.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(client) = conn else { continue };
                if c.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let mut guard = l.lock().unwrap();
                guard.push(client.try_clone().unwrap());
                guard.push(server.try_clone().unwrap());
                drop(guard);
                pump(client.try_clone().unwrap(), server.try_clone().unwrap());
                pump(server, client);
            }
        });
        Proxy { addr, cut, live }
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for s in self.live.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}

/// One node of the pair.
pub struct Node {
    pub id: u8,
    pub nbd: SocketAddr,
    pub interconnect: SocketAddr,
    pub dir: PathBuf,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Node {
    pub fn start(&mut self) {
        self.spawn();
        let start = Instant::now();
        while TcpStream::connect_timeout(&self.nbd, Duration::from_millis(100)).is_err() {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("node {} exited with {st}; log:\n{}", self.id, self.log());
            }
            assert!(
                start.elapsed() < READY_TIMEOUT,
                "node {} not serving; log:\n{}",
                self.id,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The node binds its NBD listeners before its admin socket (and a killed node leaves
        // its socket file behind): wait for the admin socket too, so a request right after
        // `start` does not race the bind.
        while UnixStream::connect(self.dir.join("admin.sock")).is_err() {
            assert!(
                start.elapsed() < READY_TIMEOUT,
                "node {} admin socket not up; log:\n{}",
                self.id,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open node log");
        let child = Command::new(env!("CARGO_BIN_EXE_twinblockd"))
            .arg("--config")
            .arg(&self.config)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn twinblockd");
        self.child = Some(child);
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let st = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .expect("kill");
        assert!(st.success());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn uri(&self) -> String {
        format!("nbd://{}/r{}", self.nbd, self.id)
    }

    /// One admin request; the daemon's `result`.
    pub fn admin(&self, op: &str) -> serde_json::Value {
        self.admin_request(&format!("{{\"op\":\"{op}\"}}"))
    }

    /// One admin request given as its JSON line (for requests with arguments).
    pub fn admin_request(&self, request: &str) -> serde_json::Value {
        let op = request;
        let mut s = UnixStream::connect(self.dir.join("admin.sock")).expect("admin socket");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        writeln!(s, "{request}").unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).expect("admin answer");
        assert_eq!(v["ok"], true, "admin {op}: {v}");
        v["result"].clone()
    }

    /// This node's mirror status of its own volume.
    pub fn mirror(&self) -> serde_json::Value {
        self.admin("status")["pair"]["mirrors"][0].clone()
    }

    /// Waits until `cond` holds on this node's mirror status.
    pub fn wait_mirror(
        &self,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&serde_json::Value) -> bool,
    ) {
        let start = Instant::now();
        loop {
            let m = self.mirror();
            if cond(&m) {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "node {}: waited {timeout:?} for {what}; mirror: {m}\nlog:\n{}",
                self.id,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn partner_copy_path(&self, volume: &str) -> PathBuf {
        self.dir.join(format!("{volume}.partner.nvram"))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_ref() {
            // A stopped process cannot die of SIGKILL until continued.
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
        }
        self.kill9();
        if std::thread::panicking() {
            eprintln!("--- node {} log ---\n{}", self.id, self.log());
        }
    }
}

/// Settings the tests vary.
#[derive(Clone, Copy)]
pub struct PairSpec {
    pub mirror_timeout_ms: u64,
    pub cp_interval_ms: u64,
    /// Node 0 dials a port nobody listens on (it never reaches node 1).
    pub node0_isolated: bool,
    /// `nvram.persistence` of both nodes (the NVRAM files are in the test's directory).
    pub persistence: &'static str,
}

impl Default for PairSpec {
    fn default() -> Self {
        PairSpec {
            mirror_timeout_ms: 400,
            cp_interval_ms: 200,
            node0_isolated: false,
            persistence: "msync",
        }
    }
}

pub struct TestPair {
    pub root: tempfile::TempDir,
    pub nodes: [Node; 2],
    pub proxy: Proxy,
}

impl TestPair {
    pub fn key(&self) -> Vec<u8> {
        std::fs::read(self.root.path().join("pair.key")).unwrap()
    }

    /// Waits until both nodes report their volume's mirror in sync.
    pub fn wait_in_sync(&self, timeout: Duration) {
        for n in &self.nodes {
            n.wait_mirror("in sync", timeout, |m| m["in_sync"] == true);
        }
    }
}

fn config(
    root: &Path,
    id: u8,
    nbd: [SocketAddr; 2],
    ic: SocketAddr,
    dial: SocketAddr,
    spec: &PairSpec,
) -> String {
    let other = 1 - id;
    let disks: Vec<String> = (0..4)
        .map(|d| format!("\"{}/disks/n{id}-d{d}.img\"", root.display()))
        .collect();
    format!(
        r#"[node]
id = {id}
data_dir = "{root}/node{id}"
admin_socket = "admin.sock"

[nbd]
listen = ["{nbd_me}"]

[[array]]
name = "md{id}"
level = 5
chunk = "64KiB"
disks = [{disks}]
create = true
disk_size = "32MiB"

[[volume]]
name = "r{id}"
array = "md{id}"
journal = true

[nvram]
path = "{root}/node{id}/r{id}.nvram"
size = "8MiB"
persistence = "{persistence}"
cp_interval_ms = {cp}

[pair]
pair_id = "{PAIR_ID}"
partner_id = {other}
listen = "{ic}"
partner_address = "{dial}"
partner_service_address = "{nbd_other}"
key_file = "{root}/pair.key"
mirror_timeout_ms = {timeout}
reconnect_min_ms = 20
reconnect_max_ms = 200
"#,
        root = root.display(),
        nbd_me = nbd[id as usize],
        nbd_other = nbd[other as usize],
        disks = disks.join(", "),
        cp = spec.cp_interval_ms,
        timeout = spec.mirror_timeout_ms,
        persistence = spec.persistence,
    )
}

/// Writes both configs and the key, starts both nodes.
pub fn start_pair(spec: PairSpec) -> TestPair {
    use std::os::unix::fs::PermissionsExt;
    let root = super::common::temp_dir("mirror");
    let r = root.path();
    std::fs::create_dir_all(r.join("disks")).unwrap();
    let key = r.join("pair.key");
    std::fs::write(&key, b"test-pair-key-0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let nbd = [0, 1].map(|_| SocketAddr::from(([127, 0, 0, 1], free_port())));
    let ic = [0, 1].map(|_| SocketAddr::from(([127, 0, 0, 1], free_port())));
    let proxy = Proxy::start(ic[1]);
    if spec.node0_isolated {
        proxy.cut();
    }
    let dial = [proxy.addr, ic[0]];
    let nodes = [0u8, 1].map(|id| {
        let dir = r.join(format!("node{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join(format!("node{id}.toml"));
        std::fs::write(
            &cfg,
            config(r, id, nbd, ic[id as usize], dial[id as usize], &spec),
        )
        .unwrap();
        Node {
            id,
            nbd: nbd[id as usize],
            interconnect: ic[id as usize],
            log: dir.join("twinblockd.log"),
            dir,
            config: cfg,
            child: None,
        }
    });
    let mut pair = TestPair { root, nodes, proxy };
    for n in &mut pair.nodes {
        n.start();
    }
    pair
}
