//! A lenient read of the few keys the control commands need to find a running master
//! (`daemon.pid_file`, `daemon.graceful_timeout`) from a file that may be invalid: an
//! operator editing the configuration must still be able to run `preforkd status`, `stop` or
//! `quit`.
//!
//! Runs in the control commands only, never to configure a daemon. Syntax errors are
//! recovered where the TOML parser can, other keys and their types are ignored, and the
//! file is read with the bounds of [`super::load`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::de::{DeTable, Deserializer};

/// The keys the control commands need, as far as they could be read.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ControlKeys {
    /// `daemon.pid_file`, made absolute against the file's directory.
    pub pid_file: Option<PathBuf>,
    /// `daemon.graceful_timeout`, if it parses.
    pub graceful_timeout: Option<Duration>,
}

#[derive(Deserialize)]
struct File {
    daemon: Option<Daemon>,
}

#[derive(Deserialize)]
struct Daemon {
    pid_file: Option<String>,
    graceful_timeout: Option<String>,
}

/// Reads [`ControlKeys`] from the configuration file at `path`, whatever else is wrong in
/// it; `None` when the file cannot be read at all.
pub fn control_keys(path: &Path) -> Option<ControlKeys> {
    let source = super::read_source(path).ok()?;
    let mut keys = parse(&source);
    if let Some(pid_file) = keys.pid_file.as_mut()
        && pid_file.is_relative()
    {
        let base = std::path::absolute(path).ok()?.parent()?.to_owned();
        *pid_file = base.join(&*pid_file);
    }
    Some(keys)
}

fn parse(source: &str) -> ControlKeys {
    let (document, _) = DeTable::parse_recoverable(source);
    let Ok(file) = File::deserialize(Deserializer::from(document)) else {
        return ControlKeys::default();
    };
    let daemon = file.daemon;
    ControlKeys {
        pid_file: daemon
            .as_ref()
            .and_then(|d| d.pid_file.clone())
            .filter(|p| !p.is_empty())
            .map(PathBuf::from),
        graceful_timeout: daemon
            .and_then(|d| d.graceful_timeout)
            .and_then(|t| crate::duration::parse(&t).ok()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pid_file_is_found_in_a_file_with_mistakes() {
        let source = "[daemon]\nworkers = 0\ncolour = true\npid_file = \"/run/p.pid\"\n\
                      graceful_timeout = \"5s\"\n[[listener]]\nname = \"a\"\naddress = 7\n";
        let keys = parse(source);
        assert_eq!(keys.pid_file, Some(PathBuf::from("/run/p.pid")));
        assert_eq!(keys.graceful_timeout, Some(Duration::from_secs(5)));
        let broken = "[daemon]\npid_file = \"/run/p.pid\"\n[log\nlevel = \n";
        assert_eq!(
            parse(broken).pid_file,
            Some(PathBuf::from("/run/p.pid")),
            "after a syntax error"
        );
        assert_eq!(parse("[daemon]\nworkers = 2\n"), ControlKeys::default());
    }
}
