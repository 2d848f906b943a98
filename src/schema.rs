//! Schema problems of a TOML document, each with its byte span, and a serde reader that
//! collects every one of them instead of stopping at the first.
//!
//! Pure; runs in the master (the configuration check) for the whole file and for each
//! service's `[listener.options]`, so both report problems the same way: a key path, a
//! span, a message, all of them at once.

use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue, Deserializer};

/// One schema or syntax problem, before it is turned into `line:col`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawIssue {
    /// Byte range in the source the problem points at.
    pub span: Range<usize>,
    /// Dotted key path, such as `listener[1].address`, or `syntax`.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

/// Deserializes `T` from `document`, removing each offending entry and trying again until the
/// rest deserializes, so that every unknown key and wrongly typed value is reported (serde
/// stops at the first). Key paths start with `prefix`. `None` when what is left cannot be
/// deserialized at all (a required field is missing).
///
/// Each round removes one entry, so the loop ends; `max_rounds` (the source's length bounds
/// the number of entries) is a second guard.
pub fn deserialize_collecting<T: serde::de::DeserializeOwned>(
    document: &mut Spanned<DeTable<'_>>,
    prefix: &str,
    max_rounds: usize,
    issues: &mut Vec<RawIssue>,
) -> Option<T> {
    for _ in 0..=max_rounds {
        match T::deserialize(Deserializer::from(document.clone())) {
            Ok(value) => return Some(value),
            Err(error) => {
                let span = error.span().unwrap_or_else(|| document.span());
                let removed = remove_entry_at(document.get_mut(), &span, prefix);
                let key = removed.clone().unwrap_or_else(|| {
                    if prefix.is_empty() { "(document)".to_owned() } else { prefix.to_owned() }
                });
                issues.push(RawIssue { span, key, message: error.message().trim().to_owned() });
                removed.as_ref()?;
            }
        }
    }
    None
}

fn contains(outer: &Range<usize>, inner: &Range<usize>) -> bool {
    outer.start <= inner.start && inner.end <= outer.end.max(inner.start)
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() { key.to_owned() } else { format!("{prefix}.{key}") }
}

/// Removes the innermost table entry whose key or value covers `span`; returns its key path.
/// Nested tables are searched first: a `[section]` table's own span may cover only its header.
fn remove_entry_at(table: &mut DeTable<'_>, span: &Range<usize>, prefix: &str) -> Option<String> {
    let keys: Vec<_> = table.keys().cloned().collect();
    for key in keys {
        let path = join(prefix, key.get_ref());
        let Some(value) = table.get_mut(&key) else {
            continue;
        };
        let covers = contains(&key.span(), span) || contains(&value.span(), span);
        let found = match value.get_mut() {
            DeValue::Table(inner) => remove_entry_at(inner, span, &path),
            DeValue::Array(items) => {
                items.iter_mut().enumerate().find_map(|(index, item)| match item.get_mut() {
                    DeValue::Table(inner) => {
                        remove_entry_at(inner, span, &format!("{path}[{index}]"))
                    }
                    _ => None,
                })
            }
            _ => None,
        };
        if found.is_some() {
            return found;
        }
        if covers {
            table.remove(&key);
            return Some(path);
        }
    }
    None
}
