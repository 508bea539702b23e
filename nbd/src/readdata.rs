//! The bytes of one read reply, as the device hands them over: one buffer, or several buffers
//! in order (a read cache's blocks, each shared with the cache).
//!
//! A device that keeps data in fixed-size blocks would otherwise copy a large read's blocks
//! into one reply buffer only for the writer to hand that buffer to the socket; with a list of
//! pieces the writer hands the blocks themselves to one vectored write. Each piece is a `Bytes`
//! (a reference count on the block's memory), so a block the cache evicts or replaces while the
//! reply is queued stays alive, unchanged, until the write is done: the reply carries the bytes
//! the device read, never a later version.

use bytes::Bytes;

/// The payload of one successful read: `len()` bytes in one or more pieces, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadData {
    /// One contiguous buffer (most devices, and every cache miss).
    One(Bytes),
    /// Several buffers to send back to back. Empty pieces are allowed and send nothing.
    Pieces(Vec<Bytes>),
}

impl ReadData {
    /// Total bytes over all pieces.
    pub fn len(&self) -> usize {
        match self {
            ReadData::One(b) => b.len(),
            ReadData::Pieces(p) => p.iter().map(Bytes::len).sum(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The pieces in order, without copying.
    pub fn pieces(&self) -> &[Bytes] {
        match self {
            ReadData::One(b) => std::slice::from_ref(b),
            ReadData::Pieces(p) => p,
        }
    }

    /// Takes the pieces out, in order, without copying.
    pub fn into_pieces(self) -> Vec<Bytes> {
        match self {
            ReadData::One(b) => vec![b],
            ReadData::Pieces(p) => p,
        }
    }

    /// All bytes in one buffer: the buffer itself when there is one piece, else a copy.
    pub fn to_contiguous(&self) -> Bytes {
        match self.pieces() {
            [one] => one.clone(),
            pieces => {
                let mut out = Vec::with_capacity(self.len());
                for p in pieces {
                    out.extend_from_slice(p);
                }
                Bytes::from(out)
            }
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
        assert_eq!(d.pieces().len(), 3);
        assert_eq!(&d.to_contiguous()[..], b"abcde");
    }

    #[test]
    fn a_single_piece_list_becomes_one_buffer_without_a_copy() {
        let b = Bytes::from(vec![7u8; 4096]);
        let ptr = b.as_ptr();
        let d = ReadData::from(vec![b]);
        assert!(matches!(d, ReadData::One(_)));
        assert_eq!(d.to_contiguous().as_ptr(), ptr);
    }

    #[test]
    fn pieces_keep_their_memory_after_the_source_drops_them() {
        // A cache replacing a block drops its reference; the reply's piece must still hold the
        // old bytes, unchanged.
        let mut cache_slot = Bytes::from(vec![1u8; 4096]);
        let d = ReadData::from(vec![cache_slot.slice(0..4096), Bytes::from_static(b"x")]);
        cache_slot = Bytes::from(vec![2u8; 4096]);
        assert_eq!(cache_slot[0], 2);
        assert!(d.pieces()[0].iter().all(|&b| b == 1));
        assert_eq!(d.len(), 4097);
    }

    #[test]
    fn empty_piece_list_is_empty() {
        assert!(ReadData::from(Vec::new()).is_empty());
        assert!(ReadData::Pieces(vec![Bytes::new()]).is_empty());
    }
}
