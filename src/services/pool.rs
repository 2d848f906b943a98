//! A per-process pool of I/O buffers, so that request/response traffic allocates nothing in
//! steady state and an idle connection holds no buffer at all.
//!
//! Workers are single-threaded: the pool is thread-local and needs no lock. At most
//! [`MAX_POOLED`] free buffers are kept; more are freed.

use std::cell::RefCell;

/// Bytes per pooled buffer.
pub const BUFFER_SIZE: usize = 16 * 1024;

/// Free buffers kept for reuse at most.
pub const MAX_POOLED: usize = 256;

thread_local! {
    static FREE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer of [`BUFFER_SIZE`] bytes (contents unspecified).
pub fn take() -> Vec<u8> {
    FREE.with(|free| free.borrow_mut().pop()).unwrap_or_else(|| vec![0; BUFFER_SIZE])
}

/// Returns a buffer from [`take`] for reuse.
pub fn give(buffer: Vec<u8>) {
    if buffer.len() == BUFFER_SIZE {
        FREE.with(|free| {
            let mut free = free.borrow_mut();
            if free.len() < MAX_POOLED {
                free.push(buffer);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused() {
        let first = take();
        let address = first.as_ptr();
        give(first);
        let again = take();
        assert_eq!(again.as_ptr(), address, "the same allocation comes back");
        assert_eq!(again.len(), BUFFER_SIZE);
        let before = FREE.with(|free| free.borrow().len());
        give(vec![0; 3]); // wrong size: dropped, not pooled
        assert_eq!(FREE.with(|free| free.borrow().len()), before);
    }
}
