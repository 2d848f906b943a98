//! Configuration: TOML file -> [`file::FileConfig`] (serde, unknown keys rejected) ->
//! [`validate::validate`] -> [`Config`] with real types.
//!
//! Runs in the master, before anything is bound or forked. Workers receive the validated
//! [`Config`] through `fork(2)` and never read the file. Every problem is collected and
//! reported as `path:line:col: key: message` (see [`ConfigError`]).

pub mod environment;
mod error;
pub mod file;
pub mod include;
pub mod keys;
pub mod lenient;
pub mod validate;

use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use error::{ConfigError, Issue};
pub use include::Sources;

use ipnet::IpNet;

use crate::files;
use crate::limits::Rules;
use crate::limits::access::AccessList;
use crate::logging::{LogConfig, LogTarget};
use crate::net::Address;
use crate::poller::EventBackend;
use crate::rate::Rate;
use crate::services::{Registry, ServiceConfig};

/// Descriptors a worker holds besides listeners and connections: stdio, its signal pipe, the
/// syslog socket, with room to spare. Part of the select budget check.
pub const RESERVED_FDS: usize = 16;

/// Upper bound of `daemon.workers`.
pub const MAX_WORKERS: usize = 512;

/// Worker slots per configured worker and generation (room for TTIN and for respawns while
/// old workers are still being reaped). Slots are fixed at start: the limits table and the
/// scoreboard are sized for them.
pub const SLOT_HEADROOM: usize = 2;

/// Worker slots the master creates at start, which nothing changes until a restart:
/// `workers` x [`SLOT_HEADROOM`] x (1 + `max_draining_generations`). It bounds the workers
/// alive at once, those added by SIGTTIN included.
pub fn worker_slots(workers: usize, max_draining_generations: usize) -> usize {
    workers.saturating_mul(SLOT_HEADROOM).saturating_mul(1 + max_draining_generations)
}

/// A validated configuration, with every default applied. Each field's default, unit and
/// reload behaviour are its key's in [`keys`] (linked from each field).
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `[daemon]`.
    pub daemon: DaemonConfig,
    /// `[log]`.
    pub log: LogConfig,
    /// `[[listener]]`, in file order; at least one.
    pub listeners: Vec<ListenerConfig>,
}

/// `[daemon]`: the worker pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonConfig {
    /// Worker processes to keep running ([`keys::WORKERS`]; `"auto"` is one per CPU).
    pub workers: NonZeroUsize,
    /// How long a graceful stop (SIGQUIT) lets open exchanges finish before the master sends
    /// SIGKILL; zero kills at once ([`keys::GRACEFUL_TIMEOUT`]).
    pub graceful_timeout: Duration,
    /// How long a worker retired while the service goes on (a reload's old generation,
    /// TTOU, WINCH, the old master of a binary upgrade) may serve the connections it could
    /// not hand off before the master sends SIGKILL; `None` (written `"0s"`, the default):
    /// until they end ([`keys::RELOAD_DRAIN_TIMEOUT`]). `graceful_timeout` still bounds a
    /// graceful stop, and `max_draining_generations` how many generations drain at once.
    pub reload_drain_timeout: Option<Duration>,
    /// Connections one worker holds at most, all listeners together; a full worker stops
    /// accepting until one closes. With the select backend it must fit
    /// [`FD_SETSIZE`](crate::poller::FD_SETSIZE); a reload cannot raise it above the value
    /// the daemon started with ([`keys::MAX_CONNECTIONS_PER_WORKER`]).
    pub max_connections_per_worker: NonZeroUsize,
    /// The master's pid file; also locates the scoreboard (`PID_FILE.scoreboard`) that
    /// `preforkd status` and the control commands read; `None`: no control commands
    /// ([`keys::PID_FILE`]).
    pub pid_file: Option<PathBuf>,
    /// A worker whose loop has not turned for this long is sent SIGABRT, then SIGKILL, and
    /// replaced; `None` (written `"0s"`) disables the check ([`keys::WORKER_TIMEOUT`]).
    pub worker_timeout: Option<Duration>,
    /// Generations that may be draining after reloads at once; a reload beyond it stops the
    /// oldest draining generation fast ([`keys::MAX_DRAINING_GENERATIONS`]).
    pub max_draining_generations: NonZeroUsize,
    /// When a worker is replaced gracefully, to bound what a leaking service costs.
    pub recycle: Recycle,
    /// User the workers switch to (setgroups, setgid, setuid) when the master runs as root;
    /// ignored, with a warning, otherwise ([`keys::USER`]).
    pub user: Option<String>,
    /// Group the workers switch to; `None`: the user's primary group ([`keys::GROUP`]).
    pub group: Option<String>,
    /// Lets workers run as root when the master does and no `user` is set; without it, that
    /// is a startup error ([`keys::ALLOW_ROOT_WORKERS`]).
    pub allow_root_workers: bool,
    /// RLIMIT_NOFILE (soft and hard) to set at start; `None` (written 0) keeps the inherited
    /// limit ([`keys::RLIMIT_NOFILE`]).
    pub rlimit_nofile: Option<u64>,
    /// Detach (double fork, setsid, chdir /, stdio to /dev/null) once ready; the starting
    /// process exits with the daemon's startup status ([`keys::DAEMONIZE`]).
    pub daemonize: bool,
    /// How workers wait for readiness ([`keys::EVENT_BACKEND`]).
    pub event_backend: EventBackend,
}

/// `[daemon]`'s recycling keys: when a worker asks to be replaced. The master then starts a
/// replacement and, once it is ready, stops the worker gracefully (its connections are
/// handed off where their sessions can be, the others finish there). A reload applies them to
/// the workers it starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recycle {
    /// After this many accepted connections (and UDP flows); `None` (written 0): never
    /// ([`keys::RECYCLE_AFTER_CONNECTIONS`]).
    pub after_connections: Option<NonZeroU64>,
    /// Up to this many more connections, chosen at random by each worker, so that workers
    /// started together are not replaced together ([`keys::RECYCLE_JITTER`]).
    pub jitter: u64,
    /// Once its resident memory (RSS) is over this many bytes; `None` (written 0): never
    /// ([`keys::RECYCLE_ABOVE_RSS`], written in MiB).
    pub above_rss: Option<NonZeroU64>,
}

/// One `[[listener]]`: an address, the service behind it and its connection policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    /// Unique name, used in logs ([`keys::NAME`], required).
    pub name: String,
    /// Address to bind: IP and port (port 0 asks the kernel for a free port), a Unix socket
    /// file or an abstract name ([`keys::ADDRESS`], required).
    pub address: Address,
    /// The socket file's mode and ownership, for a `unix:/path` address (all `None`
    /// otherwise).
    pub socket_file: SocketFile,
    /// TCP keepalive on accepted connections, set on the listening socket (which passes it
    /// on); `None` (written `"0s"`): the system's default, off ([`keys::TCP_KEEPALIVE_IDLE`],
    /// [`keys::TCP_KEEPALIVE_INTERVAL`], [`keys::TCP_KEEPALIVE_COUNT`]).
    pub tcp_keepalive: Option<crate::net::Keepalive>,
    /// The network interface the socket is bound to (`SO_BINDTODEVICE`): only packets
    /// through it reach the listener ([`keys::INTERFACE`]).
    pub interface: Option<String>,
    /// The service ([`keys::SERVICE`], required) built from `[listener.options]`
    /// ([`keys::OPTIONS`]).
    pub service: ServiceConfig,
    /// listen(2) backlog; the kernel caps it at `net.core.somaxconn` ([`keys::BACKLOG`]).
    pub backlog: NonZeroU32,
    /// A connection that has not completed an exchange is closed after this long without
    /// traffic; `None` (written `"0s"`) disables it ([`keys::SHORT_IDLE_TIMEOUT`]).
    pub short_idle_timeout: Option<Duration>,
    /// A kept-alive connection is closed after this long without traffic; `None` (written
    /// `"0s"`) disables it ([`keys::LONG_IDLE_TIMEOUT`]).
    pub long_idle_timeout: Option<Duration>,
    /// Open connections per client IP address on this listener, across all workers; `None`
    /// (written 0) is unlimited ([`keys::MAX_CONNECTIONS_PER_CLIENT`]).
    pub max_connections_per_client: Option<NonZeroU32>,
    /// Kept-alive connections per client IP address on this listener, across all workers;
    /// a connection beyond it is closed after its exchange; `None` (written 0) is unlimited
    /// ([`keys::MAX_LONG_CONNECTIONS_PER_CLIENT`]).
    pub max_long_connections_per_client: Option<NonZeroU32>,
    /// Set `TCP_NODELAY` on accepted connections, so small answers are not held back by
    /// Nagle's algorithm waiting for the client's delayed ACK ([`keys::TCP_NODELAY`]).
    pub tcp_nodelay: bool,
    /// Each worker also binds a socket of its own with `SO_REUSEPORT`, and the kernel spreads
    /// new connections over those sockets and the shared one. Trade-off: connections queued
    /// on a worker's own socket when it closes are reset unless `net.ipv4.tcp_migrate_req`
    /// is 1 (the worker accepts what is queued when it stops accepting, but a connection can
    /// still land in between) ([`keys::REUSEPORT`]).
    pub reuseport: bool,
    /// Who is served and how often: access lists, client keys, rate, listener cap, PROXY
    /// protocol input, shedding.
    pub admission: AdmissionConfig,
    /// Stream (TCP) or datagram (UDP) socket ([`keys::TRANSPORT`]).
    pub transport: ListenerTransport,
    /// UDP only: datagrams accepted per client IP address on this listener, across all
    /// workers (a token bucket in shared memory, [`crate::limits::DatagramRates`]);
    /// datagrams over it are dropped unanswered, so a spoofed flood cannot turn preforkd into
    /// an amplifier. `None` (written `"0"`) is unlimited, and always for TCP
    /// ([`keys::MAX_DATAGRAM_RATE_PER_CLIENT`]).
    pub max_datagram_rate_per_client: Option<Rate>,
    /// What the listener says to a client as it is admitted or refused (TCP only).
    pub banners: Banners,
    /// TLS termination in front of the service, every file read and checked; `None`: plain
    /// TCP ([`keys::TLS`] and the `listener.tls.*` keys). A reload reads the files again:
    /// new connections get the new certificates, open ones keep theirs.
    pub tls: Option<crate::tls::TlsConfig>,
}

/// Largest banner, in bytes: what one non-blocking send into a new connection's empty send
/// buffer takes whole (Linux's smallest, under memory pressure, is 4 KiB).
pub const MAX_BANNER: usize = 4096;

/// The banners of a listener ([`keys::BANNER`], [`keys::BANNER_FAIL`]), as xinetd's
/// `banner_success` and `banner_fail` and tcpserver's `-B`. The worker sends each with one
/// non-blocking send and never waits: a client that does not read costs nothing more.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Banners {
    /// Sent to an admitted client, before its service starts (`banner`).
    pub admitted: Option<Banner>,
    /// Sent to a refused client, for whatever reason, before the close (`banner_fail`).
    pub refused: Option<Banner>,
}

/// One banner: bytes, from the configuration or from a file read with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Banner {
    /// What is sent, at most [`MAX_BANNER`] bytes; for a file, empty until [`load`] reads it.
    pub bytes: Vec<u8>,
    /// The file the bytes come from, if any (read at start and at each reload).
    pub file: Option<PathBuf>,
}

/// The socket file of a `unix:/path` listener: its permissions decide who may connect
/// (unix(7): connecting needs write permission on the file).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SocketFile {
    /// Permission bits set with chmod(2) after bind, before listen; `None`: what the master's
    /// umask leaves of 0777 ([`keys::SOCKET_MODE`]).
    pub mode: Option<u32>,
    /// The file's owner, a user name or number; `None`: the master's user
    /// ([`keys::SOCKET_OWNER`]).
    pub owner: Option<String>,
    /// The file's group, a group name or number; `None`: the master's group
    /// ([`keys::SOCKET_GROUP`]).
    pub group: Option<String>,
}

/// A listener's admission policy, applied by the worker to every connection before its
/// session is made. [`AdmissionConfig::default`] is what a listener that sets none of these
/// keys gets: everyone admitted, keyed by the default prefixes, shedding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmissionConfig {
    /// `allow` / `deny`: client prefixes served and refused (reason `denied`), checked before
    /// anything is counted; the rule is in [`crate::limits::access`] ([`keys::ALLOW`],
    /// [`keys::DENY`]).
    pub access: AccessList,
    /// Per-client counts, rates and refusal logs key on the client address cut to this many
    /// bits (IPv4, and IPv4-mapped IPv6); 0 makes every IPv4 client one
    /// ([`keys::CLIENT_IPV4_PREFIX`]).
    pub client_ipv4_prefix: u8,
    /// The same for IPv6 addresses; 128 counts each address ([`keys::CLIENT_IPV6_PREFIX`]).
    pub client_ipv6_prefix: u8,
    /// New connections per client (token bucket, exact across workers; reason `rate`);
    /// `None` (written `"0"`): no rate limit ([`keys::MAX_CONNECTION_RATE_PER_CLIENT`],
    /// [`keys::CONNECTION_RATE_BURST`]).
    pub max_connection_rate_per_client: Option<Rate>,
    /// Open connections of this listener, all clients and workers together (reason
    /// `listener-full`); `None` (written 0): only the workers' budgets bound it
    /// ([`keys::MAX_CONNECTIONS`]).
    pub max_connections: Option<NonZeroU32>,
    /// Connections from [`AdmissionConfig::trusted_proxies`] must open with a PROXY protocol
    /// header (v1 or v2), whose source address is the client from then on
    /// ([`keys::ACCEPT_PROXY_PROTOCOL`]).
    pub accept_proxy_protocol: bool,
    /// Proxies whose PROXY protocol header is believed; other peers are clients themselves
    /// and must not send one ([`keys::TRUSTED_PROXIES`]).
    pub trusted_proxies: Vec<IpNet>,
    /// A full worker closes its oldest connection that has not completed an exchange to admit
    /// a new one (reason `shed`) ([`keys::SHED_WHEN_FULL`]).
    pub shed_when_full: bool,
}

impl Default for AdmissionConfig {
    /// The defaults of [`keys`], as validation applies them.
    fn default() -> Self {
        let prefix = |key: &keys::Key| key.default_as::<u8>().unwrap_or_default();
        let flag = |key: &keys::Key| key.default_as::<bool>().unwrap_or_default();
        AdmissionConfig {
            access: AccessList::default(),
            client_ipv4_prefix: prefix(&keys::CLIENT_IPV4_PREFIX),
            client_ipv6_prefix: prefix(&keys::CLIENT_IPV6_PREFIX),
            max_connection_rate_per_client: None,
            max_connections: None,
            accept_proxy_protocol: flag(&keys::ACCEPT_PROXY_PROTOCOL),
            trusted_proxies: Vec::new(),
            shed_when_full: flag(&keys::SHED_WHEN_FULL),
        }
    }
}

/// The socket type of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ListenerTransport {
    /// TCP: connections, accepted by the workers.
    Tcp,
    /// UDP: datagrams, received by the workers on the shared socket (or on their own with
    /// `reuseport`).
    Udp,
}

impl ListenerTransport {
    /// The configuration spelling: `"tcp"` or `"udp"`.
    pub fn name(self) -> &'static str {
        match self {
            ListenerTransport::Tcp => "tcp",
            ListenerTransport::Udp => "udp",
        }
    }
}

impl ListenerConfig {
    /// Whether connections on this listener need the shared per-client table at all.
    pub fn has_client_limits(&self) -> bool {
        self.max_connections_per_client.is_some() || self.max_long_connections_per_client.is_some()
    }

    /// Whether connections on this listener are counted in the shared table: per-client
    /// limits, the listener cap or a rate.
    pub fn counts_connections(&self) -> bool {
        self.has_client_limits()
            || self.admission.max_connections.is_some()
            || self.admission.max_connection_rate_per_client.is_some()
    }

    /// The rules [`crate::limits::Limits::admit_with`] applies for this listener.
    pub fn rules(&self) -> Rules {
        Rules {
            per_client: self.max_connections_per_client,
            listener: self.admission.max_connections,
            rate: self.admission.max_connection_rate_per_client,
        }
    }
}

/// Reads and validates the configuration file at `path`, with the files its `include`
/// patterns name ([`mod@include`]); `services` are the names `service = "..."` may use.
///
/// Only regular files of at most [`crate::files::MAX_CONFIG_BYTES`] (1 MiB) each are read; a
/// FIFO, a device or a larger file is refused with the reason, without blocking.
///
/// # Errors
/// [`ConfigError::Read`] when the main file cannot be read (missing, not a regular file, too
/// large, not UTF-8), [`ConfigError::Invalid`] with every problem found otherwise, an
/// included file that cannot be read or trusted among them.
///
/// Relative paths in the file (`pid_file`, `log.path`, `log.syslog_socket`, `include`) are
/// resolved against the directory of the main file, so they mean the same after daemon
/// mode's `chdir /`.
pub fn load(path: &Path, services: &Registry) -> Result<Config, ConfigError> {
    let sources = read_sources(path)?;
    let (config, _, raw) = parse_sources(&sources, services);
    match config {
        Some(config) if raw.is_empty() => Ok(config),
        _ => Err(ConfigError::invalid(&sources, raw)),
    }
}

/// [`load`], with the checks of [`environment::check`] against this machine as the current
/// user: what `preforkd check` reports, so that it finds everything startup would refuse,
/// in one run whatever else is wrong in the file.
///
/// # Errors
/// As [`load`]; [`ConfigError::Invalid`] also lists every problem startup would have here.
pub fn load_checked(path: &Path, services: &Registry) -> Result<Config, ConfigError> {
    let sources = read_sources(path)?;
    let (config, needs, mut raw) = parse_sources(&sources, services);
    raw.extend(environment::check(&needs, sources.document(), nix::unistd::geteuid()));
    match config {
        Some(config) if raw.is_empty() => Ok(config),
        _ => Err(ConfigError::invalid(&sources, raw)),
    }
}

/// The main file at `path` and the files it includes.
///
/// # Errors
/// [`ConfigError::Read`] when the main file cannot be read; the included files' problems
/// come out of validation with the others.
pub fn read_sources(path: &Path) -> Result<Sources, ConfigError> {
    let main = read_source(path)?;
    Ok(include::expand(path, main, nix::unistd::geteuid()))
}

/// Validates `sources`: the configuration when it is valid, what startup needs of this
/// machine as far as the file says, and every problem (the includes' first).
fn parse_sources(
    sources: &Sources,
    services: &Registry,
) -> (Option<Config>, environment::Needs, Vec<crate::schema::RawIssue>) {
    let (file, options, mut raw) = file::read(sources.document());
    raw.splice(0..0, sources.issues.iter().cloned());
    let mut needs = environment::Needs::default();
    let base = std::path::absolute(sources.main_path())
        .ok()
        .and_then(|p| p.parent().map(Path::to_owned))
        .unwrap_or_default();
    let mut config = file
        .and_then(|file| validate::validate(file, options, services, &base, &mut raw, &mut needs));
    if let Some(config) = config.as_mut() {
        config.resolve_paths(&base);
    }
    // Whether or not the rest is valid, so that one run reports an unreadable file too.
    read_banners(config.as_mut(), sources.document(), &mut raw);
    needs.resolve_paths(&base);
    (config, needs, raw)
}

/// Reads the banner files the listeners of `document` name (regular files of at most
/// [`MAX_BANNER`] bytes, opened without blocking) into `config`, when it is valid; a file
/// that cannot be read is a problem of its key.
fn read_banners(
    mut config: Option<&mut Config>,
    document: &str,
    raw: &mut Vec<crate::schema::RawIssue>,
) {
    let written = file::read(document).0.map(|file| file.listener).unwrap_or_default();
    for (index, section) in written.iter().enumerate() {
        let section = section.get_ref();
        for (key, value) in [("banner", &section.banner), ("banner_fail", &section.banner_fail)] {
            let Some(value) = value else { continue };
            let file::BannerValue::File(path) = value.get_ref() else { continue };
            if !path.starts_with('/') {
                continue; // Reported by validation.
            }
            let bytes = match files::read_bounded(Path::new(path), MAX_BANNER as u64) {
                Ok(bytes) if !bytes.is_empty() => bytes,
                outcome => {
                    raw.push(crate::schema::RawIssue {
                        span: value.span(),
                        key: format!("listener[{index}].{key}"),
                        message: match outcome {
                            Ok(_) => format!("{path} is empty"),
                            Err(error) => format!("{path}: {error}"),
                        },
                    });
                    continue;
                }
            };
            let listener = config.as_deref_mut().and_then(|c| c.listeners.get_mut(index));
            if let Some(listener) = listener {
                let banner = match key {
                    "banner" => &mut listener.banners.admitted,
                    _ => &mut listener.banners.refused,
                };
                if let Some(banner) = banner {
                    banner.bytes = bytes;
                }
            }
        }
    }
}

/// The text of the configuration file at `path`, read with the bounds of [`load`].
///
/// # Errors
/// [`ConfigError::Read`] when it cannot be read.
pub fn read_source(path: &Path) -> Result<String, ConfigError> {
    let read_error = |source| ConfigError::Read { path: path.to_owned(), source };
    let bytes = files::read_bounded(path, files::MAX_CONFIG_BYTES).map_err(read_error)?;
    String::from_utf8(bytes).map_err(|_| {
        read_error(std::io::Error::new(std::io::ErrorKind::InvalidData, "is not UTF-8 text"))
    })
}

impl Config {
    /// Makes every relative path absolute against `base`.
    pub fn resolve_paths(&mut self, base: &Path) {
        let resolve = |path: &mut PathBuf| {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        };
        if let Some(path) = self.daemon.pid_file.as_mut() {
            resolve(path);
        }
        match &mut self.log.target {
            LogTarget::File(path) | LogTarget::Syslog { socket: Some(path), .. } => resolve(path),
            _ => {}
        }
    }
}

/// Validates configuration `source` with `services`; `path` only labels the problems, and
/// `include` patterns are not followed ([`load`] follows them).
///
/// # Errors
/// [`ConfigError::Invalid`] listing every syntax, schema and value problem found, the
/// services' own included.
pub fn parse(path: &Path, source: &str, services: &Registry) -> Result<Config, ConfigError> {
    let sources = Sources::single(path, source.to_owned());
    let (file, options, mut raw) = file::read(source);
    let mut needs = environment::Needs::default();
    let base = std::path::absolute(path)
        .ok()
        .and_then(|p| p.parent().map(Path::to_owned))
        .unwrap_or_default();
    let config = file
        .and_then(|file| validate::validate(file, options, services, &base, &mut raw, &mut needs));
    match config {
        Some(config) if raw.is_empty() => Ok(config),
        _ => Err(ConfigError::invalid(&sources, raw)),
    }
}
