//! The exec spawner: the process that starts `exec` programs, as their configured users.
//!
//! Runs in its own process, forked by the master for each generation whose configuration
//! has exec listeners (at start, at each reload, and again if it dies), before anything of
//! the master is dropped; [`run`] never returns into the master's code. A generation has
//! [`count`] of them, min(workers, CPUs), alike but for their children: each serves every
//! worker link of the generation, and whichever is free reads a link's next request, so
//! that spawns run in parallel (each spawn blocks its spawner until the child's execve:
//! `CLONE_VFORK`, see [`crate::sys::spawn`]) whichever workers the clients reach. The
//! spawners are the only processes besides the master that may switch users, and each
//! holds no more than that takes:
//! - as root, it keeps `CAP_SETUID`, `CAP_SETGID` and `CAP_KILL` (its children run as other
//!   users) and, only when a listener needs them, `CAP_SYS_NICE` (a `nice` below its own, as a negative one is for a daemon at 0) and
//!   `CAP_SYS_RESOURCE` (a limit above its own hard limit); every other capability is
//!   dropped for good (capset(2)). It keeps uid 0, so no child, and no worker, can signal or
//!   trace it. `PR_SET_NO_NEW_PRIVS` is *not* set: it would pass to the children, where a
//!   set-user-ID program (su, sendmail ...) must work as it does anywhere else;
//! - it listens only to the links of its generation's workers (one `SOCK_STREAM` pair per
//!   worker, made by the master, whose spawner end each spawner of the generation holds and
//!   watches with `EPOLLEXCLUSIVE`, so that a request wakes one idle spawner, not all; one
//!   recvmsg(2) takes one whole request, whoever calls it) and to the master. A worker's
//!   request names a listener of
//!   the generation, never a path or an argument, and comes with the client socket and a
//!   reply channel (see [`crate::services::wire`]); the spawner starts that listener's
//!   program and nothing else, answers on the reply channel, reaps the child (the spawner
//!   that started it is its parent; SIGCHLD through a signalfd(2)) and reports its wait
//!   status there;
//! - a closed reply channel (the connection ended first, or its worker died) kills the
//!   child's process group; a `Signal` message on it (`max_lifetime`) signals that group.
//!
//! Invariants: it blocks only in epoll_wait(2); out of descriptors, it refuses the request
//! whose descriptors did not all arrive and goes on, and a worker's link always finds a
//! place (a spare descriptor is closed just before one is read); it dies with the master
//! (`PR_SET_PDEATHSIG`, SIGKILL), its children keep running until they end on their own; it
//! exits by itself once the master has closed its control link and every worker link and
//! child is gone (a retired generation). When the master is not root, nothing can switch
//! users: the spawner runs as the master's user, and so do the children (`check` and startup
//! warn).

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::libc;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, killpg, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::unistd::{Pid, getppid};

use crate::config::Config;
use crate::limits::access::AccessList;
use crate::logging;
use crate::net::Address;
use crate::rate::RateLimit;
use crate::services::wire::{self, EVENT_LEN, Event, MAX_REQUEST, Request};
use crate::services::{Program, StderrTo};
use crate::sys::capability;

/// What the master gives the spawner at fork.
pub struct SpawnerContext {
    /// The generation whose programs it starts.
    pub generation: u64,
    /// That generation's configuration.
    pub config: Config,
    /// The master's end: it sends each new worker link of the generation here (a 4-byte
    /// slot number with the link); it closes it when the generation retires.
    pub control: OwnedFd,
    /// The links of the generation's workers already running: (slot, spawner's end), the
    /// same links as the generation's other spawners hold.
    pub links: Vec<(usize, OwnedFd)>,
    /// The master, to detect being orphaned.
    pub master: Pid,
}

/// Exit status of a spawner that could not set itself up.
pub const SPAWNER_BOOT_FAILURE: i32 = 3;

/// How many spawners a generation of `workers` workers gets on a machine where this process
/// may run on `cpus` CPUs (std::thread::available_parallelism): one per worker, at most one
/// per CPU, at least one. More would only take turns on the CPUs; fewer would make the
/// workers' spawns wait for each other (each blocks its spawner until the child's execve).
/// Workers added later (SIGTTIN) share the generation's spawners.
pub fn count(workers: usize, cpus: usize) -> usize {
    workers.min(cpus).max(1)
}

/// The capabilities the spawner keeps for `programs` (see the module doc).
pub fn capabilities_for<'a>(programs: impl Iterator<Item = &'a Program>) -> Vec<u32> {
    let mut keep = vec![capability::SETUID, capability::SETGID, capability::KILL];
    // Lowering the nice value takes CAP_SYS_NICE (setpriority(2)): below this process's own,
    // not only below 0 (a daemon started under nice(1) runs above 0).
    let own = crate::sys::nice();
    for program in programs {
        let process = &program.process;
        if process.nice.is_some_and(|n| n < own) && !keep.contains(&capability::SYS_NICE) {
            keep.push(capability::SYS_NICE);
        }
        let above_hard = process.rlimits.iter().any(|&(resource, value)| {
            let mut current = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            // SAFETY: getrlimit writes one rlimit into `current`.
            let rc = unsafe { libc::getrlimit(resource as _, &raw mut current) };
            rc == 0 && value > current.rlim_max
        });
        if above_hard && !keep.contains(&capability::SYS_RESOURCE) {
            keep.push(capability::SYS_RESOURCE);
        }
    }
    keep
}

/// Runs the spawner until its generation is gone; returns its exit status.
pub fn run(context: SpawnerContext) -> i32 {
    logging::set_spawner(context.generation);
    match Spawner::boot(context) {
        Ok(mut spawner) => spawner.serve(),
        Err(error) => {
            log::error!("exec spawner failed to boot: {error}");
            SPAWNER_BOOT_FAILURE
        }
    }
}

/// A child the spawner started and has not reaped.
struct Child {
    /// The reply channel; `None` once its worker closed it (the child was killed).
    reply: Option<OwnedFd>,
}

struct Spawner {
    generation: u64,
    /// The programs by listener name.
    /// The programs by listener name, with the listener's access list (whose `allow` rules
    /// may give a client's program variables of their own).
    programs: HashMap<String, (Program, AccessList)>,
    epoll: Epoll,
    control: Option<OwnedFd>,
    signals: SignalFd,
    /// Worker links by descriptor: (slot, link).
    links: HashMap<RawFd, (usize, OwnedFd)>,
    /// Running children by pid.
    children: HashMap<i32, Child>,
    /// The pid of each child by its reply channel's descriptor.
    replies: HashMap<RawFd, i32>,
    /// A descriptor held in reserve (a duplicate of `epoll`), closed just before a worker
    /// link is read from the master so that the link always finds a place, however many the
    /// children take: a link the kernel cannot install is closed, and that worker's requests
    /// would wait for nobody. `None` while it cannot be opened again (out of descriptors);
    /// the control link is then not read until it can be.
    spare: Option<OwnedFd>,
    /// Requests answered `EMFILE` because their descriptors did not all arrive, and when
    /// to say so next.
    dropped_log: RateLimit,
}

fn watch(epoll: &Epoll, fd: BorrowedFd<'_>) -> io::Result<()> {
    let event = EpollEvent::new(EpollFlags::EPOLLIN, fd.as_raw_fd() as u64);
    epoll.add(fd, event).map_err(io::Error::from)
}

/// Watches a worker link, which the generation's other spawners watch too: a request wakes
/// one of those waiting in epoll_wait(2) (`EPOLLEXCLUSIVE`; a busy one still finds the link
/// ready at its next wait, level-triggered).
fn watch_link(epoll: &Epoll, fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLEXCLUSIVE;
    let event = EpollEvent::new(flags, fd.as_raw_fd() as u64);
    epoll.add(fd, event).map_err(io::Error::from)
}

impl Spawner {
    fn boot(context: SpawnerContext) -> io::Result<Spawner> {
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
        // A group of its own: a terminal's ^C, or timeout(1), signals the master's group; the
        // master decides when the spawner ends.
        nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0))?;
        if getppid() != context.master {
            return Err(io::Error::other("the master exited while the spawner started"));
        }
        // The master's handlers are its own: every signal back to its default (SIGPIPE stays
        // ignored: a write to a closed channel must not kill the spawner); SIGCHLD is read
        // from a signalfd, so it stays blocked; nothing else is blocked.
        for signal in Signal::iterator() {
            if matches!(signal, Signal::SIGKILL | Signal::SIGSTOP | Signal::SIGPIPE) {
                continue;
            }
            let default = nix::sys::signal::SigAction::new(
                nix::sys::signal::SigHandler::SigDfl,
                nix::sys::signal::SaFlags::empty(),
                SigSet::empty(),
            );
            // SAFETY: SIG_DFL installs no handler of ours.
            let _ = unsafe { nix::sys::signal::sigaction(signal, &default) };
        }
        let mut child_signal = SigSet::empty();
        child_signal.add(Signal::SIGCHLD);
        sigprocmask(SigmaskHow::SIG_SETMASK, Some(&child_signal), None)?;
        let signals =
            SignalFd::with_flags(&child_signal, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
        let programs: HashMap<String, (Program, AccessList)> = context
            .config
            .listeners
            .iter()
            .filter_map(|l| {
                let program = l.service.service.program()?.clone();
                Some((l.name.clone(), (program, l.admission.access.clone())))
            })
            .collect();
        let root = nix::unistd::geteuid().is_root();
        if root {
            let mut keep = capabilities_for(programs.values().map(|(program, _)| program));
            if crate::sys::keep_only_capabilities(&keep).is_err() {
                // Not all of them are permitted here (a systemd unit's CapabilityBoundingSet):
                // the programs that need the others fail to start, each with its reason.
                let optional = [capability::SYS_NICE, capability::SYS_RESOURCE];
                let missing: Vec<u32> =
                    keep.iter().copied().filter(|c| optional.contains(c)).collect();
                keep.retain(|c| !optional.contains(c));
                log::warn!(
                    "exec spawner: {} not permitted: a nice value below the spawner's own or a limit above the hard limit will fail",
                    capability_names(&missing)
                );
                crate::sys::keep_only_capabilities(&keep)
                    .map_err(|e| io::Error::other(format!("dropping capabilities: {e}")))?;
            }
            log::info!(
                "exec spawner started: {} program(s), capabilities kept: {}",
                programs.len(),
                capability_names(&keep)
            );
        } else {
            log::info!(
                "exec spawner started: {} program(s); not root, so the programs run as uid {}",
                programs.len(),
                nix::unistd::geteuid()
            );
        }
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        watch(&epoll, signals.as_fd())?;
        watch(&epoll, context.control.as_fd())?;
        let mut links = HashMap::new();
        for (slot, link) in context.links {
            watch_link(&epoll, link.as_fd())?;
            links.insert(link.as_raw_fd(), (slot, link));
        }
        let spare = epoll.0.try_clone()?;
        Ok(Spawner {
            generation: context.generation,
            programs,
            epoll,
            control: Some(context.control),
            signals,
            links,
            children: HashMap::new(),
            replies: HashMap::new(),
            spare: Some(spare),
            dropped_log: RateLimit::new(DROPPED_LOG_INTERVAL),
        })
    }

    fn serve(&mut self) -> i32 {
        let mut events = vec![EpollEvent::empty(); 64];
        loop {
            if self.control.is_none() && self.links.is_empty() && self.children.is_empty() {
                log::debug!("exec spawner of generation {} done", self.generation);
                return 0;
            }
            if self.spare.is_none() {
                // Descriptors were freed meanwhile, perhaps: read the master again.
                self.spare = self.epoll.0.try_clone().ok();
                if self.spare.is_some()
                    && let Some(control) = &self.control
                    && let Err(error) = watch(&self.epoll, control.as_fd())
                {
                    log::error!("exec spawner: cannot watch the link to the master: {error}");
                }
            }
            let count = match self.epoll.wait(&mut events, EpollTimeout::NONE) {
                Ok(count) => count,
                Err(Errno::EINTR) => continue,
                Err(error) => {
                    log::error!("exec spawner: epoll_wait failed: {error}");
                    return SPAWNER_BOOT_FAILURE;
                }
            };
            for event in &events[..count] {
                let fd = event.data() as RawFd;
                if fd == self.signals.as_raw_fd() {
                    self.reap();
                } else if self.control.as_ref().is_some_and(|c| c.as_raw_fd() == fd) {
                    self.on_control();
                } else if self.links.contains_key(&fd) {
                    self.on_link(fd);
                } else if let Some(&pid) = self.replies.get(&fd) {
                    self.on_reply(fd, pid);
                }
            }
        }
    }

    /// A new worker link from the master, or the end of the control link.
    fn on_control(&mut self) {
        let Some(control) = &self.control else { return };
        // The spare's place, for the link (the control link is watched only with a spare).
        self.spare = None;
        let mut slot = [0u8; 4];
        let received = wire::receive_one(control.as_fd(), &mut slot);
        self.spare = self.epoll.0.try_clone().ok();
        if self.spare.is_none() {
            // Out of descriptors: the next link waits in the control link until one is free.
            let _ = self.epoll.delete(control);
        }
        match received {
            Ok(received) if received.len == 0 => {
                // The generation retired: no worker will come; finish what runs.
                if let Some(control) = self.control.take() {
                    let _ = self.epoll.delete(&control);
                }
            }
            Ok(mut received) => {
                let slot = u32::from_le_bytes(slot) as usize;
                if received.truncated {
                    log::error!(
                        "exec spawner: the link of worker {slot} was lost (out of descriptors): its programs cannot start until this spawner is replaced"
                    );
                }
                if let Some(link) = received.fds[0].take() {
                    if let Err(error) = watch_link(&self.epoll, link.as_fd()) {
                        log::error!(
                            "exec spawner: cannot watch the link of worker {slot}: {error}"
                        );
                        return;
                    }
                    self.links.insert(link.as_raw_fd(), (slot, link));
                }
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => log::error!("exec spawner: reading from the master: {error}"),
        }
    }

    /// Requests waiting on a worker link (at most a batch, to be fair to the others).
    fn on_link(&mut self, fd: RawFd) {
        for _ in 0..32 {
            let Some((slot, link)) = self.links.get(&fd) else { return };
            let slot = *slot;
            let mut bytes = [0u8; MAX_REQUEST];
            let received = match wire::receive_one(link.as_fd(), &mut bytes) {
                Ok(received) => received,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    log::debug!("exec spawner: link of worker {slot}: {error}");
                    self.drop_link(fd);
                    return;
                }
            };
            if received.len == 0 {
                // The worker is gone.
                self.drop_link(fd);
                return;
            }
            if received.truncated {
                // Out of descriptors here: this request cannot be served, the next ones may.
                self.refuse_truncated(slot, received);
                continue;
            }
            if !self.start(slot, &bytes[..received.len], received) {
                // Its framing is lost: nothing more from it can be trusted.
                log::warn!(
                    "exec spawner: worker {slot} sent a malformed request; dropping its link"
                );
                self.drop_link(fd);
                return;
            }
        }
    }

    /// A request whose descriptors did not all arrive (this process is out of them): its
    /// worker hears `EMFILE` on the reply channel if that came, else sees the channel close
    /// (the kernel closed the spawner's end); either way the connection ends there, and
    /// the link goes on.
    fn refuse_truncated(&mut self, slot: usize, received: wire::Received) {
        let [client, reply] = received.fds;
        drop(client);
        if let Some(reply) = reply {
            let _ = wire::send(reply.as_fd(), &Event::Failed(libc::EMFILE).encode(), &[]);
        }
        if let Some(held_back) = self.dropped_log.allow(std::time::Instant::now()) {
            log::warn!(
                "exec spawner: out of descriptors: a request of worker {slot} is refused ({held_back} similar not logged)"
            );
        }
    }

    fn drop_link(&mut self, fd: RawFd) {
        if let Some((_, link)) = self.links.remove(&fd) {
            let _ = self.epoll.delete(&link);
        }
    }

    /// One request: start the listener's program, answer on the reply channel. False when
    /// the request is malformed.
    fn start(&mut self, slot: usize, bytes: &[u8], received: wire::Received) -> bool {
        let [Some(client), Some(reply)] = received.fds else { return false };
        let Some(request) = Request::decode(bytes) else { return false };
        let answer = |event: Event, fds: &[RawFd]| wire::send(reply.as_fd(), &event.encode(), fds);
        let Some((program, access)) = self.programs.get(request.listener) else {
            log::warn!(
                "exec spawner: worker {slot} asked for listener {:?}, which starts no program in generation {}",
                request.listener,
                self.generation
            );
            let _ = answer(Event::Failed(libc::EPERM), &[]);
            return true;
        };
        // Known to the worker for a listener on one IP address; else asked of the socket
        // (a wildcard address, a Unix socket's path).
        let local = match request.local {
            Some(local) => Some(Address::Ip(local)),
            None => socket2::SockRef::from(&client)
                .local_addr()
                .ok()
                .and_then(|a| Address::from_sockaddr(&a)),
        };
        let pipe = match program.stderr {
            StderrTo::Discard => Ok(None),
            StderrTo::Log => stderr_pipe().map(Some),
        };
        let spawned = match pipe {
            Ok(pipe) => {
                let write_end = pipe.as_ref().map(|(_, write)| write.as_fd());
                // The variables the client's `allow` rule gives, from this process's own
                // configuration: a worker names only the listener and the client.
                // A Unix client is named by no access list.
                let rule_env = request.peer.ip().map_or(&[][..], |ip| access.env_for(ip));
                // Over TLS, what the worker's handshake settled (SSL_* names only, checked).
                let Some(mut env) = request.tls_env() else { return false };
                env.extend(rule_env.iter().cloned());
                program
                    .spawn(client.as_fd(), request.peer, local.as_ref(), write_end, &env)
                    .map(|pid| (pid, pipe))
                    .map_err(|error| {
                        if error.step.is_some() {
                            // The worker logs the errno; which step failed is said here.
                            log::warn!("exec: cannot start {}: {error}", program.path.display());
                        }
                        error.error
                    })
            }
            Err(error) => Err(error),
        };
        drop(client);
        let (pid, pipe) = match spawned {
            Ok(spawned) => spawned,
            Err(error) => {
                let errno = error.raw_os_error().unwrap_or(libc::EIO);
                let _ = answer(Event::Failed(errno), &[]);
                return true;
            }
        };
        let pid = pid.as_raw();
        // Started only with the stderr pipe: the worker needs nothing else before the end.
        let told = match pipe {
            Some((read, _write)) => answer(Event::Started(pid), &[read.as_raw_fd()]).is_ok(),
            None => true,
        };
        if !told || watch(&self.epoll, reply.as_fd()).is_err() {
            // The worker gave up on it already.
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            self.children.insert(pid, Child { reply: None });
            return true;
        }
        self.replies.insert(reply.as_raw_fd(), pid);
        self.children.insert(pid, Child { reply: Some(reply) });
        true
    }

    /// A worker's message on a reply channel, or its end.
    fn on_reply(&mut self, fd: RawFd, pid: i32) {
        let Some(Child { reply: Some(reply) }) = self.children.get(&pid) else { return };
        loop {
            let mut bytes = [0u8; EVENT_LEN];
            match wire::receive_one(reply.as_fd(), &mut bytes) {
                Ok(received) if received.len == 0 => break,
                Ok(_) => match Event::decode(&bytes) {
                    Some(Event::Signal(number))
                        if number == Signal::SIGTERM as i32 || number == Signal::SIGKILL as i32 =>
                    {
                        let signal = Signal::try_from(number).expect("TERM or KILL");
                        let _ = killpg(Pid::from_raw(pid), signal);
                    }
                    _ => log::warn!("exec spawner: child {pid}: an unexpected message"),
                },
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        // The connection ended before the child: end it (and what it started in its group).
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        self.replies.remove(&fd);
        if let Some(child) = self.children.get_mut(&pid)
            && let Some(reply) = child.reply.take()
        {
            let _ = self.epoll.delete(&reply);
        }
    }

    /// Reaps every child that exited and reports it on its reply channel.
    fn reap(&mut self) {
        while let Ok(Some(_)) = self.signals.read_signal() {}
        loop {
            let mut status = 0;
            // SAFETY: waitpid writes the status into `status`.
            let pid = unsafe { libc::waitpid(-1, &raw mut status, libc::WNOHANG) };
            if pid <= 0 {
                return;
            }
            let Some(child) = self.children.remove(&pid) else { continue };
            if let Some(reply) = child.reply {
                self.replies.remove(&reply.as_raw_fd());
                let _ = self.epoll.delete(&reply);
                let _ = wire::send(reply.as_fd(), &Event::Exited(pid, status).encode(), &[]);
            }
        }
    }
}

/// Least interval between two logs of requests refused for want of descriptors.
const DROPPED_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// The child's stderr pipe: the write end blocks (as a program expects), the read end does
/// not (the worker reads it in its loop). Both close-on-exec.
fn stderr_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    fcntl(&read, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
    Ok((read, write))
}

fn capability_names(keep: &[u32]) -> String {
    keep.iter()
        .map(|&cap| match cap {
            capability::KILL => "CAP_KILL",
            capability::SETGID => "CAP_SETGID",
            capability::SETUID => "CAP_SETUID",
            capability::SYS_NICE => "CAP_SYS_NICE",
            capability::SYS_RESOURCE => "CAP_SYS_RESOURCE",
            _ => "?",
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a configuration's exec listeners mean for this machine, said by `check` and at
/// start and reload: `errors` make startup and a reload fail, `warnings` are logged.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Findings {
    /// Children that would run as the workers' user (or as root): they could signal and
    /// trace the workers.
    pub errors: Vec<String>,
    /// A master that is not root (the children run as its user), programs or their
    /// directories writable by the workers' or the children's user.
    pub warnings: Vec<String>,
}

/// Looks at `config`'s exec listeners for a master whose effective user is `euid`.
pub fn findings(config: &Config, euid: nix::unistd::Uid) -> Findings {
    use crate::privileges::Credentials;
    let mut found = Findings::default();
    let programs: Vec<(usize, &Program)> = config
        .listeners
        .iter()
        .enumerate()
        .filter_map(|(i, l)| l.service.service.program().map(|p| (i, p)))
        .collect();
    if programs.is_empty() {
        return found;
    }
    // The workers' ids: daemon.user when root (unresolvable: reported elsewhere), root
    // itself with allow_root_workers, else this process's.
    let workers: Option<(u32, u32, Vec<u32>)> = if euid.is_root() {
        match &config.daemon.user {
            Some(user) => {
                Credentials::resolve(user, config.daemon.group.as_deref()).ok().map(|c| {
                    let name = std::ffi::CString::new(c.user.as_bytes()).unwrap_or_default();
                    let groups = nix::unistd::getgrouplist(&name, c.gid)
                        .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
                        .unwrap_or_default();
                    (c.uid.as_raw(), c.gid.as_raw(), groups)
                })
            }
            None => Some((0, 0, Vec::new())),
        }
    } else {
        found.warnings.push(format!(
            "the master does not run as root: exec children run as its user (uid {euid}), as the workers do, and can signal or trace the workers; run the master as root to give them a user of their own"
        ));
        let gid = nix::unistd::getegid().as_raw();
        Some((euid.as_raw(), gid, Vec::new()))
    };
    for (index, program) in programs {
        let key = format!("listener[{index}].options");
        let children = program.ids().map(|ids| (ids.uid, ids.gid, ids.groups.clone()));
        if let (Some(ids), Some(workers)) = (&children, &workers)
            && (ids.0 == workers.0 || ids.0 == 0)
        {
            let whose = if ids.0 == 0 { "root" } else { "the workers' user" };
            found.errors.push(format!(
                "{key}.user: exec children would run as {whose} (uid {}) and could signal or trace the workers: set user to a user of their own (default {:?})",
                ids.0,
                crate::services::DEFAULT_USER
            ));
        }
        let mut paths = vec![program.path.clone()];
        if let Ok(real) = std::fs::canonicalize(&program.path) {
            paths.push(real);
        }
        let parents: Vec<_> =
            paths.iter().filter_map(|p| p.parent().map(ToOwned::to_owned)).collect();
        paths.extend(parents);
        paths.dedup();
        for (who, ids) in
            [("the workers'", workers.as_ref()), ("the children's", children.as_ref())]
        {
            let Some((uid, gid, groups)) = ids else { continue };
            if *uid == 0 {
                continue;
            }
            for path in &paths {
                if writable_by(path, *uid, *gid, groups) {
                    found.warnings.push(format!(
                        "{key}.program: {} is writable by uid {uid} ({who} user), which could then run its own code as the exec children",
                        path.display()
                    ));
                }
            }
        }
    }
    found.warnings.dedup();
    found
}

/// Whether the mode bits of `path` let `uid` (with `gid` and `groups`) write it (ACLs are
/// not read).
fn writable_by(path: &std::path::Path, uid: u32, gid: u32, groups: &[u32]) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else { return false };
    let mode = meta.mode();
    if meta.uid() == uid {
        return mode & 0o200 != 0;
    }
    if meta.gid() == gid || groups.contains(&meta.gid()) {
        return mode & 0o020 != 0;
    }
    mode & 0o002 != 0
}

#[cfg(test)]
mod tests {
    use super::count;

    #[test]
    fn a_generation_gets_a_spawner_per_worker_up_to_one_per_cpu() {
        assert_eq!(count(2, 2), 2);
        assert_eq!(count(1, 8), 1, "one worker never waits for another's spawns");
        assert_eq!(count(16, 4), 4, "more would only take turns on the CPUs");
        assert_eq!(count(4, 1), 1);
        assert_eq!(count(0, 0), 1, "at least one");
    }
}
