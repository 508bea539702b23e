//! File-layer tests on real files in a temp directory: durability shape, refusals that change
//! nothing, corruption, a crash between temp write and rename, racing updaters, the watch.

use super::*;
use crate::reservation::{ReservationType, ReservationWatch};
use std::sync::{Arc, Barrier};
use std::thread;

const WE_RO: ReservationType = ReservationType::WriteExclusiveRegistrantsOnly;
const A: u64 = 0x1111;
const B: u64 = 0x2222;

fn setup() -> (tempfile::TempDir, ReservationFile) {
    let dir = tempfile::tempdir().unwrap();
    let file = ReservationFile::for_disk(&dir.path().join("disk0.img"));
    (dir, file)
}

fn apply(file: &ReservationFile, ops: &[Op]) {
    for op in ops {
        file.update(op).unwrap();
    }
}

#[test]
fn reservation_file_is_named_beside_the_disk() {
    let f = ReservationFile::for_disk(Path::new("/data/disk0.img"));
    assert_eq!(f.path(), Path::new("/data/disk0.img.resv"));
    assert_eq!(f.lock_path(), Path::new("/data/disk0.img.resv.lock"));
    assert_eq!(f.temp_path(), Path::new("/data/disk0.img.resv.tmp"));
}

#[test]
fn missing_file_reads_as_no_keys_no_reservation() {
    let (_dir, file) = setup();
    assert_eq!(file.read().unwrap(), Snapshot::default());
}

#[test]
fn each_change_writes_the_file_with_the_next_generation() {
    let (_dir, file) = setup();
    let u = file.update(&Op::Register { key: A }).unwrap();
    assert!(u.changed());
    assert_eq!(u.after.generation, 1);
    let u = file
        .update(&Op::Reserve {
            key: A,
            kind: WE_RO,
        })
        .unwrap();
    assert_eq!(u.after.generation, 2);
    assert_eq!(file.read().unwrap(), u.after);
    assert!(!file.temp_path().exists());
}

#[test]
fn noop_update_leaves_the_file_untouched() {
    let (_dir, file) = setup();
    apply(&file, &[Op::Register { key: A }]);
    let before = fs::read(file.path()).unwrap();
    let u = file.update(&Op::Register { key: A }).unwrap();
    assert!(!u.changed());
    assert_eq!(fs::read(file.path()).unwrap(), before);
}

#[test]
fn refused_operations_leave_the_bytes_identical() {
    let (_dir, file) = setup();
    apply(
        &file,
        &[
            Op::Register { key: A },
            Op::Register { key: B },
            Op::Reserve {
                key: A,
                kind: WE_RO,
            },
        ],
    );
    let before = fs::read(file.path()).unwrap();
    let refused = [
        Op::Reserve {
            key: B,
            kind: WE_RO,
        },
        Op::Release { key: B },
        Op::Unregister { key: 0x3333 },
        Op::Preempt {
            key: 0x3333,
            victim: A,
            kind: WE_RO,
        },
        Op::Clear {
            key: None,
            allow_held: false,
        },
    ];
    for op in &refused {
        let err = file.update(op).unwrap_err();
        assert!(err.refusal().is_some(), "{op:?}: {err}");
        assert_eq!(
            fs::read(file.path()).unwrap(),
            before,
            "{op:?} changed the file"
        );
    }
}

#[test]
fn preempt_by_unregistered_key_is_refused() {
    let (_dir, file) = setup();
    apply(
        &file,
        &[
            Op::Register { key: A },
            Op::Reserve {
                key: A,
                kind: WE_RO,
            },
        ],
    );
    let err = file
        .update(&Op::Preempt {
            key: B,
            victim: A,
            kind: WE_RO,
        })
        .unwrap_err();
    assert_eq!(
        err.refusal(),
        Some(&ReservationError::NotRegistered { key: B })
    );
    assert!(file.read().unwrap().state.holds(A));
}

#[test]
fn corrupt_file_is_refused_by_name_and_never_overwritten() {
    let (_dir, file) = setup();
    apply(&file, &[Op::Register { key: A }]);
    let mut bytes = fs::read(file.path()).unwrap();
    bytes[20] ^= 0xFF;
    fs::write(file.path(), &bytes).unwrap();
    let err = file.read().unwrap_err();
    assert!(matches!(err, ReservationFileError::Corrupt { .. }));
    assert!(err.to_string().contains("disk0.img.resv"), "{err}");
    let err = file.update(&Op::Register { key: B }).unwrap_err();
    assert!(matches!(err, ReservationFileError::Corrupt { .. }));
    let err = file
        .update(&Op::Clear {
            key: None,
            allow_held: true,
        })
        .unwrap_err();
    assert!(matches!(err, ReservationFileError::Corrupt { .. }));
    assert_eq!(fs::read(file.path()).unwrap(), bytes);
}

#[test]
fn truncated_file_is_refused() {
    let (_dir, file) = setup();
    apply(&file, &[Op::Register { key: A }]);
    let bytes = fs::read(file.path()).unwrap();
    fs::write(file.path(), &bytes[..bytes.len() - 3]).unwrap();
    assert!(matches!(
        file.read(),
        Err(ReservationFileError::Corrupt {
            error: FormatError::Truncated { .. },
            ..
        })
    ));
}

#[test]
fn forced_clear_rewrites_a_corrupt_file_empty_with_a_later_generation() {
    let (_dir, file) = setup();
    apply(
        &file,
        &[
            Op::Register { key: A },
            Op::Reserve {
                key: A,
                kind: WE_RO,
            },
        ],
    );
    let mut bytes = fs::read(file.path()).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1; // CRC byte: the generation at 16..24 is still readable
    fs::write(file.path(), &bytes).unwrap();
    let out = file.clear_forced().unwrap();
    assert!(out.before.is_err());
    assert_eq!(out.after.generation, 3);
    assert_eq!(file.read().unwrap(), out.after);
    assert!(out.after.state.keys().is_empty());
}

#[test]
fn crash_between_temp_write_and_rename_leaves_the_old_state() {
    let (_dir, file) = setup();
    apply(
        &file,
        &[
            Op::Register { key: A },
            Op::Reserve {
                key: A,
                kind: WE_RO,
            },
        ],
    );
    let old = file.read().unwrap();
    // What a crash after "write temp, fsync" and before "rename" leaves behind.
    let next = Snapshot {
        generation: old.generation + 1,
        state: ReservationState::empty(),
    };
    fs::write(file.temp_path(), format::encode(&next)).unwrap();
    assert_eq!(file.read().unwrap(), old);
    // A half-written temp file is no obstacle to the next update either.
    fs::write(file.temp_path(), b"torn").unwrap();
    let u = file.update(&Op::Register { key: B }).unwrap();
    assert_eq!(u.before, old);
    assert_eq!(file.read().unwrap().state.keys(), &[A, B]);
}

/// One racing node: register, then keep trying to hold the disk by reserve or preempt of the
/// other, and release. Returns the (before, after) generations of every change it made.
fn race(
    file: ReservationFile,
    me: u64,
    other: u64,
    rounds: usize,
    start: Arc<Barrier>,
) -> Vec<(u64, u64)> {
    let mut changes = Vec::new();
    let mut record = |r: Result<Update, ReservationFileError>| match r {
        Ok(u) if u.changed() => {
            assert!(u.after.state.is_consistent());
            changes.push((u.before.generation, u.after.generation));
        }
        Ok(_) => {}
        Err(e) => assert!(e.refusal().is_some(), "unexpected failure: {e}"),
    };
    start.wait();
    for i in 0..rounds {
        record(file.update(&Op::Register { key: me }));
        let op = if i % 2 == 0 {
            Op::Reserve {
                key: me,
                kind: WE_RO,
            }
        } else {
            Op::Preempt {
                key: me,
                victim: other,
                kind: WE_RO,
            }
        };
        record(file.update(&op));
        record(file.update(&Op::Release { key: me }));
    }
    changes
}

#[test]
fn racing_nodes_serialize_so_never_both_hold() {
    const ROUNDS: usize = 150;
    let (_dir, file) = setup();
    let start = Arc::new(Barrier::new(2));
    let spawn = |me, other| {
        let (file, start) = (file.clone(), start.clone());
        thread::spawn(move || race(file, me, other, ROUNDS, start))
    };
    let (ta, tb) = (spawn(A, B), spawn(B, A));
    let mut all = ta.join().unwrap();
    all.extend(tb.join().unwrap());
    // Every change read generation g and wrote g + 1, and no two changes wrote the same
    // generation: the updates were applied one at a time, each to the state the previous one
    // left, so the single-holder rule of the pure state held at every step.
    all.sort_unstable();
    let final_gen = file.read().unwrap().generation;
    assert_eq!(all.len() as u64, final_gen);
    for (i, &(before, after)) in all.iter().enumerate() {
        assert_eq!((before, after), (i as u64, i as u64 + 1));
    }
}

#[test]
fn watch_sees_the_holder_change_across_rename() {
    let (_dir, file) = setup();
    let mut watch = ReservationWatch::new(&file);
    assert!(!watch.holds(A).unwrap());
    apply(
        &file,
        &[
            Op::Register { key: A },
            Op::Register { key: B },
            Op::Reserve {
                key: A,
                kind: WE_RO,
            },
        ],
    );
    assert!(watch.holds(A).unwrap());
    assert_eq!(watch.generation().unwrap(), 3);
    apply(
        &file,
        &[Op::Preempt {
            key: B,
            victim: A,
            kind: WE_RO,
        }],
    );
    assert!(!watch.holds(A).unwrap());
    assert!(watch.holds(B).unwrap());
}

#[test]
fn watch_notices_a_same_size_replacement() {
    let (_dir, file) = setup();
    apply(
        &file,
        &[
            Op::Register { key: A },
            Op::Register { key: B },
            Op::Reserve {
                key: A,
                kind: WE_RO,
            },
        ],
    );
    let mut watch = ReservationWatch::new(&file);
    assert!(watch.holds(A).unwrap());
    // Release then reserve by B: same key count, so the same file size, and possibly the same
    // mtime on coarse clocks; the new inode still gives it away.
    apply(
        &file,
        &[
            Op::Release { key: A },
            Op::Reserve {
                key: B,
                kind: WE_RO,
            },
        ],
    );
    assert!(!watch.holds(A).unwrap());
}

#[test]
fn watch_reports_a_corrupt_file_as_an_error() {
    let (_dir, file) = setup();
    apply(
        &file,
        &[
            Op::Register { key: A },
            Op::Reserve {
                key: A,
                kind: WE_RO,
            },
        ],
    );
    let mut watch = ReservationWatch::new(&file);
    assert!(watch.holds(A).unwrap());
    fs::write(file.path(), b"garbage").unwrap();
    assert!(watch.holds(A).is_err());
}

#[test]
fn watch_of_a_removed_file_holds_nothing() {
    let (_dir, file) = setup();
    apply(
        &file,
        &[
            Op::Register { key: A },
            Op::Reserve {
                key: A,
                kind: WE_RO,
            },
        ],
    );
    let mut watch = ReservationWatch::new(&file);
    assert!(watch.holds(A).unwrap());
    fs::remove_file(file.path()).unwrap();
    assert!(!watch.holds(A).unwrap());
}

#[test]
fn update_gives_up_with_a_named_error_while_another_process_holds_the_lock() {
    let (_dir, file) = setup();
    apply(&file, &[Op::Register { key: A }]);
    let before = fs::read(file.path()).unwrap();
    // Stands in for another updater stuck inside its critical section.
    let held = File::create(file.lock_path()).unwrap();
    let _guard = lock_exclusive(held, 0)
        .ok()
        .expect("take the lock in the test");
    let impatient = file.clone().with_lock_wait_timeout_ms(30);
    let err = impatient.update(&Op::Register { key: B }).unwrap_err();
    assert!(
        matches!(err, ReservationFileError::LockTimeout { waited_ms: 30, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("disk0.img.resv.lock"), "{err}");
    assert_eq!(fs::read(file.path()).unwrap(), before);
    // Reads need no lock.
    assert_eq!(file.read().unwrap().state.keys(), &[A]);
}
