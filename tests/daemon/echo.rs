//! Echo (RFC 862) end to end: data integrity, concurrency, backpressure, worker spread.

use std::collections::HashSet;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::thread;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::harness::*;

const MIB: usize = 1024 * 1024;

#[test]
fn echo_round_trips_1_mib_on_100_concurrent_connections() {
    let daemon = Daemon::start(&echo_config(
        4,
        "",
        "max_connections_per_client = 0\nmax_long_connections_per_client = 0",
    ));
    let addr = daemon.addr();
    let clients: Vec<_> = (0..100u64)
        .map(|seed| {
            thread::spawn(move || {
                let data = random_bytes(MIB, seed);
                let mut stream = connect(addr);
                let mut writer = stream.try_clone().unwrap();
                let expected = data.clone();
                let sender = thread::spawn(move || {
                    writer.write_all(&data).unwrap();
                    writer.shutdown(std::net::Shutdown::Write).unwrap();
                });
                let mut echoed = Vec::with_capacity(MIB);
                stream.read_to_end(&mut echoed).unwrap();
                sender.join().unwrap();
                assert_eq!(echoed.len(), MIB, "connection {seed}: length");
                assert!(echoed == expected, "connection {seed}: bytes differ");
            })
        })
        .collect();
    for client in clients {
        client.join().expect("client");
    }
    // Every connection was closed by the client's FIN after a full echo.
    let lines =
        daemon.wait_for_lines("100 access lines", 100, |l| l.contains("access listener=echo"));
    for line in &lines {
        assert_eq!(field(line, "reason"), Some("client-close"), "{line}");
        assert_eq!(field(line, "in"), Some(&*MIB.to_string()), "{line}");
        assert_eq!(field(line, "out"), Some(&*MIB.to_string()), "{line}");
    }
}

/// A client that writes without reading is held back by TCP flow control: the worker stops
/// reading once its bounded buffer is full, instead of buffering everything in memory. When
/// the client finally reads, it gets every byte it wrote, intact.
#[test]
fn client_that_writes_everything_before_reading_gets_backpressure_then_all_its_data() {
    let daemon = Daemon::start(&echo_config(1, "", ""));
    let worker = daemon.worker_pids()[0];
    let mut stream = connect(daemon.addr());
    assert_eq!(exchange(&mut stream, b"warm-up", PATIENCE), Outcome::Echoed);
    let rss_before = rss_kib(worker);

    // Write up to 64 MiB without reading, until the connection stops taking data.
    const OFFER: usize = 64 * MIB;
    let data = random_bytes(OFFER, 42);
    stream.set_nonblocking(true).unwrap();
    let mut written = 0;
    while written < OFFER {
        match stream.write(&data[written..(written + 64 * 1024).min(OFFER)]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                // Stalled for 2 s: the server is no longer reading.
                let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLOUT)];
                if poll(&mut fds, PollTimeout::from(2000u16)).unwrap() == 0 {
                    break;
                }
            }
            Err(e) => panic!("write failed after {written} bytes: {e}"),
        }
    }
    assert!(written < OFFER, "the server took all {OFFER} bytes without the client reading");
    let grown = rss_kib(worker).saturating_sub(rss_before);
    assert!(grown < 4 * 1024, "worker memory grew by {grown} KiB while the client did not read");

    // Now read everything back while finishing the writes.
    stream.set_nonblocking(false).unwrap();
    let mut reader = stream.try_clone().unwrap();
    let expected = data.clone();
    let collector = thread::spawn(move || {
        let mut echoed = vec![0u8; OFFER];
        reader.read_exact(&mut echoed).unwrap();
        assert!(echoed == expected, "echoed bytes differ");
    });
    stream.write_all(&data[written..]).unwrap();
    collector.join().expect("all bytes echoed back intact");
}

#[test]
fn connections_are_served_by_more_than_one_worker() {
    // Each worker holds at most 4 connections, so 12 open ones need at least 3 workers.
    let daemon = Daemon::start(&echo_config(
        4,
        "max_connections_per_worker = 4",
        "max_connections_per_client = 0\nmax_long_connections_per_client = 0",
    ));
    let mut streams: Vec<_> = (0..12).map(|_| connect(daemon.addr())).collect();
    for (i, stream) in streams.iter_mut().enumerate() {
        assert_eq!(exchange(stream, format!("hello {i}").as_bytes(), PATIENCE), Outcome::Echoed);
    }
    drop(streams);
    let lines =
        daemon.wait_for_lines("12 access lines", 12, |l| l.contains("access listener=echo"));
    let pids: HashSet<i32> = lines.iter().map(|l| pid_of(l)).collect();
    assert!(pids.len() >= 3, "served by {} worker(s): {pids:?}", pids.len());
    let workers: HashSet<i32> = daemon.worker_pids().into_iter().collect();
    assert!(pids.is_subset(&workers), "access lines come from workers");
    assert!(!pids.contains(&daemon.pid().as_raw()), "the master never serves");
}

#[test]
fn echo_is_binary_safe_and_honours_half_close() {
    let daemon = Daemon::start(&echo_config(2, "", ""));
    let mut stream = connect(daemon.addr());
    let data: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    stream.write_all(&data).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut echoed = Vec::new();
    stream.read_to_end(&mut echoed).unwrap();
    assert!(echoed == data, "half-closed echo returns every byte, then EOF");
}
