//! Shared harness for the end-to-end tests: start a `twinblockd` on a private temp directory with a
//! generated config and a free loopback port, drive real NBD clients with timeouts, and decide
//! whether a missing client tool skips a test (locally) or fails it (in CI).
//!
//! Every integration test binary includes this module with `mod common;`, and not every binary
//! uses every helper, hence the `dead_code` allowance.
//!
//! For developing the tests themselves, `TWINBLOCK_E2E_SERVER=nbdkit` runs the same tests against
//! the reference server (`nbdkit file dir=...`) instead of `twinblockd`: a test that fails there
//! is a broken test, not a broken daemon.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How long a freshly started daemon may take to accept TCP connections.
pub const DAEMON_READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How often the readiness probe retries its connect.
const READY_POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How long a graceful stop (SIGTERM) may take before the harness uses SIGKILL.
const GRACEFUL_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Default timeout for a short client command (nbdinfo, nbdsh, qemu-io).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default size of a test volume: small, so images stay sparse and tests stay fast.
pub const DEFAULT_VOLUME_BYTES: u64 = 64 * 1024 * 1024;
/// Default export name of a test volume.
pub const DEFAULT_EXPORT: &str = "vol0";
/// Default export description of a test volume.
pub const DEFAULT_DESCRIPTION: &str = "twinblock e2e scratch volume";

/// Is this run in CI (env `CI` set to anything but empty, `0` or `false`)?
pub fn in_ci() -> bool {
    match std::env::var("CI") {
        Ok(value) => !(value.is_empty() || value == "0" || value.eq_ignore_ascii_case("false")),
        Err(_) => false,
    }
}

/// Finds `name` on PATH (also in the sbin directories, where nbd-client and e2fsck live).
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from);
    std::env::split_paths(&path)
        .chain(extra)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Returns true when `name` is available. When it is not: in CI the test fails (CI must never
/// silently skip); locally it prints a skip message and returns false so the test can return.
pub fn require_tool(name: &str) -> bool {
    if find_tool(name).is_some() {
        return true;
    }
    if in_ci() {
        panic!(
            "required tool `{name}` is not installed (CI is set, so this is a failure, not a skip)"
        );
    }
    eprintln!("SKIP: required tool `{name}` is not installed; install it to run this test");
    false
}

/// `require_tool` for several tools; reports every missing one.
pub fn require_tools(names: &[&str]) -> bool {
    let mut all_present = true;
    for name in names {
        // Check every tool (no short-circuit) so one run names everything missing.
        all_present &= require_tool(name);
    }
    all_present
}

/// Is the Python used by nbdsh able to import libnbd's bindings? (Debian's `/usr/bin/python3`
/// has them; another python3 earlier on PATH may not.)
pub fn require_nbdsh() -> bool {
    if !require_tool("nbdsh") {
        return false;
    }
    let probe = nbdsh_command().args(["-n", "-c", "import nbd"]).output();
    match probe {
        Ok(out) if out.status.success() => true,
        Ok(out) => {
            let msg = format!(
                "nbdsh cannot import the nbd module: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            if in_ci() {
                panic!("{msg}");
            }
            eprintln!("SKIP: {msg}");
            false
        }
        Err(err) => panic!("cannot run nbdsh: {err}"),
    }
}

/// A `nbdsh` command with `/usr/bin` first on PATH so it runs under Debian's python3 (which has
/// the libnbd bindings).
pub fn nbdsh_command() -> Command {
    let path = std::env::var("PATH").unwrap_or_default();
    let mut cmd = Command::new("nbdsh");
    cmd.env("PATH", format!("/usr/bin:{path}"));
    cmd
}

/// What a finished command printed.
#[derive(Debug)]
pub struct CmdOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    /// The full output, for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "exit status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

fn describe_command(cmd: &Command) -> String {
    let mut text = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        let _ = write!(text, " {}", arg.to_string_lossy());
    }
    text
}

fn drain<R: Read + Send + 'static>(reader: Option<R>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut reader) = reader {
            // A read error only truncates what we show; the exit status still decides.
            let _ = reader.read_to_end(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Runs `cmd` with stdin closed, capturing stdout and stderr; kills it after `timeout`.
/// Returns Err with a description when it cannot start or times out.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<CmdOutput, String> {
    let shown = describe_command(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| format!("cannot start `{shown}`: {err}"))?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => thread::sleep(Duration::from_millis(20)),
            Err(err) => return Err(format!("cannot wait for `{shown}`: {err}")),
        }
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    match status {
        Some(status) => Ok(CmdOutput { status, stdout, stderr }),
        None => Err(format!(
            "`{shown}` did not finish within {timeout:?}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
        )),
    }
}

/// Runs `cmd` and panics, showing the command and all its output, unless it exits 0 in time.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> CmdOutput {
    let shown = describe_command(cmd);
    match run_with_timeout(cmd, timeout) {
        Ok(out) if out.status.success() => out,
        Ok(out) => panic!("`{shown}` failed\n{}", out.describe()),
        Err(msg) => panic!("{msg}"),
    }
}

/// Runs `cmd` and panics unless it exits non-zero in time (an expected, clean failure).
pub fn run_fails(cmd: &mut Command, timeout: Duration) -> CmdOutput {
    let shown = describe_command(cmd);
    match run_with_timeout(cmd, timeout) {
        Ok(out) if !out.status.success() => out,
        Ok(out) => panic!(
            "`{shown}` was expected to fail but succeeded\n{}",
            out.describe()
        ),
        Err(msg) => panic!("{msg}"),
    }
}

/// A loopback port that was free for both TCP and UDP a moment ago, below the ephemeral range.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    // Outside the kernel's ephemeral range (32768-60999 by default): a port taken from that
    // range by binding port 0 can be handed to any other socket (a daemon's UDP sender, a
    // client connection) between this call and the daemon's bind. Each port is checked free
    // for both TCP and UDP (the heartbeat listens on UDP), and a process-wide counter keeps
    // concurrent tests of one binary on different ports.
    const FIRST_PORT: u32 = 20_000;
    const PORTS: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7919) % PORTS;
    for _ in 0..PORTS {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST_PORT + (start + n) % PORTS) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
        {
            return port;
        }
    }
    panic!(
        "no loopback port free for both TCP and UDP in {FIRST_PORT}..{}",
        FIRST_PORT + PORTS
    );
}

/// A temp directory for one test, under the system temp dir (or `TWINBLOCK_E2E_TMP`).
pub fn temp_dir(label: &str) -> tempfile::TempDir {
    let base = std::env::var_os("TWINBLOCK_E2E_TMP")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base).expect("create the e2e temp base dir");
    tempfile::Builder::new()
        .prefix(&format!("twinblock-e2e-{label}-"))
        .tempdir_in(&base)
        .expect("create an e2e temp dir")
}

/// One plain image export in the generated config.
#[derive(Clone, Debug)]
pub struct VolumeSpec {
    pub name: String,
    pub description: String,
    pub size_bytes: u64,
    pub direct_io: bool,
    /// Exported read-only; the harness creates the (sparse) image first, since the daemon never
    /// creates a read-only image.
    pub read_only: bool,
}

impl Default for VolumeSpec {
    fn default() -> Self {
        VolumeSpec {
            name: DEFAULT_EXPORT.to_string(),
            description: DEFAULT_DESCRIPTION.to_string(),
            size_bytes: DEFAULT_VOLUME_BYTES,
            direct_io: true,
            read_only: false,
        }
    }
}

/// What to put in the generated `twinblockd` config.
#[derive(Clone, Debug)]
pub struct DaemonSpec {
    pub volumes: Vec<VolumeSpec>,
    /// Extra TOML appended verbatim (arrays, nvram, ...).
    pub extra_toml: String,
}

impl Default for DaemonSpec {
    fn default() -> Self {
        DaemonSpec {
            volumes: vec![VolumeSpec::default()],
            extra_toml: String::new(),
        }
    }
}

/// TOML string literal (basic string with escapes).
fn toml_str(value: &str) -> String {
    let mut out = String::from("\"");
    for ch in value.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The config file text for `spec`, serving NBD on `listen`, with data in `data_dir`.
pub fn render_config(spec: &DaemonSpec, data_dir: &Path, listen: SocketAddr) -> String {
    let mut toml = String::new();
    let _ = writeln!(toml, "[node]\nid = 0\nname = \"e2e\"");
    let _ = writeln!(toml, "data_dir = {}", toml_str(&data_dir.to_string_lossy()));
    let _ = writeln!(toml, "admin_socket = \"admin.sock\"\n");
    let _ = writeln!(
        toml,
        "[nbd]\nlisten = [{}]\n",
        toml_str(&listen.to_string())
    );
    for volume in &spec.volumes {
        let _ = writeln!(toml, "[[volume]]");
        let _ = writeln!(toml, "name = {}", toml_str(&volume.name));
        let _ = writeln!(toml, "description = {}", toml_str(&volume.description));
        let _ = writeln!(toml, "file = {}", toml_str(&format!("{}.img", volume.name)));
        let _ = writeln!(toml, "size = {}", volume.size_bytes);
        let _ = writeln!(toml, "read_only = {}", volume.read_only);
        let _ = writeln!(toml, "direct_io = {}\n", volume.direct_io);
    }
    toml.push_str(&spec.extra_toml);
    toml
}

/// Which server the harness starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerKind {
    Twinblockd,
    /// `nbdkit file dir=...`: the reference server, to validate the tests themselves.
    Nbdkit,
}

impl ServerKind {
    pub fn from_env() -> ServerKind {
        match std::env::var("TWINBLOCK_E2E_SERVER").as_deref() {
            Ok("nbdkit") => ServerKind::Nbdkit,
            _ => ServerKind::Twinblockd,
        }
    }
}

/// A running NBD server on a private temp directory; killed (SIGKILL) on drop.
pub struct Daemon {
    child: Option<Child>,
    kind: ServerKind,
    spec: DaemonSpec,
    dir: tempfile::TempDir,
    addr: SocketAddr,
    config_path: PathBuf,
    log_path: PathBuf,
    starts: u32,
}

impl Daemon {
    /// A daemon serving one 64 MiB plain volume `vol0`.
    pub fn start_default() -> Daemon {
        Daemon::start(DaemonSpec::default())
    }

    /// Writes the config for `spec`, starts the server and waits until it accepts connections.
    pub fn start(spec: DaemonSpec) -> Daemon {
        let kind = ServerKind::from_env();
        let dir = temp_dir("daemon");
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let config_path = dir.path().join("twinblockd.toml");
        let log_path = dir.path().join("twinblockd.log");
        let config = render_config(&spec, dir.path(), addr);
        std::fs::write(&config_path, config).expect("write the generated twinblockd config");
        for volume in spec.volumes.iter().filter(|v| v.read_only) {
            let image = dir.path().join(format!("{}.img", volume.name));
            let file = std::fs::File::create(&image).expect("create a read-only volume's image");
            file.set_len(volume.size_bytes)
                .expect("size a read-only volume's image");
        }
        let mut daemon = Daemon {
            child: None,
            kind,
            spec,
            dir,
            addr,
            config_path,
            log_path,
            starts: 0,
        };
        daemon.spawn_and_wait();
        daemon
    }

    fn spawn_and_wait(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open the daemon log file");
        let log_err = log.try_clone().expect("clone the daemon log handle");
        let mut cmd = match self.kind {
            ServerKind::Twinblockd => {
                let mut cmd = Command::new(env!("CARGO_BIN_EXE_twinblockd"));
                cmd.arg("--config").arg(&self.config_path);
                cmd.env(
                    "RUST_LOG",
                    std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
                );
                cmd
            }
            ServerKind::Nbdkit => self.nbdkit_command(),
        };
        cmd.stdin(Stdio::null()).stdout(log).stderr(log_err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {:?}: {err}", self.kind));
        self.child = Some(child);
        self.starts += 1;
        self.wait_ready();
    }

    fn nbdkit_command(&self) -> Command {
        let exports = self.dir.path().join("exports");
        std::fs::create_dir_all(&exports).expect("create the nbdkit export dir");
        for volume in &self.spec.volumes {
            let image = exports.join(&volume.name);
            if !image.exists() {
                let file = std::fs::File::create(&image).expect("create a stand-in image");
                file.set_len(volume.size_bytes)
                    .expect("size a stand-in image");
            }
        }
        let description = self
            .spec
            .volumes
            .first()
            .map(|v| v.description.clone())
            .unwrap_or_default();
        let mut cmd = Command::new("nbdkit");
        cmd.args(["-f", "-i", "127.0.0.1", "-p", &self.addr.port().to_string()])
            .arg("--filter=exportname")
            .arg("file")
            .arg(format!("dir={}", exports.display()))
            .arg(format!("exportdesc=fixed:{description}"));
        cmd
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + DAEMON_READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    panic!(
                        "{:?} exited before serving ({status})\nconfig:\n{}\nlog:\n{}",
                        self.kind,
                        self.config_text(),
                        self.log()
                    );
                }
            }
            // twinblockd binds its admin socket just after the NBD listener: a test that
            // talks to both must find both ready.
            if TcpStream::connect_timeout(&self.addr, READY_POLL_INTERVAL).is_ok()
                && (self.kind != ServerKind::Twinblockd
                    || std::os::unix::net::UnixStream::connect(self.dir().join("admin.sock"))
                        .is_ok())
            {
                return;
            }
            if Instant::now() >= deadline {
                let log = self.log();
                self.kill_hard();
                panic!(
                    "{:?} did not accept connections on {} within {DAEMON_READY_TIMEOUT:?}\nlog:\n{log}",
                    self.kind, self.addr
                );
            }
            thread::sleep(READY_POLL_INTERVAL);
        }
    }

    pub fn kind(&self) -> ServerKind {
        self.kind
    }

    /// The NBD listen address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `nbd://127.0.0.1:PORT/EXPORT`.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.addr)
    }

    /// URI of the first configured volume.
    pub fn default_uri(&self) -> String {
        let name = self
            .spec
            .volumes
            .first()
            .map(|v| v.name.as_str())
            .unwrap_or(DEFAULT_EXPORT);
        self.uri(name)
    }

    /// The daemon's data directory (also a good place for test scratch files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn spec(&self) -> &DaemonSpec {
        &self.spec
    }

    pub fn config_text(&self) -> String {
        std::fs::read_to_string(&self.config_path).unwrap_or_default()
    }

    /// Everything the daemon wrote to stderr/stdout so far (across restarts).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_else(|err| format!("<no log: {err}>"))
    }

    /// Pid of the running process, if any.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Is the process still alive?
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Panics with the log unless the process is alive and accepts a TCP connection.
    pub fn assert_serving(&mut self) {
        assert!(
            self.is_running(),
            "{:?} is no longer running\nlog:\n{}",
            self.kind,
            self.log()
        );
        if let Err(err) = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2)) {
            panic!(
                "{:?} no longer accepts connections on {}: {err}\nlog:\n{}",
                self.kind,
                self.addr,
                self.log()
            );
        }
    }

    /// SIGKILL, then reap. For crash tests, and what drop does.
    pub fn kill_hard(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait; SIGKILL if it does not exit within a few seconds. Returns the exit
    /// status if the process exited on its own after SIGTERM.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + GRACEFUL_STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// Starts the server again with the same config and data (after `kill_hard` or `stop`).
    pub fn restart(&mut self) {
        self.kill_hard();
        self.spawn_and_wait();
    }

    /// How many times the process was started.
    pub fn starts(&self) -> u32 {
        self.starts
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill_hard();
        if thread::panicking() {
            eprintln!(
                "--- {:?} log ({}) ---\n{}",
                self.kind,
                self.log_path.display(),
                self.log()
            );
        }
    }
}

/// Writes `len` bytes of seeded pseudo-random data to `path`.
pub fn write_random_file(path: &Path, len: usize, seed: u64) {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; len];
    rng.fill_bytes(&mut data);
    std::fs::write(path, &data).unwrap_or_else(|err| panic!("write {}: {err}", path.display()));
}

/// sha256 of a file via `sha256sum` (coreutils), as a hex string.
pub fn sha256_file(path: &Path) -> String {
    let out = run_ok(Command::new("sha256sum").arg(path), CLIENT_TIMEOUT);
    out.stdout
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Path of a file under `tests/` in the source tree.
pub fn tests_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(relative)
}

/// Building the guest initramfs (copying binaries and modules, gzip).
const INITRAMFS_BUILD_TIMEOUT: Duration = Duration::from_secs(60);

/// The newest kernel with both an image in /boot and a module tree.
pub fn find_kernel() -> Option<(String, PathBuf)> {
    let mut versions: Vec<String> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            entry
                .file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("vmlinuz-"))
                .map(String::from)
        })
        .filter(|version| Path::new("/lib/modules").join(version).is_dir())
        .collect();
    versions.sort();
    let version = versions.pop()?;
    let image = PathBuf::from(format!("/boot/vmlinuz-{version}"));
    Some((version, image))
}

/// Builds the initramfs once per (kernel version, script content) and caches it in the target dir.
pub fn initramfs_for(kernel_version: &str) -> PathBuf {
    let script = tests_path("kernel/build-initramfs.sh");
    let mut script_text =
        std::fs::read(&script).unwrap_or_else(|err| panic!("read {}: {err}", script.display()));
    // The guest's reconnecting client is compiled into the image too.
    let helper = tests_path("kernel/nbd-reconnect.c");
    script_text.extend(
        std::fs::read(&helper).unwrap_or_else(|err| panic!("read {}: {err}", helper.display())),
    );
    let stamp = {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        script_text.hash(&mut hasher);
        hasher.finish()
    };
    let cache_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kernel-initramfs");
    let image = cache_dir.join(format!("initrd-{kernel_version}-{stamp:016x}.gz"));
    if image.is_file() {
        return image;
    }
    std::fs::create_dir_all(&cache_dir)
        .unwrap_or_else(|err| panic!("create {}: {err}", cache_dir.display()));
    run_ok(
        Command::new("bash")
            .arg(&script)
            .arg(&image)
            .arg(kernel_version),
        INITRAMFS_BUILD_TIMEOUT,
    );
    image
}
