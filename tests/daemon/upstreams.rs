//! Relay backends as an operator runs them: active health checks, weights, backups,
//! per-backend caps, host names that move, and what status and the metrics say of them.
//!
//! The backends are small servers in this process (threads): a connection that sends
//! `PING\r\n` is a health probe, answered as the test says (`+PONG` or `-ERR`); one that sends
//! `WHO\n` is a client, answered with the backend's name; every connection is counted.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::harness::*;

/// A test backend: its address and counters.
struct Backend {
    name: &'static str,
    address: SocketAddr,
    /// Probes seen, and clients served.
    probes: Arc<AtomicUsize>,
    clients: Arc<AtomicUsize>,
    /// Answer probes with `+PONG` (true) or `-ERR` (false).
    healthy: Arc<AtomicBool>,
    /// Clients connected now, and the most at once.
    open: Arc<Mutex<(usize, usize)>>,
    /// Hold clients open until told (for caps).
    hold: Arc<AtomicBool>,
    /// Leave probes unanswered (the check waits for its timeout).
    mute_probes: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Backend {
    fn start(name: &'static str, bind: &str) -> Backend {
        let listener = TcpListener::bind(bind).unwrap();
        let backend = Backend {
            name,
            address: listener.local_addr().unwrap(),
            probes: Arc::default(),
            clients: Arc::default(),
            healthy: Arc::new(AtomicBool::new(true)),
            open: Arc::default(),
            hold: Arc::default(),
            mute_probes: Arc::default(),
            stop: Arc::default(),
        };
        let (probes, clients, healthy, open, hold, mute, stop) = (
            Arc::clone(&backend.probes),
            Arc::clone(&backend.clients),
            Arc::clone(&backend.healthy),
            Arc::clone(&backend.open),
            Arc::clone(&backend.hold),
            Arc::clone(&backend.mute_probes),
            Arc::clone(&backend.stop),
        );
        thread::spawn(move || {
            for stream in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(mut stream) = stream else { continue };
                let (probes, clients, healthy, open, hold, mute) = (
                    Arc::clone(&probes),
                    Arc::clone(&clients),
                    Arc::clone(&healthy),
                    Arc::clone(&open),
                    Arc::clone(&hold),
                    Arc::clone(&mute),
                );
                thread::spawn(move || {
                    stream.set_read_timeout(Some(PATIENCE)).unwrap();
                    let mut line = String::new();
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return; // a connect-only check
                    }
                    if line == "PING\r\n" {
                        probes.fetch_add(1, Ordering::Relaxed);
                        if mute.load(Ordering::Relaxed) {
                            let mut rest = Vec::new();
                            let _ = reader.read_to_end(&mut rest);
                            return;
                        }
                        let answer: &[u8] = if healthy.load(Ordering::Relaxed) {
                            b"+PONG\r\n"
                        } else {
                            b"-ERR\r\n"
                        };
                        let _ = stream.write_all(answer);
                        return;
                    }
                    clients.fetch_add(1, Ordering::Relaxed);
                    {
                        let mut open = open.lock().unwrap();
                        open.0 += 1;
                        open.1 = open.1.max(open.0);
                    }
                    let _ = stream.write_all(format!("{name}\n").as_bytes());
                    if hold.load(Ordering::Relaxed) {
                        let mut rest = Vec::new();
                        let _ = stream.read_to_end(&mut rest);
                    }
                    open.lock().unwrap().0 -= 1;
                });
            }
        });
        backend
    }

    /// Stops accepting: new connects are refused (the port is closed).
    fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag and drops the listener.
        let _ = TcpStream::connect(self.address);
    }
}

/// Asks the relay at `addr` who serves: the backend's name, or `None` when the relay closed.
fn who(addr: SocketAddr) -> Option<String> {
    let mut stream = connect(addr);
    stream.write_all(b"WHO\n").ok()?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).ok()?;
    let name = line.trim().to_owned();
    (!name.is_empty()).then_some(name)
}

fn relay_daemon(workers: usize, options: &str, env: &[(&str, &str)]) -> Daemon {
    let config = format!(
        "[daemon]\nworkers = {workers}\nallow_root_workers = true\npid_file = \"@DIR@/preforkd.pid\"\n\
         [log]\nlevel = \"debug\"\naccess_log = true\n\
         [[listener]]\nname = \"relay\"\naddress = \"127.0.0.1:0\"\nservice = \"relay\"\n\
         max_connections_per_client = 0\n\
         [listener.options]\n{options}\n\
         [[listener]]\nname = \"metrics\"\naddress = \"127.0.0.1:0\"\nservice = \"metrics\"\n"
    );
    Daemon::launch(&config, None, env)
}

/// The backends of `status --json`, as (name, up, reason).
fn backends(daemon: &Daemon) -> Vec<(String, bool, String)> {
    let config = daemon.config_path.to_str().unwrap();
    let (status, json, stderr) = run_cli(&["status", "--json", "-c", config]);
    assert_eq!(code(status), 0, "{stderr}");
    let document: serde_json::Value = serde_json::from_str(&json).unwrap();
    document["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let address = b["address"].as_str().unwrap_or("-").to_owned();
            let name = format!("{}={address}", b["name"].as_str().unwrap());
            (name, b["up"].as_bool().unwrap(), b["reason"].as_str().unwrap().to_owned())
        })
        .collect()
}

fn wait_backend(daemon: &Daemon, backend: &Backend, up: bool) -> String {
    let needle = backend.address.to_string();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let all = backends(daemon);
        // A verdict either way: a backend pending its first one is up, but not yet checked.
        let decided = |reason: &str| reason != "not checked yet";
        if let Some((_, _, reason)) =
            all.iter().find(|(n, u, r)| n.contains(&needle) && *u == up && decided(r))
        {
            return reason.clone();
        }
        assert!(Instant::now() < deadline, "{} never became up={up}: {all:?}", backend.name);
        thread::sleep(Duration::from_millis(20));
    }
}

fn metrics(daemon: &Daemon) -> String {
    let mut stream = connect(daemon.addrs[1]);
    stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text
}

const CHECK: &str = "health_check = { interval = \"100ms\", rise = 2, fall = 2, timeout = \"90ms\", send = \"PING\\r\\n\", expect = \"+PONG\" }";

#[test]
fn a_backend_that_answers_the_probe_wrong_gets_no_client_and_comes_back_after_rise() {
    let bad = Backend::start("bad", "127.0.0.1:0");
    bad.healthy.store(false, Ordering::Relaxed);
    let good = Backend::start("good", "127.0.0.1:0");
    let options = format!("backends = [\"{}\", \"{}\"]\n{CHECK}", bad.address, good.address);
    let daemon = relay_daemon(2, &options, &[]);
    let reason = wait_backend(&daemon, &bad, false);
    assert_eq!(reason, "check failed: expected \"+PONG\", got \"-ERR\\r\\n\"");
    wait_backend(&daemon, &good, true);
    for _ in 0..20 {
        assert_eq!(who(daemon.addr()).as_deref(), Some("good"));
    }
    assert_eq!(bad.clients.load(Ordering::Relaxed), 0, "no client ever went to the bad backend");
    let down = daemon.wait_for_log("the down line", |l| l.contains("is down: health check failed"));
    assert!(down.contains("checker gen=1"), "logged once, by the checker: {down}");
    let text = metrics(&daemon);
    let series = format!(
        "preforkd_backend_status{{listener=\"relay\",backend=\"{0}\",address=\"{0}\",state=\"DOWN\"}} 1",
        bad.address
    );
    assert!(text.contains(&series), "{series} not in:\n{text}");
    let (_, status, _) = daemon.control("status");
    assert!(status.contains("DOWN: check failed"), "{status}");

    // Healthy again: up after `rise` (2) good probes, then it gets clients.
    bad.healthy.store(true, Ordering::Relaxed);
    let since = Instant::now();
    wait_backend(&daemon, &bad, true);
    assert!(since.elapsed() >= Duration::from_millis(100), "not before two probes");
    let served: Vec<String> = (0..20).filter_map(|_| who(daemon.addr())).collect();
    assert_eq!(served.len(), 20);
    assert!(served.iter().any(|s| s == "bad") && served.iter().any(|s| s == "good"), "{served:?}");
    assert_eq!(daemon.matching(|l| l.contains("is down: health check failed")).len(), 1);

    // One probe per interval for the whole daemon, not one per worker.
    let (start, before) = (Instant::now(), good.probes.load(Ordering::Relaxed));
    while start.elapsed() < Duration::from_secs(2) {
        thread::sleep(Duration::from_millis(50));
    }
    let probes = good.probes.load(Ordering::Relaxed) - before;
    let intervals = start.elapsed().as_millis() as usize / 100;
    assert!(
        probes <= intervals + 2 && probes + 4 >= intervals,
        "{probes} probes in {intervals} intervals"
    );
}

#[test]
fn weights_split_three_to_one_and_a_backup_serves_only_while_both_primaries_are_down() {
    let heavy = Backend::start("heavy", "127.0.0.1:0");
    let light = Backend::start("light", "127.0.0.1:0");
    let options = format!(
        "backends = [{{ address = \"{}\", weight = 3 }}, {{ address = \"{}\", weight = 1 }}]",
        heavy.address, light.address
    );
    let daemon = relay_daemon(2, &options, &[]);
    let mut heavy_count = 0;
    for _ in 0..400 {
        if who(daemon.addr()).as_deref() == Some("heavy") {
            heavy_count += 1;
        }
    }
    assert!((280..=320).contains(&heavy_count), "3:1 within 5% of 400: {heavy_count} on heavy");
    assert_eq!(light.clients.load(Ordering::Relaxed) + heavy_count, 400);

    let first = Backend::start("first", "127.0.0.1:0");
    let second = Backend::start("second", "127.0.0.1:0");
    let backup = Backend::start("backup", "127.0.0.1:0");
    let check = "health_check = { interval = \"100ms\", rise = 1, fall = 1, timeout = \"90ms\" }";
    let options = format!(
        "backends = [\"{}\", \"{}\", {{ address = \"{}\", backup = true }}]\n{check}",
        first.address, second.address, backup.address
    );
    let daemon = relay_daemon(2, &options, &[]);
    wait_backend(&daemon, &first, true);
    wait_backend(&daemon, &second, true);
    let served: Vec<String> = (0..20).filter_map(|_| who(daemon.addr())).collect();
    assert!(served.iter().all(|s| s != "backup") && served.len() == 20, "{served:?}");
    first.stop();
    wait_backend(&daemon, &first, false);
    assert!(
        (0..10).all(|_| who(daemon.addr()).as_deref() == Some("second")),
        "one primary is enough"
    );
    second.stop();
    wait_backend(&daemon, &second, false);
    assert!(
        (0..10).all(|_| who(daemon.addr()).as_deref() == Some("backup")),
        "the backup takes over"
    );
    // The first primary comes back (on the same port): the backup hands back.
    let again = Backend::start("first-again", &first.address.to_string());
    wait_backend(&daemon, &again, true);
    assert!((0..10).all(|_| who(daemon.addr()).as_deref() == Some("first-again")));
}

/// A backend called `capped` that holds every connection open, with `max_connections`
/// set, behind a relay of `workers` workers.
fn capped_relay(max_connections: u32, workers: usize) -> (Backend, Daemon) {
    let capped = Backend::start("capped", "127.0.0.1:0");
    capped.hold.store(true, Ordering::Relaxed);
    let options = format!(
        "backends = [{{ address = \"{}\", max_connections = {max_connections} }}]",
        capped.address
    );
    let daemon = relay_daemon(workers, &options, &[]);
    (capped, daemon)
}

#[test]
fn a_backend_cap_holds_exactly_across_workers_and_the_rest_are_told_why() {
    let (capped, daemon) = capped_relay(3, 4);
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let addr = daemon.addr();
            thread::spawn(move || {
                let mut stream = connect(addr);
                let _ = stream.write_all(b"WHO\n");
                let mut line = String::new();
                let _ = BufReader::new(stream.try_clone().unwrap()).read_line(&mut line);
                (stream, line)
            })
        })
        .collect();
    let results: Vec<(TcpStream, String)> =
        clients.into_iter().map(|c| c.join().unwrap()).collect();
    let served = results.iter().filter(|(_, line)| line.trim() == "capped").count();
    assert_eq!(served, 3, "exactly max_connections served");
    assert_eq!(capped.open.lock().unwrap().1, 3, "never more at once at the backend");
    let full = daemon
        .wait_for_lines("the refused clients' lines", 5, |l| l.contains("reason=backend-full"));
    assert_eq!(full.len(), 5);
    drop(results);
}

#[test]
fn a_killed_workers_place_on_a_capped_backend_is_given_back() {
    let (_capped, daemon) = capped_relay(1, 2);
    let held = connect(daemon.addr());
    (&held).write_all(b"WHO\n").unwrap();
    let mut line = String::new();
    BufReader::new(&held).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "capped");
    // The worker relaying it (the only connection yet).
    let status = daemon
        .wait_until("the held connection is counted", |s| s.workers.iter().any(|w| w.open > 0));
    let holder = status.workers.iter().find(|w| w.open > 0).unwrap().pid;
    assert_eq!(who(daemon.addr()), None, "max_connections 1: its one place is taken");
    // Killed mid-connection, it gives nothing back itself.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(holder), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    daemon.wait_replaced(&[holder]);
    assert_eq!(who(daemon.addr()).as_deref(), Some("capped"), "the place is free again");
    let released = daemon.wait_for_log("the release", |l| l.contains("place(s) on relay backends"));
    assert!(released.contains(&format!("(pid {holder}) held 1 place(s)")), "{released}");
    drop(held);
}

#[test]
fn a_checked_backend_is_used_before_its_first_verdict() {
    let slow = Backend::start("slow", "127.0.0.1:0");
    // Probes get no answer: the first verdict waits for the check's timeout, long after the
    // daemon is ready.
    slow.mute_probes.store(true, Ordering::Relaxed);
    let check = "health_check = { interval = \"60s\", timeout = \"60s\", send = \"PING\\r\\n\", expect = \"+PONG\" }";
    let options = format!("backends = [\"{}\"]\n{check}", slow.address);
    let daemon = relay_daemon(1, &options, &[]);
    let pending = |daemon: &Daemon| {
        backends(daemon).iter().any(|(_, up, reason)| *up && reason == "not checked yet")
    };
    assert!(pending(&daemon), "no verdict yet, and up: {:?}", backends(&daemon));
    assert_eq!(who(daemon.addr()).as_deref(), Some("slow"), "served before the first check");
    assert!(pending(&daemon), "still no verdict: {:?}", backends(&daemon));
    assert_eq!(slow.clients.load(Ordering::Relaxed), 1);
}

#[test]
fn a_host_name_that_moves_takes_new_connections_to_its_new_address_without_a_reload() {
    let one = Backend::start("one", "127.0.0.1:0");
    let port = one.address.port();
    let two = Backend::start("two", &format!("127.0.0.2:{port}"));
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "backend.test 127.0.0.1\n").unwrap();
    let options = format!("backends = [\"backend.test:{port}\"]\nresolve_interval = \"100ms\"");
    let env = [("PREFORKD_TEST_HOSTS", hosts.to_str().unwrap())];
    let daemon = relay_daemon(2, &options, &env);
    wait_backend(&daemon, &one, true);
    assert!((0..5).all(|_| who(daemon.addr()).as_deref() == Some("one")));
    std::fs::write(&hosts, "backend.test 127.0.0.2\n").unwrap();
    let line = daemon.wait_for_log("the new address", |l| l.contains("now resolves to [127.0.0.2"));
    assert!(line.contains("was [127.0.0.1"), "{line}");
    wait_backend(&daemon, &two, true);
    assert!((0..5).all(|_| who(daemon.addr()).as_deref() == Some("two")), "no reload needed");
    // The name stops resolving: the last good address is kept.
    std::fs::write(&hosts, "other.test 127.0.0.3\n").unwrap();
    daemon.wait_for_log("the failure", |l| l.contains("the last addresses are kept"));
    assert_eq!(who(daemon.addr()).as_deref(), Some("two"));
    let (_, status, _) = daemon.control("reload");
    let _ = status;
    daemon.wait_generation(2);
    assert_eq!(
        who(daemon.addr()).as_deref(),
        Some("two"),
        "a reload keeps the row and its address"
    );
}

#[test]
fn backend_connects_come_from_the_source_address_with_keepalive() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = listener.local_addr().unwrap();
    let options = format!(
        "backends = [\"{backend}\"]\nsource = \"127.0.0.5\"\ntcp_keepalive_idle = \"30s\"\ntcp_keepalive_count = 3"
    );
    let daemon = relay_daemon(1, &options, &[]);
    let mut client = connect(daemon.addr());
    client.write_all(b"hello").unwrap();
    let (mut accepted, peer) = listener.accept().unwrap();
    assert_eq!(peer.ip().to_string(), "127.0.0.5", "connected from the source address");
    let mut got = [0u8; 5];
    accepted.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello");
    // The relay's end of this connection is the socket whose local address is `peer`.
    assert_keepalive(peer);
}

/// Asserts that the TCP socket bound to `local` runs its keepalive timer: /proc/net/tcp's
/// `tr` field (proc(5)) is 2 for it.
fn assert_keepalive(local: SocketAddr) {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let hex = |a: SocketAddr| match a.ip() {
        std::net::IpAddr::V4(v4) => {
            format!("{:08X}:{:04X}", u32::from_le_bytes(v4.octets()), a.port())
        }
        std::net::IpAddr::V6(_) => String::new(),
    };
    let wanted = hex(local);
    let line = text
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(wanted.as_str()))
        .expect("the relay's backend socket");
    // Field 5 is "tr:tm->when": timer 2 is the keepalive timer.
    let timer = line.split_whitespace().nth(5).unwrap();
    assert!(timer.starts_with("02:"), "keepalive timer on the backend connection: {line}");
}
