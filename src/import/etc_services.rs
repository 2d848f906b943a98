//! services(5): a service's port by its name and protocol, as getservbyname(3) finds it,
//! read from the file itself (no NSS: the answer is what the file says, the same on every
//! host that has it).
//!
//! Runs in `preforkd import`. A line is `NAME PORT/PROTOCOL [ALIASES...]`, a `#` starts a
//! comment; aliases name the same port.

use std::path::Path;

use crate::files;

/// Where services(5) lives.
pub const PATH: &str = "/etc/services";

/// The services of one services(5) file.
#[derive(Debug, Default, Clone)]
pub struct Services {
    /// (names, port, protocol) per line.
    entries: Vec<(Vec<String>, u16, String)>,
}

impl Services {
    /// Reads the file at `path` (bounded, as a configuration file); an unreadable file
    /// knows no service.
    pub fn read(path: &Path) -> Services {
        let text = files::read_bounded(path, files::MAX_CONFIG_BYTES)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default();
        Services::parse(&text)
    }

    /// Reads services(5) text.
    pub fn parse(text: &str) -> Services {
        let mut entries = Vec::new();
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or_default();
            let mut words = line.split_whitespace();
            let (Some(name), Some(port)) = (words.next(), words.next()) else { continue };
            let Some((port, protocol)) = port.split_once('/') else { continue };
            let Ok(port) = port.parse::<u16>() else { continue };
            let mut names = vec![name.to_owned()];
            names.extend(words.map(str::to_owned));
            entries.push((names, port, protocol.to_owned()));
        }
        Services { entries }
    }

    /// The port of service `name` (or an alias) over `protocol` (`tcp`, `udp`).
    pub fn port(&self, name: &str, protocol: &str) -> Option<u16> {
        self.entries
            .iter()
            .find(|(names, _, p)| p == protocol && names.iter().any(|n| n == name))
            .map(|(_, port, _)| *port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_aliases_and_protocols() {
        let services = Services::parse(
            "# comment\necho\t\t7/tcp\necho 7/udp\ndiscard 9/tcp sink null\n\
             tftp 69/udp\ngit 9418/tcp # Git\nbroken x/tcp\n",
        );
        assert_eq!(services.port("echo", "udp"), Some(7));
        assert_eq!(services.port("null", "tcp"), Some(9));
        assert_eq!(services.port("tftp", "tcp"), None);
        assert_eq!(services.port("git", "tcp"), Some(9418));
        assert_eq!(services.port("broken", "tcp"), None);
    }
}
