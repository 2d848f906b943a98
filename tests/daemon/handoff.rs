//! Connection hand-off (issue 9): a reload or an upgrade moves established connections to
//! the serving generation instead of closing them.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::resource::{Resource, getrlimit, setrlimit};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::harness::*;

const QUICK: Duration = Duration::from_secs(10);

/// The workers in `preforkd status --json`: (pid, generation, state, open); none while no
/// master answers.
fn workers(daemon: &Daemon) -> Vec<(i32, u64, String, u64)> {
    let Some(status) = daemon.status() else { return Vec::new() };
    status.workers.into_iter().map(|w| (w.pid, w.generation, w.state, w.open)).collect()
}

/// Waits until only workers of `generation` are left, all ready; returns their pids.
fn only_generation(daemon: &Daemon, generation: u64) -> Vec<i32> {
    let mut pids = Vec::new();
    eventually(&format!("only generation {generation} runs"), || {
        let all = workers(daemon);
        pids = all.iter().map(|w| w.0).collect();
        !all.is_empty() && all.iter().all(|w| w.1 == generation && w.2 == "ready")
    });
    pids
}

/// A keep-alive client that must never lose its connection: one exchange every `pause`
/// on the same socket until stopped, counted in `done`.
struct Steadfast {
    done: Arc<AtomicU64>,
    thread: thread::JoinHandle<Vec<String>>,
    /// The client's port, to find its access line.
    port: u16,
}

fn steadfast(addr: SocketAddr, seed: u64, pause: Duration, stop: Arc<AtomicBool>) -> Steadfast {
    let mut stream = connect(addr);
    let port = stream.local_addr().unwrap().port();
    let done = Arc::new(AtomicU64::new(0));
    let count = Arc::clone(&done);
    let thread = thread::spawn(move || {
        let mut failures = Vec::new();
        let mut round = 0u64;
        while !stop.load(Ordering::SeqCst) && round < 100_000 {
            round += 1;
            let message = random_bytes(64, seed << 32 | round);
            let mut echoed = vec![0u8; 64];
            match stream.write_all(&message).and_then(|()| stream.read_exact(&mut echoed)) {
                Ok(()) if echoed == message => {
                    count.fetch_add(1, Ordering::SeqCst);
                }
                Ok(()) => failures.push(format!("client {seed}: wrong echo")),
                Err(e) => {
                    let what = match e.kind() {
                        ErrorKind::UnexpectedEof => "EOF",
                        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => "reset",
                        _ => "error",
                    };
                    failures.push(format!("client {seed}: {what}: {e} in round {round}"));
                    break;
                }
            }
            thread::sleep(pause);
        }
        failures
    });
    Steadfast { done, thread, port }
}

const PAUSES_MS: [u64; 5] = [0, 10, 50, 200, 1000];

fn long_clients(addr: SocketAddr, stop: &Arc<AtomicBool>) -> Vec<Steadfast> {
    PAUSES_MS
        .iter()
        .enumerate()
        .map(|(i, &ms)| steadfast(addr, i as u64 + 1, Duration::from_millis(ms), Arc::clone(stop)))
        .collect()
}

/// Waits until every long client has made `more` exchanges beyond what it had made.
fn each_exchanges(clients: &[Steadfast], more: u64) {
    let marks: Vec<u64> = clients.iter().map(|c| c.done.load(Ordering::SeqCst)).collect();
    eventually("every long client exchanges again", || {
        clients.iter().zip(&marks).all(|(c, m)| c.done.load(Ordering::SeqCst) >= m + more)
    });
}

fn assert_no_loss(clients: Vec<Steadfast>, short: LoadReport) {
    let mut failures = short.failures.clone();
    let mut total = 0;
    for client in clients {
        total += client.done.load(Ordering::SeqCst);
        failures.extend(client.thread.join().unwrap());
    }
    assert!(
        failures.is_empty(),
        "{} failures (EOF, reset, wrong bytes): {failures:#?}",
        failures.len()
    );
    short.assert_clean(1);
    eprintln!(
        "hand-off: long clients {total} exchanges, short loops {} exchanges on {} connections; 0 EOF, 0 reset",
        short.exchanges, short.connections
    );
}

#[test]
fn long_clients_survive_20_reloads_and_end_up_in_the_newest_generation() {
    let daemon = Daemon::start(&controlled_config(
        2,
        "",
        "max_connections_per_client = 0\nmax_long_connections_per_client = 0",
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let clients = long_clients(daemon.addr(), &stop);
    let ports: Vec<u16> = clients.iter().map(|c| c.port).collect();
    let short = Load::start(daemon.addr(), 2, 0, Duration::ZERO);
    each_exchanges(&clients, 1);
    let first = daemon.worker_pids();
    for reload in 0..20 {
        let (status, _, stderr) = daemon.control("reload");
        assert_eq!(code(status), 0, "reload {reload}: {stderr}");
        if reload == 9 {
            // Halfway, every client (the 1 s one too) exchanges on its moved connection.
            each_exchanges(&clients, 1);
        }
    }
    // Every older worker exits once its connections are handed over, long before
    // graceful_timeout (10 s), while the long clients keep their connections.
    let newest = only_generation(&daemon, 21);
    for pid in &first {
        assert!(!is_running(*pid), "first-generation worker {pid} still runs");
    }
    each_exchanges(&clients, 1);
    let open: u64 = workers(&daemon).iter().map(|w| w.3).sum();
    stop.store(true, Ordering::SeqCst);
    let short = short.finish();
    assert_no_loss(clients, short);
    // Each long client's connection was served by a generation-21 worker at the end: the
    // access line of its close names the worker.
    for port in ports {
        let peer = format!("peer=127.0.0.1:{port} ");
        let line = daemon.wait_for_log("a long client's access line", |l| l.contains(&peer));
        assert!(newest.contains(&pid_of(&line)), "not closed by generation 21: {line}");
        assert_eq!(field(&line, "reason"), Some("client-close"), "{line}");
    }
    assert!(open >= 5, "the newest generation holds the long connections: {open} open");
}

#[test]
fn a_thousand_idle_connections_are_handed_over_on_epoll() {
    const CONNECTIONS: usize = 1000;
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let wanted = (CONNECTIONS as u64 + 200).max(soft);
    assert!(hard >= wanted, "RLIMIT_NOFILE hard limit {hard} is below {wanted}");
    setrlimit(Resource::RLIMIT_NOFILE, wanted, hard).unwrap();
    let config = controlled_config(
        2,
        "event_backend = \"epoll\"\nmax_connections_per_worker = 2000",
        "max_connections_per_client = 0\nmax_long_connections_per_client = 0",
    );
    let daemon = Daemon::start_with_nofile(&config, Some(8192));
    let mut streams: Vec<TcpStream> = (0..CONNECTIONS)
        .map(|i| {
            let mut stream = connect(daemon.addr());
            assert_eq!(exchange(&mut stream, b"k", QUICK), Outcome::Echoed, "connection {i}");
            stream
        })
        .collect();
    let old = daemon.worker_pids();
    let started = Instant::now();
    let (status, _, stderr) = daemon.control("reload");
    assert_eq!(code(status), 0, "{stderr}");
    let applied = started.elapsed();
    eventually("the old generation exits", || old.iter().all(|&pid| !is_running(pid)));
    let exited = started.elapsed();
    only_generation(&daemon, 2);
    // Counted by the daemon: the retiring workers publish their last counts before they
    // exit, the adopting ones within 100 ms. (The log cannot count them: the harness reads
    // it behind the daemon, and a line written just before a worker exits may not be read
    // yet.)
    let counted = |s: &Status| {
        let echo = s.listener("echo").expect("the echo listener");
        (echo.handed_off, echo.adopted)
    };
    let status = daemon.wait_until("every hand-off is counted", |s| {
        let (handed_off, adopted) = counted(s);
        handed_off >= CONNECTIONS as u64 && adopted >= CONNECTIONS as u64
    });
    let expected = (CONNECTIONS as u64, CONNECTIONS as u64);
    assert_eq!(counted(&status), expected, "every connection handed off and adopted once");
    // Measured from the workers' own log timestamps, over the lines read so far: first to
    // last connection handed off.
    let stamps: Vec<String> = daemon
        .matching(|l| l.contains("handed off (Adopted)"))
        .iter()
        .map(|l| l.split_whitespace().next().unwrap().to_owned())
        .collect();
    let millis = |stamp: &str| -> f64 {
        let time = stamp.split('T').nth(1).unwrap().trim_end_matches('Z');
        let parts: Vec<f64> = time.split(':').map(|p| p.parse().unwrap()).collect();
        (parts[0] * 3600.0 + parts[1] * 60.0 + parts[2]) * 1000.0
    };
    let span = match (stamps.first(), stamps.last()) {
        (Some(first), Some(last)) => millis(last) - millis(first),
        _ => 0.0,
    };
    eprintln!(
        "hand-off of {CONNECTIONS} idle connections (epoll): reload applied in {applied:?}, first to last hand-off {span:.0} ms over {} logged ({:.1} us per connection), old generation exited {exited:?} after HUP",
        stamps.len(),
        span * 1000.0 / stamps.len().max(1) as f64
    );
    for (i, stream) in streams.iter_mut().enumerate() {
        assert_eq!(exchange(stream, b"moved", QUICK), Outcome::Echoed, "connection {i}");
    }
}

/// Opens connections from `client` until one is refused; returns the ones admitted.
fn fill_quota(addr: SocketAddr, client: Ipv4Addr, most: usize) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for _ in 0..=most {
        let mut stream = connect_from(client, addr);
        match exchange(&mut stream, b"q", QUICK) {
            Outcome::Echoed => held.push(stream),
            _ => return held,
        }
    }
    held
}

#[test]
fn the_per_client_limit_stays_exact_through_hand_offs() {
    let daemon = Daemon::start(&controlled_config(
        2,
        "",
        "max_connections_per_client = 5\nmax_long_connections_per_client = 0",
    ));
    let client = Ipv4Addr::new(127, 0, 0, 7);
    let mut held = fill_quota(daemon.addr(), client, 6);
    assert_eq!(held.len(), 5);
    for reload in 0..5 {
        let (status, _, stderr) = daemon.control("reload");
        assert_eq!(code(status), 0, "{stderr}");
        // At any instant sampled: a sixth is refused, the five are served.
        let mut extra = connect_from(client, daemon.addr());
        assert_eq!(exchange(&mut extra, b"6th", QUICK), Outcome::Closed, "reload {reload}");
        for stream in &mut held {
            assert_eq!(exchange(stream, b"kept", QUICK), Outcome::Echoed, "reload {reload}");
        }
    }
    only_generation(&daemon, 6);
    // After: one closed, exactly one more fits.
    drop(held.pop());
    eventually("the count of the closed one is released", || {
        let mut stream = connect_from(client, daemon.addr());
        let admitted = exchange(&mut stream, b"again", QUICK) == Outcome::Echoed;
        if admitted {
            held.push(stream);
        }
        admitted
    });
    assert_eq!(fill_quota(daemon.addr(), client, 1).len(), 0, "exactly five, never six");
}

/// Kills `victim` (sending or receiving worker) while 500 connections of one client are
/// being handed over; afterwards the client can hold exactly its quota of 500.
fn kill_during_handoff(victim: &str) {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, (QUOTA as u64 * 2 + 200).max(soft), hard).unwrap();
    let config = controlled_config(
        1,
        "event_backend = \"epoll\"\nmax_connections_per_worker = 1000",
        &format!("max_connections_per_client = {QUOTA}\nmax_long_connections_per_client = 0"),
    );
    let daemon = Daemon::start_with_nofile(&config, Some(8192));
    let client = Ipv4Addr::new(127, 0, 0, 9);
    let held = fill_quota(daemon.addr(), client, QUOTA);
    assert_eq!(held.len(), QUOTA);
    let sender = daemon.worker_pids()[0];
    daemon.signal(Signal::SIGHUP);
    // The receiver is the generation-2 worker; the sender starts offering when the master
    // tells it to retire, once the receiver is ready.
    let mut receiver = 0;
    eventually("the new generation is ready", || {
        let all = workers(&daemon);
        receiver = all.iter().find(|w| w.1 == 2 && w.2 == "ready").map_or(0, |w| w.0);
        receiver != 0
    });
    if victim == "receiver" {
        // Once the sender retires it offers: kill the receiver while (or just after) the
        // connections move to it.
        eventually("the sender retires", || {
            workers(&daemon).iter().all(|w| w.0 != sender || w.2 == "draining")
        });
    }
    let pid = if victim == "receiver" { receiver } else { sender };
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    eventually("the killed worker is gone", || !is_running(pid));
    only_generation(&daemon, 2);
    // Which connections survived depends on when the kill landed; the count must match.
    let alive = survivors_then_exactly_the_quota(&daemon, client, held);
    eprintln!(
        "kill -9 of the {victim} during a hand-off of {QUOTA}: {alive} connections kept, quota exact"
    );
}

/// The per-client limit of the kill tests: 500 connections from one client, so that a kill
/// lands in the middle of their hand-offs.
const QUOTA: usize = 500;

/// After a kill during hand-offs: counts the connections of `held` that still echo, then
/// checks that `client` can open exactly the rest of its quota (waiting until the closed ones'
/// counts are released), never one more. Returns the survivors.
fn survivors_then_exactly_the_quota(
    daemon: &Daemon,
    client: Ipv4Addr,
    mut held: Vec<TcpStream>,
) -> usize {
    let mut alive = 0;
    held.retain_mut(|stream| {
        let ok = exchange(stream, b"alive?", QUICK) == Outcome::Echoed;
        alive += usize::from(ok);
        ok
    });
    let mut extra = Vec::new();
    eventually("the client can fill its quota again", || {
        extra.extend(fill_quota(daemon.addr(), client, QUOTA - alive - extra.len()));
        alive + extra.len() == QUOTA
    });
    assert_eq!(fill_quota(daemon.addr(), client, 1).len(), 0, "never more than the quota");
    alive
}

#[test]
fn kill_9_of_the_receiving_worker_during_a_hand_off_keeps_counts_exact() {
    kill_during_handoff("receiver");
}

#[test]
fn kill_9_of_the_sending_worker_during_a_hand_off_keeps_counts_exact() {
    kill_during_handoff("sender");
}

#[test]
fn after_an_upgrade_the_old_master_never_sends_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&path).unwrap();
    let env = [("NOTIFY_SOCKET", path.to_str().unwrap())];
    let mut daemon = Daemon::launch(&controlled_config(1, "", ""), None, &env);
    let old = daemon.pid();
    let (status, stdout, stderr) = daemon.control("upgrade");
    assert_eq!(code(status), 0, "{stderr}");
    let new = new_master_pid(&stdout);
    daemon.signal(Signal::SIGWINCH);
    daemon.signal(Signal::SIGQUIT);
    assert_eq!(code(daemon.wait_master_exit(PATIENCE).expect("the old master exits")), 0);
    // Everything the old master sent is queued by now; the new master announces itself
    // once its pool is ready, which `upgrade` may report a moment before.
    notify.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut buffer = [0u8; 4096];
    let mut messages = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        match notify.recv(&mut buffer) {
            Ok(n) => messages.push(String::from_utf8_lossy(&buffer[..n]).into_owned()),
            Err(_) if messages.iter().any(|m| m.contains(&format!("MAINPID={new}"))) => break,
            Err(_) => {}
        }
    }
    assert!(
        messages.iter().any(|m| m.contains(&format!("MAINPID={new}"))),
        "the new master took over: {messages:?}"
    );
    assert!(
        !messages.iter().any(|m| m.lines().any(|l| l == "STOPPING=1")),
        "old master {old} said STOPPING=1 after the upgrade: {messages:?}"
    );
    // The new master serves.
    let mut stream = connect(daemon.addr());
    assert_eq!(exchange(&mut stream, b"new", QUICK), Outcome::Echoed);
}

#[test]
fn the_per_client_limit_stays_exact_while_both_masters_of_an_upgrade_run() {
    let daemon = Daemon::start(&controlled_config(
        2,
        "",
        "max_connections_per_client = 5\nmax_long_connections_per_client = 0",
    ));
    let old = daemon.pid();
    let client = Ipv4Addr::new(127, 0, 0, 8);
    let mut held = fill_quota(daemon.addr(), client, 3);
    assert_eq!(held.len(), 4, "four below the limit");
    held.pop();
    let (status, stdout, stderr) = daemon.control("upgrade");
    assert_eq!(code(status), 0, "{stderr}");
    new_master_pid(&stdout);
    daemon.wait_for_log("the new master adopts the table", |l| {
        l.contains("adopted the old master's per-client table")
    });
    // Both masters' workers accept on the one socket: whichever takes them, two more fit
    // and the sixth is refused (without a shared table, the new master would admit five).
    held.extend(fill_quota(daemon.addr(), client, 5 - held.len()));
    assert_eq!(held.len(), 5, "exactly the quota");
    for round in 0..3 {
        let mut sixth = connect_from(client, daemon.addr());
        assert_eq!(exchange(&mut sixth, b"6th", QUICK), Outcome::Closed, "round {round}");
        assert!(is_running(old.as_raw()), "both masters run");
        for stream in &mut held {
            assert_eq!(exchange(stream, b"kept", QUICK), Outcome::Echoed, "round {round}");
        }
        drop(held.drain(..2));
        eventually("two counts are released", || {
            let mut stream = connect_from(client, daemon.addr());
            if exchange(&mut stream, b"again", QUICK) == Outcome::Echoed {
                held.push(stream);
            }
            held.len() == 5
        });
    }
    // Only the new master accepts once the old one's workers stop: the quota still holds.
    daemon.signal(Signal::SIGWINCH);
    daemon.wait_until_old_master("the old workers stop", |s| {
        s.master.pid == old.as_raw() && s.ready(s.master.generation).is_empty()
    });
    drop(held.pop());
    eventually("the count is released", || {
        let mut stream = connect_from(client, daemon.addr());
        if exchange(&mut stream, b"again", QUICK) == Outcome::Echoed {
            held.push(stream);
        }
        held.len() == 5
    });
    assert_eq!(fill_quota(daemon.addr(), client, 1).len(), 0, "never six");
}

#[test]
fn long_clients_survive_usr2_winch_quit_and_end_up_with_the_new_master() {
    let mut daemon = Daemon::start(&controlled_config(
        2,
        "",
        "max_connections_per_client = 0\nmax_long_connections_per_client = 0",
    ));
    let old = daemon.pid();
    let stop = Arc::new(AtomicBool::new(false));
    let clients = long_clients(daemon.addr(), &stop);
    let ports: Vec<u16> = clients.iter().map(|c| c.port).collect();
    let short = Load::start(daemon.addr(), 2, 0, Duration::ZERO);
    each_exchanges(&clients, 1);
    let (status, stdout, stderr) = daemon.control("upgrade");
    assert_eq!(code(status), 0, "{stderr}");
    let new = new_master_pid(&stdout);
    // `status` reads the new master's scoreboard now.
    let new_workers: Vec<i32> = workers(&daemon).iter().map(|w| w.0).collect();
    assert_eq!(new_workers.len(), 2, "the new master's workers");
    daemon.signal(Signal::SIGWINCH);
    daemon.signal(Signal::SIGQUIT);
    // The old workers hand every connection to the new master's and exit, long before
    // graceful_timeout (10 s) would have cut the busy clients.
    let status = daemon.wait_master_exit(PATIENCE).expect("the old master exits");
    assert_eq!(code(status), 0);
    each_exchanges(&clients, 1);
    stop.store(true, Ordering::SeqCst);
    let short = short.finish();
    assert_no_loss(clients, short);
    let (_, status, _) = daemon.control("status");
    assert!(status.starts_with(&format!("master pid {new},")), "{status}");
    // Each long client was served by a worker of the new master at the end.
    for port in ports {
        let peer = format!("peer=127.0.0.1:{port} ");
        let line = daemon.wait_for_log("a long client's access line", |l| l.contains(&peer));
        assert!(new_workers.contains(&pid_of(&line)), "not closed by the new master: {line}");
        assert_eq!(field(&line, "reason"), Some("client-close"), "{line}");
    }
    assert!(!is_running(old.as_raw()));
}

#[test]
fn kill_9_of_the_old_master_during_an_upgrade_hand_off_keeps_counts_exact() {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, (QUOTA as u64 * 2 + 200).max(soft), hard).unwrap();
    let config = controlled_config(
        1,
        "event_backend = \"epoll\"\nmax_connections_per_worker = 1000",
        &format!("max_connections_per_client = {QUOTA}\nmax_long_connections_per_client = 0"),
    );
    let mut daemon = Daemon::start_with_nofile(&config, Some(8192));
    let old = daemon.pid();
    let old_worker = daemon.worker_pids()[0];
    let client = Ipv4Addr::new(127, 0, 0, 10);
    let held = fill_quota(daemon.addr(), client, QUOTA);
    assert_eq!(held.len(), QUOTA);
    let (status, _, stderr) = daemon.control("upgrade");
    assert_eq!(code(status), 0, "{stderr}");
    assert_eq!(fill_quota(daemon.addr(), client, 1).len(), 0, "the quota spans both masters");
    // WINCH starts the hand-off to the new master; kill the old master in its middle.
    daemon.signal(Signal::SIGWINCH);
    let sender = format!("pid={old_worker}:");
    daemon.wait_for_log("the hand-off starts", |l| {
        l.contains(&sender) && l.contains("handed off (Adopted)")
    });
    kill(old, Signal::SIGKILL).unwrap();
    daemon.wait_master_exit(PATIENCE).expect("the old master is gone");
    // Its worker follows it (parent-death signal).
    eventually("the old worker is gone", || !is_running(old_worker));
    // The new master releases what the old range still counted once nobody uses it.
    let alive = survivors_then_exactly_the_quota(&daemon, client, held);
    eprintln!(
        "kill -9 of the old master during an upgrade hand-off of {QUOTA}: {alive} connections kept by the new master, quota exact"
    );
}

#[test]
fn hand_offs_are_counted_per_listener_in_status() {
    let daemon = Daemon::start(&controlled_config(1, "", ""));
    let mut stream = connect(daemon.addr());
    assert_eq!(exchange(&mut stream, b"before", QUICK), Outcome::Echoed);
    let (status, _, stderr) = daemon.control("reload");
    assert_eq!(code(status), 0, "{stderr}");
    // The connection moves to the new generation at its first rest: once out, once in.
    let counts = |document: &serde_json::Value| {
        let echo = &document["listeners"][0];
        (echo["handed_off"].as_u64(), echo["adopted"].as_u64(), echo["open"].as_u64())
    };
    eventually("the hand-off is counted", || {
        counts(&crate::status::status_json(&daemon)) == (Some(1), Some(1), Some(1))
    });
    assert_eq!(exchange(&mut stream, b"after", QUICK), Outcome::Echoed, "still served");
}
