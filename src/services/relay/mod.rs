//! Relay: a TCP proxy to one of several backends, as HAProxy's `mode tcp` or nginx's
//! `stream { proxy_pass }` do, with the listener's per-client limits and idle timeouts in
//! front of it.
//!
//! Built in the master from `[listener.options]` (see preforkd.toml(5)); runs in workers. Each
//! accepted client gets a [`session::RelaySession`]: it picks a backend address by the
//! `balance` mode and the weights ([`Plan`]: backups only while every other backend is down,
//! a backend at its `max_connections` skipped), connects without blocking (a timer for
//! `connect_timeout`), fails over to the next backend on refusal or timeout at most `retries`
//! times, then relays bytes both ways, each direction through one bounded carrier
//! ([`pump`]): a 16 KiB buffer moved with read(2) and write(2) (the default) or, with
//! `splice = true`, a pipe moved with splice(2) ([`splice`]).
//!
//! What is known of each backend address lives in its row of the scoreboard's backend table
//! (see [`crate::scoreboard::BackendTable`] and [`crate::upstream`]): the active check's
//! verdict and a host name's addresses (written by the health checker process), the
//! passive health (failed connects in a row, `down_time`) and the connection counts
//! (written by the workers). A backend is used while both healths say up. The first bytes
//! to the backend may be a PROXY protocol header ([`proxy`], HAProxy's specification).
//!
//! With `backend_tls`, the relay speaks TLS to its backends ([`mod@backend_tls`]): it verifies
//! each backend's certificate and relays plaintext between the client and rustls. With
//! `[[listener.options.route]]` entries, it routes by the server name the client asks for
//! without decrypting: it reads the client's ClientHello ([`hello`]), picks the backends of
//! the route that names it ([`Routes`]: a subset of the relay's backends, balanced with a
//! turn of its own), and forwards every byte read, unchanged.

mod backend_tls;
mod hello;
mod proxy;
mod pump;
mod session;
mod shared;
mod splice;

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::ServerName;
use serde::Deserialize;

use super::{ConnInfo, Invalid, Options, Service, Session};
use crate::net::Peer;
use crate::pki::client::{ClientField, ClientSpec};
use crate::pki::{self, ByName};
use crate::scoreboard::BackendTable;
use crate::upstream::{self, Backend, Expect, HealthCheck, MAX_WEIGHT, Upstreams};
pub use backend_tls::BackendTls;
pub use proxy::Version as ProxyVersion;
use shared::Turn;

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
/// Default `preread_timeout`: the listener's default short idle timeout.
pub const DEFAULT_PREREAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `health_check.interval`: HAProxy's `inter 2s`.
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// Default `health_check.rise`: HAProxy's `rise 2`.
pub const DEFAULT_RISE: u32 = 2;
/// Default `health_check.fall`: HAProxy's `fall 3`.
pub const DEFAULT_FALL: u32 = 3;
/// Default `health_check.timeout`.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// Default `resolve_interval`.
pub const DEFAULT_RESOLVE_INTERVAL: Duration = Duration::from_secs(30);
/// Most backend addresses one relay listener takes (a session marks those it tried in a
/// 64-bit mask); a host name counts for [`upstream::MAX_ADDRESSES_PER_NAME`].
pub const MAX_BACKENDS: usize = 64;
/// Longest `connect_timeout` and `down_time`.
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Longest `send` and `expect` of a health check, in bytes.
pub const MAX_PROBE_BYTES: usize = 1024;

/// How a relay picks a backend for a new client (`balance`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    /// Each new connection goes to the next backend by smooth weighted round-robin (nginx's
    /// algorithm), in turn over all workers.
    #[default]
    RoundRobin,
    /// The first available backend in the order written: failover, not balance.
    First,
    /// A hash of the client's IP address (a Unix client's user id) picks the backend,
    /// weighted, so a client sticks to one while the set of available backends does not
    /// change.
    SourceHash,
    /// The backend with the fewest connections open over all workers for its weight (ties
    /// in turn).
    LeastConnections,
}

/// A backend as written: `"10.0.0.11:6379"`, or a table with the address and its settings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum BackendOptions {
    Written(String),
    Table(BackendTableOptions),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendTableOptions {
    address: String,
    weight: Option<u32>,
    backup: Option<bool>,
    max_connections: Option<u32>,
}

/// `health_check = { ... }` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckOptions {
    interval: Option<String>,
    rise: Option<u32>,
    fall: Option<u32>,
    timeout: Option<String>,
    send: Option<String>,
    expect: Option<String>,
    expect_regex: Option<String>,
}

/// `[listener.options]` of a relay listener, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RelayOptions {
    /// Required but with `route` entries (then the default route).
    backends: Option<Vec<BackendOptions>>,
    #[serde(default)]
    balance: Balance,
    connect_timeout: Option<String>,
    retries: Option<u32>,
    fail_threshold: Option<u32>,
    down_time: Option<String>,
    send_proxy_protocol: Option<proxy::Version>,
    splice: Option<bool>,
    health_check: Option<CheckOptions>,
    resolve_interval: Option<String>,
    source: Option<String>,
    backend_tls: Option<BackendTlsOptions>,
    #[serde(default)]
    route: Vec<RouteOptions>,
    preread_timeout: Option<String>,
    tcp_keepalive_idle: Option<String>,
    tcp_keepalive_interval: Option<String>,
    tcp_keepalive_count: Option<u32>,
}

/// `backend_tls = { ... }` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendTlsOptions {
    server_name: Option<String>,
    ca: Option<String>,
    certificate: Option<String>,
    key: Option<String>,
}

/// One `[[listener.options.route]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteOptions {
    server_names: Vec<String>,
    backends: Vec<BackendOptions>,
}

/// Routing by the server name a client asks for (`[[listener.options.route]]`): each route
/// is a subset of the relay's backends (in the order written: `backends` first, then each
/// route's), as a mask over their entries (bit `i`: the backend written `i`-th).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routes {
    /// The backends of each route: the default one first when `backends` is written.
    masks: Vec<u64>,
    /// The route of each name (exact, or `*.example.org` for one label).
    by_name: ByName<usize>,
    /// The route for a name no route lists, and for a client that sends none (`backends`);
    /// `None`: such a client is refused.
    default: Option<usize>,
    /// How long a client may take to send its whole ClientHello.
    pub preread_timeout: Duration,
}

impl Routes {
    /// The route for server name `name` (`None`: the client sent none); `None`: refused.
    pub fn route_for(&self, name: Option<&str>) -> Option<usize> {
        name.and_then(|name| self.by_name.get(name)).copied().or(self.default)
    }

    /// Routes there are.
    pub fn len(&self) -> usize {
        self.masks.len()
    }

    /// Whether there is none (never, once built).
    pub fn is_empty(&self) -> bool {
        self.masks.is_empty()
    }

    /// The backends of route `route`, as a mask over the backends written.
    fn backends(&self, route: usize) -> u64 {
        self.masks.get(route).copied().unwrap_or(0)
    }
}

/// A relay's configuration, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayConfig {
    /// The backends (in the order written), their health check and their rows.
    pub upstreams: Arc<Upstreams>,
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
    /// The local address backend connects are made from (bound before connect); `None`: the
    /// kernel's choice.
    pub source: Option<IpAddr>,
    /// TLS to the backends (`backend_tls`), if any.
    pub backend_tls: Option<Arc<BackendTls>>,
    /// Routing by server name, if any route is written.
    pub routes: Option<Routes>,
    /// TCP keepalive on backend connections; `None`: off.
    pub tcp_keepalive: Option<crate::net::Keepalive>,
}

/// The relay service: its configuration and what its workers share.
pub struct Relay {
    shared: Arc<Shared>,
}

/// What every session of a relay reads.
struct Shared {
    config: RelayConfig,
    /// The shared round-robin turns: counter 0 for the whole relay, `1 + r` for route `r`.
    turn: Turn,
    /// The last smooth weighted round-robin schedule this worker computed, by the pool it
    /// was computed for (per worker: each has its copy after fork).
    schedule: Mutex<Schedule>,
    /// Every backend address, by row, once the rows are placed.
    candidates: OnceLock<Vec<Candidate>>,
}

impl Shared {
    /// Every backend address of the relay (none before the rows are placed).
    fn candidates(&self) -> &[Candidate] {
        if self.config.upstreams.placed().is_none() {
            return &[];
        }
        self.candidates.get_or_init(|| candidates(&self.config.upstreams))
    }
}

/// Builds the service from `[listener.options]`.
pub(super) fn build(options: &mut Options<'_>) -> Result<Arc<dyn Service>, Invalid> {
    if !options.is_present() {
        options.report("", "service \"relay\" needs [listener.options] with backends = [...]");
        return Err(Invalid);
    }
    let parsed: RelayOptions = options.parse()?;
    let mut backends = Vec::new();
    let mut addresses = 0;
    // Adds the backends of one list (`backends`, or a route's) under `key`; their entries as
    // a mask.
    let mut add = |options: &mut Options<'_>, key: &str, list: Vec<BackendOptions>| -> u64 {
        let mut mask = 0;
        for written in list {
            let (address, weight, backup, max_connections) = match written {
                BackendOptions::Written(address) => (address, None, None, None),
                BackendOptions::Table(t) => (t.address, t.weight, t.backup, t.max_connections),
            };
            let weight = weight.unwrap_or(1);
            if weight == 0 || weight > MAX_WEIGHT {
                options.report(key, format!("{address:?}: weight {weight}: expected 1 to {MAX_WEIGHT}"));
            }
            if max_connections == Some(0) {
                options.report(key, format!("{address:?}: max_connections 0: leave it out for no cap"));
            }
            match upstream::parse_target(&address) {
                Ok(target) => {
                    let backend = Backend {
                        written: address,
                        target,
                        weight: weight.clamp(1, MAX_WEIGHT),
                        backup: backup.unwrap_or(false),
                        max_connections: max_connections.and_then(NonZeroU32::new),
                    };
                    if backends.len() < MAX_BACKENDS {
                        mask |= 1 << backends.len();
                    }
                    addresses += backend.slots();
                    backends.push(backend);
                }
                Err(message) => options.report(key, message),
            }
        }
        mask
    };
    let written_count = parsed.backends.as_ref().map_or(0, Vec::len);
    let has_default = parsed.backends.is_some();
    let default = add(options, "backends", parsed.backends.unwrap_or_default());
    let mut masks = Vec::new();
    if has_default && !parsed.route.is_empty() {
        masks.push(default);
    }
    let mut named = Vec::new();
    let route_count = parsed.route.len();
    for (index, route) in parsed.route.into_iter().enumerate() {
        let key = format!("route[{index}]");
        if route.backends.is_empty() {
            options.report(&format!("{key}.backends"), "needs at least one backend");
        }
        if route.server_names.is_empty() {
            options.report(
                &format!("{key}.server_names"),
                "needs at least one name, such as \"www.example.org\" or \"*.example.org\"",
            );
        }
        for name in &route.server_names {
            let lower = name.to_ascii_lowercase();
            if !pki::is_server_name(&lower) {
                options.report(
                    &format!("{key}.server_names"),
                    format!("{name:?} is not a server name: write a DNS name such as \"www.example.org\", or \"*.example.org\""),
                );
            } else if named.iter().any(|(taken, _)| *taken == lower) {
                options.report(&format!("{key}.server_names"), format!("{name:?} is given twice"));
            } else {
                named.push((lower, masks.len()));
            }
        }
        masks.push(add(options, &format!("{key}.backends"), route.backends));
    }
    let routes = (route_count > 0).then(|| Routes {
        default: has_default.then_some(0),
        masks,
        by_name: ByName::new(named),
        preread_timeout: DEFAULT_PREREAD_TIMEOUT,
    });
    let written_count = written_count + usize::from(routes.is_some());
    if written_count == 0 {
        options.report("backends", "needs at least one backend, such as \"127.0.0.1:6379\"");
    } else if backends.len() > MAX_BACKENDS {
        options.report("backends", format!("at most {MAX_BACKENDS} backends, routes' included"));
    } else if addresses > MAX_BACKENDS {
        options.report(
            "backends",
            format!(
                "{addresses} backend addresses, at most {MAX_BACKENDS} (a host name counts for {})",
                upstream::MAX_ADDRESSES_PER_NAME
            ),
        );
    } else if routes.is_none() && !backends.is_empty() && backends.iter().all(|b| b.backup) {
        options.report("backends", "every backend is a backup: at least one must not be");
    }
    let connect_timeout = duration(options, "connect_timeout", parsed.connect_timeout.as_deref())
        .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let down_time =
        duration(options, "down_time", parsed.down_time.as_deref()).unwrap_or(DEFAULT_DOWN_TIME);
    let resolve_interval =
        duration(options, "resolve_interval", parsed.resolve_interval.as_deref())
            .unwrap_or(DEFAULT_RESOLVE_INTERVAL);
    let check = parsed
        .health_check
        .map(|check| health_check(options, check, parsed.send_proxy_protocol));
    let source = parsed.source.as_deref().and_then(|text| match text.parse::<IpAddr>() {
        Ok(ip) if !ip.is_unspecified() => Some(ip),
        _ => {
            options.report("source", format!("{text:?} is not an IP address of this host"));
            None
        }
    });
    let keepalive_idle = duration(options, "tcp_keepalive_idle", parsed.tcp_keepalive_idle.as_deref());
    let keepalive_interval =
        duration(options, "tcp_keepalive_interval", parsed.tcp_keepalive_interval.as_deref());
    if parsed.tcp_keepalive_count.is_some_and(|c| !(1..=127).contains(&c)) {
        options.report("tcp_keepalive_count", "expected 1 to 127");
    }
    if keepalive_idle.is_none() && (keepalive_interval.is_some() || parsed.tcp_keepalive_count.is_some()) {
        options.report("tcp_keepalive_idle", "needed by tcp_keepalive_interval and tcp_keepalive_count");
    }
    let too_short = |d: Duration| d < Duration::from_secs(1);
    if keepalive_idle.is_some_and(too_short) || keepalive_interval.is_some_and(too_short) {
        options.report("tcp_keepalive_idle", "keepalive times are whole seconds: at least \"1s\"");
    }
    let tcp_keepalive = keepalive_idle.map(|idle| crate::net::Keepalive {
        idle,
        interval: keepalive_interval,
        count: parsed.tcp_keepalive_count,
    });
    if parsed.retries.is_some_and(|r| r > 1000) {
        options.report("retries", "at most 1000");
    }
    let preread_timeout = duration(options, "preread_timeout", parsed.preread_timeout.as_deref());
    let routes = routes.map(|routes| Routes {
        preread_timeout: preread_timeout.unwrap_or(DEFAULT_PREREAD_TIMEOUT),
        ..routes
    });
    if parsed.preread_timeout.is_some() && routes.is_none() {
        options.report("preread_timeout", "has no effect without [[listener.options.route]]");
    }
    let backend_tls =
        parsed.backend_tls.as_ref().and_then(|tls| backend_tls(options, tls, &backends));
    let upstreams = Upstreams::new(backends, check.flatten(), resolve_interval);
    let config = RelayConfig {
        upstreams: Arc::new(upstreams),
        balance: parsed.balance,
        connect_timeout,
        retries: parsed.retries.unwrap_or(DEFAULT_RETRIES).min(1000),
        fail_threshold: parsed.fail_threshold.unwrap_or(DEFAULT_FAIL_THRESHOLD),
        down_time,
        send_proxy_protocol: parsed.send_proxy_protocol,
        splice: parsed.splice.unwrap_or(DEFAULT_SPLICE),
        source,
        backend_tls,
        routes,
        tcp_keepalive,
    };
    options.finish(())?;
    match Relay::new(config) {
        Ok(relay) => Ok(Arc::new(relay)),
        Err(error) => {
            options.report("", format!("could not map the relay's shared turn: {error}"));
            Err(Invalid)
        }
    }
}

/// `backend_tls = { ... }`: its files read and checked; `None` (reported) when anything is
/// wrong, such as a backend with no name to verify.
fn backend_tls(
    options: &mut Options<'_>,
    written: &BackendTlsOptions,
    backends: &[Backend],
) -> Option<Arc<BackendTls>> {
    let mut complete = true;
    let server_name = match &written.server_name {
        None => None,
        Some(name) => match ServerName::try_from(name.to_ascii_lowercase()) {
            Ok(name) => Some(name),
            Err(_) => {
                options.report(
                    "backend_tls.server_name",
                    format!("{name:?} is neither a DNS name nor an IP address"),
                );
                complete = false;
                None
            }
        },
    };
    if written.server_name.is_none()
        && let Some(unnamed) = backends.iter().find(|b| host_of(&b.written).is_none())
    {
        options.report(
            "backend_tls.server_name",
            format!(
                "missing: backend {} has no host name to verify its certificate against; write the name it serves",
                unnamed.written
            ),
        );
        complete = false;
    }
    let mut path = |options: &mut Options<'_>, key: &str, value: &Option<String>| {
        let path = options.path(&format!("backend_tls.{key}"), value.as_deref());
        complete &= path.is_some() || value.is_none();
        path
    };
    let spec = ClientSpec {
        ca: path(options, "ca", &written.ca),
        certificate: path(options, "certificate", &written.certificate),
        key: path(options, "key", &written.key),
    };
    if !complete {
        return None;
    }
    let mut findings = pki::Findings::default();
    let loaded = pki::client::load(&spec, SystemTime::now(), &mut findings);
    for warning in &findings.warnings {
        log::warn!("{}: {warning}", options.label("backend_tls"));
    }
    for (field, message) in findings.errors {
        let key = match field {
            ClientField::Ca => "backend_tls.ca",
            ClientField::Certificate => "backend_tls.certificate",
            ClientField::Key => "backend_tls.key",
        };
        options.report(key, message);
    }
    Some(Arc::new(BackendTls::new(loaded?, server_name)))
}


/// `health_check = { ... }`, validated; `None` (reported) when invalid. A relay that sends
/// the PROXY protocol sends its checks a `LOCAL` header first, as HAProxy's
/// `check-send-proxy` does, so a backend that requires the header accepts the probe.
fn health_check(
    options: &mut Options<'_>,
    written: CheckOptions,
    proxy: Option<ProxyVersion>,
) -> Option<HealthCheck> {
    let interval = duration(options, "health_check.interval", written.interval.as_deref())
        .unwrap_or(DEFAULT_CHECK_INTERVAL);
    let timeout = duration(options, "health_check.timeout", written.timeout.as_deref())
        .unwrap_or(DEFAULT_CHECK_TIMEOUT.min(interval));
    let mut valid = true;
    let mut count = |options: &mut Options<'_>, key: &str, value: Option<u32>, default: u32| {
        let value = value.unwrap_or(default);
        if !(1..=1000).contains(&value) {
            options.report(key, format!("{value}: expected 1 to 1000"));
            valid = false;
        }
        value
    };
    let rise = count(options, "health_check.rise", written.rise, DEFAULT_RISE);
    let fall = count(options, "health_check.fall", written.fall, DEFAULT_FALL);
    let mut send = proxy.map(proxy::local).unwrap_or_default();
    send.extend(written.send.unwrap_or_default().into_bytes());
    let expect = match (written.expect, written.expect_regex) {
        (Some(_), Some(_)) => {
            options.report("health_check.expect_regex", "expect or expect_regex, not both");
            valid = false;
            Expect::Nothing
        }
        (Some(prefix), None) if prefix.is_empty() => {
            options.report("health_check.expect", "must not be empty (leave it out to expect nothing)");
            valid = false;
            Expect::Nothing
        }
        (Some(prefix), None) => Expect::Prefix(prefix.into_bytes()),
        (None, Some(pattern)) => match regex::bytes::RegexBuilder::new(&pattern).size_limit(1 << 20).build() {
            Ok(regex) => Expect::Pattern(regex),
            Err(error) => {
                options.report("health_check.expect_regex", format!("{pattern:?}: {error}"));
                valid = false;
                Expect::Nothing
            }
        },
        (None, None) => Expect::Nothing,
    };
    let expect_len = match &expect {
        Expect::Prefix(prefix) => prefix.len(),
        _ => 0,
    };
    if send.len() > MAX_PROBE_BYTES || expect_len > MAX_PROBE_BYTES {
        options.report("health_check", format!("send and expect: at most {MAX_PROBE_BYTES} bytes"));
        valid = false;
    }
    if timeout > interval {
        options.report("health_check.timeout", "must not be longer than interval");
        valid = false;
    }
    valid.then_some(HealthCheck { interval, rise, fall, timeout, send, expect })
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
    /// A relay over `config` and a new shared turn (mapped now: build the service before
    /// forking the workers that are to share it).
    ///
    /// # Errors
    /// mmap(2) failed.
    pub fn new(config: RelayConfig) -> std::io::Result<Relay> {
        let turn = Turn::new(1 + config.routes.as_ref().map_or(0, Routes::len))?;
        let candidates = OnceLock::new();
        Ok(Relay { shared: Arc::new(Shared { config, turn, schedule: Mutex::default(), candidates }) })
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
        let backends = match (&self.shared.config.routes, conn.tls) {
            (None, _) => Backends::Every,
            // Behind TLS termination: the name the handshake settled.
            (Some(routes), Some(tls)) => match routes.route_for(tls.server_name.as_deref()) {
                Some(route) => Backends::Route(route),
                None => Backends::Nowhere,
            },
            (Some(_), None) => Backends::ByHello,
        };
        let shared = Arc::clone(&self.shared);
        Box::new(session::RelaySession::new(shared, conn.peer, header, backends))
    }

    fn upstreams(&self) -> Option<&Upstreams> {
        Some(&self.shared.config.upstreams)
    }

    /// When the failures of TLS with the backends held back are due to be logged.
    fn keeps_house(&self) -> bool {
        self.shared.config.backend_tls.is_some()
    }

    fn next_deadline(&self) -> Option<std::time::Instant> {
        self.shared.config.backend_tls.as_ref()?.log_deadline()
    }

    fn housekeeping(&self, now: std::time::Instant, all: bool) {
        if let Some(backend_tls) = &self.shared.config.backend_tls {
            backend_tls.flush_log(now, all);
        }
    }

    /// A relayed connection handed over by a retiring worker, at any point of its life but
    /// a connect (see `session.rs`): its descriptors follow with [`Session::resume`].
    fn import(&self, conn: &ConnInfo<'_>, state: &[u8]) -> Option<Box<dyn Session>> {
        let session = session::RelaySession::import(Arc::clone(&self.shared), conn.peer, state)?;
        Some(Box::new(session))
    }
}

/// Which backends a session may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backends {
    /// All of them (no routes).
    Every,
    /// Those of this route (an index into [`Routes`]).
    Route(usize),
    /// Those of the route the client's ClientHello names: read it first.
    ByHello,
    /// None: the server name is routed nowhere (and there is no default).
    Nowhere,
}

/// A backend address a session may pick: its row, and where it was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Candidate {
    row: usize,
    /// The backend's index in the order written.
    entry: usize,
    weight: u32,
    backup: bool,
}

/// The smooth weighted round-robin order of one pool of candidates (by row): one cycle of
/// nginx's algorithm (each turn, every peer's current weight grows by its weight, the
/// largest is picked and loses the total), which spreads each backend's turns evenly over
/// the cycle. The cycle is as long as the weights' sum, and the shared turn indexes it, so
/// the split is exact over all workers together, not only within each.
#[derive(Debug, Default)]
struct Schedule {
    pool: Vec<(usize, u32)>,
    order: Vec<usize>,
}

impl Schedule {
    /// The schedule of `pool` (row, weight), computed again only when the pool changed.
    fn of(&mut self, pool: &[(usize, u32)]) -> &[usize] {
        if self.pool != pool {
            self.pool = pool.to_vec();
            self.order = smooth_order(pool);
        }
        &self.order
    }
}

/// One cycle of smooth weighted round-robin over `pool` (row, weight): rows, each as often
/// as its weight.
fn smooth_order(pool: &[(usize, u32)]) -> Vec<usize> {
    let total: i64 = pool.iter().map(|&(_, w)| i64::from(w)).sum();
    let mut current = vec![0i64; pool.len()];
    let mut order = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, &(_, weight)) in pool.iter().enumerate() {
            current[i] += i64::from(weight);
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        order.push(pool[best].0);
    }
    order
}

/// Why no backend could be picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NoBackend {
    /// Every backend is down (or has no address).
    Unavailable,
    /// Backends are up but every one is at its `max_connections`.
    Full,
}

impl NoBackend {
    /// The access log's reason.
    fn reason(self) -> &'static str {
        match self {
            NoBackend::Unavailable => "backend-unavailable",
            NoBackend::Full => "backend-full",
        }
    }
}

/// The order in which one session tries backends.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// The shared turn taken for this session (round-robin, least-connections ties), or the
    /// client's hash (source-hash).
    turn: u64,
    /// Picks made so far.
    picks: u64,
    /// Candidates this session tried, as bits by candidate index; cleared once every
    /// available one was tried.
    tried: u64,
}

impl Plan {
    /// The plan of client `peer` over the backends of turn `counter` (0: the whole relay,
    /// `1 + r`: route `r`, so that each route takes its turns among its own backends).
    fn new(shared: &Shared, peer: Peer, counter: usize) -> Plan {
        let turn = match shared.config.balance {
            Balance::First => 0,
            Balance::RoundRobin | Balance::LeastConnections => shared.turn.next(counter),
            Balance::SourceHash => source_hash(&peer),
        };
        Plan { turn, picks: 0, tried: 0 }
    }

    /// The next backend to connect to at `now_ms`, with its place taken: the row and its
    /// lease. Backups only while no other backend is usable; a backend at its
    /// `max_connections` is skipped.
    ///
    /// # Errors
    /// [`NoBackend`] when none is left.
    fn next(
        &mut self,
        shared: &Shared,
        table: &BackendTable,
        candidates: &[Candidate],
        now_ms: u64,
    ) -> Result<shared::Lease, NoBackend> {
        let usable: Vec<bool> = candidates.iter().map(|c| table.row(c.row).usable(now_ms)).collect();
        let primaries = candidates.iter().zip(&usable).any(|(c, &u)| u && !c.backup);
        let mut full = false;
        loop {
            let open = |i: usize, tried: u64| {
                usable[i] && candidates[i].backup != primaries && tried & (1 << i) == 0
            };
            if !(0..candidates.len()).any(|i| open(i, self.tried)) {
                // Every usable backend was tried by earlier connects of this session: a new
                // round (unless this call found them all full).
                if full || self.tried == 0 || !(0..candidates.len()).any(|i| open(i, 0)) {
                    return Err(if full { NoBackend::Full } else { NoBackend::Unavailable });
                }
                self.tried = 0;
            }
            let tried = self.tried;
            let pool: Vec<usize> = (0..candidates.len()).filter(|&i| open(i, tried)).collect();
            let pick = self.choose(shared, table, candidates, &pool);
            self.tried |= 1 << pick;
            self.picks += 1;
            match shared::Lease::take(table, candidates[pick].row) {
                Some(lease) => return Ok(lease),
                None => full = true,
            }
        }
    }

    /// The candidate of `pool` (indices into `candidates`, not empty) the balance picks.
    fn choose(&self, shared: &Shared, table: &BackendTable, candidates: &[Candidate], pool: &[usize]) -> usize {
        let weighted: Vec<(usize, u32)> =
            pool.iter().map(|&i| (candidates[i].row, candidates[i].weight)).collect();
        let by_row = |row: usize| pool.iter().copied().find(|&i| candidates[i].row == row);
        match shared.config.balance {
            Balance::First => pool[0],
            Balance::RoundRobin | Balance::SourceHash => {
                let mut schedule = shared.schedule.lock().unwrap_or_else(|e| e.into_inner());
                let order = schedule.of(&weighted);
                let at = (self.turn.wrapping_add(self.picks) % order.len() as u64) as usize;
                by_row(order[at]).unwrap_or(pool[0])
            }
            Balance::LeastConnections => {
                let mut schedule = shared.schedule.lock().unwrap_or_else(|e| e.into_inner());
                let order = schedule.of(&weighted);
                let len = order.len() as u64;
                let place = |row: usize| {
                    let first = order.iter().position(|&r| r == row).unwrap_or(0) as u64;
                    (first + len - self.turn % len) % len
                };
                // Fewest connections for the weight: active / weight, compared crosswise.
                *pool
                    .iter()
                    .min_by(|&&a, &&b| {
                        let (ca, cb) = (&candidates[a], &candidates[b]);
                        let load_a = u128::from(table.row(ca.row).active()) * u128::from(cb.weight);
                        let load_b = u128::from(table.row(cb.row).active()) * u128::from(ca.weight);
                        load_a.cmp(&load_b).then(place(ca.row).cmp(&place(cb.row)))
                    })
                    .expect("the pool is not empty")
            }
        }
    }
}

/// Every backend address of the relay, by row (empty until the master placed them: outside
/// the daemon).
fn candidates(upstreams: &Upstreams) -> Vec<Candidate> {
    let Some(placed) = upstreams.placed() else { return Vec::new() };
    let mut all = Vec::new();
    for (entry, (backend, rows)) in upstreams.backends.iter().zip(&placed.rows).enumerate() {
        for &row in rows {
            all.push(Candidate { row, entry, weight: backend.weight, backup: backend.backup });
        }
    }
    all.truncate(MAX_BACKENDS);
    all
}

/// The host of a backend as written, as TLS names it (`None` for a Unix socket, or a host
/// that is no name).
fn host_of(written: &str) -> Option<ServerName<'static>> {
    if written.starts_with("unix:") {
        return None;
    }
    let (host, _port) = written.rsplit_once(':')?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    ServerName::try_from(host.to_ascii_lowercase()).ok()
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
    use std::net::SocketAddr;

    use super::*;
    use crate::scoreboard::Scoreboard;

    /// A relay over `backends` (address, weight, backup, max_connections), placed in
    /// `board`'s backend table.
    pub(in crate::services::relay) fn relay(
        board: &Scoreboard, backends: &[(&str, u32, bool, u32)], balance: Balance) -> Shared {
        let backends = backends
            .iter()
            .map(|&(address, weight, backup, max)| Backend {
                written: address.into(),
                target: upstream::parse_target(address).unwrap(),
                weight,
                backup,
                max_connections: NonZeroU32::new(max),
            })
            .collect();
        let upstreams = Upstreams::new(backends, None, DEFAULT_RESOLVE_INTERVAL);
        upstreams.place(&board.backends(), 0, "relay").unwrap();
        let config = RelayConfig {
            upstreams: Arc::new(upstreams),
            balance,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            retries: DEFAULT_RETRIES,
            fail_threshold: 1,
            down_time: Duration::from_secs(1),
            send_proxy_protocol: None,
            splice: DEFAULT_SPLICE,
            source: None,
            backend_tls: None,
            routes: None,
            tcp_keepalive: None,
        };
        Shared { config, turn: Turn::new(1).unwrap(), schedule: Mutex::default(), candidates: OnceLock::new() }
    }

    fn plain(n: usize) -> Vec<(String, u32, bool, u32)> {
        (0..n).map(|i| (format!("127.0.0.1:{}", 1000 + i), 1, false, 0)).collect()
    }

    fn with(list: &[(String, u32, bool, u32)]) -> Vec<(&str, u32, bool, u32)> {
        list.iter().map(|(a, w, b, m)| (a.as_str(), *w, *b, *m)).collect()
    }

    /// The entry (backend index) each new session's first pick lands on; the lease is
    /// dropped at once.
    fn first_pick(shared: &Shared, peer: Peer) -> Result<usize, NoBackend> {
        let table = shared.config.upstreams.placed().unwrap().table.clone();
        let all = candidates(&shared.config.upstreams);
        let lease = Plan::new(shared, peer, 0).next(shared, &table, &all, 10)?;
        Ok(all.iter().find(|c| c.row == lease.index()).unwrap().entry)
    }

    fn peer() -> Peer {
        Peer::Ip("127.0.0.2:5000".parse().unwrap())
    }

    fn mark_down(shared: &Shared, entry: usize) {
        let placed = shared.config.upstreams.placed().unwrap();
        placed.table.row(placed.rows[entry][0]).failed(1, 0, 1_000_000);
    }

    #[test]
    fn smooth_weighted_round_robin_splits_exactly_and_interleaves() {
        let board = Scoreboard::create(None, 1).unwrap();
        let shared = relay(&board, &[("127.0.0.1:1", 3, false, 0), ("127.0.0.1:2", 1, false, 0)], Balance::RoundRobin);
        let picks: Vec<usize> = (0..400).map(|_| first_pick(&shared, peer()).unwrap()).collect();
        assert_eq!(picks.iter().filter(|&&e| e == 0).count(), 300, "3:1 exactly");
        for window in picks.windows(4) {
            assert_eq!(window.iter().filter(|&&e| e == 0).count(), 3, "smooth: {window:?}");
        }
        assert_eq!(smooth_order(&[(7, 5), (8, 1), (9, 1)]), [7, 7, 8, 7, 9, 7, 7], "nginx's example");
    }

    #[test]
    fn backups_serve_only_while_every_primary_is_down() {
        let board = Scoreboard::create(None, 1).unwrap();
        let list = [("127.0.0.1:1", 1, false, 0), ("127.0.0.1:2", 1, false, 0), ("127.0.0.1:3", 1, true, 0)];
        let shared = relay(&board, &list, Balance::RoundRobin);
        let picks: Vec<usize> = (0..10).map(|_| first_pick(&shared, peer()).unwrap()).collect();
        assert!(!picks.contains(&2), "the backup is idle while primaries serve: {picks:?}");
        mark_down(&shared, 0);
        assert!((0..10).all(|_| first_pick(&shared, peer()) == Ok(1)), "one primary is enough");
        mark_down(&shared, 1);
        assert!((0..10).all(|_| first_pick(&shared, peer()) == Ok(2)), "the backup takes over");
        let placed = shared.config.upstreams.placed().unwrap();
        assert!(placed.table.row(placed.rows[1][0]).succeeded());
        assert!((0..10).all(|_| first_pick(&shared, peer()) == Ok(1)), "and hands back");
    }

    #[test]
    fn a_full_backend_is_skipped_and_all_full_is_told_apart_from_all_down() {
        let board = Scoreboard::create(None, 1).unwrap();
        let shared = relay(&board, &[("127.0.0.1:1", 1, false, 1), ("127.0.0.1:2", 1, false, 1)], Balance::First);
        let table = shared.config.upstreams.placed().unwrap().table.clone();
        let all = candidates(&shared.config.upstreams);
        let first = Plan::new(&shared, peer(), 0).next(&shared, &table, &all, 10).unwrap();
        let second = Plan::new(&shared, peer(), 0).next(&shared, &table, &all, 10).unwrap();
        assert_ne!(first.index(), second.index(), "the first is full: the second serves");
        let third = Plan::new(&shared, peer(), 0).next(&shared, &table, &all, 10);
        assert_eq!(third.err(), Some(NoBackend::Full));
        drop(first);
        assert!(Plan::new(&shared, peer(), 0).next(&shared, &table, &all, 10).is_ok());
        mark_down(&shared, 0);
        mark_down(&shared, 1);
        let none = Plan::new(&shared, peer(), 0).next(&shared, &table, &all, 10);
        assert_eq!(none.err(), Some(NoBackend::Unavailable));
    }

    #[test]
    fn first_fails_over_in_order_and_retries_go_round_again() {
        let board = Scoreboard::create(None, 1).unwrap();
        let list = plain(3);
        let shared = relay(&board, &with(&list), Balance::First);
        let table = shared.config.upstreams.placed().unwrap().table.clone();
        let all = candidates(&shared.config.upstreams);
        let mut plan = Plan::new(&shared, peer(), 0);
        let order: Vec<usize> = (0..4)
            .map(|_| {
                let lease = plan.next(&shared, &table, &all, 10).unwrap();
                all.iter().find(|c| c.row == lease.index()).unwrap().entry
            })
            .collect();
        assert_eq!(order, [0, 1, 2, 0]);
    }

    #[test]
    fn source_hash_sticks_and_least_connections_weighs_the_load() {
        let board = Scoreboard::create(None, 1).unwrap();
        let list = plain(4);
        let shared = relay(&board, &with(&list), Balance::SourceHash);
        let pick = |ip: &str, port| {
            first_pick(&shared, Peer::Ip(SocketAddr::new(ip.parse().unwrap(), port))).unwrap()
        };
        assert_eq!(pick("127.0.0.2", 1), pick("127.0.0.2", 2), "the port does not matter");
        assert_eq!(pick("::ffff:127.0.0.2", 1), pick("127.0.0.2", 2));
        let spread: std::collections::HashSet<_> =
            (1..=32).map(|i| pick(&format!("127.0.0.{i}"), 1)).collect();
        assert!(spread.len() > 1, "different clients reach different backends");

        let board = Scoreboard::create(None, 1).unwrap();
        let shared = relay(&board, &[("127.0.0.1:1", 2, false, 0), ("127.0.0.1:2", 1, false, 0)], Balance::LeastConnections);
        let table = shared.config.upstreams.placed().unwrap().table.clone();
        let all = candidates(&shared.config.upstreams);
        let held: Vec<_> = (0..6).map(|_| Plan::new(&shared, peer(), 0).next(&shared, &table, &all, 10).unwrap()).collect();
        let on_first = held.iter().filter(|l| l.index() == all[0].row).count();
        assert_eq!(on_first, 4, "weight 2:1 holds connections 4:2");
    }

    #[test]
    fn options_are_checked() {
        let parse = |extra: &str| toml::from_str::<RelayOptions>(&format!("backends = []\n{extra}"));
        assert!(!parse("").unwrap().splice.unwrap_or(DEFAULT_SPLICE));
        assert_eq!(parse("splice = true").unwrap().splice, Some(true));
        assert!(parse("splice = \"yes\"").is_err(), "a boolean, not a word");
        let table = toml::from_str::<RelayOptions>(
            "backends = [\"127.0.0.1:1\", { address = \"unix:/run/r.sock\", weight = 3, backup = true, max_connections = 100 }]",
        )
        .unwrap();
        assert!(matches!(&table.backends.as_ref().unwrap()[1], BackendOptions::Table(t) if t.weight == Some(3)));
        assert!(toml::from_str::<RelayOptions>("backends = [{ address = \"x:1\", wieght = 3 }]").is_err());
    }
}
