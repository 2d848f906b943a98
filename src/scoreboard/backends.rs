//! The backend rows: one per address of a relay listener's backend, where the master, the
//! health checker and the workers share what is known of each backend, and where `preforkd
//! status` and the metrics read it (version 9).
//!
//! Written by three kinds of process, each its own fields:
//! - the master assigns a row to each (listener, backend, address slot) at start and at each
//!   reload ([`BackendTable::assign`]), by a key, so an unchanged backend keeps its row, its
//!   health and its counters across reloads; it writes the row's settings and, for an
//!   address written in the file, its address; a row the serving configuration no longer
//!   names is freed once no connection counts on it ([`BackendTable::retire`]);
//! - the health checker writes the active check's verdict, its reason and times, and the
//!   addresses a host name resolves to;
//! - workers count connections (`active`, exact across workers: a connect takes a place
//!   with [`BackendTable::take`], which never goes over `max_connections`), connects,
//!   failures and bytes, and the passive health (failed connects in a row, `down_time`).
//!   Each place is also counted in the worker slot's own column ([`Places`], after the
//!   slots), so that the master, when it reaps a worker (killed, crashed or not), gives back
//!   what that slot still held ([`BackendTable::reclaim`]): a killed worker leaks no place,
//!   and a `max_connections` cap admits again at once.
//!
//! Every field is an atomic: no lock is held across processes, and a process that dies
//! mid-update leaves nothing locked. The texts (the backend's name, its address, the reason
//! of the last failed check) are written inside a sequence count (`seq`, odd while a writer
//! is at it), so a reader never takes half of one for a whole; names are written once, before
//! the row is published (its key stored last).

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use super::address::{self, ADDRESS_WORDS};
use super::{Mapping, Scoreboard};
use crate::net::Address;

/// One worker slot's places on the backend rows: how many connections (and connects) of
/// the slot's worker count on each row. Written by that worker only, next to the row's
/// `active`; read and cleared by the master once it reaped the worker.
pub(super) type Places = [AtomicU32; BACKEND_ROWS];

/// No worker slot: places taken by this process are counted on the rows only.
const NO_SLOT: usize = usize::MAX;

/// The worker slot whose column counts the places this process takes ([`NO_SLOT`] in the
/// master, the checker and tests): set once by a worker as it boots.
static HOLDER: AtomicUsize = AtomicUsize::new(NO_SLOT);

/// Makes this process count the places it takes on the backend rows in worker slot `slot`'s
/// column, for [`BackendTable::reclaim`]: called by a worker at boot, before any connection.
pub fn hold_places_for(slot: usize) {
    HOLDER.store(slot, Ordering::Relaxed);
}

/// Backend addresses over all relay listeners (a host name counts for as many rows as it may
/// resolve to addresses). A configuration that needs more is refused by a reload, and by
/// startup.
pub const BACKEND_ROWS: usize = 512;

/// Longest backend name kept (its written form, such as `redis.internal:6379`); longer ones
/// are cut.
pub const MAX_BACKEND_NAME: usize = 63;

const NAME_WORDS: usize = 8;
const REASON_WORDS: usize = 8;

const FLAG_BACKUP: u32 = 1;
const FLAG_CHECKED: u32 = 2;
/// The first (or only) address slot of its backend: shown even without an address.
const FLAG_FIRST: u32 = 4;

/// What the active health check (or the lack of one) says of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Health {
    /// No active check: up, as far as the passive health (failed connects) allows.
    Unchecked = 0,
    /// Checked, no verdict yet: used as if up until the first probe decides (as HAProxy's
    /// servers start up), so that clients arriving before the first check are served; the
    /// first probe that fails marks it down at once.
    Pending = 1,
    /// The last `rise` probes passed (or the first did).
    Up = 2,
    /// The last `fall` probes failed (or the first did).
    Down = 3,
}

impl Health {
    fn from_u32(value: u32) -> Health {
        match value {
            1 => Health::Pending,
            2 => Health::Up,
            3 => Health::Down,
            _ => Health::Unchecked,
        }
    }

    /// Lower-case name, as `status` prints it.
    pub fn name(self) -> &'static str {
        match self {
            Health::Unchecked => "unchecked",
            Health::Pending => "pending",
            Health::Up => "up",
            Health::Down => "down",
        }
    }
}

/// One backend address's row.
#[repr(C, align(128))]
pub struct BackendScore {
    /// 0 when free; else the key it was assigned by (never 0), stored last.
    key: AtomicU64,
    /// Odd while the address or the reason is being rewritten.
    seq: AtomicU64,
    listener: AtomicU32,
    weight: AtomicU32,
    /// 0: no cap.
    max_connections: AtomicU32,
    flags: AtomicU32,
    health: AtomicU32,
    /// The checker's count of probes in a row that went against the health (toward `rise`
    /// or `fall`).
    pub streak: AtomicU32,
    /// Failed connects in a row (passive health), over all workers.
    fails: AtomicU32,
    /// 1 while the passive health marks it down (until a connect succeeds).
    passive_down: AtomicU32,
    /// Skipped by the passive health until this `CLOCK_MONOTONIC` millisecond.
    down_until_ms: AtomicU64,
    /// Connections (and connects) in flight, over all workers and generations.
    active: AtomicU64,
    /// Connects that succeeded.
    connects: AtomicU64,
    /// Connects that failed (refused, timed out).
    failures: AtomicU64,
    /// Bytes relayed from clients to it.
    bytes_in: AtomicU64,
    /// Bytes relayed from it to clients.
    bytes_out: AtomicU64,
    /// Active checks that failed.
    checks_failed: AtomicU64,
    /// When the last check ended, Unix milliseconds (0: never).
    last_check_unix_ms: AtomicU64,
    /// How long it took, microseconds.
    check_us: AtomicU64,
    /// When the health last changed, Unix milliseconds.
    changed_unix_ms: AtomicU64,
    name: [AtomicU64; NAME_WORDS],
    address: [AtomicU64; ADDRESS_WORDS],
    reason: [AtomicU64; REASON_WORDS],
}

/// Bytes of all the rows, as the scoreboard lays them out after its header.
pub(super) const TABLE_BYTES: usize = BACKEND_ROWS * std::mem::size_of::<BackendScore>();

const _: () = assert!(TABLE_BYTES.is_multiple_of(128), "the slots after it stay aligned");

/// The backend rows of a scoreboard; a handle that keeps the mapping alive, for the relay
/// sessions that count on their rows.
#[derive(Debug, Clone)]
pub struct BackendTable {
    map: Arc<Mapping>,
    /// Worker slots of the scoreboard: the columns of places.
    slots: usize,
}

/// The settings of a backend row, written by the master.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowSettings {
    /// The listener's id.
    pub listener: u16,
    /// The backend as written (its name).
    pub name: String,
    /// Its weight (1 to 256).
    pub weight: u32,
    /// Used only while every other backend of the listener is down.
    pub backup: bool,
    /// Connections at most, over all workers; 0: no cap.
    pub max_connections: u32,
    /// An active health check watches it: [`Health::Pending`] (used as if up) until its
    /// first verdict.
    pub checked: bool,
    /// Its address, when the file gives one (not a host name).
    pub address: Option<Address>,
    /// Its address slot (0 for an address; 0 to 7 for a host name's addresses).
    pub slot: usize,
}

impl Scoreboard {
    /// The backend rows.
    pub fn backends(&self) -> BackendTable {
        BackendTable { map: Arc::clone(&self.map), slots: self.capacity }
    }
}

impl BackendTable {
    /// Every row.
    pub fn rows(&self) -> &[BackendScore] {
        // SAFETY: every scoreboard maps at least its header and the rows (`layout(0)`), the
        // rows start at the header's size, a multiple of 128 (their alignment), zeroed memory
        // is a valid row, every field is an atomic, and `self.map` keeps the mapping alive.
        unsafe {
            let first = self.map.base.as_ptr().add(std::mem::size_of::<super::Header>());
            std::slice::from_raw_parts(first.cast::<BackendScore>(), BACKEND_ROWS)
        }
    }

    /// Row `index`.
    ///
    /// # Panics
    /// If `index` is not below [`BACKEND_ROWS`] (a caller bug).
    pub fn row(&self, index: usize) -> &BackendScore {
        &self.rows()[index]
    }

    /// Worker slot `slot`'s places, `None` past the slots.
    fn places(&self, slot: usize) -> Option<&Places> {
        if slot >= self.slots {
            return None;
        }
        // SAFETY: a scoreboard of `slots` slots maps `layout(slots)` bytes, which end with
        // every slot's `Places` from `places_offset(slots)`, a multiple of 8 (so aligned for
        // `AtomicU32`); zeroed memory is valid, every element is an atomic, and `self.map`
        // keeps the mapping alive; `slot` is below `slots`.
        unsafe {
            let first = self.map.base.as_ptr().add(super::places_offset(self.slots));
            Some(&*first.cast::<Places>().add(slot))
        }
    }

    /// This process's count of places on row `index` (a worker's; `None` elsewhere).
    fn held(&self, index: usize) -> Option<&AtomicU32> {
        self.places(HOLDER.load(Ordering::Relaxed)).map(|places| &places[index])
    }

    /// Takes a place on row `index` for one more connection, unless that would go over its
    /// `max_connections` (exact across workers: the count never exceeds the cap); give it
    /// back with [`BackendTable::give_back`]. Counted in this worker's column first, so that
    /// a worker killed at any instant is never found holding less than it counts on the row
    /// (at worst one more: the master's release saturates at 0).
    ///
    /// # Panics
    /// If `index` is not below [`BACKEND_ROWS`] (a caller bug).
    pub fn take(&self, index: usize) -> bool {
        let held = self.held(index);
        if let Some(held) = held {
            held.fetch_add(1, Ordering::AcqRel);
        }
        if self.row(index).take() {
            return true;
        }
        if let Some(held) = held {
            saturating_sub32(held, 1);
        }
        false
    }

    /// Takes a place on row `index` whatever its cap (a connection handed over from another
    /// worker, which gives its own back).
    ///
    /// # Panics
    /// If `index` is not below [`BACKEND_ROWS`] (a caller bug).
    pub fn take_anyway(&self, index: usize) {
        if let Some(held) = self.held(index) {
            held.fetch_add(1, Ordering::AcqRel);
        }
        self.row(index).take_anyway();
    }

    /// Gives back a place taken on row `index` with [`BackendTable::take`] or
    /// [`BackendTable::take_anyway`]: from the row first, then from this worker's column.
    ///
    /// # Panics
    /// If `index` is not below [`BACKEND_ROWS`] (a caller bug).
    pub fn give_back(&self, index: usize) {
        self.row(index).give_back(1);
        if let Some(held) = self.held(index) {
            saturating_sub32(held, 1);
        }
    }

    /// Gives back every place worker slot `slot` still holds, and clears its column; returns
    /// how many. By the master, once it reaped the slot's worker (whatever its exit: a worker
    /// that ended cleanly holds none), before the slot is claimed again.
    pub fn reclaim(&self, slot: usize) -> u64 {
        let Some(places) = self.places(slot) else { return 0 };
        let mut released = 0;
        for (index, held) in places.iter().enumerate() {
            let count = held.swap(0, Ordering::AcqRel);
            if count > 0 {
                self.row(index).give_back(u64::from(count));
                released += u64::from(count);
            }
        }
        released
    }

    /// The row keyed `key` (taken anew when none is, from a free one: no key and no
    /// connection counted), with `settings` written; `None` when every row is taken. A row
    /// kept from before keeps its health, its address (a host name's) and its counters; a
    /// changed `checked` resets its health (checked: pending; unchecked: up). By the master,
    /// which alone assigns rows.
    pub fn assign(&self, key: u64, settings: &RowSettings) -> Option<usize> {
        let key = key.max(1);
        let rows = self.rows();
        let (index, fresh) = match rows.iter().position(|r| r.key.load(Ordering::Acquire) == key) {
            Some(index) => (index, false),
            None => (
                rows.iter().position(|r| {
                    r.key.load(Ordering::Acquire) == 0 && r.active.load(Ordering::Acquire) == 0
                })?,
                true,
            ),
        };
        let row = &rows[index];
        let was_checked = row.flags.load(Ordering::Relaxed) & FLAG_CHECKED != 0;
        if fresh {
            for counter in [
                &row.connects,
                &row.failures,
                &row.bytes_in,
                &row.bytes_out,
                &row.checks_failed,
                &row.last_check_unix_ms,
                &row.check_us,
                &row.down_until_ms,
            ] {
                counter.store(0, Ordering::Relaxed);
            }
            row.fails.store(0, Ordering::Relaxed);
            row.passive_down.store(0, Ordering::Relaxed);
            row.streak.store(0, Ordering::Relaxed);
            store_text(&row.name, &settings.name);
            row.write_address(None);
            row.set_reason("");
        }
        if fresh || was_checked != settings.checked {
            let health = if settings.checked { Health::Pending } else { Health::Unchecked };
            row.health.store(health as u32, Ordering::Release);
            row.streak.store(0, Ordering::Relaxed);
            row.changed_unix_ms.store(crate::clock::unix_ms(), Ordering::Relaxed);
        }
        row.listener.store(u32::from(settings.listener), Ordering::Relaxed);
        row.weight.store(settings.weight, Ordering::Relaxed);
        row.max_connections.store(settings.max_connections, Ordering::Relaxed);
        let flags = u32::from(settings.backup) * FLAG_BACKUP
            + u32::from(settings.checked) * FLAG_CHECKED
            + u32::from(settings.slot == 0) * FLAG_FIRST;
        row.flags.store(flags, Ordering::Relaxed);
        if let Some(address) = &settings.address
            && row.address() != Some(address.clone())
        {
            row.write_address(Some(address));
        }
        row.key.store(key, Ordering::Release);
        Some(index)
    }

    /// Frees every row not in `keep` (the rows the serving configuration names): its key is
    /// cleared at once (`status` no longer shows it), and it is taken again only once no
    /// connection counts on it. By the master, once a reload is complete.
    pub fn retire(&self, keep: &[usize]) {
        for (index, row) in self.rows().iter().enumerate() {
            if !keep.contains(&index) {
                row.key.store(0, Ordering::Release);
            }
        }
    }

    /// What `status` and the metrics show of every assigned row: every address, and a host
    /// name without any once (its first slot).
    pub fn views(&self) -> Vec<BackendView> {
        self.rows()
            .iter()
            .enumerate()
            .filter(|(_, row)| row.key.load(Ordering::Acquire) != 0)
            .map(|(index, row)| row.view(index))
            .filter(|view| view.address.is_some() || view.first)
            .collect()
    }
}

/// One row as read at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendView {
    /// The row's index.
    pub row: usize,
    /// The listener's id.
    pub listener: u16,
    /// The backend as written.
    pub name: String,
    /// The first (or only) address slot of its backend.
    pub first: bool,
    /// Its current address (`None`: a host name not resolved).
    pub address: Option<Address>,
    /// The active check's verdict.
    pub health: Health,
    /// Whether the passive health (failed connects) has it down now.
    pub passive_down: bool,
    /// Whether new connections may go to it: an address, not down by either health.
    pub up: bool,
    /// Why it is down (the last failed check, the failed connects, no address), `not checked
    /// yet` while it is used pending its first verdict, or empty.
    pub reason: String,
    /// Weight.
    pub weight: u32,
    /// A backup backend.
    pub backup: bool,
    /// Connections at most (0: no cap).
    pub max_connections: u32,
    /// Connections open now.
    pub active: u64,
    /// Connects that succeeded.
    pub connects: u64,
    /// Connects that failed.
    pub failures: u64,
    /// Bytes from clients to it.
    pub bytes_in: u64,
    /// Bytes from it to clients.
    pub bytes_out: u64,
    /// Active checks that failed.
    pub checks_failed: u64,
    /// When the last check ended, Unix milliseconds (0: never checked).
    pub last_check_unix_ms: u64,
    /// How long the last check took, microseconds.
    pub check_us: u64,
    /// When the health last changed, Unix milliseconds.
    pub changed_unix_ms: u64,
}

/// Subtracts `count` from `counter`, never below 0.
fn saturating_sub32(counter: &AtomicU32, count: u32) {
    let _ = counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |value| {
        Some(value.saturating_sub(count))
    });
}

fn store_text(words: &[AtomicU64], text: &str) {
    let room = words.len() * 8 - 1;
    let mut end = text.len().min(room);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut bytes = vec![0u8; words.len() * 8];
    bytes[0] = end as u8;
    bytes[1..=end].copy_from_slice(&text.as_bytes()[..end]);
    for (word, chunk) in words.iter().zip(bytes.chunks_exact(8)) {
        word.store(u64::from_le_bytes(chunk.try_into().expect("8 bytes")), Ordering::Relaxed);
    }
}

fn load_bytes(words: &[AtomicU64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.load(Ordering::Relaxed).to_le_bytes()).collect()
}

fn load_text(words: &[AtomicU64]) -> String {
    let bytes = load_bytes(words);
    let len = usize::from(bytes[0]).min(bytes.len() - 1);
    String::from_utf8_lossy(&bytes[1..=len]).into_owned()
}

impl BackendScore {
    /// Whether a key is assigned (the row names a backend).
    pub fn assigned(&self) -> bool {
        self.key.load(Ordering::Acquire) != 0
    }

    /// The weight (at least 1).
    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed).max(1)
    }

    /// Whether it is a backup backend.
    pub fn backup(&self) -> bool {
        self.flags.load(Ordering::Relaxed) & FLAG_BACKUP != 0
    }

    /// What the active check says.
    pub fn health(&self) -> Health {
        Health::from_u32(self.health.load(Ordering::Acquire))
    }

    /// Records the active check's verdict (by the checker).
    pub fn set_health(&self, health: Health) {
        self.health.store(health as u32, Ordering::Release);
        self.changed_unix_ms.store(crate::clock::unix_ms(), Ordering::Relaxed);
    }

    /// Records the end of a check at `unix_ms` that took `micros`; a failed one counts
    /// (by the checker).
    pub fn checked(&self, unix_ms: u64, micros: u64, passed: bool) {
        self.last_check_unix_ms.store(unix_ms, Ordering::Relaxed);
        self.check_us.store(micros, Ordering::Relaxed);
        if !passed {
            self.checks_failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The address, read consistently; `None` while a host name is not resolved.
    pub fn address(&self) -> Option<Address> {
        loop {
            let before = self.seq.load(Ordering::Acquire);
            let words = self.address.each_ref().map(|word| word.load(Ordering::Relaxed));
            if before.is_multiple_of(2) && self.seq.load(Ordering::Acquire) == before {
                return address::decode(&words);
            }
            std::hint::spin_loop();
        }
    }

    /// Writes the address (the master for a written one, the checker for a resolved one).
    pub fn write_address(&self, address: Option<&Address>) {
        let words = address::encode(address);
        self.seq.fetch_add(1, Ordering::AcqRel);
        for (word, value) in self.address.iter().zip(words) {
            word.store(value, Ordering::Relaxed);
        }
        self.seq.fetch_add(1, Ordering::AcqRel);
    }

    /// Sets the reason shown while it is down (by the checker; empty once it is up).
    pub fn set_reason(&self, reason: &str) {
        self.seq.fetch_add(1, Ordering::AcqRel);
        store_text(&self.reason, reason);
        self.seq.fetch_add(1, Ordering::AcqRel);
    }

    fn reason(&self) -> String {
        loop {
            let before = self.seq.load(Ordering::Acquire);
            let text = load_text(&self.reason);
            if before.is_multiple_of(2) && self.seq.load(Ordering::Acquire) == before {
                return text;
            }
            std::hint::spin_loop();
        }
    }

    /// Whether the passive health lets it be tried at `now_ms` (`CLOCK_MONOTONIC`
    /// milliseconds): never marked down, or strictly after `down_until_ms`.
    pub fn passively_available(&self, now_ms: u64) -> bool {
        let until = self.down_until_ms.load(Ordering::Relaxed);
        until == 0 || until < now_ms
    }

    /// Whether a new connection may go to it at `now_ms`: assigned, with an address, not
    /// down by the active check (up, unchecked, or pending its first verdict) nor by the
    /// passive health. Down if either says down.
    pub fn usable(&self, now_ms: u64) -> bool {
        self.assigned()
            && self.health() != Health::Down
            && self.passively_available(now_ms)
            && self.address[0].load(Ordering::Relaxed) & 0xff != 0
    }

    /// Connections in flight, over all workers.
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    /// Takes a place on the row only (see [`BackendTable::take`], which counts it in the
    /// worker's column too).
    fn take(&self) -> bool {
        let max = u64::from(self.max_connections.load(Ordering::Relaxed));
        let before = self.active.fetch_add(1, Ordering::AcqRel);
        if max != 0 && before >= max {
            self.give_back(1);
            return false;
        }
        true
    }

    fn take_anyway(&self) {
        self.active.fetch_add(1, Ordering::AcqRel);
    }

    /// Gives back `count` places, never below 0.
    fn give_back(&self, count: u64) {
        let _ = self.active.fetch_update(Ordering::AcqRel, Ordering::Acquire, |active| {
            Some(active.saturating_sub(count))
        });
    }

    /// Whether it has a place left (`max_connections` not reached).
    pub fn has_room(&self) -> bool {
        let max = u64::from(self.max_connections.load(Ordering::Relaxed));
        max == 0 || self.active() < max
    }

    /// Counts bytes relayed to it (`up`) and from it (`down`).
    pub fn moved(&self, up: u64, down: u64) {
        if up > 0 {
            self.bytes_in.fetch_add(up, Ordering::Relaxed);
        }
        if down > 0 {
            self.bytes_out.fetch_add(down, Ordering::Relaxed);
        }
    }

    /// Counts a failed connect; after `threshold` in a row (0: never) the passive health
    /// skips it until `now_ms + down_ms`. True when this failure marked it down (log it).
    pub fn failed(&self, threshold: u32, now_ms: u64, down_ms: u64) -> bool {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let fails = self.fails.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        if threshold == 0 || fails < threshold {
            return false;
        }
        self.down_until_ms.fetch_max(now_ms.saturating_add(down_ms), Ordering::Relaxed);
        self.passive_down.swap(1, Ordering::Relaxed) == 0
    }

    /// Counts a successful connect; true when this brought it back from a passive
    /// mark-down (log it).
    pub fn succeeded(&self) -> bool {
        self.connects.fetch_add(1, Ordering::Relaxed);
        self.fails.store(0, Ordering::Relaxed);
        if self.passive_down.load(Ordering::Relaxed) == 0 {
            return false;
        }
        self.down_until_ms.store(0, Ordering::Relaxed);
        self.passive_down.swap(0, Ordering::Relaxed) == 1
    }

    fn view(&self, index: usize) -> BackendView {
        let now_ms = crate::clock::monotonic_ms();
        let health = self.health();
        let address = self.address();
        let passive_down = !self.passively_available(now_ms);
        let mut reason = String::new();
        if address.is_none() {
            reason.push_str("resolution: no address");
        } else if health == Health::Down {
            let _ = write!(reason, "check failed: {}", self.reason());
        } else if passive_down {
            let _ =
                write!(reason, "{} failed connects in a row", self.fails.load(Ordering::Relaxed));
        } else if health == Health::Pending {
            // Up meanwhile: said so that `status` tells it from a verdict.
            reason.push_str("not checked yet");
        }
        BackendView {
            row: index,
            listener: self.listener.load(Ordering::Relaxed) as u16,
            name: load_text(&self.name),
            first: self.flags.load(Ordering::Relaxed) & FLAG_FIRST != 0,
            up: self.usable(now_ms),
            address,
            health,
            passive_down,
            reason,
            weight: self.weight(),
            backup: self.backup(),
            max_connections: self.max_connections.load(Ordering::Relaxed),
            active: self.active(),
            connects: self.connects.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            checks_failed: self.checks_failed.load(Ordering::Relaxed),
            last_check_unix_ms: self.last_check_unix_ms.load(Ordering::Relaxed),
            check_us: self.check_us.load(Ordering::Relaxed),
            changed_unix_ms: self.changed_unix_ms.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(name: &str, checked: bool) -> RowSettings {
        RowSettings {
            listener: 2,
            name: name.into(),
            weight: 3,
            backup: false,
            max_connections: 2,
            checked,
            address: name.parse().ok(),
            slot: 0,
        }
    }

    #[test]
    fn rows_are_kept_by_key_capped_exactly_and_read_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.pid.scoreboard");
        let board = Scoreboard::create(Some(&path), 2).unwrap();
        let table = board.backends();
        let a = table.assign(10, &settings("127.0.0.1:6379", false)).unwrap();
        let b = table.assign(11, &settings("unix:/run/redis.sock", true)).unwrap();
        assert_ne!(a, b);
        let row = table.row(a);
        assert!(row.usable(1));
        assert!(table.row(b).usable(1), "a checked backend is tried until its first verdict");
        assert!(table.take(a) && table.take(a));
        assert!(!table.take(a), "max_connections 2: the third is refused");
        assert_eq!(row.active(), 2, "and not counted");
        row.moved(10, 20);
        assert!(!row.succeeded(), "never marked down");
        // A reload keeps the row of the same key, with its counters.
        assert_eq!(table.assign(10, &settings("127.0.0.1:6379", false)), Some(a));
        assert_eq!(table.row(a).active(), 2);
        // Retired while connections count on it: not shown, not taken again.
        table.retire(&[b]);
        let c = table.assign(12, &settings("[::1]:80", false)).unwrap();
        assert_ne!(c, a, "a row with connections is not reused");
        table.give_back(a);
        table.give_back(a);
        let reader = Scoreboard::open(&path).unwrap();
        let views = reader.backends().views();
        let names: Vec<&str> = views.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["unix:/run/redis.sock", "[::1]:80"]);
        assert_eq!(views[0].address, Some(Address::Unix("/run/redis.sock".into())));
        assert_eq!((views[0].health, views[0].up), (Health::Pending, true));
        assert_eq!(views[0].reason, "not checked yet");
        table.row(b).set_health(Health::Down);
        assert!(!table.row(b).usable(1), "down once a verdict says so");
        table.row(b).set_reason("expected \"+PONG\", got \"-ERR\"");
        let view = &reader.backends().views()[0];
        assert_eq!(view.reason, "check failed: expected \"+PONG\", got \"-ERR\"");
        assert_eq!(table.assign(13, &settings("127.0.0.2:1", false)), Some(a), "free again");
    }

    #[test]
    fn a_dead_workers_places_are_given_back_by_its_slot() {
        let board = Scoreboard::create(None, 3).unwrap();
        let table = board.backends();
        let mut capped = settings("127.0.0.1:1", false);
        capped.max_connections = 1;
        let a = table.assign(1, &capped).unwrap();
        let mut open = settings("127.0.0.1:2", false);
        open.max_connections = 0;
        let b = table.assign(2, &open).unwrap();
        // The worker of slot 2 (this process, for the test) holds a's only place and two of b.
        hold_places_for(2);
        assert!(table.take(a) && table.take(b) && table.take(b));
        assert!(!table.take(a), "max_connections 1");
        // Slot 1's worker took one of b and gave it back: nothing left to reclaim there.
        hold_places_for(1);
        assert!(table.take(b));
        table.give_back(b);
        hold_places_for(NO_SLOT);
        assert_eq!(table.reclaim(1), 0);
        assert_eq!((table.row(a).active(), table.row(b).active()), (1, 2));
        // Slot 2's worker is killed: its places come back, and the cap admits again.
        assert_eq!(table.reclaim(2), 3);
        assert_eq!((table.row(a).active(), table.row(b).active()), (0, 0));
        assert!(table.take(a), "the cap admits again");
        assert_eq!(table.reclaim(2), 0, "reclaim is idempotent");
        assert_eq!(table.reclaim(3), 0, "past the slots: nothing");
        // Never below 0, whatever a column says.
        table.places(0).unwrap()[b].store(5, Ordering::Relaxed);
        assert_eq!(table.reclaim(0), 5);
        assert_eq!(table.row(b).active(), 0);
    }

    #[test]
    fn passive_failures_mark_down_for_down_time_and_a_success_brings_it_back() {
        let board = Scoreboard::create(None, 1).unwrap();
        let table = board.backends();
        let row = table.row(table.assign(1, &settings("127.0.0.1:1", false)).unwrap());
        assert!(!row.failed(2, 1000, 500));
        assert!(row.failed(2, 1000, 500), "the second failure marks it down: log it");
        assert!(!row.usable(1500) && row.usable(1501));
        assert!(!row.failed(2, 1501, 500), "already down: logged once");
        assert!(row.succeeded(), "back: logged once");
        assert!(!row.succeeded());
        let view = &table.views()[0];
        assert_eq!((view.connects, view.failures), (2, 3));
    }
}
