//! `preforkd`: the daemon with its built-in services. See preforkd(8).

use std::process::ExitCode;

fn main() -> ExitCode {
    preforkd::Daemon::new().main()
}
