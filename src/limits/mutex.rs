//! [`RobustMutex`]: the process-shared, robust pthread mutex of a table in shared memory,
//! and the one way to take it, repairing the table when its last owner died holding it.
//!
//! Runs in the master (initialisation, reclaiming) and in workers (every check-and-update).
//! Also the lock of [`crate::shared::SharedMap`], the shared table library services use.
//! Invariants:
//! - the mutex lives in a `MAP_SHARED` region, initialised once by the process that made the
//!   region, before any other process sees it (`PTHREAD_PROCESS_SHARED`,
//!   `PTHREAD_MUTEX_ROBUST`, pthread_mutexattr_setrobust(3));
//! - a process that dies holding it hands the next locker `EOWNERDEAD` instead of a
//!   deadlock: [`RobustMutex::lock`] then runs the table's repair under the lock, marks the
//!   mutex consistent and counts the repair, before anyone sees the table. Unlocking without
//!   that would leave the mutex unusable (`ENOTRECOVERABLE`), so no other path exists;
//! - each process is single-threaded and holds the lock at most once at a time, so the view
//!   a [`Held`] carries is the only live reference into the table.

use std::cell::UnsafeCell;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::libc;

/// A robust, process-shared mutex and the count of repairs it forced. Lives in shared memory.
#[repr(C)]
pub(crate) struct RobustMutex {
    raw: UnsafeCell<libc::pthread_mutex_t>,
    /// How often a dead owner forced a repair.
    repairs: AtomicU64,
}

/// The data a [`RobustMutex`] guards, while this process holds it; unlocks on drop.
pub(crate) struct Held<'a, T> {
    data: T,
    mutex: &'a RobustMutex,
}

impl RobustMutex {
    /// Initialises the mutex at `this`.
    ///
    /// # Safety
    /// `this` points to writable memory for a `RobustMutex` (in a shared mapping) that no
    /// other process or thread uses yet.
    ///
    /// # Errors
    /// The pthread error.
    pub(crate) unsafe fn init(this: *mut RobustMutex) -> Result<(), Errno> {
        let check = |rc: i32| if rc == 0 { Ok(()) } else { Err(Errno::from_raw(rc)) };
        // SAFETY: the attribute object lives on this stack frame and is initialised before
        // use; the caller guarantees `this` is ours alone.
        unsafe {
            (&raw mut (*this).repairs).write(AtomicU64::new(0));
            let mut attr = std::mem::MaybeUninit::<libc::pthread_mutexattr_t>::uninit();
            check(libc::pthread_mutexattr_init(attr.as_mut_ptr()))?;
            let result = check(libc::pthread_mutexattr_setpshared(
                attr.as_mut_ptr(),
                libc::PTHREAD_PROCESS_SHARED,
            ))
            .and_then(|()| {
                check(libc::pthread_mutexattr_setrobust(
                    attr.as_mut_ptr(),
                    libc::PTHREAD_MUTEX_ROBUST,
                ))
            })
            .and_then(|()| {
                check(libc::pthread_mutex_init(
                    UnsafeCell::raw_get(&raw const (*this).raw),
                    attr.as_ptr(),
                ))
            });
            libc::pthread_mutexattr_destroy(attr.as_mut_ptr());
            result
        }
    }

    /// Takes the lock and returns the guarded data, made by `open` once the lock is held. If
    /// the previous owner died holding it, `repair` mends the data first (under the lock),
    /// then the mutex is marked consistent and the repair counted.
    ///
    /// # Errors
    /// The pthread error when the lock cannot be taken (nothing was opened then).
    pub(crate) fn lock<T>(
        &self,
        open: impl FnOnce() -> T,
        repair: impl FnOnce(&mut T),
    ) -> Result<Held<'_, T>, Errno> {
        // SAFETY: initialised by `init` before the region was shared; it lives as long as
        // the mapping that `self` borrows.
        let rc = unsafe { libc::pthread_mutex_lock(self.raw.get()) };
        if rc != 0 && rc != libc::EOWNERDEAD {
            return Err(Errno::from_raw(rc));
        }
        let mut held = Held { data: open(), mutex: self };
        if rc == libc::EOWNERDEAD {
            repair(&mut held.data);
            // SAFETY: EOWNERDEAD handed us the mutex, and the data is consistent again.
            unsafe { libc::pthread_mutex_consistent(self.raw.get()) };
            self.repairs.fetch_add(1, Ordering::Relaxed);
        }
        Ok(held)
    }

    /// How often a process died holding the lock and the data was repaired.
    pub(crate) fn repairs(&self) -> u64 {
        self.repairs.load(Ordering::Relaxed)
    }
}

impl<T> Deref for Held<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.data
    }
}

impl<T> DerefMut for Held<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.data
    }
}

impl<T> Drop for Held<'_, T> {
    fn drop(&mut self) {
        // SAFETY: a `Held` exists only while this process holds the mutex.
        unsafe { libc::pthread_mutex_unlock(self.mutex.raw.get()) };
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroUsize;

    use super::*;

    /// A fresh shared mapping holding one initialised mutex, leaked for the test's life.
    fn shared() -> &'static RobustMutex {
        let bytes = NonZeroUsize::new(size_of::<RobustMutex>()).unwrap();
        let base = crate::sys::map_shared_zeroed(bytes).unwrap().cast::<RobustMutex>();
        // SAFETY: a fresh zeroed mapping of the right size that nothing else uses.
        unsafe {
            RobustMutex::init(base.as_ptr()).unwrap();
            &*base.as_ptr()
        }
    }

    #[test]
    fn an_owner_that_dies_holding_the_lock_gets_the_data_repaired_once() {
        let mutex = shared();
        // Robustness is per thread: a thread that ends holding the lock is a dead owner, as
        // a process that dies holding it is.
        let address = std::ptr::from_ref(mutex) as usize;
        std::thread::spawn(move || {
            // SAFETY: the mapping is leaked, so the mutex outlives this thread.
            let mutex = unsafe { &*(address as *const RobustMutex) };
            std::mem::forget(mutex.lock(|| (), |()| {}).unwrap());
        })
        .join()
        .unwrap();
        let mut repaired = 0;
        drop(mutex.lock(|| (), |()| repaired += 1).unwrap());
        drop(mutex.lock(|| (), |()| repaired += 1).unwrap());
        assert_eq!((repaired, mutex.repairs()), (1, 1));
    }
}
