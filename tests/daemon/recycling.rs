//! Worker recycling (`daemon.recycle_after_connections`, `recycle_jitter`,
//! `recycle_above_rss`): a worker past its count or its memory ceiling asks for a
//! replacement; the master starts one and then drains the old worker, whose kept-alive
//! connections move on without the client seeing anything. Logged once per worker, counted
//! in the status.

use std::net::TcpStream;

use crate::harness::*;

/// Opens and closes connections, one exchange each, until `done` says so (at most `most`).
fn churn(daemon: &Daemon, most: usize, done: impl Fn(&Status) -> bool) -> usize {
    for n in 1..=most {
        let mut stream = connect(daemon.addr());
        assert_eq!(exchange(&mut stream, b"churn\n", PATIENCE), Outcome::Echoed, "connection {n}");
        drop(stream);
        if daemon.status().is_some_and(|s| done(&s)) {
            return n;
        }
    }
    panic!("{most} connections and no recycling: {:?}", daemon.status().map(|s| s.master));
}

fn echoes(stream: &mut TcpStream, round: usize) -> bool {
    exchange(stream, format!("still here {round}\n").as_bytes(), PATIENCE) == Outcome::Echoed
}

#[test]
fn a_worker_past_its_connection_count_is_replaced_and_its_clients_stay_served() {
    let config = controlled_config(2, "recycle_after_connections = 5\n", "");
    let mut daemon = Daemon::start(&config);
    let first = daemon.wait_ready().ready(1);
    // Kept alive across the recycling: handed off (echo's sessions move at rest), never cut.
    let mut kept: Vec<TcpStream> = (0..4).map(|_| connect(daemon.addr())).collect();
    for stream in &mut kept {
        assert!(echoes(stream, 0));
    }
    churn(&daemon, 200, |s| s.master.worker_recycles >= 1);
    let recycled = daemon.wait_for_log("a recycling line", |l| l.contains("recycling worker"));
    assert!(recycled.contains("accepted ") && recycled.contains(" connections;"), "{recycled}");
    let pid = pid_of_recycled(&recycled);
    assert!(first.contains(&pid), "{recycled}");
    let after = daemon.wait_replaced(&[pid]);
    assert_eq!(after.len(), 2, "the pool is whole: its replacement serves");
    for (round, stream) in kept.iter_mut().enumerate() {
        assert!(echoes(stream, round + 1), "a kept-alive client was cut");
    }
    let lines =
        daemon.matching(|l| l.contains("recycling worker") && l.contains(&format!("(pid {pid})")));
    assert_eq!(lines.len(), 1, "logged once per worker: {lines:?}");
    assert!(daemon.status().unwrap().master.worker_recycles >= 1);
}

#[test]
fn a_worker_over_its_memory_ceiling_is_replaced() {
    // 1 MiB: every worker is over it as soon as it looks.
    let config = controlled_config(2, "recycle_above_rss = 1\n", "");
    let mut daemon = Daemon::start(&config);
    daemon.wait_ready();
    churn(&daemon, 500, |s| s.master.worker_recycles >= 2);
    let line = daemon.wait_for_log("a recycling line", |l| l.contains("recycling worker"));
    assert!(line.contains("resident memory"), "{line}");
    // The pool stays whole and serving throughout.
    let mut stream = connect(daemon.addr());
    assert!(echoes(&mut stream, 0));
}

/// The pid in `recycling worker N (pid P): ...`.
fn pid_of_recycled(line: &str) -> i32 {
    let rest = line.split("(pid ").nth(1).expect("(pid P)");
    rest.split(')').next().unwrap().parse().expect("a pid")
}
