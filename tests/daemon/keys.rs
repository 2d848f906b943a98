//! The configuration key table (`preforkd::config::keys::KEYS`) held against what documents
//! the keys: the shipped `config/preforkd.toml`, `man/preforkd.toml.5` and the README's
//! configuration table. Each names every key, with the table's default, and says "restart"
//! exactly for the keys a reload does not simply apply.

use preforkd::config::keys::{KEYS, Key, KeyDefault, Reload};

use crate::harness::repo_file;

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_file(path)).unwrap()
}

/// The ways documents spell a key's default.
fn spellings(default: &KeyDefault) -> Vec<&'static str> {
    match default {
        KeyDefault::Value("[]") => vec!["[]", "empty", "none"],
        KeyDefault::Value(text) => vec![text.trim_matches('"')],
        KeyDefault::Absent(words) => vec![words],
        KeyDefault::Inherit(key) => spellings(&key.default),
        KeyDefault::Required => vec!["required", "Required"],
    }
}

/// Whether `word` occurs in `text` as a whole token (not inside a longer number or name).
fn has_token(text: &str, word: &str) -> bool {
    let part_of_word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    text.match_indices(word).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + word.len()..].chars().next();
        !before.is_some_and(part_of_word) && !after.is_some_and(part_of_word)
    })
}

/// Whether `text` says what `key`'s default is: after its first "default" (any case), or
/// anywhere for a required key.
fn states_default(text: &str, key: &Key) -> bool {
    let from = match key.default {
        KeyDefault::Required => text,
        _ => match text.to_lowercase().find("default") {
            Some(at) => &text[at..],
            None => return false,
        },
    };
    spellings(&key.default).iter().any(|s| has_token(from, s))
}

/// The problem with what `text` says of `key`'s reload behaviour, if any.
fn reload_problem(text: &str, key: &Key) -> Option<String> {
    let says_restart = text.to_lowercase().contains("restart");
    match (key.reload, says_restart) {
        (Reload::Applies, true) => Some("says a restart is needed; a reload applies it".into()),
        (Reload::Restart | Reload::UpToStart, false) => {
            Some(format!("does not say it needs a restart ({:?})", key.reload))
        }
        _ => None,
    }
}

/// The man page's entry of `key`: its `.It Ic` line in the key's section and the text that
/// follows (shared by consecutive `.It` lines), up to the next entry.
fn man_entry(page: &str, key: &Key) -> Option<String> {
    // The top level's one key, `include`, has a section of its own; `listener.tls` is
    // documented under `.Sh LISTENER TLS`.
    let heading = match key.section() {
        "" => ".Sh INCLUDES".to_owned(),
        section => format!(".Sh {}", section.replace('.', " ").to_uppercase()),
    };
    let section: Vec<&str> = page
        .lines()
        .skip_while(|l| *l != heading)
        .skip(1)
        .take_while(|l| !l.starts_with(".Sh "))
        .collect();
    let item = format!(".It Ic {} ", key.field());
    let start = section.iter().position(|l| l.starts_with(&item))?;
    let body = section[start..]
        .iter()
        .skip_while(|l| l.starts_with(".It "))
        .take_while(|l| !l.starts_with(".It Ic ") && !l.starts_with(".El"));
    Some(body.copied().collect::<Vec<_>>().join("\n"))
}

/// The shipped file's paragraph that shows `key`: from the blank line before its line
/// (`key =`, or commented out, or `[listener.options]` for a table) to that line. A
/// section's heading may be commented out too (the TLS example).
fn shipped_paragraph(shipped: &str, key: &Key) -> Option<String> {
    let lines: Vec<&str> = shipped.lines().collect();
    let uncommented = |l: &str| l.trim_start().trim_start_matches('#').trim_start().to_owned();
    let heading = match key.section() {
        "listener" => "[[listener]]".to_owned(),
        "listener.tls.sni" => "[[listener.tls.sni]]".to_owned(),
        section => format!("[{section}]"),
    };
    let nested = key.section().starts_with("listener.");
    let shows = |l: &&str| {
        let l = uncommented(l);
        l.starts_with(&format!("{} =", key.field())) || l == format!("[{}]", key.name)
    };
    let paragraph = |at: usize| {
        let start = lines[..at].iter().rposition(|l| l.trim().is_empty()).map_or(0, |n| n + 1);
        lines[start..=at].join("\n")
    };
    if key.section().is_empty() {
        // A key of the top level comes before any table.
        let end = lines.iter().position(|l| l.starts_with('[')).unwrap_or(lines.len());
        return lines[..end].iter().position(shows).map(paragraph);
    }
    // The first block under the heading that shows the key.
    for from in (0..lines.len()).filter(|&i| uncommented(lines[i]) == heading) {
        let end = lines[from + 1..]
            .iter()
            .position(|l| {
                let l = uncommented(l);
                l.starts_with('[')
                    && (key.section() != "listener" || l.starts_with("[["))
                    && (nested || !l.starts_with("[listener."))
            })
            .map_or(lines.len(), |n| from + 1 + n);
        if let Some(n) = lines[from..end].iter().position(shows) {
            return Some(paragraph(from + n));
        }
    }
    None
}

/// The README configuration table's row naming `key`, as (keys cell, default cell).
fn readme_row(readme: &str, key: &Key) -> Option<(String, String)> {
    let table = readme
        .lines()
        .skip_while(|l| *l != "## Configuration")
        .skip(1)
        .take_while(|l| !l.starts_with("## "))
        .filter(|l| l.starts_with("| "));
    for row in table {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let (Some(keys), Some(default)) = (cells.get(1), cells.get(2)) else { continue };
        // `section.key`, then `other_key` or `.other_key` of the same section.
        let named: Vec<&str> = keys.split('`').skip(1).step_by(2).collect();
        let section = named.first().and_then(|k| k.trim_start_matches('[').rsplit_once('.'));
        let names = |n: &&str| {
            *n == key.name
                || *n == format!("[{}]", key.name)
                || (section.is_some_and(|(s, _)| s == key.section())
                    && n.trim_start_matches('.') == key.field())
        };
        if named.iter().any(names) {
            return Some(((*keys).to_owned(), (*default).to_owned()));
        }
    }
    None
}

#[test]
fn every_key_is_documented_with_its_default_and_reload_behaviour() {
    let shipped = read("config/preforkd.toml");
    let page = read("man/preforkd.toml.5");
    let readme = read("README.md");
    let mut problems = Vec::new();
    for key in KEYS {
        let name = key.name;
        let defaults = spellings(&key.default).join(" or ");
        match shipped_paragraph(&shipped, key) {
            None => problems.push(format!("config/preforkd.toml does not show {name}")),
            Some(paragraph) => {
                if !states_default(&paragraph, key) {
                    problems
                        .push(format!("config/preforkd.toml: {name}: default {defaults} not said"));
                }
                if let Some(problem) = reload_problem(&paragraph, key) {
                    problems.push(format!("config/preforkd.toml: {name}: {problem}"));
                }
            }
        }
        match man_entry(&page, key) {
            None => problems.push(format!("man/preforkd.toml.5 does not document {name}")),
            Some(entry) => {
                if !states_default(&entry, key) {
                    problems
                        .push(format!("man/preforkd.toml.5: {name}: default {defaults} not said"));
                }
                if let Some(problem) = reload_problem(&entry, key) {
                    problems.push(format!("man/preforkd.toml.5: {name}: {problem}"));
                }
            }
        }
        match readme_row(&readme, key) {
            None => problems.push(format!("README.md: the configuration table lacks {name}")),
            Some((_, default)) => {
                if !spellings(&key.default).iter().any(|s| has_token(&default, s)) {
                    problems
                        .push(format!("README.md: {name}: default {defaults} not in {default:?}"));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{} problems:\n{}", problems.len(), problems.join("\n"));
}

#[test]
fn the_checks_tell_a_documented_key_from_an_undocumented_one() {
    let key = &preforkd::config::keys::BACKLOG;
    let page =
        ".Sh LISTENER\n.Bl -tag\n.It Ic backlog No = Ar integer\nQueue.\nDefault: 1024.\n.El\n";
    assert!(states_default(&man_entry(page, key).unwrap(), key));
    let wrong = page.replace("1024", "10240");
    assert!(!states_default(&man_entry(&wrong, key).unwrap(), key), "10240 is not 1024");
    assert_eq!(man_entry(&page.replace(".Sh LISTENER", ".Sh DAEMON"), key), None);
    assert!(reload_problem("Default: 1024 (restart).", key).is_some());
    let shipped = "[[listener]]\nname = \"a\"\n\n# Queue. Default: 1024.\nbacklog = 1024\n";
    assert!(states_default(&shipped_paragraph(shipped, key).unwrap(), key));
    let readme = "## Configuration\n\n| `listener.tcp_nodelay` / `backlog` | `true` / 1024 | x |\n";
    assert_eq!(readme_row(readme, key).unwrap().1, "`true` / 1024");
    assert_eq!(readme_row(&readme.replace("listener.", "daemon."), key), None);
}
