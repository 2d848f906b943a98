//! The poll and epoll backends serve like select, and epoll goes past select's 1024.

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::resource::{Resource, getrlimit, setrlimit};

use crate::harness::*;

const QUICK: Duration = Duration::from_secs(10);

fn backend_config(backend: &str, daemon_extra: &str, policy: &str) -> String {
    echo_config(2, &format!("event_backend = \"{backend}\"\n{daemon_extra}"), policy)
}

fn serves_echo_timeouts_and_limits(backend: &str) {
    // The short idle timeout on a listener of its own: on the echo listener it would also
    // close the clients' connections that a loaded machine holds silent for 300 ms between
    // connect and first write, which then look refused (or fail their echo).
    let policy = "max_connections_per_client = 3\nmax_long_connections_per_client = 0";
    let idle = "[[listener]]\nname = \"idle\"\naddress = \"127.0.0.1:0\"\nservice = \"echo\"\n\
                short_idle_timeout = \"300ms\"\n";
    let daemon = Daemon::start(&format!("{}{idle}", backend_config(backend, "", policy)));
    let line = daemon.wait_for_log("the backend", |l| l.contains("worker started"));
    assert!(line.ends_with(backend), "{line}");
    // Concurrent 256 KiB echoes, from distinct clients (the limit is per client).
    let addr = daemon.addr();
    let clients: Vec<_> = (0..12u8)
        .map(|i| {
            thread::spawn(move || {
                let data = random_bytes(256 * 1024, u64::from(i));
                let mut stream = connect_from(Ipv4Addr::new(127, 0, 1, i + 1), addr);
                let mut writer = stream.try_clone().unwrap();
                let expected = data.clone();
                let sender = thread::spawn(move || {
                    writer.write_all(&data).unwrap();
                    writer.shutdown(std::net::Shutdown::Write).unwrap();
                });
                let mut echoed = Vec::new();
                stream.read_to_end(&mut echoed).unwrap();
                sender.join().unwrap();
                assert!(echoed == expected, "client {i}: echo differs");
            })
        })
        .collect();
    for client in clients {
        client.join().expect("client");
    }
    // The per-client limit, exactly.
    let client = Ipv4Addr::new(127, 0, 2, 1);
    let mut streams: Vec<_> = (0..6).map(|_| connect_from(client, addr)).collect();
    let outcomes: Vec<Outcome> = streams.iter_mut().map(|s| exchange(s, b"n", QUICK)).collect();
    assert_eq!(outcomes.iter().filter(|o| **o == Outcome::Echoed).count(), 3, "{outcomes:?}");
    assert_eq!(outcomes.iter().filter(|o| **o == Outcome::Closed).count(), 3, "{outcomes:?}");
    // A silent connection is closed after the short idle timeout.
    let opened = Instant::now();
    let mut silent = connect(daemon.addrs[1]);
    assert!(closed_within(&mut silent, PATIENCE));
    assert!(opened.elapsed() >= Duration::from_millis(300));
}

#[test]
fn poll_backend_serves_like_select() {
    serves_echo_timeouts_and_limits("poll");
}

#[test]
fn epoll_backend_serves_like_select() {
    serves_echo_timeouts_and_limits("epoll");
}

#[test]
fn epoll_holds_more_connections_than_select_can_watch() {
    const CONNECTIONS: usize = 1500;
    // This test holds the client ends: raise our own soft limit as far as the hard one goes.
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let wanted = (CONNECTIONS as u64 + 200).max(soft);
    assert!(
        hard >= wanted,
        "RLIMIT_NOFILE hard limit {hard} is below the {wanted} this test needs"
    );
    setrlimit(Resource::RLIMIT_NOFILE, wanted, hard).unwrap();
    let config = echo_config(
        1,
        "event_backend = \"epoll\"\nmax_connections_per_worker = 4000",
        "max_connections_per_client = 0\nmax_long_connections_per_client = 0",
    );
    let daemon = Daemon::start_with_nofile(&config, Some(8192));
    let mut streams = Vec::with_capacity(CONNECTIONS);
    for i in 0..CONNECTIONS {
        let mut stream = connect(daemon.addr());
        assert_eq!(exchange(&mut stream, b"x", QUICK), Outcome::Echoed, "connection {i}");
        streams.push(stream);
    }
    // All held by the one worker, and all still served.
    for (i, stream) in streams.iter_mut().enumerate().step_by(97) {
        assert_eq!(exchange(stream, b"still", QUICK), Outcome::Echoed, "connection {i}");
    }
}

/// Listening sockets on 127.0.0.1:`port`, from /proc/net/tcp.
fn listening_sockets(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let local = format!("0100007F:{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            fields.get(1) == Some(&local.as_str()) && fields.get(3) == Some(&"0A")
        })
        .count()
}

#[test]
fn reuseport_gives_each_worker_a_socket_and_spreads_connections() {
    let daemon = Daemon::start(&echo_config(
        2,
        "event_backend = \"epoll\"",
        "reuseport = true\nmax_connections_per_client = 0\nmax_long_connections_per_client = 0",
    ));
    assert_eq!(listening_sockets(daemon.addr().port()), 3, "the shared socket and one per worker");
    let mut streams: Vec<_> =
        (0..40u8).map(|i| connect_from(Ipv4Addr::new(127, 0, 3, i + 1), daemon.addr())).collect();
    for stream in &mut streams {
        assert_eq!(exchange(stream, b"spread", QUICK), Outcome::Echoed);
    }
    drop(streams);
    let lines =
        daemon.wait_for_lines("40 access lines", 40, |l| l.contains("access listener=echo"));
    let workers: std::collections::HashSet<i32> = lines.iter().map(|l| pid_of(l)).collect();
    assert_eq!(workers.len(), 2, "both workers served: {workers:?}");
    // A graceful stop closes the workers' own sockets with the shared one.
    let mut daemon = daemon;
    daemon.signal(nix::sys::signal::Signal::SIGQUIT);
    assert_eq!(code(daemon.wait_exit(PATIENCE).expect("exits")), 0);
    assert_eq!(listening_sockets(daemon.addr().port()), 0);
}
