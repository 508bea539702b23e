//! `twinctl status | head` stops writing when the reader goes away, as Unix tools do, instead of
//! panicking in `println!` with a backtrace. Rust starts every program with SIGPIPE ignored, so a
//! write to a closed pipe fails with EPIPE and `println!` panics on that error.
//!
//! Only the short admin commands restore the default action: `twinctl node` runs the daemon's
//! code in this process, whose client sockets must see EPIPE (a client that hangs up), not die
//! of SIGPIPE; `twinctl demo` supervises such nodes.

/// Restores the default action of SIGPIPE (end the process quietly).
pub fn restore_default_action() {
    // SAFETY: signal(2) with SIG_DFL installs no handler, so no code runs in signal context; it
    // is called from `main` before the async runtime (or any other thread) exists, so nothing
    // races on the disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
