//! Command-line interface of the `preforkd` binary (clap derive).
//!
//! Runs in the master before anything else. `preforkd -c FILE` runs the daemon in the
//! foreground (systemd style); `preforkd check -c FILE` or `preforkd -t -c FILE` validates the
//! configuration and exits, like `nginx -t`; the other verbs signal a running master.

use std::path::PathBuf;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// What `--help` says preforkd is; [`Cli::try_parse_serving`] adds the services.
pub const ABOUT: &str =
    "A preforking TCP and UDP server daemon: a supervising master, select, poll or epoll workers";

/// Default configuration file, used when `-c` is not given.
pub const DEFAULT_CONFIG: &str = "/etc/preforkd/preforkd.toml";

/// `preforkd [-c FILE] [-t] [COMMAND]`: see preforkd(8).
#[derive(Debug, Parser)]
#[command(name = "preforkd", version, about = ABOUT, long_about = None)]
pub struct Cli {
    /// Configuration file (TOML); see preforkd.toml(5).
    #[arg(short, long, value_name = "FILE", default_value = DEFAULT_CONFIG, global = true)]
    pub config: PathBuf,

    /// Control commands: the running master's pid file, instead of `daemon.pid_file` from
    /// the configuration (which may be invalid or missing while it is being edited).
    #[arg(long, value_name = "FILE", global = true)]
    pub pid_file: Option<PathBuf>,

    /// Check the configuration and exit (same as the `check` command).
    #[arg(short = 't', long = "test")]
    pub test: bool,

    /// Detach from the terminal once ready (same as `daemonize = true`).
    #[arg(short = 'd', long = "daemonize")]
    pub daemonize: bool,

    /// What to do; the default is `run`.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The verbs of `preforkd`.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground (the default).
    Run,
    /// Validate the configuration, print every problem or `configuration OK`, and exit.
    Check,
    /// Reload the running daemon's configuration (SIGHUP) and wait until it is applied or
    /// rejected.
    Reload,
    /// Stop the running daemon fast (SIGTERM) and wait until it is gone.
    Stop,
    /// Stop the running daemon gracefully (SIGQUIT) and wait until it is gone.
    Quit,
    /// Have the running daemon reopen its log file (SIGUSR1).
    Reopen,
    /// Start the binary again on the same sockets (SIGUSR2) and wait until the new master
    /// is ready.
    Upgrade,
    /// Print the master and each worker: pid, generation, state, connections, bytes, uptime.
    Status {
        /// Print one JSON document instead of the table (schema in preforkd(8)).
        #[arg(long)]
        json: bool,
    },
    /// Print a preforkd configuration equivalent to another server's on stdout; what has
    /// no equivalent goes to stderr, each with its file and line.
    #[command(subcommand)]
    Import(ImportFrom),
}

/// The servers `preforkd import` reads the configuration of.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum ImportFrom {
    /// xinetd.conf(5) files, with what they include (`includedir`, `includefile`).
    Xinetd {
        /// Print only the `[[listener]]` blocks, for a file of /etc/preforkd/conf.d.
        #[arg(long)]
        listeners_only: bool,
        /// services(5), where ports are found by service name.
        #[arg(long, value_name = "FILE", default_value = "/etc/services")]
        services: PathBuf,
        /// The configuration files, such as /etc/xinetd.conf.
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
    },
}

impl Cli {
    /// Parses this process's command line, with `--help` naming `services` (the names
    /// `service = "..."` may use: the built-ins and a library program's own).
    ///
    /// # Errors
    /// clap's: a usage error, or the help or version text to print.
    pub fn try_parse_serving<'a>(
        services: impl IntoIterator<Item = &'a str>,
    ) -> Result<Cli, clap::Error> {
        let names: Vec<&str> = services.into_iter().collect();
        let about = format!("{ABOUT}.\nServices: {}.", names.join(", "));
        let mut matches = Cli::command().about(about).try_get_matches()?;
        Cli::from_arg_matches_mut(&mut matches)
    }

    /// The command to carry out: `-t` means `check`; no command means `run`.
    pub fn effective_command(&self) -> Command {
        match (self.test, &self.command) {
            (true, _) => Command::Check,
            (false, Some(command)) => command.clone(),
            (false, None) => Command::Run,
        }
    }
}
