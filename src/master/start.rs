//! Starting the master: credentials, listeners (bound, or adopted from an old master or
//! systemd), the shared tables, the pid file, signal handlers and the first generation.
//!
//! Runs in the master, once, before its loop. Invariant: on any error nothing stays bound
//! and no worker stays running ([`StartError`] says which step failed).

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::fs::File;
use std::io;
use std::sync::atomic::Ordering;
use std::time::Instant;

use nix::unistd::Uid;
use thiserror::Error;

use super::pool::Pool;
use super::supervisor::{Origin, Supervisor};
use super::{
    DROPPED_LINES_REPORT_INTERVAL, INHERITED_LISTENERS_ENV, Invocation, Master, handoff, inherit,
    listener_id, orphans, peer, upgrade,
};
use crate::activation;
use crate::config::{Config, ListenerTransport};
use crate::exit::ExitStatus;
use crate::limits::DatagramRates;
use crate::limits::LimitsError;
use crate::listener::{BindError, Listener};
use crate::logging;
use crate::pidfile::{PidFile, PidFileError};
use crate::privileges::{self, Credentials, PrivilegeError};
use crate::scoreboard::{self, Scoreboard, ScoreboardError};
use crate::sdnotify::Notifier;
use crate::signals::{MASTER_SIGNALS, Signals};
use crate::tls::tickets::{Rotation, TicketKeys};

/// The master could not start.
#[derive(Debug, Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// The shared per-client table could not be created.
    #[error(transparent)]
    Limits(#[from] LimitsError),
    /// The scoreboard could not be created.
    #[error(transparent)]
    Scoreboard(#[from] ScoreboardError),
    /// The pid file is held by another master, or cannot be written.
    #[error(transparent)]
    PidFile(#[from] PidFileError),
    /// Signal handlers could not be installed.
    #[error("could not install signal handlers: {0}")]
    Signals(io::Error),
    /// The worker user or group cannot be used; the message names the key and, for an
    /// unknown name, what `preforkd check` says about it.
    #[error("{}: {}", .0.for_workers().0, .0.for_workers().1)]
    Privileges(#[from] PrivilegeError),
    /// exec children would run as the workers' user or root (the message says which).
    #[error("{0}")]
    ExecUser(String),
    /// Started as root without `daemon.user` and without `allow_root_workers`.
    #[error(
        "the master runs as root and workers would too: set daemon.user (e.g. \"preforkd\"), or allow_root_workers = true"
    )]
    RootWorkers,
    /// The backends of the relay listeners need more rows than the backend table has.
    #[error(transparent)]
    Upstreams(#[from] crate::upstream::NoRoom),
    /// A socket passed by systemd matches no listener, or the variables are malformed.
    #[error("socket activation: {0}")]
    Activation(String),
    /// The TLS session-ticket keys could not be made.
    #[error("TLS session-ticket keys: {0}")]
    TicketKeys(io::Error),
    /// The first workers could not be forked.
    #[error("could not fork worker {slot}: {source}")]
    Fork {
        /// Worker slot.
        slot: usize,
        /// The system error.
        source: io::Error,
    },
}

impl StartError {
    /// The exit status for this failure: [`ExitStatus::Unavailable`] for bind errors and a
    /// pid file held by a running master, [`ExitStatus::OsErr`] otherwise.
    pub fn exit_status(&self) -> ExitStatus {
        match self {
            StartError::Bind(_) | StartError::PidFile(PidFileError::Running { .. }) => {
                ExitStatus::Unavailable
            }
            StartError::Privileges(PrivilegeError::Unknown { .. })
            | StartError::ExecUser(_)
            | StartError::RootWorkers
            | StartError::Upstreams(_)
            | StartError::Activation(_) => ExitStatus::Config,
            _ => ExitStatus::OsErr,
        }
    }
}

/// Worker credentials for `config` in a master whose effective user is `euid`.
fn worker_credentials(config: &Config, euid: Uid) -> Result<Option<Credentials>, StartError> {
    let daemon = &config.daemon;
    match (&daemon.user, euid.is_root()) {
        (Some(user), true) => {
            let credentials = Credentials::resolve(user, daemon.group.as_deref())?;
            if credentials.uid.is_root() && !daemon.allow_root_workers {
                return Err(StartError::RootWorkers);
            }
            Ok(Some(credentials))
        }
        (None, true) if daemon.allow_root_workers => Ok(None),
        (None, true) => Err(StartError::RootWorkers),
        (Some(user), false) => {
            log::warn!(
                "not running as root: daemon.user = {user:?} is ignored, workers run as uid {euid}"
            );
            Ok(None)
        }
        (None, false) => Ok(None),
    }
}

/// Binds or adopts every configured listener: a socket handed over by an old master (binary
/// upgrade, by listener name) or by systemd (by name, else by bound address) is adopted;
/// the others are bound.
fn open_listeners(
    config: &Config,
    ids: &mut HashMap<String, u16>,
) -> Result<Vec<Listener>, StartError> {
    let mut inherited = upgrade::take_inherited_listeners();
    let mut activated = activation::take().map_err(StartError::Activation)?;
    let mut listeners = Vec::with_capacity(config.listeners.len());
    for listener in &config.listeners {
        let id = listener_id(ids, &listener.name);
        let by_name = activated.iter().position(|p| p.name.as_deref() == Some(&listener.name));
        // By address, a TCP and a UDP socket on one port are told apart by their type.
        let datagram = listener.transport == ListenerTransport::Udp;
        let by_address = || {
            activated.iter().position(|p| {
                let kind = socket2::SockRef::from(&p.fd).r#type().ok();
                p.address.as_ref() == Some(&listener.address)
                    && kind.is_some_and(|k| (k == socket2::Type::DGRAM) == datagram)
            })
        };
        let (bound, how) = if let Some(fd) = inherited.remove(&listener.name) {
            let adopted = Listener::adopt(listener, id, fd, true)?;
            let moved = !listener.address.is_ephemeral() && adopted.local_addr != listener.address;
            if moved {
                // The configuration changed the address since: bind the new one instead.
                (Listener::bind(listener, id)?, "bound: the inherited socket is on another address")
            } else {
                (adopted, "inherited from the old master")
            }
        } else if let Some(index) = by_name.or_else(by_address) {
            let passed = activated.remove(index);
            (Listener::adopt(listener, id, passed.fd, false)?, "passed by systemd")
        } else {
            (Listener::bind(listener, id)?, "bound")
        };
        match bound.config.transport {
            ListenerTransport::Tcp => log::info!(
                "listener {} ({}) listening on {}, backlog {} ({how})",
                bound.config.name,
                bound.config.service.name,
                bound.local_addr,
                bound.config.backlog
            ),
            ListenerTransport::Udp => log::info!(
                "listener {} ({}) listening on {}, udp ({how})",
                bound.config.name,
                bound.config.service.name,
                bound.local_addr,
            ),
        }
        listeners.push(bound);
    }
    if let Some(extra) = activated.first() {
        return Err(StartError::Activation(format!(
            "a passed socket (name {:?}, address {:?}) matches no [[listener]] by name or address",
            extra.name.as_deref().unwrap_or("none"),
            extra.address
        )));
    }
    Ok(listeners)
}

impl Master {
    /// Binds (or adopts, after a binary upgrade) every listener, creates the limits table,
    /// the scoreboard and the pid file, installs the signal handlers and forks the first
    /// generation of workers.
    ///
    /// # Errors
    /// [`StartError`]; nothing stays bound and no worker stays running.
    pub fn start(
        config: Config,
        invocation: Invocation,
        ready_pipe: &mut Option<File>,
    ) -> Result<Self, StartError> {
        let pid = nix::unistd::getpid();
        if let Err(error) = orphans::become_subreaper() {
            log::warn!("cannot adopt the orphans of dead workers: {error}");
        }
        if let Some(limit) = config.daemon.rlimit_nofile {
            match privileges::set_nofile(limit) {
                Ok(()) => log::info!("RLIMIT_NOFILE set to {limit}"),
                Err(error) => log::warn!("{error}"),
            }
        }
        let credentials = worker_credentials(&config, nix::unistd::geteuid())?;
        let exec = crate::spawner::findings(&config, nix::unistd::geteuid());
        for warning in &exec.warnings {
            log::warn!("{warning}");
        }
        if !exec.errors.is_empty() {
            return Err(StartError::ExecUser(exec.errors.join("; ")));
        }
        let origin = match std::env::var_os(INHERITED_LISTENERS_ENV) {
            Some(_) => Origin::Upgrade,
            None => Origin::Fresh,
        };
        // The old master's listener ids first, so that both masters key clients alike.
        let inherited = inherit::take_inherited_limits();
        let predecessor = peer::take_upgrade_channel();
        let mut listener_ids = match &inherited {
            Some(Ok(inherited)) => inherited.ids.clone(),
            _ => HashMap::new(),
        };
        let listeners = open_listeners(&config, &mut listener_ids)?;
        let notifier = Notifier::from_env();
        let workers = config.daemon.workers.get();
        let capacity =
            crate::config::worker_slots(workers, config.daemon.max_draining_generations.get());
        let per_slot = config.daemon.max_connections_per_worker.get();
        let (limits, adopted) =
            inherit::open_limits(inherited, origin == Origin::Upgrade, capacity, per_slot)?;
        let predecessor = peer::keep_predecessor(predecessor, adopted);
        let rates = DatagramRates::new()?;
        let mut tickets = Rotation::new(TicketKeys::create().map_err(StartError::TicketKeys)?);
        let tls = listeners.iter().map(|l| (l.id, l.config.tls.as_ref()));
        tickets.generation(tls, Instant::now()).map_err(StartError::TicketKeys)?;
        let pidfile = match &config.daemon.pid_file {
            Some(path) => Some(PidFile::create(path, pid.as_raw())?),
            None => None,
        };
        let board_path = config.daemon.pid_file.as_deref().map(scoreboard::path_for);
        let scoreboard = Scoreboard::create(board_path.as_deref(), capacity)?;
        let header = scoreboard.header();
        header.master_pid.store(pid.as_raw(), Ordering::Relaxed);
        // Lets the control commands tell this master from a process that reuses its pid.
        match crate::sys::process_start_ticks(pid.as_raw()) {
            Ok(ticks) => header.master_start_ticks.store(ticks, Ordering::Relaxed),
            Err(error) => log::warn!("cannot read this master's start time: {error}"),
        }
        header.generation.store(1, Ordering::Relaxed);
        header.target_workers.store(workers as u64, Ordering::Relaxed);
        let signals = Signals::install(MASTER_SIGNALS).map_err(StartError::Signals)?;
        let mut master = Master {
            pid,
            invocation,
            config,
            listeners,
            listener_ids,
            limits,
            rates,
            tickets,
            probe_other_at: adopted.then(Instant::now),
            per_slot,
            scoreboard,
            pidfile,
            signals,
            pool: Pool::new(capacity, workers),
            supervisor: Supervisor::new(origin),
            previous: None,
            routing: handoff::Routing::new(capacity),
            status: ExitStatus::Ok,
            random: RandomState::new(),
            credentials,
            notifier,
            ready_pipe: ready_pipe.take(),
            dropped_report: logging::DropReport::new(DROPPED_LINES_REPORT_INTERVAL),
            spawners: Default::default(),
            checkers: Default::default(),
        };
        master.routing.predecessor = predecessor;
        let now = Instant::now();
        if let Err(error) =
            super::checkers::place(&master.scoreboard, &master.config, &master.listener_ids)
        {
            return Err(StartError::Upstreams(error));
        }
        master.start_spawner(now);
        master.start_checker(now);
        for slot in 0..workers {
            if let Err(source) = master.spawn(slot, now) {
                master.handle_stop_fast("startup failed");
                master.supervise();
                *ready_pipe = master.ready_pipe.take();
                return Err(StartError::Fork { slot, source });
            }
        }
        log::info!("master started: {workers} workers, generation {}", master.pool.generation());
        Ok(master)
    }
}
