//! Recognising disks that already hold something: before an array is created on a disk (which
//! discards its data area), the disk's first and last bytes are checked for the on-disk
//! signatures of the common storage formats: another RAID superblock, an LVM physical volume, a
//! filesystem, a partition table, swap, an encrypted volume. Finding any of them means the disk
//! is not blank and creation must be refused.
//!
//! Pure: the caller reads [`HEAD_BYTES`] from the start of the disk and [`TAIL_BYTES`] from its
//! end (see [`tail_offset`]) and passes them in a [`Probe`]; this module only looks at bytes, so
//! each detector is tested on crafted buffers. The offsets and magic values are the public,
//! documented ones of each format.

use std::fmt;

/// Bytes to read from the start of a disk: covers every signature placed at the start (the
/// farthest is btrfs's primary superblock, at 64 KiB + 64).
pub const HEAD_BYTES: usize = 128 << 10;
/// Bytes to read from the end of a disk: covers the superblocks md places at the end (v0.90 at
/// most 128 KiB before it, v1.0 at most 12 KiB before it).
pub const TAIL_BYTES: usize = 128 << 10;
/// Alignment of the tail read (direct I/O needs aligned offsets).
const TAIL_ALIGN_BYTES: u64 = 4096;

/// The md superblock magic (little-endian on disk for v1.x; host order for v0.90).
const MD_MAGIC: u32 = 0xa92b_4efc;
/// md v1.2 keeps its superblock 4 KiB into the device, v1.1 at the start.
const MD_V12_OFFSET_BYTES: u64 = 4096;
/// md v0.90 reserves the last 64 KiB-aligned 64 KiB block of the device.
const MD_V090_RESERVED_BYTES: u64 = 64 << 10;
/// md v1.0 places its superblock at least 8 KiB before the end, 4 KiB aligned.
const MD_V10_BACK_BYTES: u64 = 8 << 10;
/// LVM2 writes its label into one of the first four 512-byte sectors.
const LVM_LABEL_SECTORS: u64 = 4;
const SECTOR_BYTES: u64 = 512;
/// ext2/3/4: superblock at 1024, `s_magic` 56 bytes into it.
const EXT_MAGIC_OFFSET_BYTES: u64 = 1024 + 56;
const EXT_MAGIC: u16 = 0xef53;
/// btrfs primary superblock at 64 KiB, magic 64 bytes into it.
const BTRFS_MAGIC_OFFSET_BYTES: u64 = (64 << 10) + 64;
/// MBR: boot signature at 510, four 16-byte partition entries from 446.
const MBR_SIGNATURE_OFFSET_BYTES: u64 = 510;
const MBR_PARTITIONS_OFFSET_BYTES: u64 = 446;
const MBR_PARTITION_ENTRY_BYTES: u64 = 16;
/// GPT header in LBA 1 (512-byte sectors).
const GPT_HEADER_OFFSET_BYTES: u64 = 512;
/// Linux swap: the signature ends the first page (4 KiB pages).
const SWAP_MAGIC_OFFSET_BYTES: u64 = 4096 - 10;

/// A format found on a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signature {
    /// md RAID superblock, with its version ("0.90", "1.0", "1.1", "1.2").
    Md(&'static str),
    Lvm2,
    Ext,
    Xfs,
    Btrfs,
    Mbr,
    Gpt,
    Swap,
    Luks,
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Signature::Md(v) => write!(f, "an md RAID superblock (v{v})"),
            Signature::Lvm2 => write!(f, "an LVM2 physical volume label"),
            Signature::Ext => write!(f, "an ext2/3/4 filesystem"),
            Signature::Xfs => write!(f, "an XFS filesystem"),
            Signature::Btrfs => write!(f, "a btrfs filesystem"),
            Signature::Mbr => write!(f, "an MBR partition table"),
            Signature::Gpt => write!(f, "a GPT partition table"),
            Signature::Swap => write!(f, "a Linux swap area"),
            Signature::Luks => write!(f, "a LUKS encrypted volume"),
        }
    }
}

/// Where the tail read of a disk of `size_bytes` starts: [`TAIL_BYTES`] before the end, aligned
/// down, never before 0.
pub fn tail_offset(size_bytes: u64) -> u64 {
    size_bytes.saturating_sub(TAIL_BYTES as u64) / TAIL_ALIGN_BYTES * TAIL_ALIGN_BYTES
}

/// The bytes read from one disk.
pub struct Probe<'a> {
    /// Size of the disk.
    pub size_bytes: u64,
    /// The first bytes (up to [`HEAD_BYTES`]; shorter for a small disk).
    pub head: &'a [u8],
    /// The bytes from [`tail_offset`] to the end.
    pub tail: &'a [u8],
}

impl Probe<'_> {
    /// `len` bytes at disk offset `off`, if the probe holds them.
    fn at(&self, off: u64, len: usize) -> Option<&[u8]> {
        let end = off.checked_add(len as u64)?;
        if end <= self.head.len() as u64 {
            return self.head.get(off as usize..end as usize);
        }
        let t0 = tail_offset(self.size_bytes);
        if off >= t0 && end <= t0 + self.tail.len() as u64 {
            return self.tail.get((off - t0) as usize..(end - t0) as usize);
        }
        None
    }

    fn has(&self, off: u64, magic: &[u8]) -> bool {
        self.at(off, magic.len()) == Some(magic)
    }

    fn u32_le(&self, off: u64) -> Option<u32> {
        let b = self.at(off, 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// A test for one format's signature.
type Detector = fn(&Probe<'_>) -> bool;

/// Every known signature found in `p`, in a fixed order.
pub fn detect(p: &Probe<'_>) -> Vec<Signature> {
    let mut found = Vec::new();
    found.extend(md(p));
    let checks: [(Detector, Signature); 8] = [
        (lvm2, Signature::Lvm2),
        (ext, Signature::Ext),
        (xfs, Signature::Xfs),
        (btrfs, Signature::Btrfs),
        (mbr, Signature::Mbr),
        (gpt, Signature::Gpt),
        (swap, Signature::Swap),
        (luks, Signature::Luks),
    ];
    found.extend(checks.iter().filter(|(f, _)| f(p)).map(|(_, s)| *s));
    found
}

/// An md v1.x superblock at `off`: the magic, then major version 1.
fn md_v1_at(p: &Probe<'_>, off: u64) -> bool {
    p.u32_le(off) == Some(MD_MAGIC) && p.u32_le(off + 4) == Some(1)
}

fn md(p: &Probe<'_>) -> Option<Signature> {
    if md_v1_at(p, MD_V12_OFFSET_BYTES) {
        return Some(Signature::Md("1.2"));
    }
    if md_v1_at(p, 0) {
        return Some(Signature::Md("1.1"));
    }
    let size = p.size_bytes;
    if size >= 2 * MD_V10_BACK_BYTES {
        let off = (size - MD_V10_BACK_BYTES) / 4096 * 4096;
        if md_v1_at(p, off) {
            return Some(Signature::Md("1.0"));
        }
    }
    if size >= 2 * MD_V090_RESERVED_BYTES {
        let off = size / MD_V090_RESERVED_BYTES * MD_V090_RESERVED_BYTES - MD_V090_RESERVED_BYTES;
        // v0.90 is written in the host's byte order: accept either.
        let magic = p.at(off, 4)?;
        let m = [magic[0], magic[1], magic[2], magic[3]];
        if u32::from_le_bytes(m) == MD_MAGIC || u32::from_be_bytes(m) == MD_MAGIC {
            return Some(Signature::Md("0.90"));
        }
    }
    None
}

fn lvm2(p: &Probe<'_>) -> bool {
    (0..LVM_LABEL_SECTORS).any(|s| p.has(s * SECTOR_BYTES, b"LABELONE"))
}

fn ext(p: &Probe<'_>) -> bool {
    p.at(EXT_MAGIC_OFFSET_BYTES, 2)
        .is_some_and(|b| u16::from_le_bytes([b[0], b[1]]) == EXT_MAGIC)
}

fn xfs(p: &Probe<'_>) -> bool {
    p.has(0, b"XFSB")
}

fn btrfs(p: &Probe<'_>) -> bool {
    p.has(BTRFS_MAGIC_OFFSET_BYTES, b"_BHRfS_M")
}

/// The boot signature alone also ends FAT and NTFS boot sectors; an MBR partition table also
/// has an entry with a valid boot flag, a partition type and a length.
fn mbr(p: &Probe<'_>) -> bool {
    if !p.has(MBR_SIGNATURE_OFFSET_BYTES, &[0x55, 0xaa]) {
        return false;
    }
    (0..4).any(|i| {
        let off = MBR_PARTITIONS_OFFSET_BYTES + i * MBR_PARTITION_ENTRY_BYTES;
        p.at(off, MBR_PARTITION_ENTRY_BYTES as usize)
            .is_some_and(|e| {
                let boot_flag_ok = e[0] == 0x00 || e[0] == 0x80;
                let sectors = u32::from_le_bytes([e[12], e[13], e[14], e[15]]);
                boot_flag_ok && e[4] != 0 && sectors != 0
            })
    })
}

fn gpt(p: &Probe<'_>) -> bool {
    p.has(GPT_HEADER_OFFSET_BYTES, b"EFI PART")
}

fn swap(p: &Probe<'_>) -> bool {
    p.has(SWAP_MAGIC_OFFSET_BYTES, b"SWAPSPACE2") || p.has(SWAP_MAGIC_OFFSET_BYTES, b"SWAP-SPACE")
}

fn luks(p: &Probe<'_>) -> bool {
    p.has(0, b"LUKS\xba\xbe")
}

#[cfg(test)]
mod tests {
    use super::*;

    const DISK_BYTES: u64 = 64 << 20;

    /// A blank disk's head and tail, for a test to write a signature into.
    struct Disk {
        head: Vec<u8>,
        tail: Vec<u8>,
    }

    impl Disk {
        fn blank() -> Disk {
            Disk {
                head: vec![0; HEAD_BYTES],
                tail: vec![0; TAIL_BYTES],
            }
        }

        fn put(&mut self, off: u64, bytes: &[u8]) -> &mut Disk {
            if off < HEAD_BYTES as u64 {
                self.head[off as usize..off as usize + bytes.len()].copy_from_slice(bytes);
            } else {
                let t = (off - tail_offset(DISK_BYTES)) as usize;
                self.tail[t..t + bytes.len()].copy_from_slice(bytes);
            }
            self
        }

        fn found(&self) -> Vec<Signature> {
            detect(&Probe {
                size_bytes: DISK_BYTES,
                head: &self.head,
                tail: &self.tail,
            })
        }
    }

    fn md_v1(off: u64) -> Vec<Signature> {
        let mut d = Disk::blank();
        d.put(off, &MD_MAGIC.to_le_bytes())
            .put(off + 4, &1u32.to_le_bytes());
        d.found()
    }

    #[test]
    fn blank_disk_has_no_signature() {
        assert!(Disk::blank().found().is_empty());
    }

    #[test]
    fn md_v1_2_superblock_at_4_kib_is_found() {
        assert_eq!(md_v1(4096), vec![Signature::Md("1.2")]);
    }

    #[test]
    fn md_v1_1_superblock_at_start_is_found() {
        assert_eq!(md_v1(0), vec![Signature::Md("1.1")]);
    }

    #[test]
    fn md_v1_0_superblock_near_the_end_is_found() {
        assert_eq!(md_v1(DISK_BYTES - 8192), vec![Signature::Md("1.0")]);
    }

    #[test]
    fn md_magic_without_version_1_is_not_a_v1_superblock() {
        let mut d = Disk::blank();
        d.put(4096, &MD_MAGIC.to_le_bytes())
            .put(4100, &7u32.to_le_bytes());
        assert!(d.found().is_empty());
    }

    #[test]
    fn md_v0_90_superblock_in_either_byte_order_is_found() {
        let off = DISK_BYTES - 65536;
        for magic in [MD_MAGIC.to_le_bytes(), MD_MAGIC.to_be_bytes()] {
            let mut d = Disk::blank();
            d.put(off, &magic);
            assert_eq!(d.found(), vec![Signature::Md("0.90")]);
        }
    }

    #[test]
    fn lvm2_label_in_any_of_the_first_four_sectors_is_found() {
        for sector in 0..4 {
            let mut d = Disk::blank();
            d.put(sector * 512, b"LABELONE");
            assert_eq!(d.found(), vec![Signature::Lvm2], "sector {sector}");
        }
        let mut d = Disk::blank();
        d.put(4 * 512, b"LABELONE");
        assert!(
            d.found().is_empty(),
            "the label is only looked for in sectors 0..4"
        );
    }

    #[test]
    fn ext_magic_at_1080_is_found() {
        let mut d = Disk::blank();
        d.put(1080, &[0x53, 0xef]);
        assert_eq!(d.found(), vec![Signature::Ext]);
    }

    #[test]
    fn xfs_magic_at_start_is_found() {
        let mut d = Disk::blank();
        d.put(0, b"XFSB");
        assert_eq!(d.found(), vec![Signature::Xfs]);
    }

    #[test]
    fn btrfs_magic_past_64_kib_is_found() {
        let mut d = Disk::blank();
        d.put(65536 + 64, b"_BHRfS_M");
        assert_eq!(d.found(), vec![Signature::Btrfs]);
    }

    #[test]
    fn mbr_needs_a_partition_entry_besides_the_boot_signature() {
        let mut d = Disk::blank();
        d.put(510, &[0x55, 0xaa]);
        assert!(
            d.found().is_empty(),
            "a boot signature alone is no partition table"
        );
        // Entry 2: type 0x83 (Linux), 2048 sectors.
        d.put(446 + 16 + 4, &[0x83])
            .put(446 + 16 + 12, &2048u32.to_le_bytes());
        assert_eq!(d.found(), vec![Signature::Mbr]);
    }

    #[test]
    fn gpt_header_in_lba_1_is_found() {
        let mut d = Disk::blank();
        d.put(512, b"EFI PART");
        assert_eq!(d.found(), vec![Signature::Gpt]);
    }

    #[test]
    fn swap_signature_at_end_of_first_page_is_found() {
        let mut d = Disk::blank();
        d.put(4086, b"SWAPSPACE2");
        assert_eq!(d.found(), vec![Signature::Swap]);
    }

    #[test]
    fn luks_header_at_start_is_found() {
        let mut d = Disk::blank();
        d.put(0, b"LUKS\xba\xbe");
        assert_eq!(d.found(), vec![Signature::Luks]);
    }

    #[test]
    fn short_disk_probe_does_not_panic() {
        let head = [0u8; 100];
        let found = detect(&Probe {
            size_bytes: 100,
            head: &head,
            tail: &head,
        });
        assert!(found.is_empty());
    }

    #[test]
    fn tail_offset_is_aligned_and_covers_the_end() {
        assert_eq!(tail_offset(DISK_BYTES), DISK_BYTES - TAIL_BYTES as u64);
        assert_eq!(tail_offset(1000), 0);
        let odd = DISK_BYTES + 1000;
        assert_eq!(tail_offset(odd) % 4096, 0);
        assert!(odd - tail_offset(odd) >= TAIL_BYTES as u64);
    }
}
