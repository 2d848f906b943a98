//! Configuration errors, reported as `path:line:col: key: message`, one per line; `path` is
//! the main file or the included file the problem is in.

use std::fmt;
use std::io;
use std::path::PathBuf;

use thiserror::Error;

use super::include::Sources;
use crate::exit::ExitStatus;
use crate::schema::RawIssue;

/// Why a configuration could not be loaded.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read (missing, permissions, not UTF-8).
    #[error("could not read configuration {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The file was read but is invalid; every problem is listed.
    #[error("{}", render(issues))]
    Invalid {
        /// The main file.
        path: PathBuf,
        /// Every problem found, in the order of the files and within each in file order.
        issues: Vec<Issue>,
    },
}

/// One problem in a configuration file, located by file, line and column (both from 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// The file: the main one, or one it includes.
    pub path: PathBuf,
    /// Line, from 1.
    pub line: usize,
    /// Column in characters, from 1.
    pub column: usize,
    /// Dotted key path such as `listener[0].address`, or `syntax`.
    pub key: String,
    /// What is wrong and, where it helps, what is expected.
    pub message: String,
}

/// `line:col: key: message`; [`ConfigError`] puts the file first.
impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}: {}", self.line, self.column, self.key, self.message)
    }
}

fn render(issues: &[Issue]) -> String {
    let lines: Vec<String> =
        issues.iter().map(|issue| format!("{}:{issue}", issue.path.display())).collect();
    lines.join("\n")
}

/// Line and column (both from 1, column in characters) of byte `offset` in `source`.
pub(crate) fn line_column(source: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(source.len());
    while !source.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &source[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

impl ConfigError {
    pub(crate) fn invalid(sources: &Sources, mut raw: Vec<RawIssue>) -> Self {
        if raw.is_empty() {
            raw.push(RawIssue {
                span: 0..0,
                key: "(document)".into(),
                message: "invalid configuration".into(),
            });
        }
        raw.sort_by_key(|issue| issue.span.start);
        let issues = raw
            .into_iter()
            .map(|issue| {
                let (path, line, column) = sources.locate(issue.span.start);
                let path = path.to_owned();
                Issue { path, line, column, key: issue.key, message: issue.message }
            })
            .collect();
        ConfigError::Invalid { path: sources.main_path().to_owned(), issues }
    }

    /// The process exit status for this error: [`ExitStatus::NoInput`] when the file cannot be
    /// read, [`ExitStatus::Config`] when it is invalid.
    pub fn exit_status(&self) -> ExitStatus {
        match self {
            ConfigError::Read { .. } => ExitStatus::NoInput,
            ConfigError::Invalid { .. } => ExitStatus::Config,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::line_column;

    #[test]
    fn line_and_column_count_from_one() {
        let source = "a = 1\nbé = 2\n";
        assert_eq!(line_column(source, 0), (1, 1));
        assert_eq!(line_column(source, 6), (2, 1));
        assert_eq!(line_column(source, 10), (2, 4));
        assert_eq!(line_column(source, 999), (3, 1));
    }
}
