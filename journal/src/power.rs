//! A power-loss model of the NVRAM, for tests of `msync` and `pmem` mode.
//!
//! In `msync` mode a store into the mapping reaches the file's page cache at once and the medium
//! only when it is persisted (`msync`), or earlier whenever the kernel writes the page back on its
//! own. In `pmem` mode a store sits in the CPU caches until its lines are written back (`clwb` and
//! a fence), or until the CPU evicts them on its own: the same model, line by line. [`NvramPowerModel`] keeps the image the medium holds and the stores not persisted yet
//! (in store order); a persist moves the stored bytes of its range onto the medium. The power can
//! be cut after a given number of persists; the file the next boot finds is the medium's image
//! with each 64-byte line touched by a store not persisted by then kept or lost, chosen by a seed
//! (the kernel may have written any dirty page back before the cut). With the group commit of
//! `msync` mode many records can be stored and not persisted at once, and any of them may be
//! torn this way. A persist can also be made to fail (as `msync` does on a failing disk).
//! Attach one with [`crate::Nvram::open_with_power_model`]. Pure bookkeeping; the mapping calls
//! [`NvramPowerModel::stored`] and [`NvramPowerModel::persisted`] from `pmem`.

use std::sync::Mutex;

/// Granularity at which a cut may tear NVRAM stores (one cache line).
pub const LINE_BYTES: usize = 64;

/// What the cut does to stores not yet persisted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NvramCut {
    LoseAll,
    KeepAll,
    /// Each line independently kept or lost, chosen by `seed`.
    Torn {
        seed: u64,
    },
}

/// Bytes stored at file offset `at` and not persisted yet.
#[derive(Debug, Clone)]
struct Stored {
    at: usize,
    bytes: Vec<u8>,
}

#[derive(Debug, Default)]
struct State {
    /// What the medium holds.
    durable: Vec<u8>,
    /// Stores not persisted yet, oldest first.
    stored: Vec<Stored>,
    /// Persists left before the power goes (`None`: never).
    persists_left: Option<u64>,
    off: bool,
    /// Persists that reached the medium (counted until the cut).
    persists: u64,
    /// Every persist from now on fails with this OS error number.
    fail_with: Option<i32>,
    /// Every persist takes this long (a slow medium).
    persist_delay: Option<std::time::Duration>,
}

/// Tells whether the power of the rest of the machine is off (see
/// [`NvramPowerModel::cut_with`]).
pub type PowerProbe = Box<dyn Fn() -> bool + Send + Sync>;

/// The medium behind one NVRAM file.
#[derive(Default)]
pub struct NvramPowerModel {
    state: Mutex<State>,
    /// Goes off with another power model (the member disks'): checked at every persist.
    linked: Mutex<Option<PowerProbe>>,
}

impl std::fmt::Debug for NvramPowerModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvramPowerModel")
            .field("state", &self.state)
            .finish()
    }
}

fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Copies the part of `s` inside `[lo, hi)` onto `image`.
fn apply(image: &mut [u8], s: &Stored, lo: usize, hi: usize) {
    let from = s.at.max(lo);
    let to = (s.at + s.bytes.len()).min(hi).min(image.len());
    if from < to {
        image[from..to].copy_from_slice(&s.bytes[from - s.at..to - s.at]);
    }
}

impl NvramPowerModel {
    pub fn new() -> NvramPowerModel {
        NvramPowerModel::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The file as mapped at open. A new model, or one whose power was cut (a new boot), takes
    /// all of it as on the medium. A model already attached to this file whose power is on keeps
    /// its medium image and pending stores: the daemon restarted after a crash of its own, and
    /// what it had stored without persisting is still in the page cache only.
    pub(crate) fn start(&self, file: &[u8]) {
        let mut s = self.lock();
        if s.off || s.durable.len() != file.len() {
            *s = State {
                durable: file.to_vec(),
                fail_with: s.fail_with,
                persist_delay: s.persist_delay,
                ..State::default()
            };
        }
    }

    /// The power goes after `n` more persists (the n-th persist does not reach the medium).
    pub fn cut_after_persists(&self, n: u64) {
        self.lock().persists_left = Some(n);
    }

    /// The power goes when `probe` says the rest of the machine lost it: the first persist that
    /// finds it true does not reach the medium, nor does any later one. Links the NVRAM to the
    /// member disks' power supply, so that a CP whose member flush was cut cannot persist its
    /// CP record.
    pub fn cut_with(&self, probe: PowerProbe) {
        *self.linked.lock().unwrap_or_else(|e| e.into_inner()) = Some(probe);
    }

    /// True once the power is off: nothing persisted since reached the medium.
    pub fn is_off(&self) -> bool {
        self.lock().off
    }

    /// Every later persist fails with OS error `errno` (`None`: they succeed again).
    pub fn fail_persists(&self, errno: Option<i32>) {
        self.lock().fail_with = errno;
    }

    /// Every later persist takes `delay` (as `msync` to a slow disk), outside the model's lock.
    pub fn slow_persists(&self, delay: std::time::Duration) {
        self.lock().persist_delay = Some(delay);
    }

    /// Persists that reached the medium so far.
    pub fn persists(&self) -> u64 {
        self.lock().persists
    }

    /// `bytes` were stored at file offset `at` (in memory, not persisted yet). Stores made after
    /// the cut never happened (the machine stopped), including a cut only the linked probe knows
    /// of yet: without that check, a store made after the members lost power (a CP's control
    /// update after a member flush that the cut turned into a no-op) sat among the pending
    /// stores, and a cut keeping pending lines kept it, which no real machine can do (the
    /// store was never made). That released log records whose store writes never became
    /// durable, and a degraded whole-row discard they held read back as garbage.
    pub(crate) fn stored(&self, at: usize, bytes: &[u8]) {
        let linked_off = self.linked_off();
        let mut s = self.lock();
        if linked_off {
            s.off = true;
        }
        if !s.off {
            s.stored.push(Stored {
                at,
                bytes: bytes.to_vec(),
            });
        }
    }

    /// True when the linked probe ([`NvramPowerModel::cut_with`]) says the power is gone.
    fn linked_off(&self) -> bool {
        self.linked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|probe| probe())
    }

    /// File bytes `[at, at+len)` were persisted: the stores inside the range reach the medium,
    /// oldest first; what lies outside it stays pending.
    pub(crate) fn persisted(&self, at: usize, len: usize) -> std::io::Result<()> {
        let delay = self.lock().persist_delay;
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        let linked_off = self.linked_off();
        let mut s = self.lock();
        if let Some(errno) = s.fail_with {
            return Err(std::io::Error::from_raw_os_error(errno));
        }
        if s.off {
            return Ok(());
        }
        if linked_off {
            // The rest of the machine lost power first: this persist never reached the medium.
            s.off = true;
            return Ok(());
        }
        if let Some(left) = s.persists_left.as_mut() {
            if *left == 0 {
                s.off = true;
                return Ok(());
            }
            *left -= 1;
        }
        s.persists += 1;
        let (lo, hi) = (at, at + len);
        let stored = std::mem::take(&mut s.stored);
        let mut left = Vec::with_capacity(stored.len());
        for st in stored {
            let end = st.at + st.bytes.len();
            if end <= lo || st.at >= hi {
                left.push(st);
                continue;
            }
            apply(&mut s.durable, &st, lo, hi);
            if st.at < lo {
                left.push(Stored {
                    at: st.at,
                    bytes: st.bytes[..lo - st.at].to_vec(),
                });
            }
            if end > hi {
                left.push(Stored {
                    at: hi,
                    bytes: st.bytes[hi - st.at..].to_vec(),
                });
            }
        }
        // The pieces kept their relative order except where one store was split in two; a
        // store's two pieces never overlap each other, so their order does not matter.
        s.stored = left;
        Ok(())
    }

    /// The file the next boot finds: the medium's image, with each line touched by a store not
    /// persisted before the cut kept (all such stores to it applied, in order) or lost, per `cut`.
    pub fn file_after_cut(&self, cut: NvramCut) -> Vec<u8> {
        let s = self.lock();
        let mut out = s.durable.clone();
        let mut lines = std::collections::BTreeSet::new();
        for st in &s.stored {
            let first = st.at / LINE_BYTES;
            let end = (st.at + st.bytes.len()).div_ceil(LINE_BYTES);
            lines.extend(first..end);
        }
        for i in lines {
            let keep = match cut {
                NvramCut::LoseAll => false,
                NvramCut::KeepAll => true,
                NvramCut::Torn { seed } => mix(seed ^ mix(i as u64)) & 1 == 1,
            };
            if keep {
                for st in &s.stored {
                    apply(&mut out, st, i * LINE_BYTES, (i + 1) * LINE_BYTES);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_persisted_bytes_survive_a_lose_all_cut() {
        let m = NvramPowerModel::new();
        m.start(&[0u8; 256]);
        m.stored(0, &[1; 64]);
        m.persisted(0, 64).unwrap();
        m.cut_after_persists(0);
        m.stored(64, &[2; 64]);
        m.persisted(64, 64).unwrap();
        assert!(m.is_off());
        let after = m.file_after_cut(NvramCut::LoseAll);
        assert!(after[..64].iter().all(|&b| b == 1));
        assert!(after[64..].iter().all(|&b| b == 0));
        let kept = m.file_after_cut(NvramCut::KeepAll);
        assert!(kept[64..128].iter().all(|&b| b == 2));
        m.stored(192, &[3; 64]);
        let kept = m.file_after_cut(NvramCut::KeepAll);
        assert!(
            kept[192..].iter().all(|&b| b == 0),
            "a store after the cut never happened"
        );
    }

    /// The cause of power-loss seeds 1241, 8390 and 9505 (large writes, 64 KiB log, whole-log
    /// degraded CPs): the members lost power inside a CP, its flush turned into a no-op, and
    /// the CP's control-area store (made after the cut, no persist in between) was kept by a
    /// cut keeping pending lines.
    #[test]
    fn a_store_after_the_linked_power_went_off_never_reaches_the_file() {
        let members_off = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let m = NvramPowerModel::new();
        m.start(&[0u8; 256]);
        let probe = members_off.clone();
        m.cut_with(Box::new(move || {
            probe.load(std::sync::atomic::Ordering::SeqCst)
        }));
        m.stored(0, &[1; 64]);
        members_off.store(true, std::sync::atomic::Ordering::SeqCst);
        // No persist has run since the members lost power: only the probe knows of the cut.
        m.stored(64, &[2; 64]);
        for cut in [NvramCut::KeepAll, NvramCut::Torn { seed: 7 }] {
            let after = m.file_after_cut(cut);
            assert!(
                after[64..128].iter().all(|&b| b == 0),
                "{cut:?}: a store made after the cut was kept"
            );
        }
        assert!(
            m.file_after_cut(NvramCut::KeepAll)[..64]
                .iter()
                .all(|&b| b == 1),
            "a store made before the cut may have been written back"
        );
        assert!(m.is_off());
    }

    #[test]
    fn a_persist_moves_only_its_range_and_keeps_store_order() {
        let m = NvramPowerModel::new();
        m.start(&[0u8; 256]);
        m.stored(0, &[1; 128]);
        m.stored(64, &[2; 64]);
        m.persisted(64, 64).unwrap();
        m.cut_after_persists(0);
        m.persisted(0, 64).unwrap();
        let after = m.file_after_cut(NvramCut::LoseAll);
        assert!(after[..64].iter().all(|&b| b == 0), "not persisted");
        assert!(
            after[64..128].iter().all(|&b| b == 2),
            "the newer store wins"
        );
        let kept = m.file_after_cut(NvramCut::KeepAll);
        assert!(kept[..64].iter().all(|&b| b == 1));
        assert!(
            kept[64..128].iter().all(|&b| b == 2),
            "an older piece never overwrites"
        );
    }

    #[test]
    fn failing_persists_report_the_os_error() {
        let m = NvramPowerModel::new();
        m.start(&[0u8; 64]);
        m.stored(0, &[1; 64]);
        m.fail_persists(Some(libc::EIO));
        let e = m.persisted(0, 64).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        assert!(m.file_after_cut(NvramCut::LoseAll).iter().all(|&b| b == 0));
        m.fail_persists(None);
        m.persisted(0, 64).unwrap();
        assert_eq!(m.persists(), 1);
    }
}
