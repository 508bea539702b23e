//! Fault injection for the HA paths, for end-to-end tests only.
//!
//! Some failures the pair must survive cannot be produced from outside a running daemon on one
//! host: a mailbox area that returns read errors while the same disks keep working for RAID
//! (the daemon keeps its files open, and the tests run as root, so `chmod` changes nothing).
//! Rather than a test-only build, the daemon looks for switch files in a directory named by
//! the environment variable [`FAULT_DIR_ENV`]; unset (always, in production) there is nothing to
//! look at and every check is a no-op. A switch is on while its file exists, so a test turns a
//! fault on and off while the daemon runs. The daemon logs a warning at start when the variable
//! is set, so a stray setting in production is visible.
//!
//! | file | effect |
//! | --- | --- |
//! | `mailbox-read` | every read of the partner's mailbox slot fails (on every mailbox disk) |
//! | `mailbox-write` | every write of this node's mailbox slot fails |
//! | `final-checkpoint` | the final consistency point of a clean stop reports failure (giveback) |

use std::path::PathBuf;
use std::sync::OnceLock;

/// The environment variable naming the switch directory.
pub const FAULT_DIR_ENV: &str = "TWINBLOCK_FAULT_DIR";

/// One injectable fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Reads of the mailbox area fail.
    MailboxRead,
    /// Writes of the mailbox area fail.
    MailboxWrite,
    /// The final consistency point of a clean site stop (giveback) fails.
    FinalCheckpoint,
}

impl Fault {
    /// The switch file's name.
    pub fn file_name(self) -> &'static str {
        match self {
            Fault::MailboxRead => "mailbox-read",
            Fault::MailboxWrite => "mailbox-write",
            Fault::FinalCheckpoint => "final-checkpoint",
        }
    }
}

fn dir() -> Option<&'static PathBuf> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::var_os(FAULT_DIR_ENV).map(PathBuf::from)?;
        tracing::warn!(
            dir = %dir.display(),
            "{FAULT_DIR_ENV} is set: HA fault injection is enabled (tests only; unset it in production)"
        );
        Some(dir)
    })
    .as_ref()
}

/// Whether `fault` is switched on now (one `stat` when fault injection is enabled, else none).
pub fn active(fault: Fault) -> bool {
    dir().is_some_and(|d| d.join(fault.file_name()).exists())
}

/// Logs at start whether fault injection is enabled (so the warning appears once, early).
pub fn announce() {
    let _ = dir();
}

/// The error an injected fault produces.
pub fn injected_error(fault: Fault) -> std::io::Error {
    std::io::Error::other(format!(
        "injected fault `{}` (switch file in ${FAULT_DIR_ENV})",
        fault.file_name()
    ))
}
