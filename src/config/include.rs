//! `include = ["conf.d/*.toml"]`: `[[listener]]` blocks kept in files of their own, as
//! xinetd's `includedir` and nginx's `include` keep services apart from the main file.
//!
//! Runs in the master (startup, each reload, `check`), before validation: a reload reads the
//! directory again, so a file added since is served by the new generation.
//!
//! - **Patterns.** Each entry is a path, relative to the main file's directory or absolute,
//!   whose last component may hold the wildcards `*` and `?` (nowhere else). A pattern
//!   without a wildcard names one file, which must exist; one with a wildcard may match
//!   nothing, and its directory need not exist (nginx's `include` does the same). A wildcard
//!   never matches a leading `.`, so editors' hidden files stay out; an entry that is not a
//!   regular file (a directory named `x.toml`, a FIFO) is reported.
//! - **Order.** Patterns in the order written; the files of one pattern sorted by name, byte
//!   by byte (the C locale's order, which xinetd uses for `includedir` and systemd for
//!   drop-ins); a file named by two patterns is read once, at its first place. Listener
//!   indices (`listener[N]` in messages) count on across files in that order.
//! - **Contents.** An included file holds `[[listener]]` blocks (with their
//!   `[listener.options]`) and nothing else; anything else is reported and the file is left
//!   out. Included files include nothing.
//! - **Trust.** No one who could not change the main file may add listeners through an
//!   include. The trusted owners are root, the user running preforkd and the owner of the
//!   main file. A name that is a symbolic link is followed only when the link belongs to a
//!   trusted owner (the kernel's `protected_symlinks` rule, widened to the main file's
//!   owner); the directory a wildcard searches and every file read must belong to a trusted
//!   owner too. When preforkd runs as root they must also be writable by no one else: no
//!   write bit for others, nor for a group other than root's. Files are opened without
//!   blocking and read up to [`crate::files::MAX_CONFIG_BYTES`] each, at most
//!   [`MAX_INCLUDED_FILES`] of them.
//!
//! The document validation reads is the main file followed by each included file, each from
//! a line of its own; a file left out keeps its place as blanks, so that every byte position
//! names one file ([`Sources::locate`]). An included file is first read alone (TOML, and
//! only `[[listener]]` tables), so appending it cannot change what another file means.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::unistd::Uid;
use toml::de::{DeTable, DeValue};

use super::error::line_column;
use crate::files;
use crate::schema::RawIssue;

/// Most files all `include` patterns together may name.
pub const MAX_INCLUDED_FILES: usize = 1024;

/// The configuration as validation reads it: the main file and the files it includes, one
/// document, with where each file's text lies in it.
#[derive(Debug, Clone)]
pub struct Sources {
    document: String,
    parts: Vec<Part>,
    /// What reading the included files met, located in the document.
    pub issues: Vec<RawIssue>,
}

/// One file's place in [`Sources`].
#[derive(Debug, Clone)]
struct Part {
    path: PathBuf,
    /// Where its text starts in the document.
    start: usize,
    /// Its text as read (in the document it may be blanked out).
    text: String,
}

impl Sources {
    /// The main file alone, not following its `include` patterns (for [`super::parse`]).
    pub fn single(path: &Path, text: String) -> Sources {
        let part = Part { path: path.to_owned(), start: 0, text: text.clone() };
        Sources { document: text, parts: vec![part], issues: Vec::new() }
    }

    /// The document validation reads.
    pub fn document(&self) -> &str {
        &self.document
    }

    /// The main file's path.
    pub fn main_path(&self) -> &Path {
        &self.parts[0].path
    }

    /// The included files that were read, in order (the main file left out).
    pub fn included(&self) -> impl Iterator<Item = &Path> {
        self.parts.iter().skip(1).map(|part| part.path.as_path())
    }

    /// The file, line and column (both from 1, column in characters) of byte `offset` of the
    /// document.
    pub fn locate(&self, offset: usize) -> (&Path, usize, usize) {
        let index = self.parts.partition_point(|part| part.start <= offset).saturating_sub(1);
        let part = &self.parts[index];
        let (line, column) = line_column(&part.text, offset.saturating_sub(part.start));
        (&part.path, line, column)
    }

    fn push(&mut self, path: PathBuf, text: String, blank: bool) -> usize {
        if !self.document.is_empty() && !self.document.ends_with('\n') {
            self.document.push('\n');
        }
        let start = self.document.len();
        if blank {
            self.document.extend(text.bytes().map(|b| if b == b'\n' { '\n' } else { ' ' }));
        } else {
            self.document.push_str(&text);
        }
        self.parts.push(Part { path, start, text });
        start
    }
}

/// Reads the files the `include` patterns of the main file `path` (whose text is `main`)
/// name, for a process whose effective user is `euid`. Returns the document with every
/// problem met (unreadable or untrusted files, wrong contents) located in it
/// ([`Sources::issues`]); a file with a problem is left out, the others are read.
pub fn expand(path: &Path, main: String, euid: Uid) -> Sources {
    let patterns = patterns(&main);
    let mut sources = Sources::single(path, main);
    let mut issues = Vec::new();
    if patterns.is_empty() {
        return sources;
    }
    let trust = Trust {
        euid,
        main_owner: std::fs::metadata(path).map_or(euid.as_raw(), |meta| meta.uid()),
    };
    let base = std::path::absolute(path)
        .ok()
        .and_then(|p| p.parent().map(Path::to_owned))
        .unwrap_or_default();
    // The main file is never read again, even when a pattern names it.
    let mut seen = HashSet::from([base.join(path.file_name().unwrap_or_default())]);
    let mut count = 0;
    'patterns: for (pattern, span) in patterns {
        let report = |issues: &mut Vec<RawIssue>, message: String| {
            issues.push(RawIssue { span: span.clone(), key: "include".into(), message })
        };
        let files = match matches(&base.join(&pattern), &trust) {
            Ok(files) => files,
            Err(message) => {
                report(&mut issues, format!("{pattern:?}: {message}"));
                continue;
            }
        };
        for file in files {
            if !seen.insert(file.clone()) {
                continue;
            }
            count += 1;
            if count > MAX_INCLUDED_FILES {
                let message = format!(
                    "{pattern:?} names more than {MAX_INCLUDED_FILES} files in all: the rest are not read"
                );
                report(&mut issues, message);
                break 'patterns;
            }
            match read_trusted(&file, &trust) {
                Ok(text) => include_file(&mut sources, &mut issues, file, text),
                Err(message) => report(&mut issues, format!("{}: {message}", file.display())),
            }
        }
    }
    sources.issues = issues;
    sources
}

/// The `include` patterns of the main file, with their positions; nothing when the file
/// does not parse (its syntax errors are reported by validation) or has no `include` (a
/// value of the wrong type is reported there too).
fn patterns(main: &str) -> Vec<(String, std::ops::Range<usize>)> {
    let Ok(document) = DeTable::parse(main) else { return Vec::new() };
    let Some(DeValue::Array(items)) = document.get_ref().get("include").map(|v| v.get_ref()) else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| match item.get_ref() {
            DeValue::String(text) => Some((text.to_string(), item.span())),
            _ => None,
        })
        .collect()
}

/// Appends `file` to `sources`: as it is when it parses alone and holds only `[[listener]]`
/// tables, else blanked out, with its problems reported at their place in it.
fn include_file(sources: &mut Sources, issues: &mut Vec<RawIssue>, file: PathBuf, text: String) {
    let mut problems = Vec::new();
    let (document, errors) = DeTable::parse_recoverable(&text);
    for error in &errors {
        problems.push(RawIssue {
            span: error.span().unwrap_or(0..0),
            key: "syntax".into(),
            message: error.message().trim().to_owned(),
        });
    }
    if errors.is_empty() {
        for (key, value) in document.get_ref() {
            let listeners = matches!(value.get_ref(), DeValue::Array(items)
                if items.iter().all(|item| matches!(item.get_ref(), DeValue::Table(_))));
            if key.get_ref() != "listener" || !listeners {
                problems.push(RawIssue {
                    span: key.span(),
                    key: key.get_ref().to_string(),
                    message: "an included file holds only [[listener]] blocks".into(),
                });
            }
        }
    }
    let start = sources.push(file, text, !problems.is_empty());
    issues.extend(problems.into_iter().map(|mut issue| {
        issue.span = issue.span.start + start..issue.span.end + start;
        issue
    }));
}

/// Whether `name` matches `pattern` (`*`: any run of characters, `?`: one character), and
/// a leading `.` only a leading `.`.
fn wildcard_match(pattern: &[u8], name: &[u8]) -> bool {
    if name.first() == Some(&b'.') && pattern.first() != Some(&b'.') {
        return false;
    }
    // Iterative, with one backtracking point per `*`: linear in practice, never recursive.
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(&c) if c == b'?' || c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((star_p, star_n)) => {
                    p = star_p + 1;
                    n = star_n + 1;
                    star = Some((star_p, star_n + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Whose files an include may read (see the module documentation).
#[derive(Debug, Clone, Copy)]
struct Trust {
    /// The user running preforkd.
    euid: Uid,
    /// The owner of the main file.
    main_owner: u32,
}

impl Trust {
    /// Whether `uid` is a trusted owner.
    fn owner(&self, uid: u32) -> bool {
        uid == 0 || uid == self.euid.as_raw() || uid == self.main_owner
    }

    /// Whether the directory or file `meta` describes may be read.
    fn check(&self, meta: &std::fs::Metadata) -> Result<(), String> {
        let mode = meta.mode();
        if !self.owner(meta.uid()) {
            Err(format!(
                "belongs to uid {}, neither root, this user nor the main file's owner",
                meta.uid()
            ))
        } else if !self.euid.is_root() {
            Ok(())
        } else if mode & 0o002 != 0 {
            Err("is writable by others, and preforkd runs as root".into())
        } else if mode & 0o020 != 0 && meta.gid() != 0 {
            Err(format!("is writable by its group (gid {}), and preforkd runs as root", meta.gid()))
        } else {
            Ok(())
        }
    }
}

/// The files `pattern` names, in name order.
fn matches(pattern: &Path, trust: &Trust) -> Result<Vec<PathBuf>, String> {
    use std::os::unix::ffi::OsStrExt;
    let (Some(dir), Some(last)) = (pattern.parent(), pattern.file_name()) else {
        return Err("names no file".into());
    };
    let wild = |bytes: &[u8]| bytes.iter().any(|b| matches!(b, b'*' | b'?'));
    if wild(dir.as_os_str().as_bytes()) {
        return Err("wildcards are allowed in the file name only, not in directories".into());
    }
    if !wild(last.as_bytes()) {
        return Ok(vec![pattern.to_owned()]);
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(format!("directory {}: {error}", dir.display())),
    };
    let meta = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    trust.check(&meta).map_err(|why| format!("directory {}: {why}", dir.display()))?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("directory {}: {e}", dir.display()))?;
        if wildcard_match(last.as_bytes(), entry.file_name().as_bytes()) {
            names.push(entry.file_name());
        }
    }
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names.into_iter().map(|name| dir.join(name)).collect())
}

/// The text of the included file at `path`, under the rules of the module documentation.
fn read_trusted(path: &Path, trust: &Trust) -> Result<String, String> {
    let link = std::fs::symlink_metadata(path).map_err(|e| e.to_string())?;
    if link.file_type().is_symlink() && !trust.owner(link.uid()) {
        return Err(format!(
            "is a symbolic link of uid {}, which is not followed (only root's, this user's and the main file's owner's are)",
            link.uid()
        ));
    }
    let file =
        files::open_regular(path, files::MAX_CONFIG_BYTES, true).map_err(|e| e.to_string())?;
    // The descriptor's own metadata: what is read is what was checked.
    let meta = file.metadata().map_err(|e| e.to_string())?;
    trust.check(&meta)?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(file, files::MAX_CONFIG_BYTES + 1),
        &mut bytes,
    )
    .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > files::MAX_CONFIG_BYTES {
        return Err(format!("is more than the limit of {} bytes", files::MAX_CONFIG_BYTES));
    }
    String::from_utf8(bytes).map_err(|_| "is not UTF-8 text".to_owned())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn wildcards_match_as_the_shell_does_in_one_component() {
        let yes = |p: &str, n: &str| assert!(wildcard_match(p.as_bytes(), n.as_bytes()), "{p} {n}");
        let no = |p: &str, n: &str| assert!(!wildcard_match(p.as_bytes(), n.as_bytes()), "{p} {n}");
        yes("*.toml", "a.toml");
        yes("a*b*c", "abbbc");
        yes("?.toml", "x.toml");
        yes("*", "anything");
        no("*.toml", "a.toml~");
        no("*.toml", ".hidden.toml");
        yes(".*.toml", ".hidden.toml");
        no("?.toml", "xy.toml");
        no("a*b", "ac");
        yes("**", "");
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        path
    }

    #[test]
    fn files_are_read_in_name_order_and_located_in_their_own_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("conf.d")).unwrap();
        let listener = |name: &str| format!("[[listener]]\nname = \"{name}\"\n");
        write(&dir.path().join("conf.d"), "b.toml", &listener("b"));
        write(&dir.path().join("conf.d"), "a.toml", &listener("a"));
        write(&dir.path().join("conf.d"), "c.txt", &listener("c"));
        let main = dir.path().join("main.toml");
        let text = "include = [\"conf.d/*.toml\"]\n[daemon]\nworkers = 1\n".to_owned();
        let sources = expand(&main, text, nix::unistd::geteuid());
        assert!(sources.issues.is_empty(), "{:?}", sources.issues);
        let names: Vec<_> = sources.included().map(|p| p.file_name().unwrap()).collect();
        assert_eq!(names, ["a.toml", "b.toml"]);
        let at = sources.document().find("name = \"b\"").unwrap();
        let (path, line, column) = sources.locate(at);
        assert_eq!((path.file_name().unwrap().to_str().unwrap(), line, column), ("b.toml", 2, 1));
        assert_eq!(sources.locate(3).0, main);
    }

    #[test]
    fn an_included_file_holds_listeners_only_and_is_left_out_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "bad.toml", "[[listener]]\nname = \"x\"\n[daemon]\nworkers = 2\n");
        write(dir.path(), "broken.toml", "[[listener]\n");
        let main = dir.path().join("main.toml");
        let text = "include = [\"bad.toml\", \"broken.toml\", \"missing.toml\"]\n".to_owned();
        let sources = expand(&main, text, nix::unistd::geteuid());
        let issues = &sources.issues;
        let at = |issue: &RawIssue| {
            let (path, line, column) = sources.locate(issue.span.start);
            format!("{}:{line}:{column}", path.file_name().unwrap().to_str().unwrap())
        };
        let found: Vec<String> =
            issues.iter().map(|i| format!("{}: {}: {}", at(i), i.key, i.message)).collect();
        assert!(found[0].starts_with("bad.toml:3:2: daemon: an included file"), "{found:?}");
        assert!(found[1].starts_with("broken.toml:1:"), "{found:?}");
        assert!(found[2].starts_with("main.toml:1:") && found[2].contains("missing.toml"));
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(!sources.document().contains("workers"), "left out: {}", sources.document());
    }

    #[test]
    fn as_root_a_file_others_may_write_is_not_read() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: the ownership rules apply to root only (CI runs as root)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let open = write(dir.path(), "open.toml", "[[listener]]\n");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o666)).unwrap();
        let theirs = write(dir.path(), "theirs.toml", "[[listener]]\n");
        nix::unistd::chown(&theirs, Some(Uid::from_raw(1)), None).unwrap();
        let link = dir.path().join("link.toml");
        std::os::unix::fs::symlink(dir.path().join("open.toml"), &link).unwrap();
        nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            &link,
            Some(Uid::from_raw(1)),
            None,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .unwrap();
        let main = write(dir.path(), "main.rc", "include = [\"*.toml\"]\n");
        let text = std::fs::read_to_string(&main).unwrap();
        let sources = expand(&main, text.clone(), Uid::from_raw(0));
        let messages: Vec<&str> = sources.issues.iter().map(|i| i.message.as_str()).collect();
        assert_eq!(messages.len(), 3, "{messages:?}");
        assert!(messages[0].contains("link.toml: is a symbolic link of uid 1"), "{messages:?}");
        assert!(messages[1].contains("open.toml: is writable by others"), "{messages:?}");
        assert!(messages[2].contains("theirs.toml: belongs to uid 1"), "{messages:?}");
        // The main file's owner is trusted with its includes: uid 1's link and file are read
        // now (the link leads to the file others may write, still refused).
        nix::unistd::chown(&main, Some(Uid::from_raw(1)), None).unwrap();
        let sources = expand(&main, text, Uid::from_raw(0));
        let messages: Vec<&str> = sources.issues.iter().map(|i| i.message.as_str()).collect();
        assert_eq!(messages.len(), 2, "{messages:?}");
        assert!(messages[0].contains("link.toml: is writable by others"), "{messages:?}");
        assert!(messages[1].contains("open.toml: is writable by others"), "{messages:?}");
        assert_eq!(sources.included().count(), 1, "theirs.toml");
    }
}
