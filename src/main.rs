//! `preforkd`: parse the command line, dispatch, map every error to a documented exit status.
//! See preforkd(8).

use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;
use preforkd::cli::{Cli, Command};
use preforkd::config::LogTarget;
use preforkd::daemonize::{self, Side};
use preforkd::exit::ExitStatus;
use preforkd::master::Invocation;
use preforkd::{config, control, logging, master};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
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
    logging::init();
    let command = cli.effective_command();
    if command != Command::Run && command != Command::Check {
        return control::run(command, &cli.config, cli.pid_file.as_deref()).into();
    }
    // `check` also looks at this machine (users, directories, addresses, syslog), so that it
    // finds everything startup would refuse; startup meets those itself, with their status.
    let load = if command == Command::Check { config::load_checked } else { config::load };
    let mut config = match load(&cli.config) {
        Ok(config) => config,
        Err(error) => {
            // Printed plainly (not through the logger) so each problem is one clean line.
            print_stderr(&error.to_string());
            return error.exit_status().into();
        }
    };
    if command == Command::Check {
        println!("{}: configuration OK", cli.config.display());
        return ExitStatus::Ok.into();
    }
    config.daemon.daemonize |= cli.daemonize;
    if config.daemon.daemonize && config.log.target == LogTarget::Stderr {
        print_stderr("daemon mode has no stderr: set log.target to \"syslog\" or \"file\"");
        return ExitStatus::Config.into();
    }
    if let Err(error) = logging::apply(&config.log) {
        log::error!("{error}");
        return ExitStatus::Unavailable.into();
    }
    let config_path = std::path::absolute(&cli.config).unwrap_or_else(|_| cli.config.clone());
    let exe = std::env::current_exe().unwrap_or_else(|_| "preforkd".into());
    let invocation = Invocation {
        // Resolved now, before an upgrade may replace the file (USR2 runs whatever is there)
        // and before daemon mode changes to "/". The new master gets the absolute path.
        args: vec![exe.clone().into(), "-c".into(), config_path.clone().into(), "run".into()],
        exe,
        config_path,
    };
    let mut ready_pipe = None;
    // The new master of a binary upgrade is already detached: it is the old daemon's child.
    let upgrading = std::env::var_os(preforkd::master::INHERITED_LISTENERS_ENV).is_some();
    if config.daemon.daemonize && !upgrading {
        match daemonize::daemonize() {
            Ok(Side::Starter(status)) => return status.into(),
            Ok(Side::Daemon(pipe)) => {
                logging::refresh_pid();
                ready_pipe = Some(pipe);
            }
            Err(error) => {
                log::error!("could not daemonize: {error}");
                return ExitStatus::OsErr.into();
            }
        }
    }
    master::run(config, invocation, ready_pipe).into()
}

fn print_stderr(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{text}");
}
