//! `preforkd import xinetd PATH...`: another server's configuration as a preforkd one.
//!
//! Runs in a short-lived process of its own, as whoever runs it; it reads the files named
//! (and what they include) and writes nothing but its standard output and error. The
//! output is a whole preforkd.toml (or, with `--listeners-only`, its `[[listener]]` blocks
//! for a file of `conf.d/`) that `preforkd check` accepts: each listener says in a comment
//! which service it comes from (`file:line`); a service disabled in xinetd is written
//! commented out; a service or attribute preforkd has no equivalent for is listed on the
//! standard error as `file:line: attribute: why`, and a skipped service also in a comment.
//!
//! - [`mod@xinetd`] reads xinetd.conf(5) syntax, following `includedir` and `includefile`;
//! - [`convert`] maps services and attributes onto listeners and their options;
//! - [`etc_services`] finds ports by service name, as xinetd does.

pub mod convert;
pub mod etc_services;
pub mod xinetd;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use thiserror::Error;

use convert::{Converted, Entry, Note};
use etc_services::Services;

/// Why nothing could be converted.
#[derive(Debug, Error)]
pub enum ImportError {
    /// A file named on the command line cannot be read.
    #[error("{0}")]
    Unreadable(String),
}

/// A conversion: the configuration, and what it leaves out.
#[derive(Debug, Clone)]
pub struct Conversion {
    /// The preforkd configuration, TOML.
    pub toml: String,
    /// Every service or attribute not converted, with its place and the reason.
    pub notes: Vec<Note>,
    /// Listeners written active (not commented out).
    pub active: usize,
}

/// What to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// A whole configuration: `[daemon]`, `[log]` and the listeners.
    File,
    /// The `[[listener]]` blocks only, for a file of `conf.d/`.
    ListenersOnly,
}

/// Converts the xinetd configuration at `paths` (each with what it includes), finding
/// ports in `services_file` (services(5)).
///
/// # Errors
/// [`ImportError::Unreadable`] when a file of `paths` cannot be read; problems in included
/// files and in the syntax are notes.
pub fn xinetd(
    paths: &[PathBuf],
    services_file: &Path,
    output: Output,
) -> Result<Conversion, ImportError> {
    let read = xinetd::read(paths);
    if let Some(problem) =
        read.problems.iter().find(|p| p.origin.line == 0 && paths.contains(&p.origin.file))
    {
        return Err(ImportError::Unreadable(problem.message.clone()));
    }
    let services = Services::read(services_file);
    let mut converted = convert::convert(&read.sections, &services);
    let mut notes: Vec<Note> = read
        .problems
        .into_iter()
        .map(|p| Note { origin: p.origin, attribute: "syntax".into(), message: p.message })
        .collect();
    notes.append(&mut converted.notes);
    let active = converted.listeners.iter().filter(|l| l.disabled.is_none()).count();
    Ok(Conversion { toml: render(&converted, paths, output), notes, active })
}

fn line(out: &mut String, entry: &Entry, prefix: &str) {
    let _ = write!(out, "{prefix}{} = {}", entry.key, entry.value);
    if !entry.comment.is_empty() {
        let _ = write!(out, "  # {}", entry.comment);
    }
    out.push('\n');
}

/// Comment lines of `text`, wrapped at about 90 columns.
fn comment(out: &mut String, text: &str) {
    let mut current = String::from("#");
    for word in text.split_whitespace() {
        if current.len() + 1 + word.len() > 92 && current.len() > 1 {
            out.push_str(&current);
            out.push('\n');
            current = String::from("#");
        }
        current.push(' ');
        current.push_str(word);
    }
    out.push_str(&current);
    out.push('\n');
}

fn render(converted: &Converted, paths: &[PathBuf], output: Output) -> String {
    let mut out = String::new();
    let sources: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    comment(
        &mut out,
        &format!(
            "Converted from xinetd by `preforkd import xinetd {}`. Each listener names the \
             service it comes from (file:line); what preforkd has no equivalent for is listed \
             on the standard error, not here. Keys not written take preforkd's defaults, \
             which are stricter than xinetd's: 32 connections per client, and idle timeouts \
             of 10s before the first exchange and 5m after (not for exec, whose children \
             end the connection). See preforkd.toml(5).",
            sources.join(" ")
        ),
    );
    if output == Output::File {
        out.push_str("\n[daemon]\n");
        comment(
            &mut out,
            "xinetd ran each service as its `user`; preforkd's workers run as this user, and \
             an exec listener's program as its own `user`.",
        );
        out.push_str("user = \"preforkd\"\n");
        if !converted.log.is_empty() {
            out.push_str("\n[log]\n");
            for entry in &converted.log {
                line(&mut out, entry, "");
            }
        }
    }
    for listener in &converted.listeners {
        out.push('\n');
        let (prefix, header) = match &listener.disabled {
            Some(why) => (
                "# ",
                format!(
                    "service {}, {}: {why}; uncomment the lines below to serve it.",
                    listener.service, listener.origin
                ),
            ),
            None => ("", format!("service {}, {}", listener.service, listener.origin)),
        };
        comment(&mut out, &header);
        let _ = writeln!(out, "{prefix}[[listener]]");
        for entry in &listener.entries {
            line(&mut out, entry, prefix);
        }
        if !listener.options.is_empty() {
            let _ = writeln!(out, "{prefix}[listener.options]");
            for entry in &listener.options {
                line(&mut out, entry, prefix);
            }
        }
    }
    for skipped in &converted.skipped {
        out.push('\n');
        comment(
            &mut out,
            &format!(
                "service {}, {}: not converted: {}",
                skipped.service, skipped.origin, skipped.reason
            ),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn convert_text(text: &str) -> Conversion {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("xinetd.conf");
        std::fs::write(&path, text).unwrap();
        let services = dir.path().join("services");
        std::fs::write(&services, "echo 7/tcp\necho 7/udp\ngit 9418/tcp\ntftp 69/udp\n").unwrap();
        xinetd(&[path], &services, Output::File).unwrap()
    }

    #[test]
    fn an_exec_service_with_defaults_converts_and_parses() {
        let conversion = convert_text(
            "defaults\n{\n\tinstances = 30\n\tonly_from = 127.0.0.0\n\tlog_type = SYSLOG daemon info\n}\n\
             service git\n{\n\tsocket_type = stream\n\twait = no\n\tuser = nobody\n\
             \tserver = /usr/bin/git\n\tserver_args = daemon --inetd /srv/git\n\
             \tonly_from += 10.1.2.{3,4}\n\tper_source = 5\n\tenv = LANG=C\n\trlimit_as = 64M\n\
             \trlimit_files = 64\n\tumask = 027\n\tnice = 5\n\taccess_times = 8:00-17:00\n}\n",
        );
        let parsed: toml::Table = toml::from_str(&conversion.toml).expect(&conversion.toml);
        let listener = &parsed["listener"][0];
        assert_eq!(listener["name"].as_str(), Some("git"));
        assert_eq!(listener["address"].as_str(), Some("0.0.0.0:9418"));
        assert_eq!(listener["service"].as_str(), Some("exec"));
        assert_eq!(listener["max_connections_per_client"].as_integer(), Some(5));
        let allow: Vec<&str> =
            listener["allow"].as_array().unwrap().iter().filter_map(|v| v.as_str()).collect();
        assert_eq!(allow, ["127.0.0.0/8", "10.1.2.3/32", "10.1.2.4/32"]);
        let options = &listener["options"];
        assert_eq!(options["program"].as_str(), Some("/usr/bin/git"));
        assert_eq!(options["args"].as_array().unwrap().len(), 3);
        assert_eq!(options["max_instances"].as_integer(), Some(30));
        assert_eq!(options["user"].as_str(), Some("nobody"));
        assert_eq!(options["groups"].as_array().map(Vec::len), Some(0));
        assert_eq!(options["env"]["LANG"].as_str(), Some("C"));
        assert_eq!(options["rlimits"]["as"].as_str(), Some("64M"));
        assert_eq!(options["rlimits"]["nofile"].as_integer(), Some(64));
        assert_eq!(
            (options["umask"].as_str(), options["nice"].as_integer()),
            (Some("027"), Some(5))
        );
        assert_eq!(parsed["log"]["facility"].as_str(), Some("daemon"));
        let notes: Vec<String> = conversion.notes.iter().map(ToString::to_string).collect();
        assert!(notes.iter().any(|n| n.ends_with(":5: log_type: the level info has no equivalent: preforkd's log.level is the daemon's, not a syslog level per line")), "{notes:#?}");
        assert!(notes.iter().any(|n| n.contains(":21: access_times: no equivalent")), "{notes:#?}");
        assert_eq!(notes.len(), 2, "{notes:#?}");
        assert!(conversion.toml.contains("# service git, "), "{}", conversion.toml);
    }

    #[test]
    fn internal_services_tftp_redirect_and_what_has_no_equivalent() {
        let conversion = convert_text(
            "service echo\n{\n\ttype = INTERNAL\n\tid = echo-dgram\n\tsocket_type = dgram\n\twait = yes\n\tdisable = yes\n}\n\
             service chargen\n{\n\ttype = INTERNAL\n\tsocket_type = dgram\n\twait = yes\n\tport = 19\n}\n\
             service tftp\n{\n\tsocket_type = dgram\n\tprotocol = udp\n\twait = yes\n\tuser = root\n\
             \tserver = /usr/sbin/in.tftpd\n\tserver_args = -s /srv/tftp -c\n}\n\
             service fwd\n{\n\ttype = UNLISTED\n\tsocket_type = stream\n\twait = no\n\tport = 7001\n\
             \tredirect = 10.0.0.5 25\n\tbanner_fail = /etc/nope\n}\n",
        );
        let parsed: toml::Table = toml::from_str(&conversion.toml).expect(&conversion.toml);
        let listeners = parsed["listener"].as_array().unwrap();
        assert_eq!(listeners.len(), 2, "the disabled echo is a comment:\n{}", conversion.toml);
        assert!(conversion.toml.contains("# [[listener]]\n# name = \"echo-dgram\"\n"));
        let tftp = &listeners[0];
        assert_eq!(
            (tftp["service"].as_str(), tftp["transport"].as_str()),
            (Some("tftp"), Some("udp"))
        );
        assert_eq!(tftp["options"]["root"].as_str(), Some("/srv/tftp"));
        assert_eq!(tftp["options"]["allow_write"].as_bool(), Some(true));
        let fwd = &listeners[1];
        assert_eq!(fwd["options"]["backends"][0].as_str(), Some("10.0.0.5:25"));
        assert_eq!(fwd["banner_fail"]["file"].as_str(), Some("/etc/nope"));
        let notes: Vec<String> = conversion.notes.iter().map(ToString::to_string).collect();
        assert!(
            notes
                .iter()
                .any(|n| n.contains(":9: service: chargen is not converted: chargen over UDP")),
            "{notes:#?}"
        );
        assert!(
            notes
                .iter()
                .any(|n| n
                    .contains(":21: user: user = root: the service runs in preforkd's workers")),
            "{notes:#?}"
        );
    }
}
