//! Running out of file descriptors must not make a worker spin, and must not lose anything.

use std::io::Write;
use std::time::Duration;

use crate::harness::*;

#[test]
fn out_of_descriptors_pauses_accept_without_spinning_and_recovers() {
    let daemon = Daemon::start_with_nofile(
        &echo_config(1, "", "max_connections_per_client = 0\nmax_long_connections_per_client = 0"),
        Some(40),
    );
    let worker = daemon.worker_pids()[0];
    let mut streams: Vec<_> = (0..60).map(|_| connect(daemon.addr())).collect();
    for stream in &mut streams {
        stream.write_all(b"x").unwrap();
    }
    // The backlog is accepted in order: the first ones are served until descriptors run out.
    let mut served = 0;
    while served < streams.len() {
        match expect_bytes(&mut streams[served], b"x", Duration::from_secs(2)) {
            Outcome::Echoed => served += 1,
            Outcome::Silent => break,
            Outcome::Closed => panic!("connection {served} was closed"),
        }
    }
    assert!(served > 0 && served < streams.len(), "served {served} of {}", streams.len());
    daemon.wait_for_log("EMFILE logged", |l| {
        l.contains("Too many open files") && l.contains("pausing accept")
    });

    // A window of one second, to measure CPU use (not to wait for anything): a worker that
    // retried accept in a loop would burn the whole second.
    let before = cpu_ticks(worker);
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(worker) - before;
    assert!(
        used < 30,
        "the worker used {used} ticks of CPU in one second while out of descriptors"
    );
    let logged = daemon.matching(|l| l.contains("Too many open files")).len();
    assert!(logged <= 2, "{logged} EMFILE lines: not rate-limited");

    // Freeing descriptors lets the waiting connections in, with their data intact.
    let waiting = streams.split_off(served);
    drop(streams);
    for (i, mut stream) in waiting.into_iter().enumerate() {
        assert_eq!(
            expect_bytes(&mut stream, b"x", PATIENCE),
            Outcome::Echoed,
            "waiting connection {i}"
        );
    }
}
