//! Interoperability: real NBD clients we did not write (libnbd's nbdinfo/nbdsh/nbdcopy, qemu-img,
//! qemu-io, fio's nbd engine) drive a `twinblockd` serving plain image exports. Each test starts its
//! own daemon on a free loopback port and is named for the behaviour it checks.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{
    nbdsh_command, require_nbdsh, require_tool, require_tools, run_fails, run_ok, sha256_file,
    tests_path, write_random_file, Daemon, DaemonSpec, ServerKind, VolumeSpec, CLIENT_TIMEOUT,
    DEFAULT_DESCRIPTION, DEFAULT_VOLUME_BYTES,
};
use serde_json::Value;

/// Timeout for the data-moving clients (qemu-img, nbdcopy, fio).
const COPY_TIMEOUT: Duration = Duration::from_secs(120);
/// Size of the image the copy tests move in and out.
const COPY_IMAGE_BYTES: u64 = 32 * 1024 * 1024;

/// Runs one of the nbdsh scripts in `tests/scripts/` against `uri`; panics with its output on failure.
fn run_nbdsh_script(daemon: &Daemon, script: &str) {
    let path = tests_path(&format!("scripts/{script}"));
    let out = run_ok(
        nbdsh_command()
            .env("TWB_URI", daemon.default_uri())
            .env("TWB_SCRIPT", &path)
            .args([
                "-n",
                "-c",
                "import os, runpy; runpy.run_path(os.environ['TWB_SCRIPT'], run_name='__main__')",
            ]),
        CLIENT_TIMEOUT,
    );
    let name = script.trim_end_matches(".py");
    assert!(
        out.stdout.contains(&format!("PASS {name}")),
        "nbdsh script {script} did not reach its PASS line\n{}",
        out.describe()
    );
}

fn nbdinfo_json(args: &[&str]) -> Value {
    let out = run_ok(
        Command::new("nbdinfo").arg("--json").args(args),
        CLIENT_TIMEOUT,
    );
    serde_json::from_str(&out.stdout).unwrap_or_else(|err| {
        panic!(
            "nbdinfo --json printed invalid JSON ({err})\n{}",
            out.describe()
        )
    })
}

fn exports(json: &Value) -> Vec<Value> {
    json["exports"].as_array().cloned().unwrap_or_default()
}

#[test]
fn nbdinfo_list_shows_every_export_with_its_description() {
    if !require_tool("nbdinfo") {
        return;
    }
    let spec = DaemonSpec {
        volumes: vec![
            VolumeSpec::default(),
            VolumeSpec {
                name: "vol1".into(),
                description: "second scratch volume".into(),
                size_bytes: 8 * 1024 * 1024,
                direct_io: false,
                read_only: false,
            },
        ],
        extra_toml: String::new(),
    };
    let daemon = Daemon::start(spec);
    let listing = nbdinfo_json(&["--list", &format!("nbd://{}", daemon.addr())]);
    let found = exports(&listing);
    let names: Vec<&str> = found
        .iter()
        .filter_map(|e| e["export-name"].as_str())
        .collect();
    assert!(
        names.contains(&"vol0") && names.contains(&"vol1"),
        "exports listed: {names:?}\n{listing:#}"
    );
    if daemon.kind() == ServerKind::Twinblockd {
        for (name, description) in [
            ("vol0", DEFAULT_DESCRIPTION),
            ("vol1", "second scratch volume"),
        ] {
            let export = found.iter().find(|e| e["export-name"] == name);
            let shown = export.and_then(|e| e["description"].as_str());
            assert_eq!(
                shown,
                Some(description),
                "description of {name} in\n{listing:#}"
            );
        }
        let vol1 = found.iter().find(|e| e["export-name"] == "vol1");
        let size = vol1.and_then(|e| e["export-size"].as_u64());
        assert_eq!(size, Some(8 * 1024 * 1024), "size of vol1 in\n{listing:#}");
    }
    // The human-readable listing works too.
    let text = run_ok(
        Command::new("nbdinfo").args(["--list", &format!("nbd://{}", daemon.addr())]),
        CLIENT_TIMEOUT,
    );
    assert!(
        text.stdout.contains("export=\"vol1\""),
        "{}",
        text.describe()
    );
}

#[test]
fn nbdinfo_reports_size_flags_and_block_sizes() {
    if !require_tool("nbdinfo") {
        return;
    }
    let daemon = Daemon::start_default();
    let info = nbdinfo_json(&[&daemon.default_uri()]);
    let found = exports(&info);
    assert_eq!(found.len(), 1, "one export described\n{info:#}");
    let export = &found[0];
    assert_eq!(
        export["export-size"].as_u64(),
        Some(DEFAULT_VOLUME_BYTES),
        "size in\n{info:#}"
    );
    assert_eq!(
        info["structured"],
        Value::Bool(true),
        "structured replies negotiated\n{info:#}"
    );
    for flag in ["can_flush", "can_fua", "can_trim", "can_zero", "can_cache"] {
        assert_eq!(export[flag], Value::Bool(true), "{flag} in\n{info:#}");
    }
    assert_eq!(
        export["is_read_only"],
        Value::Bool(false),
        "is_read_only in\n{info:#}"
    );
    for flag in ["can_multi_conn", "can_fast_zero", "can_df"] {
        assert!(
            export[flag].is_boolean(),
            "{flag} reported as a boolean in\n{info:#}"
        );
    }
    let contexts = export["contexts"].as_array().cloned().unwrap_or_default();
    assert!(
        contexts.contains(&Value::from("base:allocation")),
        "base:allocation in\n{info:#}"
    );
    if daemon.kind() == ServerKind::Twinblockd {
        let min = export["block_size_minimum"].as_u64();
        let preferred = export["block_size_preferred"].as_u64();
        let max = export["block_size_maximum"].as_u64();
        let (Some(min), Some(preferred), Some(max)) = (min, preferred, max) else {
            panic!("block sizes missing from NBD_INFO_BLOCK_SIZE in\n{info:#}");
        };
        assert!(
            min.is_power_of_two() && preferred.is_power_of_two(),
            "powers of two in\n{info:#}"
        );
        assert!(
            min <= preferred && preferred <= max,
            "min <= preferred <= max in\n{info:#}"
        );
        assert!(
            max >= 1024 * 1024,
            "maximum block size at least 1 MiB in\n{info:#}"
        );
    }
}

#[test]
fn read_only_volume_is_reported_and_refuses_writes() {
    if !require_tools(&["nbdinfo", "qemu-io"]) || ServerKind::from_env() != ServerKind::Twinblockd {
        return;
    }
    let read_only = VolumeSpec {
        name: "ro".into(),
        size_bytes: 4 * 1024 * 1024,
        read_only: true,
        ..VolumeSpec::default()
    };
    let mut daemon = Daemon::start(DaemonSpec {
        volumes: vec![VolumeSpec::default(), read_only],
        extra_toml: String::new(),
    });
    let info = nbdinfo_json(&[&daemon.uri("ro")]);
    assert_eq!(
        exports(&info)[0]["is_read_only"],
        Value::Bool(true),
        "is_read_only in\n{info:#}"
    );
    // qemu-io opens read-only exports read-only unless told otherwise; force a write attempt.
    let out = run_fails(
        Command::new("qemu-io").args(["-f", "raw", &daemon.uri("ro"), "-c", "write -P 0x11 0 4k"]),
        CLIENT_TIMEOUT,
    );
    assert!(
        !out.stdout.contains("wrote 4096/4096"),
        "write to a read-only export succeeded\n{}",
        out.describe()
    );
    daemon.assert_serving();
}

#[test]
fn nbdsh_read_write_fua_and_flush() {
    if !require_nbdsh() {
        return;
    }
    run_nbdsh_script(&Daemon::start_default(), "read_write.py");
}

#[test]
fn nbdsh_trim_and_write_zeroes_with_no_hole_and_fast_zero() {
    if !require_nbdsh() {
        return;
    }
    run_nbdsh_script(&Daemon::start_default(), "trim_zero.py");
}

#[test]
fn nbdsh_block_status_base_allocation_matches_data() {
    if !require_nbdsh() {
        return;
    }
    run_nbdsh_script(&Daemon::start_default(), "block_status.py");
}

#[test]
fn nbdsh_cache_leaves_data_intact() {
    if !require_nbdsh() {
        return;
    }
    run_nbdsh_script(&Daemon::start_default(), "cache.py");
}

#[test]
fn nbdsh_every_command_works_with_simple_replies() {
    if !require_nbdsh() {
        return;
    }
    run_nbdsh_script(&Daemon::start_default(), "simple_replies.py");
}

#[test]
fn nbdsh_many_requests_in_flight_get_their_own_replies() {
    if !require_nbdsh() {
        return;
    }
    run_nbdsh_script(&Daemon::start_default(), "inflight.py");
}

#[test]
fn nbdsh_out_of_range_requests_get_errors_and_connection_survives() {
    if !require_nbdsh() {
        return;
    }
    let mut daemon = Daemon::start_default();
    run_nbdsh_script(&daemon, "errors.py");
    daemon.assert_serving();
}

#[test]
fn nonexistent_export_is_refused_cleanly_and_server_keeps_serving() {
    if !(require_nbdsh() && require_tool("nbdinfo")) {
        return;
    }
    let mut daemon = Daemon::start_default();
    let out = run_fails(
        nbdsh_command().args([
            "-u",
            &daemon.uri("no-such-export"),
            "-c",
            "print(h.get_size())",
        ]),
        CLIENT_TIMEOUT,
    );
    assert!(
        out.stderr.contains("nbd_connect_uri")
            || out.stderr.contains("opt_go")
            || out.stderr.contains("server replied with error"),
        "the refusal is reported as a server error reply, not a crash or hang\n{}",
        out.describe()
    );
    let out = run_fails(
        Command::new("nbdinfo").arg(daemon.uri("no-such-export")),
        CLIENT_TIMEOUT,
    );
    assert!(
        out.stderr.contains("no-such-export"),
        "nbdinfo names the export\n{}",
        out.describe()
    );
    daemon.assert_serving();
    let info = nbdinfo_json(&[&daemon.default_uri()]);
    assert_eq!(
        exports(&info)[0]["export-size"].as_u64(),
        Some(DEFAULT_VOLUME_BYTES),
        "{info:#}"
    );
}

#[test]
fn qemu_img_convert_in_and_out_preserves_checksum() {
    if !require_tools(&["qemu-img", "sha256sum"]) {
        return;
    }
    let daemon = Daemon::start(DaemonSpec {
        volumes: vec![VolumeSpec {
            size_bytes: COPY_IMAGE_BYTES,
            ..VolumeSpec::default()
        }],
        extra_toml: String::new(),
    });
    let source = daemon.dir().join("source.raw");
    let back = daemon.dir().join("back.raw");
    write_random_file(&source, COPY_IMAGE_BYTES as usize, 0x7717);
    let uri = daemon.default_uri();
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&source)
            .arg(&uri),
        COPY_TIMEOUT,
    );
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &uri])
            .arg(&back),
        COPY_TIMEOUT,
    );
    assert_eq!(
        sha256_file(&source),
        sha256_file(&back),
        "image copied in and out with qemu-img differs"
    );
    let compare = run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&source)
            .arg(&uri),
        COPY_TIMEOUT,
    );
    assert!(
        compare.stdout.contains("Images are identical"),
        "{}",
        compare.describe()
    );
}

#[test]
fn nbdcopy_with_several_connections_round_trips() {
    if !require_tools(&["nbdcopy", "sha256sum"]) {
        return;
    }
    let daemon = Daemon::start(DaemonSpec {
        volumes: vec![VolumeSpec {
            size_bytes: COPY_IMAGE_BYTES,
            ..VolumeSpec::default()
        }],
        extra_toml: String::new(),
    });
    let source = daemon.dir().join("source.raw");
    let back = daemon.dir().join("back.raw");
    write_random_file(&source, COPY_IMAGE_BYTES as usize, 0xc0b1);
    let uri = daemon.default_uri();
    run_ok(
        Command::new("nbdcopy")
            .args(["--connections=4", "--requests=16"])
            .arg(&source)
            .arg(&uri),
        COPY_TIMEOUT,
    );
    run_ok(
        Command::new("nbdcopy")
            .args(["--connections=4", "--requests=16", &uri])
            .arg(&back),
        COPY_TIMEOUT,
    );
    assert_eq!(
        sha256_file(&source),
        sha256_file(&back),
        "image copied in and out with nbdcopy differs"
    );
}

#[test]
fn qemu_io_patterns_read_back_at_unaligned_offsets() {
    if !require_tool("qemu-io") {
        return;
    }
    let daemon = Daemon::start_default();
    // (offset, length, pattern byte): aligned, sub-sector, crossing sector and 4 KiB boundaries, large.
    let cases: [(u64, u64, u8); 8] = [
        (0, 4096, 0x11),
        (4096 + 1, 1, 0x22),
        (8192 + 511, 2, 0x33),
        (12288 + 100, 5000, 0x44),
        (65536 - 300, 600, 0x55),
        (1 << 20, 1 << 20, 0x66),
        ((3 << 20) + 4095, (2 << 20) + 3, 0x77),
        (DEFAULT_VOLUME_BYTES - 513, 513, 0x88),
    ];
    let mut args: Vec<String> = vec!["-f".into(), "raw".into(), daemon.default_uri()];
    for (offset, length, byte) in cases {
        args.push("-c".into());
        args.push(format!("write -P {byte:#x} {offset} {length}"));
    }
    // A second pass overwrites the middle of one range: the rest must keep the first pattern.
    args.push("-c".into());
    args.push(format!("write -P 0x99 {} 100", (1 << 20) + 1000));
    let written = run_ok(Command::new("qemu-io").args(&args), COPY_TIMEOUT);
    assert!(!written.stdout.contains("failed"), "{}", written.describe());

    // Read back in a separate process (a fresh connection).
    let mut args: Vec<String> = vec!["-f".into(), "raw".into(), daemon.default_uri()];
    for (offset, length, byte) in cases {
        if offset == 1 << 20 {
            args.push("-c".into());
            args.push(format!("read -P {byte:#x} {offset} 1000"));
            args.push("-c".into());
            args.push(format!("read -P 0x99 {} 100", offset + 1000));
            args.push("-c".into());
            args.push(format!(
                "read -P {byte:#x} {} {}",
                offset + 1100,
                length - 1100
            ));
        } else {
            args.push("-c".into());
            args.push(format!("read -P {byte:#x} {offset} {length}"));
        }
    }
    // Never-written space reads as zeroes.
    args.push("-c".into());
    args.push(format!("read -P 0 {} 65536", 10 << 20));
    let read = run_ok(Command::new("qemu-io").args(&args), COPY_TIMEOUT);
    assert!(
        !read.stdout.contains("Pattern verification failed"),
        "{}",
        read.describe()
    );
    assert_eq!(
        read.stdout.matches("read ").count(),
        cases.len() + 3,
        "every read ran\n{}",
        read.describe()
    );
}

#[test]
fn fio_nbd_engine_random_writes_verify_crc32c() {
    if !require_tool("fio") {
        return;
    }
    let mut daemon = Daemon::start_default();
    let json_path = daemon.dir().join("fio.json");
    let uri = daemon.default_uri();
    let out = run_ok(
        Command::new("fio")
            .current_dir(daemon.dir())
            .args([
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--output-format=json",
            ])
            .arg(format!("--output={}", json_path.display()))
            .args([
                "--verify=crc32c",
                "--verify_fatal=1",
                "--verify_state_save=0",
                "--do_verify=1",
                "--size=16M",
            ])
            .args(["--name=rand4k", "--rw=randwrite", "--bs=4k", "--iodepth=16"])
            .args([
                "--name=mixed",
                "--rw=randwrite",
                "--bsrange=512-128k",
                "--iodepth=8",
                "--offset=32M",
            ])
            .args([
                "--name=seq1m",
                "--rw=write",
                "--bs=1m",
                "--iodepth=4",
                "--offset=48M",
            ]),
        COPY_TIMEOUT,
    );
    let text = std::fs::read_to_string(&json_path)
        .unwrap_or_else(|err| panic!("fio wrote no JSON ({err})\n{}", out.describe()));
    let json: Value = serde_json::from_str(&text)
        .unwrap_or_else(|err| panic!("fio JSON invalid ({err}): {text}\n{}", out.describe()));
    let jobs = json["jobs"].as_array().cloned().unwrap_or_default();
    assert_eq!(jobs.len(), 3, "three fio jobs ran\n{text}");
    for job in &jobs {
        let name = job["jobname"].as_str().unwrap_or("?");
        assert_eq!(
            job["error"].as_u64(),
            Some(0),
            "fio job {name} reported an error\n{text}"
        );
        let written = job["write"]["io_bytes"].as_u64().unwrap_or(0);
        let verified = job["read"]["io_bytes"].as_u64().unwrap_or(0);
        assert_eq!(
            written,
            16 * 1024 * 1024,
            "fio job {name} wrote its whole size\n{text}"
        );
        assert!(verified > 0, "fio job {name} read back to verify\n{text}");
    }
    daemon.assert_serving();
}

/// Reads the fixed-newstyle greeting: "NBDMAGIC", "IHAVEOPT", 16-bit handshake flags.
fn read_greeting(stream: &mut std::net::TcpStream) -> [u8; 18] {
    use std::io::Read;
    let mut greeting = [0u8; 18];
    if let Err(err) = stream.read_exact(&mut greeting) {
        panic!("server greeting not received: {err}");
    }
    assert_eq!(
        &greeting[..8],
        b"NBDMAGIC",
        "greeting magic {greeting:02x?}"
    );
    assert_eq!(
        &greeting[8..16],
        b"IHAVEOPT",
        "fixed-newstyle option magic {greeting:02x?}"
    );
    greeting
}

#[test]
fn garbage_and_abrupt_disconnects_leave_the_server_serving() {
    use std::io::Write;
    use std::net::TcpStream;
    if !require_tool("nbdinfo") {
        return;
    }
    let mut daemon = Daemon::start_default();
    let connect = || match TcpStream::connect(daemon.addr()) {
        Ok(stream) => {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            stream
        }
        Err(err) => panic!("connect to {}: {err}", daemon.addr()),
    };
    // 1. Connect and leave without a word.
    drop(connect());
    // 2. Greeting read, then garbage instead of the client flags and options.
    let mut stream = connect();
    read_greeting(&mut stream);
    let _ = stream.write_all(&[0xff; 64]);
    drop(stream);
    // 3. Valid client flags, then an option header whose length lies (claims 1 GiB), then gone.
    let mut stream = connect();
    read_greeting(&mut stream);
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&3u32.to_be_bytes()); // NBD_FLAG_C_FIXED_NEWSTYLE | NO_ZEROES
    bytes.extend_from_slice(b"IHAVEOPT");
    bytes.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
    bytes.extend_from_slice(&(1u32 << 30).to_be_bytes());
    bytes.extend_from_slice(&[0u8; 10]);
    let _ = stream.write_all(&bytes);
    drop(stream);
    // 4. Half a greeting reply (two of the four client-flag bytes), then gone.
    let mut stream = connect();
    read_greeting(&mut stream);
    let _ = stream.write_all(&[0, 0]);
    drop(stream);

    daemon.assert_serving();
    let info = nbdinfo_json(&[&daemon.default_uri()]);
    assert_eq!(
        exports(&info)[0]["export-size"].as_u64(),
        Some(DEFAULT_VOLUME_BYTES),
        "server still answers a real client after the bad ones\n{info:#}"
    );
}
