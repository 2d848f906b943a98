//! Command-line interface of the `preforkd` binary (clap derive).
//!
//! Runs in the master before anything else. `preforkd -c FILE` runs the daemon in the
//! foreground (systemd style); `preforkd check -c FILE` or `preforkd -t -c FILE` validates the
//! configuration and exits, like `nginx -t`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Default configuration file, used when `-c` is not given.
pub const DEFAULT_CONFIG: &str = "/etc/preforkd/preforkd.toml";

/// `preforkd [-c FILE] [-t] [COMMAND]`: see preforkd(8).
#[derive(Debug, Parser)]
#[command(name = "preforkd", version, about = "A preforking TCP server daemon", long_about = None)]
pub struct Cli {
    /// Configuration file (TOML); see preforkd.toml(5).
    #[arg(short, long, value_name = "FILE", default_value = DEFAULT_CONFIG, global = true)]
    pub config: PathBuf,

    /// Check the configuration and exit (same as the `check` command).
    #[arg(short = 't', long = "test")]
    pub test: bool,

    /// What to do; the default is `run`.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The verbs of `preforkd`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground (the default).
    Run,
    /// Validate the configuration, print every problem or `configuration OK`, and exit.
    Check,
}

impl Cli {
    /// The command to carry out: `-t` means `check`; no command means `run`.
    pub fn effective_command(&self) -> Command {
        match (self.test, self.command) {
            (true, _) => Command::Check,
            (false, Some(command)) => command,
            (false, None) => Command::Run,
        }
    }
}
