//! `preforkd status --json`: the document parses, and its values are the daemon's own.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::Shutdown;

use serde_json::Value;

use crate::harness::*;

/// `status --json` of `daemon`, parsed; panics unless the command succeeds.
pub fn status_json(daemon: &Daemon) -> Value {
    let config = daemon.config_path.to_str().unwrap();
    let (status, stdout, stderr) = run_cli(&["status", "--json", "-c", config]);
    assert_eq!(code(status), 0, "{stderr}");
    assert_eq!(stdout.lines().count(), 1, "one document on one line: {stdout}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// Pids of the live (not zombie) processes whose parent is `parent`, from /proc.
fn children_of(parent: i32) -> BTreeSet<i64> {
    let mut children = BTreeSet::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i64>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // Fields after the command name, which is in parentheses and may hold spaces.
        let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
        if fields[1] == parent.to_string() && !matches!(fields[0], "Z" | "X") {
            children.insert(pid);
        }
    }
    children
}

fn worker_pids(document: &Value) -> BTreeSet<i64> {
    workers(document).iter().map(|w| w["pid"].as_i64().unwrap()).collect()
}

fn workers(document: &Value) -> &Vec<Value> {
    document["workers"].as_array().expect("workers is an array")
}

fn total(document: &Value, counter: &str) -> u64 {
    workers(document).iter().map(|w| w[counter].as_u64().expect(counter)).sum()
}

/// Whether `document` shows exactly `count` ready workers, all of `generation`.
fn serving(document: &Value, count: usize, generation: u64) -> bool {
    workers(document).len() == count
        && workers(document)
            .iter()
            .all(|w| w["state"] == "ready" && w["generation"].as_u64() == Some(generation))
}

#[test]
fn status_json_is_the_scoreboard_of_the_running_daemon() {
    let daemon = Daemon::start(&controlled_config(2, "", ""));
    let master = daemon.pid().as_raw();
    let mut document = Value::Null;
    eventually("2 ready workers of generation 1", || {
        document = status_json(&daemon);
        serving(&document, 2, 1)
    });
    assert_eq!(document["schema"], 1);
    assert_eq!(document["master"]["pid"], master);
    assert_eq!(document["master"]["generation"], 1);
    assert_eq!(document["master"]["target_workers"], 2);
    assert_eq!(document["master"]["reloads_applied"], 0);
    assert_eq!(document["master"]["last_error"], Value::Null);
    assert!(
        document["time_unix_ms"].as_u64().unwrap()
            >= document["master"]["started_unix_ms"].as_u64().unwrap()
    );
    let pids = worker_pids(&document);
    assert_eq!(pids, children_of(master), "the workers are the master's children");
    let logged: BTreeSet<i64> = daemon.logged_worker_pids().into_iter().map(i64::from).collect();
    assert_eq!(pids, logged, "the workers are the ones the log announced");
    assert_eq!(total(&document, "accepted"), 0);

    // Five connections, 100 bytes each way, closed by the client.
    const CONNECTIONS: u64 = 5;
    const BYTES: usize = 100;
    for seed in 0..CONNECTIONS {
        let mut stream = connect(daemon.addr());
        let message = random_bytes(BYTES, seed);
        stream.write_all(&message).unwrap();
        let mut echoed = vec![0; BYTES];
        stream.read_exact(&mut echoed).unwrap();
        assert_eq!(echoed, message);
        stream.shutdown(Shutdown::Write).unwrap();
        assert!(closed_within(&mut stream, PATIENCE), "the server closes after the client");
    }
    let bytes = CONNECTIONS * BYTES as u64;
    eventually("the traffic is counted on the scoreboard", || {
        document = status_json(&daemon);
        (total(&document, "accepted"), total(&document, "bytes_in"), total(&document, "open"))
            == (CONNECTIONS, bytes, 0)
    });
    assert_eq!(total(&document, "bytes_out"), bytes);
    assert_eq!(worker_pids(&document), pids, "no worker was replaced");

    // A reload: a new generation of workers, still the master's children.
    let (status, _, stderr) = daemon.control("reload");
    assert_eq!(code(status), 0, "{stderr}");
    eventually("2 ready workers of generation 2 and no other", || {
        document = status_json(&daemon);
        serving(&document, 2, 2)
    });
    assert_eq!(document["master"]["generation"], 2);
    assert_eq!(document["master"]["reloads_applied"], 1);
    let new_pids = worker_pids(&document);
    assert!(new_pids.is_disjoint(&pids), "generation 2 has new workers: {document}");
    assert!(new_pids.is_subset(&children_of(master)), "{document}");
    assert_eq!(total(&document, "accepted"), 0, "new workers start from 0");
}

#[test]
fn status_json_without_a_master_prints_nothing_on_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let config = controlled_config(1, "", "").replace("@DIR@", dir.path().to_str().unwrap());
    let path = dir.path().join("preforkd.toml");
    std::fs::write(&path, config).unwrap();
    let (status, stdout, stderr) = run_cli(&["status", "--json", "-c", path.to_str().unwrap()]);
    assert_eq!(code(status), 69, "{stderr}");
    assert_eq!(stdout, "", "a script reading stdout sees no document");
    assert!(stderr.contains("preforkd status:"), "{stderr}");
}

/// The `address` of every listener in `document`, by id.
fn addresses(document: &Value) -> Vec<(String, std::net::SocketAddr)> {
    let listeners = document["listeners"].as_array().expect("listeners is an array");
    listeners
        .iter()
        .map(|l| {
            let address = l["address"].as_str().unwrap_or_else(|| panic!("no address: {l}"));
            (l["name"].as_str().unwrap().to_owned(), address.parse().unwrap())
        })
        .collect()
}

#[test]
fn status_json_names_where_each_listener_is_bound() {
    let ipv6 = "[[listener]]\nname = \"v6\"\naddress = \"[::1]:0\"\nservice = \"echo\"\n";
    let daemon = Daemon::start(&format!("{}{ipv6}", controlled_config(1, "", "")));
    let listed = addresses(&status_json(&daemon));
    let names: Vec<&str> = listed.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["echo", "v6"], "by id: configuration order");
    let (echo, v6) = (listed[0].1, listed[1].1);
    // The kernel's view: the master's one IPv4 listening socket is where status says.
    assert_eq!(listening_addrs(daemon.pid().as_raw()), [echo], "the port chosen for :0");
    assert!(v6.is_ipv6() && v6.ip().is_loopback() && v6.port() != 0, "{v6}");
    for address in [echo, v6] {
        // Not `connect`: it binds an IPv4 source.
        let mut stream = std::net::TcpStream::connect_timeout(&address, PATIENCE).unwrap();
        assert_eq!(exchange(&mut stream, b"here", PATIENCE), Outcome::Echoed, "{address}");
    }

    // A reload binds a new listener: its address is published with generation 2's workers;
    // the kept ones keep theirs.
    let third = "[[listener]]\nname = \"third\"\naddress = \"127.0.0.2:0\"\nservice = \"echo\"\n";
    daemon.rewrite_config(&format!("{}{ipv6}{third}", controlled_config(1, "", "")));
    let (status, _, stderr) = daemon.control("reload");
    assert_eq!(code(status), 0, "{stderr}");
    let listed = addresses(&status_json(&daemon));
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert_eq!((listed[0].1, listed[1].1), (echo, v6), "kept sockets, kept addresses");
    let (name, added) = &listed[2];
    assert_eq!(name, "third");
    assert_eq!(added.ip().to_string(), "127.0.0.2");
    assert!(listening_addrs(daemon.pid().as_raw()).contains(added), "{added} is listening");
    let mut stream = connect(*added);
    assert_eq!(exchange(&mut stream, b"new", PATIENCE), Outcome::Echoed);
}
