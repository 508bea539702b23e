//! `twinctl create`: makes what a node's config names before its first start (disk images,
//! arrays, volume images) in one step, through the node's own creation path
//! (`twinblock::create`); with `--partner` both nodes' storage of a pair; with `--pair DIR` it
//! first writes the pair's two config files and key into DIR. A refusal changes nothing; a failure
//! part way undoes what the command had made, config files included.
//!
//! The generated configs follow `deploy/node0.toml`: a journaled array over `members` images per
//! node, mirrored NVRAM, HA over UDP and a mailbox on each node's first disk. Text generation is
//! pure (`pair_config`); only `run` touches files.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use twinblock::config::{parse_size, Config};
use twinblock::create::{self, Change, CreateReport, UndoLog};

/// The pair's NBD port on node 0 unless `--port` says otherwise.
const DEFAULT_NBD_PORT: u16 = 10809;
/// Interconnect and HA datagram ports sit this far above the NBD port (as in the demo).
const INTERCONNECT_PORT_OFFSET: u16 = 1000;
const UDP_PORT_OFFSET: u16 = 2000;

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// The partner's config too: create both nodes' storage of a pair (shared disks) in one step.
    #[arg(long, conflicts_with = "pair")]
    partner: Option<PathBuf>,
    /// Write a pair's config files DIR/node0.toml and DIR/node1.toml (and DIR/pair.key when
    /// missing) first, then create what they name. DIR must exist; existing configs are never
    /// overwritten.
    #[arg(long, value_name = "DIR")]
    pair: Option<PathBuf>,
    /// With --pair: node 0's address.
    #[arg(long, default_value = "127.0.0.1", requires = "pair")]
    address0: std::net::IpAddr,
    /// With --pair: node 1's address (when it equals node 0's, node 1 uses the next ports).
    #[arg(long, default_value = "127.0.0.1", requires = "pair")]
    address1: std::net::IpAddr,
    /// With --pair: NBD port (the interconnect uses it plus 1000, HA datagrams plus 2000).
    #[arg(long, default_value_t = DEFAULT_NBD_PORT, requires = "pair")]
    port: u16,
    /// With --pair: RAID level of each node's array.
    #[arg(long, default_value_t = 5, requires = "pair")]
    level: u8,
    /// With --pair: disks per array.
    #[arg(long, default_value_t = 4, requires = "pair")]
    members: u32,
    /// With --pair: size of each disk image.
    #[arg(long, default_value = "1GiB", value_parser = parse_size, requires = "pair")]
    disk_size: u64,
    /// With --pair: directory of the disk images, reachable from both hosts (default: DIR).
    #[arg(long, requires = "pair")]
    disk_dir: Option<PathBuf>,
    /// With --pair: directory of the NVRAM files (tmpfs or DAX).
    #[arg(long, default_value = "/dev/shm", requires = "pair")]
    nvram_dir: PathBuf,
}

/// What differs between the two generated configs.
#[derive(Debug, Clone)]
pub struct PairPlan {
    pub pair_id: String,
    pub addresses: [std::net::IpAddr; 2],
    pub port: u16,
    pub level: u8,
    pub members: u32,
    pub disk_size: u64,
    /// As written into the configs (relative to the config's directory, or absolute).
    pub disk_dir: Option<PathBuf>,
    pub nvram_dir: PathBuf,
}

impl PairPlan {
    /// Node `id`'s port for a service at `offset` above the NBD port: both nodes use the same
    /// ports on two hosts, node 1 the next ones when both run on one address.
    fn port(&self, id: u8, offset: u16) -> u16 {
        let step = u16::from(self.addresses[0] == self.addresses[1] && id == 1);
        self.port + offset + step
    }

    fn address(&self, id: u8, offset: u16) -> String {
        std::net::SocketAddr::new(self.addresses[usize::from(id)], self.port(id, offset))
            .to_string()
    }

    fn disk_pattern(&self, id: u8) -> String {
        let name = format!("n{id}-*.img");
        match &self.disk_dir {
            Some(d) => d.join(name).display().to_string(),
            None => name,
        }
    }
}

/// Node `id`'s config text.
pub fn pair_config(p: &PairPlan, id: u8) -> String {
    let partner = 1 - id;
    let first_disk = |n: u8| p.disk_pattern(n).replacen('*', "0", 1);
    format!(
        r#"# Written by `twinctl create --pair`: node {id} of a twinblock HA pair. Both nodes read
# both files (each takes its partner over from its partner's config). docs/OPERATIONS.md walks
# through starting and operating the pair.

[node]
id = {id}
name = "node{id}"
admin_socket = "node{id}.sock"

[nbd]
listen = ["{nbd}"]
default_export = "data{id}"

[[array]]
name = "md{id}"
level = {level}
chunk = "64KiB"
# Candidate disks: the array is assembled from whichever hold its superblocks, so a replaced
# disk or a new spare matching the pattern is found without editing this file.
disks = "{pattern}"
# Made by `twinctl create`; at a start, used only if no candidate holds the array.
create = true
members = {members}
disk_size = {disk_size}

[[volume]]
name = "data{id}"
description = "node {id}'s journaled RAID {level} volume"
array = "md{id}"
journal = true

[nvram]
path = "{nvram}"
size = "256MiB"
persistence = "none"

[pair]
pair_id = "{pair_id}"
partner_id = {partner}
listen = "{ic}"
partner_address = "{partner_ic}"
partner_service_address = "{partner_nbd}"
key_file = "pair.key"
mirror_timeout_ms = 1000

[ha]
udp_listen = "{udp}"
partner_udp = "{partner_udp}"
mailbox_disks = ["{mailbox0}", "{mailbox1}"]
partner_config = "node{partner}.toml"
"#,
        nbd = p.address(id, 0),
        level = p.level,
        pattern = p.disk_pattern(id),
        members = p.members,
        disk_size = p.disk_size,
        nvram = p
            .nvram_dir
            .join(format!("twinblock-{}-node{id}.nvram", &p.pair_id[..8]))
            .display(),
        pair_id = p.pair_id,
        ic = p.address(id, INTERCONNECT_PORT_OFFSET),
        partner_ic = p.address(partner, INTERCONNECT_PORT_OFFSET),
        partner_nbd = p.address(partner, 0),
        udp = p.address(id, UDP_PORT_OFFSET),
        partner_udp = p.address(partner, UDP_PORT_OFFSET),
        mailbox0 = first_disk(0),
        mailbox1 = first_disk(1),
    )
}

/// Writes a new file (never replacing one), logging it for undo.
fn write_new(path: &Path, text: &str, mode: u32, undo: &mut UndoLog) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    undo.push(Change::NewFile(path.to_path_buf()));
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// 32 random bytes as hex, for a new pair key.
fn random_key() -> Result<String> {
    use std::io::Read;
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("cannot read /dev/urandom for the pair key")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Writes the pair's configs (and key) into `dir`; returns their paths.
fn write_pair(a: &CreateArgs, dir: &Path, undo: &mut UndoLog) -> Result<[PathBuf; 2]> {
    if !dir.is_dir() {
        bail!(
            "directory {} does not exist; twinctl does not create directories: create it first",
            dir.display()
        );
    }
    let paths = [0, 1].map(|id| dir.join(format!("node{id}.toml")));
    for p in &paths {
        if p.exists() {
            bail!(
                "{} exists; it is not overwritten: move it away, or run `twinctl --config {} \
                 create` to create what it names",
                p.display(),
                p.display()
            );
        }
    }
    let plan = PairPlan {
        pair_id: uuid::Uuid::new_v4().to_string(),
        addresses: [a.address0, a.address1],
        port: a.port,
        level: a.level,
        members: a.members,
        disk_size: a.disk_size,
        disk_dir: a.disk_dir.clone(),
        nvram_dir: a.nvram_dir.clone(),
    };
    let key = dir.join("pair.key");
    if !key.exists() {
        write_new(&key, &format!("{}\n", random_key()?), 0o600, undo)?;
    }
    for (id, p) in [0u8, 1].iter().zip(&paths) {
        write_new(p, &pair_config(&plan, *id), 0o644, undo)?;
    }
    Ok(paths)
}

/// `twinctl create`.
pub async fn run(a: &CreateArgs, config: Option<&Path>, json: bool) -> Result<()> {
    let mut undo = UndoLog::default();
    let mut report = CreateReport::default();
    let paths: Vec<PathBuf> = match (&a.pair, config) {
        (Some(dir), _) => {
            let written = match write_pair(a, dir, &mut undo) {
                Ok(w) => w,
                Err(e) => {
                    let problems = undo.undo();
                    if !problems.is_empty() {
                        return Err(e.context(format!("and cannot undo: {}", problems.join("; "))));
                    }
                    return Err(e);
                }
            };
            report.configs = written.to_vec();
            written.to_vec()
        }
        (None, Some(c)) => std::iter::once(c.to_path_buf())
            .chain(a.partner.clone())
            .collect(),
        (None, None) => bail!(
            "name the node's config (`twinctl --config node0.toml create`), or write a new \
             pair's configs with `twinctl create --pair DIR`"
        ),
    };
    let mut configs = Vec::new();
    for p in &paths {
        match Config::load(p) {
            Ok(c) => configs.push(c),
            Err(e) => {
                let _ = undo.undo();
                return Err(e.into());
            }
        }
    }
    // Both nodes of a pair: they must describe one pair before anything is made for it.
    if let [a, b] = configs.as_slice() {
        let problems = twinblock::config::check_partner(a, b);
        if !problems.is_empty() {
            let _ = undo.undo();
            bail!(
                "{} and {} are not the two nodes of one pair: {}; nothing was created",
                a.source.display(),
                b.source.display(),
                problems.join("; ")
            );
        }
    }
    create::create(&configs, undo, &mut report).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", create::describe(&report));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use twinblock::config::check_partner;

    #[test]
    fn generated_pair_configs_are_valid_and_form_one_pair() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let key = d.path().join("pair.key");
        std::fs::write(&key, "0123456789abcdef0123456789abcdef\n").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        for same_host in [true, false] {
            let plan = PairPlan {
                pair_id: "5e1f0a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b".into(),
                addresses: if same_host {
                    ["127.0.0.1".parse().unwrap(); 2]
                } else {
                    ["10.0.0.10".parse().unwrap(), "10.0.0.11".parse().unwrap()]
                },
                port: 20809,
                level: 5,
                members: 4,
                disk_size: 64 << 20,
                disk_dir: None,
                nvram_dir: "/dev/shm".into(),
            };
            let cfgs: Vec<Config> = [0u8, 1]
                .iter()
                .map(|&id| {
                    Config::parse(
                        &pair_config(&plan, id),
                        &d.path().join(format!("node{id}.toml")),
                    )
                    .unwrap()
                })
                .collect();
            assert_eq!(check_partner(&cfgs[0], &cfgs[1]), Vec::<String>::new());
            let ha: Vec<_> = cfgs.iter().map(|c| c.ha.clone().unwrap()).collect();
            assert_eq!(ha[0].partner_udp, ha[1].udp_listen);
            assert_eq!(ha[0].mailbox_disks, ha[1].mailbox_disks);
            assert_eq!(cfgs[0].arrays[0].new_members().len(), 4);
            let listen: Vec<_> = cfgs.iter().map(|c| c.nbd.listen[0].clone()).collect();
            assert_ne!(listen[0], listen[1]);
        }
    }
}
