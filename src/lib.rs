//! preforkd: a preforking TCP server daemon.
//!
//! A master process reads a TOML configuration, binds every listener, creates a shared-memory
//! region for per-client limits, and forks a pool of worker processes. Each worker runs a
//! `select(2)` readiness loop over the shared listening sockets and its own connections. The
//! master never serves clients: it supervises (reap, respawn with backoff, fast and graceful
//! stop) and reclaims the per-client counts of workers that die.
//!
//! The crate is both the `preforkd` binary and a library, so that the pieces (configuration,
//! limits table, services) can be tested and reused on their own.

#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

/// Socket activation: listening sockets passed by systemd (LISTEN_FDS).
pub mod activation;
/// Command-line interface (clap derive): `run`, `check`, `-c FILE`, `-t`.
pub mod cli;
/// TOML configuration: the file mirror, validation into real types, and error reporting.
pub mod config;
/// Control commands (`reload`, `stop`, `quit`, `reopen`, `upgrade`, `status`) for a running master.
pub mod control;
/// Classic daemon mode: double fork, setsid, readiness reported to the starting process.
pub mod daemonize;
/// Process exit statuses (sysexits(3)) of the master and of workers.
pub mod exit;
/// Shared-memory per-client connection accounting, exact across workers.
pub mod limits;
/// Binding listening sockets: address, backlog, `SO_REUSEADDR`, non-blocking, close-on-exec.
pub mod listener;
/// Log targets (stderr, syslog) behind the `log` facade, with role and pid on every line.
pub mod logging;
/// The master process: supervision loop, worker table, spawn/reap/respawn, stop.
pub mod master;
/// The pid file: atomic write, flock, stale detection.
pub mod pidfile;
/// Readiness backends (`select(2)`) behind one small trait.
pub mod poller;
/// Worker credentials (user, group) and the master's descriptor limit.
pub mod privileges;
/// Shared-memory scoreboard of the master and workers, readable by `preforkd status`.
pub mod scoreboard;
/// sd_notify(3) readiness, reload, stop and watchdog messages to systemd.
pub mod sdnotify;
/// Built-in services (RFC 862 echo) behind the `Service` trait.
pub mod services;
/// Signal handlers that only record, drained by a loop through a self-pipe.
pub mod signals;
pub mod status_json;
/// The few raw system calls nix does not wrap.
pub mod sys;
/// The worker process: readiness loop, connections, idle deadlines.
pub mod worker;
