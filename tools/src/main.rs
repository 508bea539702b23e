//! twinctl: the twinblock admin tool. Talks to a running `twinblockd` over its admin socket,
//! reads NVRAM files offline, and runs the quickstart demo.

mod create;
mod demo;
mod failover;
mod ha;
mod nbd_client;
mod pair_status;
mod render;
mod reservation;
mod sigpipe;
mod takeover_timing;
mod views;
mod write_ledger;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use twinblock::admin::{client, Request};

/// Where `twinctl` looks for the daemon when neither --socket nor --config is given: the
/// demo's node 0, so `twinctl status` works next to a running `twinctl demo`.
pub const DEFAULT_DEMO_DIR: &str = "/tmp/twinblock-demo";

#[derive(Parser, Debug)]
#[command(name = "twinctl", version, about = "twinblock admin tool")]
struct Cli {
    /// The daemon's admin socket.
    #[arg(long, global = true, env = "TWINBLOCK_ADMIN_SOCKET")]
    socket: Option<PathBuf>,
    /// Find the admin socket from this node config file.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Print JSON instead of tables (for scripts).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start a mirrored pair of nodes on local image files with no setup, print how to reach
    /// them, serve until Ctrl-C.
    Demo(demo::DemoArgs),
    /// Make what a node's config names before its first start, in one step: disk images, arrays
    /// (refused on disks holding any known signature), volume images. `--partner` adds the
    /// partner's config; `--pair DIR` first writes a new pair's two configs. A refusal changes
    /// nothing, a failure part way undoes what was made.
    Create(create::CreateArgs),
    /// Run a node in this process (what `twinblockd --config` does; the demo uses it when the
    /// twinblockd binary is not built).
    #[command(hide = true)]
    Node {
        #[arg(long)]
        config: PathBuf,
    },
    /// Node identity, uptime and what it serves; in an HA pair also both nodes' states, whether
    /// takeover is possible (and why not), heartbeat ages and who holds each disk.
    Status,
    /// HA: take the partner's disks over now (refused while the partner is heard).
    Takeover,
    /// HA: give the partner's disks back (checkpoint, stop serving them, release).
    Giveback,
    /// HA: refuse takeover in both directions until `takeover-enable`.
    TakeoverDisable,
    /// HA: allow takeover again.
    TakeoverEnable,
    /// Volumes: list, show.
    Volume {
        #[command(subcommand)]
        cmd: VolumeCmd,
    },
    /// Array members: fail, remove, add, replace.
    Disk {
        #[command(subcommand)]
        cmd: DiskCmd,
    },
    /// Rebuild progress.
    Rebuild {
        #[command(subcommand)]
        cmd: RebuildCmd,
    },
    /// Parity / mirror consistency checks.
    Scrub {
        #[command(subcommand)]
        cmd: ScrubCmd,
    },
    /// The NVRAM journal.
    Journal {
        #[command(subcommand)]
        cmd: JournalCmd,
    },
}

#[derive(Subcommand, Debug)]
enum JournalCmd {
    /// Print an NVRAM file's header, records, CPs and scan result (works offline; a file in use
    /// gives a best-effort snapshot).
    Dump {
        /// The NVRAM file (e.g. /dev/shm/twinblock-demo-node0.nvram).
        file: PathBuf,
    },
    /// Serve a volume held because its NVRAM log was lost after an unclean stop (a power cut
    /// with the NVRAM in RAM), accepting that the writes after its last consistency point are
    /// gone. `twinctl status` lists held volumes and what they lost.
    AcceptLoss {
        /// The held volume.
        volume: String,
    },
}

#[derive(Subcommand, Debug)]
enum VolumeCmd {
    /// All volumes with size, backing and traffic counters.
    List,
    /// One volume in detail.
    Show { name: String },
}

#[derive(Subcommand, Debug)]
enum DiskCmd {
    /// Mark a member faulty (the array continues degraded).
    Fail { array: String, disk: String },
    /// Remove a faulty or spare member.
    Remove { array: String, disk: String },
    /// Add an image as a spare or rebuild target.
    Add { array: String, path: String },
    /// Rebuild onto NEW, then retire OLD.
    Replace {
        array: String,
        old: String,
        new: String,
    },
    /// SCSI-3-style reservations, straight on the disk's lock file DISK.resv (no daemon needed).
    Reservation {
        #[command(subcommand)]
        cmd: reservation::ReservationCmd,
    },
}

#[derive(Subcommand, Debug)]
enum RebuildCmd {
    /// Rebuild progress of every array (a live bar on a terminal, plain lines otherwise).
    Status {
        /// Keep watching until no rebuild is running.
        #[arg(long, short)]
        watch: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ScrubCmd {
    /// Start a scrub: check counts mismatches, --repair rewrites parity.
    Start {
        array: String,
        #[arg(long)]
        repair: bool,
    },
    /// Scrub progress and mismatch counts (a live bar on a terminal with --watch).
    Status {
        /// Keep watching until no scrub is running.
        #[arg(long, short)]
        watch: bool,
    },
}

fn main() -> ExitCode {
    twinblock::logging::init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version: clap prints them and they succeed.
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        // `twinctl` or `twinctl volume` alone: the list of commands is the useful answer.
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            return ExitCode::from(USAGE_ERROR_EXIT_CODE);
        }
        Err(e) => {
            eprintln!("twinctl: {}", usage_error_line(&e.render().to_string()));
            return ExitCode::from(USAGE_ERROR_EXIT_CODE);
        }
    };
    if !matches!(cli.command, Command::Node { .. } | Command::Demo(_)) {
        sigpipe::restore_default_action();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("twinctl: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("twinctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Exit status for malformed arguments (as clap and the BSD `EX_USAGE` convention use: 2).
const USAGE_ERROR_EXIT_CODE: u8 = 2;

/// clap's multi-line argument error as one line: the error itself, a "similar name" tip if
/// there is one, and the usage of the command that was mistyped, so every refusal of twinctl is
/// one line on stderr (scripts and logs keep it whole).
fn usage_error_line(rendered: &str) -> String {
    let mut lines = rendered.lines();
    let message: Vec<&str> = lines
        .by_ref()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let mut out = message.join(" ");
    if let Some(rest) = out.strip_prefix("error: ") {
        out = rest.to_string();
    }
    for l in lines.map(str::trim) {
        if let Some(tip) = l.strip_prefix("tip: ").filter(|t| t.contains("similar")) {
            out.push_str("; ");
            out.push_str(tip);
        } else if let Some(usage) = l.strip_prefix("Usage: ") {
            out.push_str(&format!(" (usage: {usage})"));
        }
    }
    out
}

fn socket_path(cli: &Cli) -> Result<PathBuf> {
    if let Some(s) = &cli.socket {
        return Ok(s.clone());
    }
    if let Some(c) = &cli.config {
        let cfg = twinblock::config::Config::load(c)?;
        return Ok(cfg.admin_socket());
    }
    Ok(PathBuf::from(DEFAULT_DEMO_DIR).join("node0/admin.sock"))
}

async fn call(cli: &Cli, req: Request) -> Result<serde_json::Value> {
    let path = socket_path(cli)?;
    client::call(&path, &req)
        .await
        .with_context(|| command_name(&req).to_string())
}

/// The `twinctl` command that sends `req`, to prefix its errors with (`twinctl: disk fail: ...`):
/// people typed the command, not the protocol's op name.
fn command_name(req: &Request) -> &'static str {
    match req {
        Request::Status | Request::HaStatus => "status",
        Request::VolumeList => "volume list",
        Request::VolumeShow { .. } => "volume show",
        Request::DiskFail { .. } => "disk fail",
        Request::DiskRemove { .. } => "disk remove",
        Request::DiskAdd { .. } => "disk add",
        Request::DiskReplace { .. } => "disk replace",
        Request::RebuildStatus => "rebuild status",
        Request::ScrubStart { .. } => "scrub start",
        Request::ScrubStatus => "scrub status",
        Request::HaTakeover => "takeover",
        Request::HaGiveback => "giveback",
        Request::HaTakeoverDisable => "takeover-disable",
        Request::HaTakeoverEnable => "takeover-enable",
        Request::MirrorRecords => "mirror records",
        Request::JournalAcceptLoss { .. } => "journal accept-loss",
    }
}

async fn run(cli: Cli) -> Result<()> {
    let out = render::Output { json: cli.json };
    match &cli.command {
        Command::Demo(args) => demo::run(args).await,
        Command::Create(args) => create::run(args, cli.config.as_deref(), cli.json)
            .await
            .context("create"),
        Command::Node { config } => {
            let cfg = twinblock::config::Config::load(config)?;
            let node = twinblock::node::Node::open(cfg).await?;
            node.run(twinblock::signals::shutdown_signal(), |_| {})
                .await
        }
        Command::Status => {
            let mut status = call(&cli, Request::Status).await?;
            // A daemon without HA answers null; an older daemon does not know the request.
            let ha = call(&cli, Request::HaStatus)
                .await
                .unwrap_or(serde_json::Value::Null);
            if cli.json {
                if !ha.is_null() {
                    status["ha"] = ha;
                }
                out.status(&status)
            } else {
                out.status(&status)?;
                print!("{}", ha::render_status(&ha));
                Ok(())
            }
        }
        Command::Takeover => out.done(&call(&cli, Request::HaTakeover).await?),
        Command::Giveback => out.done(&call(&cli, Request::HaGiveback).await?),
        Command::TakeoverDisable => out.done(&call(&cli, Request::HaTakeoverDisable).await?),
        Command::TakeoverEnable => out.done(&call(&cli, Request::HaTakeoverEnable).await?),
        Command::Volume { cmd } => match cmd {
            VolumeCmd::List => out.volume_list(&call(&cli, Request::VolumeList).await?),
            VolumeCmd::Show { name } => {
                out.volume_show(&call(&cli, Request::VolumeShow { name: name.clone() }).await?)
            }
        },
        Command::Disk { cmd } => {
            let req = match cmd {
                DiskCmd::Fail { array, disk } => Request::DiskFail {
                    array: array.clone(),
                    disk: disk.clone(),
                },
                DiskCmd::Remove { array, disk } => Request::DiskRemove {
                    array: array.clone(),
                    disk: disk.clone(),
                },
                DiskCmd::Add { array, path } => Request::DiskAdd {
                    array: array.clone(),
                    path: path.clone(),
                },
                DiskCmd::Replace { array, old, new } => Request::DiskReplace {
                    array: array.clone(),
                    old: old.clone(),
                    new: new.clone(),
                },
                DiskCmd::Reservation { cmd } => return reservation::run(cmd, cli.json),
            };
            out.done(&call(&cli, req).await?)
        }
        Command::Rebuild {
            cmd: RebuildCmd::Status { watch },
        } => {
            if *watch {
                render::watch(&out, &render::REBUILD, || {
                    call(&cli, Request::RebuildStatus)
                })
                .await
            } else {
                out.rebuild(&call(&cli, Request::RebuildStatus).await?)
            }
        }
        Command::Journal {
            cmd: JournalCmd::AcceptLoss { volume },
        } => out.done(
            &call(
                &cli,
                Request::JournalAcceptLoss {
                    name: volume.clone(),
                },
            )
            .await?,
        ),
        Command::Journal {
            cmd: JournalCmd::Dump { file },
        } => {
            let dump = twinblock_journal::dump::dump_file(file)?;
            if cli.json {
                println!("{}", dump.to_json());
            } else {
                print!("{dump}");
            }
            Ok(())
        }
        Command::Scrub { cmd } => match cmd {
            ScrubCmd::Start { array, repair } => out.done(
                &call(
                    &cli,
                    Request::ScrubStart {
                        array: array.clone(),
                        repair: *repair,
                    },
                )
                .await?,
            ),
            ScrubCmd::Status { watch: true } => {
                render::watch(&out, &render::SCRUB, || call(&cli, Request::ScrubStatus)).await
            }
            ScrubCmd::Status { watch: false } => {
                out.scrub(&call(&cli, Request::ScrubStatus).await?)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_error_is_one_line_with_the_missing_argument_and_usage() {
        let rendered = "error: the following required arguments were not provided:\n  <DISK>\n\n\
                        Usage: twinctl disk fail <ARRAY> <DISK>\n\nFor more information, try '--help'.\n";
        assert_eq!(
            usage_error_line(rendered),
            "the following required arguments were not provided: <DISK> \
             (usage: twinctl disk fail <ARRAY> <DISK>)"
        );
    }

    #[test]
    fn usage_error_keeps_a_similar_name_tip() {
        let rendered = "error: unrecognized subcommand 'lst'\n\n  tip: a similar subcommand exists: \
                        'list'\n\nUsage: twinctl volume [OPTIONS] <COMMAND>\n\nFor more information, try '--help'.\n";
        assert_eq!(
            usage_error_line(rendered),
            "unrecognized subcommand 'lst'; a similar subcommand exists: 'list' \
             (usage: twinctl volume [OPTIONS] <COMMAND>)"
        );
    }

    #[test]
    fn every_command_parses_its_documented_form() {
        // The clap definition itself is consistent (no duplicate names, valid defaults).
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
