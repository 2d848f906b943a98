//! The serde mirror of the TOML file, and a reader that collects *every* schema problem.
//!
//! Runs in the master (startup, `check`). Every key is optional here: missing keys, defaults
//! and value checks belong to [`super::validate`]. This layer only rejects unknown keys and
//! values of the wrong TOML type, each reported with its byte span.
//!
//! serde stops at the first error, so [`read`] removes the offending entry from the parsed
//! document and deserializes again, until the document is clean; each round reports one issue.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Visitor};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::schema::{RawIssue, deserialize_collecting};

/// The whole configuration file: `[daemon]`, `[log]` and any number of `[[listener]]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// `include = [...]`: files of more `[[listener]]` blocks (read by [`super::include`]).
    pub include: Option<Spanned<Vec<Spanned<String>>>>,
    /// `[daemon]`: the process pool.
    pub daemon: Option<DaemonSection>,
    /// `[log]`: where log lines go.
    pub log: Option<LogSection>,
    /// `[[listener]]`: one per listening address, each with its own policy.
    #[serde(default)]
    pub listener: Vec<Spanned<ListenerSection>>,
}

/// `[daemon]` as written in the file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonSection {
    /// Number of workers, or `"auto"`.
    pub workers: Option<Spanned<WorkersValue>>,
    /// Graceful stop deadline, a humane duration string.
    pub graceful_timeout: Option<Spanned<String>>,
    /// Bound on a retired generation's drain, a humane duration string.
    pub reload_drain_timeout: Option<Spanned<String>>,
    /// Connection budget of one worker, all listeners together.
    pub max_connections_per_worker: Option<Spanned<i64>>,
    /// Pid file path.
    pub pid_file: Option<Spanned<String>>,
    /// Hung-worker timeout, a humane duration string.
    pub worker_timeout: Option<Spanned<String>>,
    /// Draining generations allowed at once.
    pub max_draining_generations: Option<Spanned<i64>>,
    /// Accepted connections after which a worker is replaced.
    pub recycle_after_connections: Option<Spanned<i64>>,
    /// Most connections added to that count per worker.
    pub recycle_jitter: Option<Spanned<i64>>,
    /// Resident memory in MiB above which a worker is replaced.
    pub recycle_above_rss: Option<Spanned<i64>>,
    /// User the workers run as (when started as root).
    pub user: Option<Spanned<String>>,
    /// Group the workers run as (when started as root).
    pub group: Option<Spanned<String>>,
    /// Opt-in to workers running as root.
    pub allow_root_workers: Option<Spanned<bool>>,
    /// RLIMIT_NOFILE to set at start.
    pub rlimit_nofile: Option<Spanned<i64>>,
    /// Detach from the terminal (classic daemon mode).
    pub daemonize: Option<Spanned<bool>>,
    /// Readiness backend: select, poll or epoll.
    pub event_backend: Option<Spanned<String>>,
    /// Default of every listener's `client_ipv4_prefix`.
    pub client_ipv4_prefix: Option<Spanned<i64>>,
    /// Default of every listener's `client_ipv6_prefix`.
    pub client_ipv6_prefix: Option<Spanned<i64>>,
    /// Default of every listener's `trusted_proxies`.
    pub trusted_proxies: Option<Spanned<Vec<Spanned<String>>>>,
}

/// `[log]` as written in the file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// `"stderr"` or `"syslog"`.
    pub target: Option<Spanned<String>>,
    /// `"error"`, `"warn"`, `"info"`, `"debug"`, `"trace"` or `"off"`.
    pub level: Option<Spanned<String>>,
    /// One line per closed connection.
    pub access_log: Option<Spanned<bool>>,
    /// syslog(3) facility name, for `target = "syslog"`.
    pub facility: Option<Spanned<String>>,
    /// Path of the syslog socket, for `target = "syslog"`.
    pub syslog_socket: Option<Spanned<String>>,
    /// Log file, for `target = "file"`.
    pub path: Option<Spanned<String>>,
    /// `"text"` or `"json"`.
    pub format: Option<Spanned<String>>,
}

/// One `[[listener]]` block as written in the file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSection {
    /// Unique name, used in logs.
    pub name: Option<Spanned<String>>,
    /// `IP:PORT`, `[IPv6]:PORT`, `unix:/path` or `unix:@name`.
    pub address: Option<Spanned<String>>,
    /// Permission bits of a Unix socket file, in octal (`"0660"`).
    pub mode: Option<Spanned<String>>,
    /// Owner of a Unix socket file: a user name or number.
    pub owner: Option<Spanned<String>>,
    /// Group of a Unix socket file: a group name or number.
    pub group: Option<Spanned<String>>,
    /// Silence before the first TCP keepalive probe; "0s": off.
    pub tcp_keepalive_idle: Option<Spanned<String>>,
    /// Between TCP keepalive probes.
    pub tcp_keepalive_interval: Option<Spanned<String>>,
    /// Unanswered TCP keepalive probes before the connection is dropped.
    pub tcp_keepalive_count: Option<Spanned<i64>>,
    /// Network interface to bind to (SO_BINDTODEVICE).
    pub interface: Option<Spanned<String>>,
    /// Built-in service name.
    pub service: Option<Spanned<String>>,
    /// listen(2) backlog.
    pub backlog: Option<Spanned<i64>>,
    /// Idle timeout before the first completed exchange.
    pub short_idle_timeout: Option<Spanned<String>>,
    /// Idle timeout of a kept-alive connection.
    pub long_idle_timeout: Option<Spanned<String>>,
    /// Connections per client address, across all workers.
    pub max_connections_per_client: Option<Spanned<i64>>,
    /// Kept-alive connections per client address, across all workers.
    pub max_long_connections_per_client: Option<Spanned<i64>>,
    /// TCP_NODELAY on accepted connections.
    pub tcp_nodelay: Option<Spanned<bool>>,
    /// One SO_REUSEPORT socket per worker.
    pub reuseport: Option<Spanned<bool>>,
    /// CIDR prefixes served (when not empty, only these), each a string or a rule with
    /// variables for the programs run for its clients.
    pub allow: Option<Spanned<Vec<Spanned<AllowEntry>>>>,
    /// CIDR prefixes refused.
    pub deny: Option<Spanned<Vec<Spanned<String>>>>,
    /// Prefix length an IPv4 client is counted by.
    pub client_ipv4_prefix: Option<Spanned<i64>>,
    /// Prefix length an IPv6 client is counted by.
    pub client_ipv6_prefix: Option<Spanned<i64>>,
    /// New connections per client and unit of time, such as `"20/s"`.
    pub max_connection_rate_per_client: Option<Spanned<String>>,
    /// Connections a quiet client may open at once under the rate.
    pub connection_rate_burst: Option<Spanned<i64>>,
    /// Open connections of the whole listener, across all workers.
    pub max_connections: Option<Spanned<i64>>,
    /// Connections from `trusted_proxies` start with a PROXY protocol header.
    pub accept_proxy_protocol: Option<Spanned<bool>>,
    /// CIDR prefixes of the proxies whose PROXY protocol header is believed.
    pub trusted_proxies: Option<Spanned<Vec<Spanned<String>>>>,
    /// A full worker closes its oldest connection that has not completed an exchange.
    pub shed_when_full: Option<Spanned<bool>>,
    /// `"tcp"` (default) or `"udp"`.
    pub transport: Option<Spanned<String>>,
    /// Datagrams per client address and period, across all workers (`"100/s"`), UDP only.
    pub max_datagram_rate_per_client: Option<Spanned<String>>,
    /// Sent to a client as it is admitted, before the service starts.
    pub banner: Option<Spanned<BannerValue>>,
    /// Sent to a client as it is refused, before the close.
    pub banner_fail: Option<Spanned<BannerValue>>,
    /// `[listener.options]`: the service's own options, read by the service.
    pub options: Option<Spanned<toml::Table>>,
    /// `[listener.tls]`: TLS termination in front of the service.
    pub tls: Option<Spanned<TlsSection>>,
}

/// `[listener.tls]` as written in the file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// The default certificate chain file.
    pub certificate: Option<Spanned<String>>,
    /// Its private key file.
    pub key: Option<Spanned<String>>,
    /// `[[listener.tls.sni]]`: certificates by server name.
    pub sni: Option<Vec<Spanned<SniSection>>>,
    /// CA file for client certificates.
    pub client_ca: Option<Spanned<String>>,
    /// `"required"` or `"optional"`.
    pub client_auth: Option<Spanned<String>>,
    /// `"1.2"` or `"1.3"`.
    pub min_version: Option<Spanned<String>>,
    /// ALPN protocol names.
    pub alpn: Option<Spanned<Vec<Spanned<String>>>>,
    /// Handshake deadline, a humane duration string.
    pub handshake_timeout: Option<Spanned<String>>,
    /// Session tickets on or off.
    pub session_tickets: Option<Spanned<bool>>,
    /// Ticket key rotation period, a humane duration string.
    pub ticket_rotation: Option<Spanned<String>>,
}

/// One `[[listener.tls.sni]]` entry as written in the file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SniSection {
    /// The server name (or `*.` wildcard).
    pub name: Option<Spanned<String>>,
    /// Its certificate chain file.
    pub certificate: Option<Spanned<String>>,
    /// Its private key file.
    pub key: Option<Spanned<String>>,
}

/// One entry of `allow`: `"10.0.0.0/8"`, or `{ prefix = "10.0.0.0/8", env = { K = "V" } }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowEntry {
    /// A prefix alone.
    Prefix(String),
    /// A prefix with the variables its clients' programs get.
    Rule {
        /// The prefix.
        prefix: String,
        /// `NAME = "VALUE"`, in the order written.
        env: Vec<(String, String)>,
    },
}

/// A banner as written: `"text"` or `{ file = "/path" }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BannerValue {
    /// The bytes of this text.
    Text(String),
    /// The contents of this file, read when the configuration is loaded.
    File(String),
}

/// Reads a string or a table of exactly `keys` (each a string, or for `env` a table of
/// strings), for the two keys above whose value is either.
fn string_or_table<'de, A: de::MapAccess<'de>>(
    mut map: A,
    keys: &'static [&'static str],
) -> Result<Vec<(String, toml::Value)>, A::Error> {
    let mut found = Vec::new();
    while let Some(key) = map.next_key::<String>()? {
        if !keys.contains(&key.as_str()) {
            return Err(de::Error::unknown_field(&key, keys));
        }
        found.push((key, map.next_value::<toml::Value>()?));
    }
    Ok(found)
}

impl<'de> Deserialize<'de> for AllowEntry {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct AllowVisitor;
        impl<'de> Visitor<'de> for AllowVisitor {
            type Value = AllowEntry;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a CIDR prefix, or { prefix = \"...\", env = { NAME = \"VALUE\" } }")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<AllowEntry, E> {
                Ok(AllowEntry::Prefix(v.to_owned()))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<AllowEntry, A::Error> {
                let (mut prefix, mut env) = (None, Vec::new());
                for (key, value) in string_or_table(map, &["prefix", "env"])? {
                    match (key.as_str(), value) {
                        ("prefix", toml::Value::String(text)) => prefix = Some(text),
                        ("env", toml::Value::Table(table)) => {
                            for (name, value) in table {
                                let toml::Value::String(value) = value else {
                                    return Err(de::Error::custom(format!(
                                        "env.{name}: the value must be a string"
                                    )));
                                };
                                env.push((name, value));
                            }
                        }
                        (key, _) => {
                            return Err(de::Error::custom(format!(
                                "{key}: expected {}",
                                if key == "env" { "a table of strings" } else { "a string" }
                            )));
                        }
                    }
                }
                let prefix = prefix.ok_or_else(|| de::Error::missing_field("prefix"))?;
                Ok(AllowEntry::Rule { prefix, env })
            }
        }
        deserializer.deserialize_any(AllowVisitor)
    }
}

impl<'de> Deserialize<'de> for BannerValue {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BannerVisitor;
        impl<'de> Visitor<'de> for BannerVisitor {
            type Value = BannerValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a text, or { file = \"/path\" }")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<BannerValue, E> {
                Ok(BannerValue::Text(v.to_owned()))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<BannerValue, A::Error> {
                match string_or_table(map, &["file"])?.pop() {
                    Some((_, toml::Value::String(path))) => Ok(BannerValue::File(path)),
                    Some(_) => Err(de::Error::custom("file: expected a path")),
                    None => Err(de::Error::missing_field("file")),
                }
            }
        }
        deserializer.deserialize_any(BannerVisitor)
    }
}

/// `workers = 4` or `workers = "auto"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkersValue {
    /// An explicit count (checked to be in range later).
    Count(i64),
    /// A keyword; only `"auto"` is valid (checked later).
    Keyword(String),
}

impl<'de> Deserialize<'de> for WorkersValue {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct WorkersVisitor;
        impl Visitor<'_> for WorkersVisitor {
            type Value = WorkersValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of workers or \"auto\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<WorkersValue, E> {
                Ok(WorkersValue::Count(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<WorkersValue, E> {
                Ok(WorkersValue::Count(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<WorkersValue, E> {
                Ok(WorkersValue::Keyword(v.to_owned()))
            }
        }
        deserializer.deserialize_any(WorkersVisitor)
    }
}

/// Parses `source` and deserializes it into a [`FileConfig`], collecting every syntax error,
/// unknown key and wrongly typed value instead of stopping at the first.
///
/// Returns the configuration with the offending entries left out (`None` when the document
/// could not be read at all), the `[listener.options]` table of each listener (with spans, for
/// the services to read; `None` where absent), and the problems found, in the order found.
pub fn read(
    source: &str,
) -> (Option<FileConfig>, Vec<Option<Spanned<DeTable<'_>>>>, Vec<RawIssue>) {
    let (mut document, errors) = DeTable::parse_recoverable(source);
    if !errors.is_empty() {
        let issues = errors
            .iter()
            .map(|e| RawIssue {
                span: e.span().unwrap_or(0..0),
                key: "syntax".to_owned(),
                message: e.message().trim().to_owned(),
            })
            .collect();
        return (None, Vec::new(), issues);
    }
    let mut issues = Vec::new();
    let config = deserialize_collecting(&mut document, "", source.len(), &mut issues);
    let options = match document.get_ref().get("listener").map(|l| l.get_ref()) {
        Some(DeValue::Array(listeners)) => listeners
            .iter()
            .map(|listener| match listener.get_ref() {
                DeValue::Table(table) => table.get("options").and_then(|options| {
                    let span = options.span();
                    match options.get_ref() {
                        DeValue::Table(options) => Some(Spanned::new(span, options.clone())),
                        _ => None,
                    }
                }),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    (config, options, issues)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_file_reads_without_issues() {
        let (config, _, issues) =
            read("[daemon]\nworkers = \"auto\"\n[[listener]]\nname = \"a\"\n");
        assert!(issues.is_empty(), "{issues:?}");
        let config = config.unwrap();
        let workers = config.daemon.unwrap().workers.unwrap().into_inner();
        assert_eq!(workers, WorkersValue::Keyword("auto".into()));
        assert_eq!(config.listener.len(), 1);
    }

    #[test]
    fn every_unknown_key_and_type_error_is_reported() {
        let source = "colour = 1\n[daemon]\nworkers = true\nspeed = 3\n\
                      [[listener]]\nname = \"a\"\nbacklog = \"big\"\nadress = \"x\"\n";
        let (config, _, issues) = read(source);
        let keys: Vec<&str> = issues.iter().map(|i| i.key.as_str()).collect();
        assert!(config.is_some(), "{issues:#?}");
        for expected in [
            "colour",
            "daemon.workers",
            "daemon.speed",
            "listener[0].backlog",
            "listener[0].adress",
        ] {
            assert!(keys.contains(&expected), "{expected} missing from {keys:?}");
        }
        assert_eq!(issues.len(), 5, "{issues:?}");
    }

    /// The keys serde expects in each section, from its own "unknown field" message.
    fn mirrored(section: &str) -> Vec<String> {
        let header = match section {
            "listener" => "[[listener]]",
            "listener.tls" => "[[listener]]\n[listener.tls]",
            "listener.tls.sni" => "[[listener]]\n[[listener.tls.sni]]",
            "log" => "[log]",
            _ => "[daemon]",
        };
        let (_, _, issues) = read(&format!("{header}\nno_such_key = 1\n"));
        let message = &issues.first().expect("an unknown key is reported").message;
        let (_, expected) = message.split_once("expected one of").expect(message);
        expected.split(',').map(|k| k.trim().trim_matches('`').to_owned()).collect()
    }

    #[test]
    fn the_serde_mirror_holds_exactly_the_keys_of_the_table() {
        for section in ["daemon", "log", "listener", "listener.tls", "listener.tls.sni"] {
            let mut mirrored = mirrored(section);
            let mut table: Vec<String> = super::super::keys::KEYS
                .iter()
                .filter(|k| k.section() == section)
                .map(|k| k.field().to_owned())
                .collect();
            mirrored.sort();
            table.sort();
            assert_eq!(mirrored, table, "[{section}]: file.rs and keys.rs differ");
        }
    }

    #[test]
    fn syntax_errors_stop_before_schema() {
        let (config, _, issues) = read("[daemon\nworkers = 1\n");
        assert!(config.is_none());
        assert!(!issues.is_empty());
        assert!(issues.iter().all(|i| i.key == "syntax"));
    }
}
