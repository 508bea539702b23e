//! The real Linux kernel NBD driver against `twinblockd`: a kernel booted under qemu (software
//! emulation, user networking reaching the host loopback at 10.0.2.2) attaches the export as
//! `/dev/nbd0` with `nbd-client`, writes and reads back with O_DIRECT, runs `mkfs.ext4`, mounts,
//! writes a file, and runs `e2fsck -fn`. The guest side is `tests/kernel/build-initramfs.sh`;
//! it prints `TWB-PASS:` per step and `TWB-RESULT: PASS|FAIL` at the end.
//!
//! Afterwards the host copies the export out with `nbdcopy` and checks the file system again,
//! so the test also proves the data reached the server, not only the guest's page cache.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{
    find_kernel, initramfs_for, require_tools, run_ok, run_with_timeout, Daemon, DaemonSpec,
    VolumeSpec,
};

/// Whole guest run: boot, attach, I/O, mkfs, fsck, power off. Measured ~10 s; TCG is slow on
/// a busy 2-core machine, so allow generously but stay under the 3-minute budget.
const GUEST_TIMEOUT: Duration = Duration::from_secs(170);
/// Size of the export the guest formats.
const KERNEL_VOLUME_BYTES: u64 = 256 * 1024 * 1024;
/// Guest memory for qemu.
const GUEST_MEMORY_MIB: u32 = 768;
/// Steps the guest must report as passed, in order.
const GUEST_STEPS: [&str; 8] = [
    "modules loaded",
    "network up",
    "attached /dev/nbd0",
    "direct write and read-back",
    "mkfs.ext4",
    "mount, write file, umount",
    "e2fsck clean",
    "file intact after remount",
];

#[test]
fn kernel_nbd_attaches_and_runs_mkfs_ext4() {
    let tools = [
        "qemu-system-x86_64",
        "nbd-client",
        "mkfs.ext4",
        "e2fsck",
        "busybox",
        "cpio",
        "modinfo",
        "nbdcopy",
        // The initramfs build compiles the failover test's client too.
        "gcc",
    ];
    if !require_tools(&tools) {
        return;
    }
    let Some((version, kernel)) = find_kernel() else {
        if common::in_ci() {
            panic!("no kernel image with modules in /boot (install linux-image-cloud-amd64)");
        }
        eprintln!("SKIP: no kernel image with modules in /boot (install linux-image-cloud-amd64)");
        return;
    };
    let initrd = initramfs_for(&version);
    let mut daemon = Daemon::start(DaemonSpec {
        volumes: vec![VolumeSpec {
            size_bytes: KERNEL_VOLUME_BYTES,
            ..VolumeSpec::default()
        }],
        extra_toml: String::new(),
    });
    let append = format!(
        "console=ttyS0 quiet panic=-1 twb.host=10.0.2.2 twb.port={} twb.export=vol0",
        daemon.port()
    );
    let result = run_with_timeout(
        Command::new("qemu-system-x86_64")
            .args([
                "-accel",
                "tcg",
                "-cpu",
                "max",
                "-m",
                &GUEST_MEMORY_MIB.to_string(),
            ])
            .args(["-nographic", "-no-reboot"])
            .arg("-kernel")
            .arg(&kernel)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", &append])
            .args([
                "-netdev",
                "user,id=n0",
                "-device",
                "virtio-net-pci,netdev=n0",
            ]),
        GUEST_TIMEOUT,
    );
    let out = match result {
        Ok(out) => out,
        Err(msg) => panic!("guest did not finish: {msg}\nserver log:\n{}", daemon.log()),
    };
    let console = out.stdout.replace('\r', "");
    let mut next_from = 0;
    for step in GUEST_STEPS {
        let marker = format!("TWB-PASS: {step}");
        match console[next_from..].find(&marker) {
            Some(at) => next_from += at + marker.len(),
            None => panic!(
                "guest step `{step}` did not pass (in order)\n--- guest console ---\n{console}\n--- qemu stderr ---\n{}",
                out.stderr
            ),
        }
    }
    assert!(
        console.contains("TWB-RESULT: PASS") && !console.contains("TWB-FAIL"),
        "guest did not report PASS\n--- guest console ---\n{console}"
    );
    daemon.assert_serving();

    // The server holds a clean file system: copy it out over NBD and check it on the host.
    let copy = daemon.dir().join("from-server.img");
    run_ok(
        Command::new("nbdcopy").arg(daemon.default_uri()).arg(&copy),
        Duration::from_secs(60),
    );
    run_ok(
        Command::new("e2fsck").args(["-fn"]).arg(&copy),
        Duration::from_secs(60),
    );
}
