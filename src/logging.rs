//! Log setup shared by the daemon and the tools: `tracing` to stderr, filtered by `RUST_LOG`
//! (default `info`). Colours only when stderr is a terminal: a log written to a file or a
//! journal stays plain text.

use std::io::IsTerminal;

pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
