//! preforkd: a preforking TCP and UDP server daemon, and a library to run your own protocol
//! under it.
//!
//! A master process reads a TOML configuration, binds every listener, and forks a pool of
//! worker processes; each runs a readiness loop (`select(2)` by default, `poll(2)` or
//! `epoll(7)`) over the shared listening sockets and its connections or datagrams. The master
//! supervises: signals, reload by generation, binary upgrade, hung and crashed workers,
//! systemd. Workers apply the listener's policy (access lists, per-client limits and rates
//! exact across workers, short and long idle timeouts, graceful drain) to every connection,
//! whatever its service: echo and the other inetd built-ins (discard, chargen, daytime,
//! time), `relay` (a TCP proxy), `exec` (a program per connection), `tftp` over UDP,
//! `metrics` (Prometheus), or one of your own.
//!
//! # Layers
//!
//! Each module imports only modules of its own layer or of the layers before it, and no
//! two modules import each other, directly or through others. `cargo test --lib layering`
//! checks it (and that this list names every module, as `src/layering.rs` holds it):
//!
//! 1. foundations: [`clock`], [`duration`], [`exit`], [`files`], [`net`], [`rate`],
//!    [`schema`], [`sys`]
//! 2. mechanisms: [`activation`], [`daemonize`], [`handoff`], [`limits`], [`logging`],
//!    [`pidfile`], [`pki`], [`poller`], [`privileges`], [`proxy_protocol`],
//!    [`scoreboard`], [`sdnotify`], [`shared`], [`signals`], [`status_json`], [`upstream`]
//! 3. services: [`services`], [`tls`]
//! 4. configuration: [`config`], [`import`]
//! 5. serving: [`checker`], [`listener`], [`spawner`], [`worker`]
//! 6. supervising: [`master`]
//! 7. entry points: [`cli`], [`control`], [`daemon`]
//!
//! So the vocabulary the configuration is written in (durations, rates, event backends, log
//! targets) lives below it, in the modules that use it; `config` reads the file into those
//! types and is read by the processes above it.
//!
//! # Your own service
//!
//! A service makes a [`services::Session`] per connection; for a request/response protocol,
//! [`services::Framed`] does the I/O (buffers, backpressure, frame limits, hand-off) over the
//! frames a decoder finds ([`services::framing::lines`], length-prefixed frames, or a
//! decoder of your own), and a [`services::FrameHandler`] says what to answer to each.
//! Register it by name and the program is the whole daemon (`run`, `check`, `reload`,
//! `status` ...) with `service = "upper"` available in `[[listener]]` blocks, and the
//! listener's `[listener.options]` read by your build function:
//!
//! ```no_run
//! use preforkd::services::framing::lines;
//! use preforkd::services::{ConnInfo, FrameAction, FrameHandler, Framed, Invalid, Options};
//! use preforkd::services::{Service, Session};
//!
//! /// `[listener.options]` of an `upper` listener.
//! #[derive(serde::Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct UpperOptions {
//!     /// Longest line in bytes; default 1024.
//!     max_line: Option<usize>,
//! }
//!
//! /// Answers every line with the same line in capitals.
//! struct Upper {
//!     max_line: usize,
//! }
//!
//! impl Upper {
//!     fn from_options(options: &mut Options<'_>) -> Result<Upper, Invalid> {
//!         let max_line = options.parse::<UpperOptions>()?.max_line.unwrap_or(1024);
//!         if max_line == 0 {
//!             options.report("max_line", "must be at least 1");
//!         }
//!         options.finish(Upper { max_line })
//!     }
//! }
//!
//! impl Service for Upper {
//!     fn session(&self, _conn: &ConnInfo<'_>) -> Box<dyn Session> {
//!         // A line of at most `max_line` bytes, and its LF.
//!         Box::new(Framed::new(Shout, lines, self.max_line + 1))
//!     }
//!
//!     /// The hand-off hook, receiving side: a connection a reload moved here.
//!     fn import(&self, _conn: &ConnInfo<'_>, state: &[u8]) -> Option<Box<dyn Session>> {
//!         let shout = |own: &[u8]| own.is_empty().then_some(Shout);
//!         Some(Box::new(Framed::import(state, lines, self.max_line + 1, shout)?))
//!     }
//! }
//!
//! struct Shout;
//!
//! impl FrameHandler for Shout {
//!     fn on_frame(&mut self, line: &[u8], out: &mut Vec<u8>) -> FrameAction {
//!         out.extend(line.to_ascii_uppercase());
//!         out.extend(b"\r\n");
//!         FrameAction::Continue
//!     }
//!
//!     /// The hand-off hook, sending side: between lines, nothing to carry.
//!     fn export(&self) -> Option<Vec<u8>> {
//!         Some(Vec::new())
//!     }
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     preforkd::Daemon::new().service("upper", Upper::from_options).main()
//! }
//! ```
//!
//! `examples/upper.rs` is this program with a greeting and a `QUIT` command, and
//! `examples/upper.toml` its configuration:
//! `cargo run --example upper -- -c examples/upper.toml`. `examples/kv.rs` is a
//! Redis-protocol key-value store (redis-cli and redis-benchmark talk to it), with a
//! decoder of its own and its keys in a [`shared::SharedMap`].
//!
//! ## What runs where, and which state each worker sees
//!
//! The service is built in the master and reaches each worker through fork(2): what it holds
//! when built, every worker holds a copy of; what a worker changes afterwards (through a
//! `Cell`, `RefCell` or `OnceCell`: each process is single-threaded) only that worker sees.
//! A value `SET` in one worker's `HashMap` is missing from the others', and a client's next
//! connection may well be served by another worker.
//!
//! ```text
//!                          master (root, or the user that started it)
//!   +---------------------------------------------------------------------------+
//!   | build(&mut Options) -> Service   at start, at each reload, and in `check`:  |
//!   |                                  no socket, thread or file; may map memory  |
//!   | SharedMap::new(..)  ---------------------------+   (MAP_SHARED: one copy)   |
//!   +---------------+--------------------------+-----|----------------------------+
//!              fork(2)                    fork(2)    |
//!   +---------------v-----------+  +-----------v-----|-----+
//!   | worker 0 (daemon.user)    |  | worker 1              |   ... one per `workers`,
//!   |  Service: its own copy    |  |  Service: its own copy|   and per generation
//!   |  after_fork(): database   |  |  after_fork(): its own|   during a reload
//!   |    connection A, caches   |  |    connection B       |
//!   |  session() per connection |  |  session() ...        |
//!   |    Session: that client's |  |    (a hand-off moves  |
//!   |    state, and only its    |  |    it to a new worker)|
//!   |  before_exit(): close A   |  |  before_exit()        |
//!   +-------------+-------------+  +-----------+-----------+
//!                 |                            |
//!                 +-------> SharedMap <--------+   one table for every worker of every
//!                           (under a robust,       generation; gone with the master
//!                            shared lock)          (restart, binary upgrade)
//! ```
//!
//! - State every worker reads and none changes (configuration, a parsed file): fields set
//!   by the build function.
//! - State of one worker (a database connection, a client pool, a per-worker cache): made
//!   by [`services::Service::after_fork`], which runs in each worker as its user before it
//!   accepts (a failure is a boot failure, logged with the hook's message), and ended by
//!   [`services::Service::before_exit`].
//! - State of one connection: the [`services::Session`] (with [`services::Framed`], the
//!   handler), moved with the connection when a reload hands it off.
//! - State all workers share: a [`shared::SharedMap`] made in the master (by the build
//!   function, kept across reloads as `examples/kv.rs` does), or an external store (Redis,
//!   a database) when it must outlive the daemon or span hosts. The daemon's own shared
//!   memory (the per-client limits, the datagram rates) is not for services; its
//!   scoreboard can be read ([`services::Context::scoreboard`]), not written.
//!
//! # Reloads: hand-off or drain
//!
//! A reload (or a binary upgrade, TTOU, worker recycling) retires the old generation's
//! workers. Each offers its connections to the serving generation; a session moves if it
//! implements the hand-off hook, two methods for a simple one, as above:
//! [`services::Session::export`] (for a [`services::Framed`] session, which carries its
//! buffers itself and so moves at any moment, [`services::FrameHandler::export`]) gives its
//! state as versioned bytes, and [`services::Service::import`] rebuilds it in the receiving
//! worker. Without the hook a session is *drained*: the old worker serves it until it ends,
//! with no deadline unless `reload_drain_timeout` sets one (preforkd.toml(5)), as nginx and
//! HAProxy keep their old processes. A session that must move with an exchange in flight, or
//! owns descriptors of its own, says so with [`services::Session::movable`], and its
//! descriptors travel with [`services::Session::export_descriptors`] and
//! [`services::Session::resume`], where the receiving worker's session watches them again:
//! the relay moves that way, with its backend socket, buffers, pipes and half-closes.
//!
//! A session the worker keeps (drained by a retirement, or any session at a graceful stop)
//! is told once, [`services::Session::on_drain`] ([`services::FrameHandler::on_drain`]), so
//! it can say goodbye in its protocol: `examples/upper.rs` answers a graceful stop with
//! `BYE server going away`. A session that moves is never told: its client sees nothing.

#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod activation;
pub mod checker;
pub mod cli;
pub mod clock;
pub mod config;
pub mod control;
pub mod daemon;
pub mod daemonize;
pub mod duration;
pub mod exit;
pub mod files;
pub mod handoff;
pub mod import;
pub mod limits;
pub mod listener;
pub mod logging;
pub mod master;
pub mod net;
pub mod pidfile;
pub mod pki;
pub mod poller;
pub mod privileges;
pub mod proxy_protocol;
pub mod rate;
pub mod schema;
pub mod scoreboard;
pub mod sdnotify;
pub mod services;
pub mod shared;
pub mod signals;
pub mod spawner;
pub mod status_json;
pub mod sys;
pub mod tls;
pub mod upstream;
pub mod worker;

#[cfg(test)]
mod layering;

pub use daemon::Daemon;
