//! The bytes of one read reply, as the device hands them over: one buffer, several buffers
//! in order (a read cache's blocks, each shared with the cache), or a range of a file whose
//! pages the page cache holds (a plain image on the page cache).
//!
//! A device that keeps data in fixed-size blocks would otherwise copy a large read's blocks
//! into one reply buffer only for the writer to hand that buffer to the socket; with a list of
//! pieces the writer hands the blocks themselves to one vectored write. Each piece is a `Bytes`
//! (a reference count on the block's memory), so a block the cache evicts or replaces while the
//! reply is queued stays alive, unchanged, until the write is done: the reply carries the bytes
//! the device read, never a later version.
//!
//! A file range is different: its bytes are taken from the page cache when the reply writer
//! sends it (`sendfile`, see [`crate::sendfile`]), so a large read costs the server no copy at
//! all: the kernel hands the page-cache pages to the socket and the client's receive is the only
//! copy. The reply then carries the file's bytes as of the send, which may include a write that
//! started after the device returned the range. That write overlaps a read the client has not
//! seen answered yet, and NBD leaves such a read's result to the server (either version, even
//! mixed); a write acknowledged before the read was received is in the page cache already and
//! always seen.

use bytes::Bytes;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// `len` bytes of `file` from `offset`, sent straight from the page cache.
#[derive(Debug, Clone)]
pub struct FileRange {
    pub file: Arc<File>,
    pub offset: u64,
    pub len: usize,
}

impl FileRange {
    /// The range's bytes, read into memory (for streams that cannot take a file range: TLS,
    /// tests). An error if the file ends before the range does.
    pub fn read(&self) -> std::io::Result<Bytes> {
        let mut buf = vec![0u8; self.len];
        self.file.read_exact_at(&mut buf, self.offset)?;
        Ok(Bytes::from(buf))
    }
}

impl PartialEq for FileRange {
    /// The same range of the same open file.
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.file, &other.file) && self.offset == other.offset && self.len == other.len
    }
}

impl Eq for FileRange {}

/// The payload of one successful read: `len()` bytes in one or more pieces, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadData {
    /// One contiguous buffer (most devices, and every cache miss).
    One(Bytes),
    /// Several buffers to send back to back. Empty pieces are allowed and send nothing.
    Pieces(Vec<Bytes>),
    /// A range of a file the page cache holds, sent from there (see the module docs).
    File(FileRange),
}

impl ReadData {
    /// Total bytes over all pieces.
    pub fn len(&self) -> usize {
        match self {
            ReadData::One(b) => b.len(),
            ReadData::Pieces(p) => p.iter().map(Bytes::len).sum(),
            ReadData::File(r) => r.len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The in-memory pieces in order, without copying; `None` for a file range.
    pub fn pieces(&self) -> Option<&[Bytes]> {
        match self {
            ReadData::One(b) => Some(std::slice::from_ref(b)),
            ReadData::Pieces(p) => Some(p),
            ReadData::File(_) => None,
        }
    }

    /// All bytes in one buffer: the buffer itself when there is one piece, else a copy (a file
    /// range is read from its file, which can fail).
    pub fn to_contiguous(&self) -> std::io::Result<Bytes> {
        match self {
            ReadData::One(one) => Ok(one.clone()),
            ReadData::Pieces(pieces) => {
                let mut out = Vec::with_capacity(self.len());
                for p in pieces {
                    out.extend_from_slice(p);
                }
                Ok(Bytes::from(out))
            }
            ReadData::File(range) => range.read(),
        }
    }
}

impl From<Bytes> for ReadData {
    fn from(b: Bytes) -> Self {
        ReadData::One(b)
    }
}

impl From<Vec<Bytes>> for ReadData {
    /// One piece stays one buffer; otherwise the pieces as they are.
    fn from(mut pieces: Vec<Bytes>) -> Self {
        if pieces.len() == 1 {
            if let Some(one) = pieces.pop() {
                return ReadData::One(one);
            }
        }
        ReadData::Pieces(pieces)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_length_is_the_sum_of_the_pieces() {
        let d = ReadData::from(vec![
            Bytes::from_static(b"ab"),
            Bytes::new(),
            Bytes::from_static(b"cde"),
        ]);
        assert_eq!(d.len(), 5);
        assert_eq!(d.pieces().map(<[Bytes]>::len), Some(3));
        assert_eq!(&d.to_contiguous().unwrap()[..], b"abcde");
    }

    #[test]
    fn a_single_piece_list_becomes_one_buffer_without_a_copy() {
        let b = Bytes::from(vec![7u8; 4096]);
        let ptr = b.as_ptr();
        let d = ReadData::from(vec![b]);
        assert!(matches!(d, ReadData::One(_)));
        assert_eq!(d.to_contiguous().unwrap().as_ptr(), ptr);
    }

    #[test]
    fn pieces_keep_their_memory_after_the_source_drops_them() {
        // A cache replacing a block drops its reference; the reply's piece must still hold the
        // old bytes, unchanged.
        let mut cache_slot = Bytes::from(vec![1u8; 4096]);
        let d = ReadData::from(vec![cache_slot.slice(0..4096), Bytes::from_static(b"x")]);
        cache_slot = Bytes::from(vec![2u8; 4096]);
        assert_eq!(cache_slot[0], 2);
        assert!(d.pieces().unwrap()[0].iter().all(|&b| b == 1));
        assert_eq!(d.len(), 4097);
    }

    #[test]
    fn file_range_reads_back_its_bytes_and_refuses_a_short_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, b"0123456789").unwrap();
        let file = Arc::new(File::open(&path).unwrap());
        let d = ReadData::File(FileRange {
            file: file.clone(),
            offset: 2,
            len: 5,
        });
        assert_eq!(d.len(), 5);
        assert!(d.pieces().is_none());
        assert_eq!(&d.to_contiguous().unwrap()[..], b"23456");
        let past_end = FileRange {
            file,
            offset: 8,
            len: 5,
        };
        assert!(past_end.read().is_err());
    }

    #[test]
    fn empty_piece_list_is_empty() {
        assert!(ReadData::from(Vec::new()).is_empty());
        assert!(ReadData::Pieces(vec![Bytes::new()]).is_empty());
    }
}
