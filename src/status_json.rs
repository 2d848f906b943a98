//! `preforkd status --json`: the scoreboard as one JSON document, for scripts and monitoring
//! agents.
//!
//! Runs in the short-lived control process, over a scoreboard it mapped read-only; it never
//! writes to it. The document is a [`Snapshot`] serialized on one line (RFC 8259). Its field
//! names, units and meanings are the schema, versioned by [`SCHEMA`]: within a version fields
//! may be added, never renamed, removed or given another meaning or unit. README.md and
//! preforkd(8) document it.
//!
//! Every field is read with its own atomic load while the daemon runs, so the document is not
//! one instant: a connection accepted during the read may show in `accepted` and not yet in
//! `open`. Counters are monotonic for a worker's lifetime and start again at 0 for a new pid.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use serde::Serialize;

use crate::clock::{monotonic_ms, unix_ms};
use crate::scoreboard::{Close, Datagram, Refusal, Scoreboard, SlotState, TlsFailure};

/// Version of the document's schema, its `"schema"` field. Raised only for a change that
/// would break a reader of the previous version.
pub const SCHEMA: u32 = 1;

/// The whole document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    /// [`SCHEMA`].
    pub schema: u32,
    /// When the snapshot was taken: Unix time in milliseconds.
    pub time_unix_ms: u64,
    /// The master's part.
    pub master: Master,
    /// Every worker with a process (booting, ready or draining), by slot number. Empty
    /// slots are left out.
    pub workers: Vec<Worker>,
    /// Every listener the master has named since it started (the first 64), by listener
    /// id: counters over every worker, those gone included (added in schema 1).
    pub listeners: Vec<Listener>,
    /// Every backend address of the relay listeners the serving configuration names, by row
    /// (added in schema 1).
    pub backends: Vec<Backend>,
    /// While a binary upgrade's old master still runs (its workers retiring, serving what
    /// they could not hand off: exec children, TFTP transfers), the same document for its
    /// scoreboard, whose `old_master` is null; null otherwise (added in schema 1).
    pub old_master: Option<Box<Snapshot>>,
}

/// One backend address of a relay listener: its health and its counters (counted over every
/// worker and generation since the backend was first configured).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Backend {
    /// Its listener's name.
    pub listener: String,
    /// The backend as written (`"10.0.0.11:6379"`, `"redis.internal:6379"`,
    /// `"unix:/run/redis.sock"`).
    pub name: String,
    /// The address connects go to now (a host name's resolved address), `null` while a host
    /// name has none.
    pub address: Option<String>,
    /// Whether new connections may go to it: it has an address and neither the active check
    /// nor the passive health says it is down.
    pub up: bool,
    /// The active check's verdict: `"unchecked"` (no check), `"pending"` (no verdict yet:
    /// used as if up), `"up"` or `"down"`.
    pub check: &'static str,
    /// Why it is not up (`"check failed: expected \"+PONG\", got \"-ERR\""`, `"3 failed
    /// connects in a row"`, `"resolution: no address"`); `"not checked yet"` while it is
    /// used pending its first verdict; else empty.
    pub reason: String,
    /// Its weight.
    pub weight: u32,
    /// A backup, used only while every other backend is down.
    pub backup: bool,
    /// Its `max_connections` (0: no cap).
    pub max_connections: u32,
    /// Connections to it open now, over every worker.
    pub active: u64,
    /// Connects that succeeded.
    pub connects: u64,
    /// Connects that failed (refused, timed out).
    pub failures: u64,
    /// Bytes relayed from clients to it (added up at least every MiB and at each close).
    pub bytes_in: u64,
    /// Bytes relayed from it to clients.
    pub bytes_out: u64,
    /// Active checks that failed.
    pub checks_failed: u64,
    /// When the last check ended, Unix milliseconds; 0: never checked.
    pub last_check_unix_ms: u64,
    /// How long the last check took, in microseconds.
    pub check_duration_us: u64,
}

/// One listener of a [`Snapshot`]: its counters since the master started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Listener {
    /// The listener's `name` (cut to 64 bytes, ending in `~ID`, if longer).
    pub name: String,
    /// Where its socket is bound, `"IP:PORT"` (`"[IPv6]:PORT"`), with the port the kernel
    /// chose for a configured port 0, or as configured for a Unix-domain listener,
    /// `"unix:/path"` or `"unix:@name"`: the address the master last started workers with (a
    /// listener a reload removed keeps its last one). `null` before it was published (added
    /// in schema 1).
    pub address: Option<String>,
    /// Connections open now, over live workers (a UDP listener's flows, such as TFTP
    /// transfers, count as connections).
    pub open: u64,
    /// Connections accepted and served (and flows started).
    pub accepted: u64,
    /// Bytes read from clients (datagrams and flows included).
    pub bytes_in: u64,
    /// Bytes written to clients (datagrams and flows included).
    pub bytes_out: u64,
    /// Connections refused or shed, by reason (`denied`, `rate`, `limit`, `listener-full`,
    /// `shed`, `proxy-header`, `over-share` (added in schema 1); every reason is present).
    pub refused: BTreeMap<&'static str, u64>,
    /// Connections closed, by reason (`client-close`, `server-close`, `idle-short`,
    /// `idle-long`, `long-limit`, `error`, `shutdown`, `service`; every reason is present).
    pub closed: BTreeMap<&'static str, u64>,
    /// Connections handed off by retiring workers to the serving generation (or, after an
    /// upgrade, the new master); not closes.
    pub handed_off: u64,
    /// Connections adopted from retiring workers.
    pub adopted: u64,
    /// Datagrams received on the listener's socket, by outcome (`answered`, `ignored`,
    /// `over-rate`, `unverified`, `flow`, `flow-refused`; every outcome is present, 0 for a
    /// TCP listener; added in schema 1).
    pub datagrams: BTreeMap<&'static str, u64>,
    /// TLS handshakes completed (resumed ones included); 0 on a plain listener (added in
    /// schema 1).
    pub tls_handshakes: u64,
    /// TLS handshakes that resumed a session from a ticket.
    pub tls_resumed: u64,
    /// TLS handshakes failed, by reason (`timeout`, `closed`, `not-tls`, `incompatible`,
    /// `no-client-certificate`, `bad-client-certificate`, `client-alert`, `protocol`; every
    /// reason is present). A failed handshake is not among `closed`.
    pub tls_failed: BTreeMap<&'static str, u64>,
}

/// The master's part of a [`Snapshot`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Master {
    /// The master's pid.
    pub pid: i32,
    /// The serving configuration generation: 1 at start, one more per applied reload.
    pub generation: u64,
    /// Master start: Unix time in milliseconds.
    pub started_unix_ms: u64,
    /// Milliseconds since the master started (wall clock).
    pub uptime_ms: u64,
    /// Workers the serving generation should have (`daemon.workers`, changed by TTIN/TTOU).
    pub target_workers: u64,
    /// Reloads applied since the master started.
    pub reloads_applied: u64,
    /// Reloads rejected (invalid file, bind failure) or rolled back since the master started.
    pub reloads_rejected: u64,
    /// Log reopens (USR1) done since the master started.
    pub log_reopens: u64,
    /// Binary upgrades (USR2) whose new master did not come up.
    pub upgrades_failed: u64,
    /// Workers that exited without being asked to while their generation served, each then
    /// forked again (added in schema 1).
    pub worker_restarts: u64,
    /// Workers replaced because they asked to be (recycling: `daemon.recycle_*`; added in
    /// schema 1).
    pub worker_recycles: u64,
    /// `"none"`, or `"new-master-running"` while a new master this one started runs (added
    /// in schema 1).
    pub upgrade_state: &'static str,
    /// The message of the last failed reload, upgrade or log reopen; `null` when there is
    /// none, or once a reload was applied after it.
    pub last_error: Option<String>,
}

/// One worker of a [`Snapshot`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Worker {
    /// The scoreboard slot, from 0; a respawned worker may take another slot.
    pub slot: usize,
    /// The worker's pid.
    pub pid: i32,
    /// The configuration generation the worker runs; older than the master's while it drains
    /// after a reload.
    pub generation: u64,
    /// `"booting"` (forked, setting up), `"ready"` (accepting and serving) or `"draining"`
    /// (retired or stopping: no longer accepting; handing off or finishing its connections).
    pub state: &'static str,
    /// Connections open now.
    pub open: u64,
    /// Connections accepted since the worker started.
    pub accepted: u64,
    /// Bytes read from clients since the worker started.
    pub bytes_in: u64,
    /// Bytes written to clients since the worker started.
    pub bytes_out: u64,
    /// Worker start (fork): Unix time in milliseconds.
    pub started_unix_ms: u64,
    /// Milliseconds since the worker started (wall clock).
    pub uptime_ms: u64,
    /// Milliseconds since the worker's loop last turned (monotonic clock); a ready worker
    /// beats at least every third of `worker_timeout`.
    pub heartbeat_age_ms: u64,
    /// Children (exec's programs) a draining worker still supervises, for connections it
    /// could not hand off: it serves them until they end. 0 for a serving worker (added in
    /// schema 1).
    pub children_total: u64,
    /// The first of them (at most 8), oldest connection first (added in schema 1).
    pub children: Vec<Child>,
}

/// A child a draining worker supervises (see [`Worker::children`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Child {
    /// The child's pid.
    pub pid: u32,
    /// Its listener's name (empty if the master never named that listener id).
    pub listener: String,
    /// When its connection was accepted: Unix time in milliseconds.
    pub started_unix_ms: u64,
    /// Milliseconds since then (wall clock).
    pub age_ms: u64,
}

/// Reads `board` into a [`Snapshot`], with the clocks given: `now_unix_ms` (wall clock, Unix
/// milliseconds) and `now_monotonic_ms` (`CLOCK_MONOTONIC` milliseconds). Ages that would be
/// negative (a clock stepped back) are 0.
pub fn snapshot(board: &Scoreboard, now_unix_ms: u64, now_monotonic_ms: u64) -> Snapshot {
    let header = board.header();
    let started = header.started_unix_ms.load(Ordering::Relaxed);
    let message = board.message();
    let master = Master {
        pid: header.master_pid.load(Ordering::Relaxed),
        generation: header.generation.load(Ordering::Relaxed),
        started_unix_ms: started,
        uptime_ms: now_unix_ms.saturating_sub(started),
        target_workers: header.target_workers.load(Ordering::Relaxed),
        reloads_applied: header.reloads_ok.load(Ordering::Relaxed),
        reloads_rejected: header.reloads_failed.load(Ordering::Relaxed),
        log_reopens: header.reopens.load(Ordering::Relaxed),
        upgrades_failed: header.upgrades_failed.load(Ordering::Relaxed),
        worker_restarts: header.worker_restarts.load(Ordering::Relaxed),
        worker_recycles: u64::from(header.worker_recycles.load(Ordering::Relaxed)),
        upgrade_state: header.upgrade_state().name(),
        last_error: (!message.is_empty()).then_some(message),
    };
    let workers = board
        .slots()
        .iter()
        .enumerate()
        .filter_map(|(slot, score)| {
            let pid = score.pid.load(Ordering::Acquire);
            let state = score.state();
            if pid == 0 || state == SlotState::Empty {
                return None;
            }
            let started = score.started_unix_ms.load(Ordering::Relaxed);
            Some(Worker {
                slot,
                pid,
                generation: score.generation.load(Ordering::Relaxed),
                state: state.name(),
                open: score.open.load(Ordering::Relaxed),
                accepted: score.accepted.load(Ordering::Relaxed),
                bytes_in: score.bytes_in.load(Ordering::Relaxed),
                bytes_out: score.bytes_out.load(Ordering::Relaxed),
                started_unix_ms: started,
                uptime_ms: now_unix_ms.saturating_sub(started),
                heartbeat_age_ms: now_monotonic_ms
                    .saturating_sub(score.heartbeat_ms.load(Ordering::Relaxed)),
                children_total: board.children(slot).0,
                children: board
                    .children(slot)
                    .1
                    .into_iter()
                    .map(|child| Child {
                        pid: child.pid,
                        listener: board
                            .listener_name(usize::from(child.listener))
                            .unwrap_or_default(),
                        started_unix_ms: child.started_unix_ms,
                        age_ms: now_unix_ms.saturating_sub(child.started_unix_ms),
                    })
                    .collect(),
            })
        })
        .collect();
    let listeners = board
        .listener_totals()
        .into_iter()
        .map(|totals| Listener {
            refused: Refusal::ALL.iter().map(|&r| (r.name(), totals.refused(r))).collect(),
            closed: Close::ALL.iter().map(|&c| (c.name(), totals.closed[c as usize])).collect(),
            datagrams: Datagram::ALL.iter().map(|&d| (d.name(), totals.datagrams(d))).collect(),
            name: totals.name,
            address: totals.address.as_ref().map(ToString::to_string),
            open: totals.open,
            accepted: totals.accepted,
            bytes_in: totals.bytes_in,
            bytes_out: totals.bytes_out,
            handed_off: totals.handed_off,
            adopted: totals.adopted,
            tls_handshakes: totals.tls_handshakes,
            tls_resumed: totals.tls_resumed,
            tls_failed: TlsFailure::ALL
                .iter()
                .map(|&f| (f.name(), totals.tls_failed[f as usize]))
                .collect(),
        })
        .collect();
    let names: BTreeMap<usize, String> = board
        .listener_totals()
        .into_iter()
        .enumerate()
        .map(|(id, totals)| (id, totals.name))
        .collect();
    let backends = board
        .backends()
        .views()
        .into_iter()
        .map(|view| Backend {
            listener: names.get(&usize::from(view.listener)).cloned().unwrap_or_default(),
            name: view.name,
            address: view.address.map(|a| a.to_string()),
            up: view.up,
            check: view.health.name(),
            reason: view.reason,
            weight: view.weight,
            backup: view.backup,
            max_connections: view.max_connections,
            active: view.active,
            connects: view.connects,
            failures: view.failures,
            bytes_in: view.bytes_in,
            bytes_out: view.bytes_out,
            checks_failed: view.checks_failed,
            last_check_unix_ms: view.last_check_unix_ms,
            check_duration_us: view.check_us,
        })
        .collect();
    Snapshot {
        schema: SCHEMA,
        time_unix_ms: now_unix_ms,
        master,
        workers,
        listeners,
        backends,
        old_master: None,
    }
}

/// The JSON document of `board` now, on one line without a trailing newline.
pub fn render(board: &Scoreboard) -> String {
    render_with(board, None)
}

/// [`render`], with `old`, the scoreboard of a binary upgrade's old master that still runs,
/// as [`Snapshot::old_master`].
pub fn render_with(board: &Scoreboard, old: Option<&Scoreboard>) -> String {
    let (now_unix, now_monotonic) = (unix_ms(), monotonic_ms());
    let mut snapshot = snapshot(board, now_unix, now_monotonic);
    snapshot.old_master = old.map(|old| Box::new(self::snapshot(old, now_unix, now_monotonic)));
    serde_json::to_string(&snapshot).expect("a Snapshot's maps have string keys")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn the_document_holds_the_master_and_every_live_worker() {
        let board = Scoreboard::create(None, 4).unwrap();
        let header = board.header();
        header.master_pid.store(100, Ordering::Relaxed);
        header.generation.store(2, Ordering::Relaxed);
        header.started_unix_ms.store(1_000, Ordering::Relaxed);
        header.target_workers.store(2, Ordering::Relaxed);
        header.reloads_ok.store(1, Ordering::Relaxed);
        header.reloads_failed.store(3, Ordering::Relaxed);
        board.set_message("could not bind 127.0.0.1:80: Permission denied");
        board.slot(1).claim(101, 2);
        board.slot(1).set_state(SlotState::Ready);
        board.slot(1).started_unix_ms.store(4_000, Ordering::Relaxed);
        board.slot(1).heartbeat_ms.store(500, Ordering::Relaxed);
        board.slot(1).accepted.store(7, Ordering::Relaxed);
        board.slot(1).open.store(2, Ordering::Relaxed);
        board.slot(1).bytes_in.store(70, Ordering::Relaxed);
        board.slot(1).bytes_out.store(69, Ordering::Relaxed);
        board.slot(3).claim(99, 1);
        board.slot(3).set_state(SlotState::Draining);
        board.slot(3).started_unix_ms.store(2_000, Ordering::Relaxed);
        board.slot(3).heartbeat_ms.store(800, Ordering::Relaxed);
        let git = "127.0.0.1:9418".parse().unwrap();
        board.name_listeners([(0, "git", Some(&git))]);
        let child = crate::scoreboard::Child { pid: 4242, listener: 0, started_unix_ms: 7_000 };
        board.set_children(3, [child].into_iter());
        // A released slot keeps its last counters but has no process: left out.
        board.slot(2).claim(98, 1);
        board.slot(2).release();

        let text = serde_json::to_string(&snapshot(&board, 10_000, 900)).unwrap();
        let mut parsed: Value = serde_json::from_str(&text).unwrap();
        // The child's listener is named (and so listed): its counters are another test's.
        let listeners = parsed.as_object_mut().unwrap().insert("listeners".into(), json!([]));
        assert_eq!(listeners.unwrap()[0]["name"], "git");
        assert_eq!(
            parsed,
            json!({
                "schema": 1,
                "time_unix_ms": 10_000,
                "master": {
                    "pid": 100, "generation": 2, "started_unix_ms": 1_000, "uptime_ms": 9_000,
                    "target_workers": 2, "reloads_applied": 1, "reloads_rejected": 3,
                    "log_reopens": 0, "upgrades_failed": 0, "worker_restarts": 0,
                    "worker_recycles": 0, "upgrade_state": "none",
                    "last_error": "could not bind 127.0.0.1:80: Permission denied"
                },
                "workers": [
                    {
                        "slot": 1, "pid": 101, "generation": 2, "state": "ready", "open": 2,
                        "accepted": 7, "bytes_in": 70, "bytes_out": 69,
                        "started_unix_ms": 4_000, "uptime_ms": 6_000, "heartbeat_age_ms": 400,
                        "children_total": 0, "children": []
                    },
                    {
                        "slot": 3, "pid": 99, "generation": 1, "state": "draining", "open": 0,
                        "accepted": 0, "bytes_in": 0, "bytes_out": 0,
                        "started_unix_ms": 2_000, "uptime_ms": 8_000, "heartbeat_age_ms": 100,
                        "children_total": 1,
                        "children": [
                            { "pid": 4242, "listener": "git", "started_unix_ms": 7_000, "age_ms": 3_000 }
                        ]
                    }
                ],
                "listeners": [],
                "backends": [],
                "old_master": null
            })
        );
    }

    #[test]
    fn no_error_is_null_and_clocks_stepped_back_give_zero_ages() {
        let board = Scoreboard::create(None, 1).unwrap();
        board.header().started_unix_ms.store(5_000, Ordering::Relaxed);
        board.slot(0).claim(7, 1);
        board.slot(0).started_unix_ms.store(5_000, Ordering::Relaxed);
        board.slot(0).heartbeat_ms.store(900, Ordering::Relaxed);
        let snapshot = snapshot(&board, 4_000, 100);
        assert_eq!(snapshot.master.last_error, None);
        assert_eq!(snapshot.master.uptime_ms, 0);
        assert_eq!(snapshot.workers[0].state, "booting");
        assert_eq!((snapshot.workers[0].uptime_ms, snapshot.workers[0].heartbeat_age_ms), (0, 0));
        let parsed: Value = serde_json::to_value(&snapshot).unwrap();
        assert_eq!(parsed["master"]["last_error"], Value::Null);
    }

    #[test]
    fn render_is_one_line_of_json_with_an_old_master_inside_while_it_runs() {
        let board = Scoreboard::create(None, 2).unwrap();
        let text = render(&board);
        assert!(!text.contains('\n'), "{text}");
        let parsed: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed["schema"], 1);
        assert_eq!(parsed["workers"], json!([]));
        assert_eq!(parsed["old_master"], Value::Null);
        let old = Scoreboard::create(None, 2).unwrap();
        old.header().master_pid.store(7, Ordering::Relaxed);
        old.slot(1).claim(8, 3);
        old.slot(1).set_state(SlotState::Draining);
        let parsed: Value = serde_json::from_str(&render_with(&board, Some(&old))).unwrap();
        let inner = &parsed["old_master"];
        assert_eq!((&inner["master"]["pid"], &inner["workers"][0]["pid"]), (&json!(7), &json!(8)));
        assert_eq!(inner["workers"][0]["state"], "draining");
        assert_eq!(inner["old_master"], Value::Null, "one level only");
    }

    #[test]
    fn listeners_carry_their_counters_by_reason() {
        let board = Scoreboard::create(None, 1).unwrap();
        let echo = "[::1]:7007".parse().unwrap();
        board.name_listeners([(0, "echo", Some(&echo))]);
        board.claim(0, 1);
        board.slot(0).set_state(SlotState::Ready);
        let row = &board.listener_rows(0)[0];
        row.accepted.store(4, Ordering::Relaxed);
        row.open.store(1, Ordering::Relaxed);
        row.refused[Refusal::Shed as usize].store(2, Ordering::Relaxed);
        row.closed[Close::IdleShort as usize].store(3, Ordering::Relaxed);
        row.refused[Refusal::OverShare as usize].store(5, Ordering::Relaxed);
        row.datagrams[Datagram::Unverified as usize].store(6, Ordering::Relaxed);
        let parsed: Value = serde_json::from_str(&render(&board)).unwrap();
        let echo = &parsed["listeners"][0];
        assert_eq!(
            (&echo["name"], &echo["accepted"], &echo["open"]),
            (&json!("echo"), &json!(4), &json!(1))
        );
        assert_eq!(echo["address"], "[::1]:7007");
        assert_eq!(echo["refused"]["shed"], 2);
        assert_eq!(echo["refused"]["denied"], 0);
        assert_eq!(echo["closed"]["idle-short"], 3);
        assert_eq!(echo["closed"].as_object().unwrap().len(), 8);
        assert_eq!(echo["refused"]["over-share"], 5);
        assert_eq!(echo["refused"].as_object().unwrap().len(), 7);
        assert_eq!(echo["datagrams"]["unverified"], 6);
        assert_eq!(echo["datagrams"]["answered"], 0);
        assert_eq!(echo["datagrams"].as_object().unwrap().len(), 6);
    }
}
