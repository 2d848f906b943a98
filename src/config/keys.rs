//! Every key of the configuration file, once: its name, type, default, unit, what a reload
//! does with it, and one line saying what it is ([`KEYS`]).
//!
//! Runs in the master (the configuration check). Validation takes each default from here:
//! a default is written as the file would write it ([`KeyDefault::Value`], TOML) and read the
//! way a written value is ([`Key::default_as`]), so it is written once and checked by the
//! same rules. Tests hold the table against the serde mirror of the file (`file.rs`), the
//! shipped `config/preforkd.toml`, `man/preforkd.toml.5` and the README: a key missing from
//! one of them, or documented with another default or reload behaviour, fails them.
//!
//! A new key is a row here, a field in the serde mirror, the lines of `validate.rs` that read
//! it into its [`super::Config`] field, and its documentation in those three files.

use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::duration;

/// A configuration key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    /// `section.key`, such as `daemon.workers`; `listener.*` keys belong to each
    /// `[[listener]]`, `listener.tls.*` keys to its `[listener.tls]` table and
    /// `listener.tls.sni.*` to each of its `[[listener.tls.sni]]` entries; a name without a
    /// section (`include`) is a key of the top level.
    pub name: &'static str,
    /// What the value is.
    pub kind: Kind,
    /// What an absent key means.
    pub default: KeyDefault,
    /// What the number counts (`connections`, `bits` ...); empty where the kind says it all.
    pub unit: &'static str,
    /// What a reload does with a changed value.
    pub reload: Reload,
    /// One line saying what the key is.
    pub doc: &'static str,
}

/// The type of a key's value, as the file writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An integer from `min` to `max`.
    Integer {
        /// Smallest value accepted.
        min: i64,
        /// Largest value accepted.
        max: i64,
    },
    /// An integer from 1 to [`super::MAX_WORKERS`], or `"auto"`.
    Workers,
    /// A humane duration string, such as `"10s"` ([`crate::duration`]).
    Duration,
    /// `true` or `false`.
    Boolean,
    /// One of these words.
    OneOf(&'static [&'static str]),
    /// A string: a name, an address, a syslog facility.
    String,
    /// A path; relative to the file's directory.
    Path,
    /// An array of CIDR prefixes.
    Prefixes,
    /// An array of paths, whose last component may hold the wildcards `*` and `?`.
    Patterns,
    /// A rate, `"COUNT/PERIOD"` ([`crate::rate::Rate::parse`]).
    Rate,
    /// A table: `[listener.options]`, read by the listener's service, or `[listener.tls]`.
    Table,
    /// A text, or `{ file = "PATH" }` (at most [`super::MAX_BANNER`] bytes).
    Banner,
    /// An array of tables, such as `[[listener.tls.sni]]`.
    Tables,
    /// An array of strings.
    Strings,
}

/// What an absent key means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyDefault {
    /// This value, as the file would write it (TOML: `"30s"`, `512`, `true`, `[]`).
    Value(&'static str),
    /// Nothing is set; the words say what that means (`none`, `the user's primary group`).
    Absent(&'static str),
    /// Whatever the daemon-wide key says.
    Inherit(&'static Key),
    /// The key must be written.
    Required,
}

/// What a reload (SIGHUP, `preforkd reload`) does with a changed value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// The new generation's workers and connections get it.
    Applies,
    /// Applied up to what the shared tables were sized for at start; more needs a restart.
    UpToStart,
    /// A reload that changes it is refused: it needs a restart.
    Restart,
}

impl KeyDefault {
    /// The default as the file writes it, through [`KeyDefault::Inherit`]; `None` for
    /// [`KeyDefault::Absent`] and [`KeyDefault::Required`].
    pub fn value(&self) -> Option<&'static str> {
        match self {
            KeyDefault::Value(text) => Some(text),
            KeyDefault::Inherit(key) => key.default.value(),
            KeyDefault::Absent(_) | KeyDefault::Required => None,
        }
    }
}

impl Key {
    /// The key's name within its section: `workers` for `daemon.workers`, `key` for
    /// `listener.tls.key`.
    pub fn field(&self) -> &'static str {
        self.name.rsplit_once('.').map_or(self.name, |(_, field)| field)
    }

    /// Its section: `daemon`, `log`, `listener`, `listener.tls` or `listener.tls.sni`; empty
    /// for a key of the top level.
    pub fn section(&self) -> &'static str {
        self.name.rsplit_once('.').map_or("", |(section, _)| section)
    }

    /// The key's path below `[[listener]]`: `tls.key` for `listener.tls.key`; `None` for a
    /// `[daemon]` or `[log]` key.
    pub fn listener_path(&self) -> Option<&'static str> {
        self.name.strip_prefix("listener.")
    }

    /// The default value read as the file's own value would be, into `T` (the field's type
    /// in the serde mirror, `Spanned` or not); `None` without a [`KeyDefault::value`], or when
    /// it does not read as a `T` (a mistake in this table, which the tests rule out).
    pub fn default_as<T: DeserializeOwned>(&self) -> Option<T> {
        #[derive(Deserialize)]
        struct Value<T> {
            value: T,
        }
        let text = self.default.value()?;
        toml::from_str::<Value<T>>(&format!("value = {text}")).ok().map(|v| v.value)
    }

    /// The default of a [`Kind::Duration`] key.
    pub fn default_duration(&self) -> Option<Duration> {
        duration::parse(&self.default_as::<String>()?).ok()
    }
}

macro_rules! keys {
    ($($const:ident $name:literal: $kind:expr, $default:expr, $unit:literal, $reload:ident,
        $doc:literal;)*) => {
        $(
            #[doc = concat!("`", $name, "`: ", $doc)]
            pub const $const: Key = Key {
                name: $name,
                kind: $kind,
                default: $default,
                unit: $unit,
                reload: Reload::$reload,
                doc: $doc,
            };
        )*

        /// Every key, in the order of the file's sections.
        pub const KEYS: &[&Key] = &[$(&$const),*];
    };
}

use KeyDefault::{Absent, Inherit, Required, Value};
use Kind::{Boolean, Integer, OneOf, Prefixes, Strings, Table, Tables};

const U32: i64 = u32::MAX as i64;

keys! {
    INCLUDE "include": Kind::Patterns, Value("[]"), "", Applies,
        "Files of more `[[listener]]` blocks, read in name order; a reload reads them again.";

    WORKERS "daemon.workers": Kind::Workers, Value("\"auto\""), "processes", UpToStart,
        "Worker processes to keep running, or \"auto\" for one per CPU.";
    GRACEFUL_TIMEOUT "daemon.graceful_timeout": Kind::Duration, Value("\"30s\""), "", Applies,
        "How long a graceful stop lets open exchanges finish before SIGKILL; \"0s\" kills at once.";
    RELOAD_DRAIN_TIMEOUT "daemon.reload_drain_timeout": Kind::Duration, Value("\"0s\""), "",
        Applies,
        "How long a retired generation may serve the connections it could not hand off; \"0s\": until they end.";
    MAX_CONNECTIONS_PER_WORKER "daemon.max_connections_per_worker":
        Integer { min: 1, max: 1 << 20 }, Value("512"), "connections", UpToStart,
        "Connections one worker holds at most, all listeners together; select's FD_SETSIZE bounds it.";
    PID_FILE "daemon.pid_file": Kind::Path, Absent("none"), "", Restart,
        "The master's pid file, which also locates the scoreboard for the control commands.";
    WORKER_TIMEOUT "daemon.worker_timeout": Kind::Duration, Value("\"30s\""), "", Applies,
        "A worker whose loop has not turned for this long is killed and replaced; \"0s\" disables it.";
    MAX_DRAINING_GENERATIONS "daemon.max_draining_generations":
        Integer { min: 1, max: 16 }, Value("4"), "generations", Applies,
        "Generations that may drain at once after reloads; beyond it the oldest stops fast.";
    RECYCLE_AFTER_CONNECTIONS "daemon.recycle_after_connections":
        Integer { min: 0, max: U32 }, Value("0"), "connections", Applies,
        "A worker that has accepted this many connections is replaced gracefully; 0 never.";
    RECYCLE_JITTER "daemon.recycle_jitter": Integer { min: 0, max: U32 }, Value("0"),
        "connections", Applies,
        "Up to this many more, chosen per worker, so workers are not replaced together.";
    RECYCLE_ABOVE_RSS "daemon.recycle_above_rss": Integer { min: 0, max: 1 << 30 }, Value("0"),
        "MiB", Applies,
        "A worker whose resident memory exceeds this is replaced gracefully; 0 never.";
    USER "daemon.user": Kind::String, Absent("none"), "", Restart,
        "User the workers switch to when the master runs as root.";
    GROUP "daemon.group": Kind::String, Absent("the user's primary group"), "", Restart,
        "Group the workers switch to when the master runs as root.";
    ALLOW_ROOT_WORKERS "daemon.allow_root_workers": Boolean, Value("false"), "", Restart,
        "Lets workers run as root when the master does and no user is set.";
    RLIMIT_NOFILE "daemon.rlimit_nofile": Integer { min: 0, max: 1 << 30 }, Value("0"),
        "descriptors", Restart,
        "RLIMIT_NOFILE to set at start; 0 keeps the inherited limit.";
    DAEMONIZE "daemon.daemonize": Boolean, Value("false"), "", Restart,
        "Detach from the terminal once ready, for hosts without systemd.";
    EVENT_BACKEND "daemon.event_backend": OneOf(&["select", "poll", "epoll"]),
        Value("\"select\""), "", Applies,
        "How workers wait for readiness.";
    DAEMON_CLIENT_IPV4_PREFIX "daemon.client_ipv4_prefix": Integer { min: 0, max: 32 },
        Value("32"), "bits", Applies,
        "Default of every listener's client_ipv4_prefix.";
    DAEMON_CLIENT_IPV6_PREFIX "daemon.client_ipv6_prefix": Integer { min: 0, max: 128 },
        Value("64"), "bits", Applies,
        "Default of every listener's client_ipv6_prefix.";
    DAEMON_TRUSTED_PROXIES "daemon.trusted_proxies": Prefixes, Value("[]"), "", Applies,
        "Default of every listener's trusted_proxies.";

    TARGET "log.target": OneOf(&["stderr", "syslog", "file"]), Value("\"stderr\""), "", Applies,
        "Where log lines go.";
    LEVEL "log.level": OneOf(&["error", "warn", "info", "debug", "trace", "off"]),
        Value("\"info\""), "", Applies,
        "Most verbose level written.";
    ACCESS_LOG "log.access_log": Boolean, Value("true"), "", Applies,
        "One line per closed connection, at level info.";
    FORMAT "log.format": OneOf(&["text", "json"]), Value("\"text\""), "", Applies,
        "How each line is written: text, or one JSON object with stable member names.";
    FACILITY "log.facility": Kind::String, Value("\"daemon\""), "", Applies,
        "syslog(3) facility, for target = \"syslog\".";
    SYSLOG_SOCKET "log.syslog_socket": Kind::Path, Absent("/dev/log"), "", Applies,
        "The syslog daemon's socket, for target = \"syslog\" (then /var/run/syslog).";
    PATH "log.path": Kind::Path, Absent("none"), "", Applies,
        "The log file, for target = \"file\" (required then).";

    NAME "listener.name": Kind::String, Required, "", Applies,
        "Unique name of the listener, used in logs and to hand its socket over.";
    ADDRESS "listener.address": Kind::String, Required, "", Applies,
        "Address to bind, `IP:PORT`, `[IPv6]:PORT`, `unix:/path` or `unix:@name`; a changed one is bound anew.";
    SOCKET_MODE "listener.mode": Kind::String, Absent("0777 less the master's umask"), "", Applies,
        "Permission bits of a unix:/path listener's socket file, in octal, such as \"0660\".";
    SOCKET_OWNER "listener.owner": Kind::String, Absent("the master's user"), "", Applies,
        "Owner of a unix:/path listener's socket file: a user name or number.";
    TCP_KEEPALIVE_IDLE "listener.tcp_keepalive_idle": Kind::Duration, Value("\"0s\""), "",
        Applies,
        "TCP keepalive on accepted connections: silence before the first probe; \"0s\" leaves it off.";
    TCP_KEEPALIVE_INTERVAL "listener.tcp_keepalive_interval": Kind::Duration,
        Absent("the system's, net.ipv4.tcp_keepalive_intvl"), "", Applies,
        "Between TCP keepalive probes.";
    TCP_KEEPALIVE_COUNT "listener.tcp_keepalive_count": Integer { min: 1, max: 127 },
        Absent("the system's, net.ipv4.tcp_keepalive_probes"), "probes", Applies,
        "Unanswered TCP keepalive probes before the connection is dropped.";
    INTERFACE "listener.interface": Kind::String, Absent("none"), "", Applies,
        "Bind the listening socket to this network interface (SO_BINDTODEVICE).";
    SOCKET_GROUP "listener.group": Kind::String, Absent("the master's group"), "", Applies,
        "Group of a unix:/path listener's socket file: a group name or number.";
    SERVICE "listener.service": Kind::String, Required, "", Applies,
        "The service behind the listener: a built-in or a registered one.";
    BACKLOG "listener.backlog": Integer { min: 1, max: 65535 }, Value("1024"), "connections",
        Applies,
        "listen(2) backlog; TCP only.";
    SHORT_IDLE_TIMEOUT "listener.short_idle_timeout": Kind::Duration, Value("\"10s\""), "",
        Applies,
        "Silence that closes a connection before its first exchange completes; \"0s\" disables it.";
    LONG_IDLE_TIMEOUT "listener.long_idle_timeout": Kind::Duration, Value("\"5m\""), "",
        Applies,
        "Silence that closes a kept-alive connection between exchanges; \"0s\" disables it.";
    MAX_CONNECTIONS_PER_CLIENT "listener.max_connections_per_client":
        Integer { min: 0, max: U32 }, Value("32"), "connections", Applies,
        "Open connections per client, exact across workers; 0 is unlimited.";
    MAX_LONG_CONNECTIONS_PER_CLIENT "listener.max_long_connections_per_client":
        Integer { min: 0, max: U32 }, Value("8"), "connections", Applies,
        "Kept-alive connections per client; beyond it, closed after the exchange; 0 is unlimited.";
    TCP_NODELAY "listener.tcp_nodelay": Boolean, Value("true"), "", Applies,
        "TCP_NODELAY on accepted connections.";
    REUSEPORT "listener.reuseport": Boolean, Value("false"), "", Applies,
        "A socket of its own per worker, with SO_REUSEPORT.";
    ALLOW "listener.allow": Prefixes, Value("[]"), "", Applies,
        "Client prefixes served, each with variables for their programs if a table; when empty, every client not denied.";
    DENY "listener.deny": Prefixes, Value("[]"), "", Applies,
        "Client prefixes refused; the most specific prefix of either list wins.";
    CLIENT_IPV4_PREFIX "listener.client_ipv4_prefix": Integer { min: 0, max: 32 },
        Inherit(&DAEMON_CLIENT_IPV4_PREFIX), "bits", Applies,
        "Prefix length an IPv4 client is counted, rate-limited and logged by.";
    CLIENT_IPV6_PREFIX "listener.client_ipv6_prefix": Integer { min: 0, max: 128 },
        Inherit(&DAEMON_CLIENT_IPV6_PREFIX), "bits", Applies,
        "Prefix length an IPv6 client is counted, rate-limited and logged by.";
    MAX_CONNECTION_RATE_PER_CLIENT "listener.max_connection_rate_per_client": Kind::Rate,
        Value("\"0\""), "connections per period", Applies,
        "New connections per client, a token bucket exact across workers; \"0\" is unlimited.";
    CONNECTION_RATE_BURST "listener.connection_rate_burst": Integer { min: 0, max: U32 },
        Value("0"), "connections", Applies,
        "Connections a quiet client may open at once under the rate; 0 is the rate's count.";
    MAX_CONNECTIONS "listener.max_connections": Integer { min: 0, max: U32 }, Value("0"),
        "connections", Applies,
        "Open connections of the whole listener, exact across workers; 0 is no cap.";
    ACCEPT_PROXY_PROTOCOL "listener.accept_proxy_protocol": Boolean, Value("false"), "",
        Applies,
        "Connections from trusted_proxies open with a PROXY protocol header naming the client.";
    TRUSTED_PROXIES "listener.trusted_proxies": Prefixes, Inherit(&DAEMON_TRUSTED_PROXIES), "",
        Applies,
        "Prefixes of the proxies whose PROXY protocol header is believed.";
    SHED_WHEN_FULL "listener.shed_when_full": Boolean, Value("true"), "", Applies,
        "A full worker closes a connection for a new client: a late PROXY header, one without an exchange, one over its client's fair share.";
    TRANSPORT "listener.transport": OneOf(&["tcp", "udp"]), Value("\"tcp\""), "", Applies,
        "Stream (TCP) or datagram (UDP) socket.";
    MAX_DATAGRAM_RATE_PER_CLIENT "listener.max_datagram_rate_per_client": Kind::Rate,
        Value("\"100/s\""), "datagrams per period", Applies,
        "UDP only: datagrams per client, exact across workers; over it, dropped; \"0\" is unlimited.";
    BANNER "listener.banner": Kind::Banner, Absent("none"), "bytes", Applies,
        "Sent to an admitted client before its service starts: a text, or { file = PATH }; TCP only.";
    BANNER_FAIL "listener.banner_fail": Kind::Banner, Absent("none"), "bytes", Applies,
        "Sent to a refused client before the close, with one non-blocking send; TCP only.";
    OPTIONS "listener.options": Table, Absent("none"), "", Applies,
        "The service's own options, a `[listener.options]` table read by the service.";
    TLS "listener.tls": Table, Absent("none"), "", Applies,
        "TLS termination in front of the service, a `[listener.tls]` table; TCP only.";

    TLS_CERTIFICATE "listener.tls.certificate": Kind::Path, Required, "", Applies,
        "The default certificate chain, PEM, the server's certificate first.";
    TLS_KEY "listener.tls.key": Kind::Path, Required, "", Applies,
        "The default certificate's private key, PEM (PKCS#8, PKCS#1 or SEC1).";
    TLS_SNI "listener.tls.sni": Tables, Value("[]"), "", Applies,
        "Certificates chosen by the server name the client asks for, `[[listener.tls.sni]]` entries.";
    TLS_CLIENT_CA "listener.tls.client_ca": Kind::Path, Absent("none"), "", Applies,
        "CA certificates, PEM, that client certificates must chain to (mTLS); none asks for none.";
    TLS_CLIENT_AUTH "listener.tls.client_auth": OneOf(&["required", "optional"]),
        Value("\"required\""), "", Applies,
        "With client_ca: a client without a certificate is refused, or served.";
    TLS_MIN_VERSION "listener.tls.min_version": OneOf(&["1.2", "1.3"]), Value("\"1.2\""), "",
        Applies,
        "The lowest TLS version accepted.";
    TLS_ALPN "listener.tls.alpn": Strings, Value("[]"), "", Applies,
        "ALPN protocols offered, most preferred first; a client offering only others is refused.";
    TLS_HANDSHAKE_TIMEOUT "listener.tls.handshake_timeout": Kind::Duration,
        Inherit(&SHORT_IDLE_TIMEOUT), "", Applies,
        "How long a handshake may take from accept; \"0s\" leaves only the idle timeouts.";
    TLS_SESSION_TICKETS "listener.tls.session_tickets": Boolean, Value("true"), "", Applies,
        "Session tickets, so that clients resume on any worker without a full handshake.";
    TLS_TICKET_ROTATION "listener.tls.ticket_rotation": Kind::Duration, Value("\"1h\""), "",
        Applies,
        "How often the master replaces the ticket key; a ticket opens for one to two periods.";

    SNI_NAME "listener.tls.sni.name": Kind::String, Required, "", Applies,
        "The server name, such as `www.example.org`, or `*.example.org` for any one label.";
    SNI_CERTIFICATE "listener.tls.sni.certificate": Kind::Path, Required, "", Applies,
        "Its certificate chain, PEM, which must cover the name.";
    SNI_KEY "listener.tls.sni.key": Kind::Path, Required, "", Applies,
        "Its private key, PEM.";
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use toml::Spanned;

    use super::*;

    #[test]
    fn names_are_unique_and_sectioned() {
        let mut seen = HashSet::new();
        for key in KEYS {
            assert!(seen.insert(key.name), "{} twice", key.name);
            let sections = ["", "daemon", "log", "listener", "listener.tls", "listener.tls.sni"];
            assert!(sections.contains(&key.section()), "{}", key.name);
            assert!(key.doc.ends_with('.'), "{}: a doc line is a sentence", key.name);
        }
    }

    #[test]
    fn every_default_reads_as_its_kind() {
        for key in KEYS {
            let Some(text) = key.default.value() else { continue };
            let read = match key.kind {
                Kind::Integer { min, max } => key
                    .default_as::<Spanned<i64>>()
                    .is_some_and(|v| (min..=max).contains(v.get_ref())),
                Kind::Boolean => key.default_as::<bool>().is_some(),
                Kind::Prefixes | Kind::Patterns | Kind::Strings => {
                    key.default_as::<Vec<String>>().is_some()
                }
                Kind::Tables => key.default_as::<Vec<toml::Table>>().is_some(),
                Kind::Duration => key.default_duration().is_some(),
                Kind::OneOf(words) => {
                    key.default_as::<String>().is_some_and(|w| words.contains(&w.as_str()))
                }
                Kind::Rate => {
                    key.default_as::<String>().is_some_and(|r| crate::rate::Rate::parse(&r).is_ok())
                }
                Kind::Workers | Kind::String | Kind::Path | Kind::Table | Kind::Banner => {
                    key.default_as::<toml::Value>().is_some()
                }
            };
            assert!(read, "{}: default {text} does not read as {:?}", key.name, key.kind);
        }
    }
}
