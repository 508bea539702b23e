//! A power-loss model of the NVRAM, for tests of `msync` mode.
//!
//! In `msync` mode a store into the mapping reaches the file's page cache at once and the medium
//! only when it is persisted (`msync`). When the power goes, bytes persisted before the cut are on
//! the medium; bytes stored but not yet persisted may or may not be, cache line by cache line.
//! [`NvramPowerModel`] keeps the image the medium holds (updated on every persist until the cut),
//! can cut the power after a given number of persists, and builds the file the next boot finds:
//! each 64-byte line of the store whose persist the cut interrupted is kept or lost by a seed.
//! Attach one with [`crate::Nvram::open_with_power_model`]. Pure bookkeeping; the mapping calls
//! [`NvramPowerModel::persisted`] from `pmem`.

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

#[derive(Debug, Default)]
struct State {
    /// What the medium holds.
    durable: Vec<u8>,
    /// Persists left before the power goes (`None`: never).
    persists_left: Option<u64>,
    off: bool,
    /// The range whose persist the power cut interrupted: stored, maybe on the medium.
    torn: Option<(usize, usize)>,
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

impl NvramPowerModel {
    pub fn new() -> NvramPowerModel {
        NvramPowerModel::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The file as mapped at open: all of it on the medium.
    pub(crate) fn start(&self, file: &[u8]) {
        self.lock().durable = file.to_vec();
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

    /// `bytes` (now in memory at file offset `at`) were persisted.
    pub(crate) fn persisted(&self, at: usize, bytes: &[u8]) {
        let linked_off = self
            .linked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|probe| probe());
        let mut s = self.lock();
        if s.off {
            return;
        }
        if linked_off {
            s.off = true;
            s.torn = Some((at, bytes.len()));
            return;
        }
        if let Some(left) = s.persists_left.as_mut() {
            if *left == 0 {
                s.off = true;
                s.torn = Some((at, bytes.len()));
                return;
            }
            *left -= 1;
        }
        if let Some(dst) = s.durable.get_mut(at..at + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    }

    /// The file the next boot finds, given what memory holds now (`memory`, the whole file):
    /// the medium's image, with each line of the store the cut interrupted kept or lost per
    /// `cut`. Stores made after the cut never happened (the machine stopped), so they are lost.
    pub fn file_after_cut(&self, memory: &[u8], cut: NvramCut) -> Vec<u8> {
        let s = self.lock();
        let mut out = s.durable.clone();
        let Some((at, len)) = s.torn else {
            return out;
        };
        let first = at / LINE_BYTES;
        let end = (at + len).div_ceil(LINE_BYTES);
        for i in first..end {
            let keep = match cut {
                NvramCut::LoseAll => false,
                NvramCut::KeepAll => true,
                NvramCut::Torn { seed } => mix(seed ^ mix(i as u64)) & 1 == 1,
            };
            let r = i * LINE_BYTES..((i + 1) * LINE_BYTES).min(out.len()).min(memory.len());
            if keep && !r.is_empty() {
                out[r.clone()].copy_from_slice(&memory[r]);
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
        let mut mem = vec![0u8; 256];
        m.start(&mem);
        mem[0..64].fill(1);
        m.persisted(0, &mem[0..64]);
        m.cut_after_persists(0);
        mem[64..128].fill(2);
        m.persisted(64, &mem[64..128]);
        assert!(m.is_off());
        let after = m.file_after_cut(&mem, NvramCut::LoseAll);
        assert!(after[..64].iter().all(|&b| b == 1));
        assert!(after[64..].iter().all(|&b| b == 0));
        assert_eq!(m.file_after_cut(&mem, NvramCut::KeepAll), mem);
        mem[192..256].fill(3);
        m.persisted(192, &mem[192..256]);
        let kept = m.file_after_cut(&mem, NvramCut::KeepAll);
        assert!(
            kept[192..].iter().all(|&b| b == 0),
            "a store after the cut never happened"
        );
    }
}
