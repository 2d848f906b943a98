//! Per-client connection accounting in shared memory, exact across all workers.
//!
//! The master creates one `MAP_SHARED` region (a sealed memfd, see `region.rs`) before
//! forking; every worker inherits it. It holds:
//! - a header: magic, layout version and lengths, the hash keys;
//! - a process-shared, *robust* pthread mutex (`mutex.rs`, the lock-and-repair path both
//!   shared tables use);
//! - a table of entries keyed by (listener, client key): open and long (kept-alive) counts,
//!   and one entry per listener with its open connections (`max_connections`). Open
//!   addressing with linear probing and backward-shift deletion; sized to four times the
//!   number of records, so it can never fill up: each live entry is backed by a record, and
//!   a record backs at most two (its client's and its listener's);
//! - [`RANGES`] ranges of records, one per master that may run at once; in its range, per
//!   worker slot, one record per possible connection, and one spare: which key it
//!   counts and whether it is long. (A full worker admits a new client before it sheds an
//!   older one for it: the spare holds the newcomer's count meanwhile.) Records are the source of truth; entries are the index that makes checks O(1);
//! - a table of token buckets keyed by client key, for `max_connection_rate_per_client` (the
//!   table of `buckets.rs`, as for datagram rates). A bucket outlives the
//!   client's connections (a client that connects and closes at once still spends its
//!   tokens). Each key lives in one of [`BUCKET_PROBE`] places from its home; a bucket that
//!   has refilled to its burst is the same as no bucket and may be taken by another key;
//!   when all places hold partly spent buckets, the fullest one is taken (that client gets a
//!   fresh burst: under a flood of distinct keys the rate is approximate, never a refusal of
//!   a client that has not connected).
//!
//! Every check-and-update happens under the mutex, so a limit of N admits exactly N
//! connections whatever the number of workers, and a rate of N per second admits exactly
//! the burst, then N per second. When a worker dies, the master calls
//! [`Limits::reclaim`] for its slot: its records are released, so no client stays locked out
//! by a dead worker. If a process dies *while holding* the mutex, the next locker gets
//! `EOWNERDEAD` and rebuilds every entry from the records before marking the mutex
//! consistent, so a half-done update is never seen.
//!
//! Hand-off (`transfer`): a connection handed from one worker to another keeps its count.
//! Records stay the truth, and whoever holds a connection's record owns the connection: the
//! receiving worker moves the record from the sender's slot into one of its own, under the
//! mutex, in one step (the entries do not change, unless the listener's id did). Each
//! admission tags its record with a number never used before, so a record that was reclaimed
//! and taken again by a new connection is never mistaken for the one offered. If the
//! receiver dies before the move, the sender still holds the record and keeps the
//! connection; if it dies after, its slot is reclaimed with the record; if the sender dies
//! first, its slot is reclaimed and the move finds nothing to take: no count is ever held
//! twice or leaked.
//!
//! Binary upgrade ([`Limits::adopt`]): the old master passes the memfd to the new one, which
//! checks the layout before trusting anything in it and counts in the other range, so both
//! masters' workers share one table and a limit of N admits N across both. Each process that
//! counts in a range holds a record lock on it; when the other master and all its workers
//! are gone (no lock left), the survivor releases what that range still holds
//! ([`Limits::reclaim_other`]). Entries are keyed by a keyed SipHash whose keys are in the
//! header, so both masters find the same entries.
//!
//! A client is its address reduced to a prefix ([`ClientKey::with_prefix`]), as long as the
//! listener's `client_ipv4_prefix` and `client_ipv6_prefix` say (an IPv6 /64 by default, the
//! block one host or one customer usually gets, RFC 6177); an IPv4-mapped IPv6 address
//! counts as the IPv4 address.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::mem::{align_of, size_of};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::num::{NonZeroU32, NonZeroUsize};
use std::os::fd::{OwnedFd, RawFd};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use nix::errno::Errno;

use siphasher::sip::SipHasher13;
use thiserror::Error;

use crate::rate::Rate;

mod buckets;
mod datagram_rates;
mod mutex;
mod region;

use buckets::Place;
pub use buckets::Verdict;
pub use datagram_rates::DatagramRates;
pub(crate) use mutex::{Held, RobustMutex};
use region::Mapping;
pub use region::{AdoptError, RANGES};

/// Most records (connections of all worker slots together) one master counts in:
/// 4,194,304. The region holds [`RANGES`] such ranges (one per master during a binary
/// upgrade), about 800 MiB of shared memory at most, of which only what is touched is used. The configuration check refuses a
/// configuration that needs more (see `config::worker_slots`).
pub const MAX_RECORDS: usize = 1 << 22;

/// The shared limits table could not be created or used.
#[derive(Debug, Error)]
pub enum LimitsError {
    /// memfd_create(2), ftruncate(2), sealing or mmap(2) of the shared region failed.
    #[error("could not map {bytes} bytes of shared memory for per-client limits: {source}")]
    Map {
        /// Region size.
        bytes: usize,
        /// The system error.
        source: Errno,
    },
    /// More than [`MAX_RECORDS`] records: `slots` x `per_slot`.
    #[error(
        "per-client limits table for {slots} worker slots of {per_slot} connections is too large: at most {MAX_RECORDS} connections in all"
    )]
    TooLarge {
        /// Worker slots asked for.
        slots: usize,
        /// Connections per slot asked for.
        per_slot: usize,
    },
    /// The process-shared mutex could not be set up or taken.
    #[error("per-client limits lock failed: {0}")]
    Lock(Errno),
    /// A worker asked for more records than its slot has (a budget bug, not a client's doing).
    #[error("worker slot {0} has no free per-client record")]
    SlotFull(usize),
    /// Whether another master's processes still use their range could not be told.
    #[error("per-client limits: could not probe the other master's slot range: {0}")]
    Probe(Errno),
}

/// [`ClientKey`]'s family of a Unix client, keyed by user id.
const FAMILY_UID: u8 = 1;

/// A client as counted: listener id and the client's address reduced to its prefix, or a
/// Unix client's user id.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ClientKey {
    address: [u8; 16],
    listener: u16,
    /// 4 or 6 for an IP client, [`FAMILY_UID`] for a Unix client's user id; 0 for a whole
    /// listener's key.
    family: u8,
    /// Prefix length the address was reduced to.
    prefix: u8,
}

/// Plain IPv4 for an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), unchanged otherwise.
pub fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl ClientKey {
    /// The key of `ip` on listener `listener` (its stable id), the address kept whole: the
    /// same as [`ClientKey::with_prefix`] with prefixes 32 and 128.
    pub fn new(listener: usize, ip: IpAddr) -> Self {
        ClientKey::with_prefix(listener, ip, 32, 128)
    }

    /// The key of `ip` on listener `listener`: an IPv4 address (or IPv4-mapped IPv6 address)
    /// reduced to its first `v4_prefix` bits, an IPv6 address to its first `v6_prefix` bits.
    /// Prefixes beyond the address size (32, 128) are taken as the size.
    pub fn with_prefix(listener: usize, ip: IpAddr, v4_prefix: u8, v6_prefix: u8) -> Self {
        let net = match unmap(ip) {
            IpAddr::V4(v4) => {
                IpNet::V4(Ipv4Net::new(v4, v4_prefix.min(32)).expect("prefix within 32").trunc())
            }
            IpAddr::V6(v6) => {
                IpNet::V6(Ipv6Net::new(v6, v6_prefix.min(128)).expect("prefix within 128").trunc())
            }
        };
        let (family, address) = match net {
            IpNet::V4(v4) => {
                let mut address = [0; 16];
                address[..4].copy_from_slice(&v4.addr().octets());
                (4, address)
            }
            IpNet::V6(v6) => (6, v6.addr().octets()),
        };
        ClientKey { address, listener: listener as u16, family, prefix: net.prefix_len() }
    }

    /// The key of the Unix client of user id `uid` on listener `listener`: a Unix socket's
    /// clients are counted, rate-limited and logged by user (their `SO_PEERCRED`), as an IP
    /// client is by address.
    pub fn uid(listener: usize, uid: u32) -> Self {
        let mut address = [0; 16];
        address[..4].copy_from_slice(&uid.to_le_bytes());
        ClientKey { address, listener: listener as u16, family: FAMILY_UID, prefix: 32 }
    }

    /// The user id of a Unix client's key.
    pub fn user(&self) -> Option<u32> {
        (self.family == FAMILY_UID)
            .then(|| u32::from_le_bytes(self.address[..4].try_into().expect("4 bytes")))
    }

    /// The key's 20 bytes: the address, the listener id (little-endian), the family and the
    /// prefix length. Two keys are equal exactly when their bytes are.
    pub fn to_bytes(&self) -> [u8; 20] {
        let mut bytes = [0; 20];
        bytes[..16].copy_from_slice(&self.address);
        bytes[16..18].copy_from_slice(&self.listener.to_le_bytes());
        bytes[18] = self.family;
        bytes[19] = self.prefix;
        bytes
    }

    /// The key counting every connection of listener `listener`.
    pub fn listener(listener: usize) -> Self {
        ClientKey { address: [0; 16], listener: listener as u16, family: 0, prefix: 0 }
    }

    /// The client as logs show it: the address, or the network when the prefix is shorter
    /// than the address (`2001:db8::/64`). `None` for a listener's key.
    pub fn net(&self) -> Option<IpNet> {
        match self.family {
            4 => {
                let octets: [u8; 4] = self.address[..4].try_into().expect("4 bytes");
                Ipv4Net::new(Ipv4Addr::from(octets), self.prefix).ok().map(IpNet::V4)
            }
            6 => Ipv6Net::new(Ipv6Addr::from(self.address), self.prefix).ok().map(IpNet::V6),
            _ => None,
        }
    }
}

impl std::fmt::Display for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.net() {
            Some(net) if net.prefix_len() == net.max_prefix_len() => net.addr().fmt(f),
            Some(net) => net.fmt(f),
            None => match self.user() {
                Some(uid) => write!(f, "uid:{uid}"),
                None => write!(f, "listener #{}", self.listener),
            },
        }
    }
}

/// The admission rules of one listener that need the shared table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rules {
    /// Open connections per client (`None`: no limit, only counted).
    pub per_client: Option<NonZeroU32>,
    /// Open connections of the whole listener (`None`: no limit).
    pub listener: Option<NonZeroU32>,
    /// New connections per client and unit of time (`None`: no limit).
    pub rate: Option<Rate>,
}

/// Places a rate bucket may occupy from its home index.
pub const BUCKET_PROBE: usize = 8;

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
    /// Unique per admission (see [`Ticket`]); tells a handed-off record from a reused one.
    tag: u64,
    long: u8,
    /// Written last (release) when taken, first when freed, so a record is never seen
    /// half-written by a rebuild.
    state: AtomicU8,
}

/// The region's first bytes: "what this is" before anything else is read.
const MAGIC: [u8; 8] = *b"PFDLIMIT";

/// Layout of the region; bumped by any change to [`Header`], [`Entry`], [`Record`],
/// [`Place`], [`ClientKey`] or how the offsets are computed. A new master refuses to adopt a
/// region of another version. 2: one bucket type for both rate tables, the mutex with its
/// repair count.
const LAYOUT_VERSION: u64 = 2;

#[repr(C)]
struct Header {
    magic: [u8; 8],
    version: u64,
    /// `size_of` of [`Header`], [`Entry`], [`Record`] and [`Place`] in the binary that made
    /// the region (a build for another target never matches).
    sizes: [u64; 4],
    entries_len: u64,
    /// Records in one range.
    range_len: u64,
    buckets_len: u64,
    /// SipHash keys of the entry and bucket hashes.
    hash_keys: [u64; 2],
    /// Also counts how often a dead lock owner forced a rebuild.
    mutex: RobustMutex,
    /// The next record tag; written under the mutex.
    next_tag: AtomicU64,
}

/// One counted connection: the record a worker got from [`Limits::admit`] (or
/// [`Limits::transfer`]), and the tag of that admission.
#[derive(Debug, PartialEq, Eq)]
pub struct Ticket {
    record: u32,
    tag: u64,
}

impl Ticket {
    /// What a hand-off message carries to name this count: (record index, tag).
    pub fn handed(&self) -> (u32, u64) {
        (self.record, self.tag)
    }
}

/// A worker's private list of its free records. Only the worker owning the slot takes and
/// frees its records (and the master, once that worker is dead).
#[derive(Debug)]
pub struct SlotLedger {
    slot: usize,
    /// The slot's records: `first..first + len`.
    first: u32,
    len: u32,
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
    /// The listener already has `open` connections, its `max_connections`.
    ListenerFull {
        /// Connections the listener holds, all clients and workers together.
        open: u32,
    },
    /// The client has spent its connection rate (its token bucket is empty).
    RateLimited,
}

/// The hash of entries and buckets: SipHash-1-3 under keys kept in the header, so that every
/// process mapping the region (also a new master after an upgrade) hashes alike.
#[derive(Debug, Clone, Copy)]
struct SipKeys([u64; 2]);

impl BuildHasher for SipKeys {
    type Hasher = SipHasher13;
    fn build_hasher(&self) -> SipHasher13 {
        SipHasher13::new_with_keys(self.0[0], self.0[1])
    }
}

/// Where things lie in the region, computed from three lengths with checked arithmetic
/// (the lengths may come from a region made by another process).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    entries_len: usize,
    range_len: usize,
    buckets_len: usize,
    entries_offset: usize,
    records_offset: usize,
    buckets_offset: usize,
    bytes: usize,
}

impl Layout {
    /// `None` unless the lengths make a sound table: powers of two for the hashed parts,
    /// entries at least four times the records (so the index never fills up), and no
    /// overflow.
    fn new(entries_len: usize, range_len: usize, buckets_len: usize) -> Option<Layout> {
        let records = range_len.checked_mul(RANGES)?;
        let sound = range_len > 0
            && entries_len.is_power_of_two()
            && entries_len >= records.checked_mul(4)?
            && buckets_len.is_power_of_two()
            && buckets_len >= BUCKET_PROBE;
        if !sound {
            return None;
        }
        let align_up = |n: usize, align: usize| n.checked_next_multiple_of(align);
        let entries_offset = align_up(size_of::<Header>(), align_of::<Entry>())?;
        let records_offset = align_up(
            entries_offset.checked_add(entries_len.checked_mul(size_of::<Entry>())?)?,
            align_of::<Record>(),
        )?;
        let buckets_offset = align_up(
            records_offset.checked_add(records.checked_mul(size_of::<Record>())?)?,
            align_of::<Place>(),
        )?;
        let bytes = buckets_offset.checked_add(buckets_len.checked_mul(size_of::<Place>())?)?;
        Some(Layout {
            entries_len,
            range_len,
            buckets_len,
            entries_offset,
            records_offset,
            buckets_offset,
            bytes,
        })
    }

    fn records(&self) -> usize {
        self.range_len * RANGES
    }
}

fn type_sizes() -> [u64; 4] {
    [size_of::<Header>(), size_of::<Entry>(), size_of::<Record>(), size_of::<Place>()]
        .map(|n| n as u64)
}

/// Handle to the shared region. Created by the master (or adopted from the old master after
/// a binary upgrade); workers use the copy `fork(2)` gave them. Not `Send`/`Sync`: each
/// process is single-threaded.
#[derive(Debug)]
pub struct Limits {
    map: Mapping,
    memfd: OwnedFd,
    layout: Layout,
    /// This master's range of records.
    range: usize,
    slots: usize,
    per_slot: usize,
    hasher: SipKeys,
}

impl Limits {
    /// Creates, maps and initialises a region for `slots` workers of `per_slot` connections
    /// each (and one spare record per slot, see the module documentation), in each of
    /// [`RANGES`] ranges; this master counts in range 0.
    ///
    /// # Errors
    /// [`LimitsError::Map`] when the memfd cannot be created or mapped, [`LimitsError::Lock`]
    /// when the robust, process-shared mutex cannot be initialised,
    /// [`LimitsError::TooLarge`] on overflow.
    pub fn new(slots: usize, per_slot: usize) -> Result<Self, LimitsError> {
        // One spare record per slot: a full worker counts a new client before the connection
        // it sheds is closed (see `worker::shed`).
        let with_spare = per_slot + 1;
        let too_large = LimitsError::TooLarge { slots, per_slot };
        let records = slots.checked_mul(with_spare).filter(|&n| n <= MAX_RECORDS + slots);
        let range_len = records.ok_or(too_large)?.max(1);
        let entries_len = (range_len * RANGES * 4).next_power_of_two().max(16);
        let buckets_len = entries_len.max(1024);
        let layout = Layout::new(entries_len, range_len, buckets_len)
            .ok_or(LimitsError::TooLarge { slots, per_slot })?;
        let length =
            NonZeroUsize::new(layout.bytes).ok_or(LimitsError::TooLarge { slots, per_slot })?;
        let bytes = layout.bytes;
        // A fresh memfd is zeroed: every entry empty, every record free.
        let (memfd, map) =
            region::create(length).map_err(|source| LimitsError::Map { bytes, source })?;
        let random = RandomState::new();
        let hasher = SipKeys([random.hash_one(1u8), random.hash_one(2u8)]);
        let limits = Limits { map, memfd, layout, range: 0, slots, per_slot: with_spare, hasher };
        // SAFETY: the mapping is new and no other process sees it yet; the header lies at
        // its start and `layout.bytes` covers it.
        unsafe {
            let header = limits.header();
            (*header).magic = MAGIC;
            (*header).version = LAYOUT_VERSION;
            (*header).sizes = type_sizes();
            (*header).entries_len = entries_len as u64;
            (*header).range_len = range_len as u64;
            (*header).buckets_len = buckets_len as u64;
            (*header).hash_keys = hasher.0;
        }
        // SAFETY: the header is at the start of the fresh mapping, which no other process
        // sees yet.
        unsafe { RobustMutex::init(&raw mut (*limits.header()).mutex) }
            .map_err(LimitsError::Lock)?;
        if let Err(error) = region::occupy(&limits.memfd, 0) {
            log::warn!("per-client limits: cannot mark slot range 0 as used: {error}");
        }
        Ok(limits)
    }

    /// Binary upgrade: maps the region the old master passed as `memfd` (it counts in range
    /// `predecessor`) and counts in the other range, for `slots` workers of `per_slot`
    /// connections. Validates the file (sealed, regular), the header (magic, version, type
    /// sizes) and the lengths against the file's size before reading anything else; then,
    /// under the lock, checks that no process still uses the range, releases what it holds
    /// (an earlier master's leftovers), rebuilds the index from the records and marks the
    /// range as this master's.
    ///
    /// # Errors
    /// [`AdoptError`]: why the region is not adopted. The caller then creates its own table
    /// with [`Limits::new`] (counts separate from the old master's until it exits).
    pub fn adopt(
        memfd: OwnedFd,
        predecessor: usize,
        slots: usize,
        per_slot: usize,
    ) -> Result<Self, AdoptError> {
        if predecessor >= RANGES {
            return Err(AdoptError::Range(predecessor));
        }
        let map = region::inspect(&memfd)?;
        let bytes = map.bytes;
        if bytes < size_of::<Header>() {
            return Err(AdoptError::Corrupt { bytes });
        }
        // SAFETY: the mapping holds at least a header; every field is an integer (any bit
        // pattern is a value), and these are written once by the creator before it shares
        // the region. Read by copy, never trusted until checked below.
        let (magic, version, sizes, lengths, hash_keys) = unsafe {
            let header = map.base.as_ptr().cast::<Header>();
            (
                std::ptr::read_volatile(&raw const (*header).magic),
                std::ptr::read_volatile(&raw const (*header).version),
                std::ptr::read_volatile(&raw const (*header).sizes),
                [
                    std::ptr::read_volatile(&raw const (*header).entries_len),
                    std::ptr::read_volatile(&raw const (*header).range_len),
                    std::ptr::read_volatile(&raw const (*header).buckets_len),
                ],
                std::ptr::read_volatile(&raw const (*header).hash_keys),
            )
        };
        if magic != MAGIC {
            let found = "none (no preforkd table header)".to_owned();
            return Err(AdoptError::Layout { found, ours: LAYOUT_VERSION });
        }
        if version != LAYOUT_VERSION || sizes != type_sizes() {
            let found = format!("{version}, type sizes {sizes:?}");
            return Err(AdoptError::Layout { found, ours: LAYOUT_VERSION });
        }
        let [entries_len, range_len, buckets_len] = lengths.map(|n| usize::try_from(n).ok());
        let layout = match (entries_len, range_len, buckets_len) {
            (Some(e), Some(r), Some(b)) => Layout::new(e, r, b),
            _ => None,
        };
        let layout = layout.filter(|l| l.bytes == bytes).ok_or(AdoptError::Corrupt { bytes })?;
        let need = slots.saturating_mul(per_slot.saturating_add(1));
        if need > layout.range_len {
            return Err(AdoptError::TooSmall { need, have: layout.range_len });
        }
        let range = (predecessor + 1) % RANGES;
        let limits = Limits {
            map,
            memfd,
            layout,
            range,
            slots,
            per_slot: per_slot + 1,
            hasher: SipKeys(hash_keys),
        };
        let system = |step| move |source| AdoptError::System { step, source };
        let mut table = limits.lock().map_err(|e| match e {
            LimitsError::Lock(errno) => AdoptError::System { step: "lock", source: errno },
            other => AdoptError::NotRegion { fd: -1, why: other.to_string() },
        })?;
        if let Some(pid) = region::occupant(&limits.memfd, range).map_err(system("F_GETLK"))? {
            return Err(AdoptError::Occupied { range, pid });
        }
        let first = range * layout.range_len;
        for index in first..first + layout.range_len {
            table.free_record(index);
        }
        table.rebuild();
        region::occupy(&limits.memfd, range).map_err(system("F_SETLK"))?;
        drop(table);
        Ok(limits)
    }

    /// The range of records this master counts in (0 or 1), for the next upgrade.
    pub fn range(&self) -> usize {
        self.range
    }

    /// The region's descriptor made inheritable, for the exec of a new master: call only in
    /// the child forked for it.
    ///
    /// # Errors
    /// fcntl(2) failed.
    pub fn inheritable_fd(&self) -> Result<RawFd, Errno> {
        region::inheritable(&self.memfd)
    }

    /// Releases every record of the other range if no process uses it any more: the other
    /// master of a binary upgrade and all its workers are gone. Returns how many were held,
    /// or `None` while some process of that range lives.
    ///
    /// # Errors
    /// [`LimitsError::Lock`]; [`LimitsError::Probe`] when fcntl(2) fails.
    pub fn reclaim_other(&self) -> Result<Option<usize>, LimitsError> {
        let other = (self.range + 1) % RANGES;
        let mut table = self.lock()?;
        // Probed under the lock: a process of that range takes its record lock before it
        // counts anything, so whatever it counts after this probe waits for our release.
        if region::occupant(&self.memfd, other).map_err(LimitsError::Probe)?.is_some() {
            return Ok(None);
        }
        let first = other * self.layout.range_len;
        let mut held = 0;
        for index in first..first + self.layout.range_len {
            if table.records[index].state.load(Ordering::Acquire) == RECORD_HELD {
                table.free_record(index);
                held += 1;
            }
        }
        Ok(Some(held))
    }

    fn header(&self) -> *mut Header {
        self.map.base.as_ptr().cast()
    }

    /// Takes the lock; rebuilds the entries if the previous owner died holding it.
    fn lock(&self) -> Result<Held<'_, Table<'_>>, LimitsError> {
        // SAFETY: the mutex was initialised in `new` (or by the master that made an adopted
        // region) and lives as long as the mapping `self` owns.
        let mutex = unsafe { &(*self.header()).mutex };
        let layout = &self.layout;
        let base = self.map.base.as_ptr();
        // SAFETY (of the view): we hold the process-shared mutex, which serialises every
        // access to entries, records and buckets across processes; each process is
        // single-threaded and holds the lock at most once, so these are the only live
        // references into the table. `Layout::new` computed offsets and lengths with checked
        // arithmetic, and the mapping is `layout.bytes` long (checked against the file's size
        // when adopted). Every field of the table's types is an integer or an atomic
        // integer: any content is a value.
        let open = || unsafe {
            Table {
                entries: std::slice::from_raw_parts_mut(
                    base.add(layout.entries_offset).cast::<Entry>(),
                    layout.entries_len,
                ),
                records: std::slice::from_raw_parts_mut(
                    base.add(layout.records_offset).cast::<Record>(),
                    layout.records(),
                ),
                buckets: std::slice::from_raw_parts_mut(
                    base.add(layout.buckets_offset).cast::<Place>(),
                    layout.buckets_len,
                ),
                hasher: &self.hasher,
            }
        };
        let rebuild = |table: &mut Table<'_>| {
            table.rebuild();
            log::warn!(
                "a process died holding the per-client limits lock; counts rebuilt from records"
            );
        };
        mutex.lock(open, rebuild).map_err(LimitsError::Lock)
    }

    /// The first record of `slot`, in this master's range.
    fn first_record(&self, slot: usize) -> usize {
        self.range * self.layout.range_len + slot * self.per_slot
    }

    /// A ledger of all records of `slot`, for the worker that runs in it. Also marks the
    /// calling process as a user of this master's range (see [`Limits::reclaim_other`]).
    ///
    /// # Panics
    /// If `slot` is out of range (a caller bug).
    pub fn ledger(&self, slot: usize) -> SlotLedger {
        assert!(slot < self.slots, "worker slot {slot} out of range");
        if let Err(error) = region::occupy(&self.memfd, self.range) {
            log::warn!("per-client limits: cannot mark slot range {} as used: {error}", self.range);
        }
        let first = self.first_record(slot) as u32;
        let len = self.per_slot as u32;
        let free = (first..first + len).rev().collect();
        SlotLedger { slot, first, len, free }
    }

    /// Counts a new connection of `key` unless the client already has `max` open ones
    /// (`None`: no limit, only counted). [`Limits::admit_with`] with only that rule.
    ///
    /// # Errors
    /// As [`Limits::admit_with`].
    pub fn admit(
        &self,
        ledger: &mut SlotLedger,
        key: ClientKey,
        max: Option<NonZeroU32>,
    ) -> Result<Admission, LimitsError> {
        self.admit_with(ledger, key, &Rules { per_client: max, ..Rules::default() }, 0)
    }

    /// Counts a new connection of `key` if `rules` allow it, all checks and the count under
    /// one lock: first the client's rate (a token is spent by every attempt that gets this
    /// far), then its open connections, then the listener's. `now_ns` is
    /// [`crate::clock::monotonic_ns`] (injected for tests).
    ///
    /// # Errors
    /// [`LimitsError::Lock`] if the lock fails, [`LimitsError::SlotFull`] if the ledger has no
    /// free record. Callers refuse the connection then (fail closed).
    pub fn admit_with(
        &self,
        ledger: &mut SlotLedger,
        key: ClientKey,
        rules: &Rules,
        now_ns: u64,
    ) -> Result<Admission, LimitsError> {
        let record = *ledger.free.last().ok_or(LimitsError::SlotFull(ledger.slot))?;
        let mut table = self.lock()?;
        if let Some(rate) = &rules.rate
            && !table.take_token(key, rate, now_ns)
        {
            return Ok(Admission::RateLimited);
        }
        let open = table.open(&key).0;
        if rules.per_client.is_some_and(|max| open >= max.get()) {
            return Ok(Admission::Refused { open });
        }
        let listener = ClientKey::listener(key.listener.into());
        let total = table.open(&listener).0;
        if rules.listener.is_some_and(|max| total >= max.get()) {
            return Ok(Admission::ListenerFull { open: total });
        }
        table.increment(key, false);
        table.increment(listener, false);
        let tag = self.take_tag();
        table.hold(record, key, tag, false);
        ledger.free.pop();
        Ok(Admission::Admitted(Ticket { record, tag }))
    }

    /// A tag never used before; call with the lock held.
    fn take_tag(&self) -> u64 {
        // SAFETY: the header lives as long as the mapping; the field is atomic.
        unsafe { (*self.header()).next_tag.fetch_add(1, Ordering::Relaxed) + 1 }
    }

    /// Hand-off: moves the count of a connection another worker holds in `record` with
    /// `tag` into one of this ledger's records, keyed `key` from now on (the listener's id
    /// may differ in the receiving generation). Returns the new ticket, or `None` when that
    /// record no longer holds that admission (the sender released it, or died and was
    /// reclaimed): the connection is not the receiver's to serve then. Never refuses for the
    /// limit: the connection was admitted already.
    ///
    /// # Errors
    /// [`LimitsError::Lock`]; [`LimitsError::SlotFull`] when the ledger has no free record.
    pub fn transfer(
        &self,
        ledger: &mut SlotLedger,
        (record, tag): (u32, u64),
        key: ClientKey,
    ) -> Result<Option<Ticket>, LimitsError> {
        let own = *ledger.free.last().ok_or(LimitsError::SlotFull(ledger.slot))?;
        let mut table = self.lock()?;
        let Some(from) = table.records.get(record as usize) else { return Ok(None) };
        let mine = (ledger.first..ledger.first + ledger.len).contains(&record);
        if mine || from.state.load(Ordering::Acquire) != RECORD_HELD || from.tag != tag {
            return Ok(None);
        }
        let (old_key, long) = (from.key, from.long != 0);
        if old_key != key {
            table.free_record(record as usize);
            table.increment(key, false);
            table.increment(ClientKey::listener(key.listener.into()), false);
            if long {
                table.increment(key, true);
            }
        } else {
            from.state.store(RECORD_FREE, Ordering::Release);
        }
        let tag = self.take_tag();
        table.hold(own, key, tag, long);
        ledger.free.pop();
        Ok(Some(Ticket { record: own, tag }))
    }

    /// After offering a connection: whether this worker still holds its count (the
    /// receiver never took it). When it does not, the record goes back to the ledger and
    /// the ticket is spent.
    ///
    /// # Errors
    /// [`LimitsError::Lock`]; the ticket is kept then, as if still held.
    pub fn settle(
        &self,
        ledger: &mut SlotLedger,
        ticket: Ticket,
    ) -> Result<Option<Ticket>, LimitsError> {
        let table = self.lock()?;
        let record = &table.records[ticket.record as usize];
        if record.state.load(Ordering::Acquire) == RECORD_HELD && record.tag == ticket.tag {
            return Ok(Some(ticket));
        }
        ledger.free.push(ticket.record);
        Ok(None)
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
        let record = &table.records[ticket.record as usize];
        if record.long != 0 {
            return Ok(true);
        }
        let key = record.key;
        let long = table.open(&key).1;
        if max_long.is_some_and(|max| long >= max.get()) {
            return Ok(false);
        }
        table.records[ticket.record as usize].long = 1;
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
        let record = &table.records[ticket.record as usize];
        // Not ours any more when a hand-off moved it: the count went with it.
        if record.tag == ticket.tag {
            table.free_record(ticket.record as usize);
        }
        ledger.free.push(ticket.record);
        Ok(())
    }

    /// Releases every record of a dead worker's `slot`; returns how many were held. Called by
    /// the master after `waitpid(2)` reported the worker gone, before the slot is reused.
    ///
    /// # Errors
    /// [`LimitsError::Lock`].
    pub fn reclaim(&self, slot: usize) -> Result<usize, LimitsError> {
        let mut table = self.lock()?;
        let first = self.first_record(slot);
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

    /// Open connections of listener `listener` (its stable id) right now, across all workers.
    ///
    /// # Errors
    /// [`LimitsError::Lock`].
    pub fn listener_open(&self, listener: usize) -> Result<u32, LimitsError> {
        Ok(self.lock()?.open(&ClientKey::listener(listener)).0)
    }

    /// How often a process died holding the lock and the table was rebuilt.
    pub fn repairs(&self) -> u64 {
        // SAFETY: the header lives as long as the mapping; the count is atomic.
        unsafe { (*self.header()).mutex.repairs() }
    }
}

/// The table while the lock is held; unlocks on drop.
struct Table<'a> {
    entries: &'a mut [Entry],
    records: &'a mut [Record],
    buckets: &'a mut [Place],
    hasher: &'a SipKeys,
}

impl Table<'_> {
    fn mask(&self) -> usize {
        self.entries.len() - 1
    }

    fn home(&self, key: &ClientKey) -> usize {
        self.hasher.hash_one(key) as usize & self.mask()
    }

    /// `Ok(index)` of the key's entry, or `Err(index)` of the empty entry where it would go.
    /// Terminates: the table is never full (entries >= 4 x records > live keys).
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

    /// Marks record `index` held for `key`, the state last so a rebuild never sees it half
    /// written.
    fn hold(&mut self, index: u32, key: ClientKey, tag: u64, long: bool) {
        let record = &mut self.records[index as usize];
        record.key = key;
        record.tag = tag;
        record.long = u8::from(long);
        record.state.store(RECORD_HELD, Ordering::Release);
    }

    fn free_record(&mut self, index: usize) {
        let record = &self.records[index];
        if record.state.load(Ordering::Acquire) != RECORD_HELD {
            return;
        }
        let (key, long) = (record.key, record.long != 0);
        record.state.store(RECORD_FREE, Ordering::Release);
        self.decrement(key, long);
        self.decrement(ClientKey::listener(key.listener.into()), false);
    }

    fn decrement(&mut self, key: ClientKey, long: bool) {
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

    /// Spends one token of `key`'s bucket at `now_ns`; false if it has none left.
    fn take_token(&mut self, key: ClientKey, rate: &Rate, now_ns: u64) -> bool {
        let home = self.hasher.hash_one(key) as usize;
        let verdict = buckets::take(self.buckets, home, key, rate, now_ns, BUCKET_PROBE);
        verdict == Verdict::Allowed
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

    /// Recomputes every entry from the held records. Rate buckets are kept as they are: a
    /// bucket half-written by the dead owner is at worst one client's rate off once.
    fn rebuild(&mut self) {
        self.entries.fill(Entry::default());
        for index in 0..self.records.len() {
            let record = &self.records[index];
            if record.state.load(Ordering::Acquire) == RECORD_HELD {
                let (key, long) = (record.key, record.long != 0);
                self.increment(key, false);
                self.increment(ClientKey::listener(key.listener.into()), false);
                if long {
                    self.increment(key, true);
                }
            }
        }
    }
}

pub mod access;

#[cfg(test)]
mod tests;
