//! `log.format = "json"`: each log line one JSON object, for journald, Loki or ELK.
//!
//! Runs in both processes, inside the logger. Pure: the caller passes the time, the
//! process's role and the record; [`render`] returns the line without its newline. The
//! members, whose names and types are stable (preforkd.toml(5), LOG FORMATS):
//!
//! - every line: `time` (RFC 3339, UTC, milliseconds, as the text format), `level`
//!   (`error`, `warn`, `info`, `debug`, `trace`), `pid`, `role` (`master`, `worker` or
//!   `spawner`, the process that starts exec's programs), `slot` (workers only) and
//!   `generation` (workers and spawners), `message` (the text the text format prints after
//!   `pid=PID: `);
//! - access lines (the `access` target: `access ...` and `datagrams ...`) add `event`
//!   (`access` or `datagrams`) and their `key=value` pairs: [`TOP_LEVEL`] as members of
//!   their own (`duration` a number of seconds, `listener`, `peer`, `reason`, `proxy` and
//!   `result` strings, the counters integers), every other pair (the service's own, such as
//!   exec's `child` and `status` or the relay's `backend`) in the object `fields`, an integer
//!   where the value is one, else a string.
//!
//! An access line is read back from its text (`EVENT KEY=VALUE ...`, a value either bare or
//! a Rust-quoted string such as tftp's `file="a b"`), so the text and the JSON never say
//! different things; a line that does not read so keeps its `message` only.

use log::Level;
use serde_json::{Map, Value};

use super::Role;

/// The access-line keys that are members of their own; the others go into `fields`.
pub const TOP_LEVEL: [&str; 14] = [
    "listener",
    "peer",
    "duration",
    "in",
    "out",
    "exchanges",
    "reason",
    "proxy",
    "result",
    "received",
    "answered",
    "over_rate",
    "ignored",
    "flows",
];

/// Keys of [`TOP_LEVEL`] whose values are strings whatever they look like.
const STRINGS: [&str; 5] = ["listener", "peer", "reason", "proxy", "result"];

/// One record, as the logger has it.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    /// RFC 3339 time.
    pub time: &'a str,
    /// Its level.
    pub level: Level,
    /// This process's pid.
    pub pid: u32,
    /// This process's role.
    pub role: Role,
    /// The `log` target (`access` for access lines).
    pub target: &'a str,
    /// The formatted message.
    pub message: &'a str,
}

/// The JSON object for `record`, at most `max` bytes when given: a longer one has its
/// `message` (and `fields`) cut and `"truncated": true`, so that it stays one valid object
/// (the file target's relay pipe takes a line whole only up to `PIPE_BUF`).
pub fn render(record: &Record<'_>, max: Option<usize>) -> String {
    let line = Value::Object(object(record, record.message, true)).to_string();
    let Some(max) = max.filter(|&max| line.len() > max) else { return line };
    // Shorter messages until it fits: each try drops at least the excess, bounded tries.
    let mut message = record.message;
    let mut excess = line.len() - max;
    for _ in 0..8 {
        let mut end = message.len().saturating_sub(excess + 16);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message = &message[..end];
        let mut value = object(record, message, false);
        value.insert("truncated".into(), Value::Bool(true));
        let line = Value::Object(value).to_string();
        if line.len() <= max {
            return line;
        }
        excess = line.len() - max;
    }
    let mut value = object(record, "", false);
    value.insert("truncated".into(), Value::Bool(true));
    Value::Object(value).to_string()
}

fn object(record: &Record<'_>, message: &str, with_fields: bool) -> Map<String, Value> {
    let mut object = Map::new();
    object.insert("time".into(), record.time.into());
    object.insert("level".into(), record.level.as_str().to_ascii_lowercase().into());
    object.insert("pid".into(), record.pid.into());
    match record.role {
        Role::Master => {
            object.insert("role".into(), "master".into());
        }
        Role::Worker { slot, generation } => {
            object.insert("role".into(), "worker".into());
            object.insert("slot".into(), slot.into());
            object.insert("generation".into(), generation.into());
        }
        Role::Spawner { generation } => {
            object.insert("role".into(), "spawner".into());
            object.insert("generation".into(), generation.into());
        }
        Role::Checker { generation } => {
            object.insert("role".into(), "checker".into());
            object.insert("generation".into(), generation.into());
        }
    }
    object.insert("message".into(), message.into());
    if record.target == super::ACCESS_TARGET
        && let Some((event, pairs)) = access_pairs(record.message)
    {
        object.insert("event".into(), event.into());
        let mut fields = Map::new();
        for (key, value) in pairs {
            if TOP_LEVEL.contains(&key.as_str()) {
                let typed = match key.as_str() {
                    "duration" => seconds(&value),
                    key if STRINGS.contains(&key) => Value::String(value),
                    _ => integer_or_string(value),
                };
                object.insert(key, typed);
            } else if with_fields {
                fields.insert(key, integer_or_string(value));
            }
        }
        if !fields.is_empty() {
            object.insert("fields".into(), Value::Object(fields));
        }
    }
    object
}

/// `"0.003s"` as the number 0.003; anything else stays a string.
fn seconds(value: &str) -> Value {
    value
        .strip_suffix('s')
        .and_then(|n| n.parse::<f64>().ok())
        .and_then(serde_json::Number::from_f64)
        .map_or_else(|| Value::String(value.to_owned()), Value::Number)
}

fn integer_or_string(value: String) -> Value {
    let integer = !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit());
    match value.parse::<u64>() {
        Ok(n) if integer => Value::from(n),
        _ => Value::String(value),
    }
}

/// `EVENT KEY=VALUE ...` read into the event and its pairs (quoted values unquoted); `None`
/// when `message` is not written so.
pub fn access_pairs(message: &str) -> Option<(&str, Vec<(String, String)>)> {
    let (event, mut rest) = message.split_once(' ').unwrap_or((message, ""));
    if event.is_empty() || !event.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
        return None;
    }
    let mut pairs = Vec::new();
    loop {
        rest = rest.trim_start_matches(' ');
        if rest.is_empty() {
            return Some((event, pairs));
        }
        let (key, after) = rest.split_once('=')?;
        if key.is_empty() || key.contains(' ') {
            return None;
        }
        let (value, after) = match after.strip_prefix('"') {
            Some(quoted) => unquote(quoted)?,
            None => {
                let end = after.find(' ').unwrap_or(after.len());
                (after[..end].to_owned(), &after[end..])
            }
        };
        pairs.push((key.to_owned(), value));
        rest = after;
    }
}

/// The Rust-quoted string (`{:?}` of a `str`) that `text` starts with, after its opening
/// quote: its value and what follows the closing quote; `None` when it does not end.
fn unquote(text: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut rest = text;
    loop {
        let at = rest.find(['"', '\\'])?;
        value.push_str(&rest[..at]);
        if rest.as_bytes()[at] == b'"' {
            return Some((value, &rest[at + 1..]));
        }
        let escaped = &rest[at + 1..];
        let c = escaped.chars().next()?;
        rest = &escaped[c.len_utf8()..];
        match c {
            'n' => value.push('\n'),
            'r' => value.push('\r'),
            't' => value.push('\t'),
            '0' => value.push('\0'),
            '\\' | '"' | '\'' => value.push(c),
            'u' => {
                let inner = rest.strip_prefix('{')?;
                let close = inner.find('}')?;
                let code = u32::from_str_radix(&inner[..close], 16).ok()?;
                value.push(char::from_u32(code)?);
                rest = &inner[close + 1..];
            }
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record<'a>(target: &'a str, message: &'a str, role: Role) -> Record<'a> {
        Record {
            time: "2026-11-22T10:00:00.123Z",
            level: Level::Info,
            pid: 42,
            role,
            target,
            message,
        }
    }

    fn parsed(line: &str) -> Map<String, Value> {
        match serde_json::from_str(line).unwrap() {
            Value::Object(object) => object,
            other => panic!("not an object: {other}"),
        }
    }

    #[test]
    fn every_line_has_the_common_members() {
        let worker = Role::Worker { slot: 3, generation: 7 };
        let line = parsed(&render(&record("preforkd", "worker started: \"x\"", worker), None));
        assert_eq!(line["time"], "2026-11-22T10:00:00.123Z");
        assert_eq!(line["level"], "info");
        assert_eq!(line["pid"], 42);
        assert_eq!((line["role"].as_str(), line["slot"].as_u64()), (Some("worker"), Some(3)));
        assert_eq!(line["generation"], 7);
        assert_eq!(line["message"], "worker started: \"x\"");
        let master = parsed(&render(&record("preforkd", "ready", Role::Master), None));
        assert!(!master.contains_key("slot") && master["role"] == "master");
    }

    #[test]
    fn an_access_line_has_typed_members_and_the_service_fields_apart() {
        let message = "access listener=git peer=127.0.0.1:4242 duration=0.055s in=10 out=2048 \
                       exchanges=1 reason=child-exit proxy=10.0.0.2:1 child=8218 status=exit:0";
        let line = parsed(&render(&record("access", message, Role::Master), None));
        assert_eq!(line["event"], "access");
        assert_eq!(line["listener"], "git");
        assert_eq!(line["peer"], "127.0.0.1:4242");
        assert_eq!(line["duration"].as_f64(), Some(0.055));
        assert_eq!((line["in"].as_u64(), line["out"].as_u64()), (Some(10), Some(2048)));
        assert_eq!(line["exchanges"], 1);
        assert_eq!(
            (line["reason"].as_str(), line["proxy"].as_str()),
            (Some("child-exit"), Some("10.0.0.2:1"))
        );
        assert_eq!(line["fields"]["child"], 8218);
        assert_eq!(line["fields"]["status"], "exit:0");
        assert_eq!(line["message"], message);
    }

    #[test]
    fn quoted_values_are_read_back_as_written() {
        let file = "a \"b\"\\c\té";
        let message = format!(
            "access listener=t peer=1.2.3.4:5 duration=0.000s file={file:?} mode=octet result=ok"
        );
        let (event, pairs) = access_pairs(&message).unwrap();
        assert_eq!(event, "access");
        let file_value = pairs.iter().find(|(k, _)| k == "file").map(|(_, v)| v.as_str());
        assert_eq!(file_value, Some(file));
        let unicode = format!("access file={:?} next=1", "\u{7f}x");
        let (_, pairs) = access_pairs(&unicode).unwrap();
        assert_eq!(pairs, [("file".into(), "\u{7f}x".into()), ("next".into(), "1".into())]);
        assert_eq!(access_pairs("not an access line"), None);
        assert_eq!(access_pairs("access file=\"unterminated"), None);
    }

    #[test]
    fn a_line_too_long_is_cut_and_stays_one_object() {
        let long = "x".repeat(10_000);
        let message = format!("access listener=a peer=1.2.3.4:5 duration=0.001s note={long}");
        let line = render(&record("access", &message, Role::Master), Some(4096));
        assert!(line.len() <= 4096, "{}", line.len());
        let line = parsed(&line);
        assert_eq!(line["truncated"], true);
        assert_eq!(line["listener"], "a", "the members of their own are kept");
        let escaped = "\u{1}".repeat(3000);
        let line = render(&record("preforkd", &escaped, Role::Master), Some(4096));
        assert!(line.len() <= 4096 && parsed(&line)["truncated"] == true);
    }
}
