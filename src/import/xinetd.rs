//! Reading xinetd.conf(5): `defaults` and `service NAME` sections of `attribute OP values`
//! lines, and the `includedir` and `includefile` directives, into [`Section`]s that remember
//! where each attribute was written.
//!
//! Runs in `preforkd import xinetd`, as whoever runs it. The grammar is xinetd's own: a `#`
//! at the start of a word comments out the rest of the line; a section's `{` and `}` stand
//! on lines of their own (a `{` at the end of the section's line is taken too); an attribute
//! is `NAME = VALUES`, `NAME += VALUES` or `NAME -= VALUES`, the values separated by blanks
//! with no quoting. `includedir DIR` reads every file of DIR whose name has no `.` and does
//! not end in `~`, in the C locale's order of names, as xinetd does; `includefile FILE`
//! reads one. Every file is read with the configuration's bounds (a regular file of at most
//! 1 MiB), at most [`MAX_FILES`] of them and includes at most [`MAX_DEPTH`] deep, so an
//! include loop ends.

use std::path::{Path, PathBuf};

use crate::files;

/// Most files one conversion reads (includes included).
pub const MAX_FILES: usize = 1024;

/// Most includes within includes.
pub const MAX_DEPTH: usize = 16;

/// Where something was written: a file and a line (from 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The file.
    pub file: PathBuf,
    /// The line, from 1.
    pub line: usize,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// How an attribute line assigns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `=`: these values.
    Set,
    /// `+=`: add these to the inherited ones.
    Add,
    /// `-=`: remove these from the inherited ones.
    Remove,
}

/// One `NAME OP VALUES` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribute {
    /// The attribute's name, as written.
    pub name: String,
    /// How it assigns.
    pub op: Op,
    /// Its values, split at blanks.
    pub values: Vec<String>,
    /// Where it is written.
    pub origin: Origin,
}

/// What a section is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// `defaults`: attributes every service inherits.
    Defaults,
    /// `service NAME`.
    Service(String),
}

/// One `defaults` or `service` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// Which.
    pub kind: Kind,
    /// Its attributes, in order.
    pub attributes: Vec<Attribute>,
    /// Where its header is.
    pub origin: Origin,
}

/// A problem reading the files: where, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where.
    pub origin: Origin,
    /// What is wrong.
    pub message: String,
}

/// Everything read from the files given, with what could not be.
#[derive(Debug, Default)]
pub struct Read {
    /// The sections, in the order read.
    pub sections: Vec<Section>,
    /// What could not be read or understood; each is skipped.
    pub problems: Vec<Problem>,
    /// How many files were read.
    pub files: usize,
}

/// Reads `paths` and what they include.
pub fn read(paths: &[PathBuf]) -> Read {
    let mut read = Read::default();
    for path in paths {
        read_file(path, None, 0, &mut read);
    }
    read
}

fn read_file(path: &Path, from: Option<&Origin>, depth: usize, read: &mut Read) {
    let origin = from.cloned().unwrap_or(Origin { file: path.to_owned(), line: 0 });
    let refusal = if read.files >= MAX_FILES {
        Some(format!("more than {MAX_FILES} files: {} is not read", path.display()))
    } else if depth > MAX_DEPTH {
        Some(format!("includes more than {MAX_DEPTH} deep: {} is not read", path.display()))
    } else {
        None
    };
    if let Some(message) = refusal {
        read.problems.push(Problem { origin, message });
        return;
    }
    read.files += 1;
    let text = files::read_bounded(path, files::MAX_CONFIG_BYTES)
        .map_err(|e| e.to_string())
        .and_then(|bytes| String::from_utf8(bytes).map_err(|_| "is not UTF-8 text".to_owned()));
    match text {
        Ok(text) => parse(path, &text, depth, read),
        Err(error) => read
            .problems
            .push(Problem { origin, message: format!("cannot read {}: {error}", path.display()) }),
    }
}

/// The files `includedir` reads in `dir`: no `.` in the name, no trailing `~`, in byte
/// order of their names (xinetd's rule).
fn included_dir(dir: &Path) -> Result<Vec<PathBuf>, String> {
    use std::os::unix::ffi::OsStrExt;
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut names: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.file_name())
        .filter(|name| {
            let bytes = name.as_bytes();
            !bytes.contains(&b'.') && !bytes.ends_with(b"~")
        })
        .collect();
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names.into_iter().map(|name| dir.join(name)).filter(|p| p.is_file()).collect())
}

/// The words of `line` before a comment.
fn words(line: &str) -> Vec<&str> {
    line.split_whitespace().take_while(|word| !word.starts_with('#')).collect()
}

fn parse(path: &Path, text: &str, depth: usize, read: &mut Read) {
    let at = |line: usize| Origin { file: path.to_owned(), line };
    let base = path.parent().unwrap_or(Path::new("."));
    let mut open: Option<Section> = None;
    // A section header waiting for its `{`.
    let mut pending: Option<Section> = None;
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        let words = words(line);
        if words.is_empty() {
            continue;
        }
        let problem = |read: &mut Read, message: String| {
            read.problems.push(Problem { origin: at(number), message });
        };
        if let Some(mut section) = open.take() {
            match words.as_slice() {
                ["}"] => read.sections.push(section),
                [name, op, values @ ..] if matches!(*op, "=" | "+=" | "-=") => {
                    let op = match *op {
                        "=" => Op::Set,
                        "+=" => Op::Add,
                        _ => Op::Remove,
                    };
                    section.attributes.push(Attribute {
                        name: (*name).to_owned(),
                        op,
                        values: values.iter().map(|v| (*v).to_owned()).collect(),
                        origin: at(number),
                    });
                    open = Some(section);
                }
                _ => {
                    problem(read, format!("not an attribute (NAME = VALUES): {:?}", line.trim()));
                    open = Some(section);
                }
            }
            continue;
        }
        if let Some(section) = pending.take() {
            if words == ["{"] {
                open = Some(section);
                continue;
            }
            problem(
                read,
                format!("expected the {{ of the section of line {}", section.origin.line),
            );
        }
        let (header, brace) = match words.last() {
            Some(&"{") => (&words[..words.len() - 1], true),
            _ => (&words[..], false),
        };
        let section = match header {
            ["defaults"] => Some(Kind::Defaults),
            ["service", name] => Some(Kind::Service((*name).to_owned())),
            ["includedir", dir] if !brace => {
                match included_dir(&base.join(dir)) {
                    Ok(paths) => {
                        for included in paths {
                            read_file(&included, Some(&at(number)), depth + 1, read);
                        }
                    }
                    Err(error) => problem(read, format!("includedir: {error}")),
                }
                None
            }
            ["includefile", file] if !brace => {
                read_file(&base.join(file), Some(&at(number)), depth + 1, read);
                None
            }
            _ => {
                problem(read, format!("not a section or directive: {:?}", line.trim()));
                None
            }
        };
        if let Some(kind) = section {
            let section = Section { kind, attributes: Vec::new(), origin: at(number) };
            if brace {
                open = Some(section);
            } else {
                pending = Some(section);
            }
        }
    }
    if let Some(section) = open.or(pending) {
        read.problems.push(Problem {
            origin: section.origin,
            message: "the section does not end (no closing })".into(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Read {
        let mut read = Read::default();
        parse(Path::new("/etc/xinetd.conf"), text, 0, &mut read);
        read
    }

    #[test]
    fn sections_attributes_and_operators_are_read_with_their_lines() {
        let read = parsed(
            "# comment\ndefaults\n{\n\tlog_on_success += PID HOST # trailing\n}\n\n\
             service git {\n\tserver_args = daemon --inetd\n\tonly_from -= 10.0.0.0\n}\n",
        );
        assert!(read.problems.is_empty(), "{:?}", read.problems);
        assert_eq!(read.sections.len(), 2);
        let defaults = &read.sections[0];
        assert_eq!(defaults.kind, Kind::Defaults);
        let attribute = &defaults.attributes[0];
        assert_eq!((attribute.name.as_str(), attribute.op), ("log_on_success", Op::Add));
        assert_eq!(attribute.values, ["PID", "HOST"]);
        assert_eq!(attribute.origin.line, 4);
        let git = &read.sections[1];
        assert_eq!(git.kind, Kind::Service("git".into()));
        assert_eq!(git.origin.line, 7);
        assert_eq!(git.attributes[0].values, ["daemon", "--inetd"]);
        assert_eq!(git.attributes[1].op, Op::Remove);
    }

    #[test]
    fn what_cannot_be_read_is_a_problem_with_its_line() {
        let read = parsed("service a\n{\n\tnonsense\n}\nfrobnicate\nservice b\n{\n\tx = 1\n");
        let lines: Vec<usize> = read.problems.iter().map(|p| p.origin.line).collect();
        assert_eq!(lines, [3, 5, 6], "{:?}", read.problems);
        assert_eq!(read.sections.len(), 1);
    }

    #[test]
    fn includedir_skips_names_with_a_dot_or_a_tilde_and_sorts() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["b", "a", "c.dpkg-old", "d~"] {
            std::fs::write(dir.path().join(name), format!("service {name}\n{{\n}}\n")).unwrap();
        }
        let main = dir.path().join("xinetd.conf");
        std::fs::write(&main, "includedir .\n").unwrap();
        let read = read(&[main]);
        let names: Vec<_> = read
            .sections
            .iter()
            .map(|s| match &s.kind {
                Kind::Service(name) => name.as_str(),
                Kind::Defaults => "defaults",
            })
            .collect();
        assert_eq!(names, ["a", "b"], "{:?}", read.problems);
        assert_eq!(read.sections[0].origin.file, dir.path().join("./a"));
    }

    #[test]
    fn an_include_loop_ends() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("loop");
        std::fs::write(&main, "includefile loop\n").unwrap();
        let read = read(&[main]);
        assert_eq!(read.files, MAX_DEPTH + 1);
        assert!(read.problems[0].message.contains("more than 16 deep"), "{:?}", read.problems);
    }
}
