//! The health checker: the one process that probes the backends and resolves their host
//! names, for every worker of a generation.
//!
//! Runs in its own process, forked by the master for the serving generation when its
//! configuration has an active health check or a backend given by host name (at start, at
//! each reload, and again after a death, with backoff); [`run`] never returns into the
//! master's code. Why a process of its own, and not the master or the workers:
//! - probes made by every worker would be N probes per interval, and N log lines for one
//!   change; here there is one of each;
//! - getaddrinfo(3) blocks (seconds, with a dead DNS server), and the master must never
//!   block; so must a worker. The checker resolves in a thread of its own, so a slow
//!   resolver holds back no probe either;
//! - a checker that crashes costs nothing but fresh verdicts: the master forks another.
//!
//! Invariants: it blocks only in poll(2), whose timeout is the next probe or resolution; it
//! holds no listening socket and no client; it runs as the workers' user; it dies with the
//! master (`PR_SET_PDEATHSIG`). What it learns goes to the backend rows of the scoreboard
//! ([`crate::scoreboard::BackendTable`]), which every worker reads, and it logs each change
//! once: a backend going down (with the reason) or up, a name's addresses changing, a
//! resolution failing (the last good addresses are kept).

mod probe;
mod resolve;

use std::io;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::Signal;
use nix::unistd::{Pid, getppid};

use crate::config::Config;
use crate::logging;
use crate::net::Address;
use crate::privileges::Credentials;
use crate::signals::{self, MASTER_SIGNALS, Signals};
use crate::upstream::{HealthCheck, Target, Upstreams};
use probe::{Change, Probe, Wait};
use resolve::Resolver;

pub use resolve::TEST_HOSTS_ENV;

/// Exit status of a checker that could not set itself up.
pub const CHECKER_BOOT_FAILURE: i32 = 3;

/// What the master gives the checker at fork.
pub struct CheckerContext {
    /// The generation it checks for.
    pub generation: u64,
    /// That generation's configuration, its upstreams placed.
    pub config: Config,
    /// The master, to detect being orphaned.
    pub master: Pid,
    /// The user and group to switch to (`None`: keep the master's).
    pub credentials: Option<Credentials>,
}

/// Whether `config` gives a checker anything to do.
pub fn needed(config: &Config) -> bool {
    upstreams(config).any(|(_, upstreams)| upstreams.needs_checker())
}

fn upstreams(config: &Config) -> impl Iterator<Item = (&str, &Upstreams)> {
    config.listeners.iter().filter_map(|l| Some((l.name.as_str(), l.service.service.upstreams()?)))
}

/// One backend address under an active check.
struct Checked {
    row: usize,
    /// Its listener and backend, for the log.
    listener: String,
    backend: String,
    check: HealthCheck,
    next: Instant,
    probe: Option<(Probe, Address)>,
}

/// One host name to resolve, for the rows of its addresses.
struct Named {
    listener: String,
    backend: String,
    name: String,
    port: u16,
    rows: Vec<usize>,
    interval: Duration,
    next: Instant,
    /// A resolution is under way.
    asked: bool,
    /// The resolution failed last time (logged once per run of failures).
    failing: bool,
}

/// Runs the checker until the master stops it; returns its exit status.
pub fn run(context: CheckerContext, master_signals: &mut Signals) -> i32 {
    logging::set_checker(context.generation);
    master_signals.uninstall();
    match Checker::boot(context) {
        Ok(mut checker) => checker.serve(),
        Err(error) => {
            log::error!("health checker failed to boot: {error}");
            CHECKER_BOOT_FAILURE
        }
    }
}

struct Checker {
    signals: Signals,
    table: crate::scoreboard::BackendTable,
    checked: Vec<Checked>,
    named: Vec<Named>,
    resolver: Option<Resolver>,
}

impl Checker {
    fn boot(context: CheckerContext) -> io::Result<Checker> {
        let signals = Signals::install(&[Signal::SIGTERM, Signal::SIGINT, Signal::SIGQUIT])?;
        signals::unblock(MASTER_SIGNALS)?;
        if let Some(credentials) = &context.credentials {
            credentials.apply().map_err(|e| {
                io::Error::other(format!("switching to user {}: {e}", credentials.user))
            })?;
        }
        // After the switch: changing credentials clears the parent-death signal.
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
        if getppid() != context.master {
            return Err(io::Error::other("the master exited while the checker started"));
        }
        let now = Instant::now();
        let mut table = None;
        let (mut checked, mut named) = (Vec::new(), Vec::new());
        for (listener, upstreams) in upstreams(&context.config) {
            let Some(placed) = upstreams.placed() else { continue };
            table.get_or_insert_with(|| placed.table.clone());
            for (backend, rows) in upstreams.backends.iter().zip(&placed.rows) {
                if let Some(check) = &upstreams.check {
                    for &row in rows {
                        checked.push(Checked {
                            row,
                            listener: listener.to_owned(),
                            backend: backend.written.clone(),
                            check: check.clone(),
                            next: now,
                            probe: None,
                        });
                    }
                }
                if let Target::Host { name, port } = &backend.target {
                    named.push(Named {
                        listener: listener.to_owned(),
                        backend: backend.written.clone(),
                        name: name.clone(),
                        port: *port,
                        rows: rows.clone(),
                        interval: upstreams.resolve_interval,
                        next: now,
                        asked: false,
                        failing: false,
                    });
                }
            }
        }
        let Some(table) = table else {
            return Err(io::Error::other("no backend rows were placed"));
        };
        let resolver = if named.is_empty() { None } else { Some(Resolver::start()?) };
        log::info!(
            "health checker started: {} backend address(es) checked, {} host name(s) resolved",
            checked.len(),
            named.len()
        );
        Ok(Checker { signals, table, checked, named, resolver })
    }

    fn serve(&mut self) -> i32 {
        loop {
            let now = Instant::now();
            self.start_due(now);
            let mut fds = vec![PollFd::new(self.signals.fd(), PollFlags::POLLIN)];
            let mut owners = Vec::new();
            if let Some(resolver) = &self.resolver {
                fds.push(PollFd::new(resolver.fd(), PollFlags::POLLIN));
                owners.push(None);
            }
            for (index, checked) in self.checked.iter().enumerate() {
                if let Some((probe, _)) = &checked.probe {
                    let events = match probe.wait() {
                        Wait::Write => PollFlags::POLLOUT,
                        Wait::Read => PollFlags::POLLIN,
                    };
                    fds.push(PollFd::new(probe.stream().as_fd(), events));
                    owners.push(Some(index));
                }
            }
            let timeout = self.next_deadline().map_or(PollTimeout::NONE, |at| {
                let left = at.saturating_duration_since(Instant::now());
                let millis = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
                PollTimeout::try_from(millis).unwrap_or(PollTimeout::MAX)
            });
            match poll(&mut fds, timeout) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(error) => {
                    log::error!("health checker: poll failed: {error}");
                    return 1;
                }
            }
            let signalled = fds[0].revents().is_some_and(|r| !r.is_empty());
            let ready: Vec<usize> = fds[1..]
                .iter()
                .zip(&owners)
                .filter(|(fd, _)| fd.revents().is_some_and(|r| !r.is_empty()))
                .filter_map(|(_, owner)| *owner)
                .collect();
            let resolved = self.resolver.is_some()
                && fds.get(1).and_then(PollFd::revents).is_some_and(|r| !r.is_empty());
            drop(fds);
            if signalled && !self.signals.drain().is_empty() {
                log::info!("health checker stopping");
                return 0;
            }
            if resolved {
                self.take_resolutions(Instant::now());
            }
            let now = Instant::now();
            for index in ready {
                self.step(index, now);
            }
            // Probes past their deadline.
            for index in 0..self.checked.len() {
                if self.checked[index].probe.as_ref().is_some_and(|(p, _)| now >= p.deadline) {
                    self.step(index, now);
                }
            }
        }
    }

    /// The earliest probe start, probe deadline or resolution due.
    fn next_deadline(&self) -> Option<Instant> {
        let probes = self.checked.iter().map(|c| match &c.probe {
            Some((probe, _)) => probe.deadline,
            None => c.next,
        });
        let names = self.named.iter().filter(|n| !n.asked).map(|n| n.next);
        probes.chain(names).min()
    }

    /// Starts the probes and resolutions due at `now`.
    fn start_due(&mut self, now: Instant) {
        for index in 0..self.checked.len() {
            let checked = &mut self.checked[index];
            if checked.probe.is_some() || now < checked.next {
                continue;
            }
            checked.next = now + checked.check.interval;
            // A host name's slot without an address (yet, or at all): nothing to probe.
            let Some(address) = self.table.row(checked.row).address() else { continue };
            match Probe::start(&address, &checked.check, now) {
                Ok(probe) => checked.probe = Some((probe, address)),
                Err(reason) => self.verdict(index, Err(reason), Duration::ZERO, &address),
            }
        }
        if let Some(resolver) = &self.resolver {
            for (index, named) in self.named.iter_mut().enumerate() {
                if !named.asked && now >= named.next {
                    named.asked = true;
                    resolver.ask(index, &named.name, named.port);
                }
            }
        }
    }

    /// Moves probe `index` on; applies its verdict when it ended.
    fn step(&mut self, index: usize, now: Instant) {
        let checked = &mut self.checked[index];
        let Some((probe, _)) = checked.probe.as_mut() else { return };
        let Some(outcome) = probe.step(&checked.check, now) else { return };
        let took = now.saturating_duration_since(probe.started);
        let Some((_, address)) = checked.probe.take() else { return };
        self.verdict(index, outcome, took, &address);
    }

    fn verdict(
        &mut self,
        index: usize,
        outcome: probe::Outcome,
        took: Duration,
        address: &Address,
    ) {
        let checked = &self.checked[index];
        let row = self.table.row(checked.row);
        // The address moved meanwhile (a resolution): this verdict is about another one.
        if row.address().as_ref() != Some(address) {
            return;
        }
        let (listener, backend) = (&checked.listener, &checked.backend);
        let at =
            if backend == &address.to_string() { String::new() } else { format!(" ({address})") };
        match probe::apply(row, &checked.check, &outcome, took) {
            Some(Change::Up) => {
                log::info!(
                    "backend {backend}{at} of listener {listener} is up: the health check passed"
                )
            }
            Some(Change::Down(reason)) => {
                log::warn!(
                    "backend {backend}{at} of listener {listener} is down: health check failed: {reason}"
                )
            }
            None => {}
        }
    }

    /// Applies the resolutions that came back: new addresses to the rows (logged when the
    /// set changes), the last good ones kept on a failure.
    fn take_resolutions(&mut self, now: Instant) {
        let Some(resolver) = &self.resolver else { return };
        for (index, answer) in resolver.answers() {
            let Some(named) = self.named.get_mut(index) else { continue };
            named.asked = false;
            named.next = now + named.interval;
            let (listener, backend) = (&named.listener, &named.backend);
            let mut addresses = match answer {
                Ok(addresses) if !addresses.is_empty() => addresses,
                Ok(_) | Err(_) => {
                    let why = match answer {
                        Err(error) => error,
                        Ok(_) => "no address".to_owned(),
                    };
                    if !named.failing {
                        log::warn!(
                            "backend {backend} of listener {listener}: resolving {:?} failed: {why}; the last addresses are kept",
                            named.name
                        );
                    }
                    named.failing = true;
                    continue;
                }
            };
            if named.failing {
                log::info!(
                    "backend {backend} of listener {listener}: {:?} resolves again",
                    named.name
                );
                named.failing = false;
            }
            if addresses.len() > named.rows.len() {
                log::warn!(
                    "backend {backend} of listener {listener}: {} addresses, the first {} are used",
                    addresses.len(),
                    named.rows.len()
                );
                addresses.truncate(named.rows.len());
            }
            let table = &self.table;
            let before: Vec<Address> =
                named.rows.iter().filter_map(|&row| table.row(row).address()).collect();
            let after: Vec<Address> = addresses.into_iter().map(Address::Ip).collect();
            if before == after {
                continue;
            }
            for (slot, &row) in named.rows.iter().enumerate() {
                let row_score = table.row(row);
                let address = after.get(slot);
                if row_score.address().as_ref() != address {
                    row_score.write_address(address);
                    if row_score.health() != crate::scoreboard::Health::Unchecked {
                        // A new address gets a verdict of its own (tried meanwhile, as a
                        // backend is at start).
                        row_score.set_health(crate::scoreboard::Health::Pending);
                    }
                }
            }
            for checked in self.checked.iter_mut().filter(|c| named.rows.contains(&c.row)) {
                checked.probe = None;
                checked.next = now;
            }
            let show = |list: &[Address]| {
                list.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
            };
            log::info!(
                "backend {backend} of listener {listener}: {:?} now resolves to [{}] (was [{}])",
                named.name,
                show(&after),
                show(&before)
            );
        }
    }
}
