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
//!    [`pidfile`], [`poller`], [`privileges`], [`proxy_protocol`], [`scoreboard`],
//!    [`sdnotify`], [`signals`], [`status_json`]
//! 3. services: [`services`]
//! 4. configuration: [`config`], [`import`]
//! 5. serving: [`listener`], [`spawner`], [`worker`]
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
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     preforkd::Daemon::new().service("upper", Upper::from_options).main()
//! }
//! ```
//!
//! `examples/upper.rs` is this program with a greeting and a `QUIT` command, and
//! `examples/upper.toml` its configuration: `cargo run --example upper -- -c
//! examples/upper.toml`.

#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod activation;
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
pub mod poller;
pub mod privileges;
pub mod proxy_protocol;
pub mod rate;
pub mod schema;
pub mod scoreboard;
pub mod sdnotify;
pub mod services;
pub mod signals;
pub mod spawner;
pub mod status_json;
pub mod sys;
pub mod worker;

#[cfg(test)]
mod layering;

pub use daemon::Daemon;
