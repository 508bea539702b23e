//! twinblockd: the twinblock node daemon.

use anyhow::Result;
use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;
use twinblock::config::Config;
use twinblock::node::Node;

/// The daemon allocates and frees many short-lived buffers on several threads (request payloads,
/// page-aligned member I/O buffers, stripe parity); glibc's allocator spent a fifth of the CPU
/// of a 4 KiB random-write run in malloc/free and page-aligned allocation. mimalloc's per-thread
/// free lists and size classes make those cheap.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc tuning for the daemon's allocation pattern.
///
/// By default mimalloc returns freed pages to the OS 10 ms after they empty (100 ms for whole
/// arena chunks). The daemon's buffers come and go in bursts (a consistency point allocates
/// every stripe's member reads and parity, then frees them all), so between bursts the pages
/// were given back and the next burst faulted them in again, each fault clearing a 2 MiB
/// transparent huge page: 8% of the samples of a 4 KiB random-write run (journaled RAID-5,
/// depth 32) were `clear_page_erms` under `mi_page_fresh_alloc`, and the daemon's CPU time per
/// write fell by about 15% with the pages kept (docs/BENCHMARKS.md). Never purging keeps them;
/// what the process holds is then its high-water mark, which the daemon's own bounds already
/// limit (the read cache size, each connection's in-flight bytes, the CP batch).
mod allocator_tuning {
    use std::os::raw::{c_int, c_long};

    /// `mi_option_purge_delay` in mimalloc 3's `mi_option_e` (the version `libmimalloc-sys`
    /// 0.1.49 builds; the `Cargo.lock` pins it).
    const MI_OPTION_PURGE_DELAY: c_int = 15;
    /// `-1`: never purge freed memory.
    const PURGE_DELAY_NEVER: c_long = -1;

    extern "C" {
        /// From the statically linked mimalloc (`mimalloc.h`): sets an option's value.
        fn mi_option_set(option: c_int, value: c_long);
    }

    /// Keeps freed pages mapped (see the module doc). Call before the runtime starts.
    pub fn keep_freed_pages() {
        // SAFETY: `mi_option_set` only stores the value in mimalloc's option table (an atomic
        // store); it takes no pointers, and `MI_OPTION_PURGE_DELAY` is a valid option index.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_NEVER) }
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "twinblockd",
    version,
    about = "twinblock node daemon: serves RAID/journaled volumes over NBD"
)]
struct Args {
    /// Configuration file (TOML; see docs/CONFIG.md).
    #[arg(short, long)]
    config: PathBuf,
    /// Check the configuration and every file it names (read-only), then exit.
    #[arg(long)]
    check: bool,
    /// Also check that this partner config and `--config` describe the two nodes of one pair
    /// (same pair id and key, each other's ids and addresses), then exit. Implies --check.
    #[arg(long, value_name = "PARTNER.toml")]
    check_partner: Option<PathBuf>,
}

fn main() -> ExitCode {
    allocator_tuning::keep_freed_pages();
    twinblock::logging::init();
    let args = Args::parse();
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("twinblockd: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(partner) = &args.check_partner {
        return check_partner(&config, partner);
    }
    if args.check {
        if let Some(p) = &config.pair {
            if let Err(e) = twinblock::config::load_key(&p.key_path(&config)) {
                eprintln!("twinblockd: {}: {e}", args.config.display());
                return ExitCode::from(2);
            }
        }
        return check(&args.config, &config);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("twinblockd")
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("twinblockd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("twinblockd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--check-partner`: both configs valid, and they describe one pair.
fn check_partner(config: &Config, partner: &std::path::Path) -> ExitCode {
    let other = match Config::load(partner) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("twinblockd: {e}");
            return ExitCode::from(2);
        }
    };
    let problems = twinblock::config::check_partner(config, &other);
    if problems.is_empty() {
        println!(
            "{} and {}: valid, and they describe the two nodes of one pair",
            config.source.display(),
            other.source.display()
        );
        return ExitCode::SUCCESS;
    }
    for p in &problems {
        eprintln!("twinblockd: {p}");
    }
    ExitCode::from(2)
}

async fn run(config: Config) -> Result<()> {
    let node = Node::open(config).await?;
    // Handlers installed now, before the node can say READY=1.
    let signal = twinblock::signals::shutdown_signal();
    let shutdown = async {
        signal.await;
        twinblock::sd_notify::notify("STOPPING=1");
    };
    node.run(shutdown, |_| twinblock::sd_notify::notify("READY=1"))
        .await
}

/// `--check`: report what inspecting the config's files found; exit 2 when the node would not
/// start with it.
fn check(path: &std::path::Path, config: &Config) -> ExitCode {
    let found = config.inspect();
    for n in &found.notes {
        println!("note: {n}");
    }
    for w in &found.warnings {
        println!("warning: {w}");
    }
    for e in &found.errors {
        eprintln!("twinblockd: {}: {e}", path.display());
    }
    if found.errors.is_empty() {
        println!("{}: configuration is valid", path.display());
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "twinblockd: {}: {} problem(s) found; the node would not start with this config",
            path.display(),
            found.errors.len()
        );
        ExitCode::from(2)
    }
}
