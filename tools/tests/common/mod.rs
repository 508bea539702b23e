//! Helpers shared by the `twinctl` integration tests: locating the binaries, starting a
//! `twinblockd` (or a `twinctl demo` pair) on temporary images, running `twinctl` against its
//! admin socket, and the checks every command's output must pass (human text without JSON or
//! Rust debug names; a comparable snapshot of the node for "a refused command changes nothing").
//!
//! Each test binary uses a different subset, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

pub fn twinctl() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_twinctl"))
}

/// `cargo test --workspace` (or `cargo build --bins`) builds every binary before the tests run;
/// twinblockd sits beside twinctl.
pub fn twinblockd() -> PathBuf {
    let p = twinctl().with_file_name("twinblockd");
    assert!(
        p.exists(),
        "{} not built: run `cargo build --release --bins` (or the tests with `cargo test --workspace`)",
        p.display()
    );
    p
}

/// A running daemon, killed when dropped.
pub struct Daemon(pub Child);

impl Daemon {
    /// SIGTERM, then wait: the node closes its arrays cleanly.
    pub fn stop(mut self) {
        assert!(
            terminate(&mut self.0),
            "twinblockd did not stop after SIGTERM"
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// SIGTERM to a child we started, then wait for it to exit; false if it did not in time.
pub fn terminate(child: &mut Child) -> bool {
    // SAFETY: kill(2) on the pid of a child this test spawned and has not waited for yet, so the
    // pid cannot have been reused by another process.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let t = Instant::now();
    while t.elapsed() < READY_TIMEOUT {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

pub fn free_addr() -> String {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string()
}

/// A node config serving RAID 5 array `md0` over four 40 MiB images as journaled volume `r5`,
/// with `extra` appended to the array section.
pub fn raid5_config(dir: &Path, addr: &str, extra: &str) -> PathBuf {
    let config = format!(
        r#"[node]
id = 0
data_dir = "{dir}"
[nbd]
listen = ["{addr}"]
[[array]]
name = "md0"
level = 5
chunk = "64KiB"
disks = ["d0.img", "d1.img", "d2.img", "d3.img"]
create = true
disk_size = "40MiB"
{extra}
[[volume]]
name = "r5"
array = "md0"
journal = true
[nvram]
path = "{dir}/node0.nvram"
size = "8MiB"
persistence = "msync"
cp_interval_ms = 100
"#,
        dir = dir.display()
    );
    let cfg = dir.join("node0.toml");
    std::fs::write(&cfg, config).unwrap();
    cfg
}

/// Starts twinblockd on `cfg` and waits until its admin socket and NBD address answer.
pub fn start_daemon(cfg: &Path, addr: &str, log: &Path) -> Daemon {
    let child = Command::new(twinblockd())
        .arg("--config")
        .arg(cfg)
        .stdout(Stdio::null())
        .stderr(File::create(log).unwrap())
        .spawn()
        .unwrap();
    let mut d = Daemon(child);
    let sock = cfg.parent().unwrap().join("admin.sock");
    let t = Instant::now();
    while !(sock.exists() && TcpStream::connect(addr).is_ok()) {
        if let Ok(Some(s)) = d.0.try_wait() {
            panic!(
                "twinblockd exited with {s}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(t.elapsed() < READY_TIMEOUT, "twinblockd did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    d
}

/// A RAID 5 node in `dir` (see `raid5_config`): the daemon, its NBD address and admin socket.
pub fn start_raid5(dir: &Path, extra: &str) -> (Daemon, String, PathBuf) {
    let addr = free_addr();
    let cfg = raid5_config(dir, &addr, extra);
    let d = start_daemon(&cfg, &addr, &dir.join("daemon.log"));
    (d, addr, dir.join("admin.sock"))
}

pub fn ctl(sock: &Path, args: &[&str]) -> Output {
    Command::new(twinctl())
        .arg("--socket")
        .arg(sock)
        .args(args)
        .output()
        .unwrap()
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs a command that must succeed; its stdout.
pub fn ctl_ok(sock: &Path, args: &[&str]) -> String {
    let out = ctl(sock, args);
    assert!(
        out.status.success(),
        "twinctl {args:?} failed: {}",
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command with `--json` that must succeed and print one JSON document, whose names
/// of states, kinds and reasons are the API's snake_case words (`assert_stable_names`).
pub fn ctl_json(sock: &Path, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let out = ctl_ok(sock, &a);
    let v = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("twinctl {a:?} printed no JSON ({e}): {out}"));
    assert_stable_names(&v, &format!("twinctl {a:?}"));
    v
}

/// Keys whose string values (or, for `stop`, the single key of an object value) name a state,
/// kind, mode or reason: scripts compare them, so they must be snake_case words.
const NAME_KEYS: &[&str] = &[
    "state",
    "code",
    "accepted",
    "kind",
    "mode",
    "level",
    "persistence",
    "persist_method",
    "cause",
    "stop",
    "phase",
    "flags",
    "set",
];

fn is_snake_case(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('_')
        && !s.ends_with('_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// A Rust variant name (`WaitingForGiveback`, `EnableTakeover`): two or more capitalised words
/// run together.
fn is_camel_case(s: &str) -> bool {
    s.len() > 3
        && s.chars().all(|c| c.is_ascii_alphanumeric())
        && s.starts_with(|c: char| c.is_ascii_uppercase())
        && s.chars().skip(1).any(|c| c.is_ascii_uppercase())
        && s.chars().any(|c| c.is_ascii_lowercase())
}

/// Fails on a Rust `Debug` name anywhere in a `--json` answer: a name key whose value is not
/// snake_case (`"Msync"`, `"NORMAL"`, `{"Blank": ..}`), or any string that is a CamelCase
/// variant name.
pub fn assert_stable_names(v: &serde_json::Value, what: &str) {
    use serde_json::Value;
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if NAME_KEYS.contains(&k.as_str()) {
                    let names: Vec<&str> = match x {
                        Value::String(s) => vec![s.as_str()],
                        Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
                        Value::Object(o) if k == "stop" => o.keys().map(String::as_str).collect(),
                        _ => vec![],
                    };
                    for n in names {
                        assert!(
                            is_snake_case(n),
                            "{what}: `{k}` is `{n}`, not a snake_case name:\n{v}"
                        );
                    }
                }
                assert_stable_names(x, what);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| assert_stable_names(x, what)),
        Value::String(s) => assert!(
            !is_camel_case(s),
            "{what}: `{s}` looks like a Rust variant name"
        ),
        _ => {}
    }
}

/// Runs a command in human form that must succeed, and checks it reads as text for people.
pub fn ctl_human(sock: &Path, args: &[&str]) -> String {
    let out = ctl_ok(sock, args);
    assert_human(&out, &format!("twinctl {args:?}"));
    out
}

/// Text meant for people: not empty, no JSON, no Rust `Debug` output (`Some(..)`, enum variant
/// names of the internal state types), no internal field names.
pub fn assert_human(out: &str, what: &str) {
    assert!(!out.trim().is_empty(), "{what} printed nothing");
    const NOT_FOR_PEOPLE: &[&str] = &[
        "{\"",
        "\":",
        "Some(",
        "None",
        "Ok(",
        "Err(",
        "Rebuilding",
        "Msync",
        "Blank",
        "Nothing",
        "(Check)",
        "(Repair)",
        "_bytes",
        "_ops",
        "_seq",
        "persist_method",
        "null",
    ];
    for bad in NOT_FOR_PEOPLE {
        assert!(!out.contains(bad), "{what} shows `{bad}` to people:\n{out}");
    }
}

/// Asserts `v` (an object) has every one of `keys`.
pub fn assert_keys(v: &serde_json::Value, keys: &[&str], what: &str) {
    let obj = v
        .as_object()
        .unwrap_or_else(|| panic!("{what}: not a JSON object: {v}"));
    for k in keys {
        assert!(obj.contains_key(*k), "{what}: no field `{k}` in {v}");
    }
}

/// Fields that change on their own while nothing is done to the node: clocks, heartbeat
/// counters, traffic counters, read cache counters (a background CP fills the cache), and every
/// `*age_ms`.
const VOLATILE_KEYS: &[&str] = &[
    "uptime_s",
    "lease_left_ms",
    "sequence",
    "stats",
    "read_cache",
    "rate_bytes_per_s",
    "eta_s",
    "sends",
];

fn strip_volatile(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            m.retain(|k, _| !VOLATILE_KEYS.contains(&k.as_str()) && !k.ends_with("age_ms"));
            m.values_mut().for_each(strip_volatile);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(strip_volatile),
        _ => {}
    }
}

/// What a refused command must leave as it was: `status --json` (with the HA section on a pair
/// node) and every volume's `volume list --json`, without the fields that move on their own.
pub fn snapshot(sock: &Path) -> serde_json::Value {
    let mut v = serde_json::json!({
        "status": ctl_json(sock, &["status"]),
        "volumes": ctl_json(sock, &["volume", "list"]),
    });
    strip_volatile(&mut v);
    v
}

/// Runs `args` (as given and with `--json`): each must exit non-zero with one stderr line
/// containing `why`, print nothing on stdout, and leave the node's snapshot unchanged.
pub fn refused(sock: &Path, args: &[&str], why: &str) {
    for json in [false, true] {
        let mut a: Vec<&str> = if json { vec!["--json"] } else { vec![] };
        a.extend_from_slice(args);
        let before = snapshot(sock);
        let out = ctl(sock, &a);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "twinctl {a:?} was accepted: {}",
            text(&out)
        );
        assert!(
            out.stdout.is_empty(),
            "twinctl {a:?} printed on stdout: {}",
            text(&out)
        );
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "twinctl {a:?}: not one line: {err}"
        );
        assert!(err.contains(why), "twinctl {a:?}: {err}");
        assert_human(&err, &format!("twinctl {a:?} (stderr)"));
        // Prefixed with the command as typed, not the protocol's op name (`disk_fail request`).
        let command = err
            .strip_prefix("twinctl: ")
            .and_then(|rest| rest.split(": ").next())
            .unwrap_or_else(|| panic!("twinctl {a:?}: no `twinctl: ` prefix: {err}"));
        assert!(
            !command.contains('_') && !command.contains("request"),
            "twinctl {a:?}: {err}"
        );
        assert_eq!(snapshot(sock), before, "twinctl {a:?} changed the node");
    }
}

/// The demo's port layout: NBD base and base+1, interconnect +1000, HA datagrams +2000.
const DEMO_PORT_OFFSETS: [u16; 3] = [0, 1000, 2000];

/// A base port whose `twinctl demo` ports (TCP and UDP) are all free now. They lie below the
/// ephemeral range; the start depends on the pid so parallel test binaries rarely collide.
pub fn free_demo_base_port() -> u16 {
    let start = 20_000 + (std::process::id() % 5_000) as u16 * 2;
    (0..400u16)
        .map(|i| 20_000 + (start - 20_000 + i * 2) % 9_000)
        .find(|&base| {
            DEMO_PORT_OFFSETS.iter().all(|off| {
                (0..2).all(|n| {
                    let p = base + off + n;
                    std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
                        && std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok()
                })
            })
        })
        .expect("no free demo port range between 20000 and 29000")
}

/// A `twinctl demo` pair (two twinblockd nodes with `[ha]`) serving until dropped.
pub struct DemoPair {
    child: Option<Child>,
    pub dir: PathBuf,
    stdout: PathBuf,
}

/// How long the demo may take to create its images and start both nodes.
const DEMO_START_TIMEOUT: Duration = Duration::from_secs(120);

impl DemoPair {
    /// Starts `twinctl demo` in `tmp` and waits until it says both nodes serve.
    pub fn start(tmp: &Path) -> DemoPair {
        let dir = tmp.join("demo");
        let nvram = tmp.join("nvram");
        std::fs::create_dir_all(&nvram).unwrap();
        let stdout = tmp.join("demo.stdout");
        let child = Command::new(twinctl())
            .args(["demo", "--no-check", "--size", "64MiB"])
            .arg("--port")
            .arg(free_demo_base_port().to_string())
            .arg("--dir")
            .arg(&dir)
            .arg("--nvram-dir")
            .arg(&nvram)
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).unwrap())
            .stderr(File::create(tmp.join("demo.stderr")).unwrap())
            .spawn()
            .unwrap();
        let mut pair = DemoPair {
            child: Some(child),
            dir,
            stdout,
        };
        let t = Instant::now();
        loop {
            let out = std::fs::read_to_string(&pair.stdout).unwrap_or_default();
            if out.contains("Serving until Ctrl-C.") {
                return pair;
            }
            if let Some(c) = pair.child.as_mut() {
                if let Ok(Some(s)) = c.try_wait() {
                    panic!("twinctl demo exited with {s}:\n{out}\n{}", pair.logs());
                }
            }
            assert!(
                t.elapsed() < DEMO_START_TIMEOUT,
                "twinctl demo did not start serving:\n{out}\n{}",
                pair.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What the demo printed so far (its banner).
    pub fn banner(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn socket(&self, node: u8) -> PathBuf {
        self.dir.join(format!("node{node}/admin.sock"))
    }

    pub fn logs(&self) -> String {
        (0..2)
            .map(|n| {
                let p = self.dir.join(format!("node{n}/twinblockd.log"));
                format!(
                    "--- node {n} log ---\n{}",
                    std::fs::read_to_string(p).unwrap_or_default()
                )
            })
            .collect()
    }
}

impl Drop for DemoPair {
    /// SIGTERM: the demo stops both nodes (a final consistency point each) and exits.
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if !terminate(&mut c) {
                // No panic in drop: kill it and let the test's own assertion speak.
                eprintln!("twinctl demo did not stop after SIGTERM; killing it");
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}
