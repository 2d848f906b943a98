//! xinetd's services, as read by [`mod@super::xinetd`], mapped onto preforkd listeners: each
//! attribute either becomes keys of the listener or of its `[listener.options]`, or a
//! [`Note`] saying where it is and why preforkd has no equivalent.
//!
//! Runs in `preforkd import xinetd`. Pure but for the services(5) lookup, passed in.
//!
//! The semantics are xinetd.conf(5)'s: a service inherits every attribute of `defaults` it
//! does not set itself; `+=` adds values to the inherited ones, `-=` removes some, `=`
//! replaces them; `disabled` and `enabled` in `defaults` name services by `id` or name. A
//! service is identified by its `id` (default: its name), which becomes the listener's name.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::etc_services::Services;
use super::xinetd::{Attribute, Kind, Op, Origin, Section};

/// The inetd internal services preforkd has built in.
const INTERNAL: [&str; 5] = ["echo", "discard", "chargen", "daytime", "time"];

/// Servers recognised as a TFTP daemon, whose `dgram` + `wait = yes` service becomes the
/// built-in tftp.
const TFTP_SERVERS: [&str; 2] = ["in.tftpd", "tftpd"];

/// An attribute preforkd has no equivalent for, or a service it does not convert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// Where it is written.
    pub origin: Origin,
    /// The attribute (or `service`).
    pub attribute: String,
    /// Why it is not converted.
    pub message: String,
}

impl std::fmt::Display for Note {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}: {}", self.origin, self.attribute, self.message)
    }
}

/// One `key = value` line of the output, the value already in TOML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key.
    pub key: String,
    /// The value, as TOML.
    pub value: String,
    /// A comment after it: the xinetd attribute it comes from and anything to know.
    pub comment: String,
}

/// A converted service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    /// The service's section.
    pub origin: Origin,
    /// `service NAME`.
    pub service: String,
    /// The listener's keys, `name`, `address` and `service` first.
    pub entries: Vec<Entry>,
    /// Its `[listener.options]`.
    pub options: Vec<Entry>,
    /// Why it is written commented out (disabled in xinetd), if it is.
    pub disabled: Option<String>,
}

/// A service written as a comment only: it has no equivalent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The service's section.
    pub origin: Origin,
    /// `service NAME`.
    pub service: String,
    /// Why.
    pub reason: String,
}

/// What a conversion made.
#[derive(Debug, Default, Clone)]
pub struct Converted {
    /// The services converted, in the order read.
    pub listeners: Vec<Listener>,
    /// The services not converted.
    pub skipped: Vec<Skipped>,
    /// `[log]` entries, from `defaults`' `log_type`.
    pub log: Vec<Entry>,
    /// Everything not converted, in the order met.
    pub notes: Vec<Note>,
}

/// `"..."`: a TOML basic string.
pub fn quote(text: &str) -> String {
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('"');
    for c in text.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            '\n' => quoted.push_str("\\n"),
            '\t' => quoted.push_str("\\t"),
            '\r' => quoted.push_str("\\r"),
            c if c.is_control() => quoted.push_str(&format!("\\u{:04X}", c as u32)),
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

/// `["a", "b"]`.
fn array(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|item| quote(item)).collect();
    format!("[{}]", quoted.join(", "))
}

/// An attribute after `defaults` and the operators: its values and where it was last set.
#[derive(Debug, Clone)]
struct Merged {
    name: String,
    values: Vec<String>,
    origin: Origin,
}

/// The attributes of a service: `defaults`' first, then its own, operators applied.
fn merge(defaults: &[Attribute], own: &[Attribute]) -> Vec<Merged> {
    let mut merged: Vec<Merged> = Vec::new();
    for attribute in defaults.iter().chain(own) {
        // Read once for all services (`convert`), not inherited.
        if matches!(attribute.name.as_str(), "enabled" | "disabled" | "log_type")
            && defaults.contains(attribute)
        {
            continue;
        }
        let existing = merged.iter_mut().find(|m| m.name == attribute.name);
        match (attribute.op, existing) {
            (Op::Set, Some(existing)) => {
                existing.values.clone_from(&attribute.values);
                existing.origin = attribute.origin.clone();
            }
            (Op::Add, Some(existing)) => {
                for value in &attribute.values {
                    if !existing.values.contains(value) {
                        existing.values.push(value.clone());
                    }
                }
                existing.origin = attribute.origin.clone();
            }
            (Op::Remove, Some(existing)) => {
                existing.values.retain(|v| !attribute.values.contains(v));
                existing.origin = attribute.origin.clone();
            }
            (Op::Remove, None) => merged.push(Merged {
                name: attribute.name.clone(),
                values: Vec::new(),
                origin: attribute.origin.clone(),
            }),
            (Op::Set | Op::Add, None) => merged.push(Merged {
                name: attribute.name.clone(),
                values: attribute.values.clone(),
                origin: attribute.origin.clone(),
            }),
        }
    }
    merged
}

/// What serves a converted service.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Serves {
    Builtin(&'static str),
    Exec,
    Relay,
    Tftp,
}

/// Converts `sections` (the order of files and sections read), looking ports up in
/// `services`.
pub fn convert(sections: &[Section], services: &Services) -> Converted {
    let mut converted = Converted::default();
    let mut defaults: Vec<Attribute> = Vec::new();
    for section in sections.iter().filter(|s| s.kind == Kind::Defaults) {
        defaults.extend(section.attributes.iter().cloned());
    }
    let listed = |name: &str| {
        defaults
            .iter()
            .filter(|a| a.name == name)
            .flat_map(|a| a.values.iter().cloned())
            .collect::<Vec<String>>()
    };
    let (disabled, enabled) = (listed("disabled"), listed("enabled"));
    let has_enabled = defaults.iter().any(|a| a.name == "enabled");
    if let Some(attribute) = defaults.iter().rfind(|a| a.name == "log_type") {
        converted.log = log_type(attribute, &mut converted.notes);
    }
    let mut names: Vec<String> = Vec::new();
    // The services by id, as xinetd keys them: a second one of an id is refused.
    let mut ids: Vec<(String, Origin)> = Vec::new();
    for section in sections {
        let Kind::Service(name) = &section.kind else { continue };
        let merged = merge(&defaults, &section.attributes);
        let id = merged
            .iter()
            .find(|m| m.name == "id")
            .and_then(|m| m.values.first().cloned())
            .unwrap_or_else(|| name.clone());
        let mut service = Service::new(section, name, &merged, &mut converted.notes);
        let off_by_defaults = disabled.iter().any(|d| *d == id || d == name)
            || (has_enabled && !enabled.iter().any(|e| *e == id || e == name));
        match service.convert(services) {
            Ok(mut listener) => {
                listener.entries.insert(
                    0,
                    Entry {
                        key: "name".into(),
                        value: quote(&unique_name(&id, &listener, &mut names)),
                        comment: String::new(),
                    },
                );
                if listener.disabled.is_none() && off_by_defaults {
                    listener.disabled =
                        Some("disabled in xinetd by the defaults' enabled/disabled".into());
                }
                if listener.disabled.is_none() {
                    match ids.iter().find(|(seen, _)| *seen == id) {
                        Some((_, first)) => {
                            let why = format!(
                                "id {id} is already the service of {first}, and xinetd refuses a second"
                            );
                            converted.notes.push(Note {
                                origin: section.origin.clone(),
                                attribute: "id".into(),
                                message: format!("{why}: written commented out"),
                            });
                            listener.disabled = Some(why);
                        }
                        None => ids.push((id.clone(), section.origin.clone())),
                    }
                }
                converted.listeners.push(listener);
            }
            Err(reason) => {
                converted.notes.push(Note {
                    origin: section.origin.clone(),
                    attribute: "service".into(),
                    message: format!("{name} is not converted: {reason}"),
                });
                converted.skipped.push(Skipped {
                    origin: section.origin.clone(),
                    service: name.clone(),
                    reason,
                });
            }
        }
    }
    converted
}

/// A listener name from `id`: the characters preforkd accepts, made unique.
fn unique_name(id: &str, listener: &Listener, names: &mut Vec<String>) -> String {
    let clean: String = id
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '-' })
        .collect();
    let clean = if clean.is_empty() { "service".to_owned() } else { clean };
    let udp = listener.entries.iter().any(|e| e.key == "transport" && e.value == "\"udp\"");
    let mut candidate = clean.clone();
    if names.contains(&candidate) && udp && !clean.ends_with("-udp") {
        candidate = format!("{clean}-udp");
    }
    let mut n = 2;
    while names.contains(&candidate) {
        candidate = format!("{clean}-{n}");
        n += 1;
    }
    names.push(candidate.clone());
    candidate
}

/// `log_type` of `defaults`: `SYSLOG facility [level]` or `FILE path [limits]`.
fn log_type(attribute: &Attribute, notes: &mut Vec<Note>) -> Vec<Entry> {
    let note = |notes: &mut Vec<Note>, message: String| {
        notes.push(Note { origin: attribute.origin.clone(), attribute: "log_type".into(), message })
    };
    let comment = "log_type".to_owned();
    match attribute.values.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["SYSLOG", facility, rest @ ..] => {
            if !rest.is_empty() {
                note(
                    notes,
                    format!(
                        "the level {} has no equivalent: preforkd's log.level is the daemon's, not a syslog level per line",
                        rest.join(" ")
                    ),
                );
            }
            vec![
                Entry { key: "target".into(), value: quote("syslog"), comment: comment.clone() },
                Entry { key: "facility".into(), value: quote(facility), comment },
            ]
        }
        ["FILE", path, rest @ ..] => {
            if !rest.is_empty() {
                note(notes, "the size limits have no equivalent: rotate with logrotate and `preforkd reopen`".into());
            }
            vec![
                Entry { key: "target".into(), value: quote("file"), comment: comment.clone() },
                Entry { key: "path".into(), value: quote(path), comment },
            ]
        }
        _ => {
            note(notes, "not SYSLOG FACILITY or FILE PATH: not converted".into());
            Vec::new()
        }
    }
}

/// One service being converted.
struct Service<'a> {
    section: &'a Section,
    name: &'a str,
    merged: &'a [Merged],
    notes: &'a mut Vec<Note>,
}

impl<'a> Service<'a> {
    fn new(
        section: &'a Section,
        name: &'a str,
        merged: &'a [Merged],
        notes: &'a mut Vec<Note>,
    ) -> Self {
        Service { section, name, merged, notes }
    }

    fn get(&self, name: &str) -> Option<&'a Merged> {
        self.merged.iter().find(|m| m.name == name)
    }

    fn first(&self, name: &str) -> Option<&'a str> {
        self.get(name).and_then(|m| m.values.first()).map(String::as_str)
    }

    fn yes(&self, name: &str) -> Option<bool> {
        self.first(name).map(|v| v.eq_ignore_ascii_case("yes"))
    }

    fn note(&mut self, merged: &Merged, message: impl Into<String>) {
        self.notes.push(Note {
            origin: merged.origin.clone(),
            attribute: merged.name.clone(),
            message: message.into(),
        });
    }

    /// What serves it, its transport and address; `Err` with the reason when preforkd has
    /// no equivalent.
    fn convert(&mut self, services: &Services) -> Result<Listener, String> {
        let types: Vec<String> = self
            .get("type")
            .map(|m| m.values.clone())
            .unwrap_or_default()
            .iter()
            .map(|t| t.to_ascii_uppercase())
            .collect();
        for unsupported in ["RPC", "TCPMUX", "TCPMUXPLUS"] {
            if types.iter().any(|t| t == unsupported) {
                return Err(format!(
                    "type {unsupported}: preforkd serves no {unsupported} service"
                ));
            }
        }
        let internal = types.iter().any(|t| t == "INTERNAL");
        let socket_type = self.first("socket_type").unwrap_or_default();
        let transport = match socket_type {
            "stream" => "tcp",
            "dgram" => "udp",
            "" => return Err("no socket_type".into()),
            other => {
                return Err(format!(
                    "socket_type {other}: preforkd serves stream (TCP) and dgram (UDP) sockets only"
                ));
            }
        };
        if let Some(protocol) = self.first("protocol")
            && protocol != transport
        {
            return Err(format!(
                "protocol {protocol} with socket_type {socket_type}: preforkd serves TCP streams and UDP datagrams only"
            ));
        }
        let wait = self.yes("wait").unwrap_or(false);
        let server = self.first("server");
        let serves = if internal {
            let builtin = INTERNAL
                .into_iter()
                .find(|b| *b == self.name)
                .ok_or_else(|| format!("xinetd's internal service {:?} has no equivalent (preforkd's built-ins: {}; `preforkd status` lists the workers)", self.name, INTERNAL.join(", ")))?;
            if transport == "udp" && matches!(builtin, "chargen" | "discard") {
                return Err(format!(
                    "{builtin} over UDP: preforkd refuses it ({})",
                    if builtin == "chargen" {
                        "an amplifier of spoofed requests"
                    } else {
                        "nothing to answer"
                    }
                ));
            }
            Serves::Builtin(builtin)
        } else if self.get("redirect").is_some() {
            if transport == "udp" {
                return Err("redirect of datagrams: preforkd's relay is TCP only".into());
            }
            Serves::Relay
        } else if let Some(server) = server {
            let base = server.rsplit('/').next().unwrap_or(server);
            match (transport, wait) {
                ("udp", true) if TFTP_SERVERS.contains(&base) => Serves::Tftp,
                ("udp", _) => {
                    return Err(format!(
                        "{server} over UDP: preforkd's exec runs a program per TCP connection only (TFTP servers, {}, become the built-in tftp)",
                        TFTP_SERVERS.join(" and ")
                    ));
                }
                (_, true) => {
                    return Err("wait = yes on a stream: the server accepts connections itself, which exec (a program per connection) does not do".into());
                }
                _ => Serves::Exec,
            }
        } else {
            return Err("neither INTERNAL, redirect nor server: nothing serves it".into());
        };
        let port = match self.first("port") {
            Some(port) => {
                port.parse::<u16>().map_err(|_| format!("port {port:?} is not a port number"))?
            }
            None if types.iter().any(|t| t == "UNLISTED") => {
                return Err("UNLISTED without a port".into());
            }
            None => services.port(self.name, transport).ok_or_else(|| {
                format!(
                    "no port: {:?} is not in /etc/services for {transport}, and no port is set",
                    self.name
                )
            })?,
        };
        let flags: Vec<String> = self
            .get("flags")
            .map(|m| m.values.iter().map(|f| f.to_ascii_uppercase()).collect())
            .unwrap_or_default();
        let ip: IpAddr = match self.first("bind").or(self.first("interface")) {
            Some(address) => address.parse().map_err(|_| {
                format!("bind {address:?}: preforkd binds addresses, not interface or host names")
            })?,
            None if flags.iter().any(|f| f == "IPV6") => Ipv6Addr::UNSPECIFIED.into(),
            None => Ipv4Addr::UNSPECIFIED.into(),
        };
        let address = std::net::SocketAddr::new(ip, port);
        let mut listener = Listener {
            origin: self.section.origin.clone(),
            service: self.name.to_owned(),
            entries: vec![Entry {
                key: "address".into(),
                value: quote(&address.to_string()),
                comment: String::new(),
            }],
            options: Vec::new(),
            disabled: None,
        };
        let service_name = match &serves {
            Serves::Builtin(name) => name,
            Serves::Exec => "exec",
            Serves::Relay => "relay",
            Serves::Tftp => "tftp",
        };
        listener.entries.push(Entry {
            key: "service".into(),
            value: quote(service_name),
            comment: String::new(),
        });
        if transport == "udp" {
            listener.entries.push(Entry {
                key: "transport".into(),
                value: quote("udp"),
                comment: "socket_type = dgram".into(),
            });
        }
        for merged in self.merged {
            self.attribute(merged, &serves, &mut listener);
        }
        if serves == Serves::Exec && self.get("groups").is_none() {
            listener.options.push(Entry {
                key: "groups".into(),
                value: "[]".into(),
                comment: "xinetd's default, groups = no: no supplementary groups".into(),
            });
        }
        // What the program is first, then who runs it, then the rest, as written.
        const FIRST: [&str; 7] = ["program", "args", "root", "backends", "user", "group", "groups"];
        let rank =
            |entry: &Entry| FIRST.iter().position(|k| *k == entry.key).unwrap_or(FIRST.len());
        listener.options.sort_by_key(rank);
        Ok(listener)
    }

    /// Maps one attribute onto `listener`, or notes why it cannot be.
    fn attribute(&mut self, merged: &Merged, serves: &Serves, listener: &mut Listener) {
        let exec = *serves == Serves::Exec;
        let values = &merged.values;
        let first = values.first().map(String::as_str).unwrap_or_default();
        let entry = |key: &str, value: String, comment: &str| Entry {
            key: key.into(),
            value,
            comment: comment.into(),
        };
        let name = merged.name.as_str();
        match name {
            // Read by `convert`.
            "id" | "type" | "socket_type" | "protocol" | "wait" | "port" | "bind" | "interface" => {}
            "disable" => {
                if first.eq_ignore_ascii_case("yes") {
                    listener.disabled = Some("disabled in xinetd (disable = yes)".into());
                }
            }
            "server" if exec => listener.options.insert(0, entry("program", quote(first), "server")),
            "server" if *serves == Serves::Tftp => {}
            "server" => self.note(merged, "not used: the service is served by preforkd itself"),
            "server_args" => self.server_args(merged, serves, listener),
            "redirect" => match values.as_slice() {
                [host, port] => listener.options.push(entry(
                    "backends",
                    array(&[format!("{}:{port}", if host.contains(':') { format!("[{host}]") } else { host.clone() })]),
                    "redirect",
                )),
                _ => self.note(merged, "expected HOST PORT"),
            },
            "flags" => {
                for flag in values {
                    match flag.to_ascii_uppercase().as_str() {
                        // preforkd sets SO_REUSEADDR on every listener; the address family
                        // is the address's.
                        "REUSE" | "IPV4" | "IPV6" => {}
                        "NODELAY" => listener.entries.push(entry("tcp_nodelay", "true".into(), "flags = NODELAY")),
                        "NAMEINARGS" => {}
                        "NOLIBWRAP" => {}
                        "KEEPALIVE" => self.note(merged, "KEEPALIVE: preforkd sets no SO_KEEPALIVE; its idle timeouts close silent connections"),
                        other => self.note(merged, format!("{other}: no equivalent")),
                    }
                }
            }
            "user" if exec && (first == "root" || first == "0") => self.note(
                merged,
                "root: preforkd runs no program as root; it runs as exec's default user, preforkd-exec, unless you name another",
            ),
            "user" | "group" if exec => listener.options.push(entry(name, quote(first), name)),
            // xinetd serves its internal services in its own process, whatever they say;
            // preforkd's workers serve them.
            "user" | "group" if matches!(serves, Serves::Builtin(_)) => {}
            "user" | "group" => self.note(merged, format!("{name} = {first}: the service runs in preforkd's workers, as daemon.user")),
            "groups" if exec => {
                if !first.eq_ignore_ascii_case("yes") {
                    listener.options.push(entry("groups", "[]".into(), "groups = no: no supplementary groups"));
                }
            }
            "groups" => self.note(merged, "the service runs in preforkd's workers, with their groups"),
            "instances" => {
                if first.eq_ignore_ascii_case("UNLIMITED") {
                } else if let Ok(n) = first.parse::<u32>() {
                    if exec {
                        listener.options.push(entry("max_instances", n.to_string(), "instances"));
                    } else {
                        listener.entries.push(entry("max_connections", n.to_string(), "instances"));
                    }
                } else {
                    self.note(merged, format!("{first:?} is not a number or UNLIMITED"));
                }
            }
            "per_source" => {
                let n = if first.eq_ignore_ascii_case("UNLIMITED") { Some(0) } else { first.parse::<u32>().ok() };
                match n {
                    Some(n) => listener.entries.push(entry("max_connections_per_client", n.to_string(), "per_source")),
                    None => self.note(merged, format!("{first:?} is not a number or UNLIMITED")),
                }
            }
            "cps" => match values.as_slice() {
                [rate, wait] if rate.parse::<u32>().is_ok_and(|r| r > 0) => listener.entries.push(entry(
                    "max_connection_rate_per_client",
                    quote(&format!("{rate}/s")),
                    &format!("cps = {rate} {wait}: xinetd counts the whole service and then stops it {wait}s; preforkd holds each client to the rate instead"),
                )),
                _ => self.note(merged, "expected RATE WAIT, RATE a positive number"),
            },
            "only_from" | "no_access" => {
                let key = if name == "only_from" { "allow" } else { "deny" };
                let mut nets = Vec::new();
                for value in values {
                    match xinetd_net(value) {
                        Ok(mut found) => nets.append(&mut found),
                        Err(why) => self.note(merged, format!("{value:?}: {why}")),
                    }
                }
                if name == "only_from" && values.is_empty() {
                    // xinetd: an empty only_from lets no one in.
                    listener.entries.push(entry("deny", array(&["0.0.0.0/0".into(), "::/0".into()]), "only_from = (empty): no one"));
                } else if !nets.is_empty() {
                    listener.entries.push(entry(key, array(&nets), name));
                }
            }
            "log_on_success" | "log_on_failure" => {
                for value in values {
                    match value.to_ascii_uppercase().as_str() {
                        "PID" | "HOST" | "EXIT" | "DURATION" | "TRAFFIC" | "ATTEMPT" => {}
                        "USERID" => self.note(merged, "USERID: preforkd makes no ident (RFC 1413) lookups"),
                        other => self.note(merged, format!("{other}: no equivalent")),
                    }
                }
            }
            "log_type" => self.note(merged, "per service: preforkd has one log for all listeners (log.target)"),
            "env" if exec => {
                let mut table = BTreeMap::new();
                for value in values {
                    match value.split_once('=') {
                        Some((key, value)) => {
                            table.insert(key.to_owned(), value.to_owned());
                        }
                        None => self.note(merged, format!("{value:?} is not NAME=VALUE")),
                    }
                }
                if !table.is_empty() {
                    let pairs: Vec<String> = table.iter().map(|(k, v)| format!("{} = {}", quote(k), quote(v))).collect();
                    listener.options.push(entry("env", format!("{{ {} }}", pairs.join(", ")), "env"));
                }
            }
            "passenv" if exec => {
                if !values.is_empty() {
                    listener.options.push(entry("pass_env", array(values), "passenv"));
                }
            }
            "env" | "passenv" => self.note(merged, "no program is run: the service is served by preforkd itself"),
            "banner" | "banner_success" | "banner_fail" => {
                let key = if name == "banner_fail" { "banner_fail" } else { "banner" };
                let value = format!("{{ file = {} }}", quote(first));
                let taken = listener.entries.iter().any(|e| e.key == key);
                if name == "banner" && self.get("banner_success").is_some() {
                    self.note(merged, "xinetd sends banner, then banner_success; preforkd sends banner_success only");
                } else if !taken {
                    listener.entries.push(entry(key, value.clone(), name));
                }
                // xinetd's banner goes to every client, refused ones too.
                if name == "banner" && self.get("banner_fail").is_none() {
                    listener.entries.push(entry("banner_fail", value, "banner (sent to refused clients too)"));
                }
            }
            "umask" if exec => listener.options.push(entry("umask", quote(first), "umask")),
            "nice" if exec => match first.parse::<i64>() {
                Ok(n) => listener.options.push(entry("nice", n.to_string(), "nice")),
                Err(_) => self.note(merged, format!("{first:?} is not a number")),
            },
            "rlimit_as" | "rlimit_cpu" | "rlimit_data" | "rlimit_rss" | "rlimit_stack" | "rlimit_files" if exec => {
                let key = match name {
                    "rlimit_files" => "nofile",
                    other => &other["rlimit_".len()..],
                };
                let value = if first.eq_ignore_ascii_case("UNLIMITED") {
                    quote("unlimited")
                } else if first.bytes().all(|b| b.is_ascii_digit()) && !first.is_empty() {
                    first.to_owned()
                } else {
                    quote(first)
                };
                match listener.options.iter_mut().find(|e| e.key == "rlimits") {
                    Some(rlimits) => {
                        let inner = rlimits.value.trim_start_matches("{ ").trim_end_matches(" }");
                        rlimits.value = format!("{{ {inner}, {key} = {value} }}");
                        rlimits.comment.push_str(&format!(", {name}"));
                    }
                    None => listener.options.push(entry("rlimits", format!("{{ {key} = {value} }}"), name)),
                }
            }
            "umask" | "nice" | "rlimit_as" | "rlimit_cpu" | "rlimit_data" | "rlimit_rss" | "rlimit_stack" | "rlimit_files" => {
                self.note(merged, "no program is run: the service is served by preforkd's workers")
            }
            "v6only" => {
                if !first.eq_ignore_ascii_case("yes") {
                    self.note(merged, "no: preforkd's IPv6 listeners take IPv6 only; add an IPv4 listener for IPv4 clients");
                }
            }
            "libwrap" => self.note(merged, "preforkd has no TCP wrappers: write allow and deny"),
            "access_times" => self.note(merged, "no equivalent: preforkd serves at all times"),
            "max_load" => self.note(merged, "no equivalent: preforkd does not refuse by load average"),
            "deny_time" => self.note(merged, "no equivalent (SENSOR)"),
            "mdns" => self.note(merged, "no equivalent: preforkd announces nothing"),
            "rpc_version" | "rpc_number" => self.note(merged, "no RPC services"),
            "enabled" | "disabled" => self.note(merged, "only read in defaults"),
            _ => self.note(merged, "unknown attribute: not converted"),
        }
    }

    /// `server_args`: exec's `args` (after the program's own name with NAMEINARGS), or the
    /// tftp root (`-s DIR`) and write permission (`-c`).
    fn server_args(&mut self, merged: &Merged, serves: &Serves, listener: &mut Listener) {
        let values = &merged.values;
        let nameinargs = self
            .get("flags")
            .is_some_and(|f| f.values.iter().any(|v| v.eq_ignore_ascii_case("NAMEINARGS")));
        match serves {
            Serves::Exec => {
                let args = if nameinargs {
                    let server = self.first("server").unwrap_or_default();
                    let base = |p: &str| p.rsplit('/').next().unwrap_or(p).to_owned();
                    if values.first().is_some_and(|v| base(v) != base(server)) {
                        self.note(merged, "NAMEINARGS with another program as argv[0] (such as tcpd's): preforkd runs `program` with itself as argv[0]");
                    }
                    values.get(1..).unwrap_or_default().to_vec()
                } else {
                    values.clone()
                };
                if !args.is_empty() {
                    listener.options.push(Entry {
                        key: "args".into(),
                        value: array(&args),
                        comment: "server_args".into(),
                    });
                }
            }
            Serves::Tftp => {
                let mut words = values.iter().map(String::as_str).peekable();
                let mut root = None;
                while let Some(word) = words.next() {
                    match word {
                        "-s" | "--secure" => root = words.next(),
                        "-c" | "--create" => listener.options.push(Entry {
                            key: "allow_write".into(),
                            value: "true".into(),
                            comment: "in.tftpd -c".into(),
                        }),
                        "-v" | "-vv" | "-vvv" | "--verbose" => {}
                        other if !other.starts_with('-') && root.is_none() => root = Some(other),
                        other => self.note(
                            merged,
                            format!("in.tftpd {other}: no equivalent in the built-in tftp"),
                        ),
                    }
                }
                match root {
                    Some(root) => listener.options.insert(
                        0,
                        Entry {
                            key: "root".into(),
                            value: quote(root),
                            comment: "in.tftpd -s".into(),
                        },
                    ),
                    None => self.note(merged, "no directory (-s DIR): set the tftp root"),
                }
            }
            _ => self.note(merged, "not used: the service is served by preforkd itself"),
        }
    }
}

/// An xinetd address of `only_from`/`no_access` as CIDR prefixes: `a.b.c.d`, with trailing
/// zero parts as wildcards (`10.0.0.0` is `10.0.0.0/8`, `0.0.0.0` everyone), `a.b.c.d/n`,
/// `a.b.c.{x,y}` (each), an IPv6 address or prefix; host and network names are not resolved.
fn xinetd_net(value: &str) -> Result<Vec<String>, &'static str> {
    if let Some((head, tail)) = value.split_once('{') {
        let list = tail.strip_suffix('}').ok_or("an unclosed {")?;
        let mut nets = Vec::new();
        for part in list.split(',') {
            nets.extend(xinetd_net(&format!("{head}{}", part.trim()))?);
        }
        return Ok(nets);
    }
    if let Ok(net) = value.parse::<ipnet::IpNet>() {
        return Ok(vec![net.trunc().to_string()]);
    }
    match value.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => {
            let octets = v4.octets();
            let significant = octets.iter().rposition(|&o| o != 0).map_or(0, |i| i + 1);
            Ok(vec![format!("{v4}/{}", significant * 8)])
        }
        Ok(IpAddr::V6(v6)) => Ok(vec![format!("{v6}/128")]),
        Err(_) => {
            Err("a host or network name, which preforkd does not resolve: write its addresses")
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn origin(line: usize) -> Origin {
        Origin { file: PathBuf::from("/etc/xinetd.d/x"), line }
    }

    fn attribute(name: &str, op: Op, values: &[&str], line: usize) -> Attribute {
        Attribute {
            name: name.into(),
            op,
            values: values.iter().map(|v| (*v).to_owned()).collect(),
            origin: origin(line),
        }
    }

    #[test]
    fn a_service_inherits_defaults_and_the_operators_apply() {
        let defaults = [
            attribute("only_from", Op::Set, &["10.0.0.0", "192.168.1.0"], 1),
            attribute("instances", Op::Set, &["50"], 2),
            attribute("log_on_success", Op::Set, &["PID"], 3),
        ];
        let own = [
            attribute("only_from", Op::Remove, &["10.0.0.0"], 10),
            attribute("only_from", Op::Add, &["127.0.0.1"], 11),
            attribute("instances", Op::Set, &["5"], 12),
        ];
        let merged = merge(&defaults, &own);
        let get = |name: &str| merged.iter().find(|m| m.name == name).unwrap();
        assert_eq!(get("only_from").values, ["192.168.1.0", "127.0.0.1"]);
        assert_eq!(get("only_from").origin.line, 11);
        assert_eq!(get("instances").values, ["5"]);
        assert_eq!(get("log_on_success").values, ["PID"]);
    }

    #[test]
    fn xinetd_addresses_become_prefixes() {
        assert_eq!(xinetd_net("10.0.0.0"), Ok(vec!["10.0.0.0/8".into()]));
        assert_eq!(xinetd_net("0.0.0.0"), Ok(vec!["0.0.0.0/0".into()]));
        assert_eq!(xinetd_net("127.0.0.1"), Ok(vec!["127.0.0.1/32".into()]));
        assert_eq!(xinetd_net("192.168.1.7/24"), Ok(vec!["192.168.1.0/24".into()]));
        assert_eq!(
            xinetd_net("10.1.2.{3,4}"),
            Ok(vec!["10.1.2.3/32".into(), "10.1.2.4/32".into()])
        );
        assert_eq!(xinetd_net("::1"), Ok(vec!["::1/128".into()]));
        assert!(xinetd_net("localhost").is_err());
    }

    #[test]
    fn quoting_is_toml() {
        assert_eq!(quote("a \"b\" \\ c\n\u{1}"), "\"a \\\"b\\\" \\\\ c\\n\\u0001\"");
        let parsed: toml::Table =
            toml::from_str(&format!("x = {}", quote("é\"\\\t\u{7f}"))).unwrap();
        assert_eq!(parsed["x"].as_str(), Some("é\"\\\t\u{7f}"));
    }
}
