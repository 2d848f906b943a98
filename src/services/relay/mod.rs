//! Relay: a TCP proxy to one of several backends, as HAProxy's `mode tcp` or nginx's
//! `stream { proxy_pass }` do, with the listener's per-client limits and idle timeouts in
//! front of it.
//!
//! Built in the master from `[listener.options]` (see preforkd.toml(5)); runs in workers. Each
//! accepted client gets a [`session::RelaySession`]: it picks a backend by the `balance` mode,
//! connects without blocking (a timer for `connect_timeout`), fails over to the next backend
//! on refusal or timeout at most `retries` times, then relays bytes both ways, each direction
//! through one bounded carrier ([`pump`]): a 16 KiB buffer moved with read(2) and write(2)
//! (the default) or, with `splice = true`, a pipe moved with splice(2) ([`splice`]). Backend
//! health (failed connects in a row, `down_time`) and the connection counts
//! `least-connections` needs live in a small shared table ([`shared::Table`]) that every
//! worker of the generation sees. The first bytes to the backend may be a PROXY protocol
//! header ([`proxy`], HAProxy's specification).

mod proxy;
mod pump;
mod session;
mod shared;
mod splice;

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::{ConnInfo, Invalid, Options, Service, Session};
use crate::net::{Address, Peer};
pub use proxy::Version as ProxyVersion;
use shared::Table;

/// The name in `service = "..."`.
pub(super) const NAME: &str = "relay";

/// Default `connect_timeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `retries`: like HAProxy's `retries 3`.
pub const DEFAULT_RETRIES: u32 = 3;
/// Default `fail_threshold`: like HAProxy's `fall 3`.
pub const DEFAULT_FAIL_THRESHOLD: u32 = 3;
/// Default `down_time`.
pub const DEFAULT_DOWN_TIME: Duration = Duration::from_secs(10);
/// Default `splice`: off, as read/write measured faster than splice(2) in every relay
/// scenario on loopback (BENCHMARKS.md, relay).
pub const DEFAULT_SPLICE: bool = false;
/// Most backends one relay listener takes (a session marks those it tried in a 64-bit mask).
pub const MAX_BACKENDS: usize = 64;
/// Longest `connect_timeout` and `down_time`.
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// How a relay picks a backend for a new client (`balance`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    /// Each new connection goes to the next backend, in turn over all workers.
    #[default]
    RoundRobin,
    /// The first available backend in the order written: failover, not balance.
    First,
    /// A hash of the client's IP address picks the backend, so a client sticks to one
    /// while the set of available backends does not change.
    SourceHash,
    /// The backend with the fewest connections open over all workers (ties in turn).
    LeastConnections,
}

/// `[listener.options]` of a relay listener, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RelayOptions {
    backends: Vec<String>,
    #[serde(default)]
    balance: Balance,
    connect_timeout: Option<String>,
    retries: Option<u32>,
    fail_threshold: Option<u32>,
    down_time: Option<String>,
    send_proxy_protocol: Option<proxy::Version>,
    splice: Option<bool>,
}

/// A relay's configuration, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayConfig {
    /// The backends, in the order written (host names resolved when the configuration is
    /// loaded or reloaded): IP addresses or Unix sockets.
    pub backends: Vec<Address>,
    /// How a backend is picked.
    pub balance: Balance,
    /// How long one connect may take before the next backend is tried.
    pub connect_timeout: Duration,
    /// Further connects after the first fails (0: one attempt only).
    pub retries: u32,
    /// Failed connects in a row that mark a backend down (0: never).
    pub fail_threshold: u32,
    /// How long a backend marked down is skipped.
    pub down_time: Duration,
    /// The PROXY protocol header sent first, if any.
    pub send_proxy_protocol: Option<ProxyVersion>,
    /// Relay through a pipe per direction with splice(2) (`true`) or through a 16 KiB buffer
    /// per direction with read(2) and write(2) (`false`). Default: `false`.
    pub splice: bool,
}

/// The relay service: its configuration and the shared table of its backends.
pub struct Relay {
    shared: Arc<Shared>,
}

/// What every session of a relay reads.
struct Shared {
    config: RelayConfig,
    table: Arc<Table>,
}

/// Builds the service from `[listener.options]`.
pub(super) fn build(options: &mut Options<'_>) -> Result<Arc<dyn Service>, Invalid> {
    if !options.is_present() {
        options.report("", "service \"relay\" needs [listener.options] with backends = [...]");
        return Err(Invalid);
    }
    let parsed: RelayOptions = options.parse()?;
    let mut backends = Vec::new();
    for written in &parsed.backends {
        match resolve(written) {
            Ok(address) => backends.push(address),
            Err(message) => options.report("backends", message),
        }
    }
    if parsed.backends.is_empty() {
        options.report("backends", "needs at least one backend, such as \"127.0.0.1:6379\"");
    } else if parsed.backends.len() > MAX_BACKENDS {
        options.report("backends", format!("at most {MAX_BACKENDS} backends"));
    }
    let connect_timeout = duration(options, "connect_timeout", parsed.connect_timeout.as_deref())
        .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let down_time =
        duration(options, "down_time", parsed.down_time.as_deref()).unwrap_or(DEFAULT_DOWN_TIME);
    let config = RelayConfig {
        backends,
        balance: parsed.balance,
        connect_timeout,
        retries: parsed.retries.unwrap_or(DEFAULT_RETRIES).min(1000),
        fail_threshold: parsed.fail_threshold.unwrap_or(DEFAULT_FAIL_THRESHOLD),
        down_time,
        send_proxy_protocol: parsed.send_proxy_protocol,
        splice: parsed.splice.unwrap_or(DEFAULT_SPLICE),
    };
    if parsed.retries.is_some_and(|r| r > 1000) {
        options.report("retries", "at most 1000");
    }
    options.finish(())?;
    match Relay::new(config) {
        Ok(relay) => Ok(Arc::new(relay)),
        Err(error) => {
            options.report("", format!("could not map the relay's shared table: {error}"));
            Err(Invalid)
        }
    }
}

/// `IP:PORT`, `[IPv6]:PORT`, `unix:/path`, `unix:@name` or `HOST:PORT` (resolved now; the
/// first address is used).
fn resolve(written: &str) -> Result<Address, String> {
    match written.parse::<Address>() {
        Ok(Address::Ip(address)) => return check_backend(written, address),
        Ok(unix) => return Ok(unix),
        Err(error) if written.starts_with("unix:") => return Err(error.to_string()),
        Err(_) => {}
    }
    let Some((host, port)) = written.rsplit_once(':') else {
        return Err(format!("{written:?} is not IP:PORT, [IPv6]:PORT, HOST:PORT or unix:/path"));
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(format!("{written:?} is not IP:PORT, [IPv6]:PORT, HOST:PORT or unix:/path"));
    }
    match (host, port.parse::<u16>().unwrap_or(0)).to_socket_addrs() {
        Ok(mut addresses) => match addresses.next() {
            Some(address) => check_backend(written, address),
            None => Err(format!("host name {host:?} has no address")),
        },
        Err(error) => Err(format!("could not resolve {host:?}: {error}")),
    }
}

fn check_backend(written: &str, address: SocketAddr) -> Result<Address, String> {
    if address.port() == 0 {
        return Err(format!("{written:?}: the port must not be 0"));
    }
    if address.ip().is_unspecified() || matches!(address.ip(), IpAddr::V4(v4) if v4.is_broadcast())
    {
        return Err(format!("{written:?} is not a host address"));
    }
    Ok(Address::Ip(address))
}

/// A humane duration option, more than 0 and at most a day; `None` (and a report) when
/// invalid, `None` when absent.
fn duration(options: &mut Options<'_>, key: &str, written: Option<&str>) -> Option<Duration> {
    let written = written?;
    match humantime::parse_duration(written.trim()) {
        Ok(d) if d.is_zero() => options.report(key, "must be more than 0"),
        Ok(d) if d > MAX_TIMEOUT => options.report(key, format!("{written:?} is too long: at most 24h")),
        Ok(d) => return Some(d),
        Err(error) => options.report(
            key,
            format!(
                "invalid duration {written:?} ({error}); write a number with a unit, such as \"5s\" or \"250ms\""
            ),
        ),
    }
    None
}

impl Relay {
    /// A relay over `config` and a new shared table for its backends (mapped now: build the
    /// service before forking the workers that are to share it).
    ///
    /// # Errors
    /// mmap(2) failed.
    pub fn new(config: RelayConfig) -> std::io::Result<Relay> {
        let table = Arc::new(Table::new(config.backends.len())?);
        Ok(Relay { shared: Arc::new(Shared { config, table }) })
    }

    /// The validated configuration.
    pub fn config(&self) -> &RelayConfig {
        &self.shared.config
    }
}

impl Service for Relay {
    fn session(&self, conn: &ConnInfo<'_>) -> Box<dyn Session> {
        // The local address costs a system call: only taken for a PROXY header.
        let header = self.shared.config.send_proxy_protocol.map(|version| {
            proxy::header(version, conn.peer, conn.local_addr().ok())
        });
        Box::new(session::RelaySession::new(Arc::clone(&self.shared), conn.peer, header))
    }

    /// A relayed connection handed over by a retiring worker, at any point of its life but
    /// a connect (see `session.rs`): its descriptors follow with [`Session::resume`].
    fn import(&self, conn: &ConnInfo<'_>, state: &[u8]) -> Option<Box<dyn Session>> {
        let session = session::RelaySession::import(Arc::clone(&self.shared), conn.peer, state)?;
        Some(Box::new(session))
    }
}

/// The order in which one session tries backends: where it starts, which it tried.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// The backend tried first, unless unavailable (for `least-connections`, the tie-breaker).
    start: usize,
    /// Backends this session tried, as bits; cleared once every available one was tried.
    tried: u64,
}

impl Plan {
    fn new(shared: &Shared, peer: Peer) -> Plan {
        let n = shared.config.backends.len();
        let start = match shared.config.balance {
            Balance::First => 0,
            Balance::RoundRobin | Balance::LeastConnections => shared.table.next_turn() % n,
            Balance::SourceHash => (source_hash(&peer) % n as u64) as usize,
        };
        Plan { start, tried: 0 }
    }

    /// The next backend to try at `now_ms`, or `None` when every backend is down. Prefers
    /// one not tried yet by this session; then by the fewest connections
    /// (`least-connections` only); then in order from `start`.
    fn next(&mut self, shared: &Shared, now_ms: u64) -> Option<usize> {
        let n = shared.config.backends.len();
        let least = shared.config.balance == Balance::LeastConnections;
        let pick = (0..n)
            .filter(|&i| shared.table.backend(i).is_available(now_ms))
            .min_by_key(|&i| {
                let tried = self.tried & (1 << i) != 0;
                let load = if least { shared.table.backend(i).active() } else { 0 };
                (tried, load, (i + n - self.start) % n)
            })?;
        if self.tried & (1 << pick) != 0 {
            // Every available backend was tried: a new round.
            self.tried = 0;
        }
        self.tried |= 1 << pick;
        Some(pick)
    }
}

/// FNV-1a over the client's address bytes (a Unix client's user id): stable across runs and
/// builds (unlike `DefaultHasher`), so a client keeps its backend across restarts and reloads
/// with the same backends.
fn source_hash(peer: &Peer) -> u64 {
    let bytes: Vec<u8> = match peer {
        Peer::Ip(address) => match address.ip() {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => v4.octets().to_vec(),
                None => v6.octets().to_vec(),
            },
        },
        Peer::Unix(credentials) => credentials.uid.to_le_bytes().to_vec(),
    };
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A relay's shared state over `backends` backends at 127.0.0.1:1000 and up.
    pub(in crate::services::relay) fn relay(backends: usize, balance: Balance) -> Shared {
        let config = RelayConfig {
            backends: (0..backends).map(|i| Address::Ip(SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16)))).collect(),
            balance,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            retries: DEFAULT_RETRIES,
            fail_threshold: 1,
            down_time: Duration::from_secs(1),
            send_proxy_protocol: None,
            splice: DEFAULT_SPLICE,
        };
        let table = Arc::new(Table::new(backends).unwrap());
        Shared { config, table }
    }

    #[test]
    fn first_fails_over_in_order_and_skips_down_backends() {
        let shared = relay(3, Balance::First);
        let peer = Peer::Ip("127.0.0.2:5000".parse().unwrap());
        let mut plan = Plan::new(&shared, peer);
        assert_eq!(plan.next(&shared, 0), Some(0));
        assert_eq!(plan.next(&shared, 0), Some(1));
        assert_eq!(plan.next(&shared, 0), Some(2));
        assert_eq!(plan.next(&shared, 0), Some(0), "retries go round again");
        shared.table.backend(0).failed(1, 0, 1000);
        let mut plan = Plan::new(&shared, peer);
        assert_eq!(plan.next(&shared, 10), Some(1), "down: skipped");
        assert_eq!(Plan::new(&shared, peer).next(&shared, 1001), Some(0), "back after down_time");
        for i in 0..3 {
            shared.table.backend(i).failed(1, 0, 1000);
        }
        assert_eq!(Plan::new(&shared, peer).next(&shared, 10), None, "all down");
    }

    #[test]
    fn round_robin_takes_turns_and_source_hash_sticks() {
        let shared = relay(2, Balance::RoundRobin);
        let peer = Peer::Ip("127.0.0.2:5000".parse().unwrap());
        let firsts: Vec<_> = (0..4).map(|_| Plan::new(&shared, peer).next(&shared, 0)).collect();
        assert_eq!(firsts, [Some(0), Some(1), Some(0), Some(1)]);
        let shared = relay(4, Balance::SourceHash);
        let pick = |ip: &str, port| {
            let peer = Peer::Ip(SocketAddr::new(ip.parse().unwrap(), port));
            Plan::new(&shared, peer).next(&shared, 0)
        };
        assert_eq!(pick("127.0.0.2", 1), pick("127.0.0.2", 2), "the port does not matter");
        assert_eq!(pick("::ffff:127.0.0.2", 1), pick("127.0.0.2", 2));
        let spread: std::collections::HashSet<_> =
            (1..=32).map(|i| pick(&format!("127.0.0.{i}"), 1)).collect();
        assert!(spread.len() > 1, "different clients reach different backends");
    }

    #[test]
    fn least_connections_prefers_the_least_loaded() {
        let shared = relay(2, Balance::LeastConnections);
        let peer = Peer::Ip("127.0.0.2:5000".parse().unwrap());
        let _lease = shared::Lease::new(Arc::clone(&shared.table), 0);
        for _ in 0..3 {
            assert_eq!(Plan::new(&shared, peer).next(&shared, 0), Some(1));
        }
    }

    #[test]
    fn splice_is_off_unless_written() {
        let parse = |extra: &str| toml::from_str::<RelayOptions>(&format!("backends = []\n{extra}"));
        assert!(!parse("").unwrap().splice.unwrap_or(DEFAULT_SPLICE));
        assert_eq!(parse("splice = true").unwrap().splice, Some(true));
        assert_eq!(parse("splice = false").unwrap().splice, Some(false));
        assert!(parse("splice = \"yes\"").is_err(), "a boolean, not a word");
    }

    #[test]
    fn options_are_checked() {
        assert!(resolve("127.0.0.1:0").is_err());
        assert!(resolve("0.0.0.0:80").is_err());
        assert!(resolve("nonsense").is_err());
        assert_eq!(resolve("[::1]:80"), Ok("[::1]:80".parse().unwrap()));
        assert_eq!(resolve("localhost:80").map(|a| a.ip().map(|a| a.port())), Ok(Some(80)));
        assert_eq!(resolve("unix:/run/redis.sock"), Ok(Address::Unix("/run/redis.sock".into())));
        assert!(resolve("unix:redis.sock").is_err(), "a relative path");
    }
}
