//! [`Daemon`]: the whole of preforkd (command line, configuration, master, workers, control
//! commands) as a library call, with the services a program registers.
//!
//! Runs in the process the user or systemd started: [`Daemon::main`] parses the command line
//! and becomes the master, a control command or `check`, exactly as the `preforkd` binary
//! does (the binary is `Daemon::new().main()`).

use std::process::ExitCode;

use clap::error::ErrorKind;

use crate::cli::{Cli, Command, ImportFrom};
use crate::config;
use crate::daemonize::{self, Side};
use crate::exit::ExitStatus;
use crate::import::{self, Output};
use crate::logging::LogTarget;
use crate::master::{self, Invocation};
use crate::services::{Invalid, Options, Registry, Service};
use crate::{control, logging};

/// preforkd with a set of services: the built-ins, plus those registered with
/// [`Daemon::service`].
#[derive(Debug, Default)]
pub struct Daemon {
    services: Registry,
}

impl Daemon {
    /// The daemon with the built-in services (echo, discard, chargen, daytime, time, exec).
    pub fn new() -> Self {
        Daemon { services: Registry::builtin() }
    }

    /// Registers a service under `name`, which `service = "NAME"` in a `[[listener]]` then
    /// selects; `build` makes it from the listener's `[listener.options]` at `check`, start
    /// and each reload, and reports what is wrong with them through [`Options`].
    ///
    /// # Panics
    /// When `name` is taken (by a built-in or an earlier registration) or malformed (1 to
    /// 32 lowercase ASCII letters, digits or `-`, starting with a letter): a mistake in the
    /// program, found the first time it runs.
    #[must_use]
    pub fn service<S: Service + 'static>(
        mut self,
        name: &str,
        build: impl Fn(&mut Options<'_>) -> Result<S, Invalid> + 'static,
    ) -> Self {
        if let Err(error) = self.services.register(name, build) {
            panic!("preforkd::Daemon::service: {error}");
        }
        self
    }

    /// The services this daemon knows.
    pub fn services(&self) -> &Registry {
        &self.services
    }

    /// Runs preforkd on this process's command line (see preforkd(8)): `run`, `check` or a
    /// control command. Returns the exit status to end the process with (sysexits(3)); the
    /// master returns only when it stops.
    pub fn main(self) -> ExitCode {
        let cli = match Cli::try_parse_serving(self.services.names()) {
            Ok(cli) => cli,
            Err(error) => {
                let _ = error.print();
                return match error.kind() {
                    ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => ExitStatus::Ok,
                    _ => ExitStatus::Usage,
                }
                .into();
            }
        };
        self.run(cli).into()
    }

    fn run(self, cli: Cli) -> ExitStatus {
        logging::init();
        let command = cli.effective_command();
        if let Command::Import(from) = &command {
            return import(from);
        }
        if command != Command::Run && command != Command::Check {
            return control::run(&command, &cli.config, cli.pid_file.as_deref(), &self.services);
        }
        // `check` also looks at this machine (users, directories, addresses, syslog), so that
        // it finds everything startup would refuse; startup meets those itself, with their
        // status.
        let load = if command == Command::Check { config::load_checked } else { config::load };
        let mut config = match load(&cli.config, &self.services) {
            Ok(config) => config,
            Err(error) => {
                // Printed plainly (not through the logger) so each problem is one clean line.
                print_stderr(&error.to_string());
                return error.exit_status();
            }
        };
        if command == Command::Check {
            let exec = crate::spawner::findings(&config, nix::unistd::geteuid());
            for warning in &exec.warnings {
                print_stderr(&format!("{}: warning: {warning}", cli.config.display()));
            }
            if !exec.errors.is_empty() {
                for error in &exec.errors {
                    print_stderr(&format!("{}: {error}", cli.config.display()));
                }
                return ExitStatus::Config;
            }
            println!("{}: configuration OK", cli.config.display());
            return ExitStatus::Ok;
        }
        config.daemon.daemonize |= cli.daemonize;
        if config.daemon.daemonize && config.log.target == LogTarget::Stderr {
            print_stderr("daemon mode has no stderr: set log.target to \"syslog\" or \"file\"");
            return ExitStatus::Config;
        }
        if let Err(error) = logging::apply(&config.log) {
            log::error!("{error}");
            return ExitStatus::Unavailable;
        }
        let config_path = std::path::absolute(&cli.config).unwrap_or_else(|_| cli.config.clone());
        let exe = std::env::current_exe().unwrap_or_else(|_| "preforkd".into());
        let invocation = Invocation {
            // Resolved now, before an upgrade may replace the file (USR2 runs whatever is
            // there) and before daemon mode changes to "/". The new master gets the absolute
            // path.
            args: vec![exe.clone().into(), "-c".into(), config_path.clone().into(), "run".into()],
            exe,
            config_path,
            services: self.services,
        };
        let mut ready_pipe = None;
        // The new master of a binary upgrade is already detached: it is the old daemon's
        // child.
        let upgrading = std::env::var_os(master::INHERITED_LISTENERS_ENV).is_some();
        if config.daemon.daemonize && !upgrading {
            match daemonize::daemonize() {
                Ok(Side::Starter(status)) => return status,
                Ok(Side::Daemon(pipe)) => {
                    logging::refresh_pid();
                    ready_pipe = Some(pipe);
                }
                Err(error) => {
                    log::error!("could not daemonize: {error}");
                    return ExitStatus::OsErr;
                }
            }
        }
        master::run(config, invocation, ready_pipe)
    }
}

/// `preforkd import`: the configuration on stdout, every note on stderr as
/// `file:line: attribute: why`; 0 once a configuration is printed, 66 when a file named
/// cannot be read.
fn import(from: &ImportFrom) -> ExitStatus {
    let ImportFrom::Xinetd { listeners_only, services, paths } = from;
    let output = if *listeners_only { Output::ListenersOnly } else { Output::File };
    match import::xinetd(paths, services, output) {
        Ok(conversion) => {
            use std::io::Write;
            let _ = std::io::stdout().write_all(conversion.toml.as_bytes());
            for note in &conversion.notes {
                print_stderr(&note.to_string());
            }
            if conversion.active == 0 {
                print_stderr(
                    "preforkd import: no service is served: each was disabled in xinetd or has no equivalent",
                );
            }
            ExitStatus::Ok
        }
        Err(error) => {
            print_stderr(&format!("preforkd import: {error}"));
            ExitStatus::NoInput
        }
    }
}

fn print_stderr(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{text}");
}
