//! Allocation map of an image file through `lseek(SEEK_DATA / SEEK_HOLE)`, for NBD
//! `base:allocation` block status on plain-file volumes.
//!
//! The only unsafe code is the `lseek` call; see the invariant at the call site.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// One run of the file: `[start, end)` is data when `data` is true, a hole otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub start: u64,
    pub end: u64,
    pub data: bool,
}

fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
    // SAFETY: `lseek` only reads the descriptor number and integers; `file` keeps the descriptor
    // open for the duration of the call, and no memory is passed to the kernel.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        // ENXIO: no data (or hole) at or after `offset` before end of file.
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

/// The runs covering `[offset, offset + len)`, clipped to that range and to `file_size`.
/// A filesystem without SEEK_DATA support reports everything as data.
pub fn runs(file: &File, offset: u64, len: u64, file_size: u64) -> io::Result<Vec<Run>> {
    let end = offset.saturating_add(len).min(file_size);
    let mut out = Vec::new();
    let mut pos = offset;
    // Bound the number of runs reported in one reply; the client asks again for the rest.
    const RUNS_PER_QUERY_MAX: usize = 1024;
    while pos < end && out.len() < RUNS_PER_QUERY_MAX {
        let data_at = match seek(file, pos, libc::SEEK_DATA) {
            Ok(Some(d)) => d,
            Ok(None) => end,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                out.push(Run {
                    start: pos,
                    end,
                    data: true,
                });
                return Ok(out);
            }
            Err(e) => return Err(e),
        };
        if data_at > pos {
            let hole_end = data_at.min(end);
            out.push(Run {
                start: pos,
                end: hole_end,
                data: false,
            });
            pos = hole_end;
            continue;
        }
        let hole_at = seek(file, pos, libc::SEEK_HOLE)?.unwrap_or(end);
        let data_end = hole_at.clamp(pos + 1, end);
        out.push(Run {
            start: pos,
            end: data_end,
            data: true,
        });
        pos = data_end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn sparse_file_reports_holes_and_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse.img");
        let mut f = File::create(&path).unwrap();
        f.set_len(4 << 20).unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(&[7u8; 65536]).unwrap();
        f.sync_all().unwrap();
        let f = File::open(&path).unwrap();
        let r = runs(&f, 0, 4 << 20, 4 << 20).unwrap();
        // tmpfs and ext4 both support SEEK_DATA; the data run must cover what we wrote.
        let covered: u64 = r.iter().map(|x| x.end - x.start).sum();
        assert_eq!(covered, 4 << 20);
        assert!(r
            .iter()
            .any(|x| x.data && x.start <= (1 << 20) && x.end >= (1 << 20) + 65536));
        if r.len() > 1 {
            assert!(!r[0].data, "leading region was never written: {r:?}");
        }
    }
}
