//! [`FileConfig`] -> [`Config`]: defaults, ranges, cross-key checks. Collects every problem.
//!
//! Pure but for the files `[listener.tls]` names (read and checked by [`crate::tls::load`],
//! so that `check` and reload find a bad certificate) and what a service's own build
//! looks at; each rule is unit-tested here.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::ops::Range;
use std::str::FromStr;
use std::time::Duration;

use serde::de::DeserializeOwned;
use toml::Spanned;

use super::environment::{ListenerNeed, Needs};
use super::file::{AllowEntry, BannerValue, FileConfig, ListenerSection, TlsSection, WorkersValue};
use super::keys::{self, Key, Kind};
use super::{
    AdmissionConfig, Banner, Banners, Config, DaemonConfig, ListenerConfig, ListenerTransport,
    MAX_BANNER, MAX_WORKERS, RESERVED_FDS, Recycle, SLOT_HEADROOM, SocketFile, worker_slots,
};
use ipnet::IpNet;
use toml::de::DeTable;

use crate::duration;
use crate::limits::MAX_RECORDS;
use crate::limits::access::{AccessList, EnvRule};
use crate::logging::{LogConfig, LogFormat, LogTarget, SyslogFacility};
use crate::net::Address;
use crate::poller::{EventBackend, FD_SETSIZE};
use crate::rate::Rate;
use crate::schema::RawIssue;
use crate::services::{Options, Registry, ServiceConfig};
use crate::tls::{Field, Findings, SniSpec, TlsConfig, TlsSpec, TlsVersion};

/// Shortest non-zero `daemon.worker_timeout`: shorter would take a busy worker for a hung one.
pub const MIN_WORKER_TIMEOUT: Duration = Duration::from_secs(1);

/// Reads values into their types, taking each absent key's default from [`keys`], and
/// collects every problem.
struct Checker<'a> {
    issues: &'a mut Vec<RawIssue>,
    /// The file's directory, which relative paths of `[listener.tls]` are resolved against.
    base: &'a std::path::Path,
    /// The `[[listener]]` being checked: labels `listener.*` keys `listener[N].KEY`.
    listener: Option<usize>,
}

/// `"a", "b" or "c"`.
fn one_of(words: &[&str]) -> String {
    let quoted: Vec<String> = words.iter().map(|w| format!("{w:?}")).collect();
    match quoted.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => quoted.concat(),
    }
}

impl Checker<'_> {
    fn report(&mut self, span: Range<usize>, key: impl Into<String>, message: impl Into<String>) {
        self.issues.push(RawIssue { span, key: key.into(), message: message.into() });
    }

    /// How problems with `key` are labelled: `daemon.workers`, `listener[2].backlog`,
    /// `listener[2].tls.key`.
    fn label(&self, key: &Key) -> String {
        match (self.listener, key.listener_path()) {
            (Some(index), Some(path)) => format!("listener[{index}].{path}"),
            _ => key.name.to_owned(),
        }
    }

    /// The written `value`, else `key`'s default read the same way (at no position); `None`
    /// when the key has no default value.
    fn written_or_default<T: DeserializeOwned + Clone>(
        &mut self,
        value: Option<&Spanned<T>>,
        key: &Key,
    ) -> Option<Spanned<T>> {
        if let Some(value) = value {
            return Some(value.clone());
        }
        key.default.value()?;
        let default = key.default_as::<T>().map(|v| Spanned::new(0..0, v));
        if default.is_none() {
            self.report(0..0, key.name, "its built-in default does not read (see config/keys.rs)");
        }
        default
    }

    fn duration(&mut self, value: Option<&Spanned<String>>, key: &Key) -> Duration {
        let default = key.default_duration().unwrap_or_default();
        let Some(value) = self.written_or_default(value, key) else { return default };
        duration::parse(value.get_ref()).unwrap_or_else(|message| {
            self.report(value.span(), self.label(key), message);
            default
        })
    }

    /// An integer in the key's range ([`Kind::Integer`]), or its default.
    fn integer(&mut self, value: Option<&Spanned<i64>>, key: &Key) -> i64 {
        let Kind::Integer { min, max } = key.kind else {
            self.report(0..0, key.name, "is not an integer key (see config/keys.rs)");
            return 0;
        };
        let default = key.default_as::<i64>().unwrap_or(min);
        let Some(value) = self.written_or_default(value, key) else { return default };
        let n = *value.get_ref();
        if (min..=max).contains(&n) {
            n
        } else {
            let label = self.label(key);
            self.report(
                value.span(),
                label,
                format!("{n} is out of range: expected {min} to {max}"),
            );
            default
        }
    }

    fn boolean(&mut self, value: Option<&Spanned<bool>>, key: &Key) -> bool {
        self.written_or_default(value, key).is_some_and(Spanned::into_inner)
    }

    /// A non-empty path, or `None` when absent (an empty one is reported).
    fn path(&mut self, value: Option<&Spanned<String>>, key: &Key) -> Option<std::path::PathBuf> {
        let value = self.written_or_default(value, key)?;
        if value.get_ref().is_empty() {
            self.report(value.span(), self.label(key), "must be a path, not empty");
            return None;
        }
        Some(std::path::PathBuf::from(value.into_inner()))
    }

    /// A list of CIDR prefixes (`"192.0.2.0/24"`, `"2001:db8::/32"`; a bare address is its
    /// own /32 or /128); each bad one is reported.
    fn nets(&mut self, value: Option<&Spanned<Vec<Spanned<String>>>>, key: &Key) -> Vec<IpNet> {
        let Some(value) = self.written_or_default(value, key) else { return Vec::new() };
        let label = self.label(key);
        value
            .get_ref()
            .iter()
            .filter_map(|item| self.net(item.get_ref(), item.span(), &label))
            .collect()
    }

    /// One CIDR prefix of a list labelled `label`, written at `span`.
    fn net(&mut self, text: &str, span: Range<usize>, label: &str) -> Option<IpNet> {
        let text = text.trim();
        let parsed = text.parse::<IpNet>().or_else(|_| text.parse::<IpAddr>().map(IpNet::from));
        match parsed {
            Ok(net) if net.trunc() != net => {
                self.report(
                    span,
                    label,
                    format!(
                        "{text:?} has host bits set: write {} (or the address alone)",
                        net.trunc()
                    ),
                );
                None
            }
            Ok(net) => Some(net),
            Err(_) => {
                self.report(
                    span,
                    label,
                    format!(
                        "{text:?} is not a CIDR prefix: write ADDRESS/LENGTH, such as \"192.0.2.0/24\" or \"2001:db8::/32\""
                    ),
                );
                None
            }
        }
    }

    /// `allow`: its prefixes, and the rules in order with their variables when any rule
    /// carries some (see [`EnvRule`]).
    fn allow(
        &mut self,
        value: Option<&Spanned<Vec<Spanned<AllowEntry>>>>,
    ) -> (Vec<IpNet>, Vec<EnvRule>) {
        let Some(value) = value else { return (Vec::new(), Vec::new()) };
        let label = self.label(&keys::ALLOW);
        let mut rules = Vec::new();
        let mut any_env = false;
        for item in value.get_ref() {
            let (prefix, env) = match item.get_ref() {
                AllowEntry::Prefix(prefix) => (prefix, &[][..]),
                AllowEntry::Rule { prefix, env } => (prefix, env.as_slice()),
            };
            for (name, value) in env {
                if name.is_empty() || name.contains(['=', '\0']) || value.contains('\0') {
                    self.report(
                        item.span(),
                        &label,
                        format!("env: {name:?}: a name is not empty and holds no '=' nor NUL, a value no NUL"),
                    );
                }
            }
            any_env |= !env.is_empty();
            if let Some(net) = self.net(prefix, item.span(), &label) {
                rules.push(EnvRule { net, env: env.to_vec() });
            }
        }
        let nets = rules.iter().map(|rule| rule.net).collect();
        (nets, if any_env { rules } else { Vec::new() })
    }

    /// A banner: the bytes of a text, or the file to read (absolute, read by
    /// `config::load`); `None` when absent or invalid (reported).
    fn banner(&mut self, value: Option<&Spanned<BannerValue>>, key: &Key) -> Option<Banner> {
        let value = value?;
        let label = self.label(key);
        match value.get_ref() {
            BannerValue::Text(text) if text.len() > MAX_BANNER => {
                self.report(
                    value.span(),
                    label,
                    format!("{} bytes, more than {MAX_BANNER}", text.len()),
                );
                None
            }
            BannerValue::Text(text) if text.is_empty() => {
                self.report(value.span(), label, "empty: leave the key out instead");
                None
            }
            BannerValue::Text(text) => Some(Banner { bytes: text.as_bytes().to_vec(), file: None }),
            BannerValue::File(path) if !path.starts_with('/') => {
                self.report(value.span(), label, format!("file {path:?} must be an absolute path"));
                None
            }
            BannerValue::File(path) => {
                Some(Banner { bytes: Vec::new(), file: Some(std::path::PathBuf::from(path)) })
            }
        }
    }

    /// One of the words of a [`Kind::OneOf`] key, read by `parse`.
    fn choice<T>(
        &mut self,
        value: Option<&Spanned<String>>,
        key: &Key,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Option<T> {
        let expected = match key.kind {
            Kind::OneOf(words) => one_of(words),
            _ => String::new(),
        };
        self.string(value, key, &expected, parse)
    }

    /// A string read by `parse`: the written one, else the default; `None` (reported) when
    /// it does not read.
    fn string<T>(
        &mut self,
        value: Option<&Spanned<String>>,
        key: &Key,
        expected: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Option<T> {
        let value = self.written_or_default(value, key)?;
        let parsed = parse(value.get_ref());
        if parsed.is_none() {
            let label = self.label(key);
            let message = format!("unknown value {:?}: expected {expected}", value.get_ref());
            self.report(value.span(), label, message);
        }
        parsed
    }

    /// A rate (`"COUNT/PERIOD"`, [`Rate::parse`]); `None` when unlimited or invalid
    /// (reported).
    fn rate(&mut self, value: Option<&Spanned<String>>, key: &Key) -> Option<Rate> {
        let value = self.written_or_default(value, key)?;
        Rate::parse(value.get_ref()).unwrap_or_else(|message| {
            let label = self.label(key);
            self.report(
                value.span(),
                label,
                format!("invalid rate {:?}: {message}", value.get_ref()),
            );
            None
        })
    }
}

/// Checks every value of `file` and applies defaults, appending each problem to `issues`.
///
/// Returns the configuration only when `issues` holds no problem afterwards (including those
/// found before, by [`super::file::read`]).
/// `options` holds each listener's `[listener.options]` table (by index), which the
/// listener's service in `services` reads.
///
/// `needs` receives what startup will ask of this machine (users, directories, addresses) as
/// far as the file says it, even when other keys are invalid, so that `preforkd check` can
/// report those problems in the same run ([`super::environment::check`]).
/// Relative paths of `[listener.tls]` are resolved against `base` (the main file's
/// directory).
pub fn validate(
    file: FileConfig,
    options: Vec<Option<Spanned<DeTable<'_>>>>,
    services: &Registry,
    base: &std::path::Path,
    issues: &mut Vec<RawIssue>,
    needs: &mut Needs,
) -> Option<Config> {
    let mut check = Checker { issues, base, listener: None };
    // The patterns themselves were followed by `include::expand`; only their form is left.
    for pattern in file.include.as_ref().map(Spanned::get_ref).into_iter().flatten() {
        if pattern.get_ref().is_empty() {
            check.report(pattern.span(), keys::INCLUDE.name, "must be a path, not empty");
        }
    }
    let daemon_section = file.daemon.unwrap_or_default();
    let log_section = file.log.unwrap_or_default();

    let workers_value = match &daemon_section.workers {
        Some(value) => Some(value.clone()),
        None => check.written_or_default(None, &keys::WORKERS),
    };
    let workers = match workers_value {
        None => 1,
        Some(value) => match value.get_ref() {
            WorkersValue::Keyword(word) if word == "auto" => available_cpus(),
            WorkersValue::Keyword(word) => {
                check.report(
                    value.span(),
                    keys::WORKERS.name,
                    format!("unknown value {word:?}: expected a number or \"auto\""),
                );
                1
            }
            WorkersValue::Count(n) if (1..=MAX_WORKERS as i64).contains(n) => *n as usize,
            WorkersValue::Count(n) => {
                check.report(
                    value.span(),
                    keys::WORKERS.name,
                    format!("{n} is out of range: expected 1 to {MAX_WORKERS}, or \"auto\""),
                );
                1
            }
        },
    };
    let graceful_timeout =
        check.duration(daemon_section.graceful_timeout.as_ref(), &keys::GRACEFUL_TIMEOUT);
    let reload_drain_timeout =
        check.duration(daemon_section.reload_drain_timeout.as_ref(), &keys::RELOAD_DRAIN_TIMEOUT);
    let event_backend =
        check.choice(daemon_section.event_backend.as_ref(), &keys::EVENT_BACKEND, |s| {
            EventBackend::ALL.into_iter().find(|b| b.name() == s)
        });
    // select's lower bound depends on the listeners: checked below, in one message.
    let max_connections_per_worker = check.integer(
        daemon_section.max_connections_per_worker.as_ref(),
        &keys::MAX_CONNECTIONS_PER_WORKER,
    ) as usize;

    let pid_file = check.path(daemon_section.pid_file.as_ref(), &keys::PID_FILE);
    let worker_timeout =
        check.duration(daemon_section.worker_timeout.as_ref(), &keys::WORKER_TIMEOUT);
    if !worker_timeout.is_zero() && worker_timeout < MIN_WORKER_TIMEOUT {
        let span = daemon_section.worker_timeout.as_ref().map_or(0..0, Spanned::span);
        check.report(
            span,
            keys::WORKER_TIMEOUT.name,
            "must be at least \"1s\", or \"0s\" to disable",
        );
    }
    let max_draining_generations = check
        .integer(daemon_section.max_draining_generations.as_ref(), &keys::MAX_DRAINING_GENERATIONS)
        as usize;

    let recycle = Recycle {
        after_connections: NonZeroU64::new(check.integer(
            daemon_section.recycle_after_connections.as_ref(),
            &keys::RECYCLE_AFTER_CONNECTIONS,
        ) as u64),
        jitter: check.integer(daemon_section.recycle_jitter.as_ref(), &keys::RECYCLE_JITTER) as u64,
        above_rss: NonZeroU64::new(
            (check.integer(daemon_section.recycle_above_rss.as_ref(), &keys::RECYCLE_ABOVE_RSS)
                as u64)
                << 20,
        ),
    };

    let user = daemon_section.user.as_ref().map(|u| u.get_ref().clone());
    let group = daemon_section.group.as_ref().map(|g| g.get_ref().clone());
    for (value, key) in [(&daemon_section.user, &keys::USER), (&daemon_section.group, &keys::GROUP)]
    {
        if let Some(value) = value
            && value.get_ref().is_empty()
        {
            check.report(value.span(), key.name, "must be a name or number, not empty");
        }
    }
    let allow_root_workers =
        check.boolean(daemon_section.allow_root_workers.as_ref(), &keys::ALLOW_ROOT_WORKERS);
    let rlimit_nofile =
        check.integer(daemon_section.rlimit_nofile.as_ref(), &keys::RLIMIT_NOFILE) as u64;
    let daemonize = check.boolean(daemon_section.daemonize.as_ref(), &keys::DAEMONIZE);
    needs.user = user.clone().filter(|u| !u.is_empty());
    needs.group = group.clone().filter(|g| !g.is_empty());
    needs.allow_root_workers = allow_root_workers;
    needs.pid_file.clone_from(&pid_file);

    let target = check.choice(log_section.target.as_ref(), &keys::TARGET, |s| {
        ["stderr", "syslog", "file"].into_iter().find(|t| *t == s)
    });
    let log_path = check.path(log_section.path.as_ref(), &keys::PATH);
    if target == Some("file") && log_path.is_none() && log_section.path.is_none() {
        let span = log_section.target.as_ref().map_or(0..0, Spanned::span);
        check.report(span, keys::PATH.name, "target = \"file\" needs a path");
    }
    let facility = check.string(
        log_section.facility.as_ref(),
        &keys::FACILITY,
        "a syslog facility such as \"daemon\" or \"local0\"",
        |s| syslog::Facility::from_str(s).ok(),
    );
    let level = check
        .choice(log_section.level.as_ref(), &keys::LEVEL, |s| log::LevelFilter::from_str(s).ok());
    let syslog_socket = check.path(log_section.syslog_socket.as_ref(), &keys::SYSLOG_SOCKET);
    let access_log = check.boolean(log_section.access_log.as_ref(), &keys::ACCESS_LOG);
    let format = check.choice(log_section.format.as_ref(), &keys::FORMAT, |s| {
        LogFormat::ALL.into_iter().find(|f| f.name() == s)
    });
    let log_target = match (target, log_path, facility) {
        (Some("syslog"), _, Some(facility)) => {
            Some(LogTarget::Syslog { facility: SyslogFacility(facility), socket: syslog_socket })
        }
        (Some("file"), Some(path), _) => Some(LogTarget::File(path)),
        (Some("stderr"), _, _) => Some(LogTarget::Stderr),
        _ => None,
    };
    needs.log_target.clone_from(&log_target);

    if file.listener.is_empty() {
        check.report(0..0, "listener", "no [[listener]] is configured: at least one is required");
    }
    let mut listeners = Vec::with_capacity(file.listener.len());
    let mut names: HashSet<String> = HashSet::new();
    let mut addresses: HashMap<(ListenerTransport, Address), usize> = HashMap::new();
    // Daemon-wide defaults of the listener keys that describe the network rather than one
    // service: how clients are keyed, and which proxies are believed.
    let network = NetworkDefaults {
        client_ipv4_prefix: check
            .integer(daemon_section.client_ipv4_prefix.as_ref(), &keys::DAEMON_CLIENT_IPV4_PREFIX)
            as u8,
        client_ipv6_prefix: check
            .integer(daemon_section.client_ipv6_prefix.as_ref(), &keys::DAEMON_CLIENT_IPV6_PREFIX)
            as u8,
        trusted_proxies: check
            .nets(daemon_section.trusted_proxies.as_ref(), &keys::DAEMON_TRUSTED_PROXIES),
    };
    let mut options = options.into_iter();
    for (index, section) in file.listener.into_iter().enumerate() {
        let span = section.span();
        // Checked whatever else is wrong with the listener, so one run lists it all.
        if let Some(name) = &section.get_ref().name
            && !names.insert(name.get_ref().clone())
        {
            check.report(
                name.span(),
                format!("listener[{index}].name"),
                format!("duplicate listener name {:?}", name.get_ref()),
            );
        }
        let table = options.next().flatten();
        if let Some(listener) = validate_listener(
            &mut check,
            index,
            span.clone(),
            section.into_inner(),
            table,
            services,
            &network,
            needs,
        ) {
            if !listener.address.is_ephemeral()
                && let Some(first) =
                    addresses.insert((listener.transport, listener.address.clone()), index)
            {
                check.report(
                    span.clone(),
                    format!("listener[{index}].address"),
                    format!("{} is already used by listener[{first}]", listener.address),
                );
            }
            listeners.push(listener);
        }
    }

    let fds_needed = max_connections_per_worker + listeners.len() + RESERVED_FDS;
    if event_backend == Some(EventBackend::Select) && fds_needed > FD_SETSIZE {
        let span = daemon_section.max_connections_per_worker.as_ref().map_or(0..0, Spanned::span);
        check.report(
            span,
            "daemon.max_connections_per_worker",
            format!(
                "{max_connections_per_worker} connections with {} listeners need descriptors up to {fds_needed}, over select()'s FD_SETSIZE of {FD_SETSIZE}; at most {} fit",
                listeners.len(),
                FD_SETSIZE - RESERVED_FDS - listeners.len()
            ),
        );
    }

    let slots = worker_slots(workers, max_draining_generations);
    let records = slots.saturating_mul(max_connections_per_worker);
    if records > MAX_RECORDS {
        let span = daemon_section
            .max_connections_per_worker
            .as_ref()
            .or(daemon_section.max_draining_generations.as_ref())
            .map_or(0..0, Spanned::span);
        check.report(
            span,
            "daemon.max_connections_per_worker",
            format!(
                "{workers} workers x {SLOT_HEADROOM} x (1 + {max_draining_generations} draining generations) = {slots} worker slots of {max_connections_per_worker} connections need {records} per-client records, more than {MAX_RECORDS}: lower workers, max_connections_per_worker or max_draining_generations"
            ),
        );
    }

    if daemonize && log_target == Some(LogTarget::Stderr) {
        let span = daemon_section.daemonize.as_ref().map_or(0..0, Spanned::span);
        check.report(
            span,
            keys::DAEMONIZE.name,
            "a daemon has no stderr: set log.target to \"syslog\" or \"file\"",
        );
    }
    if !check.issues.is_empty() {
        return None;
    }
    Some(Config {
        daemon: DaemonConfig {
            workers: NonZeroUsize::new(workers)?,
            graceful_timeout,
            reload_drain_timeout: Some(reload_drain_timeout).filter(|d| !d.is_zero()),
            max_connections_per_worker: NonZeroUsize::new(max_connections_per_worker)?,
            pid_file,
            worker_timeout: Some(worker_timeout).filter(|d| !d.is_zero()),
            max_draining_generations: NonZeroUsize::new(max_draining_generations)?,
            recycle,
            user,
            group,
            allow_root_workers,
            rlimit_nofile: Some(rlimit_nofile).filter(|n| *n > 0),
            daemonize,
            event_backend: event_backend?,
        },
        log: LogConfig { target: log_target?, level: level?, access_log, format: format? },
        listeners,
    })
}

/// `[daemon]`'s defaults of listener keys.
struct NetworkDefaults {
    client_ipv4_prefix: u8,
    client_ipv6_prefix: u8,
    trusted_proxies: Vec<IpNet>,
}

#[allow(clippy::too_many_arguments)]
fn validate_listener(
    check: &mut Checker<'_>,
    index: usize,
    span: Range<usize>,
    section: ListenerSection,
    options_table: Option<Spanned<DeTable<'_>>>,
    services: &Registry,
    network: &NetworkDefaults,
    needs: &mut Needs,
) -> Option<ListenerConfig> {
    check.listener = Some(index);
    let reuseport = section.reuseport.as_ref().is_some_and(|r| *r.get_ref());
    // Its address, whenever it parses: `check` tries it on this machine in any case.
    let mut address = None;
    let listener =
        read_listener(check, span, section, options_table, services, network, &mut address);
    check.listener = None;
    if let Some((address, socket_file)) = address {
        needs.listeners.push(ListenerNeed { index, address, reuseport, socket_file });
    }
    listener
}

fn read_listener(
    check: &mut Checker<'_>,
    span: Range<usize>,
    section: ListenerSection,
    options_table: Option<Spanned<DeTable<'_>>>,
    services: &Registry,
    network: &NetworkDefaults,
    parsed_address: &mut Option<(Address, SocketFile)>,
) -> Option<ListenerConfig> {
    let mut complete = true;
    let mut required =
        |check: &mut Checker<'_>, value: Option<&Spanned<String>>, key: &Key| -> Option<String> {
            let value = value.map(|v| v.get_ref().clone());
            if value.is_none() {
                check.report(span.clone(), check.label(key), "missing: this key is required");
                complete = false;
            }
            value
        };
    let name = required(check, section.name.as_ref(), &keys::NAME);
    let address_text = required(check, section.address.as_ref(), &keys::ADDRESS);
    let service_text = required(check, section.service.as_ref(), &keys::SERVICE);

    if let (Some(name), Some(value)) = (&name, &section.name)
        && (name.is_empty()
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        check.report(
            value.span(),
            check.label(&keys::NAME),
            "must be non-empty ASCII letters, digits, '-', '_' or '.' (it names the socket for systemd and upgrades)",
        );
    }
    let address = match (&address_text, &section.address) {
        (Some(text), Some(value)) => match text.parse::<Address>() {
            Ok(address) => Some(address),
            Err(error) => {
                check.report(value.span(), check.label(&keys::ADDRESS), error.to_string());
                None
            }
        },
        _ => None,
    };
    let socket_file = socket_file(check, &section, address.as_ref());
    let tcp_keepalive = keepalive(check, &section, address.as_ref());
    let interface = section.interface.as_ref().and_then(|value| {
        let name = value.get_ref();
        let ip = address.as_ref().is_none_or(|a| !a.is_unix());
        let message = if !ip {
            "applies to an IP listener only"
        } else if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0']) {
            "must be an interface name of 1 to 15 bytes, such as \"eth0\" or \"lo\""
        } else {
            return Some(name.clone());
        };
        check.report(value.span(), check.label(&keys::INTERFACE), message);
        None
    });
    if let Some(address) = &address {
        *parsed_address = Some((address.clone(), socket_file.clone()));
    }
    // A built-in whose options are invalid is built once more, leniently, only to learn the
    // transports it serves, so a wrong `transport` is reported in the same run.
    let mut probed = None;
    let service = match (&service_text, &section.service) {
        (Some(text), Some(value)) => {
            let written = section.options.as_ref().map(|o| o.get_ref().clone()).unwrap_or_default();
            let prefix = check.label(&keys::OPTIONS);
            let probe_table = options_table.clone();
            let mut options = Options::new(options_table, &prefix, span.clone(), check.issues);
            match services.build(text, &mut options) {
                Some(Ok(service)) => {
                    Some(ServiceConfig { name: text.clone(), options: written, service })
                }
                Some(Err(_)) => {
                    probed = services.probe_builtin(text, probe_table, span.clone());
                    None
                }
                None => {
                    check.report(
                        value.span(),
                        check.label(&keys::SERVICE),
                        format!(
                            "unknown service {text:?}: expected one of {}",
                            services.names().collect::<Vec<_>>().join(", ")
                        ),
                    );
                    None
                }
            }
        }
        _ => None,
    };
    let backlog = check.integer(section.backlog.as_ref(), &keys::BACKLOG);
    let short = check.duration(section.short_idle_timeout.as_ref(), &keys::SHORT_IDLE_TIMEOUT);
    let long = check.duration(section.long_idle_timeout.as_ref(), &keys::LONG_IDLE_TIMEOUT);
    let per_client = check
        .integer(section.max_connections_per_client.as_ref(), &keys::MAX_CONNECTIONS_PER_CLIENT);
    let long_per_client = check.integer(
        section.max_long_connections_per_client.as_ref(),
        &keys::MAX_LONG_CONNECTIONS_PER_CLIENT,
    );
    let tcp_nodelay = check.boolean(section.tcp_nodelay.as_ref(), &keys::TCP_NODELAY);
    let reuseport = check.boolean(section.reuseport.as_ref(), &keys::REUSEPORT);
    let (allow, env_rules) = check.allow(section.allow.as_ref());
    let deny = check.nets(section.deny.as_ref(), &keys::DENY);
    // Absent, these take the daemon's values (`KeyDefault::Inherit`).
    let client_ipv4_prefix = match &section.client_ipv4_prefix {
        None => network.client_ipv4_prefix,
        written => check.integer(written.as_ref(), &keys::CLIENT_IPV4_PREFIX) as u8,
    };
    let client_ipv6_prefix = match &section.client_ipv6_prefix {
        None => network.client_ipv6_prefix,
        written => check.integer(written.as_ref(), &keys::CLIENT_IPV6_PREFIX) as u8,
    };
    let trusted_proxies = match &section.trusted_proxies {
        None => network.trusted_proxies.clone(),
        written => check.nets(written.as_ref(), &keys::TRUSTED_PROXIES),
    };
    let burst =
        check.integer(section.connection_rate_burst.as_ref(), &keys::CONNECTION_RATE_BURST) as u32;
    let rate = check
        .rate(
            section.max_connection_rate_per_client.as_ref(),
            &keys::MAX_CONNECTION_RATE_PER_CLIENT,
        )
        .map(|rate| NonZeroU32::new(burst).map_or(rate, |burst| rate.with_burst(burst)));
    if let Some(value) = &section.connection_rate_burst
        && rate.is_none()
        && section.max_connection_rate_per_client.is_none()
    {
        check.report(
            value.span(),
            check.label(&keys::CONNECTION_RATE_BURST),
            "has no effect without max_connection_rate_per_client",
        );
    }
    let max_connections = check.integer(section.max_connections.as_ref(), &keys::MAX_CONNECTIONS);
    let accept_proxy_protocol =
        check.boolean(section.accept_proxy_protocol.as_ref(), &keys::ACCEPT_PROXY_PROTOCOL);
    if accept_proxy_protocol && trusted_proxies.is_empty() {
        let span = section.accept_proxy_protocol.as_ref().map_or(span.clone(), Spanned::span);
        check.report(
            span,
            check.label(&keys::TRUSTED_PROXIES),
            "accept_proxy_protocol = true needs the proxies' prefixes (here, or daemon.trusted_proxies): a header from anyone else is not believed",
        );
    }
    if !accept_proxy_protocol && let Some(value) = &section.trusted_proxies {
        check.report(
            value.span(),
            check.label(&keys::TRUSTED_PROXIES),
            "has no effect without accept_proxy_protocol = true",
        );
    }
    let shed_when_full = check.boolean(section.shed_when_full.as_ref(), &keys::SHED_WHEN_FULL);
    let transport = check.choice(section.transport.as_ref(), &keys::TRANSPORT, |s| {
        [ListenerTransport::Tcp, ListenerTransport::Udp].into_iter().find(|t| t.name() == s)
    });
    let transport_span = section.transport.as_ref().map_or(span.clone(), Spanned::span);
    let built = service.as_ref().map(|s| &s.service).or(probed.as_ref());
    if let (Some(service), Some(text), Some(transport)) = (built, &service_text, transport) {
        let refusal = match transport {
            ListenerTransport::Tcp => service.stream().err(),
            ListenerTransport::Udp => service.datagram().err(),
        };
        if let Some(reason) = refusal {
            check.report(
                transport_span.clone(),
                check.label(&keys::TRANSPORT),
                format!(
                    "service {text:?} cannot serve {}: {reason}",
                    transport.name().to_uppercase()
                ),
            );
        }
    }
    let banners = Banners {
        admitted: check.banner(section.banner.as_ref(), &keys::BANNER),
        refused: check.banner(section.banner_fail.as_ref(), &keys::BANNER_FAIL),
    };
    let mut datagram_rate = check
        .rate(section.max_datagram_rate_per_client.as_ref(), &keys::MAX_DATAGRAM_RATE_PER_CLIENT);
    match transport {
        Some(ListenerTransport::Udp) => {
            let tcp_only = [
                (&keys::BACKLOG, section.backlog.as_ref().map(Spanned::span)),
                (&keys::TCP_NODELAY, section.tcp_nodelay.as_ref().map(Spanned::span)),
                (&keys::SHORT_IDLE_TIMEOUT, section.short_idle_timeout.as_ref().map(Spanned::span)),
                (&keys::LONG_IDLE_TIMEOUT, section.long_idle_timeout.as_ref().map(Spanned::span)),
                (
                    &keys::MAX_LONG_CONNECTIONS_PER_CLIENT,
                    section.max_long_connections_per_client.as_ref().map(Spanned::span),
                ),
                (&keys::BANNER, section.banner.as_ref().map(Spanned::span)),
                (&keys::BANNER_FAIL, section.banner_fail.as_ref().map(Spanned::span)),
            ];
            for (key, written) in tcp_only {
                if let Some(written) = written {
                    check.report(
                        written,
                        check.label(key),
                        "applies to TCP only: remove it, or set transport = \"tcp\"",
                    );
                }
            }
        }
        _ => {
            datagram_rate = None;
            if let Some(value) = &section.max_datagram_rate_per_client {
                check.report(
                    value.span(),
                    check.label(&keys::MAX_DATAGRAM_RATE_PER_CLIENT),
                    "applies to UDP only: remove it, or set transport = \"udp\"",
                );
            }
        }
    }
    if let Some(address) = address.as_ref().filter(|a| a.is_unix()) {
        unix_only_streams(check, &section, address, &span);
    }
    let tls = match (&section.tls, transport) {
        (None, _) => None,
        (Some(table), Some(ListenerTransport::Udp)) => {
            check.report(
                table.span(),
                check.label(&keys::TLS),
                "applies to TCP only (DTLS is not supported): remove it, or set transport = \"tcp\"",
            );
            None
        }
        (Some(table), _) => {
            // A banner is plain text written before the service: it would break the handshake.
            for (key, written) in
                [(&keys::BANNER, &section.banner), (&keys::BANNER_FAIL, &section.banner_fail)]
            {
                if let Some(written) = written {
                    check.report(
                        written.span(),
                        check.label(key),
                        "is plain text before the service, which a TLS client cannot read: remove it, or [listener.tls]",
                    );
                }
            }
            let short = Some(short).filter(|d| !d.is_zero());
            let tls = read_tls(check, table, short);
            complete &= tls.is_some();
            tls
        }
    };
    if !complete {
        return None;
    }
    let service = service?;
    let service_cap = service.service.max_connections();
    Some(ListenerConfig {
        name: name?,
        address: address?,
        socket_file,
        tcp_keepalive,
        interface,
        service,
        backlog: NonZeroU32::new(backlog as u32)?,
        short_idle_timeout: Some(short).filter(|d| !d.is_zero()),
        long_idle_timeout: Some(long).filter(|d| !d.is_zero()),
        max_connections_per_client: NonZeroU32::new(per_client as u32),
        max_long_connections_per_client: NonZeroU32::new(long_per_client as u32),
        tcp_nodelay,
        reuseport,
        admission: AdmissionConfig {
            access: AccessList { allow, deny, env_rules },
            client_ipv4_prefix,
            client_ipv6_prefix,
            max_connection_rate_per_client: rate,
            max_connections: [NonZeroU32::new(max_connections as u32), service_cap]
                .into_iter()
                .flatten()
                .min(),
            accept_proxy_protocol,
            trusted_proxies,
            shed_when_full,
        },
        transport: transport?,
        max_datagram_rate_per_client: datagram_rate,
        banners,
        tls,
    })
}

/// Reads `[listener.tls]` (`short`: the listener's short idle timeout, the default handshake
/// timeout) and loads every file it names; `None` when anything is wrong (reported).
fn read_tls(
    check: &mut Checker<'_>,
    table: &Spanned<TlsSection>,
    short: Option<Duration>,
) -> Option<TlsConfig> {
    let section = table.get_ref();
    let base = check.base.to_path_buf();
    let resolve =
        |path: std::path::PathBuf| if path.is_relative() { base.join(path) } else { path };
    let required =
        |check: &mut Checker<'_>, value: &Option<Spanned<String>>, key: &Key, label: String| {
            let path = check.path(value.as_ref(), key).map(resolve);
            if path.is_none() && value.is_none() {
                check.report(table.span(), label, "missing: this key is required");
            }
            path
        };
    let certificate = required(
        check,
        &section.certificate,
        &keys::TLS_CERTIFICATE,
        check.label(&keys::TLS_CERTIFICATE),
    );
    let key = required(check, &section.key, &keys::TLS_KEY, check.label(&keys::TLS_KEY));
    let mut complete = certificate.is_some() && key.is_some();
    let mut sni = Vec::new();
    let mut sni_spans = Vec::new();
    let mut names = HashSet::new();
    for (n, entry) in section.sni.iter().flatten().enumerate() {
        let prefix = format!("{}[{n}]", check.label(&keys::TLS_SNI));
        let label = |key: &Key| format!("{prefix}.{}", key.field());
        let fields = entry.get_ref();
        let name = match &fields.name {
            None => {
                check.report(entry.span(), label(&keys::SNI_NAME), "missing: this key is required");
                None
            }
            Some(value) => {
                let name = value.get_ref().to_ascii_lowercase();
                if !valid_server_name(&name) {
                    check.report(
                        value.span(),
                        label(&keys::SNI_NAME),
                        format!("{:?} is not a server name: write a DNS name such as \"www.example.org\", or \"*.example.org\"", value.get_ref()),
                    );
                    None
                } else if !names.insert(name.clone()) {
                    check.report(
                        value.span(),
                        label(&keys::SNI_NAME),
                        format!("{name:?} is given twice"),
                    );
                    None
                } else {
                    Some(name)
                }
            }
        };
        let certificate = required(
            check,
            &fields.certificate,
            &keys::SNI_CERTIFICATE,
            label(&keys::SNI_CERTIFICATE),
        );
        let key = required(check, &fields.key, &keys::SNI_KEY, label(&keys::SNI_KEY));
        match (name, certificate, key) {
            (Some(name), Some(certificate), Some(key)) => {
                sni.push(SniSpec { name, certificate, key });
                sni_spans.push((
                    fields.certificate.as_ref().map_or(entry.span(), Spanned::span),
                    fields.key.as_ref().map_or(entry.span(), Spanned::span),
                ));
            }
            _ => complete = false,
        }
    }
    let client_ca = check.path(section.client_ca.as_ref(), &keys::TLS_CLIENT_CA).map(resolve);
    let client_auth = check.choice(section.client_auth.as_ref(), &keys::TLS_CLIENT_AUTH, |s| {
        ["required", "optional"].into_iter().find(|w| *w == s)
    });
    if let (Some(value), None) = (&section.client_auth, &section.client_ca) {
        check.report(
            value.span(),
            check.label(&keys::TLS_CLIENT_AUTH),
            "has no effect without client_ca (the CA file client certificates must chain to)",
        );
    }
    let min_version =
        check.choice(section.min_version.as_ref(), &keys::TLS_MIN_VERSION, TlsVersion::parse);
    let mut alpn = Vec::new();
    for value in section.alpn.iter().flat_map(|list| list.get_ref()) {
        let protocol = value.get_ref();
        if protocol.is_empty() || protocol.len() > 255 {
            check.report(
                value.span(),
                check.label(&keys::TLS_ALPN),
                "a protocol name is 1 to 255 bytes (RFC 7301)",
            );
        } else {
            alpn.push(protocol.clone());
        }
    }
    let handshake_timeout = match &section.handshake_timeout {
        None => short,
        written => Some(check.duration(written.as_ref(), &keys::TLS_HANDSHAKE_TIMEOUT))
            .filter(|d| !d.is_zero()),
    };
    let session_tickets =
        check.boolean(section.session_tickets.as_ref(), &keys::TLS_SESSION_TICKETS);
    let ticket_rotation =
        check.duration(section.ticket_rotation.as_ref(), &keys::TLS_TICKET_ROTATION);
    // TLS 1.3 tickets live at most 7 days (RFC 8446 section 4.6.1); a minute is a floor
    // against a typo such as "1s".
    if !(Duration::from_secs(60)..=Duration::from_secs(7 * 24 * 3600)).contains(&ticket_rotation) {
        let span = section.ticket_rotation.as_ref().map_or(table.span(), Spanned::span);
        check.report(
            span,
            check.label(&keys::TLS_TICKET_ROTATION),
            "must be from \"1m\" to \"7d\"",
        );
        complete = false;
    }
    let spec = TlsSpec {
        certificate: certificate?,
        key: key?,
        sni,
        client_auth_required: client_auth != Some("optional"),
        client_ca,
        min_version: min_version?,
        alpn,
        handshake_timeout,
        session_tickets,
        ticket_rotation,
    };
    if !complete || client_auth.is_none() {
        return None;
    }
    let mut findings = Findings::default();
    let loaded = crate::tls::load::load(&spec, std::time::SystemTime::now(), &mut findings);
    for warning in &findings.warnings {
        log::warn!("{}: {warning}", check.label(&keys::TLS));
    }
    for (field, message) in findings.errors {
        let (span, label) = match field {
            Field::Certificate => (
                section.certificate.as_ref().map(Spanned::span),
                check.label(&keys::TLS_CERTIFICATE),
            ),
            Field::Key => (section.key.as_ref().map(Spanned::span), check.label(&keys::TLS_KEY)),
            Field::ClientCa => {
                (section.client_ca.as_ref().map(Spanned::span), check.label(&keys::TLS_CLIENT_CA))
            }
            Field::SniCertificate(n) => (
                sni_spans.get(n).map(|s| s.0.clone()),
                format!("{}[{n}].certificate", check.label(&keys::TLS_SNI)),
            ),
            Field::SniKey(n) => (
                sni_spans.get(n).map(|s| s.1.clone()),
                format!("{}[{n}].key", check.label(&keys::TLS_SNI)),
            ),
        };
        check.report(span.unwrap_or(table.span()), label, message);
    }
    loaded
}

/// Whether `name` (lowercase) is a DNS name a client may send in SNI (RFC 6066: no IP
/// address, no trailing dot), or `*.` and such a name of at least two labels.
fn valid_server_name(name: &str) -> bool {
    let host = name.strip_prefix("*.").unwrap_or(name);
    let label = |l: &str| {
        (1..=63).contains(&l.len())
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    host.len() <= 253
        && host.split('.').all(label)
        && host.parse::<IpAddr>().is_err()
        && (host.contains('.') || !name.starts_with("*."))
}

/// `tcp_keepalive_idle`, `_interval` and `_count`: on when idle is more than 0; for a TCP
/// listener.
fn keepalive(
    check: &mut Checker<'_>,
    section: &ListenerSection,
    address: Option<&Address>,
) -> Option<crate::net::Keepalive> {
    let idle = check.duration(section.tcp_keepalive_idle.as_ref(), &keys::TCP_KEEPALIVE_IDLE);
    let interval = section
        .tcp_keepalive_interval
        .as_ref()
        .map(|value| check.duration(Some(value), &keys::TCP_KEEPALIVE_INTERVAL));
    let count = section
        .tcp_keepalive_count
        .as_ref()
        .map(|value| check.integer(Some(value), &keys::TCP_KEEPALIVE_COUNT) as u32);
    let written = [
        (&keys::TCP_KEEPALIVE_IDLE, section.tcp_keepalive_idle.as_ref().map(Spanned::span)),
        (&keys::TCP_KEEPALIVE_INTERVAL, section.tcp_keepalive_interval.as_ref().map(Spanned::span)),
        (&keys::TCP_KEEPALIVE_COUNT, section.tcp_keepalive_count.as_ref().map(Spanned::span)),
    ];
    let tcp = address.is_none_or(|a| !a.is_unix())
        && section.transport.as_ref().is_none_or(|t| t.get_ref() == "tcp");
    for (key, span) in written {
        let Some(span) = span else { continue };
        // "0s" (the default: off) is fine anywhere.
        let off = key.name == keys::TCP_KEEPALIVE_IDLE.name && idle.is_zero();
        if !tcp && !off {
            check.report(span, check.label(key), "applies to a TCP listener only");
        } else if idle.is_zero() && key.name != keys::TCP_KEEPALIVE_IDLE.name {
            check.report(span, check.label(key), "has no effect without tcp_keepalive_idle");
        }
    }
    let too_short = |d: Duration| d < Duration::from_secs(1);
    if !idle.is_zero() && (too_short(idle) || interval.is_some_and(too_short)) {
        let span = section.tcp_keepalive_idle.as_ref().map_or(0..0, Spanned::span);
        check.report(
            span,
            check.label(&keys::TCP_KEEPALIVE_IDLE),
            "keepalive times are whole seconds: at least \"1s\"",
        );
    }
    (tcp && !idle.is_zero()).then_some(crate::net::Keepalive { idle, interval, count })
}

/// `mode`, `owner` and `group`: for a `unix:/path` address only.
fn socket_file(
    check: &mut Checker<'_>,
    section: &ListenerSection,
    address: Option<&Address>,
) -> SocketFile {
    let keys = [
        (&keys::SOCKET_MODE, &section.mode),
        (&keys::SOCKET_OWNER, &section.owner),
        (&keys::SOCKET_GROUP, &section.group),
    ];
    let has_file = address.is_none_or(|address| address.path().is_some());
    for (key, written) in keys {
        if let Some(value) = written
            && !has_file
        {
            check.report(
                value.span(),
                check.label(key),
                "applies to a unix:/path listener only (an IP address or an abstract name has no file)",
            );
        }
    }
    let mode = section.mode.as_ref().and_then(|value| {
        let text = value.get_ref().trim();
        let mode = u32::from_str_radix(text, 8).ok().filter(|m| *m <= 0o777 && !text.is_empty());
        if mode.is_none() {
            check.report(
                value.span(),
                check.label(&keys::SOCKET_MODE),
                format!(
                    "{text:?} is not a file mode: write octal permission bits, such as \"0660\""
                ),
            );
        }
        mode
    });
    let name = |check: &mut Checker<'_>, value: &Option<Spanned<String>>, key: &Key| {
        let value = value.as_ref()?;
        if value.get_ref().trim().is_empty() {
            check.report(value.span(), check.label(key), "must be a name or a number, not empty");
            return None;
        }
        Some(value.get_ref().trim().to_owned())
    };
    let owner = name(check, &section.owner, &keys::SOCKET_OWNER);
    let group = name(check, &section.group, &keys::SOCKET_GROUP);
    SocketFile { mode, owner, group }
}

/// Reports the keys a Unix listener cannot have: its clients have no IP address (access
/// lists and PROXY protocol name IP prefixes), and it is a stream socket of its own.
fn unix_only_streams(
    check: &mut Checker<'_>,
    section: &ListenerSection,
    address: &Address,
    span: &Range<usize>,
) {
    let span_of = |value: Option<Range<usize>>| value.unwrap_or(span.clone());
    if section.transport.as_ref().is_some_and(|t| t.get_ref() == "udp") {
        let at = span_of(section.transport.as_ref().map(Spanned::span));
        check.report(
            at,
            check.label(&keys::TRANSPORT),
            format!("{address} is a stream socket: transport = \"udp\" needs an IP address"),
        );
    }
    let ip_only = [
        (&keys::REUSEPORT, section.reuseport.as_ref().map(Spanned::span), "SO_REUSEPORT"),
        (&keys::ALLOW, section.allow.as_ref().map(Spanned::span), "IP prefixes"),
        (&keys::DENY, section.deny.as_ref().map(Spanned::span), "IP prefixes"),
        (
            &keys::ACCEPT_PROXY_PROTOCOL,
            section.accept_proxy_protocol.as_ref().map(Spanned::span),
            "IP proxies",
        ),
        (&keys::TRUSTED_PROXIES, section.trusted_proxies.as_ref().map(Spanned::span), "IP proxies"),
        (&keys::TCP_NODELAY, section.tcp_nodelay.as_ref().map(Spanned::span), "TCP"),
    ];
    for (key, written, what) in ip_only {
        if let Some(at) = written {
            check.report(
                at,
                check.label(key),
                format!(
                    "names {what}, which a Unix listener has none of: its clients are counted by user id, and its socket file's mode, owner and group say who may connect"
                ),
            );
        }
    }
}

/// One worker per CPU available to this process (`sched_getaffinity`), at least 1.
fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, NonZeroUsize::get).min(MAX_WORKERS)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{ConfigError, parse};

    const MINIMAL: &str =
        "[[listener]]\nname = \"echo\"\naddress = \"127.0.0.1:7788\"\nservice = \"echo\"\n";

    fn issues(source: &str) -> Vec<String> {
        match parse(Path::new("t.toml"), source, &Registry::builtin()) {
            Ok(_) => Vec::new(),
            Err(ConfigError::Invalid { issues, .. }) => {
                issues.iter().map(ToString::to_string).collect()
            }
            Err(other) => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let config = parse(Path::new("t.toml"), MINIMAL, &Registry::builtin()).unwrap();
        let listener = &config.listeners[0];
        assert_eq!(listener.backlog.get(), 1024);
        assert_eq!(listener.short_idle_timeout, Some(Duration::from_secs(10)));
        assert_eq!(listener.long_idle_timeout, Some(Duration::from_secs(300)));
        assert_eq!(listener.max_connections_per_client.map(NonZeroU32::get), Some(32));
        assert_eq!(config.daemon.graceful_timeout, Duration::from_secs(30));
        assert_eq!(config.daemon.max_connections_per_worker.get(), 512);
        assert_eq!(config.log.target, LogTarget::Stderr);
        assert!(config.log.access_log);
    }

    #[test]
    fn zero_means_disabled_or_unlimited() {
        let source = format!(
            "{MINIMAL}short_idle_timeout = \"0s\"\nlong_idle_timeout = \"0s\"\nmax_connections_per_client = 0\nmax_long_connections_per_client = 0\n"
        );
        let config = parse(Path::new("t.toml"), &source, &Registry::builtin()).unwrap();
        let listener = &config.listeners[0];
        assert_eq!(listener.short_idle_timeout, None);
        assert_eq!(listener.long_idle_timeout, None);
        assert_eq!(listener.max_connections_per_client, None);
        assert!(!listener.has_client_limits());
    }

    #[test]
    fn every_mistake_is_listed_with_its_location() {
        let source = "[daemon]\nworkers = 0\ngraceful_timeout = \"soon\"\n\
                      [[listener]]\nname = \"a\"\naddress = \"localhost\"\nservice = \"gopher\"\n\
                      [[listener]]\nname = \"a\"\n";
        let found = issues(source);
        let expected = [
            "2:11: daemon.workers: 0 is out of range",
            "3:20: daemon.graceful_timeout: invalid duration",
            "6:11: listener[0].address: \"localhost\" is not an address",
            "7:11: listener[0].service: unknown service \"gopher\"",
            "listener[1].address: missing",
            "listener[1].service: missing",
            "9:8: listener[1].name: duplicate listener name \"a\"",
        ];
        for e in expected {
            assert!(found.iter().any(|f| f.contains(e)), "{e:?} not in {found:#?}");
        }
        assert_eq!(found.len(), expected.len(), "{found:#?}");
    }

    #[test]
    fn select_budget_is_enforced() {
        let source = format!("[daemon]\nmax_connections_per_worker = 1008\n{MINIMAL}");
        let found = issues(&source);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("FD_SETSIZE"), "{found:?}");
        assert!(
            issues(&format!("[daemon]\nmax_connections_per_worker = 1007\n{MINIMAL}")).is_empty()
        );
    }

    #[test]
    fn duplicate_addresses_are_rejected_but_port_zero_may_repeat() {
        let two = |port: u16| {
            format!(
                "[[listener]]\nname = \"a\"\naddress = \"127.0.0.1:{port}\"\nservice = \"echo\"\n\
                 [[listener]]\nname = \"b\"\naddress = \"127.0.0.1:{port}\"\nservice = \"echo\"\n"
            )
        };
        assert_eq!(issues(&two(7000)).len(), 1);
        assert!(issues(&two(0)).is_empty());
    }

    #[test]
    fn durations_are_bounded() {
        let long = format!("[daemon]\ngraceful_timeout = \"300000000000y\"\n{MINIMAL}");
        assert!(issues(&long)[0].contains("too long"), "{:?}", issues(&long));
        let tiny = format!("[daemon]\nworker_timeout = \"2ns\"\n{MINIMAL}");
        assert!(issues(&tiny)[0].contains("at least"), "{:?}", issues(&tiny));
        let off = format!("[daemon]\nworker_timeout = \"0s\"\n{MINIMAL}");
        assert_eq!(
            parse(Path::new("t.toml"), &off, &Registry::builtin()).unwrap().daemon.worker_timeout,
            None
        );
    }

    fn udp(service: &str, extra: &str) -> String {
        format!(
            "[[listener]]\nname = \"u\"\naddress = \"127.0.0.1:7\"\nservice = \"{service}\"\ntransport = \"udp\"\n{extra}"
        )
    }

    #[test]
    fn udp_listeners_refuse_what_cannot_be_served_and_say_why() {
        for service in ["echo", "daytime", "time"] {
            assert!(issues(&udp(service, "")).is_empty(), "{service}");
        }
        let chargen = issues(&udp("chargen", ""));
        assert_eq!(chargen.len(), 1, "{chargen:?}");
        assert!(chargen[0].contains("listener[0].transport: service \"chargen\" cannot serve UDP"));
        assert!(chargen[0].contains("amplifier"), "{chargen:?}");
        let discard = issues(&udp("discard", ""));
        assert!(discard[0].contains("nothing to serve"), "{discard:?}");
        let tftp_over_tcp = issues(
            "[[listener]]\nname = \"t\"\naddress = \"127.0.0.1:69\"\nservice = \"tftp\"\n[listener.options]\nroot = \"/srv\"\n",
        );
        assert!(
            tftp_over_tcp[0].contains("cannot serve TCP: TFTP is a UDP protocol"),
            "{tftp_over_tcp:?}"
        );
        let tftp = |options: &str| {
            issues(&udp("tftp", &format!("[listener.options]\nroot = \"/srv\"\n{options}")))
        };
        assert!(tftp("busy_poll = \"0s\"\n").is_empty());
        assert!(tftp("busy_poll = \"1ms\"\n").is_empty());
        let too_long = tftp("busy_poll = \"2ms\"\n");
        assert!(
            too_long[0].starts_with("8:13: ") && too_long[0].contains("options.busy_poll: must be"),
            "{too_long:?}"
        );
        let tcp_keys = issues(&udp("echo", "backlog = 5\ntcp_nodelay = false\n"));
        assert_eq!(tcp_keys.len(), 2, "{tcp_keys:?}");
        assert!(tcp_keys.iter().all(|i| i.contains("applies to TCP only")), "{tcp_keys:?}");
        let rate_on_tcp = issues(&format!("{MINIMAL}max_datagram_rate_per_client = \"5/s\"\n"));
        assert!(rate_on_tcp[0].contains("applies to UDP only"), "{rate_on_tcp:?}");
        // TCP and UDP may share an address; two UDP listeners may not.
        let both = format!(
            "{}{}",
            MINIMAL.replace("7788", "7"),
            udp("echo", "").replace("\"u\"", "\"v\"")
        );
        assert!(issues(&both).is_empty(), "{:?}", issues(&both));
        let twice = format!("{}{}", udp("echo", ""), udp("echo", "").replace("\"u\"", "\"v\""));
        assert!(issues(&twice)[0].contains("already used"), "{:?}", issues(&twice));
    }

    #[test]
    fn datagram_rates_parse_and_default() {
        let config = parse(Path::new("t.toml"), &udp("echo", ""), &Registry::builtin()).unwrap();
        let hundred_per_second = Rate::per(NonZeroU32::new(100).unwrap(), Duration::from_secs(1));
        assert_eq!(config.listeners[0].max_datagram_rate_per_client, Some(hundred_per_second));
        // The grammar itself is `Rate::parse`'s, tested in `crate::rate`.
        let read = |text: &str| {
            let source = udp("echo", &format!("max_datagram_rate_per_client = \"{text}\"\n"));
            parse(Path::new("t.toml"), &source, &Registry::builtin())
                .map(|config| config.listeners[0].max_datagram_rate_per_client)
        };
        let per = |count: u32, secs: u64| {
            Some(Rate::per(NonZeroU32::new(count).unwrap(), Duration::from_secs(secs)))
        };
        assert_eq!(read("600/min").unwrap(), per(600, 60));
        assert_eq!(read("20/10s").unwrap(), per(20, 10));
        assert_eq!(read("0").unwrap(), None);
        assert!(read("5/fortnight").is_err());
        let found = issues(&udp("echo", "max_datagram_rate_per_client = \"lots\"\n"));
        assert!(
            found[0].contains("listener[0].max_datagram_rate_per_client: invalid rate"),
            "{found:?}"
        );
    }

    #[test]
    fn the_select_limit_is_stated_once_and_the_same_everywhere() {
        for value in [1008, 1009, 2000, 60000] {
            let found = issues(&format!(
                "[daemon]\nworkers = 1\nmax_connections_per_worker = {value}\n{MINIMAL}"
            ));
            assert_eq!(found.len(), 1, "{value}: {found:?}");
            assert!(found[0].contains("at most 1007 fit"), "{value}: {found:?}");
            assert!(!found[0].contains("to 1008"), "{value}: {found:?}");
        }
    }

    #[test]
    fn an_oversized_limits_table_is_refused_with_numbers_that_fit() {
        let source = format!(
            "[daemon]\nworkers = 512\nevent_backend = \"epoll\"\nmax_connections_per_worker = 1048576\n{MINIMAL}"
        );
        let found = issues(&source);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("= 5120 worker slots of 1048576 connections need 5368709120 per-client records, more than 4194304"), "{found:?}");
        assert!(!found[0].contains(&usize::MAX.to_string()), "{found:?}");
    }

    #[test]
    fn a_duplicate_name_is_reported_even_when_the_listener_has_another_error() {
        let source = "[[listener]]\nname = \"a\"\naddress = \"127.0.0.1:7000\"\nservice = \"echo\"\n\
                      [[listener]]\nname = \"a\"\naddress = \"nowhere\"\nservice = \"echo\"\n";
        let found = issues(source);
        assert!(found.iter().any(|f| f.contains("duplicate listener name \"a\"")), "{found:?}");
        assert!(found.iter().any(|f| f.contains("is not an address")), "{found:?}");
    }

    #[test]
    fn the_daemon_sets_network_defaults_a_listener_may_override() {
        let source = "[daemon]\nclient_ipv4_prefix = 24\nclient_ipv6_prefix = 56\n\
                      trusted_proxies = [\"10.0.0.2/32\"]\n\
                      [[listener]]\nname = \"a\"\naddress = \"127.0.0.1:0\"\nservice = \"echo\"\n\
                      accept_proxy_protocol = true\n\
                      [[listener]]\nname = \"b\"\naddress = \"127.0.0.1:0\"\nservice = \"echo\"\n\
                      client_ipv4_prefix = 32\ntrusted_proxies = [\"10.0.0.3/32\"]\n\
                      accept_proxy_protocol = true\n";
        let config = parse(Path::new("t.toml"), source, &Registry::builtin()).unwrap();
        let (a, b) = (&config.listeners[0].admission, &config.listeners[1].admission);
        assert_eq!((a.client_ipv4_prefix, a.client_ipv6_prefix), (24, 56), "inherited");
        assert_eq!(a.trusted_proxies, vec!["10.0.0.2/32".parse::<IpNet>().unwrap()]);
        assert_eq!((b.client_ipv4_prefix, b.client_ipv6_prefix), (32, 56), "overridden, inherited");
        assert_eq!(b.trusted_proxies, vec!["10.0.0.3/32".parse::<IpNet>().unwrap()]);
        let found = issues(&format!("[daemon]\nclient_ipv6_prefix = 129\n{MINIMAL}"));
        assert!(found[0].contains("daemon.client_ipv6_prefix: 129 is out of range"), "{found:?}");
    }

    #[test]
    fn admission_keys_are_read_and_every_mistake_reported() {
        let good = format!(
            "{MINIMAL}allow = [\"127.0.0.0/8\", \"::1\"]\ndeny = [\"127.0.0.2/32\"]\n\
             client_ipv4_prefix = 24\nclient_ipv6_prefix = 48\n\
             max_connection_rate_per_client = \"20/s\"\nconnection_rate_burst = 40\n\
             max_connections = 100\naccept_proxy_protocol = true\n\
             trusted_proxies = [\"10.0.0.0/8\"]\nshed_when_full = false\n"
        );
        let config = parse(Path::new("t.toml"), &good, &Registry::builtin()).unwrap();
        let l = &config.listeners[0].admission;
        assert_eq!(l.access.allow.len(), 2);
        assert_eq!(l.access.deny[0].to_string(), "127.0.0.2/32");
        assert_eq!((l.client_ipv4_prefix, l.client_ipv6_prefix), (24, 48));
        let rate = l.max_connection_rate_per_client.unwrap();
        assert_eq!(
            (rate.count.get(), rate.period, rate.burst.get()),
            (20, Duration::from_secs(1), 40)
        );
        assert_eq!(l.max_connections.map(NonZeroU32::get), Some(100));
        assert!(l.accept_proxy_protocol && !l.shed_when_full);
        assert_eq!(l.trusted_proxies.len(), 1);

        let defaults = parse(Path::new("t.toml"), MINIMAL, &Registry::builtin()).unwrap();
        let l = &defaults.listeners[0].admission;
        assert_eq!(*l, AdmissionConfig::default());
        assert_eq!((l.client_ipv4_prefix, l.client_ipv6_prefix), (32, 64));
        assert!(l.access.is_open() && l.shed_when_full && l.max_connections.is_none());
        assert_eq!(l.max_connection_rate_per_client, None);

        let bad = format!(
            "{MINIMAL}allow = [\"127.0.0.1/8\", \"nowhere\"]\ndeny = [\"10.0.0.0/33\"]\n\
             client_ipv4_prefix = 33\nclient_ipv6_prefix = -1\n\
             max_connection_rate_per_client = \"fast\"\nmax_connections = -5\n\
             accept_proxy_protocol = true\n"
        );
        let found = issues(&bad);
        for expected in [
            "listener[0].allow: \"127.0.0.1/8\" has host bits set: write 127.0.0.0/8",
            "listener[0].allow: \"nowhere\" is not a CIDR prefix",
            "listener[0].deny: \"10.0.0.0/33\" is not a CIDR prefix",
            "listener[0].client_ipv4_prefix: 33 is out of range",
            "listener[0].client_ipv6_prefix: -1 is out of range",
            "listener[0].max_connection_rate_per_client: invalid rate \"fast\"",
            "listener[0].max_connections: -5 is out of range",
            "listener[0].trusted_proxies: accept_proxy_protocol = true needs",
        ] {
            assert!(found.iter().any(|f| f.contains(expected)), "{expected:?} not in {found:#?}");
        }
        assert_eq!(found.len(), 8, "{found:#?}");
    }

    #[test]
    fn both_rates_read_one_grammar() {
        let source = format!(
            "{MINIMAL}max_connection_rate_per_client = \"20/10s\"\n{}",
            udp("echo", "max_datagram_rate_per_client = \"5 / m\"\n").replace("\"u\"", "\"v\"")
        );
        let config = parse(Path::new("t.toml"), &source, &Registry::builtin()).unwrap();
        let connections = config.listeners[0].admission.max_connection_rate_per_client.unwrap();
        assert_eq!((connections.count.get(), connections.period), (20, Duration::from_secs(10)));
        let datagrams = config.listeners[1].max_datagram_rate_per_client.unwrap();
        assert_eq!((datagrams.count.get(), datagrams.period), (5, Duration::from_secs(60)));
        let found = issues(&format!("{MINIMAL}max_connection_rate_per_client = \"20\"\n"));
        assert!(found[0].contains("invalid rate \"20\": write COUNT/PERIOD"), "{found:?}");
    }

    /// `section.key = <default>` for every key of `section` the table gives a value.
    fn defaults_written_out(section: &str) -> String {
        let mut text = String::new();
        for key in keys::KEYS.iter().filter(|k| k.section() == section) {
            if let keys::KeyDefault::Value(value) = key.default {
                text.push_str(&format!("{} = {value}\n", key.field()));
            }
        }
        text
    }

    #[test]
    fn writing_every_default_changes_nothing() {
        let listener = |transport: &str| {
            format!(
                "[[listener]]\nname = \"{transport}\"\naddress = \"127.0.0.1:0\"\nservice = \"echo\"\ntransport = \"{transport}\"\n"
            )
        };
        let bare = format!("{}{}", listener("tcp"), listener("udp"));
        // Every listener key that applies to the transport, at its default.
        let udp_only = ["max_datagram_rate_per_client"];
        let tcp_only = [
            "backlog",
            "tcp_nodelay",
            "short_idle_timeout",
            "long_idle_timeout",
            "max_long_connections_per_client",
        ];
        let defaults = defaults_written_out("listener");
        let only = |skip: &[&str]| {
            defaults
                .lines()
                .filter(|l| !skip.iter().any(|k| l.starts_with(&format!("{k} ="))))
                .filter(|l| !l.starts_with("transport ="))
                .map(|l| format!("{l}\n"))
                .collect::<String>()
        };
        let written = format!(
            "[daemon]\n{}[log]\n{}{}{}{}{}",
            defaults_written_out("daemon"),
            defaults_written_out("log"),
            listener("tcp"),
            only(&udp_only),
            listener("udp"),
            only(&tcp_only),
        );
        let parse = |source: &str| parse(Path::new("t.toml"), source, &Registry::builtin());
        assert_eq!(parse(&written).unwrap(), parse(&bare).unwrap(), "{written}");
    }

    #[test]
    fn every_word_of_a_choice_is_accepted() {
        for key in keys::KEYS {
            let keys::Kind::OneOf(words) = key.kind else { continue };
            for word in words {
                let line = format!("{} = \"{word}\"\n", key.field());
                let source = match key.section() {
                    // Needs certificate files: see tls::tests.
                    "listener.tls" | "listener.tls.sni" => continue,
                    "listener" => format!("{MINIMAL}{line}"),
                    section => format!("[{section}]\n{line}{MINIMAL}"),
                };
                let source = if *word == "file" {
                    source.replace(
                        "target = \"file\"\n",
                        "target = \"file\"\npath = \"/tmp/p.log\"\n",
                    )
                } else {
                    source
                };
                assert!(issues(&source).is_empty(), "{}: {word}: {:?}", key.name, issues(&source));
            }
        }
    }

    #[test]
    fn no_listener_is_an_error() {
        let found = issues("[daemon]\nworkers = 2\n");
        assert!(found.iter().any(|f| f.contains("listener")), "{found:?}");
    }
}
