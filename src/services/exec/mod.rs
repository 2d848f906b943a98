//! exec: inetd-style, a program per connection, with the connection as its standard input
//! and output (xinetd's `server`, tcpserver's `prog`).
//!
//! Runs in the master (building the service from `[listener.options]`), in the exec
//! spawner (`crate::spawner`, which starts the programs) and in workers (one session per
//! connection, `session.rs`).
//!
//! The child gets fd 0 and 1 = the client socket (made blocking, as a program expects), fd 2
//! = a pipe whose lines the worker logs (or /dev/null), the UCSPI-TCP environment of
//! tcpserver(1) (`PROTO=TCP`, `TCPREMOTEIP`, `TCPREMOTEPORT`, `TCPLOCALIP`, `TCPLOCALPORT`;
//! IPv6 addresses under the same names), or for a client of a Unix listener that of
//! ucspi-unix's unixserver(1) (`PROTO=UNIX`, `UNIXREMOTEEUID`, `UNIXREMOTEEGID`,
//! `UNIXREMOTEPID`, `UNIXLOCALPATH`), plus `env` and the `pass_env` names, nothing else;
//! default signal dispositions (but for the two real-time signals glibc keeps for itself,
//! which its posix_spawn leaves ignored too) and an empty signal mask, its own process group,
//! `directory` as its working directory, and no other descriptor. Before execve(2) it takes
//! the listener's resource limits (`rlimits`), nice value, umask, then its supplementary
//! groups, group and user (`user`, default [`DEFAULT_USER`]): never the workers' user, so a
//! program cannot signal or trace the workers that serve every listener.
//!
//! Workers hold no privilege to switch users, so they do not start programs themselves: a
//! worker sends the exec spawner of its generation a request naming the listener, with the
//! client socket (`wire.rs`), and the spawner (root, with only the capabilities it needs)
//! starts that listener's program, the way posix_spawn(3) does (`sys::spawn`: clone(2)
//! with `CLONE_VM | CLONE_VFORK`), reaps it and reports its end. A worker that dies leaves
//! no child behind: the spawner kills the process group of every child whose connection
//! went away.
//!
//! The connection (and its per-client count) lives until the child exits; idle timeouts
//! do not apply meanwhile (the worker cannot see the traffic), `max_lifetime` does: SIGTERM
//! to the child's process group, SIGKILL `kill_grace` later. `max_instances` caps the
//! children running at once on the listener, exact across workers: it is the listener's
//! connection cap (see [`Service::max_connections`]), refusing with reason
//! `listener-full`. When the child exits, the connection stops counting (per client and
//! against `max_instances`, as xinetd counts running servers) while the worker waits for
//! the client's FIN. A graceful stop waits for the children (until the master's
//! `graceful_timeout` ends the worker, and the children with it); a fast stop kills them.
//! The access line gives the child (`child=PID`) and how it ended (`status=exit:N` or
//! `status=signal:NAME`, and `max_lifetime=SIGNAL` when it was stopped for its age).

mod session;
pub mod wire;

use std::collections::BTreeMap;
use std::ffi::{CString, OsString};
use std::num::NonZeroU32;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use nix::libc;
use nix::unistd::Pid;

use super::{ConnInfo, Invalid, Options, Service, Session};
use crate::net::{Address, Peer};
use crate::privileges::{Credentials, PrivilegeError};
use crate::sys::{Ids, ProcessSettings, SpawnError};

/// The name in `service = "..."`.
pub(super) const NAME: &str = "exec";

/// Default of `kill_grace`: from SIGTERM to SIGKILL when `max_lifetime` is reached.
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(2);

/// Default of `user`: a system user of its own, neither the workers' (a program could
/// signal or trace the workers) nor `nobody` (shared with other daemons, whose processes a
/// program could then signal, and they it).
pub const DEFAULT_USER: &str = "preforkd-exec";

/// The environment names tcpserver(1) sets, which `env` may not.
const UCSPI_NAMES: [&str; 9] = [
    "PROTO",
    "TCPREMOTEIP",
    "TCPREMOTEPORT",
    "TCPLOCALIP",
    "TCPLOCALPORT",
    "UNIXREMOTEEUID",
    "UNIXREMOTEEGID",
    "UNIXREMOTEPID",
    "UNIXLOCALPATH",
];

/// `[listener.options]` of an exec listener, as written.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecOptions {
    program: String,
    args: Option<Vec<String>>,
    env: Option<BTreeMap<String, String>>,
    pass_env: Option<Vec<String>>,
    directory: Option<String>,
    max_lifetime: Option<String>,
    kill_grace: Option<String>,
    stderr: Option<String>,
    max_instances: Option<u32>,
    user: Option<String>,
    group: Option<String>,
    groups: Option<Vec<String>>,
    umask: Option<String>,
    nice: Option<i64>,
    rlimits: Option<RlimitOptions>,
}

/// `rlimits = { ... }`: xinetd's `rlimit_*` attributes.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RlimitOptions {
    #[serde(rename = "as")]
    address_space: Option<Limit>,
    cpu: Option<Limit>,
    data: Option<Limit>,
    rss: Option<Limit>,
    stack: Option<Limit>,
    nofile: Option<Limit>,
}

/// A resource limit as written: a number, or a string (`"unlimited"`, or a size such as
/// `"64M"`).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(untagged)]
enum Limit {
    Number(i64),
    Text(String),
}

/// The unit of a resource limit, for parsing and messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    Bytes,
    Seconds,
    Count,
}

/// The rlimits keys: name, resource, unit.
const RLIMITS: [(&str, libc::c_int, Unit); 6] = [
    ("as", libc::RLIMIT_AS as libc::c_int, Unit::Bytes),
    ("cpu", libc::RLIMIT_CPU as libc::c_int, Unit::Seconds),
    ("data", libc::RLIMIT_DATA as libc::c_int, Unit::Bytes),
    ("rss", libc::RLIMIT_RSS as libc::c_int, Unit::Bytes),
    ("stack", libc::RLIMIT_STACK as libc::c_int, Unit::Bytes),
    ("nofile", libc::RLIMIT_NOFILE as libc::c_int, Unit::Count),
];

/// Parses one limit: a non-negative number, `"unlimited"` (`RLIM_INFINITY`), or for bytes a
/// number with a `K`, `M` or `G` suffix (powers of 1024, as xinetd reads them).
fn parse_limit(limit: &Limit, unit: Unit) -> Result<u64, String> {
    let number = match limit {
        Limit::Number(n) => u64::try_from(*n).map_err(|_| format!("{n} is negative"))?,
        Limit::Text(text) if text.trim().eq_ignore_ascii_case("unlimited") => {
            return Ok(libc::RLIM_INFINITY);
        }
        Limit::Text(written) => {
            // The suffix's index is into the trimmed text, and so is every slice taken.
            let text = written.trim();
            let (digits, scale) = match text.char_indices().last() {
                Some((i, 'k' | 'K')) if unit == Unit::Bytes => (&text[..i], 1 << 10),
                Some((i, 'm' | 'M')) if unit == Unit::Bytes => (&text[..i], 1 << 20),
                Some((i, 'g' | 'G')) if unit == Unit::Bytes => (&text[..i], 1 << 30),
                _ => (text, 1),
            };
            let expected = match unit {
                Unit::Bytes => "a number of bytes (K, M or G may follow) or \"unlimited\"",
                Unit::Seconds => "a number of seconds or \"unlimited\"",
                Unit::Count => "a number or \"unlimited\"",
            };
            digits
                .trim()
                .parse::<u64>()
                .ok()
                .and_then(|n| n.checked_mul(scale))
                .ok_or_else(|| format!("{written:?} is not {expected}"))?
        }
    };
    Ok(number)
}

/// Parses an umask written as octal digits (`"027"`).
fn parse_umask(text: &str) -> Result<u32, String> {
    u32::from_str_radix(text, 8)
        .ok()
        .filter(|&mask| mask <= 0o777 && !text.is_empty())
        .ok_or_else(|| format!("{text:?} is not an umask: octal digits, at most \"777\""))
}

/// Where the child's standard error goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StderrTo {
    /// To the daemon's log, line by line with the child's pid, rate-limited.
    Log,
    /// /dev/null.
    Discard,
}

/// The program a listener starts, as the spawner needs it: everything resolved when the
/// configuration is loaded (users and groups looked up, the environment taken), so that
/// starting it reads no file.
#[derive(Debug, Clone)]
pub struct Program {
    /// Absolute path of the program.
    pub path: PathBuf,
    /// Arguments after `argv[0]` (which is `path`).
    pub args: Vec<String>,
    /// The environment besides the UCSPI variables: `env`, then the `pass_env` names that
    /// the daemon's environment has (taken when the configuration is loaded).
    pub env: Vec<(String, OsString)>,
    /// Working directory of the child. Default `/`.
    pub directory: PathBuf,
    /// Default [`StderrTo::Log`].
    pub stderr: StderrTo,
    /// The user the child runs as (`user`, default [`DEFAULT_USER`]), as written; `None`
    /// when the configuration was loaded by a process that is not root, which cannot
    /// switch (the child then runs as that process's user).
    pub user: Option<String>,
    /// Limits, nice value, umask and credentials of the child.
    pub process: ProcessSettings,
    /// `path`, `argv` (`path` then `args`), `env` as `NAME=value` and `directory`, as C
    /// strings, made once.
    path_c: CString,
    argv: Vec<CString>,
    env_c: Vec<CString>,
    directory_c: CString,
}

impl Program {
    /// The user id and group id the child runs as; `None` when it keeps its parent's.
    pub fn ids(&self) -> Option<&Ids> {
        self.process.ids.as_ref()
    }

    /// Starts the program for the connection on `socket` (`peer` -> `local`), with `stderr`
    /// as its descriptor 2 (`None`: /dev/null) and `rule_env` (the variables of the client's
    /// `allow` rule, after `env`; a UCSPI name among them is left out) added to its
    /// environment; returns its pid. Called in the spawner.
    ///
    /// The environment says who connected as the UCSPI tools do: tcpserver(1)'s `PROTO=TCP`,
    /// `TCPREMOTEIP`, `TCPREMOTEPORT`, `TCPLOCALIP`, `TCPLOCALPORT`, or for a Unix client
    /// ucspi-unix's unixserver(1)'s `PROTO=UNIX`, `UNIXREMOTEEUID`, `UNIXREMOTEEGID`,
    /// `UNIXREMOTEPID` and `UNIXLOCALPATH` (for a socket file).
    ///
    /// # Errors
    /// The failed step and its errno (see [`crate::sys::spawn`]).
    pub fn spawn(
        &self,
        socket: BorrowedFd<'_>,
        peer: Peer,
        local: Option<&Address>,
        stderr: Option<BorrowedFd<'_>>,
        rule_env: &[(String, String)],
    ) -> Result<Pid, SpawnError> {
        let mut envp = Vec::with_capacity(5 + self.env_c.len() + rule_env.len());
        let mut set = |name: &str, value: String| {
            // Addresses, ports and ids hold no NUL byte; a path is checked at parse time.
            envp.push(CString::new(format!("{name}={value}")).unwrap_or_default());
        };
        match (peer, local) {
            (Peer::Ip(peer), local) => {
                set("PROTO", "TCP".to_owned());
                set("TCPREMOTEIP", peer.ip().to_string());
                set("TCPREMOTEPORT", peer.port().to_string());
                if let Some(local) = local.and_then(Address::ip) {
                    set("TCPLOCALIP", local.ip().to_string());
                    set("TCPLOCALPORT", local.port().to_string());
                }
            }
            (Peer::Unix(credentials), local) => {
                set("PROTO", "UNIX".to_owned());
                set("UNIXREMOTEEUID", credentials.uid.to_string());
                set("UNIXREMOTEEGID", credentials.gid.to_string());
                set("UNIXREMOTEPID", credentials.pid.to_string());
                if let Some(path) = local.and_then(Address::path) {
                    set("UNIXLOCALPATH", path.display().to_string());
                }
            }
        }
        envp.extend(self.env_c.iter().cloned());
        for (name, value) in rule_env {
            if !UCSPI_NAMES.contains(&name.as_str()) {
                // Validated when the configuration was loaded: no NUL byte, no '=' in names.
                envp.push(CString::new(format!("{name}={value}")).unwrap_or_default());
            }
        }
        let setup = crate::sys::SpawnSetup {
            stdio: socket,
            stderr,
            directory: &self.directory_c,
            process: &self.process,
        };
        crate::sys::spawn(&self.path_c, &self.argv, &envp, &setup)
    }
}

/// The exec service: what to run for each connection.
#[derive(Debug, Clone)]
pub struct Exec {
    /// The program and how to start it.
    pub program: Program,
    /// SIGTERM after this long; `None` (written "0s", the default) never.
    pub max_lifetime: Option<Duration>,
    /// From SIGTERM to SIGKILL. Default 2 s.
    pub kill_grace: Duration,
    /// Children running at once on this listener, exact across workers (the listener's
    /// connection cap, since a connection lasts as long as its child); `None` (written 0,
    /// the default) is unlimited.
    pub max_instances: Option<NonZeroU32>,
}

fn valid_env_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['=', '\0'])
}

/// The credentials of the children: `user` (default [`DEFAULT_USER`]), `group` (default
/// the user's primary group) and `groups` (default the user's groups in the group
/// database, as initgroups(3) finds them), resolved when this process is root; `None`
/// otherwise (it cannot switch users, so the children run as it).
fn resolve_ids(options: &mut Options<'_>, written: &ExecOptions) -> Option<(String, Ids)> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let user = written.user.as_deref().unwrap_or(DEFAULT_USER);
    let credentials = match Credentials::resolve(user, written.group.as_deref()) {
        Ok(credentials) => credentials,
        Err(PrivilegeError::Unknown { kind: "group", name }) => {
            options.report("group", format!("unknown group {name:?}"));
            return None;
        }
        Err(PrivilegeError::Unknown { name, .. }) if written.user.is_none() => {
            options.report(
                "user",
                format!(
                    "the default user {name:?}, which exec children run as, does not exist: create it (useradd --system --no-create-home --shell /usr/sbin/nologin {name}, or systemd-sysusers) or set user"
                ),
            );
            return None;
        }
        Err(PrivilegeError::Unknown { name, .. }) => {
            options.report("user", format!("unknown user {name:?}"));
            return None;
        }
        Err(error) => {
            options.report("user", error.to_string());
            return None;
        }
    };
    let groups = match &written.groups {
        Some(names) => {
            let mut groups = Vec::with_capacity(names.len());
            for name in names {
                match name.parse::<u32>() {
                    Ok(gid) => groups.push(gid),
                    Err(_) => match nix::unistd::Group::from_name(name) {
                        Ok(Some(group)) => groups.push(group.gid.as_raw()),
                        _ => options.report("groups", format!("unknown group {name:?}")),
                    },
                }
            }
            groups
        }
        None => {
            let name = CString::new(credentials.user.as_bytes()).unwrap_or_default();
            match nix::unistd::getgrouplist(&name, credentials.gid) {
                Ok(groups) => groups.into_iter().map(|g| g.as_raw()).collect(),
                Err(error) => {
                    options.report("groups", format!("the groups of {user:?}: {error}"));
                    Vec::new()
                }
            }
        }
    };
    let ids = Ids { uid: credentials.uid.as_raw(), gid: credentials.gid.as_raw(), groups };
    Some((user.to_owned(), ids))
}

/// Reads `umask`, `nice` and `rlimits`.
fn process_settings(options: &mut Options<'_>, written: &ExecOptions) -> ProcessSettings {
    let mut process = ProcessSettings::default();
    if let Some(text) = &written.umask {
        match parse_umask(text) {
            Ok(mask) => process.umask = Some(mask),
            Err(message) => options.report("umask", message),
        }
    }
    if let Some(nice) = written.nice {
        if (-20..=19).contains(&nice) {
            process.nice = Some(nice as i32);
        } else {
            options.report("nice", format!("{nice} is not a nice value: -20 to 19"));
        }
    }
    let limits = written.rlimits.as_ref();
    let values = limits.map_or([None, None, None, None, None, None], |l| {
        [&l.address_space, &l.cpu, &l.data, &l.rss, &l.stack, &l.nofile].map(Option::as_ref)
    });
    for ((name, resource, unit), value) in RLIMITS.into_iter().zip(values) {
        let Some(value) = value else { continue };
        match parse_limit(value, unit) {
            Ok(n) if name == "nofile" && n < 3 => options.report(
                &format!("rlimits.{name}"),
                format!("{n} is too low: descriptors 0 to 2 are the connection and stderr"),
            ),
            Ok(n) => process.rlimits.push((resource, n)),
            Err(message) => options.report(&format!("rlimits.{name}"), message),
        }
    }
    process
}

/// Builds the service from its options; `program` must be an absolute path to an executable
/// regular file now (checked again at each spawn).
pub(super) fn build(options: &mut Options<'_>) -> Result<Arc<dyn Service>, Invalid> {
    let written: ExecOptions = options.parse()?;
    let path = PathBuf::from(&written.program);
    if !path.is_absolute() {
        options.report("program", format!("{:?} must be an absolute path", written.program));
    } else {
        match std::fs::metadata(&path) {
            Ok(meta) if !meta.is_file() => options.report("program", "is not a regular file"),
            Ok(meta) if meta.permissions().mode() & 0o111 == 0 => {
                options.report("program", "is not executable")
            }
            Ok(_) => {}
            Err(error) => options.report("program", format!("{}: {error}", path.display())),
        }
    }
    let args = written.args.clone().unwrap_or_default();
    if args.iter().any(|a| a.contains('\0')) {
        options.report("args", "an argument holds a NUL byte");
    }
    let mut env = Vec::new();
    for (name, value) in written.env.clone().unwrap_or_default() {
        if !valid_env_name(&name) || value.contains('\0') {
            options.report("env", format!("{name:?}: names and values cannot hold '=' or NUL"));
        } else if UCSPI_NAMES.contains(&name.as_str()) {
            options.report("env", format!("{name} is set by preforkd (UCSPI)"));
        } else {
            env.push((name, value.into()));
        }
    }
    for name in written.pass_env.clone().unwrap_or_default() {
        if !valid_env_name(&name) {
            options.report("pass_env", format!("{name:?} is not an environment variable name"));
        } else if let Some(value) = std::env::var_os(&name) {
            env.push((name, value));
        }
    }
    let directory = PathBuf::from(written.directory.as_deref().unwrap_or("/"));
    if !directory.is_absolute() || !directory.is_dir() {
        options.report("directory", format!("{} is not an existing absolute directory", directory.display()));
    }
    let max_lifetime =
        options.duration("max_lifetime", written.max_lifetime.as_deref(), Duration::ZERO);
    let kill_grace =
        options.duration("kill_grace", written.kill_grace.as_deref(), DEFAULT_KILL_GRACE);
    let stderr = match written.stderr.as_deref() {
        None | Some("log") => StderrTo::Log,
        Some("discard") => StderrTo::Discard,
        Some(other) => {
            options.report("stderr", format!("unknown value {other:?}: expected \"log\" or \"discard\""));
            StderrTo::Log
        }
    };
    let mut process = process_settings(options, &written);
    let user = resolve_ids(options, &written).map(|(user, ids)| {
        process.ids = Some(ids);
        user
    });
    let c = |bytes: &[u8]| CString::new(bytes).unwrap_or_default();
    let path_c = c(path.as_os_str().as_bytes());
    let argv = std::iter::once(path_c.clone()).chain(args.iter().map(|a| c(a.as_bytes()))).collect();
    let env_c = env
        .iter()
        .map(|(name, value)| {
            let mut pair = OsString::from(name);
            pair.push("=");
            pair.push(value);
            c(&pair.into_vec())
        })
        .collect();
    let directory_c = c(directory.as_os_str().as_bytes());
    let program = Program {
        path,
        args,
        env,
        directory,
        stderr,
        user,
        process,
        path_c,
        argv,
        env_c,
        directory_c,
    };
    let exec = Exec {
        program,
        max_lifetime: Some(max_lifetime).filter(|d| !d.is_zero()),
        kill_grace,
        max_instances: written.max_instances.and_then(NonZeroU32::new),
    };
    options.finish(Arc::new(exec) as Arc<dyn Service>)
}

/// This worker's link to the exec spawner of its generation, set once at boot
/// ([`set_spawner_link`]).
static LINK: OnceLock<OwnedFd> = OnceLock::new();

/// Gives this worker its link to the exec spawner (the master does, in the forked worker,
/// before the worker starts). A second call is ignored.
pub fn set_spawner_link(link: OwnedFd) {
    let _ = LINK.set(link);
}

impl Service for Exec {
    fn max_connections(&self) -> Option<NonZeroU32> {
        self.max_instances
    }

    fn program(&self) -> Option<&Program> {
        Some(&self.program)
    }

    fn passes_socket(&self) -> bool {
        true
    }

    fn session(&self, conn: &ConnInfo<'_>) -> Box<dyn Session> {
        Box::new(session::ExecSession::start(self, LINK.get(), conn))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_umasks_read_as_xinetd_writes_them() {
        assert_eq!(parse_limit(&Limit::Number(64), Unit::Count), Ok(64));
        assert_eq!(parse_limit(&Limit::Text("64M".into()), Unit::Bytes), Ok(64 << 20));
        assert_eq!(parse_limit(&Limit::Text("8k".into()), Unit::Bytes), Ok(8 << 10));
        assert_eq!(parse_limit(&Limit::Text("UNLIMITED".into()), Unit::Seconds), Ok(libc::RLIM_INFINITY));
        assert!(parse_limit(&Limit::Text("8M".into()), Unit::Seconds).is_err(), "no suffix for seconds");
        assert!(parse_limit(&Limit::Number(-1), Unit::Count).is_err());
        assert!(parse_limit(&Limit::Text("lots".into()), Unit::Count).is_err());
        // White space around the number is the number's: the suffix is found in the trimmed
        // text, never at a byte index of the untrimmed one (inside a character, a panic).
        assert_eq!(parse_limit(&Limit::Text(" 64M".into()), Unit::Bytes), Ok(64 << 20));
        assert_eq!(parse_limit(&Limit::Text("\u{3000}1M ".into()), Unit::Bytes), Ok(1 << 20));
        assert!(parse_limit(&Limit::Text("\u{3000}M".into()), Unit::Bytes).is_err());
        assert_eq!(parse_umask("027"), Ok(0o027));
        assert_eq!(parse_umask("0"), Ok(0));
        assert!(parse_umask("8").is_err() && parse_umask("1777").is_err() && parse_umask("").is_err());
    }
}
