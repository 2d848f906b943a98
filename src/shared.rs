//! [`SharedMap`]: a fixed-size hash map of byte strings in shared memory, which every worker
//! of a daemon reads and writes as one, for a library service whose state must not be per
//! worker (a cache, a session table, counters, the `kv` example's keys).
//!
//! Runs wherever it is made and in every process forked afterwards. Make it in the process
//! that becomes the master, before the workers are forked: in the service's build function
//! (kept across reloads, see `examples/kv.rs`) or before [`crate::Daemon::main`]. A worker
//! that makes one has a map of its own. Invariants:
//! - one anonymous `MAP_SHARED` region holds a robust, process-shared mutex (the one the
//!   per-client limits use: a process that dies holding it cannot deadlock the others), a
//!   journal word, and a table of fixed-size entries; every operation happens under the
//!   mutex, so each is atomic across workers;
//! - an entry lives in one of [`PROBE`] places from its key's home (SipHash with keys picked
//!   when the map is made, so clients cannot aim keys at one neighbourhood); the table has
//!   at least twice as many places as the map's capacity, so a neighbourhood is full before
//!   the map is only when many keys share it;
//! - an operation that writes an entry names it in the journal first and clears it after: if
//!   its process dies meanwhile, the next locker removes that entry (its value may be torn;
//!   a write that never returned is lost with the key's older value), recounts the entries,
//!   and counts the repair ([`SharedMap::repairs`]). No other entry is ever touched by a
//!   write, so nothing else can be torn.
//!
//! Not persistent: the map lives as long as the processes that map it. A binary upgrade
//! starts a new master, with a new map; a restart loses it.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::mem::size_of;
use std::num::NonZeroUsize;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::sys::mman::munmap;
use thiserror::Error;

use crate::limits::RobustMutex;

/// Places looked at from a key's home: its entry is in one of them.
pub const PROBE: usize = 32;

/// Longest key or value a map may be made for, in bytes (16 MiB).
pub const MAX_ITEM: usize = 16 << 20;

/// Bytes of an entry's fixed part: hash (8), state (4), key length (4), value length (4),
/// padding (4).
const ENTRY_HEAD: usize = 24;

const EMPTY: u32 = 0;
const FULL: u32 = 1;

/// A [`SharedMap`] could not be made or used.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum SharedError {
    /// mmap(2) of the region failed.
    #[error("could not map {bytes} bytes of shared memory: {source}")]
    Map {
        /// Region size.
        bytes: usize,
        /// The system error.
        source: Errno,
    },
    /// The geometry asked for is too large (keys or values over [`MAX_ITEM`], or a size
    /// computation overflows).
    #[error("a shared map of {capacity} entries of {entry} bytes is too large")]
    TooLarge {
        /// Entries asked for.
        capacity: usize,
        /// Bytes of one entry (`usize::MAX` when that overflows).
        entry: usize,
    },
    /// The process-shared mutex could not be set up or taken.
    #[error("shared map lock failed: {0}")]
    Lock(Errno),
    /// A key longer than the map was made for.
    #[error("key of {len} bytes, over the map's {max}")]
    KeyTooLong {
        /// The key's length.
        len: usize,
        /// The map's longest key.
        max: usize,
    },
    /// A value longer than the map was made for.
    #[error("value of {len} bytes, over the map's {max}")]
    ValueTooLong {
        /// The value's length.
        len: usize,
        /// The map's longest value.
        max: usize,
    },
    /// The map holds its capacity of entries already, or every place near the key's home is
    /// taken.
    #[error("the shared map is full ({capacity} entries)")]
    Full {
        /// The map's capacity.
        capacity: usize,
    },
}

/// What [`SharedMap::update`] does to the entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// Leave it as it is (or absent).
    Keep,
    /// Give it this value (inserting it if absent).
    Set(Vec<u8>),
    /// Remove it.
    Remove,
}

#[repr(C)]
struct Header {
    mutex: RobustMutex,
    /// The place being written plus one; 0 when none.
    journal: AtomicU64,
    /// Entries in the table.
    len: AtomicU64,
}

/// A fixed-size hash map of byte strings in shared memory (see the module documentation).
/// Not `Send`/`Sync`: each process of the daemon is single-threaded; share it between the
/// service and its sessions with `Rc` or `Arc`.
#[derive(Debug)]
pub struct SharedMap {
    base: NonNull<u8>,
    bytes: usize,
    table_offset: usize,
    /// Places in the table: a power of two, at least twice the capacity.
    places: usize,
    entry: usize,
    capacity: usize,
    max_key: usize,
    max_value: usize,
    hasher: RandomState,
}

impl SharedMap {
    /// Maps a map of at most `capacity` entries, each with a key of at most `max_key` bytes
    /// and a value of at most `max_value` bytes. Its memory is reserved at once (about
    /// `2 x capacity x (24 + max_key + max_value)` bytes, rounded up) and used as entries
    /// are first written.
    ///
    /// # Errors
    /// [`SharedError::TooLarge`] for a geometry over [`MAX_ITEM`] or one that overflows;
    /// [`SharedError::Map`] when mmap(2) fails (`ENOMEM`); [`SharedError::Lock`] when the
    /// mutex cannot be set up.
    pub fn new(
        capacity: NonZeroUsize,
        max_key: usize,
        max_value: usize,
    ) -> Result<SharedMap, SharedError> {
        let capacity = capacity.get();
        let entry = (max_key <= MAX_ITEM && max_value <= MAX_ITEM)
            .then(|| (ENTRY_HEAD + max_key + max_value).next_multiple_of(8))
            .ok_or(SharedError::TooLarge { capacity, entry: usize::MAX })?;
        let too_large = SharedError::TooLarge { capacity, entry };
        let places = capacity
            .checked_mul(2)
            .and_then(usize::checked_next_power_of_two)
            .ok_or(too_large.clone())?;
        let table_offset = size_of::<Header>().next_multiple_of(8);
        let bytes = places
            .checked_mul(entry)
            .and_then(|table| table.checked_add(table_offset))
            .filter(|&bytes| isize::try_from(bytes).is_ok())
            .ok_or(too_large)?;
        let length = NonZeroUsize::new(bytes).expect("the header has a size");
        // Zeroed: every place empty, the journal clear.
        let base = crate::sys::map_shared_zeroed(length)
            .map_err(|source| SharedError::Map { bytes, source })?;
        let map = SharedMap {
            base: base.cast(),
            bytes,
            table_offset,
            places,
            entry,
            capacity,
            max_key,
            max_value,
            hasher: RandomState::new(),
        };
        // SAFETY: the header is at the start of the fresh mapping, which no other process
        // sees yet.
        unsafe { RobustMutex::init(&raw mut (*map.header()).mutex) }.map_err(SharedError::Lock)?;
        Ok(map)
    }

    fn header(&self) -> *mut Header {
        self.base.as_ptr().cast()
    }

    /// Entries it holds at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Longest key, in bytes.
    pub fn max_key(&self) -> usize {
        self.max_key
    }

    /// Longest value, in bytes.
    pub fn max_value(&self) -> usize {
        self.max_value
    }

    /// Entries it holds now (as last written by any process).
    pub fn len(&self) -> usize {
        // SAFETY: initialised in `new`; lives as long as the mapping `self` owns.
        let len = unsafe { &(*self.header()).len };
        usize::try_from(len.load(Ordering::Relaxed)).unwrap_or(usize::MAX)
    }

    /// Whether it holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How often a process died in the middle of a write and the next one repaired the map.
    pub fn repairs(&self) -> u64 {
        // SAFETY: as in `len`.
        unsafe { &(*self.header()).mutex }.repairs()
    }

    /// Calls `read` with the value of `key`, under the lock; `None` when absent. Keep `read`
    /// short (copy the value out): every worker waits for the lock meanwhile.
    ///
    /// # Errors
    /// [`SharedError::Lock`]; [`SharedError::KeyTooLong`] (no such key can be there).
    pub fn get<R>(
        &self,
        key: &[u8],
        read: impl FnOnce(&[u8]) -> R,
    ) -> Result<Option<R>, SharedError> {
        self.check_key(key)?;
        let hash = self.hasher.hash_one(key);
        let table = self.lock()?;
        Ok(table.find(hash, key).map(|place| read(table.value(place))))
    }

    /// Sets `key` to `value`, inserting it if absent.
    ///
    /// # Errors
    /// [`SharedError::Lock`], [`SharedError::KeyTooLong`], [`SharedError::ValueTooLong`],
    /// [`SharedError::Full`] (nothing changed then).
    pub fn insert(&self, key: &[u8], value: &[u8]) -> Result<(), SharedError> {
        self.update(key, |_| (Update::Set(value.to_vec()), ()))
    }

    /// Removes `key`; whether it was there.
    ///
    /// # Errors
    /// [`SharedError::Lock`]; [`SharedError::KeyTooLong`] (no such key can be there).
    pub fn remove(&self, key: &[u8]) -> Result<bool, SharedError> {
        self.update(key, |old| (Update::Remove, old.is_some()))
    }

    /// Reads and changes `key` in one step, under the lock (no other process sees it in
    /// between: an increment, a compare-and-set): `change` gets the value (`None` if
    /// absent) and says what to do, and what to return. Keep it short and do no I/O in it.
    ///
    /// # Errors
    /// [`SharedError::Lock`], [`SharedError::KeyTooLong`]; for [`Update::Set`],
    /// [`SharedError::ValueTooLong`] or [`SharedError::Full`] (nothing changed then, and
    /// what `change` returned is dropped).
    pub fn update<R>(
        &self,
        key: &[u8],
        change: impl FnOnce(Option<&[u8]>) -> (Update, R),
    ) -> Result<R, SharedError> {
        self.check_key(key)?;
        let hash = self.hasher.hash_one(key);
        let mut table = self.lock()?;
        let found = table.find(hash, key);
        let (update, result) = change(found.map(|place| table.value(place)));
        match (update, found) {
            (Update::Keep, _) | (Update::Remove, None) => {}
            (Update::Remove, Some(place)) => table.clear(place),
            (Update::Set(value), found) => {
                if value.len() > self.max_value {
                    return Err(SharedError::ValueTooLong {
                        len: value.len(),
                        max: self.max_value,
                    });
                }
                let place = match found {
                    Some(place) => place,
                    None if table.len() >= self.capacity => {
                        return Err(SharedError::Full { capacity: self.capacity });
                    }
                    None => table
                        .free_place(hash)
                        .ok_or(SharedError::Full { capacity: self.capacity })?,
                };
                table.write(place, hash, key, &value);
            }
        }
        Ok(result)
    }

    fn check_key(&self, key: &[u8]) -> Result<(), SharedError> {
        if key.len() > self.max_key {
            return Err(SharedError::KeyTooLong { len: key.len(), max: self.max_key });
        }
        Ok(())
    }

    /// Takes the lock; repairs the table first if a process died in the middle of a write.
    fn lock(&self) -> Result<crate::limits::Held<'_, Table<'_>>, SharedError> {
        // SAFETY: initialised in `new`; lives as long as the mapping `self` owns.
        let header = unsafe { &*self.header() };
        // SAFETY (of the view): we hold the process-shared mutex, which serialises every
        // access to the table; each process is single-threaded, so this is the only live
        // reference. The offset and length lie inside the mapping (computed in `new`), and
        // every byte is read as an integer or as bytes: any content is a value, and lengths
        // read from it are bounded before use.
        let open = || Table {
            bytes: unsafe {
                std::slice::from_raw_parts_mut(
                    self.base.as_ptr().add(self.table_offset),
                    self.places * self.entry,
                )
            },
            places: self.places,
            entry: self.entry,
            max_key: self.max_key,
            max_value: self.max_value,
            journal: &header.journal,
            len: &header.len,
        };
        let repair = |table: &mut Table<'_>| table.repair();
        header.mutex.lock(open, repair).map_err(SharedError::Lock)
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: the mapping was created in `new` with this size; nothing borrows it past
        // `self` (a `Table` borrows `self`).
        let _ = unsafe { munmap(self.base.cast(), self.bytes) };
    }
}

/// The table, while this process holds the lock.
struct Table<'a> {
    bytes: &'a mut [u8],
    places: usize,
    entry: usize,
    max_key: usize,
    max_value: usize,
    journal: &'a AtomicU64,
    len: &'a AtomicU64,
}

impl Table<'_> {
    fn at(&self, place: usize, offset: usize, n: usize) -> &[u8] {
        let start = place * self.entry + offset;
        &self.bytes[start..start + n]
    }

    fn u32_at(&self, place: usize, offset: usize) -> u32 {
        u32::from_ne_bytes(self.at(place, offset, 4).try_into().expect("4 bytes"))
    }

    fn put(&mut self, place: usize, offset: usize, data: &[u8]) {
        let start = place * self.entry + offset;
        self.bytes[start..start + data.len()].copy_from_slice(data);
    }

    fn hash(&self, place: usize) -> u64 {
        u64::from_ne_bytes(self.at(place, 0, 8).try_into().expect("8 bytes"))
    }

    fn is_full(&self, place: usize) -> bool {
        self.u32_at(place, 8) == FULL
    }

    fn key(&self, place: usize) -> &[u8] {
        let len = (self.u32_at(place, 12) as usize).min(self.max_key);
        self.at(place, ENTRY_HEAD, len)
    }

    fn value(&self, place: usize) -> &[u8] {
        let len = (self.u32_at(place, 16) as usize).min(self.max_value);
        self.at(place, ENTRY_HEAD + self.max_key, len)
    }

    fn len(&self) -> usize {
        usize::try_from(self.len.load(Ordering::Relaxed)).unwrap_or(usize::MAX)
    }

    /// The places of `hash`'s neighbourhood, from its home.
    fn neighbourhood(&self, hash: u64) -> impl Iterator<Item = usize> + use<> {
        let (home, mask) = (hash as usize & (self.places - 1), self.places - 1);
        (0..PROBE.min(self.places)).map(move |i| (home + i) & mask)
    }

    fn find(&self, hash: u64, key: &[u8]) -> Option<usize> {
        self.neighbourhood(hash).find(|&place| {
            self.is_full(place) && self.hash(place) == hash && self.key(place) == key
        })
    }

    fn free_place(&self, hash: u64) -> Option<usize> {
        self.neighbourhood(hash).find(|&place| !self.is_full(place))
    }

    /// Writes an entry at `place` (new or not), journalled.
    fn write(&mut self, place: usize, hash: u64, key: &[u8], value: &[u8]) {
        let new = !self.is_full(place);
        self.journal.store(place as u64 + 1, Ordering::Relaxed);
        self.put(place, 0, &hash.to_ne_bytes());
        self.put(place, 12, &(key.len() as u32).to_ne_bytes());
        self.put(place, 16, &(value.len() as u32).to_ne_bytes());
        self.put(place, ENTRY_HEAD, key);
        let value_at = ENTRY_HEAD + self.max_key;
        self.put(place, value_at, value);
        self.put(place, 8, &FULL.to_ne_bytes());
        if new {
            self.len.fetch_add(1, Ordering::Relaxed);
        }
        self.journal.store(0, Ordering::Relaxed);
    }

    /// Removes the entry at `place`: one word, so never torn.
    fn clear(&mut self, place: usize) {
        self.put(place, 8, &EMPTY.to_ne_bytes());
        self.len.fetch_sub(1, Ordering::Relaxed);
    }

    /// After a process died holding the lock: the entry it was writing goes, and the count
    /// is made again from the table.
    fn repair(&mut self) {
        let journal = self.journal.swap(0, Ordering::Relaxed);
        if let Some(place) = usize::try_from(journal).ok().and_then(|j| j.checked_sub(1))
            && place < self.places
        {
            self.put(place, 8, &EMPTY.to_ne_bytes());
        }
        let len = (0..self.places).filter(|&place| self.is_full(place)).count();
        self.len.store(len as u64, Ordering::Relaxed);
        log::warn!("a process died writing to a shared map: the entry it wrote was removed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(capacity: usize) -> SharedMap {
        SharedMap::new(NonZeroUsize::new(capacity).unwrap(), 8, 16).unwrap()
    }

    fn get(map: &SharedMap, key: &[u8]) -> Option<Vec<u8>> {
        map.get(key, <[u8]>::to_vec).unwrap()
    }

    #[test]
    fn entries_are_set_read_changed_and_removed() {
        let map = map(4);
        assert_eq!((map.capacity(), map.max_key(), map.max_value()), (4, 8, 16));
        assert!(map.is_empty());
        assert_eq!(get(&map, b"a"), None);
        map.insert(b"a", b"1").unwrap();
        map.insert(b"", b"empty key").unwrap();
        assert_eq!(get(&map, b"a").as_deref(), Some(&b"1"[..]));
        assert_eq!(get(&map, b"").as_deref(), Some(&b"empty key"[..]));
        map.insert(b"a", b"").unwrap();
        assert_eq!(get(&map, b"a").as_deref(), Some(&b""[..]), "an empty value is a value");
        assert_eq!(map.len(), 2);
        let old = map.update(b"n", |old| (Update::Set(b"7".to_vec()), old.map(<[u8]>::to_vec)));
        assert_eq!(old, Ok(None));
        let doubled = map.update(b"n", |old| {
            let n: u64 = std::str::from_utf8(old.unwrap()).unwrap().parse().unwrap();
            (Update::Set((n * 2).to_string().into_bytes()), n * 2)
        });
        assert_eq!(doubled, Ok(14));
        assert_eq!(map.update(b"n", |_| (Update::Keep, ())), Ok(()));
        assert_eq!(get(&map, b"n").as_deref(), Some(&b"14"[..]));
        assert_eq!(map.remove(b"a"), Ok(true));
        assert_eq!(map.remove(b"a"), Ok(false));
        assert_eq!(map.len(), 2);
    }

    #[test]
    fn limits_are_errors_that_change_nothing() {
        let map = map(2);
        assert_eq!(map.insert(b"123456789", b""), Err(SharedError::KeyTooLong { len: 9, max: 8 }));
        let long = [0u8; 17];
        assert_eq!(map.insert(b"k", &long), Err(SharedError::ValueTooLong { len: 17, max: 16 }));
        map.insert(b"x", b"1").unwrap();
        map.insert(b"y", b"2").unwrap();
        assert_eq!(map.insert(b"z", b"3"), Err(SharedError::Full { capacity: 2 }));
        map.insert(b"x", b"replaced").unwrap();
        assert_eq!(map.len(), 2, "replacing is not adding");
        assert_eq!(get(&map, b"z"), None);
        assert!(SharedMap::new(NonZeroUsize::MIN, MAX_ITEM + 1, 0).is_err());
        let huge = SharedMap::new(NonZeroUsize::new(usize::MAX / 2).unwrap(), 8, 8);
        assert!(matches!(huge, Err(SharedError::TooLarge { .. })));
    }

    #[test]
    fn a_child_process_sees_and_changes_the_same_entries() {
        let map = map(64);
        map.insert(b"before", b"fork").unwrap();
        // SAFETY: the child only uses the map and exits with _exit, touching nothing else of
        // the test harness (which may have other threads).
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let seen = map.get(b"before", |v| v == b"fork").unwrap() == Some(true);
                let wrote = map.insert(b"child", b"was here").is_ok();
                // SAFETY: ends the child at once, as fork(2) children of a threaded process
                // must.
                unsafe { nix::libc::_exit(if seen && wrote { 0 } else { 1 }) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0));
            }
        }
        assert_eq!(get(&map, b"child").as_deref(), Some(&b"was here"[..]));
        assert_eq!(map.len(), 2);
    }

    #[test]
    fn a_writer_that_dies_holding_the_lock_loses_its_entry_and_nothing_else() {
        let map = map(8);
        map.insert(b"kept", b"1").unwrap();
        map.insert(b"torn", b"2").unwrap();
        // A write cut short: the journal names the entry, and the lock's owner is gone
        // (robustness is per thread, so a thread ending with the lock is a dead owner).
        let address = std::ptr::from_ref(&map) as usize;
        std::thread::spawn(move || {
            // SAFETY: the map outlives this thread, which the test joins at once.
            let map = unsafe { &*(address as *const SharedMap) };
            let mut table = map.lock().unwrap();
            let hash = map.hasher.hash_one(b"torn");
            let place = table.find(hash, b"torn").unwrap();
            table.journal.store(place as u64 + 1, Ordering::Relaxed);
            let value_at = ENTRY_HEAD + table.max_key;
            table.put(place, value_at, b"half");
            std::mem::forget(table);
        })
        .join()
        .unwrap();
        assert_eq!(get(&map, b"torn"), None, "the entry being written is gone");
        assert_eq!(get(&map, b"kept").as_deref(), Some(&b"1"[..]));
        assert_eq!((map.len(), map.repairs()), (1, 1));
        map.insert(b"torn", b"again").unwrap();
        assert_eq!(map.len(), 2);
    }
}
