//! Per-client connection accounting in shared memory, exact across all workers.
//!
//! The master creates one anonymous `MAP_SHARED` region before forking; every worker inherits
//! it. It holds:
//! - a process-shared, *robust* pthread mutex (pthread_mutexattr_setrobust(3));
//! - a table of entries keyed by (listener, client IP): open and long (kept-alive) counts.
//!   Open addressing with linear probing and backward-shift deletion; sized to twice the
//!   number of records, so it can never fill up: each live entry is backed by a record;
//! - per worker slot, one record per possible connection: which key it counts and whether it
//!   is long. Records are the source of truth; entries are the index that makes checks O(1).
//!
//! Every check-and-update happens under the mutex, so a limit of N admits exactly N
//! connections whatever the number of workers. When a worker dies, the master calls
//! [`Limits::reclaim`] for its slot: its records are released, so no client stays locked out
//! by a dead worker. If a process dies *while holding* the mutex, the next locker gets
//! `EOWNERDEAD` and rebuilds every entry from the records before marking the mutex
//! consistent, so a half-done update is never seen.
//!
//! IPv4 clients are counted per address; IPv6 clients per full address (an IPv4-mapped IPv6
//! address counts as the IPv4 address).

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::mem::{align_of, size_of};
use std::net::IpAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use nix::errno::Errno;
use nix::libc;
use nix::sys::mman::{MapFlags, ProtFlags, mmap_anonymous, munmap};
use thiserror::Error;

pub mod rate;

/// The shared limits table could not be created or used.
#[derive(Debug, Error)]
pub enum LimitsError {
    /// mmap(2) of the shared region failed.
    #[error("could not map {bytes} bytes of shared memory for per-client limits: {source}")]
    Map {
        /// Region size.
        bytes: usize,
        /// The system error.
        source: Errno,
    },
    /// The region would be larger than the address space allows.
    #[error("per-client limits table for {records} connections is too large")]
    TooLarge {
        /// Requested records.
        records: usize,
    },
    /// The process-shared mutex could not be set up or taken.
    #[error("per-client limits lock failed: {0}")]
    Lock(Errno),
    /// A worker asked for more records than its slot has (a budget bug, not a client's doing).
    #[error("worker slot {0} has no free per-client record")]
    SlotFull(usize),
}

/// A client as counted: listener index and IP address.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ClientKey {
    address: [u8; 16],
    listener: u16,
    family: u8,
    _pad: u8,
}

impl ClientKey {
    /// The key of `ip` on listener number `listener` (its index in the configuration).
    pub fn new(listener: usize, ip: IpAddr) -> Self {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let (family, address) = match ip {
            IpAddr::V4(v4) => {
                let mut address = [0; 16];
                address[..4].copy_from_slice(&v4.octets());
                (4, address)
            }
            IpAddr::V6(v6) => (6, v6.octets()),
        };
        ClientKey { address, listener: listener as u16, family, _pad: 0 }
    }
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct Entry {
    key: ClientKey,
    /// Open connections; 0 marks an empty entry.
    open: u32,
    /// Of which long (kept-alive).
    long: u32,
}

const RECORD_FREE: u8 = 0;
const RECORD_HELD: u8 = 1;

#[repr(C)]
struct Record {
    key: ClientKey,
    long: u8,
    /// Written last (release) when taken, first when freed, so a record is never seen
    /// half-written by a rebuild.
    state: AtomicU8,
}

#[repr(C)]
struct Header {
    mutex: libc::pthread_mutex_t,
    /// How often a dead lock owner forced a rebuild.
    repairs: AtomicU64,
}

/// One counted connection: the record index a worker got from [`Limits::admit`].
#[derive(Debug, PartialEq, Eq)]
pub struct Ticket(u32);

/// A worker's private list of its free records. Only the worker owning the slot takes and
/// frees its records (and the master, once that worker is dead).
#[derive(Debug)]
pub struct SlotLedger {
    slot: usize,
    free: Vec<u32>,
}

impl SlotLedger {
    /// The worker slot this ledger belongs to.
    pub fn slot(&self) -> usize {
        self.slot
    }
}

/// The outcome of [`Limits::admit`].
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// Counted; give the ticket back with [`Limits::release`] when the connection closes.
    Admitted(Ticket),
    /// The client already has `open` connections on this listener, the maximum.
    Refused {
        /// Connections the client holds.
        open: u32,
    },
}

/// Handle to the shared region. Created by the master; workers use the copy `fork(2)` gave
/// them. Not `Send`/`Sync`: each process is single-threaded.
#[derive(Debug)]
pub struct Limits {
    base: NonNull<u8>,
    bytes: usize,
    entries_offset: usize,
    entries_len: usize,
    records_offset: usize,
    slots: usize,
    per_slot: usize,
    hasher: RandomState,
}

fn align_up(n: usize, align: usize) -> usize {
    n.div_ceil(align) * align
}

impl Limits {
    /// Maps and initialises a region for `slots` workers of `per_slot` connections each.
    ///
    /// # Errors
    /// [`LimitsError::Map`] when mmap(2) fails, [`LimitsError::Lock`] when the robust,
    /// process-shared mutex cannot be initialised, [`LimitsError::TooLarge`] on overflow.
    pub fn new(slots: usize, per_slot: usize) -> Result<Self, LimitsError> {
        let records = slots.checked_mul(per_slot).filter(|&n| n < u32::MAX as usize / 4);
        let records = records.ok_or(LimitsError::TooLarge { records: usize::MAX })?;
        let entries_len = (records * 2).next_power_of_two().max(16);
        let entries_offset = align_up(size_of::<Header>(), align_of::<Entry>());
        let records_offset =
            align_up(entries_offset + entries_len * size_of::<Entry>(), align_of::<Record>());
        let bytes = records_offset + records * size_of::<Record>();
        let length = NonZeroUsize::new(bytes).ok_or(LimitsError::TooLarge { records })?;
        // SAFETY: a fresh anonymous mapping, not aliasing anything; MAP_SHARED so that forked
        // workers see one region. Anonymous memory is zeroed: every entry empty, every record
        // free.
        let base = unsafe {
            mmap_anonymous(
                None,
                length,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
            )
        }
        .map_err(|source| LimitsError::Map { bytes, source })?;
        let limits = Limits {
            base: base.cast(),
            bytes,
            entries_offset,
            entries_len,
            records_offset,
            slots,
            per_slot,
            hasher: RandomState::new(),
        };
        limits.init_mutex()?;
        Ok(limits)
    }

    fn header(&self) -> *mut Header {
        self.base.as_ptr().cast()
    }

    fn init_mutex(&self) -> Result<(), LimitsError> {
        let check = |rc: i32| {
            if rc == 0 { Ok(()) } else { Err(LimitsError::Lock(Errno::from_raw(rc))) }
        };
        // SAFETY: the attribute object lives on this stack frame and is initialised before use;
        // the mutex lives in the mapping created above, which no other process sees yet.
        unsafe {
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
                check(libc::pthread_mutex_init(&raw mut (*self.header()).mutex, attr.as_ptr()))
            });
            libc::pthread_mutexattr_destroy(attr.as_mut_ptr());
            result
        }
    }

    /// Takes the lock; rebuilds the entries if the previous owner died holding it.
    fn lock(&self) -> Result<Table<'_>, LimitsError> {
        // SAFETY: the mutex was initialised in `new` and lives as long as the mapping.
        let mutex = unsafe { &raw mut (*self.header()).mutex };
        // SAFETY: as above.
        let rc = unsafe { libc::pthread_mutex_lock(mutex) };
        if rc != 0 && rc != libc::EOWNERDEAD {
            return Err(LimitsError::Lock(Errno::from_raw(rc)));
        }
        // SAFETY: we hold the process-shared mutex, which serialises every access to entries
        // and records across processes; each process is single-threaded and holds the lock at
        // most once, so these are the only live references into the table. Offsets and
        // lengths were computed in `new` to lie inside the mapping.
        let mut table = unsafe {
            Table {
                entries: std::slice::from_raw_parts_mut(
                    self.base.as_ptr().add(self.entries_offset).cast::<Entry>(),
                    self.entries_len,
                ),
                records: std::slice::from_raw_parts_mut(
                    self.base.as_ptr().add(self.records_offset).cast::<Record>(),
                    self.slots * self.per_slot,
                ),
                hasher: &self.hasher,
                mutex,
            }
        };
        if rc == libc::EOWNERDEAD {
            table.rebuild();
            // SAFETY: we own the mutex (EOWNERDEAD hands it over) and just made it consistent.
            unsafe {
                libc::pthread_mutex_consistent(mutex);
                (*self.header()).repairs.fetch_add(1, Ordering::Relaxed);
            }
            log::warn!(
                "a process died holding the per-client limits lock; counts rebuilt from records"
            );
        }
        Ok(table)
    }

    /// A ledger of all records of `slot`, for the worker that runs in it.
    ///
    /// # Panics
    /// If `slot` is out of range (a caller bug).
    pub fn ledger(&self, slot: usize) -> SlotLedger {
        assert!(slot < self.slots, "worker slot {slot} out of range");
        let first = (slot * self.per_slot) as u32;
        let free = (first..first + self.per_slot as u32).rev().collect();
        SlotLedger { slot, free }
    }

    /// Counts a new connection of `key` unless the client already has `max` open ones
    /// (`None`: no limit, only counted).
    ///
    /// # Errors
    /// [`LimitsError::Lock`] if the lock fails, [`LimitsError::SlotFull`] if the ledger has no
    /// free record. Callers refuse the connection then (fail closed).
    pub fn admit(
        &self,
        ledger: &mut SlotLedger,
        key: ClientKey,
        max: Option<NonZeroU32>,
    ) -> Result<Admission, LimitsError> {
        let record = *ledger.free.last().ok_or(LimitsError::SlotFull(ledger.slot))?;
        let mut table = self.lock()?;
        let open = table.open(&key).0;
        if max.is_some_and(|max| open >= max.get()) {
            return Ok(Admission::Refused { open });
        }
        table.increment(key, false);
        let slot = &mut table.records[record as usize];
        slot.key = key;
        slot.long = 0;
        slot.state.store(RECORD_HELD, Ordering::Release);
        ledger.free.pop();
        Ok(Admission::Admitted(Ticket(record)))
    }

    /// Makes the ticket's connection long (kept-alive) unless its client already has
    /// `max_long` long ones (`None`: no limit). Returns whether it is long now.
    ///
    /// # Errors
    /// [`LimitsError::Lock`]; callers close the connection then.
    pub fn promote(
        &self,
        ticket: &Ticket,
        max_long: Option<NonZeroU32>,
    ) -> Result<bool, LimitsError> {
        let mut table = self.lock()?;
        let record = &table.records[ticket.0 as usize];
        if record.long != 0 {
            return Ok(true);
        }
        let key = record.key;
        let long = table.open(&key).1;
        if max_long.is_some_and(|max| long >= max.get()) {
            return Ok(false);
        }
        table.records[ticket.0 as usize].long = 1;
        table.increment(key, true);
        Ok(true)
    }

    /// Stops counting the ticket's connection.
    ///
    /// # Errors
    /// [`LimitsError::Lock`]. The record stays held then, and is reclaimed when the worker
    /// exits.
    pub fn release(&self, ledger: &mut SlotLedger, ticket: Ticket) -> Result<(), LimitsError> {
        let mut table = self.lock()?;
        table.free_record(ticket.0 as usize);
        ledger.free.push(ticket.0);
        Ok(())
    }

    /// Releases every record of a dead worker's `slot`; returns how many were held. Called by
    /// the master after `waitpid(2)` reported the worker gone, before the slot is reused.
    ///
    /// # Errors
    /// [`LimitsError::Lock`].
    pub fn reclaim(&self, slot: usize) -> Result<usize, LimitsError> {
        let mut table = self.lock()?;
        let first = slot * self.per_slot;
        let mut held = 0;
        for index in first..first + self.per_slot {
            if table.records[index].state.load(Ordering::Acquire) == RECORD_HELD {
                table.free_record(index);
                held += 1;
            }
        }
        Ok(held)
    }

    /// Open and long connections of `key` right now, across all workers.
    ///
    /// # Errors
    /// [`LimitsError::Lock`].
    pub fn counts(&self, key: ClientKey) -> Result<(u32, u32), LimitsError> {
        Ok(self.lock()?.open(&key))
    }

    /// How often a process died holding the lock and the table was rebuilt.
    pub fn repairs(&self) -> u64 {
        // SAFETY: the header lives as long as the mapping; the field is atomic.
        unsafe { (*self.header()).repairs.load(Ordering::Relaxed) }
    }
}

impl Drop for Limits {
    fn drop(&mut self) {
        // SAFETY: the mapping was created in `new` with this size and nothing borrows it past
        // `self` (tables borrow `self`).
        let _ = unsafe { munmap(self.base.cast(), self.bytes) };
    }
}

/// The table while the lock is held; unlocks on drop.
struct Table<'a> {
    entries: &'a mut [Entry],
    records: &'a mut [Record],
    hasher: &'a RandomState,
    mutex: *mut libc::pthread_mutex_t,
}

impl Drop for Table<'_> {
    fn drop(&mut self) {
        // SAFETY: this table exists only while this process holds the mutex.
        unsafe { libc::pthread_mutex_unlock(self.mutex) };
    }
}

impl Table<'_> {
    fn mask(&self) -> usize {
        self.entries.len() - 1
    }

    fn home(&self, key: &ClientKey) -> usize {
        self.hasher.hash_one(key) as usize & self.mask()
    }

    /// `Ok(index)` of the key's entry, or `Err(index)` of the empty entry where it would go.
    /// Terminates: the table is never full (entries > records >= live keys).
    fn find(&self, key: &ClientKey) -> Result<usize, usize> {
        let mut index = self.home(key);
        loop {
            let entry = &self.entries[index];
            if entry.open == 0 {
                return Err(index);
            }
            if entry.key == *key {
                return Ok(index);
            }
            index = (index + 1) & self.mask();
        }
    }

    fn open(&self, key: &ClientKey) -> (u32, u32) {
        self.find(key).map_or((0, 0), |i| (self.entries[i].open, self.entries[i].long))
    }

    /// Adds one open connection (`long == false`) or turns one into a long one.
    fn increment(&mut self, key: ClientKey, long: bool) {
        let index = match self.find(&key) {
            Ok(index) => index,
            Err(empty) => {
                self.entries[empty] = Entry { key, open: 0, long: 0 };
                empty
            }
        };
        let entry = &mut self.entries[index];
        if long {
            entry.long += 1;
        } else {
            entry.open += 1;
        }
    }

    fn free_record(&mut self, index: usize) {
        let record = &self.records[index];
        if record.state.load(Ordering::Acquire) != RECORD_HELD {
            return;
        }
        let (key, long) = (record.key, record.long != 0);
        record.state.store(RECORD_FREE, Ordering::Release);
        if let Ok(entry) = self.find(&key) {
            let e = &mut self.entries[entry];
            e.open = e.open.saturating_sub(1);
            if long {
                e.long = e.long.saturating_sub(1);
            }
            if e.open == 0 {
                self.remove_at(entry);
            }
        }
    }

    /// Backward-shift deletion: no tombstones, so probe chains never grow with churn.
    fn remove_at(&mut self, mut hole: usize) {
        let mask = self.mask();
        let mut next = (hole + 1) & mask;
        while self.entries[next].open != 0 {
            let home = self.home(&self.entries[next].key);
            // Move `next` back into the hole unless its home lies after the hole.
            if (next.wrapping_sub(home) & mask) >= (next.wrapping_sub(hole) & mask) {
                self.entries[hole] = self.entries[next];
                hole = next;
            }
            next = (next + 1) & mask;
        }
        self.entries[hole] = Entry::default();
    }

    /// Recomputes every entry from the held records.
    fn rebuild(&mut self) {
        self.entries.fill(Entry::default());
        for index in 0..self.records.len() {
            let record = &self.records[index];
            if record.state.load(Ordering::Acquire) == RECORD_HELD {
                let (key, long) = (record.key, record.long != 0);
                self.increment(key, false);
                if long {
                    self.increment(key, true);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
