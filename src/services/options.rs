//! [`Options`]: a listener's `[listener.options]` table, as its service reads it.
//!
//! Runs in the master (at `check`, start and reload). Problems are collected like every other
//! configuration problem: each becomes `path:line:col: listener[N].options.KEY: message`, and
//! all of them are reported at once.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::DeTable;

use crate::duration;
use crate::schema::{RawIssue, deserialize_collecting};

/// The options were invalid; every problem was reported through [`Options`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid service options (the problems were reported)")]
pub struct Invalid;

/// A listener's `[listener.options]` table, handed to its service's build function.
///
/// ```
/// use preforkd::services::{Invalid, Options};
///
/// #[derive(serde::Deserialize)]
/// #[serde(deny_unknown_fields)]
/// struct LineOptions {
///     /// Longest line, in bytes; default 1024.
///     max_line: Option<usize>,
/// }
///
/// fn max_line(options: &mut Options<'_>) -> Result<usize, Invalid> {
///     let parsed: LineOptions = options.parse()?;
///     let max_line = parsed.max_line.unwrap_or(1024);
///     if max_line == 0 {
///         options.report("max_line", "must be at least 1");
///     }
///     options.finish(max_line)
/// }
/// ```
pub struct Options<'a> {
    table: Option<Spanned<DeTable<'a>>>,
    /// `listener[N].options`.
    prefix: String,
    /// The listener block, for problems that have no key of their own.
    listener_span: Range<usize>,
    issues: &'a mut Vec<RawIssue>,
    reported: bool,
    /// Built only to learn what the service serves ([`Options::probe`]): `finish` succeeds
    /// whatever was reported.
    probing: bool,
    /// The directory relative paths are resolved against (the main configuration file's);
    /// `None`: the current directory.
    base: Option<PathBuf>,
}

impl<'a> Options<'a> {
    pub(crate) fn new(
        table: Option<Spanned<DeTable<'a>>>,
        prefix: &str,
        listener_span: Range<usize>,
        issues: &'a mut Vec<RawIssue>,
    ) -> Self {
        Options {
            table,
            prefix: prefix.to_owned(),
            listener_span,
            issues,
            reported: false,
            probing: false,
            base: None,
        }
    }

    /// Resolves relative paths ([`Options::path`]) against `base`, the main configuration
    /// file's directory.
    pub(crate) fn with_base(mut self, base: &Path) -> Self {
        self.base = Some(base.to_path_buf());
        self
    }

    /// Options for a second, lenient build of a built-in whose options were invalid, only to
    /// ask the service which transports it serves: problems go to `scratch` (they were
    /// reported by the first build), and [`Options::finish`] succeeds whenever a value was
    /// made.
    pub(crate) fn probe(
        table: Option<Spanned<DeTable<'a>>>,
        listener_span: Range<usize>,
        scratch: &'a mut Vec<RawIssue>,
    ) -> Self {
        Options { probing: true, ..Options::new(table, "", listener_span, scratch) }
    }

    /// No `[listener.options]` table.
    pub(crate) fn absent(prefix: &str, span: Range<usize>, issues: &'a mut Vec<RawIssue>) -> Self {
        Options::new(None, prefix, span, issues)
    }

    /// Deserializes the whole table into `T` (serde; use `#[serde(deny_unknown_fields)]` so
    /// that misspelled keys are reported). Every unknown key and wrongly typed value is
    /// reported, not only the first, and left out: the value read from the rest is returned
    /// so that the build function can check it too (all problems are listed at once), and
    /// [`Options::finish`] then fails. An absent table reads as an empty one, so a `T` whose
    /// fields are all `Option` or `#[serde(default)]` needs no table at all.
    ///
    /// # Errors
    /// [`Invalid`] when nothing could be read (a required key is missing or mistyped).
    pub fn parse<T: DeserializeOwned>(&mut self) -> Result<T, Invalid> {
        let mut table = self
            .table
            .clone()
            .unwrap_or_else(|| Spanned::new(self.listener_span.clone(), DeTable::default()));
        let before = self.issues.len();
        let rounds = table.span().len();
        let parsed = deserialize_collecting(&mut table, &self.prefix, rounds, self.issues);
        if self.issues.len() > before {
            self.reported = true;
        }
        parsed.ok_or_else(|| {
            self.reported = true;
            Invalid
        })
    }

    /// Reports a problem with option `key` (its value's position when present, else the
    /// table's or the listener's): `listener[N].options.KEY: message`. A dotted key
    /// (`rlimits.nofile`) names a value in a nested table.
    pub fn report(&mut self, key: &str, message: impl Into<String>) {
        let span = self
            .table
            .as_ref()
            .and_then(|table| value_span(table.get_ref(), key))
            .or_else(|| self.table.as_ref().map(Spanned::span))
            .unwrap_or_else(|| self.listener_span.clone());
        let key =
            if key.is_empty() { self.prefix.clone() } else { format!("{}.{key}", self.prefix) };
        self.issues.push(RawIssue { span, key, message: message.into() });
        self.reported = true;
    }

    /// How a problem with option `key` is labelled: `listener[N].options.KEY`, for a warning
    /// the service logs itself.
    pub fn label(&self, key: &str) -> String {
        if key.is_empty() { self.prefix.clone() } else { format!("{}.{key}", self.prefix) }
    }

    /// A file path option (`written`, absent: `None`): a relative path is resolved against
    /// the main configuration file's directory, as every path of the file is. An empty one is
    /// reported under `key`, and `None`.
    pub fn path(&mut self, key: &str, written: Option<&str>) -> Option<PathBuf> {
        let written = written?;
        if written.is_empty() {
            self.report(key, "must be a path, not empty");
            return None;
        }
        let path = PathBuf::from(written);
        Some(match &self.base {
            Some(base) if path.is_relative() => base.join(path),
            _ => path,
        })
    }

    /// For a service that takes no options: reports every key written as unknown.
    ///
    /// # Errors
    /// [`Invalid`] when the table holds any key.
    pub fn expect_none(&mut self, service: &str) -> Result<(), Invalid> {
        let keys: Vec<(String, Range<usize>)> = match &self.table {
            Some(table) => {
                table.get_ref().iter().map(|(k, v)| (k.get_ref().to_string(), v.span())).collect()
            }
            None => Vec::new(),
        };
        for (key, span) in keys {
            self.issues.push(RawIssue {
                span,
                key: format!("{}.{key}", self.prefix),
                message: format!("unknown option: service {service:?} takes no options"),
            });
            self.reported = true;
        }
        self.finish(())
    }

    /// A humane duration option (`"10s"`, `"250ms"`, `"5m"`), as every duration in the file:
    /// `default` when absent; at most 365 days. A problem is reported under `key`.
    pub fn duration(&mut self, key: &str, value: Option<&str>, default: Duration) -> Duration {
        let Some(text) = value else { return default };
        duration::parse(text).unwrap_or_else(|message| {
            self.report(key, message);
            default
        })
    }

    /// Whether a `[listener.options]` table was written at all.
    pub fn is_present(&self) -> bool {
        self.table.is_some()
    }

    /// `Ok(value)` when nothing was reported, else `Err(Invalid)`: the last line of a build
    /// function.
    ///
    /// # Errors
    /// [`Invalid`] when [`Options::report`] or [`Options::parse`] reported a problem.
    pub fn finish<T>(&self, value: T) -> Result<T, Invalid> {
        if self.reported && !self.probing { Err(Invalid) } else { Ok(value) }
    }
}

/// The span of the value at dotted `key` in `table` (`rlimits.nofile`); the nearest
/// enclosing value's when a part is missing; `None` when the first part is.
fn value_span(table: &DeTable<'_>, key: &str) -> Option<Range<usize>> {
    let mut parts = key.split('.');
    let mut value = table.get(parts.next()?)?;
    for part in parts {
        match value.get_ref() {
            toml::de::DeValue::Table(inner) => match inner.get(part) {
                Some(next) => value = next,
                None => break,
            },
            _ => break,
        }
    }
    Some(value.span())
}
