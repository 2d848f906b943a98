//! The scoreboard: one shared-memory page range where the master and every worker publish
//! their state, and where `preforkd status` and the control commands read it.
//!
//! Written by both processes (the master: header, slot ownership; a worker: its own slot),
//! read by anyone who can open the file. When `daemon.pid_file` is set the region is a file
//! beside it ([`path_for`]), mapped `MAP_SHARED`, so other processes can read it; otherwise it
//! is anonymous. Every field is an atomic: no lock, no torn reads of a single field.
//!
//! Heartbeats are `CLOCK_MONOTONIC` milliseconds, comparable across processes.

use std::fs::File;
use std::io;
use std::num::NonZeroUsize;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};

use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};
use thiserror::Error;

use crate::clock::{monotonic_ms, unix_ms};
use crate::files;

mod address;
mod backends;
mod children;
mod listeners;

pub use backends::{
    BACKEND_ROWS, BackendScore, BackendTable, BackendView, Health, MAX_BACKEND_NAME, RowSettings,
    hold_places_for,
};
pub use children::{CHILD_ROWS, Child};
pub use listeners::{
    CLOSES, Close, DATAGRAM_OUTCOMES, Datagram, LISTENER_NAME_BYTES, LISTENER_ROWS, ListenerScore,
    ListenerTotals, kept_name,
};

/// Version 14: a listener's bound address may be a Unix socket path or an abstract name
/// ([`Scoreboard::listener_address`]; 14 words, the backend rows' encoding).
/// Version 13: each worker slot's places on the backend rows ([`BackendTable::reclaim`]),
/// after every slot's children, so that the master gives back what a killed worker held.
/// Version 12: two more TLS failure reasons ([`TlsFailure::TooLarge`],
/// [`TlsFailure::UnknownName`]), for a relay that routes by the ClientHello.
/// Version 11: the backend rows of relay listeners ([`BackendTable`]), after the header.
/// Version 10: the children retiring workers supervise (a count and a few rows per slot
/// after the listener rows: [`Scoreboard::children`]). Version 9: TLS handshakes,
/// resumptions and failures per listener ([`ListenerScore::tls_handshakes`],
/// [`TlsFailure`]). Version 8: the `over-share` refusal ([`Refusal::OverShare`]) and
/// datagrams per listener ([`ListenerScore::datagrams`]). Version 7: each listener's bound
/// address ([`Scoreboard::listener_address`]). Version 6: hand-offs per listener
/// ([`ListenerScore::handed_off`], `adopted`). Version 5:
/// when the master became ready (`ready_unix_ms`). Version 4: per-listener
/// counters ([`listeners`]: names and retired totals in the header, [`LISTENER_ROWS`] rows
/// per worker slot after the slots), worker restarts and the upgrade state in the header.
/// Version 3 added the master's start time (control commands check it before they signal),
/// [`WorkerScore::refused`] and [`WorkerScore::full`]. Another version is refused: a control
/// command cannot verify the master of an older layout.
const MAGIC: u64 = u64::from_le_bytes(*b"pfkdsc14");
/// Most worker slots a scoreboard may claim: far above what any configuration needs
/// (512 workers x 2 x 17 generations), far below what could overflow a size computation.
pub const MAX_SLOTS: usize = 1 << 16;
/// Bytes of the last error message kept in the header.
pub const MESSAGE_BYTES: usize = 512;

/// The scoreboard could not be created or opened.
#[derive(Debug, Error)]
pub enum ScoreboardError {
    /// Creating, allocating, mapping or reading the file failed.
    #[error("scoreboard {}: {step}: {source}", path.display())]
    File {
        /// The scoreboard file (empty for an anonymous one).
        path: PathBuf,
        /// What was being done: `could not create it`, `could not allocate N bytes` ...
        step: String,
        /// The system error.
        source: io::Error,
    },
    /// The file is not a scoreboard of this version, or its header is inconsistent.
    #[error("{} is not a preforkd scoreboard ({reason})", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// A worker slot's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum SlotState {
    /// No worker.
    Empty = 0,
    /// Forked, setting itself up.
    Booting = 1,
    /// Accepting and serving.
    Ready = 2,
    /// Retired or stopping gracefully: no longer accepting; handing off or finishing its
    /// connections.
    Draining = 3,
}

impl SlotState {
    fn from_u32(v: u32) -> Self {
        match v {
            1 => SlotState::Booting,
            2 => SlotState::Ready,
            3 => SlotState::Draining,
            _ => SlotState::Empty,
        }
    }

    /// Lower-case name, as `preforkd status` prints it.
    pub fn name(self) -> &'static str {
        match self {
            SlotState::Empty => "empty",
            SlotState::Booting => "booting",
            SlotState::Ready => "ready",
            SlotState::Draining => "draining",
        }
    }
}

/// Why a connection was turned away or shed: the refusal counters of the scoreboard, in
/// this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(usize)]
pub enum Refusal {
    /// `deny` / `allow` refused the client.
    Denied = 0,
    /// `max_connection_rate_per_client`.
    Rate = 1,
    /// `max_connections_per_client`.
    Limit = 2,
    /// The listener's `max_connections`.
    ListenerFull = 3,
    /// Closed by a full worker to admit a newer client.
    Shed = 4,
    /// A trusted proxy's PROXY protocol header was malformed or late.
    ProxyHeader = 5,
    /// Closed at rest by a full worker to admit a new client, because its client held more
    /// than its fair share of the worker; or a new connection refused by a full worker
    /// because its client would then hold more than its fair share (version 7).
    OverShare = 6,
}

/// Number of [`Refusal`] reasons.
pub const REFUSALS: usize = 7;

impl Refusal {
    /// Every reason, in counter order.
    pub const ALL: [Refusal; REFUSALS] = [
        Refusal::Denied,
        Refusal::Rate,
        Refusal::Limit,
        Refusal::ListenerFull,
        Refusal::Shed,
        Refusal::ProxyHeader,
        Refusal::OverShare,
    ];

    /// The access-log and `status` spelling.
    pub fn name(self) -> &'static str {
        match self {
            Refusal::Denied => "denied",
            Refusal::Rate => "rate",
            Refusal::Limit => "limit",
            Refusal::ListenerFull => "listener-full",
            Refusal::Shed => "shed",
            Refusal::ProxyHeader => "proxy-header",
            Refusal::OverShare => "over-share",
        }
    }
}

/// Why a TLS handshake failed: the per-listener TLS failure counters of the scoreboard, in
/// this order. A connection whose handshake failed never reached its service (or, for a relay
/// that routes by the ClientHello, never reached a backend): it is counted here, not among
/// the closes, and gets no access line (the log summarizes failures per client and reason,
/// as it does refusals).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(usize)]
pub enum TlsFailure {
    /// The handshake did not complete within the listener's `handshake_timeout`.
    Timeout = 0,
    /// The client closed or reset the connection during the handshake.
    Closed = 1,
    /// The client's first bytes were not a TLS handshake (plain text on a TLS port).
    NotTls = 2,
    /// No protocol version, cipher suite, key exchange group, signature scheme or ALPN
    /// protocol in common.
    Incompatible = 3,
    /// `client_auth = "required"` and the client presented no certificate.
    NoClientCertificate = 4,
    /// The client's certificate was refused: not issued by `client_ca`, expired, unusable.
    BadClientCertificate = 5,
    /// The client aborted with an alert of its own (it did not trust the server's
    /// certificate, most often).
    ClientAlert = 6,
    /// Malformed or unexpected handshake messages, or another failure.
    Protocol = 7,
    /// The ClientHello was larger than the relay reads to route by it (see preforkd.toml(5),
    /// RELAY OPTIONS, `route`), or a handshake message larger than rustls takes.
    TooLarge = 8,
    /// The client asked for a server name the listener routes nowhere (or for none), and
    /// there is no default.
    UnknownName = 9,
}

/// Number of [`TlsFailure`] reasons.
pub const TLS_FAILURES: usize = 10;

impl TlsFailure {
    /// Every reason, in counter order.
    pub const ALL: [TlsFailure; TLS_FAILURES] = [
        TlsFailure::Timeout,
        TlsFailure::Closed,
        TlsFailure::NotTls,
        TlsFailure::Incompatible,
        TlsFailure::NoClientCertificate,
        TlsFailure::BadClientCertificate,
        TlsFailure::ClientAlert,
        TlsFailure::Protocol,
        TlsFailure::TooLarge,
        TlsFailure::UnknownName,
    ];

    /// The `status`, metrics and log spelling.
    pub fn name(self) -> &'static str {
        match self {
            TlsFailure::Timeout => "timeout",
            TlsFailure::Closed => "closed",
            TlsFailure::NotTls => "not-tls",
            TlsFailure::Incompatible => "incompatible",
            TlsFailure::NoClientCertificate => "no-client-certificate",
            TlsFailure::BadClientCertificate => "bad-client-certificate",
            TlsFailure::ClientAlert => "client-alert",
            TlsFailure::Protocol => "protocol",
            TlsFailure::TooLarge => "too-large",
            TlsFailure::UnknownName => "unknown-name",
        }
    }

    /// The close reason of a connection that failed this way, `tls-` and [`TlsFailure::name`].
    pub fn close_reason(self) -> &'static str {
        match self {
            TlsFailure::Timeout => "tls-timeout",
            TlsFailure::Closed => "tls-closed",
            TlsFailure::NotTls => "tls-not-tls",
            TlsFailure::Incompatible => "tls-incompatible",
            TlsFailure::NoClientCertificate => "tls-no-client-certificate",
            TlsFailure::BadClientCertificate => "tls-bad-client-certificate",
            TlsFailure::ClientAlert => "tls-client-alert",
            TlsFailure::Protocol => "tls-protocol",
            TlsFailure::TooLarge => "tls-too-large",
            TlsFailure::UnknownName => "tls-unknown-name",
        }
    }
}

/// The master's part. Cache-line aligned, like each worker's part, so that workers writing
/// their own counters never contend for a line (no false sharing).
#[repr(C, align(128))]
pub struct Header {
    magic: AtomicU64,
    capacity: AtomicU64,
    /// The master's pid.
    pub master_pid: AtomicI32,
    /// The master's start time, in clock ticks after boot (field 22 of `/proc/PID/stat`):
    /// with the pid, it identifies the master even after its pid is reused.
    pub master_start_ticks: AtomicU64,
    /// Log lines that could not be written (full disk, full relay pipe, syslog down), by
    /// the master and every worker since the master started.
    pub log_lines_dropped: AtomicU64,
    /// The serving configuration generation, from 1.
    pub generation: AtomicU64,
    /// Master start, Unix milliseconds.
    pub started_unix_ms: AtomicU64,
    /// Reloads applied.
    pub reloads_ok: AtomicU64,
    /// Reloads rejected or rolled back.
    pub reloads_failed: AtomicU64,
    /// Log reopens done.
    pub reopens: AtomicU64,
    /// Log reopens that failed (the file could not be opened again; the old one is kept).
    pub reopens_failed: AtomicU64,
    /// Binary upgrades that failed (the new master did not come up).
    pub upgrades_failed: AtomicU64,
    /// Target worker count of the serving generation.
    pub target_workers: AtomicU64,
    /// When the master's first generation became ready and the master had told systemd
    /// (`READY=1`, or `MAINPID=` after an upgrade), Unix milliseconds; 0 before. `preforkd
    /// upgrade` waits for it, so an old master stopped right after cannot leave systemd
    /// without a main process.
    pub ready_unix_ms: AtomicU64,
    /// Workers that exited without being asked to (crash, kill, stale heartbeat) while their
    /// generation served, each then forked again (version 4).
    pub worker_restarts: AtomicU64,
    upgrade_state: AtomicU32,
    /// Workers replaced because they asked to be (recycling: `daemon.recycle_*`). In what
    /// was padding before `message_len`, so the layout is unchanged: an older master's
    /// scoreboard reads 0.
    pub worker_recycles: AtomicU32,
    message_len: AtomicU64,
    message: [AtomicU32; MESSAGE_BYTES / 4],
    /// Listener names and the counters of workers that are gone (version 4).
    listeners: listeners::ListenerTable,
}

/// Where a binary upgrade (SIGUSR2) stands, from this master's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum UpgradeState {
    /// No upgrade under way.
    None = 0,
    /// This master started a new master, which runs: this is the old master, waiting for
    /// WINCH and QUIT (or a rollback).
    NewMasterRunning = 1,
}

impl UpgradeState {
    /// Every state, in value order.
    pub const ALL: [UpgradeState; 2] = [UpgradeState::None, UpgradeState::NewMasterRunning];

    /// Lower-case name, as the metrics print it.
    pub fn name(self) -> &'static str {
        match self {
            UpgradeState::None => "none",
            UpgradeState::NewMasterRunning => "new-master-running",
        }
    }
}

impl Header {
    /// Where a binary upgrade stands.
    pub fn upgrade_state(&self) -> UpgradeState {
        match self.upgrade_state.load(Ordering::Acquire) {
            1 => UpgradeState::NewMasterRunning,
            _ => UpgradeState::None,
        }
    }

    /// Records where a binary upgrade stands (by the master).
    pub fn set_upgrade_state(&self, state: UpgradeState) {
        self.upgrade_state.store(state as u32, Ordering::Release);
    }
}

/// One worker's part, on cache lines of its own.
#[repr(C, align(128))]
pub struct WorkerScore {
    /// Worker pid, 0 when empty.
    pub pid: AtomicI32,
    state: AtomicU32,
    /// Configuration generation of the worker.
    pub generation: AtomicU64,
    /// Fork time, Unix milliseconds.
    pub started_unix_ms: AtomicU64,
    /// Last loop turn, `CLOCK_MONOTONIC` milliseconds.
    pub heartbeat_ms: AtomicU64,
    /// Connections open now.
    pub open: AtomicU64,
    /// Connections accepted since the worker started.
    pub accepted: AtomicU64,
    /// Bytes read from clients.
    pub bytes_in: AtomicU64,
    /// Bytes written to clients.
    pub bytes_out: AtomicU64,
    /// Connections refused or shed since the worker started, by [`Refusal`] (version 2).
    pub refused: [AtomicU64; REFUSALS],
    /// Times the worker became full (its `max_connections_per_worker` reached) since it
    /// started (version 2).
    pub full: AtomicU64,
}

// The version 2 and 7 counters live in what was padding: a slot stays one 128-byte line pair.
const _: () = assert!(std::mem::size_of::<WorkerScore>() == 128);

impl WorkerScore {
    /// The slot's state.
    pub fn state(&self) -> SlotState {
        SlotState::from_u32(self.state.load(Ordering::Acquire))
    }

    /// Sets the slot's state.
    pub fn set_state(&self, state: SlotState) {
        self.state.store(state as u32, Ordering::Release);
    }

    /// Records a loop turn.
    pub fn beat(&self) {
        self.heartbeat_ms.store(monotonic_ms(), Ordering::Relaxed);
    }

    /// Clears the slot and claims it for a new worker (called by the master at fork).
    pub fn claim(&self, pid: i32, generation: u64) {
        let counters = [&self.open, &self.accepted, &self.bytes_in, &self.bytes_out, &self.full];
        for counter in counters.into_iter().chain(&self.refused) {
            counter.store(0, Ordering::Relaxed);
        }
        self.generation.store(generation, Ordering::Relaxed);
        self.started_unix_ms.store(unix_ms(), Ordering::Relaxed);
        self.heartbeat_ms.store(monotonic_ms(), Ordering::Relaxed);
        self.set_state(SlotState::Booting);
        self.pid.store(pid, Ordering::Release);
    }

    /// Marks the slot empty (called by the master after reaping).
    pub fn release(&self) {
        self.set_state(SlotState::Empty);
        self.open.store(0, Ordering::Relaxed);
        self.pid.store(0, Ordering::Release);
    }
}

/// The scoreboard file of a master whose pid file is `pid_file`.
pub fn path_for(pid_file: &Path) -> PathBuf {
    let mut name = pid_file.as_os_str().to_owned();
    name.push(".scoreboard");
    PathBuf::from(name)
}

/// A mapping of the scoreboard, unmapped when the last handle to it is dropped: the
/// scoreboard itself, and the [`BackendTable`]s taken from it, which relay sessions keep.
#[derive(Debug)]
struct Mapping {
    base: NonNull<u8>,
    bytes: usize,
}

// SAFETY: the mapping is only reached through atomics, which any thread may use; the pointer
// itself is never written after creation.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was created with this length and nothing refers to it any more
        // (every handle holds this `Mapping` alive).
        let _ = unsafe { munmap(self.base.cast(), self.bytes) };
    }
}

/// A mapped scoreboard.
#[derive(Debug)]
pub struct Scoreboard {
    map: Arc<Mapping>,
    capacity: usize,
    /// The file's owner, for a scoreboard opened with [`Scoreboard::open`].
    owner: Option<u32>,
}

/// Bytes of one slot: its [`WorkerScore`], its [`LISTENER_ROWS`] listener rows, its
/// children ([`CHILD_ROWS`] rows and their count) and its places on the backend rows (one
/// count per row, [`BACKEND_ROWS`]).
const SLOT_BYTES: usize = std::mem::size_of::<WorkerScore>()
    + LISTENER_ROWS * std::mem::size_of::<ListenerScore>()
    + std::mem::size_of::<children::ChildRows>()
    + std::mem::size_of::<backends::Places>();

/// Bytes of a scoreboard of `capacity` slots; `None` beyond [`MAX_SLOTS`]. The header, the
/// backend rows ([`BACKEND_ROWS`]), then every [`WorkerScore`], then every slot's listener
/// rows, then every slot's child rows, then every slot's places on the backend rows.
fn layout(capacity: usize) -> Option<usize> {
    if capacity > MAX_SLOTS {
        return None;
    }
    Some(SLOTS_OFFSET + capacity * SLOT_BYTES)
}

/// Where the worker slots start: after the header and the backend rows (version 11).
const SLOTS_OFFSET: usize = std::mem::size_of::<Header>() + backends::TABLE_BYTES;

/// Where the slots' places on the backend rows start in a scoreboard of `capacity` slots:
/// after every slot's children (version 13).
fn places_offset(capacity: usize) -> usize {
    SLOTS_OFFSET
        + capacity
            * (std::mem::size_of::<WorkerScore>()
                + LISTENER_ROWS * std::mem::size_of::<ListenerScore>()
                + std::mem::size_of::<children::ChildRows>())
}

impl Scoreboard {
    /// Creates a scoreboard for `capacity` worker slots: at `path` (replacing any file there,
    /// atomically), or anonymous when `path` is `None`.
    ///
    /// A file is fully allocated before it is mapped ([`crate::sys::allocate`]): a full
    /// filesystem fails here, at start, with an error naming the file and the step, and
    /// never later with `SIGBUS` when the master first writes a page (a new worker's slot at
    /// SIGTTIN, a message at a reload). An anonymous scoreboard is accounted for in full
    /// when it is mapped, so it cannot fault either.
    ///
    /// # Errors
    /// [`ScoreboardError::File`] when the file cannot be created, allocated (`ENOSPC`,
    /// `EDQUOT`), mapped or renamed into place; nothing is left behind then.
    pub fn create(path: Option<&Path>, capacity: usize) -> Result<Self, ScoreboardError> {
        let fail = |step: String| {
            move |source: io::Error| ScoreboardError::File {
                path: path.map(Path::to_owned).unwrap_or_default(),
                step,
                source,
            }
        };
        let bytes = layout(capacity).ok_or_else(|| {
            fail("cannot be sized".into())(io::Error::other(format!(
                "{capacity} worker slots, more than {MAX_SLOTS}"
            )))
        })?;
        let length = NonZeroUsize::new(bytes).expect("the header is not empty");
        let base = match path {
            None => crate::sys::map_shared_zeroed(length)
                .map_err(|e| fail(format!("could not map {bytes} bytes"))(e.into()))?,
            Some(path) => {
                let dir =
                    path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
                let file = tempfile::Builder::new()
                    .prefix(".preforkd-scoreboard")
                    .tempfile_in(dir)
                    .map_err(fail(format!("could not create a file in {}", dir.display())))?;
                crate::sys::allocate(file.as_file().as_fd(), bytes as u64)
                    .map_err(fail(format!("could not allocate {bytes} bytes")))?;
                // SAFETY: a shared mapping of a file we just created and allocated in full
                // (so no page of it can fault for want of space); nothing else maps it yet.
                // The mapping outlives the descriptor, as mmap(2) allows.
                let base = unsafe {
                    mmap(
                        None,
                        length,
                        ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                        MapFlags::MAP_SHARED,
                        file.as_file().as_fd(),
                        0,
                    )
                }
                .map_err(|e| fail(format!("could not map {bytes} bytes"))(e.into()))?;
                if let Err(error) = file.persist(path) {
                    // SAFETY: mapped just above with this length; nothing refers to it yet.
                    let _ = unsafe { munmap(base, bytes) };
                    return Err(fail("could not rename it into place".into())(error.error));
                }
                base
            }
        };
        let map = Arc::new(Mapping { base: base.cast(), bytes });
        let board = Scoreboard { map, capacity, owner: None };
        let header = board.header();
        header.capacity.store(capacity as u64, Ordering::Relaxed);
        header.started_unix_ms.store(unix_ms(), Ordering::Relaxed);
        header.magic.store(MAGIC, Ordering::Release);
        Ok(board)
    }

    /// Maps an existing scoreboard read-only, for `preforkd status` and the control commands.
    ///
    /// Nothing in the file is trusted: it must be a regular file (not reached through a
    /// symlink) no larger than [`MAX_SLOTS`] slots need, carry this version's magic, and
    /// claim no more slots than its size holds, so no read goes past the mapping.
    ///
    /// # Errors
    /// [`ScoreboardError::File`] when it cannot be opened or mapped,
    /// [`ScoreboardError::Invalid`] when it is not a scoreboard or its header is inconsistent.
    pub fn open(path: &Path) -> Result<Self, ScoreboardError> {
        let fail = |step: &str| {
            let step = step.to_owned();
            move |source: io::Error| ScoreboardError::File { path: path.to_owned(), step, source }
        };
        let invalid = |reason: String| ScoreboardError::Invalid { path: path.to_owned(), reason };
        let max_bytes = layout(MAX_SLOTS).expect("MAX_SLOTS fits") as u64;
        let file: File =
            files::open_regular(path, max_bytes, false).map_err(fail("could not open it"))?;
        let meta = file.metadata().map_err(fail("could not read its size"))?;
        let size = meta.len() as usize;
        let header_bytes = layout(0).expect("no slots fit");
        if size < header_bytes {
            return Err(invalid(format!("{size} bytes, less than a header")));
        }
        let length = NonZeroUsize::new(size).expect("at least a header");
        // SAFETY: a read-only shared mapping of a regular file; only atomics are read from it.
        let base = unsafe {
            mmap(None, length, ProtFlags::PROT_READ, MapFlags::MAP_SHARED, file.as_fd(), 0)
        }
        .map_err(|e| fail("could not map it")(e.into()))?;
        // From here the mapping is unmapped on every path (Drop), and `capacity` 0 exposes
        // the header only.
        let mut board = Scoreboard {
            map: Arc::new(Mapping { base: base.cast(), bytes: size }),
            capacity: 0,
            owner: Some(meta.uid()),
        };
        let header = board.header();
        if header.magic.load(Ordering::Acquire) != MAGIC {
            return Err(invalid("wrong magic: another program's file or another version".into()));
        }
        let claimed = header.capacity.load(Ordering::Relaxed);
        let capacity =
            usize::try_from(claimed).ok().filter(|&c| layout(c).is_some_and(|b| b <= size));
        let Some(capacity) = capacity else {
            return Err(invalid(format!(
                "its header claims {claimed} slots; {size} bytes hold fewer"
            )));
        };
        board.capacity = capacity;
        Ok(board)
    }

    /// The user id owning the file, for a scoreboard opened with [`Scoreboard::open`]: the
    /// master's user, unless someone else wrote it.
    pub fn owner(&self) -> Option<u32> {
        self.owner
    }

    /// Refusals by reason, summed over the live worker slots.
    pub fn refusals(&self) -> [u64; REFUSALS] {
        let mut totals = [0; REFUSALS];
        for score in self.slots().iter().filter(|s| s.state() != SlotState::Empty) {
            for (total, counter) in totals.iter_mut().zip(&score.refused) {
                *total += counter.load(Ordering::Relaxed);
            }
        }
        totals
    }

    /// The master's part.
    pub fn header(&self) -> &Header {
        // SAFETY: the mapping is at least `layout(0)` bytes, page-aligned, and lives as long
        // as `self`; every field is an atomic, so shared references across processes are sound.
        unsafe { self.map.base.cast::<Header>().as_ref() }
    }

    /// Every worker slot.
    pub fn slots(&self) -> &[WorkerScore] {
        // SAFETY: `layout(capacity)` bytes are mapped from a page-aligned base; the header's
        // size is a multiple of its 128-byte alignment, so the slots that follow it are
        // aligned for `WorkerScore`; all fields are atomics.
        unsafe {
            let first = self.map.base.as_ptr().add(SLOTS_OFFSET).cast::<WorkerScore>();
            std::slice::from_raw_parts(first, self.capacity)
        }
    }

    /// Every slot's listener rows, slot by slot.
    fn all_listener_rows(&self) -> &[ListenerScore] {
        // SAFETY: `layout(capacity)` bytes are mapped; the rows follow the slots, at an offset
        // that is a multiple of 128 (header and slots are), so aligned for `ListenerScore`
        // (8); all fields are atomics.
        unsafe {
            let offset = SLOTS_OFFSET + self.capacity * std::mem::size_of::<WorkerScore>();
            let first = self.map.base.as_ptr().add(offset).cast::<ListenerScore>();
            std::slice::from_raw_parts(first, self.capacity * LISTENER_ROWS)
        }
    }

    /// Every slot's children, slot by slot.
    fn all_child_rows(&self) -> &[children::ChildRows] {
        // SAFETY: `layout(capacity)` bytes are mapped; the children follow the listener rows,
        // at an offset that is a multiple of 128 (header, slots and listener rows are), so
        // aligned for `ChildRows` (8); all fields are atomics.
        unsafe {
            let offset = SLOTS_OFFSET
                + self.capacity
                    * (std::mem::size_of::<WorkerScore>()
                        + LISTENER_ROWS * std::mem::size_of::<ListenerScore>());
            let first = self.map.base.as_ptr().add(offset).cast::<children::ChildRows>();
            std::slice::from_raw_parts(first, self.capacity)
        }
    }

    /// Claims `slot` for a new worker of `generation` (by the master, before the fork): the
    /// last worker's listener counters go to the retired totals, then the slot is cleared
    /// ([`WorkerScore::claim`], pid 0 until the fork returns).
    ///
    /// # Panics
    /// If `slot` is not below the capacity (a caller bug).
    pub fn claim(&self, slot: usize, generation: u64) {
        self.retire_listener_rows(slot);
        self.clear_children(slot);
        self.slot(slot).claim(0, generation);
    }

    /// One worker slot.
    ///
    /// # Panics
    /// If `slot` is not below the capacity (a caller bug).
    pub fn slot(&self, slot: usize) -> &WorkerScore {
        &self.slots()[slot]
    }

    /// Publishes the last error (reload or upgrade failure), truncated to [`MESSAGE_BYTES`].
    pub fn set_message(&self, message: &str) {
        let header = self.header();
        let bytes = message.as_bytes();
        let len = bytes.len().min(MESSAGE_BYTES);
        for (i, word) in header.message.iter().enumerate() {
            let mut chunk = [0u8; 4];
            for (j, b) in chunk.iter_mut().enumerate() {
                *b = bytes.get(i * 4 + j).copied().filter(|_| i * 4 + j < len).unwrap_or(0);
            }
            word.store(u32::from_le_bytes(chunk), Ordering::Relaxed);
        }
        header.message_len.store(len as u64, Ordering::Release);
    }

    /// The last error published with [`Scoreboard::set_message`].
    pub fn message(&self) -> String {
        let header = self.header();
        let len = (header.message_len.load(Ordering::Acquire) as usize).min(MESSAGE_BYTES);
        let bytes: Vec<u8> = header
            .message
            .iter()
            .flat_map(|w| w.load(Ordering::Relaxed).to_le_bytes())
            .take(len)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_scoreboard_is_readable_by_another_mapping() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.pid.scoreboard");
        let board = Scoreboard::create(Some(&path), 4).unwrap();
        board.header().generation.store(3, Ordering::Relaxed);
        board.slot(2).claim(4242, 3);
        board.slot(2).set_state(SlotState::Ready);
        board.slot(2).accepted.fetch_add(5, Ordering::Relaxed);
        board.set_message("could not bind 127.0.0.1:80: Permission denied");
        let reader = Scoreboard::open(&path).unwrap();
        assert_eq!(reader.slots().len(), 4);
        assert_eq!(reader.header().generation.load(Ordering::Relaxed), 3);
        assert_eq!(reader.slot(2).pid.load(Ordering::Relaxed), 4242);
        assert_eq!(reader.slot(2).state(), SlotState::Ready);
        assert_eq!(reader.slot(2).accepted.load(Ordering::Relaxed), 5);
        board.slot(2).refused[Refusal::Rate as usize].fetch_add(3, Ordering::Relaxed);
        assert_eq!(reader.refusals()[Refusal::Rate as usize], 3);
        assert_eq!(reader.message(), "could not bind 127.0.0.1:80: Permission denied");
        board.set_message("short");
        assert_eq!(reader.message(), "short");
    }

    #[test]
    fn another_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.scoreboard");
        let board = Scoreboard::create(Some(&path), 2).unwrap();
        board.header().magic.store(u64::from_le_bytes(*b"pfkdscb2"), Ordering::Release);
        let Err(error) = Scoreboard::open(&path) else { panic!("another version was read") };
        let error = error.to_string();
        assert!(error.contains("another version"), "{error}");
    }

    #[test]
    fn a_file_that_is_not_a_scoreboard_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk");
        std::fs::write(&path, vec![7u8; 4096]).unwrap();
        assert!(matches!(Scoreboard::open(&path), Err(ScoreboardError::Invalid { .. })));
    }

    /// Writes `value` at byte `offset` of the file at `path` (a forged header field).
    fn forge(path: &Path, offset: u64, value: u64) {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        file.write_all_at(&value.to_le_bytes(), offset).unwrap();
    }

    #[test]
    fn a_header_claiming_more_slots_than_the_file_holds_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.pid.scoreboard");
        let _board = Scoreboard::create(Some(&path), 4).unwrap();
        let capacity_offset = std::mem::offset_of!(Header, capacity) as u64;
        for claimed in [5, MAX_SLOTS as u64, u64::MAX, u64::MAX / 128 + 1, 1 << 57] {
            forge(&path, capacity_offset, claimed);
            let error = Scoreboard::open(&path).unwrap_err();
            assert!(error.to_string().contains(&format!("claims {claimed} slots")), "{error}");
        }
        forge(&path, capacity_offset, 3);
        assert_eq!(Scoreboard::open(&path).unwrap().slots().len(), 3, "fewer slots are safe");
        let link = dir.path().join("link.scoreboard");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(Scoreboard::open(&link).is_err(), "a symlink is not followed");
    }
}
