//! Page-aligned I/O buffers for `O_DIRECT`.
//!
//! `O_DIRECT` needs the buffer address, the file offset and the length to be multiples of the
//! device's logical block size. `AlignedBuf` is an owned, zero-initialised allocation aligned to
//! `ALIGN_BYTES` (4096, which covers every Linux logical block size since a logical block is never
//! larger than a page on the platforms we run on). It freezes into `bytes::Bytes` without a copy
//! (`Bytes::from_owner`), and the `Bytes` keeps pointing at the same aligned memory, so a buffer
//! read from one member can be written to another through `O_DIRECT` untouched.
//!
//! This is the only module in `io` that allocates raw memory; the `unsafe` is confined here.

use bytes::Bytes;
use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment of every `AlignedBuf`, in bytes: one page, enough for any logical block size.
pub const ALIGN_BYTES: usize = 4096;

/// A type with the buffer alignment, used only for its aligned dangling pointer.
#[repr(align(4096))]
struct Page;

// `Page` must carry exactly the promised alignment.
const _: () = assert!(std::mem::align_of::<Page>() == ALIGN_BYTES);

/// An owned, initialised byte buffer whose start is aligned to `ALIGN_BYTES`.
pub struct AlignedBuf {
    /// Invariant: `ptr` came from `allocate(len, _)`, all `len` bytes are initialised, and the
    /// memory is owned by this value alone and freed exactly once, in `Drop` (for `len == 0`,
    /// `ptr` is an aligned dangling pointer that is never read, written or freed).
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: `AlignedBuf` owns its allocation exclusively (like `Vec<u8>`) and has no interior
// mutability, so moving it to or sharing `&AlignedBuf` with another thread is sound.
unsafe impl Send for AlignedBuf {}
// SAFETY: see `Send`; `&AlignedBuf` only gives `&[u8]`.
unsafe impl Sync for AlignedBuf {}

/// The layout of every buffer of `len` bytes.
fn layout(len: usize) -> Layout {
    // `ALIGN_BYTES` is a power of two and non-zero; the only failure is a `len` so large that
    // rounding it up overflows `isize`, which no allocation could satisfy anyway.
    match Layout::from_size_align(len, ALIGN_BYTES) {
        Ok(layout) => layout,
        Err(_) => panic!("aligned buffer of {len} bytes exceeds the address space"),
    }
}

/// A fresh `ALIGN_BYTES`-aligned allocation of `len` bytes (zeroed or not), or an aligned
/// dangling pointer for `len == 0`. Aborts (like `Vec`) if memory is exhausted. The caller owns
/// it and frees it with [`free`] and the same `len`.
fn allocate(len: usize, zeroed: bool) -> NonNull<u8> {
    if len == 0 {
        // Non-null and `ALIGN_BYTES`-aligned; never dereferenced or freed.
        return NonNull::<Page>::dangling().cast();
    }
    let layout = layout(len);
    // SAFETY: `layout` has a non-zero size (len > 0) as `alloc` and `alloc_zeroed` require.
    let raw = unsafe {
        if zeroed {
            alloc::alloc_zeroed(layout)
        } else {
            alloc::alloc(layout)
        }
    };
    match NonNull::new(raw) {
        Some(ptr) => ptr,
        None => alloc::handle_alloc_error(layout),
    }
}

/// Frees what [`allocate`] returned for `len`.
///
/// # Safety
/// `ptr` came from `allocate(len, _)` and is not used afterwards.
unsafe fn free(ptr: NonNull<u8>, len: usize) {
    if len > 0 {
        // SAFETY: per the contract, `ptr` was allocated with exactly this layout and is freed
        // once.
        unsafe { alloc::dealloc(ptr.as_ptr(), layout(len)) }
    }
}

impl AlignedBuf {
    /// A zero-filled buffer of `len` bytes. Aborts (like `Vec`) if memory is exhausted.
    pub fn zeroed(len: usize) -> AlignedBuf {
        AlignedBuf {
            ptr: allocate(len, true),
            len,
        }
    }

    /// An aligned copy of `data` (not zeroed first: every byte is copied).
    pub fn copy_from(data: &[u8]) -> AlignedBuf {
        let mut rb = ReadBuf::new(data.len());
        // SAFETY: `rb` is valid for `data.len()` bytes and a fresh allocation, so it cannot
        // overlap `data`; after the copy every byte is initialised, as `assume_filled` requires.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), rb.ptr_at(0), data.len());
            rb.assume_filled()
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Raw pointer for handing the memory to the kernel. Valid for `len()` bytes while `self` lives.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Freeze into `Bytes` without copying; the `Bytes` points at the same aligned memory.
    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: by the struct invariant, `ptr` came from `allocate(len, _)` and is owned by
        // this value alone; `Drop` runs once.
        unsafe { free(self.ptr, self.len) }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len` initialised bytes (zeroed at allocation) for as long
        // as `self` is borrowed, or `len == 0` and the aligned dangling pointer is allowed.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl AsMut<[u8]> for AlignedBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        self
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .finish()
    }
}

/// An aligned allocation for a read to fill: its bytes are uninitialised, so no Rust reference
/// to them is ever made. The kernel writes through raw pointers ([`ReadBuf::ptr_at`]); once a
/// read has filled every byte, [`ReadBuf::assume_filled`] turns it into an [`AlignedBuf`]. This
/// skips zeroing memory the kernel overwrites anyway (12% of the daemon's CPU under random
/// writes to a journaled RAID-5 went to zeroing read buffers).
pub struct ReadBuf {
    /// Invariant: as [`AlignedBuf::ptr`], except that the bytes may be uninitialised.
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: `ReadBuf` owns its allocation exclusively and exposes no references into it.
unsafe impl Send for ReadBuf {}

impl ReadBuf {
    /// An uninitialised buffer of `len` bytes. Aborts (like `Vec`) if memory is exhausted.
    pub fn new(len: usize) -> ReadBuf {
        ReadBuf {
            ptr: allocate(len, false),
            len,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Raw pointer to byte `at` (at most `len()`), for the kernel to write into; valid for
    /// `len() - at` bytes while `self` lives. Never dereferenced here.
    pub fn ptr_at(&mut self, at: usize) -> *mut u8 {
        self.ptr.as_ptr().wrapping_add(at.min(self.len))
    }

    /// The filled buffer.
    ///
    /// # Safety
    /// Every one of the `len()` bytes must have been written (by a completed read).
    pub unsafe fn assume_filled(self) -> AlignedBuf {
        let this = std::mem::ManuallyDrop::new(self);
        // The allocation moves to the `AlignedBuf` (the caller vouches for initialisation);
        // `ManuallyDrop` keeps `ReadBuf::drop` from freeing it a second time.
        AlignedBuf {
            ptr: this.ptr,
            len: this.len,
        }
    }
}

/// A filled buffer reused for another read (a pooled buffer): its old bytes are simply
/// overwritten, and the allocation moves over unchanged.
impl From<AlignedBuf> for ReadBuf {
    fn from(buf: AlignedBuf) -> ReadBuf {
        let this = std::mem::ManuallyDrop::new(buf);
        // Same allocation, same length: `ReadBuf::drop` frees it exactly as `AlignedBuf` would,
        // and `ManuallyDrop` keeps `AlignedBuf::drop` from running.
        ReadBuf {
            ptr: this.ptr,
            len: this.len,
        }
    }
}

impl Drop for ReadBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `allocate(len, false)` and is owned by `self` alone
        // (`assume_filled` does not run this drop).
        unsafe { free(self.ptr, self.len) }
    }
}

impl fmt::Debug for ReadBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadBuf")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .finish()
    }
}

/// Whether `addr` and `len` are both multiples of `align_bytes` (a power of two).
pub fn is_aligned(addr: usize, len: usize, align_bytes: usize) -> bool {
    debug_assert!(align_bytes.is_power_of_two());
    let mask = align_bytes - 1;
    addr & mask == 0 && len & mask == 0
}

/// Whether `data` can be handed to an `O_DIRECT` file descriptor as is: its start address and its
/// length are multiples of `align_bytes`. (The file offset is checked separately.)
pub fn is_direct_aligned(data: &[u8], align_bytes: usize) -> bool {
    is_aligned(data.as_ptr() as usize, data.len(), align_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_buffer_is_aligned_and_zero() {
        for len in [1, 512, 4096, 4097, 1 << 20] {
            let buf = AlignedBuf::zeroed(len);
            assert_eq!(buf.len(), len);
            assert_eq!(buf.as_ptr() as usize % ALIGN_BYTES, 0, "len {len}");
            assert!(buf.iter().all(|&b| b == 0), "len {len}");
        }
    }

    #[test]
    fn empty_buffer_is_aligned_and_empty() {
        let buf = AlignedBuf::zeroed(0);
        assert!(buf.is_empty());
        assert_eq!(buf.as_ptr() as usize % ALIGN_BYTES, 0);
        assert_eq!(buf.into_bytes().len(), 0);
    }

    #[test]
    fn into_bytes_keeps_address_and_contents() {
        let mut buf = AlignedBuf::zeroed(8192);
        buf[100] = 7;
        let addr = buf.as_ptr() as usize;
        let bytes = buf.into_bytes();
        assert_eq!(bytes.as_ptr() as usize, addr);
        assert_eq!(bytes[100], 7);
        assert!(is_direct_aligned(&bytes, ALIGN_BYTES));
        // A slice starting inside the buffer is no longer aligned.
        assert!(!is_direct_aligned(&bytes.slice(1..4097), ALIGN_BYTES));
        assert!(is_direct_aligned(&bytes.slice(4096..8192), ALIGN_BYTES));
    }

    #[test]
    fn read_buffer_filled_through_its_pointer_becomes_an_aligned_buffer() {
        let mut rb = ReadBuf::new(8192);
        assert_eq!(rb.ptr_at(0) as usize % ALIGN_BYTES, 0);
        let src: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
        // SAFETY: both halves are written through the raw pointer before `assume_filled`.
        let buf = unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), rb.ptr_at(0), 4096);
            std::ptr::copy_nonoverlapping(src[4096..].as_ptr(), rb.ptr_at(4096), 4096);
            rb.assume_filled()
        };
        assert_eq!(&buf[..], &src[..]);
        assert_eq!(ReadBuf::new(0).len(), 0);
        drop(ReadBuf::new(100)); // dropped unfilled: freed, never read
    }

    #[test]
    fn copy_from_copies() {
        let data: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let buf = AlignedBuf::copy_from(&data);
        assert_eq!(&buf[..], &data[..]);
        assert_eq!(buf.as_ptr() as usize % ALIGN_BYTES, 0);
    }

    #[test]
    fn alignment_check_rejects_unaligned_length() {
        let buf = AlignedBuf::zeroed(4096 + 512);
        assert!(!is_direct_aligned(&buf, 4096));
        assert!(is_direct_aligned(&buf, 512));
        assert!(is_aligned(0, 0, 4096));
        assert!(!is_aligned(512, 4096, 4096));
    }
}
