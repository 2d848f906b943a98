//! Upstream servers (backends) a service connects to, as the daemon sees them: their
//! targets (an address, or a host name to resolve), weights, backups and caps, the active
//! health check, and where each one's row is in the scoreboard's backend table.
//!
//! Built in the master with the service (from its options); placed by the master before it
//! forks the generation's workers and health checker ([`Upstreams::place`]), so every
//! process of the generation finds the same rows; read by the workers (the relay picks a
//! backend from its rows) and by the health checker (which probes and resolves them). A
//! service declares its upstreams with [`crate::services::Service::upstreams`].
//!
//! Invariants: a backend written as an address has one row; one written as a host name has
//! [`MAX_ADDRESSES_PER_NAME`] rows, one per address it may resolve to (the checker fills
//! them; the unused ones have no address and are never picked). A row is keyed by the
//! listener's name, the backend as written and the address slot, so a reload that keeps a
//! backend keeps its row: its health, its resolved addresses and its connection counts.

use std::fmt;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::OnceLock;
use std::time::Duration;

use crate::net::Address;
use crate::scoreboard::{BackendTable, RowSettings};

/// Addresses one host name may resolve to and be used by, at most: the first ones in
/// resolver order; the others are left out (and the log says so).
pub const MAX_ADDRESSES_PER_NAME: usize = 8;

/// Largest `weight` (HAProxy's range is 0 to 256; 0 is not taken here: leave a backend out
/// instead).
pub const MAX_WEIGHT: u32 = 256;

/// What a backend is written as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An address: used as it is.
    Address(Address),
    /// `HOST:PORT`: resolved by the health checker, on an interval, never by a worker.
    Host {
        /// The host name.
        name: String,
        /// The port.
        port: u16,
    },
}

/// One backend of a listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// As written in the file (its name in logs, `status` and the metrics).
    pub written: String,
    /// Where it is.
    pub target: Target,
    /// Its share of new connections against the others' (1 to [`MAX_WEIGHT`]; default 1).
    pub weight: u32,
    /// Used only while every backend that is not a backup is down.
    pub backup: bool,
    /// Connections at most at once, exact across workers; beyond, it is skipped.
    pub max_connections: Option<NonZeroU32>,
}

impl Backend {
    /// Rows it takes: one, or [`MAX_ADDRESSES_PER_NAME`] for a host name.
    pub fn slots(&self) -> usize {
        match self.target {
            Target::Address(_) => 1,
            Target::Host { .. } => MAX_ADDRESSES_PER_NAME,
        }
    }
}

/// What a probe expects back.
#[derive(Debug, Clone)]
pub enum Expect {
    /// Nothing: the connect (and the `send`, if any) passing is enough.
    Nothing,
    /// The reply starts with these bytes (HAProxy's `tcp-check expect string`).
    Prefix(Vec<u8>),
    /// The reply matches this regular expression (`tcp-check expect rstring`).
    Pattern(regex::bytes::Regex),
}

impl PartialEq for Expect {
    fn eq(&self, other: &Expect) -> bool {
        match (self, other) {
            (Expect::Nothing, Expect::Nothing) => true,
            (Expect::Prefix(a), Expect::Prefix(b)) => a == b,
            (Expect::Pattern(a), Expect::Pattern(b)) => a.as_str() == b.as_str(),
            _ => false,
        }
    }
}

impl Eq for Expect {}

/// An active health check (HAProxy's `check` with `tcp-check`, nginx's `health_check`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// From the start of one probe of a backend to the start of the next.
    pub interval: Duration,
    /// Probes passed in a row that bring a down backend up.
    pub rise: u32,
    /// Probes failed in a row that take an up backend down.
    pub fall: u32,
    /// How long one probe (connect, send, reply) may take.
    pub timeout: Duration,
    /// Bytes sent once connected (a PROXY protocol `LOCAL` header first when the service
    /// sends the PROXY protocol).
    pub send: Vec<u8>,
    /// What the reply must be.
    pub expect: Expect,
}

/// The backends of one listener, its health check, and their rows once placed.
#[derive(Debug)]
pub struct Upstreams {
    /// The backends, in the order written.
    pub backends: Vec<Backend>,
    /// The active check, if any.
    pub check: Option<HealthCheck>,
    /// How often host names are resolved again.
    pub resolve_interval: Duration,
    placed: OnceLock<Placed>,
}

impl PartialEq for Upstreams {
    fn eq(&self, other: &Upstreams) -> bool {
        (&self.backends, &self.check, self.resolve_interval)
            == (&other.backends, &other.check, other.resolve_interval)
    }
}

impl Eq for Upstreams {}

impl Clone for Upstreams {
    /// The same backends, not placed.
    fn clone(&self) -> Upstreams {
        Upstreams::new(self.backends.clone(), self.check.clone(), self.resolve_interval)
    }
}

/// Where the rows of a listener's backends are.
#[derive(Debug)]
pub struct Placed {
    /// The scoreboard's backend table.
    pub table: BackendTable,
    /// The listener's name.
    pub listener: String,
    /// Row indices by backend (in the order written), one per address slot.
    pub rows: Vec<Vec<usize>>,
}

/// Rows could not be found for every backend.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("listener {listener}: no free backend row for {backend} (at most {rows} backend addresses in all; a host name takes {per_name})", rows = crate::scoreboard::BACKEND_ROWS, per_name = MAX_ADDRESSES_PER_NAME)]
pub struct NoRoom {
    /// The listener.
    pub listener: String,
    /// The backend that found none.
    pub backend: String,
}

impl Upstreams {
    /// Upstreams not placed yet.
    pub fn new(
        backends: Vec<Backend>,
        check: Option<HealthCheck>,
        resolve_interval: Duration,
    ) -> Self {
        Upstreams { backends, check, resolve_interval, placed: OnceLock::new() }
    }

    /// Assigns every backend's rows in `table` for listener `name` (id `listener`), keeping
    /// the rows of backends an earlier generation had; returns the rows. By the master,
    /// before it forks the processes that use them; once per value (a second call returns
    /// the rows of the first).
    ///
    /// # Errors
    /// [`NoRoom`] when the table has no free row left.
    pub fn place(
        &self,
        table: &BackendTable,
        listener: u16,
        name: &str,
    ) -> Result<Vec<usize>, NoRoom> {
        if let Some(placed) = self.placed.get() {
            return Ok(placed.rows.iter().flatten().copied().collect());
        }
        let mut rows = Vec::with_capacity(self.backends.len());
        for backend in &self.backends {
            let mut slots = Vec::with_capacity(backend.slots());
            for slot in 0..backend.slots() {
                let settings = RowSettings {
                    listener,
                    name: backend.written.clone(),
                    weight: backend.weight,
                    backup: backend.backup,
                    max_connections: backend.max_connections.map_or(0, NonZeroU32::get),
                    checked: self.check.is_some(),
                    address: match &backend.target {
                        Target::Address(address) => Some(address.clone()),
                        Target::Host { .. } => None,
                    },
                    slot,
                };
                let key = row_key(name, &backend.written, slot);
                let row = table.assign(key, &settings).ok_or_else(|| NoRoom {
                    listener: name.to_owned(),
                    backend: backend.written.clone(),
                })?;
                slots.push(row);
            }
            rows.push(slots);
        }
        let all = rows.iter().flatten().copied().collect();
        let _ = self.placed.set(Placed { table: table.clone(), listener: name.to_owned(), rows });
        Ok(all)
    }

    /// The rows, once placed (in the daemon, always in a worker and the checker).
    pub fn placed(&self) -> Option<&Placed> {
        self.placed.get()
    }

    /// Whether the health checker has work here: an active check, or a host name.
    pub fn needs_checker(&self) -> bool {
        self.check.is_some()
            || self.backends.iter().any(|b| matches!(b.target, Target::Host { .. }))
    }
}

/// The row key of address slot `slot` of backend `written` of listener `listener`: FNV-1a
/// (stable across builds, so a new master after an upgrade computes the same keys), never 0.
fn row_key(listener: &str, written: &str, slot: usize) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes = listener.bytes().chain([0]).chain(written.bytes()).chain([0, slot as u8]);
    for byte in bytes {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash.max(1)
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Address(address) => address.fmt(f),
            Target::Host { name, port } => write!(f, "{name}:{port}"),
        }
    }
}

/// Reads a backend's address as written: `IP:PORT`, `[IPv6]:PORT`, `unix:/path`,
/// `unix:@name` or `HOST:PORT` (a host name, resolved later).
///
/// # Errors
/// A message saying what to write instead: a port 0, an unspecified or broadcast address, a
/// malformed Unix address or host name.
pub fn parse_target(written: &str) -> Result<Target, String> {
    let forms = "IP:PORT, [IPv6]:PORT, HOST:PORT, unix:/path or unix:@name";
    match written.parse::<Address>() {
        Ok(Address::Ip(address)) => {
            if address.port() == 0 {
                return Err(format!("{written:?}: the port must not be 0"));
            }
            let ip = address.ip();
            if ip.is_unspecified() || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast()) {
                return Err(format!("{written:?} is not a host address"));
            }
            return Ok(Target::Address(Address::Ip(address)));
        }
        Ok(unix) => return Ok(Target::Address(unix)),
        Err(error) if written.starts_with("unix:") => return Err(error.to_string()),
        Err(_) => {}
    }
    let Some((host, port)) = written.rsplit_once(':') else {
        return Err(format!("{written:?} is not {forms}"));
    };
    let port = port.parse::<u16>().ok().filter(|p| *p != 0);
    let valid_host = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    match (valid_host, port) {
        (true, Some(port)) => Ok(Target::Host { name: host.to_owned(), port }),
        _ => Err(format!("{written:?} is not {forms}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scoreboard::Scoreboard;

    fn backend(written: &str) -> Backend {
        Backend {
            written: written.into(),
            target: parse_target(written).unwrap(),
            weight: 1,
            backup: false,
            max_connections: None,
        }
    }

    #[test]
    fn targets_are_addresses_or_host_names() {
        assert_eq!(
            parse_target("127.0.0.1:80"),
            Ok(Target::Address("127.0.0.1:80".parse().unwrap()))
        );
        assert_eq!(
            parse_target("redis.internal:6379"),
            Ok(Target::Host { name: "redis.internal".into(), port: 6379 })
        );
        assert_eq!(parse_target("unix:/run/r.sock").unwrap().to_string(), "unix:/run/r.sock");
        for bad in ["127.0.0.1:0", "0.0.0.0:80", "nonsense", "host:0", "a..b:1", "unix:x", ":80"] {
            assert!(parse_target(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn placing_keeps_rows_by_listener_and_backend_and_a_host_name_takes_eight() {
        let board = Scoreboard::create(None, 1).unwrap();
        let table = board.backends();
        let first = Upstreams::new(
            vec![backend("127.0.0.1:1"), backend("db.local:5432")],
            None,
            Duration::from_secs(1),
        );
        let rows = first.place(&table, 0, "db").unwrap();
        assert_eq!(rows.len(), 1 + MAX_ADDRESSES_PER_NAME);
        assert_eq!(first.place(&table, 0, "db").unwrap(), rows, "placed once");
        let again = Upstreams::new(vec![backend("db.local:5432")], None, Duration::from_secs(1));
        let kept = again.place(&table, 0, "db").unwrap();
        assert_eq!(kept, rows[1..], "the same backend of the same listener keeps its rows");
        let other = Upstreams::new(vec![backend("127.0.0.1:1")], None, Duration::from_secs(1));
        assert_ne!(other.place(&table, 1, "other").unwrap()[0], rows[0], "another listener's");
        assert_eq!(first.placed().unwrap().rows[1].len(), MAX_ADDRESSES_PER_NAME);
    }
}
