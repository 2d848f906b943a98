//! The exec session: one connection whose program the spawner runs, as the worker sees it.
//!
//! Runs in workers. The session asks the spawner over the worker's link (one message with
//! the client socket and one end of a fresh reply channel, see `wire.rs`), then waits on the
//! reply channel, in the worker's readiness loop, for the child's start and its end. It
//! never signals the child itself (it could not: the child runs as another user); it asks
//! the spawner, through the reply channel, and closing that channel ends the child. The
//! worker does no I/O on the client socket while the child runs; afterwards only with
//! `MSG_DONTWAIT` (the child made the socket blocking).

use std::fmt::Write as _;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use super::wire::{self, EVENT_LEN, Event, MAX_REQUEST, Received, Request};
use super::Exec;
use crate::services::{CloseReason, ConnInfo, Context, Interest, Progress, Ready, Session};

/// Longest stderr line logged; the rest of a longer line is dropped.
pub(super) const MAX_STDERR_LINE: usize = 1024;

/// stderr lines logged per child and second at most; the others are counted, and the count
/// is logged with the next line that may be, or when the child exits.
pub(super) const STDERR_LINES_PER_SECOND: u32 = 20;

/// A child's life as the session sees it.
enum State {
    /// Asked; the reply channel is not watched yet (that needs a callback).
    Asked { reply: OwnedFd },
    /// Waiting on the reply channel for the child's start, then its end; `stderr` once the
    /// spawner has sent it.
    Running { reply: OwnedFd, stderr: Option<OwnedFd> },
    /// Reaped by the spawner.
    Exited,
    /// Could not be started (why).
    Failed(String),
    /// Placeholder while moving between states.
    Moving,
}

pub(super) struct ExecSession {
    state: State,
    started: Instant,
    max_lifetime: Option<Duration>,
    kill_grace: Duration,
    /// The program, for messages.
    program: std::path::PathBuf,
    /// The child's pid, once the spawner said; 0 before.
    pid: i32,
    /// A stderr line not ended yet (at most [`MAX_STDERR_LINE`] bytes kept).
    stderr_line: Vec<u8>,
    /// Rate limit of logged stderr lines: (window start, lines in it, lines held back).
    stderr_window: (Instant, u32, u64),
    /// stderr lines not logged in all (rate limit), for the access line.
    stderr_dropped: u64,
    /// The signal `max_lifetime` sent last, if any.
    killed: Option<Signal>,
    status: Option<WaitStatus>,
}

impl ExecSession {
    /// Sends the spawner the request for `conn`: the session waits for the answer.
    pub(super) fn start(exec: &Exec, link: Option<&OwnedFd>, conn: &ConnInfo<'_>) -> ExecSession {
        let started = Instant::now();
        let state = match ask(link, conn) {
            Ok(reply) => State::Asked { reply },
            Err(error) => State::Failed(format!("{}: {error}", exec.program.path.display())),
        };
        ExecSession {
            state,
            started,
            max_lifetime: exec.max_lifetime,
            kill_grace: exec.kill_grace,
            program: exec.program.path.clone(),
            pid: 0,
            stderr_line: Vec::new(),
            stderr_window: (started, 0, 0),
            stderr_dropped: 0,
            killed: None,
            status: None,
        }
    }

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
                self.stderr_dropped += 1;
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

    /// Logs how many stderr lines were held back since the last logged one, if any: when
    /// the child's stderr ends, no later line carries the count.
    fn log_held_stderr(&mut self) {
        let held = std::mem::take(&mut self.stderr_window.2);
        if held > 0 {
            log::warn!("exec pid={}: {held} stderr lines not logged (rate limit)", self.pid);
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

    /// The reply channel is readable: the child started, failed, or was reaped (or the
    /// spawner is gone).
    fn on_reply(&mut self, cx: &mut Context<'_>) -> io::Result<Progress> {
        let State::Running { reply, .. } = &self.state else { return Ok(Progress::default()) };
        let mut buffers = [[0u8; EVENT_LEN]; 2];
        let mut received = [Received::default(), Received::default()];
        let count = match wire::receive(reply.as_fd(), &mut buffers, &mut received) {
            Ok(count) => count,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(Progress::default()),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => return Ok(Progress::default()),
            Err(error) => return self.lost(cx, &error.to_string()),
        };
        for (bytes, message) in buffers.iter().zip(received.iter_mut()).take(count) {
            if message.len == 0 {
                return self.lost(cx, "the spawner closed the reply channel");
            }
            match Event::decode(&bytes[..message.len.min(EVENT_LEN)]) {
                Some(Event::Started(pid)) => {
                    self.pid = pid;
                    if let Some(pipe) = message.fds[0].take() {
                        if let Err(error) = cx.watch(pipe.as_fd(), Interest::READ) {
                            log::warn!("exec pid={pid}: its stderr is not logged: {error}");
                        } else if let State::Running { stderr, .. } = &mut self.state {
                            *stderr = Some(pipe);
                        }
                    }
                }
                Some(Event::Failed(errno)) => {
                    let error = io::Error::from_raw_os_error(errno);
                    return Ok(self.fail(cx, format!("{}: {error}", self.program.display())));
                }
                Some(Event::Exited(pid, raw)) => {
                    self.pid = pid;
                    return self.exited(cx, raw);
                }
                Some(Event::Signal(_)) | None => {
                    return self.lost(cx, "a malformed message on the reply channel");
                }
            }
        }
        Ok(Progress::default())
    }

    /// The child could not be started: the connection closes.
    fn fail(&mut self, cx: &mut Context<'_>, why: String) -> Progress {
        self.unwatch_all(cx);
        log::error!("exec: cannot start {why}");
        self.state = State::Failed(why);
        cx.close(CloseReason::Service("exec-failed"));
        Progress::default()
    }

    /// The spawner is gone before the child's end was known: the connection closes.
    fn lost(&mut self, cx: &mut Context<'_>, why: &str) -> io::Result<Progress> {
        self.unwatch_all(cx);
        log::error!("exec {}: {why}; the child's end is not known", self.program.display());
        self.state = State::Failed(why.to_owned());
        cx.close(CloseReason::Service("spawner-lost"));
        Ok(Progress::default())
    }

    fn unwatch_all(&mut self, cx: &mut Context<'_>) {
        if let State::Running { reply, stderr } = &self.state {
            cx.unwatch(reply.as_fd());
            if let Some(pipe) = stderr {
                cx.unwatch(pipe.as_fd());
            }
        }
    }

    /// The child was reaped: log the rest of its stderr, stop counting the connection, end
    /// it.
    fn exited(&mut self, cx: &mut Context<'_>, raw: i32) -> io::Result<Progress> {
        self.status = WaitStatus::from_raw(Pid::from_raw(self.pid), raw).ok();
        self.unwatch_all(cx);
        if let State::Running { stderr: Some(pipe), .. } =
            std::mem::replace(&mut self.state, State::Exited)
        {
            self.read_stderr(&pipe, cx.now());
        }
        self.log_held_stderr();
        // xinetd counts running servers: the slot (`max_instances`) and the per-client count
        // are free from now on, while the loop waits for the client's FIN.
        cx.uncount();
        // FIN now, even if a process the child left in the background still holds the
        // socket (a close would then send nothing). The socket stays in blocking mode: the
        // loop's lingering close reads it with MSG_DONTWAIT, and no session runs on it.
        cx.shutdown_write();
        cx.close(CloseReason::Service("child-exit"));
        Ok(Progress::default())
    }

    /// Asks the spawner to send `signal` to the child's process group.
    fn signal(&mut self, signal: Signal) {
        if let State::Running { reply, .. } = &self.state {
            if let Err(error) = wire::send(reply.as_fd(), &Event::Signal(signal as i32).encode(), &[]) {
                log::warn!("exec pid={}: could not ask for {signal}: {error}", self.pid);
            }
            if signal == Signal::SIGTERM || signal == Signal::SIGKILL {
                self.killed = Some(signal);
            }
        }
    }
}

/// Sends the request for `conn` on `link`; the worker's end of the reply channel.
fn ask(link: Option<&OwnedFd>, conn: &ConnInfo<'_>) -> io::Result<OwnedFd> {
    let link = link.ok_or_else(|| io::Error::other("this worker has no exec spawner"))?;
    // Over TLS, what the handshake settled, for the child's environment.
    let tls: Vec<u8> = conn
        .tls
        .map(|info| {
            info.environment()
                .into_iter()
                .flat_map(|(name, value)| format!("{name}={value}\0").into_bytes())
                .collect()
        })
        .unwrap_or_default();
    let request =
        Request { listener: conn.listener, peer: conn.peer, local: conn.bound, tls: &tls };
    let mut bytes = [0u8; MAX_REQUEST];
    let len = request
        .encode(&mut bytes)
        .ok_or_else(|| io::Error::other("the listener's name is too long for the spawner"))?;
    let (ours, theirs) = wire::seqpacket_pair(true)?;
    let fds = [conn.socket.as_raw_fd(), theirs.as_raw_fd()];
    match wire::send(link.as_fd(), &bytes[..len], &fds) {
        Ok(()) => Ok(ours),
        Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
            Err(io::Error::other("the exec spawner is busy (its queue is full)"))
        }
        Err(error) => Err(io::Error::other(format!("the exec spawner is gone: {error}"))),
    }
}

impl Session for ExecSession {
    fn interest(&self) -> Interest {
        match self.state {
            // One callback to watch the reply channel (or report the failure).
            State::Asked { .. } | State::Failed(_) => Interest::WRITE,
            _ => Interest::NONE,
        }
    }

    fn on_readable(&mut self, _cx: &mut Context<'_>) -> io::Result<Progress> {
        Ok(Progress::default())
    }

    fn on_writable(&mut self, cx: &mut Context<'_>) -> io::Result<Progress> {
        match std::mem::replace(&mut self.state, State::Moving) {
            State::Asked { reply } => {
                if let Err(error) = cx.watch(reply.as_fd(), Interest::READ) {
                    // Dropping the channel ends the child.
                    return Ok(self.fail(cx, format!("cannot wait for the spawner: {error}")));
                }
                self.state = State::Running { reply, stderr: None };
                if let Some(lifetime) = self.max_lifetime {
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
        let (is_reply, is_stderr) = match &self.state {
            State::Running { reply, stderr } => (
                fd == reply.as_raw_fd(),
                stderr.as_ref().is_some_and(|pipe| pipe.as_raw_fd() == fd),
            ),
            _ => return Ok(Progress::default()),
        };
        if is_reply && ready.readable {
            return self.on_reply(cx);
        }
        if is_stderr
            && let State::Running { stderr, .. } = &mut self.state
            && let Some(pipe) = stderr.take()
        {
            if self.read_stderr(&pipe, cx.now()) {
                cx.unwatch(pipe.as_fd());
                self.log_held_stderr();
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
        match self.pid {
            0 => log::info!("exec {}: max_lifetime reached, sending {next}", self.program.display()),
            pid => log::info!("exec pid={pid}: max_lifetime reached, sending {next}"),
        }
        self.signal(next);
        if next == Signal::SIGTERM {
            cx.set_timer(Some(cx.now() + self.kill_grace));
        }
        Ok(Progress::default())
    }

    fn is_at_rest(&self) -> bool {
        // A running child owns the conversation: a graceful stop waits for it.
        !matches!(self.state, State::Asked { .. } | State::Running { .. })
    }

    fn is_done(&self) -> bool {
        false
    }

    fn idle_timeouts(&self) -> bool {
        !matches!(self.state, State::Asked { .. } | State::Running { .. })
    }

    fn process(&self) -> Option<u32> {
        let running = matches!(self.state, State::Running { .. });
        u32::try_from(self.pid).ok().filter(|&pid| running && pid != 0)
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
            None if matches!(self.state, State::Failed(_)) => {}
            None => line.push_str(" status=running"),
        }
        if let Some(signal) = self.killed {
            let _ = write!(line, " max_lifetime={signal}");
        }
        if self.stderr_dropped > 0 {
            let _ = write!(line, " stderr_dropped={}", self.stderr_dropped);
        }
    }
}

// Dropping the session closes the reply channel: the spawner then kills the child's process
// group if it still runs (the connection ended first: fast stop, an error).

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> ExecSession {
        let now = Instant::now();
        ExecSession {
            state: State::Exited,
            started: now,
            max_lifetime: None,
            kill_grace: super::super::DEFAULT_KILL_GRACE,
            program: "/bin/true".into(),
            pid: 42,
            stderr_line: Vec::new(),
            stderr_window: (now, 0, 0),
            stderr_dropped: 0,
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
        exec.stderr_dropped = 7;
        let mut line = String::new();
        exec.describe(&mut line);
        assert_eq!(line, " child=42 status=signal:SIGKILL max_lifetime=SIGKILL stderr_dropped=7");
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
        assert_eq!(exec.stderr_dropped, u64::from(STDERR_LINES_PER_SECOND) + 1, "and kept");
        exec.log_stderr(&many, false, now + Duration::from_secs(1));
        exec.log_held_stderr();
        assert_eq!(exec.stderr_window.2, 0, "the held count is logged when stderr ends");
    }
}
