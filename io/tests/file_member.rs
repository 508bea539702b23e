//! `FileMember` on real files: both engines, buffered and `O_DIRECT`, aligned and unaligned
//! requests, against an in-memory model.
//!
//! Images live under cargo's target tmp dir (a disk filesystem, so `O_DIRECT` is accepted there).
//! io_uring cases are skipped with a note when the kernel or sandbox refuses io_uring, unless
//! `TWINBLOCK_IO=uring` is set, which makes that a failure.

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use twinblock_io::buf::AlignedBuf;
use twinblock_io::file::{EngineChoice, FileError, FileMember, FileOptions};
use twinblock_io::uring;
use twinblock_io::Member;

const IMAGE_BYTES: u64 = 4 << 20;

fn scratch() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("scratch dir under the target dir")
}

/// The engines available here.
fn engines() -> Vec<EngineChoice> {
    let mut engines = vec![EngineChoice::Pool];
    match uring::probe() {
        Ok(()) => engines.push(EngineChoice::Uring),
        Err(reason) if std::env::var("TWINBLOCK_IO").as_deref() == Ok("uring") => {
            panic!("TWINBLOCK_IO=uring but io_uring is unavailable: {reason}")
        }
        Err(reason) => eprintln!("io_uring cases skipped: {reason}"),
    }
    engines
}

fn open(path: &Path, engine: EngineChoice, direct: bool) -> Arc<FileMember> {
    let opts = FileOptions {
        direct,
        engine,
        create_size: Some(IMAGE_BYTES),
        ..FileOptions::default()
    };
    let member = FileMember::open(path, &opts).expect("open image");
    let want = if engine == EngineChoice::Uring {
        "uring"
    } else {
        "pool"
    };
    assert_eq!(member.engine(), want);
    assert_eq!(
        member.direct(),
        direct,
        "O_DIRECT state on {}",
        path.display()
    );
    member
}

/// `data` copied so that it starts `misalign` bytes past a page boundary.
fn bytes_at_misalignment(data: &[u8], misalign: usize) -> Bytes {
    let mut buf = AlignedBuf::zeroed(data.len() + misalign);
    buf[misalign..].copy_from_slice(data);
    buf.into_bytes().slice(misalign..)
}

/// Workers write random ranges in their own stripe of the image concurrently (so the final
/// contents are well defined), mixing page-aligned requests (from aligned and unaligned buffers)
/// with unaligned ones; then the whole image is read back in aligned and unaligned pieces.
async fn random_writes_match_model(engine: EngineChoice, direct: bool) {
    const WORKERS: usize = 8;
    const WRITES_PER_WORKER: usize = 40;
    let dir = scratch();
    let member = open(&dir.path().join("img"), engine, direct);
    let model = Arc::new(Mutex::new(vec![0u8; IMAGE_BYTES as usize]));
    let stripe = IMAGE_BYTES as usize / WORKERS;

    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let member = Arc::clone(&member);
        let model = Arc::clone(&model);
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(w as u64 * 7919);
            let base = w * stripe;
            for i in 0..WRITES_PER_WORKER {
                let (offset, len) = if i % 2 == 0 {
                    let blocks = rng.gen_range(1..=8);
                    let len = blocks * 4096;
                    (base + rng.gen_range(0..(stripe - len) / 4096) * 4096, len)
                } else {
                    let len = rng.gen_range(1..20_000);
                    (base + rng.gen_range(0..stripe - len), len)
                };
                let mut data = vec![0u8; len];
                rng.fill(&mut data[..]);
                let bytes = if i % 4 == 0 {
                    AlignedBuf::copy_from(&data).into_bytes()
                } else {
                    bytes_at_misalignment(&data, 1 + i % 511)
                };
                member.write_at(offset as u64, bytes).await.expect("write");
                model.lock().expect("model")[offset..offset + len].copy_from_slice(&data);
            }
        }));
    }
    for t in tasks {
        t.await.expect("worker");
    }

    let model = model.lock().expect("model").clone();
    // Aligned pieces of varying size, then unaligned ones.
    let mut offset = 0usize;
    let mut step = 4096;
    while offset < model.len() {
        let len = step.min(model.len() - offset);
        let got = member
            .read_at(offset as u64, len)
            .await
            .expect("aligned read");
        assert_eq!(
            &got[..],
            &model[offset..offset + len],
            "aligned read at {offset}"
        );
        offset += len;
        step = if step >= 256 << 10 { 4096 } else { step * 2 };
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    for _ in 0..64 {
        let len = rng.gen_range(1..50_000);
        let offset = rng.gen_range(0..model.len() - len);
        let got = member
            .read_at(offset as u64, len)
            .await
            .expect("unaligned read");
        assert_eq!(
            &got[..],
            &model[offset..offset + len],
            "read at {offset}+{len}"
        );
    }
    member.sync().await.expect("sync");

    // The data must also be on the file itself, not only visible through the member.
    let on_disk = std::fs::read(dir.path().join("img")).expect("read image back");
    assert!(on_disk == model, "image file differs from model");

    let stats = member.stats();
    assert!(stats.buffered_ops > 0, "{stats:?}");
    if direct {
        assert!(stats.direct_ops > 0, "{stats:?}");
        assert!(stats.bounce_copies > 0, "{stats:?}");
    } else {
        assert_eq!(stats.direct_ops, 0, "{stats:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_random_writes_read_back_as_model_buffered() {
    for engine in engines() {
        random_writes_match_model(engine, false).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_random_writes_read_back_as_model_direct() {
    for engine in engines() {
        random_writes_match_model(engine, true).await;
    }
}

#[tokio::test]
async fn discard_reads_back_zeroes_and_keeps_neighbours() {
    for engine in engines() {
        for direct in [false, true] {
            let dir = scratch();
            let member = open(&dir.path().join("img"), engine, direct);
            let fill = Bytes::from(vec![0x5au8; 256 << 10]);
            member.write_at(0, fill.clone()).await.expect("fill");
            // One block-aligned range and one that starts and ends mid-block.
            member.discard(16384, 65536).await.expect("aligned discard");
            member
                .discard(100_001, 9_999)
                .await
                .expect("unaligned discard");
            let got = member.read_at(0, 256 << 10).await.expect("read");
            for (i, &b) in got.iter().enumerate() {
                let zero = (16384..16384 + 65536).contains(&i) || (100_001..110_000).contains(&i);
                assert_eq!(
                    b,
                    if zero { 0 } else { 0x5a },
                    "byte {i}, {engine:?} direct={direct}"
                );
            }
            assert_eq!(member.size(), IMAGE_BYTES, "discard must keep the size");
        }
    }
}

#[tokio::test]
async fn read_past_the_end_is_an_error_naming_path_and_offset() {
    for engine in engines() {
        let dir = scratch();
        let path = dir.path().join("img");
        let member = open(&path, engine, false);
        let err = member
            .read_at(IMAGE_BYTES - 4096, 8192)
            .await
            .expect_err("read past the end");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains(&(IMAGE_BYTES - 4096).to_string()), "{msg}");
        let err = member
            .write_at(IMAGE_BYTES, Bytes::from_static(b"x"))
            .await
            .expect_err("write past the end");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}

#[tokio::test]
async fn file_shrunk_under_the_member_reports_eof_with_path_and_offset() {
    for engine in engines() {
        for direct in [false, true] {
            let dir = scratch();
            let path = dir.path().join("img");
            let member = open(&path, engine, direct);
            // Someone truncates the image behind our back: the engine meets EOF mid-request.
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_len(10_000))
                .expect("truncate");
            let err = member
                .read_at(8192, 8192)
                .await
                .expect_err("read beyond EOF");
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
            let msg = err.to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(msg.contains("offset 8192"), "{msg}");
        }
    }
}

#[tokio::test]
async fn read_only_member_refuses_writes_and_discards() {
    let dir = scratch();
    let path = dir.path().join("img");
    drop(open(&path, EngineChoice::Pool, false));
    for engine in engines() {
        let opts = FileOptions {
            read_only: true,
            engine,
            ..FileOptions::default()
        };
        let member = FileMember::open(&path, &opts).expect("open read-only");
        assert!(member.read_only());
        let err = member
            .write_at(0, Bytes::from_static(b"no"))
            .await
            .expect_err("write on read-only");
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        let err = member
            .discard(0, 4096)
            .await
            .expect_err("discard on read-only");
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert_eq!(member.read_at(0, 4096).await.expect("read").len(), 4096);
    }
}

#[test]
fn open_errors_name_the_path() {
    let dir = scratch();
    let missing = dir.path().join("missing.img");
    match FileMember::open(&missing, &FileOptions::default()) {
        Err(e @ FileError::Open { .. }) => {
            assert!(e.to_string().contains("missing.img"), "{e}")
        }
        other => panic!("expected an open error, got {other:?}"),
    }
    let read_only = FileOptions {
        read_only: true,
        ..FileOptions::default()
    };
    match FileMember::open(dir.path(), &read_only) {
        Err(e @ FileError::NotADisk { .. }) => {
            assert!(
                e.to_string().contains(&dir.path().display().to_string()),
                "{e}"
            )
        }
        other => panic!("expected not-a-disk, got {other:?}"),
    }
    let opts = FileOptions {
        read_only: true,
        create_size: Some(4096),
        ..FileOptions::default()
    };
    assert!(matches!(
        FileMember::open(&missing, &opts),
        Err(FileError::InvalidOptions { .. })
    ));
}

#[test]
fn create_size_makes_a_sparse_image_and_reopen_keeps_its_size() {
    let dir = scratch();
    let path = dir.path().join("new.img");
    let member = open(&path, EngineChoice::Pool, false);
    assert_eq!(member.size(), IMAGE_BYTES);
    drop(member);
    let meta = std::fs::metadata(&path).expect("metadata");
    assert_eq!(meta.len(), IMAGE_BYTES);
    let reopened = FileMember::open(&path, &FileOptions::default()).expect("reopen");
    assert_eq!(reopened.size(), IMAGE_BYTES);
}

/// tmpfs either accepts `O_DIRECT` (Linux 6.6+) or refuses it; both must give correct data.
#[tokio::test]
async fn direct_on_tmpfs_works_or_falls_back_to_buffered() {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("skipping: no /dev/shm");
        return;
    }
    let dir = tempfile::tempdir_in(shm).expect("tempdir in /dev/shm");
    let path = dir.path().join("img");
    let opts = FileOptions {
        direct: true,
        create_size: Some(1 << 20),
        engine: EngineChoice::Pool,
        ..FileOptions::default()
    };
    let member = FileMember::open(&path, &opts).expect("open on tmpfs");
    let data = AlignedBuf::copy_from(&[7u8; 8192]).into_bytes();
    member.write_at(4096, data.clone()).await.expect("write");
    assert_eq!(member.read_at(4096, 8192).await.expect("read"), data);
    eprintln!("O_DIRECT on tmpfs: {}", member.direct());
}

/// The first block device this process may open read-only, with its size from sysfs.
fn readable_block_device() -> Option<(std::path::PathBuf, u64)> {
    let entries = std::fs::read_dir("/sys/block").ok()?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let sectors = std::fs::read_to_string(entry.path().join("size"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        let dev = Path::new("/dev").join(&name);
        if sectors > 0 && std::fs::File::open(&dev).is_ok() {
            // sysfs counts 512-byte sectors whatever the logical block size.
            return Some((dev, sectors * 512));
        }
    }
    None
}

#[tokio::test]
async fn block_device_size_and_block_size_come_from_the_device() {
    let Some((dev, size)) = readable_block_device() else {
        eprintln!("skipping: no readable block device");
        return;
    };
    let opts = FileOptions {
        read_only: true,
        direct: true,
        engine: EngineChoice::Pool,
        ..FileOptions::default()
    };
    let member = FileMember::open(&dev, &opts).expect("open block device read-only");
    assert!(member.is_block_device());
    assert_eq!(member.size(), size, "{}", dev.display());
    let align = member.direct_align_bytes();
    assert!(
        align.is_power_of_two() && (512..=4096).contains(&align),
        "{align}"
    );
    let first = member.read_at(0, 4096).await.expect("read first block");
    assert_eq!(first.len(), 4096);
}

/// `EngineChoice::Auto` follows `TWINBLOCK_IO` when set (run the suite with `TWINBLOCK_IO=pool`
/// and `=uring` to check both), else the probe.
#[test]
fn auto_engine_follows_twinblock_io_or_the_probe() {
    let dir = scratch();
    let opts = FileOptions {
        create_size: Some(1 << 20),
        ..FileOptions::default()
    };
    let member = FileMember::open(dir.path().join("img"), &opts).expect("open");
    let expected = match std::env::var("TWINBLOCK_IO").as_deref() {
        Ok("pool") => "pool",
        Ok("uring") => "uring",
        _ if uring::probe().is_ok() => "uring",
        _ => "pool",
    };
    assert_eq!(member.engine(), expected);
}
