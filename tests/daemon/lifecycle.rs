//! Fast and graceful stop.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpListener;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::Signal;

use crate::harness::*;

#[test]
fn sigquit_lets_an_in_flight_exchange_finish_then_exits_0_and_frees_the_port() {
    let mut daemon = Daemon::start(&echo_config(1, "", ""));
    let addr = daemon.addr();
    // Made before the connection: 32 MiB take a debug build a second or more, ten on a
    // loaded machine, and a connection silent that long is closed as idle (idle-short).
    let data = random_bytes(32 * 1024 * 1024, 7);
    let mut stream = connect(addr);
    // Put an exchange in flight: write until the server stops taking data.
    stream.set_nonblocking(true).unwrap();
    let mut written = 0;
    loop {
        match stream.write(&data[written..(written + 65536).min(data.len())]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLOUT)];
                if poll(&mut fds, PollTimeout::from(2000u16)).unwrap() == 0 {
                    break;
                }
            }
            Err(e) => panic!("write: {e}"),
        }
        assert!(written < data.len(), "the server never pushed back");
    }
    daemon.signal(Signal::SIGQUIT);
    daemon.wait_for_log("the worker drains", |l| {
        l.contains("graceful stop: no longer accepting; 1 connection")
    });
    // New connections are refused while the exchange finishes.
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "listeners are closed during a graceful stop"
    );
    stream.set_nonblocking(false).unwrap();
    let mut echoed = vec![0u8; written];
    stream.read_exact(&mut echoed).unwrap_or_else(|e| panic!("reading back {written} bytes: {e}"));
    assert!(echoed == data[..written], "the in-flight exchange is echoed intact");
    assert!(closed_within(&mut stream, PATIENCE), "closed once the exchange is answered");
    drop(stream);
    let status = daemon.wait_exit(PATIENCE).expect("master exits");
    assert_eq!(code(status), 0);
    daemon.wait_for_log("shutdown access line", |l| l.contains("reason=shutdown"));
    TcpListener::bind(addr).expect("the port is free after a graceful stop");
}

#[test]
fn sigterm_stops_within_a_second() {
    let mut daemon = Daemon::start(&echo_config(4, "", ""));
    let mut stream = connect(daemon.addr());
    assert_eq!(exchange(&mut stream, b"hi", PATIENCE), Outcome::Echoed);
    let sent = Instant::now();
    daemon.signal(Signal::SIGTERM);
    let status = daemon.wait_exit(Duration::from_secs(1)).expect("stopped within a second");
    assert_eq!(code(status), 0);
    assert!(sent.elapsed() < Duration::from_secs(1));
    assert!(closed_within(&mut stream, PATIENCE), "connections are closed by a fast stop");
    TcpListener::bind(daemon.addr()).expect("the port is free after a fast stop");
}

#[test]
fn sigint_stops_like_sigterm() {
    let mut daemon = Daemon::start(&echo_config(2, "", ""));
    let mut stream = connect(daemon.addr());
    assert_eq!(exchange(&mut stream, b"still serving", PATIENCE), Outcome::Echoed);
    daemon.signal(Signal::SIGINT);
    let status = daemon.wait_exit(PATIENCE).expect("master exits");
    assert_eq!(code(status), 0);
}

#[test]
fn workers_exit_when_the_master_dies() {
    let mut daemon = Daemon::start(&echo_config(2, "", ""));
    let workers = daemon.worker_pids();
    daemon.signal(Signal::SIGKILL);
    // Every process of the daemon holds the log pipe: it closes once the workers are gone.
    daemon.wait_exit(PATIENCE).expect("workers exit after the master is killed");
    for pid in workers {
        eventually(&format!("worker {pid} exits after its master"), || !is_running(pid));
    }
}
