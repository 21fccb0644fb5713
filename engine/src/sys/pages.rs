//! Packet buffers on pages of their own.
//!
//! A worker holds a few hundred 64 KiB buffers, nearly all idle on a quiet
//! node. Taken from the heap (`vec![0; n]`), each is zeroed by malloc, so
//! every page of every buffer is resident from the start (measured here:
//! 16 MiB of a 29 MiB `weft wg` at rest were the heap). An anonymous
//! mapping is zero pages the kernel backs on first touch: a buffer costs
//! resident memory only for the bytes packets have been written to.

use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// A zeroed byte buffer of its own anonymous mapping.
pub struct PageBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a PageBuf owns its mapping alone, like a Box<[u8]>; nothing in it
// is tied to a thread.
unsafe impl Send for PageBuf {}
// SAFETY: shared access only reads the bytes (Deref), as for &[u8].
unsafe impl Sync for PageBuf {}

impl PageBuf {
    /// A buffer of `len` zero bytes. Like the allocator, panics when the
    /// kernel has no memory to map.
    pub fn zeroed(len: usize) -> PageBuf {
        if len == 0 {
            return PageBuf { ptr: NonNull::dangling(), len: 0 };
        }
        // SAFETY: a fresh private anonymous mapping: no address hint, no
        // file; the result is checked for MAP_FAILED below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            panic!("mapping a {len}-byte packet buffer: {}", std::io::Error::last_os_error());
        }
        PageBuf { ptr: NonNull::new(p.cast()).expect("mmap returned a null mapping"), len }
    }
}

impl Deref for PageBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is a readable mapping of len bytes (or dangling with
        // len 0) that lives as long as self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for PageBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for PageBuf {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: the mapping made in zeroed, unmapped once; no slice of
            // it outlives self.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        }
    }
}

impl std::fmt::Debug for PageBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PageBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_is_zeroed_writable_and_its_own() {
        let mut a = PageBuf::zeroed(65_600);
        let mut b = PageBuf::zeroed(65_600);
        assert_eq!(a.len(), 65_600);
        assert!(a.iter().all(|&x| x == 0));
        a[0] = 1;
        a[65_599] = 2;
        b[100] = 3;
        std::mem::swap(&mut a, &mut b);
        assert_eq!((b[0], b[65_599], a[100], a[0]), (1, 2, 3, 0));
        assert!(PageBuf::zeroed(0).is_empty());
    }

    #[test]
    fn untouched_pages_are_not_resident() {
        let rss = || {
            let s = std::fs::read_to_string("/proc/self/status").unwrap();
            let l = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap().to_string();
            l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap()
        };
        let before = rss();
        let bufs: Vec<PageBuf> = (0..256).map(|_| PageBuf::zeroed(65_600)).collect();
        let idle = rss();
        // 16 MiB mapped; other test threads allocate meanwhile, so allow 4.
        assert!(idle < before + 4096, "256 idle buffers made {} KiB resident", idle.saturating_sub(before));
        drop(bufs);
    }
}
