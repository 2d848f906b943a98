//! `log.format = "json"`: every line the daemon writes, to each target, is one JSON object
//! with the documented members.

use std::io::{Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Instant;

use serde_json::{Map, Value};

use crate::harness::*;

/// The listeners: echo over TCP and UDP, and exec (for a service's own fields).
fn listeners() -> &'static str {
    "[[listener]]\nname = \"echo\"\naddress = \"127.0.0.1:0\"\nservice = \"echo\"\n\
     [[listener]]\nname = \"echo-udp\"\naddress = \"127.0.0.1:0\"\nservice = \"echo\"\ntransport = \"udp\"\n\
     [[listener]]\nname = \"cat\"\naddress = \"127.0.0.1:0\"\nservice = \"exec\"\n\
     [listener.options]\nuser = \"nobody\"\nprogram = \"/bin/sh\"\nargs = [\"-c\", \"cat; echo 'to \\\"stderr\\\"' >&2\"]\n"
}

fn config(log: &str) -> String {
    format!(
        "[daemon]\nworkers = 2\nallow_root_workers = true\npid_file = \"@DIR@/p.pid\"\n\
         [log]\nlevel = \"debug\"\nformat = \"json\"\n{log}{}",
        listeners()
    )
}

/// The object `line` holds, checked for the members every line has.
fn object(line: &str) -> Map<String, Value> {
    let value: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    let Value::Object(object) = value else { panic!("not an object: {line}") };
    assert!(object["time"].as_str().is_some_and(|t| t.ends_with('Z') && t.len() == 24), "{line}");
    let level = object["level"].as_str().unwrap_or_default();
    assert!(["error", "warn", "info", "debug", "trace"].contains(&level), "{line}");
    assert!(object["pid"].as_u64().is_some_and(|p| p > 0), "{line}");
    assert!(object["message"].is_string(), "{line}");
    match object["role"].as_str() {
        Some("master") => assert!(!object.contains_key("slot"), "{line}"),
        Some("worker") => {
            assert!(object["slot"].is_u64() && object["generation"].as_u64() >= Some(1), "{line}")
        }
        Some("spawner") => {
            assert!(!object.contains_key("slot") && object["generation"].is_u64(), "{line}")
        }
        _ => panic!("no role: {line}"),
    }
    object
}

/// Drives every kind of line: a TCP exchange, a UDP one, an exec child writing to stderr;
/// `addrs` are the listeners' addresses, in the order of [`listeners`].
fn traffic(addrs: &[SocketAddr]) {
    let mut stream = connect(addrs[0]);
    assert_eq!(exchange(&mut stream, b"json please", PATIENCE), Outcome::Echoed);
    drop(stream);
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(PATIENCE)).unwrap();
    udp.send_to(b"datagram", addrs[1]).unwrap();
    let mut buf = [0u8; 64];
    let n = uninterrupted(|| udp.recv(&mut buf)).unwrap();
    assert_eq!(&buf[..n], b"datagram");
    let mut child = connect(addrs[2]);
    child.write_all(b"through cat").unwrap();
    child.shutdown(std::net::Shutdown::Write).unwrap();
    let mut echoed = Vec::new();
    child.read_to_end(&mut echoed).unwrap();
    assert_eq!(echoed, b"through cat");
}

/// Checks the access lines among `objects`: typed members, the service's own in `fields`.
fn assert_access_lines(objects: &[Map<String, Value>]) {
    let access = |listener: &str| {
        objects
            .iter()
            .find(|o| o.get("event") == Some(&"access".into()) && o["listener"] == listener)
    };
    let echo = access("echo").expect("an access line of echo");
    assert_eq!((echo["in"].as_u64(), echo["out"].as_u64()), (Some(11), Some(11)), "{echo:?}");
    assert_eq!(echo["exchanges"], 1);
    assert_eq!(echo["reason"], "client-close");
    assert!(echo["duration"].as_f64().is_some_and(|d| d >= 0.0), "{echo:?}");
    assert!(echo["peer"].as_str().is_some_and(|p| p.starts_with("127.0.0.1:")), "{echo:?}");
    let exec = access("cat").expect("an access line of exec");
    assert!(exec["fields"]["child"].as_u64().is_some_and(|pid| pid > 1), "{exec:?}");
    assert_eq!(exec["fields"]["status"], "exit:0");
    let datagrams = objects
        .iter()
        .find(|o| o.get("event") == Some(&"datagrams".into()))
        .expect("the UDP summary, forced at the stop");
    assert_eq!(
        (datagrams["listener"].as_str(), datagrams["received"].as_u64()),
        (Some("echo-udp"), Some(1))
    );
    let stderr = objects
        .iter()
        .find(|o| o["message"].as_str().is_some_and(|m| m.contains("to \"stderr\"")))
        .expect("the child's stderr line");
    assert_eq!(stderr["level"], "warn");
}

#[test]
fn every_line_on_stderr_is_a_json_object_with_the_documented_members() {
    let mut daemon = Daemon::start(&config(""));
    traffic(&daemon.addrs);
    daemon.wait_for_log("the exec access line", |l| l.contains("\"listener\":\"cat\""));
    let (status, _, stderr) = daemon.control("quit");
    assert_eq!(code(status), 0, "{stderr}");
    assert_eq!(code(daemon.wait_exit(PATIENCE).expect("exited")), 0);
    let lines = daemon.lines();
    assert!(lines.len() > 10, "{lines:#?}");
    let objects: Vec<_> = lines.iter().map(|l| object(l)).collect();
    assert_access_lines(&objects);
}

#[test]
fn the_file_target_gets_json_from_every_process() {
    let mut daemon = Daemon::spawn(
        &[],
        &config("target = \"file\"\npath = \"@DIR@/preforkd.log\"\n"),
        None,
        &[],
    );
    let status = daemon.wait_ready();
    let path = daemon.dir().join("preforkd.log");
    let read = || -> Vec<Map<String, Value>> {
        std::fs::read_to_string(&path).unwrap().lines().map(object).collect()
    };
    let addrs: Vec<SocketAddr> =
        ["echo", "echo-udp", "cat"].iter().map(|name| status.address(name).expect(name)).collect();
    traffic(&addrs);
    let (status, _, stderr) = daemon.control("quit");
    assert_eq!(code(status), 0, "{stderr}");
    assert_eq!(code(daemon.wait_exit(PATIENCE).expect("exited")), 0);
    let objects = read();
    assert!(objects.iter().any(|o| o["role"] == "worker"), "workers' lines, relayed");
    assert_access_lines(&objects);
}

#[test]
fn syslog_gets_the_object_as_its_message() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("log.sock");
    let syslog = UnixDatagram::bind(&socket_path).unwrap();
    syslog.set_read_timeout(Some(PATIENCE)).unwrap();
    let config = config(&format!("target = \"syslog\"\nsyslog_socket = {:?}\n", socket_path))
        .replace("@DIR@", dir.path().to_str().unwrap());
    let config_path = dir.path().join("preforkd.toml");
    std::fs::write(&config_path, config).unwrap();
    let child = Command::new(BINARY)
        .arg("-c")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let _daemon = GroupGuard(child);
    let deadline = Instant::now() + PATIENCE;
    let mut objects = Vec::new();
    let mut buf = vec![0u8; 8192];
    while objects
        .iter()
        .filter(|o: &&Map<String, Value>| {
            o["message"].as_str().is_some_and(|m| m.starts_with("worker started"))
        })
        .count()
        < 2
    {
        assert!(Instant::now() < deadline, "no worker start in syslog");
        let n = uninterrupted(|| syslog.recv(&mut buf)).expect("a syslog datagram");
        let datagram = String::from_utf8_lossy(&buf[..n]).into_owned();
        // RFC 3164: <PRI>TIMESTAMP HOST TAG[PID]: then the object.
        let (header, json) = datagram.split_once(": {").expect(&datagram);
        assert!(header.starts_with('<') && header.contains("preforkd["), "{datagram}");
        objects.push(object(&format!("{{{json}")));
    }
}
