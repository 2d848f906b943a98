//! Per-client limits, exact across workers; reclaimed when a worker dies.

use std::net::{Ipv4Addr, TcpStream};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::harness::*;

const QUICK: Duration = Duration::from_secs(10);

fn client(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

/// Opens `n` connections from `source` at once, then tries one exchange on each; returns the
/// streams that echoed and the number the server closed.
fn open_many(daemon: &Daemon, source: Ipv4Addr, n: usize) -> (Vec<TcpStream>, usize) {
    let streams: Vec<TcpStream> = (0..n).map(|_| connect_from(source, daemon.addr())).collect();
    let mut open = Vec::new();
    let mut closed = 0;
    for (i, mut stream) in streams.into_iter().enumerate() {
        match exchange(&mut stream, format!("#{i}").as_bytes(), QUICK) {
            Outcome::Echoed => open.push(stream),
            Outcome::Closed => closed += 1,
            Outcome::Silent => panic!("connection {i} from {source} was neither served nor closed"),
        }
    }
    (open, closed)
}

#[test]
fn per_client_limit_is_exact_across_four_workers() {
    let daemon = Daemon::start(&controlled_config(
        4,
        "",
        "max_connections_per_client = 5\nmax_long_connections_per_client = 0",
    ));
    let (open, refused) = open_many(&daemon, client(1), 20);
    assert_eq!(open.len(), 5, "exactly the limit stays open");
    assert_eq!(refused, 15);
    // Another client has its own quota, exactly.
    let (other, other_refused) = open_many(&daemon, client(2), 6);
    assert_eq!((other.len(), other_refused), (5, 1));
    // Counted exactly; logged per client, not per connection.
    crate::admission::expect_refused(&daemon, "limit", 16);
    daemon.wait_for_log("client 2's refusal", |l| {
        l.contains("refused a connection from 127.0.0.2 on echo (limit)")
    });
    // The five open ones keep working.
    for mut stream in open {
        assert_eq!(exchange(&mut stream, b"still here", QUICK), Outcome::Echoed);
    }
}

#[test]
fn long_connection_limit_closes_after_the_exchange() {
    let daemon = Daemon::start(&echo_config(
        3,
        "",
        "max_connections_per_client = 0\nmax_long_connections_per_client = 2",
    ));
    let mut first = connect_from(client(3), daemon.addr());
    let mut second = connect_from(client(3), daemon.addr());
    let mut third = connect_from(client(3), daemon.addr());
    // A worker counts a connection as long right after it wrote the first answer, so an
    // echo alone does not say the count is taken: the second exchange on the same
    // connection does (its worker reads it only in a later callback). Without it, the
    // third's promotion could overtake the first's in another worker, and the first would
    // be the one closed.
    assert_eq!(exchange(&mut first, b"one", QUICK), Outcome::Echoed);
    assert_eq!(exchange(&mut first, b"one, kept", QUICK), Outcome::Echoed);
    assert_eq!(exchange(&mut second, b"two", QUICK), Outcome::Echoed);
    assert_eq!(exchange(&mut second, b"two, kept", QUICK), Outcome::Echoed);
    // The third gets its answer, then is closed instead of kept alive.
    assert_eq!(exchange(&mut third, b"three", QUICK), Outcome::Echoed);
    assert!(closed_within(&mut third, QUICK), "the third long connection must be closed");
    drop(third); // Our FIN ends the server's lingering close.
    daemon.wait_for_log("long-limit close", |l| l.contains("reason=long-limit"));
    // The first two are kept alive; another client has its own long quota.
    assert_eq!(exchange(&mut first, b"one again", QUICK), Outcome::Echoed);
    assert_eq!(exchange(&mut second, b"two again", QUICK), Outcome::Echoed);
    let mut elsewhere = connect_from(client(4), daemon.addr());
    assert_eq!(exchange(&mut elsewhere, b"four", QUICK), Outcome::Echoed);
    assert_eq!(exchange(&mut elsewhere, b"four again", QUICK), Outcome::Echoed);
    // Once the first closes (and the server has seen it), a new one may stay long.
    let first_port = first.local_addr().unwrap().port();
    drop(first);
    daemon.wait_for_log("first connection closed", |l| {
        l.contains(&format!("peer=127.0.0.3:{first_port} ")) && l.contains("reason=client-close")
    });
    let mut fourth = connect_from(client(3), daemon.addr());
    assert_eq!(exchange(&mut fourth, b"five", QUICK), Outcome::Echoed);
    assert_eq!(exchange(&mut fourth, b"five again", QUICK), Outcome::Echoed);
}

#[test]
fn a_killed_worker_is_respawned_and_its_counts_released() {
    // Two workers of at most 3 connections: 5 connections put at least 2 on each.
    let daemon = Daemon::start(&echo_config(
        2,
        "max_connections_per_worker = 3",
        "max_connections_per_client = 5\nmax_long_connections_per_client = 0",
    ));
    let (before, refused) = open_many(&daemon, client(5), 5);
    assert_eq!((before.len(), refused), (5, 0));
    let victim = daemon.worker_pids()[0];
    kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    daemon.wait_replaced(&[victim]);

    let mut survivors = Vec::new();
    for mut stream in before {
        match exchange(&mut stream, b"alive?", QUICK) {
            Outcome::Echoed => survivors.push(stream),
            Outcome::Closed => {}
            Outcome::Silent => panic!("a connection hung after its worker was killed"),
        }
    }
    let lost = 5 - survivors.len();
    assert!((2..=3).contains(&lost), "the killed worker held {lost} connections");
    // The dead worker's counts are released: the client gets exactly its quota back.
    let (again, refused) = open_many(&daemon, client(5), lost + 1);
    assert_eq!(again.len(), lost, "quota after the kill");
    assert_eq!(refused, 1);
}
