//! A valid [`Config`] checked against this machine: what startup would refuse although the
//! file itself is fine. `preforkd check` runs these after [`super::validate`], so that every
//! refusal of startup has a twin in `check` (a test enumerates them).
//!
//! Runs in `preforkd check`, as whoever runs it; the answers depend on that user exactly as
//! startup's do (a master that is not root ignores `daemon.user`). Nothing is created,
//! changed or left bound: files are looked at with stat(2), a listener address is tried with
//! bind(2) and closed at once (without listen(2), so no client can connect to it), syslog with
//! connect(2).
//!
//! Left to startup, as conditions of the moment rather than of the configuration: an address
//! another process is using now (`EADDRINUSE`), a pid file held by a running master, sockets
//! passed by systemd, and fork, mmap or signal failures.

use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};

use nix::unistd::Uid;
use socket2::{Domain, Protocol, Socket, Type};
use toml::Spanned;

#[cfg(doc)]
use super::Config;
use super::SocketFile;
use super::file;
use crate::files;
use crate::logging::LogTarget;
use crate::net::Address;
use crate::privileges::Credentials;
use crate::schema::RawIssue;

/// Syslog sockets tried when `log.syslog_socket` is not set, in order (as the syslog crate).
const DEFAULT_SYSLOG_SOCKETS: [&str; 2] = ["/dev/log", "/var/run/syslog"];

/// What startup will ask of this machine, as far as the file says it: filled in by
/// [`super::validate::validate`] from the keys that are valid even when others are not, so
/// that `preforkd check` reports these problems in the same run as the file's own. Paths are
/// as written until [`Needs::resolve_paths`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Needs {
    /// `daemon.user`, when written and not empty.
    pub user: Option<String>,
    /// `daemon.group`, when written and not empty.
    pub group: Option<String>,
    /// `daemon.allow_root_workers`.
    pub allow_root_workers: bool,
    /// `daemon.pid_file`.
    pub pid_file: Option<PathBuf>,
    /// `[log]`'s target, when it is valid.
    pub log_target: Option<LogTarget>,
    /// Every listener whose address parsed.
    pub listeners: Vec<ListenerNeed>,
}

/// A listener's address, to be tried on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerNeed {
    /// Its index among the `[[listener]]` blocks.
    pub index: usize,
    /// Its address.
    pub address: Address,
    /// Whether it binds with `SO_REUSEPORT`.
    pub reuseport: bool,
    /// A `unix:/path` listener's file settings (owner and group must exist).
    pub socket_file: SocketFile,
}

impl Needs {
    /// Makes the relative paths absolute against `base`, as [`Config::resolve_paths`] does.
    pub fn resolve_paths(&mut self, base: &Path) {
        let resolve = |path: &mut PathBuf| {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        };
        if let Some(path) = self.pid_file.as_mut() {
            resolve(path);
        }
        if let Some(LogTarget::File(path) | LogTarget::Syslog { socket: Some(path), .. }) =
            &mut self.log_target
        {
            resolve(path);
        }
    }
}

/// Every problem startup would have on this machine with what `needs` describes, run by a
/// user whose effective id is `euid`. `source` is the file's text, for the locations.
pub fn check(needs: &Needs, source: &str, euid: Uid) -> Vec<RawIssue> {
    let spans = Spans::of(source);
    let mut issues = Vec::new();
    let mut report = |span: &Option<Range<usize>>, key: &str, message: String| {
        issues.push(RawIssue { span: span.clone().unwrap_or(0..0), key: key.into(), message });
    };
    if euid.is_root() {
        for (key, message) in credentials(needs) {
            let span = if key == "daemon.group" { &spans.group } else { &spans.user };
            report(span, key, message);
        }
    }
    if let Some(path) = &needs.pid_file
        && let Err(message) = files::check_creatable_parent_dir(path)
    {
        report(&spans.pid_file, "daemon.pid_file", message);
    }
    match &needs.log_target {
        Some(LogTarget::File(path)) => {
            if let Err(message) = files::check_log_path(path) {
                report(&spans.log_path, "log.path", format!("{}: {message}", path.display()));
            }
        }
        Some(LogTarget::Syslog { socket, .. }) => {
            if let Err(message) = syslog_reachable(socket.as_deref()) {
                report(&spans.syslog_socket, "log.syslog_socket", message);
            }
        }
        Some(LogTarget::Stderr) | None => {}
    }
    for listener in &needs.listeners {
        let index = listener.index;
        let span = spans.addresses.get(index).cloned().flatten();
        let problem = match &listener.address {
            Address::Ip(address) => try_bind(*address, listener.reuseport)
                .err()
                .map(|error| format!("could not bind {address}: {error}")),
            Address::Unix(path) => socket_path_problem(path, &listener.socket_file),
            Address::Abstract(_) => None,
        };
        if let Some(message) = problem {
            report(&span, &format!("listener[{index}].address"), message);
        }
    }
    issues
}

/// What startup (`master::worker_credentials`) refuses when the master is root.
fn credentials(daemon: &Needs) -> Vec<(&'static str, String)> {
    let Some(user) = &daemon.user else {
        if daemon.allow_root_workers {
            return Vec::new();
        }
        return vec![(
            "daemon.user",
            "the master runs as root and workers would too: set daemon.user (e.g. \"preforkd\"), or allow_root_workers = true".into(),
        )];
    };
    match Credentials::resolve(user, daemon.group.as_deref()) {
        Ok(found) if found.uid.is_root() && !daemon.allow_root_workers => vec![(
            "daemon.user",
            format!(
                "{user:?} is root: workers would run as root; set allow_root_workers = true to allow it"
            ),
        )],
        Ok(_) => Vec::new(),
        Err(error) => vec![error.for_workers()],
    }
}

/// Whether startup could reach syslog at `socket` (or the default sockets).
fn syslog_reachable(socket: Option<&Path>) -> Result<(), String> {
    let candidates: Vec<&Path> = match socket {
        Some(path) => vec![path],
        None => DEFAULT_SYSLOG_SOCKETS.iter().map(Path::new).collect(),
    };
    let mut last = None;
    for path in &candidates {
        let datagram = UnixDatagram::unbound().and_then(|s| s.connect(path));
        match datagram.or_else(|_| UnixStream::connect(path).map(drop)) {
            Ok(()) => return Ok(()),
            Err(error) => {
                last = Some(format!("cannot reach syslog at {}: {error}", path.display()))
            }
        }
    }
    Err(last.unwrap_or_else(|| "no syslog socket".into()))
}

/// What would stop startup from binding a Unix socket file at `path` with `file`'s owner
/// and group: a missing directory, a symlink or a file that is not a socket in its place, an
/// unknown user or group. A socket file there is fine (startup replaces a stale one, and one
/// in use is a condition of the moment).
fn socket_path_problem(path: &Path, file: &SocketFile) -> Option<String> {
    let shown = path.display();
    if let Some(dir) = path.parent()
        && !dir.is_dir()
    {
        return Some(format!("{shown}: the directory {} does not exist", dir.display()));
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_symlink() {
            return Some(format!("{shown} is a symlink: startup neither follows nor removes it"));
        }
        if !meta.file_type().is_socket() {
            return Some(format!("{shown} exists and is not a socket: startup does not remove it"));
        }
    }
    if let Some(owner) = &file.owner
        && let Err(error) = crate::privileges::user_id(owner)
    {
        return Some(format!("{shown}: owner: {error}"));
    }
    if let Some(group) = &file.group
        && let Err(error) = crate::privileges::group_id(group)
    {
        return Some(format!("{shown}: group: {error}"));
    }
    None
}

/// Binds `address` as startup would, then closes the socket (no listen(2)). An address in
/// use now is not a configuration problem and passes.
fn try_bind(address: SocketAddr, reuseport: bool) -> io::Result<()> {
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if reuseport {
        socket.set_reuse_port(true)?;
    }
    if address.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    match socket.bind(&address.into()) {
        Err(error) if error.kind() == io::ErrorKind::AddrInUse => Ok(()),
        other => other,
    }
}

/// Where the keys these checks report on are written in the file.
#[derive(Debug, Default)]
struct Spans {
    user: Option<Range<usize>>,
    group: Option<Range<usize>>,
    pid_file: Option<Range<usize>>,
    log_path: Option<Range<usize>>,
    syslog_socket: Option<Range<usize>>,
    addresses: Vec<Option<Range<usize>>>,
}

impl Spans {
    /// Reads them from `source` again (the validated [`Config`] no longer has them).
    fn of(source: &str) -> Spans {
        let Some(file) = file::read(source).0 else { return Spans::default() };
        let span = |value: Option<&Spanned<String>>| value.map(Spanned::span);
        let (daemon, log) = (file.daemon.unwrap_or_default(), file.log.unwrap_or_default());
        Spans {
            user: span(daemon.user.as_ref()),
            group: span(daemon.group.as_ref()),
            pid_file: span(daemon.pid_file.as_ref()),
            log_path: span(log.path.as_ref()).or(span(log.target.as_ref())),
            syslog_socket: span(log.syslog_socket.as_ref()).or(span(log.target.as_ref())),
            addresses: file
                .listener
                .iter()
                .map(|l| l.get_ref().address.as_ref().map(Spanned::span))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::validate::validate;

    fn found(source: &str, euid: u32) -> Vec<String> {
        let (file, options, mut issues) = file::read(source);
        let mut needs = Needs::default();
        let services = crate::services::Registry::builtin();
        let config =
            validate(file.unwrap(), options, &services, Path::new("."), &mut issues, &mut needs);
        assert!(config.is_some(), "a valid file: {issues:?}");
        check(&needs, source, Uid::from_raw(euid)).into_iter().map(|i| i.message).collect()
    }

    const LISTENER: &str =
        "[[listener]]\nname = \"a\"\naddress = \"127.0.0.1:0\"\nservice = \"echo\"\n";

    #[test]
    fn credentials_are_checked_only_as_root_as_startup_does() {
        let unknown = format!("[daemon]\nuser = \"no-such-user-preforkd\"\n{LISTENER}");
        assert!(found(&unknown, 0)[0].contains("unknown user"), "{:?}", found(&unknown, 0));
        assert!(found(&unknown, 1000).is_empty(), "a non-root master ignores daemon.user");
        let group = format!(
            "[daemon]\nuser = \"root\"\ngroup = \"no-such-group-preforkd\"\nallow_root_workers = true\n{LISTENER}"
        );
        assert!(found(&group, 0)[0].contains("unknown group"));
        let root = format!("[daemon]\nuser = \"root\"\n{LISTENER}");
        assert!(found(&root, 0)[0].contains("allow_root_workers"));
        assert!(found(LISTENER, 0)[0].contains("set daemon.user"));
    }

    #[test]
    fn missing_directories_and_unbindable_addresses_are_found() {
        let source = "[daemon]\npid_file = \"/nonexistent-preforkd/deeper/p.pid\"\nallow_root_workers = true\n\
                      [log]\ntarget = \"file\"\npath = \"/nonexistent-preforkd/p.log\"\n\
                      [[listener]]\nname = \"a\"\naddress = \"192.0.2.1:7\"\nservice = \"echo\"\n";
        let issues = found(source, 0);
        assert_eq!(issues.len(), 3, "{issues:?}");
        assert!(issues[2].contains("could not bind 192.0.2.1:7"), "{issues:?}");
    }
}
