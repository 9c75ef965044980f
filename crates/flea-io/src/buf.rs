//! Heap buffers aligned for `O_DIRECT`.

use std::alloc::{self, Layout};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::IoError;

/// Alignment (and capacity granularity) of [`AlignedBuf`]: 4096 bytes, which satisfies the
/// `O_DIRECT` rules of every common filesystem and block device.
pub const ALIGN: usize = 4096;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A heap buffer whose start address and capacity are multiples of [`ALIGN`], zero-initialised,
/// for `O_DIRECT` reads.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    cap: usize,
    /// Unique for the life of the process: io_uring keys its registered-buffer table on it, so a
    /// new buffer at a recycled address is never mistaken for an old one.
    id: u64,
}

// SAFETY: AlignedBuf owns its allocation exclusively (like a Box<[u8]>); the raw pointer is not
// shared with anything else, so moving it to another thread is sound.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only allow reading through `as_slice`/`as_ptr`; mutation needs
// `&mut self`, so concurrent `&AlignedBuf` access is data-race free.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocate a zeroed buffer of at least `capacity` bytes, rounded up to a multiple of
    /// [`ALIGN`] (and at least [`ALIGN`]). Allocation failure is an error, not an abort.
    pub fn new(capacity: usize) -> Result<AlignedBuf, IoError> {
        let cap = capacity
            .max(1)
            .checked_next_multiple_of(ALIGN)
            .ok_or(IoError::Alloc { size: capacity })?;
        let layout =
            Layout::from_size_align(cap, ALIGN).map_err(|_| IoError::Alloc { size: cap })?;
        // SAFETY: the layout has a non-zero size (cap >= ALIGN).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or(IoError::Alloc { size: cap })?;
        Ok(AlignedBuf {
            ptr,
            cap,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// Usable bytes (a multiple of [`ALIGN`]).
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// The whole buffer.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr points to `cap` initialised (zeroed at allocation) bytes owned by self, and
        // the shared borrow of self prevents mutation for the slice's lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.cap) }
    }

    /// The whole buffer, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice; the exclusive borrow of self makes this the only live reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.cap) }
    }

    /// Start of the buffer (aligned to [`ALIGN`]).
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Start of the buffer, for the kernel to write into.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub(crate) fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // The layout was valid at allocation, so rebuilding it cannot fail.
        if let Ok(layout) = Layout::from_size_align(self.cap, ALIGN) {
            // SAFETY: ptr was returned by alloc_zeroed with exactly this layout and is freed once.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) };
        }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("ptr", &self.ptr)
            .field("cap", &self.cap)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_and_capacity() {
        for req in [0usize, 1, 100, 4095, 4096, 4097, 1 << 20, (1 << 20) + 1] {
            let mut b = AlignedBuf::new(req).unwrap();
            assert_eq!(b.as_ptr() as usize % ALIGN, 0);
            assert_eq!(b.capacity() % ALIGN, 0);
            assert!(b.capacity() >= req.max(1));
            assert!(b.capacity() < req.max(1) + ALIGN);
            assert!(b.as_slice().iter().all(|&x| x == 0));
            let last = b.capacity() - 1;
            b.as_mut_slice()[last] = 7;
            assert_eq!(b.as_slice()[b.capacity() - 1], 7);
            assert_eq!(b.as_slice().len(), b.capacity());
        }
    }

    #[test]
    fn huge_allocation_is_an_error() {
        assert!(matches!(
            AlignedBuf::new(usize::MAX),
            Err(IoError::Alloc { .. })
        ));
        assert!(matches!(
            AlignedBuf::new(isize::MAX as usize - 10),
            Err(IoError::Alloc { .. })
        ));
    }

    #[test]
    fn ids_are_unique() {
        let a = AlignedBuf::new(1).unwrap();
        let b = AlignedBuf::new(1).unwrap();
        assert_ne!(a.id(), b.id());
    }

    fn assert_send_sync<T: Send + Sync>() {}
    #[test]
    fn send_sync() {
        assert_send_sync::<AlignedBuf>();
    }
}
