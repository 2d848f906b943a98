//! `preforkd`: parse the command line, dispatch, map every error to a documented exit status.
//! See preforkd(8).

use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;
use preforkd::cli::{Cli, Command};
use preforkd::config;
use preforkd::exit::ExitStatus;
use preforkd::{logging, master};

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
    let config = match config::load(&cli.config) {
        Ok(config) => config,
        Err(error) => {
            // Printed plainly (not through the logger) so each problem is one clean line.
            print_stderr(&error.to_string());
            return error.exit_status().into();
        }
    };
    match cli.effective_command() {
        Command::Check => {
            println!("{}: configuration OK", cli.config.display());
            ExitStatus::Ok.into()
        }
        Command::Run => {
            if let Err(error) = logging::apply(&config.log) {
                log::error!("{error}");
                return ExitStatus::Unavailable.into();
            }
            master::run(config).into()
        }
    }
}

fn print_stderr(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{text}");
}
