//! Per-listener counters of the scoreboard (version 4; datagrams since version 8): one row
//! per (worker slot, listener), the listener names and bound addresses (version 7; Unix
//! socket paths and abstract names too since version 14), and the totals of workers that
//! are gone.
//!
//! Written by the master (names and addresses, at each fork; the retired totals, when it
//! claims a slot for a new worker) and by each worker (its own rows, with its other counters, at most every
//! 100 ms: the hot path writes no shared memory). Read by anyone who maps the scoreboard
//! (the `metrics` service, `preforkd status`).
//!
//! Invariants:
//! - a listener's row index is its stable id (the same name keeps its id across reloads; a
//!   new name gets the next one), so rows never change meaning; listeners with an id at or
//!   above [`LISTENER_ROWS`] have no per-listener counters;
//! - a name, once written for an id, never changes (rewriting it writes the same bytes);
//! - an id's address is the one the master last started workers with; it changes only when a
//!   reload binds that name elsewhere, under a sequence count that readers check
//!   ([`Scoreboard::listener_address`]), so a reader never sees half of two addresses;
//! - every counter except `open` only grows for the life of the master: when the master
//!   claims a slot for a new worker, it first adds the slot's rows to the retired totals,
//!   under a sequence count that readers check ([`Scoreboard::listener_totals`]), so a reader
//!   never sees a counter go back;
//! - `open` is summed over live slots only (a dead worker has no connections).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::address::{self, ADDRESS_WORDS};
use super::{Scoreboard, SlotState};
use crate::net::Address;
use crate::scoreboard::{REFUSALS, Refusal, TLS_FAILURES, TlsFailure};

/// Listener rows per worker slot, and names kept: listeners whose id is at or above it (the
/// 65th distinct name in the master's life) are served but not counted per listener.
pub const LISTENER_ROWS: usize = 64;
/// Bytes of a listener name kept; a longer name is cut and ends in `~ID` (a character no
/// listener name may contain), so names stay distinct.
pub const LISTENER_NAME_BYTES: usize = 64;

/// Why a served connection was closed: the per-listener close counters, in this order.
/// Refusals are counted apart ([`Refusal`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(usize)]
pub enum Close {
    /// The client closed its side and every answer was sent.
    ClientClose = 0,
    /// The service ended the conversation.
    ServerClose = 1,
    /// `short_idle_timeout`.
    IdleShort = 2,
    /// `long_idle_timeout`.
    IdleLong = 3,
    /// `max_long_connections_per_client`: closed after its exchange.
    LongLimit = 4,
    /// A socket error or an internal failure.
    Error = 5,
    /// The worker stopped (graceful or fast).
    Shutdown = 6,
    /// A reason of the service's own (`line-too-long`, `backend-unavailable` ...).
    Service = 7,
}

/// Number of [`Close`] reasons.
pub const CLOSES: usize = 8;

impl Close {
    /// Every reason, in counter order.
    pub const ALL: [Close; CLOSES] = [
        Close::ClientClose,
        Close::ServerClose,
        Close::IdleShort,
        Close::IdleLong,
        Close::LongLimit,
        Close::Error,
        Close::Shutdown,
        Close::Service,
    ];

    /// The access-log spelling (`service` for every reason of a service's own).
    pub fn name(self) -> &'static str {
        match self {
            Close::ClientClose => "client-close",
            Close::ServerClose => "server-close",
            Close::IdleShort => "idle-short",
            Close::IdleLong => "idle-long",
            Close::LongLimit => "long-limit",
            Close::Error => "error",
            Close::Shutdown => "shutdown",
            Close::Service => "service",
        }
    }
}

/// What became of a datagram received on a UDP listener's socket: the per-listener datagram
/// counters, in this order. Each datagram counts under exactly one outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(usize)]
pub enum Datagram {
    /// The service answered it with one datagram.
    Answered = 0,
    /// Not answered: the service chose not to (malformed, unwanted), or the reply could not
    /// be sent (a full send buffer drops it, as the network could).
    Ignored = 1,
    /// Dropped before the service saw it: over the client's `max_datagram_rate_per_client`
    /// (or the shared rate table failed: fail closed).
    OverRate = 2,
    /// Dropped unanswered: the listener's budget of transfers to peers that have not
    /// answered yet is spent (TFTP's `max_unverified_transfers`).
    Unverified = 3,
    /// Started a flow (a TFTP transfer), which then counts like a connection: `accepted`,
    /// `open`, and a close.
    Flow = 4,
    /// Asked for a flow that was refused (the client's `max_connections_per_client`, the
    /// worker's descriptor budget, a graceful stop): the peer got an error.
    FlowRefused = 5,
}

/// Number of [`Datagram`] outcomes.
pub const DATAGRAM_OUTCOMES: usize = 6;

impl Datagram {
    /// Every outcome, in counter order.
    pub const ALL: [Datagram; DATAGRAM_OUTCOMES] = [
        Datagram::Answered,
        Datagram::Ignored,
        Datagram::OverRate,
        Datagram::Unverified,
        Datagram::Flow,
        Datagram::FlowRefused,
    ];

    /// The `status --json` and metrics spelling.
    pub fn name(self) -> &'static str {
        match self {
            Datagram::Answered => "answered",
            Datagram::Ignored => "ignored",
            Datagram::OverRate => "over-rate",
            Datagram::Unverified => "unverified",
            Datagram::Flow => "flow",
            Datagram::FlowRefused => "flow-refused",
        }
    }
}

/// One listener's counters in one worker slot (or in the retired totals).
#[repr(C)]
#[derive(Debug, Default)]
pub struct ListenerScore {
    /// Connections (and UDP flows) open now (accepted, not yet closed).
    pub open: AtomicU64,
    /// Connections accepted and served, and UDP flows started (refused ones are not).
    pub accepted: AtomicU64,
    /// Bytes read from clients (datagrams and flows included).
    pub bytes_in: AtomicU64,
    /// Bytes written to clients (datagrams and flows included).
    pub bytes_out: AtomicU64,
    /// Connections refused or shed, by [`Refusal`].
    pub refused: [AtomicU64; REFUSALS],
    /// Connections closed, by [`Close`].
    pub closed: [AtomicU64; CLOSES],
    /// Connections handed to a worker of a newer generation (or master) at rest, by the
    /// retiring worker that held them: not closed (see preforkd(8), HAND-OFF).
    pub handed_off: AtomicU64,
    /// Connections adopted from a retiring worker.
    pub adopted: AtomicU64,
    /// Datagrams received on the listener's socket, by [`Datagram`] outcome (version 7).
    pub datagrams: [AtomicU64; DATAGRAM_OUTCOMES],
    /// TLS handshakes completed (resumed ones included; version 9).
    pub tls_handshakes: AtomicU64,
    /// Of those, resumed from a session ticket.
    pub tls_resumed: AtomicU64,
    /// TLS handshakes failed, by [`TlsFailure`].
    pub tls_failed: [AtomicU64; TLS_FAILURES],
}

/// A slot's rows take whole 128-byte lines, so workers never share a line.
const _: () = assert!((std::mem::size_of::<ListenerScore>() * LISTENER_ROWS).is_multiple_of(128));

impl ListenerScore {
    /// Every counter that only grows, with `open` left out.
    fn counters(&self) -> impl Iterator<Item = &AtomicU64> {
        [
            &self.accepted,
            &self.bytes_in,
            &self.bytes_out,
            &self.handed_off,
            &self.adopted,
            &self.tls_handshakes,
            &self.tls_resumed,
        ]
        .into_iter()
        .chain(&self.refused)
        .chain(&self.closed)
        .chain(&self.datagrams)
        .chain(&self.tls_failed)
    }
}

/// The master's listener names and retired totals, part of the header.
#[repr(C)]
pub struct ListenerTable {
    /// Ids named so far: rows at or above it hold nothing.
    count: AtomicU64,
    /// Odd while the master folds a slot into `retired` (a sequence count for readers).
    folding: AtomicU64,
    name_len: [AtomicU32; LISTENER_ROWS],
    names: [[AtomicU64; LISTENER_NAME_BYTES / 8]; LISTENER_ROWS],
    /// Odd while the master rewrites an address (a sequence count for readers; version 7).
    rebinding: AtomicU64,
    /// Bound addresses by id, as `address::encode` writes them (version 7; of every kind
    /// since version 14).
    addresses: [[AtomicU64; ADDRESS_WORDS]; LISTENER_ROWS],
    /// Counters of workers that are gone, per listener id.
    retired: [ListenerScore; LISTENER_ROWS],
}

/// A listener's counters summed over every worker the master started: a plain value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenerTotals {
    /// The listener's name.
    pub name: String,
    /// Where its socket is bound (with the port the kernel chose for port 0; a Unix socket's
    /// path or abstract name); `None` before the master published it.
    pub address: Option<Address>,
    /// Connections open now, over live workers.
    pub open: u64,
    /// Connections accepted and served since the master started.
    pub accepted: u64,
    /// Bytes read from clients.
    pub bytes_in: u64,
    /// Bytes written to clients.
    pub bytes_out: u64,
    /// Refusals by [`Refusal`].
    pub refused: [u64; REFUSALS],
    /// Closes by [`Close`].
    pub closed: [u64; CLOSES],
    /// Connections handed off to a newer generation (or master) by retiring workers.
    pub handed_off: u64,
    /// Connections adopted from retiring workers.
    pub adopted: u64,
    /// Datagrams by [`Datagram`] outcome.
    pub datagrams: [u64; DATAGRAM_OUTCOMES],
    /// TLS handshakes completed, resumed ones included.
    pub tls_handshakes: u64,
    /// TLS handshakes that resumed a session.
    pub tls_resumed: u64,
    /// TLS handshake failures by [`TlsFailure`].
    pub tls_failed: [u64; TLS_FAILURES],
}

impl ListenerTotals {
    fn add(&mut self, row: &ListenerScore) {
        self.accepted += row.accepted.load(Ordering::Relaxed);
        self.handed_off += row.handed_off.load(Ordering::Relaxed);
        self.adopted += row.adopted.load(Ordering::Relaxed);
        self.bytes_in += row.bytes_in.load(Ordering::Relaxed);
        self.bytes_out += row.bytes_out.load(Ordering::Relaxed);
        for (total, counter) in self.refused.iter_mut().zip(&row.refused) {
            *total += counter.load(Ordering::Relaxed);
        }
        for (total, counter) in self.closed.iter_mut().zip(&row.closed) {
            *total += counter.load(Ordering::Relaxed);
        }
        for (total, counter) in self.datagrams.iter_mut().zip(&row.datagrams) {
            *total += counter.load(Ordering::Relaxed);
        }
        self.tls_handshakes += row.tls_handshakes.load(Ordering::Relaxed);
        self.tls_resumed += row.tls_resumed.load(Ordering::Relaxed);
        for (total, counter) in self.tls_failed.iter_mut().zip(&row.tls_failed) {
            *total += counter.load(Ordering::Relaxed);
        }
    }

    /// TLS handshake failures for `reason`.
    pub fn tls_failed(&self, reason: TlsFailure) -> u64 {
        self.tls_failed[reason as usize]
    }

    /// Refusals for `reason`.
    pub fn refused(&self, reason: Refusal) -> u64 {
        self.refused[reason as usize]
    }

    /// Datagrams with `outcome`.
    pub fn datagrams(&self, outcome: Datagram) -> u64 {
        self.datagrams[outcome as usize]
    }
}

/// The name kept for listener `id` called `name`: at most [`LISTENER_NAME_BYTES`] bytes.
pub fn kept_name(id: u16, name: &str) -> String {
    if name.len() <= LISTENER_NAME_BYTES {
        return name.to_owned();
    }
    let suffix = format!("~{id}");
    let mut cut = LISTENER_NAME_BYTES - suffix.len();
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{suffix}", &name[..cut])
}

/// How many times a reader retries while the master folds, before it takes what it read.
const READ_RETRIES: usize = 1000;

impl Scoreboard {
    fn listener_table(&self) -> &ListenerTable {
        &self.header().listeners
    }

    /// Ids named so far, at most [`LISTENER_ROWS`] (a forged file cannot claim more).
    fn listener_count(&self) -> usize {
        (self.listener_table().count.load(Ordering::Acquire) as usize).min(LISTENER_ROWS)
    }

    /// Publishes the names and bound addresses of the serving listeners, `(id, name,
    /// address)` (by the master, before it forks a worker, and when a rollback brings the
    /// previous listeners back). Ids at or above [`LISTENER_ROWS`] are skipped.
    pub fn name_listeners<'n>(
        &self,
        listeners: impl IntoIterator<Item = (u16, &'n str, Option<&'n Address>)>,
    ) {
        let table = self.listener_table();
        for (id, name, address) in listeners {
            let index = usize::from(id);
            if index >= LISTENER_ROWS {
                continue;
            }
            let kept = kept_name(id, name);
            let mut bytes = [0u8; LISTENER_NAME_BYTES];
            bytes[..kept.len()].copy_from_slice(kept.as_bytes());
            for (word, chunk) in table.names[index].iter().zip(bytes.chunks_exact(8)) {
                word.store(
                    u64::from_le_bytes(chunk.try_into().expect("8 bytes")),
                    Ordering::Relaxed,
                );
            }
            table.name_len[index].store(kept.len() as u32, Ordering::Release);
            self.publish_address(index, address);
            table.count.fetch_max(index as u64 + 1, Ordering::AcqRel);
        }
    }

    /// Writes the address of listener `index` if it changed, inside the sequence count.
    fn publish_address(&self, index: usize, address: Option<&Address>) {
        let table = self.listener_table();
        let words = address::encode(address);
        let row = &table.addresses[index];
        if row.iter().zip(words).all(|(word, value)| word.load(Ordering::Relaxed) == value) {
            return;
        }
        table.rebinding.fetch_add(1, Ordering::AcqRel);
        for (word, value) in row.iter().zip(words) {
            word.store(value, Ordering::Relaxed);
        }
        table.rebinding.fetch_add(1, Ordering::AcqRel);
    }

    /// Where listener `id` is bound, if the master published it. Consistent with respect to
    /// a rebinding: a reader that overlaps one reads again.
    pub fn listener_address(&self, id: usize) -> Option<Address> {
        let table = self.listener_table();
        let row = table.addresses.get(id)?;
        let mut words = [0; ADDRESS_WORDS];
        for _ in 0..READ_RETRIES {
            let before = table.rebinding.load(Ordering::Acquire);
            for (value, word) in words.iter_mut().zip(row) {
                *value = word.load(Ordering::Relaxed);
            }
            let after = table.rebinding.load(Ordering::Acquire);
            if before.is_multiple_of(2) && before == after {
                break;
            }
            std::hint::spin_loop();
        }
        address::decode(&words)
    }

    /// The name of listener `id`, if it was published (lossy: the file is not trusted).
    pub fn listener_name(&self, id: usize) -> Option<String> {
        let table = self.listener_table();
        let len =
            (table.name_len.get(id)?.load(Ordering::Acquire) as usize).min(LISTENER_NAME_BYTES);
        if len == 0 {
            return None;
        }
        let bytes: Vec<u8> =
            table.names[id].iter().flat_map(|w| w.load(Ordering::Relaxed).to_le_bytes()).collect();
        Some(String::from_utf8_lossy(&bytes[..len]).into_owned())
    }

    /// The rows of worker slot `slot`, by listener id.
    ///
    /// # Panics
    /// If `slot` is not below the capacity (a caller bug).
    pub fn listener_rows(&self, slot: usize) -> &[ListenerScore] {
        &self.all_listener_rows()[slot * LISTENER_ROWS..(slot + 1) * LISTENER_ROWS]
    }

    /// Adds the counters of `slot`'s last worker to the retired totals and clears its rows
    /// (by the master, when it claims the slot for a new worker).
    pub(super) fn retire_listener_rows(&self, slot: usize) {
        let table = self.listener_table();
        let count = self.listener_count();
        table.folding.fetch_add(1, Ordering::AcqRel);
        for (row, retired) in self.listener_rows(slot).iter().zip(&table.retired).take(count) {
            for (from, to) in row.counters().zip(retired.counters()) {
                let n = from.swap(0, Ordering::Relaxed);
                if n > 0 {
                    to.fetch_add(n, Ordering::Relaxed);
                }
            }
            row.open.store(0, Ordering::Relaxed);
        }
        table.folding.fetch_add(1, Ordering::AcqRel);
    }

    /// Every named listener's counters, summed over the retired totals and every slot, by
    /// listener id. Consistent with respect to the master's folds: a reader that overlaps
    /// one reads again.
    pub fn listener_totals(&self) -> Vec<ListenerTotals> {
        let table = self.listener_table();
        let count = self.listener_count();
        let mut totals = Vec::new();
        for _ in 0..READ_RETRIES {
            let before = table.folding.load(Ordering::Acquire);
            totals = (0..count)
                .map(|id| {
                    let mut total = ListenerTotals {
                        name: self.listener_name(id).unwrap_or_else(|| format!("~{id}")),
                        address: self.listener_address(id),
                        ..ListenerTotals::default()
                    };
                    total.add(&table.retired[id]);
                    for (slot, score) in self.slots().iter().enumerate() {
                        let row = &self.listener_rows(slot)[id];
                        total.add(row);
                        if score.state() != SlotState::Empty {
                            total.open += row.open.load(Ordering::Relaxed);
                        }
                    }
                    total
                })
                .collect();
            let after = table.folding.load(Ordering::Acquire);
            if before.is_multiple_of(2) && before == after {
                break;
            }
            std::hint::spin_loop();
        }
        totals
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_sum_slots_and_survive_a_new_worker_in_the_slot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.pid.scoreboard");
        let board = Scoreboard::create(Some(&path), 2).unwrap();
        let (echo, metrics): (Option<Address>, Option<Address>) =
            ("127.0.0.1:7".parse().ok(), "[::1]:9464".parse().ok());
        board.name_listeners([(0, "echo", echo.as_ref()), (1, "metrics", metrics.as_ref())]);
        board.claim(0, 1);
        board.claim(1, 1);
        board.slot(0).set_state(SlotState::Ready);
        board.slot(1).set_state(SlotState::Ready);
        let row = &board.listener_rows(0)[0];
        row.accepted.fetch_add(3, Ordering::Relaxed);
        row.open.store(2, Ordering::Relaxed);
        row.closed[Close::ClientClose as usize].fetch_add(1, Ordering::Relaxed);
        board.listener_rows(1)[0].refused[Refusal::Rate as usize].fetch_add(4, Ordering::Relaxed);
        row.datagrams[Datagram::Answered as usize].fetch_add(7, Ordering::Relaxed);
        let reader = Scoreboard::open(&path).unwrap();
        let totals = reader.listener_totals();
        assert_eq!(totals.len(), 2);
        assert_eq!((totals[0].name.as_str(), totals[1].name.as_str()), ("echo", "metrics"));
        assert_eq!((&totals[0].address, &totals[1].address), (&echo, &metrics));
        assert_eq!((totals[0].accepted, totals[0].open), (3, 2));
        assert_eq!(totals[0].refused(Refusal::Rate), 4);
        // The worker of slot 0 dies and a new one takes the slot: its counters are kept,
        // its open connections are not.
        board.slot(0).release();
        assert_eq!(reader.listener_totals()[0].open, 0);
        assert_eq!(reader.listener_totals()[0].accepted, 3, "a dead worker's counters stay");
        board.claim(0, 2);
        board.listener_rows(0)[0].accepted.fetch_add(1, Ordering::Relaxed);
        let totals = reader.listener_totals();
        assert_eq!(totals[0].accepted, 4);
        assert_eq!(totals[0].closed[Close::ClientClose as usize], 1);
        assert_eq!(totals[0].refused(Refusal::Rate), 4);
        assert_eq!(totals[0].datagrams(Datagram::Answered), 7, "folded with the rest");
    }

    #[test]
    fn long_names_stay_distinct_and_forged_counts_stay_in_bounds() {
        let long = "a".repeat(100);
        let kept = [kept_name(3, &long), kept_name(4, &long)];
        assert!(kept.iter().all(|k| k.len() == LISTENER_NAME_BYTES), "{kept:?}");
        assert_ne!(kept[0], kept[1]);
        assert_eq!(kept_name(3, "echo"), "echo");
        let board = Scoreboard::create(None, 1).unwrap();
        let any: Option<Address> = "127.0.0.1:0".parse().ok();
        board.name_listeners([
            (0, long.as_str(), any.as_ref()),
            (LISTENER_ROWS as u16, "over", any.as_ref()),
        ]);
        assert_eq!(board.listener_totals().len(), 1, "an id past the rows is not named");
        board.listener_table().count.store(u64::MAX, Ordering::Release);
        assert_eq!(board.listener_totals().len(), LISTENER_ROWS);
    }

    #[test]
    fn a_rebinding_replaces_the_address_of_whatever_kind() {
        let board = Scoreboard::create(None, 1).unwrap();
        assert_eq!(board.listener_address(0), None);
        let first: Option<Address> = "127.0.0.1:4000".parse().ok();
        board.name_listeners([(0, "echo", first.as_ref())]);
        board.name_listeners([(0, "echo", first.as_ref())]);
        assert_eq!(board.listener_table().rebinding.load(Ordering::Relaxed), 2, "written once");
        for text in ["[::1]:4001", "unix:/run/preforkd/echo.sock", "unix:@echo", "127.0.0.1:9"] {
            let moved: Option<Address> = text.parse().ok();
            board.name_listeners([(0, "echo", moved.as_ref())]);
            assert_eq!(board.listener_address(0), moved, "{text}");
        }
        board.name_listeners([(0, "echo", None)]);
        assert_eq!(board.listener_address(0), None);
        assert_eq!(board.listener_address(LISTENER_ROWS), None, "past the rows");
    }
}
