//! The disk path: reading and writing the HA mailbox area of a shared disk with `O_DIRECT`.
//!
//! Every RAID member reserves an area RAID never touches (`MAILBOX_OFFSET_BYTES`,
//! `MAILBOX_BYTES` in `twinblock_raid::superblock`); each node owns one slot in it (layout in
//! `twinblock_pair::mailbox`). `O_DIRECT` matters: the partner, on another host, reads the disk,
//! not this host's page cache, so a status that sits only in the page cache was never sent.
//! Mailbox I/O is not fenced by reservations: a node writes only its own slot, never data, and
//! the survivor needs the fenced node's mailbox writes to measure its lease.
//!
//! The I/O is small (a few KiB per interval per disk) and runs on the blocking pool.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use twinblock_io::buf::{AlignedBuf, ALIGN_BYTES};
use twinblock_raid::superblock::{MAILBOX_BYTES, MAILBOX_OFFSET_BYTES};

/// One shared disk's mailbox area.
#[derive(Debug, Clone)]
pub struct MailboxDisk {
    path: PathBuf,
    file: Arc<File>,
}

#[derive(Debug, thiserror::Error)]
pub enum MailboxIoError {
    #[error("mailbox disk {path}: {op} failed: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error(
        "mailbox disk {path}: {op} of {len} bytes at area offset {offset} is outside the \
         {MAILBOX_BYTES}-byte mailbox area or not {ALIGN_BYTES}-byte aligned"
    )]
    Range {
        path: PathBuf,
        op: &'static str,
        offset: u64,
        len: usize,
    },
}

impl MailboxDisk {
    /// Opens the disk for `O_DIRECT` reads and writes. The file must exist: the mailbox lives on
    /// a disk that already carries RAID superblocks, never on a file created here.
    pub fn open(path: &Path) -> Result<MailboxDisk, MailboxIoError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .map_err(|source| MailboxIoError::Io {
                path: path.to_path_buf(),
                op: "open",
                source,
            })?;
        Ok(MailboxDisk {
            path: path.to_path_buf(),
            file: Arc::new(file),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check(&self, op: &'static str, offset: u64, len: usize) -> Result<(), MailboxIoError> {
        let aligned = offset.is_multiple_of(ALIGN_BYTES as u64) && len.is_multiple_of(ALIGN_BYTES);
        if !aligned || len == 0 || offset + len as u64 > MAILBOX_BYTES {
            return Err(MailboxIoError::Range {
                path: self.path.clone(),
                op,
                offset,
                len,
            });
        }
        Ok(())
    }

    /// Writes `data` at `offset` within the mailbox area and waits until it is on the disk.
    pub async fn write(&self, offset: u64, data: &[u8]) -> Result<(), MailboxIoError> {
        self.check("write", offset, data.len())?;
        let buf = AlignedBuf::copy_from(data);
        let disk = self.clone();
        run_blocking(&self.path, "write", move || {
            disk.file
                .write_all_at(&buf, MAILBOX_OFFSET_BYTES + offset)?;
            // O_DIRECT bypasses the page cache, not the device's write cache.
            disk.file.sync_data()
        })
        .await
    }

    /// Reads `len` bytes at `offset` within the mailbox area.
    pub async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, MailboxIoError> {
        self.check("read", offset, len)?;
        let disk = self.clone();
        run_blocking(&self.path, "read", move || {
            let mut buf = AlignedBuf::zeroed(len);
            disk.file
                .read_exact_at(&mut buf, MAILBOX_OFFSET_BYTES + offset)?;
            Ok(buf.to_vec())
        })
        .await
    }
}

async fn run_blocking<T: Send + 'static>(
    path: &Path,
    op: &'static str,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, MailboxIoError> {
    let err = |source| MailboxIoError::Io {
        path: path.to_path_buf(),
        op,
        source,
    };
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(err),
        Err(e) => Err(err(std::io::Error::other(e.to_string()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(dir: &Path) -> PathBuf {
        let p = dir.join("d0.img");
        let f = File::create(&p).unwrap();
        f.set_len(4 << 20).unwrap();
        p
    }

    #[tokio::test]
    async fn a_slot_written_reads_back_from_the_disk_at_the_mailbox_offset() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = disk(dir.path());
        let Ok(d) = MailboxDisk::open(&path) else {
            eprintln!("SKIP: O_DIRECT not supported on /var/tmp here");
            return;
        };
        let slot = vec![0xa5u8; ALIGN_BYTES];
        d.write(ALIGN_BYTES as u64, &slot).await.unwrap();
        assert_eq!(d.read(ALIGN_BYTES as u64, ALIGN_BYTES).await.unwrap(), slot);
        let raw = std::fs::read(&path).unwrap();
        let at = (MAILBOX_OFFSET_BYTES + ALIGN_BYTES as u64) as usize;
        assert_eq!(&raw[at..at + ALIGN_BYTES], &slot[..]);
        assert!(raw[..MAILBOX_OFFSET_BYTES as usize].iter().all(|&b| b == 0));
    }

    #[tokio::test]
    async fn io_outside_the_area_or_unaligned_is_refused() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = disk(dir.path());
        let Ok(d) = MailboxDisk::open(&path) else {
            eprintln!("SKIP: O_DIRECT not supported on /var/tmp here");
            return;
        };
        assert!(d.write(MAILBOX_BYTES, &[0; ALIGN_BYTES]).await.is_err());
        assert!(d.write(100, &[0; ALIGN_BYTES]).await.is_err());
        assert!(d.read(0, 100).await.is_err());
        assert!(std::fs::read(&path).unwrap().iter().all(|&b| b == 0));
    }

    #[test]
    fn a_missing_disk_is_not_created() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("absent.img");
        let e = MailboxDisk::open(&p).unwrap_err().to_string();
        assert!(e.contains("absent.img") && e.contains("open"), "{e}");
        assert!(!p.exists());
    }
}
