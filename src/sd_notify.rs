//! systemd readiness notification (`Type=notify` units): `READY=1` once the node serves,
//! `STOPPING=1` when it begins its shutdown. The protocol is one datagram of `KEY=VALUE` lines to
//! the Unix socket named by `$NOTIFY_SOCKET` (a path, or with a leading `@` a name in the abstract
//! namespace), so no library is needed. Without the variable (not started by systemd) nothing
//! is sent; a failure to send is logged and otherwise ignored, as the node works without it.

use std::io;
use std::os::unix::net::UnixDatagram;

/// Environment variable systemd sets for a `Type=notify` service.
const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";

/// Sends `state` (e.g. `READY=1`) when running under systemd; logs a failure.
pub fn notify(state: &str) {
    let Some(target) = std::env::var_os(NOTIFY_SOCKET_ENV) else {
        return;
    };
    if let Err(e) = send(&target.to_string_lossy(), state) {
        tracing::warn!("cannot tell systemd {state:?} through {target:?}: {e}");
    }
}

fn send(target: &str, state: &str) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    match target.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        }
        None => {
            sock.send_to(state.as_bytes(), target)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_reaches_the_notify_socket() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        send(&path.to_string_lossy(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }

    #[test]
    fn abstract_socket_names_are_supported() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("twinblock-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        send(&format!("@{name}"), "STOPPING=1").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }
}
