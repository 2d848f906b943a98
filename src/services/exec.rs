//! exec: inetd-style, a program per connection, with the connection as its standard input
//! and output (xinetd's `server`, tcpserver's `prog`).
//!
//! The child gets fd 0 and 1 = the client socket (made blocking, as a program expects), fd 2
//! = a pipe whose lines the worker logs (or /dev/null), the UCSPI-TCP environment of
//! tcpserver(1) (`PROTO=TCP`, `TCPREMOTEIP`, `TCPREMOTEPORT`, `TCPLOCALIP`, `TCPLOCALPORT`;
//! IPv6 addresses under the same names) plus `env` and the `pass_env` names, nothing else;
//! default signal dispositions (but for the two real-time signals glibc keeps for itself,
//! which its posix_spawn leaves ignored too) and an empty signal mask, its own process group,
//! the worker's credentials, `directory` as its working directory, and no other descriptor.
//! It is started the way posix_spawn(3) starts a program, by clone(2) with `CLONE_VM |
//! CLONE_VFORK` (`sys::spawn`), which copies nothing of the worker (measured: half the cost
//! of fork + exec from a 4 MiB process, a tenth from 64 MiB). A worker that dies leaves no child
//! behind: the master, a child subreaper, adopts and kills them (see `master::orphans`).
//!
//! The worker waits for the child in its readiness loop through a pidfd (pidfd_open(2)),
//! an extra descriptor of the session: readable when the child exits, then reaped with
//! `waitpid(WNOHANG)`, so there is no zombie and no blocking wait. The connection (and its
//! per-client count) lives until the child exits; idle timeouts do not apply meanwhile (the
//! worker cannot see the traffic), `max_lifetime` does: SIGTERM to the child's process
//! group, SIGKILL `kill_grace` later. `max_instances` caps the children running at once on
//! the listener, exact across workers: it is the listener's connection cap (see
//! [`Service::max_connections`]), refusing with reason `listener-full`. A graceful stop waits for the children (until the
//! master's `graceful_timeout` ends the worker, and the children with it); a fast stop kills
//! them. The access line gives the child (`child=PID`) and how it ended (`status=exit:N` or
//! `status=signal:NAME`, and `max_lifetime=SIGNAL` when it was stopped for its age).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::ffi::CString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use super::{
    CloseReason, ConnInfo, Context, Interest, Invalid, Options, Progress, Ready, Service, Session,
    TlsInfo,
};

/// The name in `service = "..."`.
pub(super) const NAME: &str = "exec";

/// Default of `kill_grace`: from SIGTERM to SIGKILL when `max_lifetime` is reached.
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(2);

/// Longest stderr line logged; the rest of a longer line is dropped.
const MAX_STDERR_LINE: usize = 1024;

/// stderr lines logged per child and second at most; the others are counted and the count
/// is logged with the next line that may be.
const STDERR_LINES_PER_SECOND: u32 = 20;

/// The environment names tcpserver(1) sets, which `env` may not.
const UCSPI_NAMES: [&str; 5] = ["PROTO", "TCPREMOTEIP", "TCPREMOTEPORT", "TCPLOCALIP", "TCPLOCALPORT"];

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
}

/// Where the child's standard error goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StderrTo {
    /// To the daemon's log, line by line with the child's pid, rate-limited.
    Log,
    /// /dev/null.
    Discard,
}

/// The exec service: what to run for each connection.
#[derive(Debug, Clone)]
pub struct Exec {
    /// Absolute path of the program.
    pub program: PathBuf,
    /// Arguments after `argv[0]` (which is `program`).
    pub args: Vec<String>,
    /// The environment besides the UCSPI variables: `env`, then the `pass_env` names that
    /// the daemon's environment has (taken when the configuration is loaded).
    pub env: Vec<(String, OsString)>,
    /// Working directory of the child. Default `/`.
    pub directory: PathBuf,
    /// SIGTERM after this long; `None` (written "0s", the default) never.
    pub max_lifetime: Option<Duration>,
    /// From SIGTERM to SIGKILL. Default 2 s.
    pub kill_grace: Duration,
    /// Default [`StderrTo::Log`].
    pub stderr: StderrTo,
    /// Children running at once on this listener, exact across workers (the listener's
    /// connection cap, since a connection lasts as long as its child); `None` (written 0,
    /// the default) is unlimited.
    pub max_instances: Option<NonZeroU32>,
    /// `program`, `argv` (`program` then `args`) and `directory` as C strings, made once.
    program_c: CString,
    argv: Vec<CString>,
    directory_c: CString,
}

fn valid_env_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['=', '\0'])
}

/// Builds the service from its options; `program` must be an absolute path to an executable
/// regular file now (checked again at each spawn).
pub(super) fn build(options: &mut Options<'_>) -> Result<Arc<dyn Service>, Invalid> {
    let written: ExecOptions = options.parse()?;
    let program = PathBuf::from(&written.program);
    if !program.is_absolute() {
        options.report("program", format!("{:?} must be an absolute path", written.program));
    } else {
        match std::fs::metadata(&program) {
            Ok(meta) if !meta.is_file() => options.report("program", "is not a regular file"),
            Ok(meta) if meta.permissions().mode() & 0o111 == 0 => {
                options.report("program", "is not executable")
            }
            Ok(_) => {}
            Err(error) => options.report("program", format!("{}: {error}", program.display())),
        }
    }
    let args = written.args.unwrap_or_default();
    if args.iter().any(|a| a.contains('\0')) {
        options.report("args", "an argument holds a NUL byte");
    }
    let mut env = Vec::new();
    for (name, value) in written.env.unwrap_or_default() {
        if !valid_env_name(&name) || value.contains('\0') {
            options.report("env", format!("{name:?}: names and values cannot hold '=' or NUL"));
        } else if UCSPI_NAMES.contains(&name.as_str()) {
            options.report("env", format!("{name} is set by preforkd (UCSPI-TCP)"));
        } else {
            env.push((name, value.into()));
        }
    }
    for name in written.pass_env.unwrap_or_default() {
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
    let c = |bytes: &[u8]| CString::new(bytes).unwrap_or_default();
    let program_c = c(program.as_os_str().as_bytes());
    let argv = std::iter::once(program_c.clone())
        .chain(args.iter().map(|a| c(a.as_bytes())))
        .collect();
    let directory_c = c(directory.as_os_str().as_bytes());
    let exec = Exec {
        program,
        args,
        env,
        directory,
        max_lifetime: Some(max_lifetime).filter(|d| !d.is_zero()),
        kill_grace,
        stderr,
        max_instances: written.max_instances.and_then(NonZeroU32::new),
        program_c,
        argv,
        directory_c,
    };
    options.finish(Arc::new(exec) as Arc<dyn Service>)
}

impl Exec {
    /// Starts the program for the connection on `socket` (`peer` -> `local`): the child's
    /// pid, and the read end of its stderr pipe when stderr is logged.
    fn spawn(
        &self,
        socket: BorrowedFd<'_>,
        peer: SocketAddr,
        local: SocketAddr,
        tls: Option<&TlsInfo>,
    ) -> io::Result<(Pid, Option<OwnedFd>)> {
        // The child's stdin and stdout are the socket, blocking as programs expect. The flag
        // belongs to the shared open file description: the worker does no I/O on the socket
        // until the child has exited, and then only with MSG_DONTWAIT.
        fcntl(socket, FcntlArg::F_SETFL(OFlag::empty()))?;
        let (stderr_read, stderr_write) = match self.stderr {
            StderrTo::Discard => (None, None),
            StderrTo::Log => {
                let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
                // pipe2 made both ends non-blocking: the child's must block.
                fcntl(&write, FcntlArg::F_SETFL(OFlag::empty()))?;
                (Some(read), Some(write))
            }
        };
        let mut envp = Vec::with_capacity(5 + self.env.len());
        for (name, value) in [
            ("PROTO", "TCP".to_owned()),
            ("TCPREMOTEIP", peer.ip().to_string()),
            ("TCPREMOTEPORT", peer.port().to_string()),
            ("TCPLOCALIP", local.ip().to_string()),
            ("TCPLOCALPORT", local.port().to_string()),
        ] {
            envp.push(CString::new(format!("{name}={value}"))?);
        }
        // Over TLS, what the handshake settled, as sslserver and mod_ssl name it.
        for (name, value) in tls.map(TlsInfo::environment).unwrap_or_default() {
            envp.push(CString::new(format!("{name}={value}"))?);
        }
        for (name, value) in &self.env {
            let mut pair = OsString::from(name);
            pair.push("=");
            pair.push(value);
            envp.push(CString::new(pair.into_vec())?);
        }
        let setup = crate::sys::SpawnSetup {
            stdio: socket,
            stderr: stderr_write.as_ref().map(AsFd::as_fd),
            directory: &self.directory_c,
        };
        let pid = crate::sys::spawn(&self.program_c, &self.argv, &envp, &setup)?;
        Ok((pid, stderr_read))
    }
}

impl Service for Exec {
    fn max_connections(&self) -> Option<NonZeroU32> {
        self.max_instances
    }

    fn passes_socket(&self) -> bool {
        true
    }

    fn session(&self, conn: &ConnInfo<'_>) -> Box<dyn Session> {
        let started = Instant::now();
        let spawned = conn
            .local_addr()
            .and_then(|local| self.spawn(conn.socket, conn.peer, local, conn.tls))
            .and_then(|(child, stderr)| match crate::sys::pidfd_open(child.as_raw()) {
                Ok(pidfd) => Ok((child, pidfd, stderr)),
                Err(error) => {
                    // Without a pidfd it cannot be waited for here: end it now.
                    let _ = killpg(child, Signal::SIGKILL);
                    let _ = waitpid(child, None);
                    Err(error)
                }
            });
        let state = match spawned {
            Ok((child, pidfd, stderr)) => State::Starting { child, pidfd, stderr },
            Err(error) => State::Failed(format!("{}: {error}", self.program.display())),
        };
        Box::new(ExecSession {
            state,
            started,
            max_lifetime: self.max_lifetime,
            kill_grace: self.kill_grace,
            pid: 0,
            stderr_line: Vec::new(),
            stderr_window: (started, 0, 0),
            killed: None,
            status: None,
        })
    }
}

/// A child's life as the session sees it.
enum State {
    /// Spawned; the pidfd and stderr pipe are not watched yet (that needs a callback).
    Starting { child: Pid, pidfd: OwnedFd, stderr: Option<OwnedFd> },
    /// Running: the pidfd (and the stderr pipe, until its EOF) are watched.
    Running { child: Pid, pidfd: OwnedFd, stderr: Option<OwnedFd> },
    /// Reaped.
    Exited,
    /// Could not be started (why).
    Failed(String),
    /// Placeholder while moving between states.
    Moving,
}

struct ExecSession {
    state: State,
    started: Instant,
    max_lifetime: Option<Duration>,
    kill_grace: Duration,
    pid: u32,
    /// A stderr line not ended yet (at most [`MAX_STDERR_LINE`] bytes kept).
    stderr_line: Vec<u8>,
    /// Rate limit of logged stderr lines: (window start, lines in it, lines held back).
    stderr_window: (Instant, u32, u64),
    /// The signal `max_lifetime` sent last, if any.
    killed: Option<Signal>,
    status: Option<WaitStatus>,
}

impl ExecSession {
    /// Logs the complete lines of `bytes` (and with `end`, the rest), rate-limited.
    fn log_stderr(&mut self, bytes: &[u8], end: bool, now: Instant) {
        let mut lines = Vec::new();
        for &byte in bytes {
            if byte == b'\n' {
                lines.push(std::mem::take(&mut self.stderr_line));
            } else if self.stderr_line.len() < MAX_STDERR_LINE {
                self.stderr_line.push(byte);
            }
        }
        if end && !self.stderr_line.is_empty() {
            lines.push(std::mem::take(&mut self.stderr_line));
        }
        for line in lines {
            let (start, logged, held) = &mut self.stderr_window;
            if now.saturating_duration_since(*start) >= Duration::from_secs(1) {
                (*start, *logged) = (now, 0);
            }
            if *logged >= STDERR_LINES_PER_SECOND {
                *held += 1;
                continue;
            }
            *logged += 1;
            let text = String::from_utf8_lossy(&line);
            match std::mem::take(held) {
                0 => log::warn!("exec pid={}: {}", self.pid, text.trim_end_matches('\r')),
                n => log::warn!(
                    "exec pid={}: {} ({n} stderr lines not logged)",
                    self.pid,
                    text.trim_end_matches('\r')
                ),
            }
        }
    }

    /// Reads what the child wrote to stderr; true at its end (EOF or error).
    fn read_stderr(&mut self, pipe: &OwnedFd, now: Instant) -> bool {
        let mut chunk = [0u8; 4096];
        for _ in 0..16 {
            match nix::unistd::read(pipe, &mut chunk) {
                Ok(0) => {
                    self.log_stderr(&[], true, now);
                    return true;
                }
                Ok(n) => self.log_stderr(&chunk[..n], false, now),
                Err(nix::errno::Errno::EINTR) => {}
                Err(nix::errno::Errno::EAGAIN) => return false,
                Err(_) => return true,
            }
        }
        false
    }

    /// The child exited: reap it, log the rest of its stderr, end the connection.
    fn exited(&mut self, cx: &mut Context<'_>) -> io::Result<Progress> {
        let State::Running { child, pidfd, stderr } =
            std::mem::replace(&mut self.state, State::Moving)
        else {
            return Ok(Progress::default());
        };
        match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::EINTR) => {
                // Not yet (a spurious wake-up): keep waiting.
                self.state = State::Running { child, pidfd, stderr };
                return Ok(Progress::default());
            }
            Ok(status) => self.status = Some(status),
            Err(error) => return Err(error.into()),
        }
        cx.unwatch(pidfd.as_fd());
        if let Some(pipe) = stderr {
            self.read_stderr(&pipe, cx.now());
            cx.unwatch(pipe.as_fd());
        }
        self.state = State::Exited;
        // FIN now, even if a process the child left in the background still holds the
        // socket (a close would then send nothing). The socket stays in blocking mode: the
        // loop's lingering close reads it with MSG_DONTWAIT, and no session runs on it.
        cx.shutdown_write();
        cx.close(CloseReason::Service("child-exit"));
        Ok(Progress::default())
    }
}

impl Session for ExecSession {
    fn interest(&self) -> Interest {
        match self.state {
            // One callback to register the child's descriptors (or report the failure).
            State::Starting { .. } | State::Failed(_) => Interest::WRITE,
            _ => Interest::NONE,
        }
    }

    fn on_readable(&mut self, _cx: &mut Context<'_>) -> io::Result<Progress> {
        Ok(Progress::default())
    }

    fn on_writable(&mut self, cx: &mut Context<'_>) -> io::Result<Progress> {
        match std::mem::replace(&mut self.state, State::Moving) {
            State::Starting { child, pidfd, stderr } => {
                self.pid = child.as_raw() as u32;
                let watched = cx.watch(pidfd.as_fd(), Interest::READ).and_then(|()| match &stderr {
                    Some(pipe) => cx.watch(pipe.as_fd(), Interest::READ),
                    None => Ok(()),
                });
                self.state = State::Running { child, pidfd, stderr };
                if let Err(error) = watched {
                    log::error!("exec pid={}: cannot wait for it: {error}; killing it", self.pid);
                    self.signal(Signal::SIGKILL);
                } else if let Some(lifetime) = self.max_lifetime {
                    cx.set_timer(Some(self.started + lifetime));
                }
            }
            State::Failed(error) => {
                log::error!("exec: cannot start {error}");
                self.state = State::Failed(error);
                cx.close(CloseReason::Service("exec-failed"));
            }
            other => self.state = other,
        }
        Ok(Progress::default())
    }

    fn on_extra(&mut self, fd: RawFd, ready: Ready, cx: &mut Context<'_>) -> io::Result<Progress> {
        let (child_exit, stderr_ready) = match &self.state {
            State::Running { pidfd, stderr, .. } => (
                fd == pidfd.as_raw_fd(),
                stderr.as_ref().is_some_and(|pipe| pipe.as_raw_fd() == fd),
            ),
            _ => return Ok(Progress::default()),
        };
        if child_exit && ready.readable {
            return self.exited(cx);
        }
        if stderr_ready && let State::Running { stderr, .. } = &mut self.state
            && let Some(pipe) = stderr.take()
        {
            if self.read_stderr(&pipe, cx.now()) {
                cx.unwatch(pipe.as_fd());
            } else if let State::Running { stderr, .. } = &mut self.state {
                *stderr = Some(pipe);
            }
        }
        Ok(Progress::default())
    }

    fn on_timer(&mut self, cx: &mut Context<'_>) -> io::Result<Progress> {
        let next = match self.killed {
            None => Signal::SIGTERM,
            Some(_) => Signal::SIGKILL,
        };
        log::info!("exec pid={}: max_lifetime reached, sending {next}", self.pid);
        self.signal(next);
        if next == Signal::SIGTERM {
            cx.set_timer(Some(cx.now() + self.kill_grace));
        }
        Ok(Progress::default())
    }

    fn is_at_rest(&self) -> bool {
        // A running child owns the conversation: a graceful stop waits for it.
        !matches!(self.state, State::Starting { .. } | State::Running { .. })
    }

    fn is_done(&self) -> bool {
        false
    }

    fn idle_timeouts(&self) -> bool {
        !matches!(self.state, State::Starting { .. } | State::Running { .. })
    }

    fn describe(&self, line: &mut String) {
        if self.pid != 0 {
            let _ = write!(line, " child={}", self.pid);
        }
        match self.status {
            Some(WaitStatus::Exited(_, code)) => {
                let _ = write!(line, " status=exit:{code}");
            }
            Some(WaitStatus::Signaled(_, signal, _)) => {
                let _ = write!(line, " status=signal:{signal}");
            }
            Some(_) => {}
            None => line.push_str(" status=running"),
        }
        if let Some(signal) = self.killed {
            let _ = write!(line, " max_lifetime={signal}");
        }
    }
}

impl ExecSession {
    /// Sends `signal` to the child's process group (it leads one of its own).
    fn signal(&mut self, signal: Signal) {
        if let State::Starting { child, .. } | State::Running { child, .. } = &self.state {
            let _ = killpg(*child, signal);
            if signal == Signal::SIGTERM || signal == Signal::SIGKILL {
                self.killed = Some(signal);
            }
        }
    }
}

impl Drop for ExecSession {
    /// The connection ended before the child (fast stop, an error): kill its process group,
    /// and reap it if it is already gone (else it is reaped when the worker exits).
    fn drop(&mut self) {
        if let State::Starting { child, .. } | State::Running { child, .. } = &self.state {
            let _ = killpg(*child, Signal::SIGKILL);
            let _ = waitpid(*child, Some(WaitPidFlag::WNOHANG));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> ExecSession {
        let now = Instant::now();
        ExecSession {
            state: State::Exited,
            started: now,
            max_lifetime: None,
            kill_grace: DEFAULT_KILL_GRACE,
            pid: 42,
            stderr_line: Vec::new(),
            stderr_window: (now, 0, 0),
            killed: None,
            status: None,
        }
    }

    #[test]
    fn the_access_fields_say_how_the_child_ended() {
        let mut exec = session();
        exec.status = Some(WaitStatus::Exited(Pid::from_raw(42), 3));
        let mut line = String::new();
        exec.describe(&mut line);
        assert_eq!(line, " child=42 status=exit:3");
        exec.status = Some(WaitStatus::Signaled(Pid::from_raw(42), Signal::SIGKILL, false));
        exec.killed = Some(Signal::SIGKILL);
        let mut line = String::new();
        exec.describe(&mut line);
        assert_eq!(line, " child=42 status=signal:SIGKILL max_lifetime=SIGKILL");
    }

    #[test]
    fn stderr_lines_are_split_bounded_and_rate_limited() {
        let mut exec = session();
        let now = Instant::now();
        let long = vec![b'x'; MAX_STDERR_LINE * 3];
        exec.log_stderr(&long, false, now);
        assert_eq!(exec.stderr_line.len(), MAX_STDERR_LINE, "a long line is cut, not grown");
        exec.log_stderr(b"\n", false, now);
        assert!(exec.stderr_line.is_empty());
        let many: Vec<u8> = b"line\n".repeat(STDERR_LINES_PER_SECOND as usize * 2);
        exec.log_stderr(&many, false, now);
        assert_eq!(exec.stderr_window.1, STDERR_LINES_PER_SECOND);
        assert_eq!(exec.stderr_window.2, u64::from(STDERR_LINES_PER_SECOND) + 1);
        exec.log_stderr(b"later\n", false, now + Duration::from_secs(1));
        assert_eq!(exec.stderr_window, (now + Duration::from_secs(1), 1, 0), "count logged");
    }
}
