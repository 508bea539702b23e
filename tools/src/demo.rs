//! `twinctl demo`: the quickstart. Makes one working directory with both nodes' disk images,
//! configs and a pair key, starts two node processes (a mirrored HA pair on loopback), waits
//! until they serve and their NVRAM mirrors are in sync, prints how to reach them, and stops
//! both on Ctrl-C.
//!
//! The nodes are `twinblockd` processes when that binary sits next to `twinctl` (after `cargo
//! build --release --workspace`) and is not older; otherwise `twinctl` runs the same node code
//! itself in a child process (`twinctl node --config ...`), so the demo needs nothing but `cargo
//! run -p twinblock-tools`.
//!
//! Both nodes run with `[ha]` (default timers): a killed node's volumes are taken over by its
//! partner on the dead node's address. `--failover` shows that under a verifying writer and
//! times it (see `failover.rs`); the printed commands name the full path of this `twinctl` and
//! each node's admin socket, so they work when pasted.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use twinblock::admin::{client, Request};
use twinblock::config::{format_bytes, parse_size};

/// Node 0's NVRAM file for the default demo directory: tmpfs, like a real node's default.
const DEMO_NVRAM: &str = "/dev/shm/twinblock-demo-node0.nvram";
/// Where the NVRAM files go unless `--nvram-dir` says otherwise.
const DEFAULT_NVRAM_DIR: &str = "/dev/shm";
/// Node 0's NBD port unless `--port` says otherwise.
const DEFAULT_PORT: u16 = 10809;
/// How long the nodes may take to serve.
const NODE_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the demo waits for the mirrors to report in sync before printing anyway.
const MIRROR_SYNC_WAIT: Duration = Duration::from_secs(10);
/// Interconnect ports sit this far above the NBD ports.
pub const INTERCONNECT_PORT_OFFSET: u16 = 1000;
/// HA status datagram ports (UDP) sit this far above the NBD ports. Like the others they are
/// below Linux's ephemeral range (32768 and up), where the tests pick their ports.
pub const UDP_PORT_OFFSET: u16 = 2000;

/// The NVRAM file of demo node `node` for working directory `dir`, in `nvram_dir`. Each working
/// directory gets its own: the journal in one file belongs to one directory's array, and
/// replaying it into another array would write that array's data into this one.
pub fn demo_nvram_for(dir: &Path, nvram_dir: &Path, node: u8) -> PathBuf {
    if dir == Path::new(crate::DEFAULT_DEMO_DIR) && nvram_dir == Path::new(DEFAULT_NVRAM_DIR) {
        return PathBuf::from(DEMO_NVRAM.replace("node0", &format!("node{node}")));
    }
    let key = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    // FNV-1a of the path: stable, short, enough to keep demo directories apart.
    let h = key
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        });
    let suffix = if node == 0 {
        String::new()
    } else {
        format!("-node{node}")
    };
    nvram_dir.join(format!("twinblock-demo-{h:016x}{suffix}.nvram"))
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Working directory for images, configs, sockets (kept between runs).
    #[arg(long, default_value = crate::DEFAULT_DEMO_DIR)]
    dir: PathBuf,
    /// NBD port of node 0 on 127.0.0.1 (node 1 uses the next one; the interconnect uses these
    /// plus 1000, the HA status datagrams these plus 2000).
    #[arg(long, default_value_t = DEFAULT_PORT)]
    port: u16,
    /// Size of each journaled RAID-5 volume (and of each plain image).
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    size: u64,
    /// Delete the working directory's images first.
    #[arg(long)]
    fresh: bool,
    /// Do not run `nbdinfo` against the nodes once they serve.
    #[arg(long)]
    no_check: bool,
    /// Directory of the NVRAM files (tmpfs, like a real node's default).
    #[arg(long, default_value = DEFAULT_NVRAM_DIR)]
    nvram_dir: PathBuf,
    /// Show a takeover instead of serving: write to node 1's journaled volume (r5b) with a
    /// verifying writer, SIGKILL node 1, time node 0's takeover up to the first I/O it serves
    /// on node 1's address, check that every acknowledged write reads back, then restart
    /// node 1 and give back. Exits non-zero if a write was lost.
    #[arg(long)]
    failover: bool,
    /// With --failover: run the kill, takeover and giveback cycle this many times and print
    /// the timings as a Markdown table (median, min, max).
    #[arg(long, default_value_t = 1, requires = "failover", value_parser = clap::value_parser!(u32).range(1..=1000))]
    repeat: u32,
    /// With --failover: leave node 1 dead and node 0 serving both nodes' volumes (until
    /// Ctrl-C) instead of restarting node 1 and giving back.
    #[arg(long, requires = "failover")]
    no_giveback: bool,
}

/// What differs between the two demo nodes.
pub struct DemoNode {
    pub id: u8,
    pub port: u16,
    pub partner_port: u16,
    pub nvram: PathBuf,
}

impl DemoNode {
    fn journaled(&self) -> &'static str {
        if self.id == 0 {
            "r5"
        } else {
            "r5b"
        }
    }
    fn plain(&self) -> String {
        format!("vol{}", self.id)
    }
}

/// Bytes per disk image: four disks give a RAID-5 volume of about `size` (three data disks'
/// worth, plus room for the member metadata).
pub fn demo_disk_bytes(size: u64) -> u64 {
    (size / 3 + (4 << 20)).next_multiple_of(1 << 20)
}

/// A demo node's config text: a journaled RAID-5 volume over four images in the shared
/// `../disks` directory, a plain image, and the `[pair]` section.
pub fn demo_config(n: &DemoNode, size: u64) -> String {
    let disk = demo_disk_bytes(size);
    let id = n.id;
    format!(
        r#"# Generated by `twinctl demo`; edit and run `twinblockd --config` on it if you like.
[node]
id = {id}
name = "demo-node{id}"
admin_socket = "admin.sock"

[nbd]
listen = ["127.0.0.1:{port}"]
default_export = "{r5}"

[[array]]
name = "md{id}"
level = 5
chunk = "64KiB"
# Candidate disks: the node finds the array's members and spares among them by their
# superblocks, so a disk swapped in by `twinctl disk replace`/`disk add` that matches the
# pattern is found at the next start without editing this file.
disks = "../disks/node{id}-disk*.img"
# First start: create the array on node{id}-disk0.img .. node{id}-disk3.img (images of disk_size).
create = true
members = 4
disk_size = {disk}

[[volume]]
name = "{r5}"
description = "twinblock demo: node {id}'s RAID-5 over four images, journaled and mirrored to the partner"
array = "md{id}"
journal = true

[[volume]]
name = "{plain}"
description = "twinblock demo: plain image"
file = "{plain}.img"
size = {size}

[nvram]
path = "{nvram}"
size = "64MiB"
persistence = "none"

[pair]
pair_id = "5e1f0a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b"
partner_id = {partner}
listen = "127.0.0.1:{ic}"
partner_address = "127.0.0.1:{partner_ic}"
partner_service_address = "127.0.0.1:{partner_port}"
key_file = "../pair.key"
mirror_timeout_ms = 1000
# The copy of the partner's journal, beside this node's files.
partner_nvram_dir = "."

# Takeover: when node {partner} falls silent on every path, this node preempts its disks,
# replays its journal and serves its volumes on 127.0.0.1:{partner_port}. Default timers.
[ha]
udp_listen = "127.0.0.1:{udp}"
partner_udp = "127.0.0.1:{partner_udp}"
mailbox_disks = ["../disks/node0-disk0.img", "../disks/node1-disk0.img"]
partner_config = "../node{partner}/node{partner}.toml"
"#,
        port = n.port,
        partner_port = n.partner_port,
        ic = n.port + INTERCONNECT_PORT_OFFSET,
        partner_ic = n.partner_port + INTERCONNECT_PORT_OFFSET,
        udp = n.port + UDP_PORT_OFFSET,
        partner_udp = n.partner_port + UDP_PORT_OFFSET,
        partner = 1 - id,
        r5 = n.journaled(),
        plain = n.plain(),
        nvram = n.nvram.display()
    )
}

/// Writes a node's config unless one exists: a config kept between runs keeps what the operator
/// changed in it (the disks it names are found by their superblocks, so it needs no rewrite after
/// a disk replacement). `--fresh` removes it.
fn write_config_once(path: &Path, text: &str) -> Result<()> {
    if path.exists() {
        if std::fs::read_to_string(path).ok().as_deref() != Some(text) {
            println!(
                "keeping {} from an earlier run (it differs from what this run would write; \
                 run with --fresh to start over)",
                path.display()
            );
        }
        return Ok(());
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// Creates the pair key (random, mode 0600) unless it exists.
fn ensure_key(path: &Path) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if path.exists() {
        return Ok(());
    }
    let key: String = (0..32).map(|_| format!("{:02x}", rand_byte())).collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create the pair key {}", path.display()))?;
    writeln!(f, "{key}")?;
    Ok(())
}

fn rand_byte() -> u8 {
    let mut b = [0u8; 1];
    // /dev/urandom is always there on Linux; fall back to the clock's nanoseconds.
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_ok()
    {
        return b[0];
    }
    (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
        % 251) as u8
}

/// The program that runs a node: `twinblockd` next to this `twinctl` when it is at least as new
/// (an older one may predate the code this `twinctl` was built from), else `twinctl node`,
/// which runs the same node code as this build.
fn node_program() -> Result<(PathBuf, bool)> {
    let me = std::env::current_exe().context("cannot find the twinctl executable")?;
    let daemon = me.with_file_name("twinblockd");
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    match (modified(&daemon), modified(&me)) {
        (Some(d), Some(m)) if d >= m => Ok((daemon, true)),
        _ => Ok((me, false)),
    }
}

/// Creates the disk images that do not exist yet, `bytes` long (sparse). The mailbox disks
/// must exist before either node starts: each node writes its status to both from its first
/// heartbeat, and a node whose status cannot reach every mailbox disk serves nothing.
fn ensure_disks(root: &Path, bytes: u64) -> Result<()> {
    for id in 0..2 {
        for d in 0..4 {
            let path = root.join(format!("disks/node{id}-disk{d}.img"));
            if path.exists() {
                continue;
            }
            let f = std::fs::File::create(&path)
                .with_context(|| format!("cannot create disk image {}", path.display()))?;
            f.set_len(bytes)
                .with_context(|| format!("cannot size disk image {}", path.display()))?;
        }
    }
    Ok(())
}

/// The two node processes of a running demo, and what is needed to restart one.
pub struct DemoPair {
    pub root: PathBuf,
    pub nodes: [DemoNode; 2],
    pub configs: [PathBuf; 2],
    program: PathBuf,
    is_daemon: bool,
    children: [Option<Child>; 2],
}

impl DemoPair {
    /// Writes both configs (and the key and disk images when missing), starts node 0, waits
    /// until it serves, then node 1 likewise.
    async fn start(args: &DemoArgs) -> Result<DemoPair> {
        let root = args.dir.clone();
        if args.fresh {
            for sub in ["node0", "node1", "disks"] {
                let d = root.join(sub);
                if d.exists() {
                    std::fs::remove_dir_all(&d)
                        .with_context(|| format!("cannot clear {}", d.display()))?;
                }
            }
        }
        std::fs::create_dir_all(root.join("disks"))
            .with_context(|| format!("cannot create demo directory {}", root.display()))?;
        ensure_key(&root.join("pair.key"))?;
        ensure_disks(&root, demo_disk_bytes(args.size))?;
        let nodes = [0u8, 1].map(|id| DemoNode {
            id,
            port: args.port + u16::from(id),
            partner_port: args.port + u16::from(1 - id),
            nvram: demo_nvram_for(&root, &args.nvram_dir, id),
        });
        let configs = [0u8, 1].map(|id| root.join(format!("node{id}/node{id}.toml")));
        for n in &nodes {
            let dir = root.join(format!("node{}", n.id));
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            if args.fresh {
                let _ = std::fs::remove_file(&n.nvram);
            }
            let cfg = &configs[usize::from(n.id)];
            write_config_once(cfg, &demo_config(n, args.size))?;
        }
        let (program, is_daemon) = node_program()?;
        let mut pair = DemoPair {
            root,
            nodes,
            configs,
            program,
            is_daemon,
            children: [None, None],
        };
        // Both start before either is waited for: a node left waiting for giveback by an
        // earlier run needs its partner up to give its disks back.
        for id in [0u8, 1] {
            pair.spawn(id, false)?;
        }
        for id in [0u8, 1] {
            pair.wait_serving(id).await?;
        }
        Ok(pair)
    }

    /// Starts node `id` (its log truncated, or appended to with `append`).
    pub fn spawn(&mut self, id: u8, append: bool) -> Result<()> {
        let log_path = self.log(id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(append)
            .write(true)
            .truncate(!append)
            .open(&log_path)
            .with_context(|| format!("cannot open {}", log_path.display()))?;
        let mut cmd = Command::new(&self.program);
        if !self.is_daemon {
            cmd.arg("node");
        }
        cmd.arg("--config")
            .arg(&self.configs[usize::from(id)])
            // Plain log lines: the file is read by people and by `--failover`.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", self.program.display()))?;
        self.children[usize::from(id)] = Some(child);
        Ok(())
    }

    /// SIGKILL to node `id` (no clean stop: its partner has to take over); waits for it to die.
    pub fn kill(&mut self, id: u8) -> Result<()> {
        let Some(mut c) = self.children[usize::from(id)].take() else {
            bail!("node {id} is not running");
        };
        c.kill()
            .with_context(|| format!("cannot kill node {id} (pid {})", c.id()))?;
        let _ = c.wait();
        Ok(())
    }

    /// The pid of node `id`, while running.
    pub fn pid(&self, id: u8) -> Option<u32> {
        self.children[usize::from(id)].as_ref().map(Child::id)
    }

    pub fn log(&self, id: u8) -> PathBuf {
        self.root.join(format!("node{id}/twinblockd.log"))
    }

    pub fn admin_socket(&self, id: u8) -> PathBuf {
        admin_socket(&self.root, id)
    }

    pub fn address(&self, id: u8) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.nodes[usize::from(id)].port))
    }

    /// The command line that starts node `id` again by hand.
    fn start_command(&self, id: u8) -> String {
        format!(
            "{}{} --config {}",
            self.program.display(),
            if self.is_daemon { "" } else { " node" },
            self.configs[usize::from(id)].display()
        )
    }

    /// An error naming node `id`'s exit and its log, if it exited.
    fn exited(&mut self, id: u8) -> Option<String> {
        let c = self.children[usize::from(id)].as_mut()?;
        let st = c.try_wait().ok()??;
        self.children[usize::from(id)] = None;
        Some(format!(
            "node {id} exited ({st}); see {}",
            self.log(id).display()
        ))
    }

    /// Waits until node `id` serves NBD and reports HA state Normal (or Takeover).
    async fn wait_serving(&mut self, id: u8) -> Result<()> {
        let start = Instant::now();
        let port = self.nodes[usize::from(id)].port;
        let mut gave_back = false;
        let mut announced = false;
        loop {
            let nbd = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
            let state = ha_state(&self.admin_socket(id)).await;
            // Takeover: it also holds its partner's disks (an earlier run stopped that way).
            if nbd && matches!(state.as_deref(), Some("normal" | "takeover")) {
                return Ok(());
            }
            // Left over from an earlier run that stopped during a takeover: the partner still
            // holds this node's disks. The demo gives them back rather than wait forever.
            if state.as_deref() == Some("waiting_for_giveback") && !gave_back {
                if !announced {
                    println!(
                        "node {id}'s disks are still held by node {} from an earlier run: giving \
                         back",
                        1 - id
                    );
                    announced = true;
                }
                // The partner may still be starting: asked again until it answers, within the
                // same timeout as the wait itself.
                match client::call(&self.admin_socket(1 - id), &Request::HaGiveback).await {
                    Ok(_) => gave_back = true,
                    Err(e) if start.elapsed() > NODE_READY_TIMEOUT => {
                        return Err(e).with_context(|| {
                            format!("node {} did not give node {id}'s disks back", 1 - id)
                        });
                    }
                    Err(_) => {}
                }
            }
            if let Some(e) = self.exited(id) {
                let text = std::fs::read_to_string(self.log(id)).unwrap_or_default();
                bail!(
                    "{e} before serving; its log:\n{text}\n(another server on port {port} or \
                     its UDP/interconnect ports? pick others with `twinctl demo --port N`)"
                );
            }
            if start.elapsed() > NODE_READY_TIMEOUT {
                bail!(
                    "node {id} did not serve within {NODE_READY_TIMEOUT:?}; see {}",
                    self.log(id).display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until node `id` reports HA state `want`.
    pub async fn wait_state(&mut self, id: u8, want: &str, within: Duration) -> Result<Duration> {
        let start = Instant::now();
        loop {
            let st = ha_state(&self.admin_socket(id)).await;
            if st.as_deref() == Some(want) {
                return Ok(start.elapsed());
            }
            if let Some(e) = self.exited(id) {
                bail!("{e}");
            }
            if start.elapsed() > within {
                bail!(
                    "node {id} not in state {want} within {within:?} (it is {}); see {}",
                    st.as_deref().unwrap_or("unreachable"),
                    self.log(id).display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until node `id` is `Normal` and nothing but the partner being alive and heard
    /// stands in the way of a takeover (no operator disable, mirror in sync, same protocol).
    pub async fn wait_takeover_ready(&mut self, id: u8, within: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            let st = client::call(&self.admin_socket(id), &Request::HaStatus).await;
            let blockers: Vec<String> = match &st {
                Ok(v) => v["takeover_blockers"]
                    .as_array()
                    .map(|b| {
                        b.iter()
                            .filter(|b| b["code"] != "partner_heard")
                            .map(|b| b["reason"].as_str().unwrap_or("?").to_string())
                            .collect()
                    })
                    .unwrap_or_default(),
                Err(e) => vec![format!("{e:#}")],
            };
            let state = match &st {
                Ok(v) => v["node"]["state"].as_str().unwrap_or("?").to_string(),
                Err(_) => "unreachable".to_string(),
            };
            if state == "normal" && blockers.is_empty() {
                return Ok(());
            }
            if let Some(e) = self.exited(id) {
                bail!("{e}");
            }
            if start.elapsed() > within {
                bail!(
                    "node {id} is not ready to take over within {within:?}: {}",
                    if blockers.is_empty() {
                        format!("it is in state {state}, not Normal")
                    } else {
                        format!("state {state}: {}", blockers.join("; "))
                    }
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends SIGTERM to the running nodes (a clean stop applies the journals) and waits.
    fn stop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            // SAFETY: kill(2) with a pid we spawned and still own (not yet waited for).
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
        }
        for c in self.children.iter_mut().flatten() {
            let _ = c.wait();
        }
        self.children = [None, None];
    }
}

impl Drop for DemoPair {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Node state from the HA status on `socket` (None: unreachable).
async fn ha_state(socket: &Path) -> Option<String> {
    let v = client::call(socket, &Request::HaStatus).await.ok()?;
    v["node"]["state"].as_str().map(str::to_string)
}

pub async fn run(args: &DemoArgs) -> Result<()> {
    if args.no_giveback && args.repeat > 1 {
        bail!("--no-giveback leaves node 1 down, so it cannot be combined with --repeat above 1");
    }
    let mut pair = DemoPair::start(args).await?;
    let synced = wait_in_sync(&pair.root).await;
    print_banner(&pair, synced).await;
    if args.failover {
        let giveback = !args.no_giveback;
        crate::failover::run(&mut pair, args.repeat, giveback).await?;
        if giveback {
            println!("\nstopping both nodes (a final consistency point applies the journals)");
            return Ok(());
        }
    } else if !args.no_check {
        for n in &pair.nodes {
            self_check(&format!("nbd://127.0.0.1:{}/{}", n.port, n.journaled()));
        }
    }
    println!("\nServing until Ctrl-C.");
    loop {
        tokio::select! {
            _ = twinblock::signals::shutdown_signal() => break,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                for id in [0u8, 1] {
                    if let Some(e) = pair.exited(id) {
                        println!("{e}; its partner takes over its volumes. Start it again with\n  {}",
                            pair.start_command(id));
                    }
                }
                if pair.children.iter().all(Option::is_none) {
                    bail!("both nodes have exited; see their logs in {}", pair.root.display());
                }
            }
        }
    }
    println!("stopping the nodes (a final consistency point applies the journals)");
    pair.stop();
    Ok(())
}

fn admin_socket(root: &Path, id: u8) -> PathBuf {
    root.join(format!("node{id}/admin.sock"))
}

async fn wait_in_sync(root: &Path) -> bool {
    let start = Instant::now();
    while start.elapsed() < MIRROR_SYNC_WAIT {
        let mut all = true;
        for id in [0, 1] {
            let st = client::call(&admin_socket(root, id), &Request::Status).await;
            all &= st.is_ok_and(|v| v["pair"]["mirrors_in_sync"] == true);
        }
        if all {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

async fn print_banner(pair: &DemoPair, synced: bool) {
    let root = &pair.root;
    let nodes = &pair.nodes;
    let twinctl = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("twinctl"));
    let ctl = twinctl.display();
    println!(
        "twinblock demo: an HA pair in {} ({})",
        root.display(),
        if pair.is_daemon {
            format!("two {} processes", pair.program.display())
        } else {
            format!(
                "two `{} node` processes: the node code of this build",
                pair.program.display()
            )
        }
    );
    for n in nodes {
        println!(
            "\nnode {} (pid {}) serves on 127.0.0.1:{}:",
            n.id,
            pair.pid(n.id).map(|p| p.to_string()).unwrap_or("-".into()),
            n.port
        );
        if let Ok(vols) = client::call(&admin_socket(root, n.id), &Request::VolumeList).await {
            for v in vols.as_array().map(Vec::as_slice).unwrap_or_default() {
                let name = v["name"].as_str().unwrap_or("?");
                println!(
                    "  {:<6} {:>8}  {:<16} nbd://127.0.0.1:{}/{}",
                    name,
                    v["size"].as_u64().map(format_bytes).unwrap_or_default(),
                    v["kind"].as_str().unwrap_or("?"),
                    n.port,
                    name
                );
            }
        }
    }
    println!(
        "\nNVRAM mirror: {}",
        if synced {
            "in sync on both nodes (every journaled write is in both nodes' NVRAM before its reply)"
        } else {
            "NOT in sync yet; see `status` below"
        }
    );
    println!(
        "High availability: each node watches the other (UDP {u0}/{u1} and a mailbox on \
         disks/node0-disk0.img and disks/node1-disk0.img, default timers); if one dies the other \
         takes its disks, replays its journal and serves its volumes on its address within about \
         a second.",
        u0 = nodes[0].port + UDP_PORT_OFFSET,
        u1 = nodes[1].port + UDP_PORT_OFFSET,
    );
    let (s0, s1) = (admin_socket(root, 0), admin_socket(root, 1));
    println!(
        "\nTry, from another terminal:\n  \
         nbdinfo nbd://127.0.0.1:{p0}/r5\n  \
         fio --name=randwrite --ioengine=nbd --uri=nbd://127.0.0.1:{p0}/r5 --rw=randwrite --bs=4k \
         --iodepth=32 --size=256m --runtime=10 --time_based\n  \
         {ctl} --socket {s0} status        # node 0: both nodes' HA states, paths, disks, mirror\n  \
         {ctl} --socket {s1} status        # node 1\n  \
         {ctl} --socket {s0} volume show r5\n  \
         {ctl} journal dump {nv0}        # node 0's own journal\n  \
         {ctl} journal dump {copy}        # node 1's copy of it\n\
         \nTakeover and giveback by hand:\n  \
         kill -9 {pid1}        # node 1 dies; node 0 serves r5b and vol1 on 127.0.0.1:{p1}\n  \
         {ctl} --socket {s0} status        # node 0: Takeover, holding node 1's disks\n  \
         {start1}        # node 1 again: it waits for giveback\n  \
         {ctl} --socket {s0} giveback        # node 0 returns node 1's volumes\n  \
         {ctl} --socket {s0} takeover-disable        # node 0 will not take over; status says why\n\
         \nOr let the demo do it and time it: {ctl} demo --failover{dir_arg}",
        p0 = nodes[0].port,
        p1 = nodes[1].port,
        s0 = s0.display(),
        s1 = s1.display(),
        nv0 = nodes[0].nvram.display(),
        copy = root.join("node1/r5.partner.nvram").display(),
        pid1 = pair.pid(1).map(|p| p.to_string()).unwrap_or("<node 1's pid>".into()),
        start1 = pair.start_command(1),
        dir_arg = {
            let mut a = String::new();
            if root != Path::new(crate::DEFAULT_DEMO_DIR) {
                a.push_str(&format!(" --dir {}", root.display()));
            }
            if nodes[0].port != DEFAULT_PORT {
                a.push_str(&format!(" --port {}", nodes[0].port));
            }
            a
        },
    );
}

/// Ask a real NBD client about the export, when one is installed, so the user sees it serve.
fn self_check(uri: &str) {
    let Ok(out) = std::process::Command::new("nbdinfo").arg(uri).output() else {
        println!("\n(nbdinfo not installed: skipping the self-check; apt-get install libnbd-bin)");
        return;
    };
    println!("\n$ nbdinfo {uri}");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        print!("{}", String::from_utf8_lossy(&out.stderr));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use twinblock::config::{check_partner, Config};

    #[test]
    fn each_demo_directory_has_its_own_nvram_files() {
        let shm = Path::new(DEFAULT_NVRAM_DIR);
        let demo_nvram = |d: &str| demo_nvram_for(Path::new(d), shm, 0);
        assert_eq!(
            demo_nvram(crate::DEFAULT_DEMO_DIR),
            PathBuf::from(DEMO_NVRAM)
        );
        let a = demo_nvram("/tmp/demo-a");
        let b = demo_nvram("/tmp/demo-b");
        assert_ne!(a, b);
        assert_ne!(a, PathBuf::from(DEMO_NVRAM));
        assert_eq!(a, demo_nvram("/tmp/demo-a"));
        assert_ne!(demo_nvram_for(Path::new("/tmp/demo-a"), shm, 1), a);
        let elsewhere = demo_nvram_for(Path::new(crate::DEFAULT_DEMO_DIR), Path::new("/tmp/nv"), 0);
        assert!(elsewhere.starts_with("/tmp/nv"), "{}", elsewhere.display());
    }

    #[test]
    fn demo_configs_are_valid_and_form_one_pair() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let key = d.path().join("pair.key");
        std::fs::write(&key, "0123456789abcdef0123456789abcdef\n").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let cfgs: Vec<Config> = [0u8, 1]
            .iter()
            .map(|&id| {
                let n = DemoNode {
                    id,
                    port: 10809 + u16::from(id),
                    partner_port: 10809 + u16::from(1 - id),
                    nvram: PathBuf::from(format!("/dev/shm/x{id}.nvram")),
                };
                let dir = d.path().join(format!("node{id}"));
                std::fs::create_dir_all(&dir).unwrap();
                Config::parse(&demo_config(&n, 1 << 30), &dir.join("n.toml")).unwrap()
            })
            .collect();
        assert_eq!(cfgs[0].volumes.len(), 2);
        assert_eq!(cfgs[0].arrays[0].disks.len(), 4);
        assert_eq!(check_partner(&cfgs[0], &cfgs[1]), Vec::<String>::new());
        // Both nodes have [ha], each sending to the port the other listens on.
        let ha: Vec<_> = cfgs.iter().map(|c| c.ha.clone().unwrap()).collect();
        assert_eq!(ha[0].partner_udp, ha[1].udp_listen);
        assert_eq!(ha[1].partner_udp, ha[0].udp_listen);
        assert_eq!(ha[0].udp_listen, "127.0.0.1:12809");
        assert_eq!(ha[0].mailbox_disks, ha[1].mailbox_disks);
        assert_eq!(ha[0].heartbeat_interval_ms, 100, "default timers");
    }
}
