//! The LAN address-takeover hook: a script the node runs to add or remove a service IP address
//! on a network interface when it starts or stops serving a disk set.
//!
//! On one host the survivor simply binds the partner's port once it is free. On a LAN the
//! partner's service address is an IP that must move to the survivor's interface (and the
//! switches and clients must learn its new MAC address), which is site policy: `ip addr`,
//! a gratuitous ARP, a cloud provider's API. So the daemon runs an operator-supplied program
//! (`ha.address_hook`) as `PROGRAM add|del IP/PREFIX DEVICE`:
//!
//! * `add` before the set's volumes are bound (the bind needs the address), failing the
//!   bring-up if the program fails;
//! * `del` after the set stopped serving (giveback, clean stop) or was fenced (a node that
//!   lost its disks must drop their address too), a failure only logged.
//!
//! The own set uses this node's `ha.service_address`, the partner's set the partner config's
//! `ha.service_address`, both on this node's `ha.service_device`. The program must be
//! idempotent (an `add` of an address present, a `del` of one absent, succeed): a node that
//! crashed may repeat either. The example is `deploy/twinblock-address-hook`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use thiserror::Error;

/// How long the program may run before it is killed and counted as failed.
pub const ADDRESS_HOOK_TIMEOUT_MS: u64 = 10_000;

/// What to do with the address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    Add,
    Del,
}

impl Verb {
    pub fn name(self) -> &'static str {
        match self {
            Verb::Add => "add",
            Verb::Del => "del",
        }
    }
}

/// One address the hook moves: the program, the `IP/PREFIX` and the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressHook {
    pub program: PathBuf,
    pub address: String,
    pub device: String,
}

#[derive(Debug, Error)]
pub enum AddressHookError {
    #[error(
        "address hook `{program} {verb} {address} {device}` could not start: {source}; check \
         ha.address_hook (an executable path)"
    )]
    Spawn {
        program: String,
        verb: &'static str,
        address: String,
        device: String,
        source: std::io::Error,
    },
    #[error(
        "address hook `{program} {verb} {address} {device}` failed ({status}): {stderr}; run it \
         by hand to see why"
    )]
    Failed {
        program: String,
        verb: &'static str,
        address: String,
        device: String,
        status: String,
        stderr: String,
    },
    #[error(
        "address hook `{program} {verb} {address} {device}` did not finish within \
         {ADDRESS_HOOK_TIMEOUT_MS} ms and was killed"
    )]
    TimedOut {
        program: String,
        verb: &'static str,
        address: String,
        device: String,
    },
}

/// At most this much of the program's stderr goes into an error.
const STDERR_SHOWN_BYTES: usize = 500;

impl AddressHook {
    /// Runs the program with `verb` and waits for it (at most [`ADDRESS_HOOK_TIMEOUT_MS`]).
    pub async fn run(&self, verb: Verb) -> Result<(), AddressHookError> {
        let program = self.program.display().to_string();
        let (address, device) = (self.address.clone(), self.device.clone());
        let child = tokio::process::Command::new(&self.program)
            .args([verb.name(), &self.address, &self.device])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(source) => {
                return Err(AddressHookError::Spawn {
                    program,
                    verb: verb.name(),
                    address,
                    device,
                    source,
                })
            }
        };
        let waited = tokio::time::timeout(
            Duration::from_millis(ADDRESS_HOOK_TIMEOUT_MS),
            child.wait_with_output(),
        )
        .await;
        let output = match waited {
            Err(_) => {
                return Err(AddressHookError::TimedOut {
                    program,
                    verb: verb.name(),
                    address,
                    device,
                })
            }
            Ok(Err(source)) => {
                return Err(AddressHookError::Spawn {
                    program,
                    verb: verb.name(),
                    address,
                    device,
                    source,
                })
            }
            Ok(Ok(o)) => o,
        };
        if output.status.success() {
            tracing::info!(
                verb = verb.name(),
                address = %self.address,
                device = %self.device,
                "address hook done"
            );
            return Ok(());
        }
        let mut stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        if stderr.len() > STDERR_SHOWN_BYTES {
            let mut cut = STDERR_SHOWN_BYTES;
            while !stderr.is_char_boundary(cut) {
                cut -= 1;
            }
            stderr.truncate(cut);
            stderr.push_str(" ...");
        }
        Err(AddressHookError::Failed {
            program,
            verb: verb.name(),
            address,
            device,
            status: output.status.to_string(),
            stderr,
        })
    }
}

/// Checks an `IP/PREFIX` value (`ha.service_address`); `Err` says what is wrong.
pub fn check_address(value: &str) -> Result<(), String> {
    let Some((ip, prefix)) = value.split_once('/') else {
        return Err(format!(
            "`{value}` has no /PREFIX (e.g. 192.168.10.11/24 or fd00::11/64)"
        ));
    };
    let ip: std::net::IpAddr = ip
        .parse()
        .map_err(|_| format!("`{ip}` in `{value}` is not an IP address"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    match prefix.parse::<u8>() {
        Ok(p) if p <= max => Ok(()),
        _ => Err(format!(
            "prefix `{prefix}` in `{value}` is not a number from 0 to {max}"
        )),
    }
}

/// Checks a network device name (`ha.service_device`) the way the kernel limits them.
pub fn check_device(value: &str) -> Result<(), String> {
    /// Linux interface names are at most 15 bytes (IFNAMSIZ - 1).
    const IFNAME_MAX_BYTES: usize = 15;
    if value.is_empty()
        || value.len() > IFNAME_MAX_BYTES
        || value
            .chars()
            .any(|c| c.is_whitespace() || c == '/' || c.is_control())
    {
        return Err(format!(
            "`{value}` is not a network interface name (1 to {IFNAME_MAX_BYTES} bytes, no \
             spaces or slashes)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &std::path::Path, body: &str) -> PathBuf {
        let p = dir.join("hook.sh");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    fn hook(program: PathBuf) -> AddressHook {
        AddressHook {
            program,
            address: "192.0.2.10/24".into(),
            device: "eth9".into(),
        }
    }

    #[tokio::test]
    async fn the_program_gets_the_verb_the_address_and_the_device() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("calls");
        let p = script(dir.path(), &format!("echo \"$@\" >> {}", log.display()));
        hook(p.clone()).run(Verb::Add).await.unwrap();
        hook(p).run(Verb::Del).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "add 192.0.2.10/24 eth9\ndel 192.0.2.10/24 eth9\n"
        );
    }

    #[tokio::test]
    async fn a_failing_program_is_an_error_with_its_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let p = script(
            dir.path(),
            "echo 'RTNETLINK answers: no such device' >&2; exit 2",
        );
        let e = hook(p).run(Verb::Add).await.unwrap_err().to_string();
        assert!(
            e.contains("no such device") && e.contains("add 192.0.2.10/24 eth9"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_missing_program_is_an_error_naming_it() {
        let e = hook(PathBuf::from("/nonexistent/hook"))
            .run(Verb::Del)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/nonexistent/hook") && e.contains("ha.address_hook"),
            "{e}"
        );
    }

    #[test]
    fn addresses_and_devices_are_checked() {
        assert!(check_address("192.168.10.11/24").is_ok());
        assert!(check_address("fd00::11/64").is_ok());
        assert!(check_address("192.168.10.11").is_err());
        assert!(check_address("192.168.10.11/33").is_err());
        assert!(check_address("host/24").is_err());
        assert!(check_device("eth0").is_ok());
        assert!(check_device("").is_err());
        assert!(check_device("eth0 up").is_err());
        assert!(check_device("averyveryverylongname").is_err());
    }
}
