//! `.ci/run` on a Debian 12 machine whose `qemu-utils` came from backports: the release's
//! `qemu-system-x86` cannot be installed beside it, so the script must ask apt for a matching
//! pair. Its `qemu_pair_args` is run here against fake package databases (`dpkg-query` and
//! `apt-cache` stand-ins first on PATH), for the three cases it distinguishes.

use std::path::{Path, PathBuf};
use std::process::Command;

const RELEASE: &str = "1:7.2+dfsg-7+deb12u18+b3";
const BACKPORT: &str = "1:10.0.2+ds-1~bpo12+1";

fn ci_run() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../.ci/run")
}

/// `apt-cache policy qemu-system-x86` with the release's version, and the backport's when the
/// backports suite is configured.
fn policy(backports_configured: bool) -> String {
    let mut t = format!(
        "qemu-system-x86:\n  Installed: (none)\n  Candidate: {RELEASE}\n  Version table:\n"
    );
    if backports_configured {
        t.push_str(&format!(
            "     {BACKPORT} 100\n        100 http://deb.debian.org/debian \
             bookworm-backports/main amd64 Packages\n"
        ));
    }
    t.push_str(&format!(
        "     {RELEASE} 500\n        500 http://deb.debian.org/debian bookworm/main amd64 \
         Packages\n"
    ));
    t
}

/// The apt-get arguments `qemu_pair_args` prints with `qemu-utils` at `installed` (none: not
/// installed).
fn pair_args(installed: Option<&str>, backports_configured: bool) -> Vec<String> {
    let d = tempfile::tempdir().unwrap();
    let bin = d.path();
    let script = |name: &str, body: &str| {
        use std::os::unix::fs::PermissionsExt;
        let p = bin.join(name);
        std::fs::write(&p, format!("#!/bin/bash\n{body}")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    script(
        "dpkg-query",
        &match installed {
            Some(v) => format!("echo 'installed {v}'\n"),
            None => "exit 1\n".to_string(),
        },
    );
    std::fs::write(bin.join("policy.txt"), policy(backports_configured)).unwrap();
    script(
        "apt-cache",
        &format!("cat '{}'\n", bin.join("policy.txt").display()),
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "PATH='{}':$PATH; source '{}'; qemu_pair_args",
            bin.display(),
            ci_run().display()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn backported_qemu_utils_gets_qemu_system_from_backports_when_configured() {
    if Command::new("dpkg").arg("--version").output().is_err() {
        eprintln!("SKIPPED: no dpkg (not a Debian machine)");
        return;
    }
    assert_eq!(
        pair_args(Some(BACKPORT), true),
        ["-t", "bookworm-backports", "qemu-utils", "qemu-system-x86"]
    );
}

#[test]
fn backported_qemu_utils_is_downgraded_to_the_release_pair_without_backports() {
    if Command::new("dpkg").arg("--version").output().is_err() {
        eprintln!("SKIPPED: no dpkg (not a Debian machine)");
        return;
    }
    assert_eq!(
        pair_args(Some(BACKPORT), false),
        [
            "--allow-downgrades".to_string(),
            format!("qemu-utils={RELEASE}"),
            format!("qemu-system-x86={RELEASE}")
        ]
    );
}

#[test]
fn release_or_no_qemu_utils_installs_the_plain_pair() {
    if Command::new("dpkg").arg("--version").output().is_err() {
        eprintln!("SKIPPED: no dpkg (not a Debian machine)");
        return;
    }
    assert_eq!(
        pair_args(Some(RELEASE), true),
        ["qemu-utils", "qemu-system-x86"]
    );
    assert_eq!(pair_args(None, false), ["qemu-utils", "qemu-system-x86"]);
}
