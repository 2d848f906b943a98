//! Short and long idle timeouts.

use std::time::{Duration, Instant};

use crate::harness::*;

const SHORT: Duration = Duration::from_millis(400);
const LONG: Duration = Duration::from_millis(2000);

fn daemon() -> Daemon {
    Daemon::start(&echo_config(
        2,
        "",
        &format!(
            "short_idle_timeout = \"{}ms\"\nlong_idle_timeout = \"{}ms\"",
            SHORT.as_millis(),
            LONG.as_millis()
        ),
    ))
}

#[test]
fn a_silent_new_connection_is_closed_after_short_idle_timeout() {
    let daemon = daemon();
    let opened = Instant::now();
    let mut stream = connect(daemon.addr());
    assert!(closed_within(&mut stream, PATIENCE), "a silent connection must be closed");
    let waited = opened.elapsed();
    assert!(waited >= SHORT, "closed after {waited:?}, before short_idle_timeout");
    let line = daemon.wait_for_log("idle-short access line", |l| l.contains("reason=idle-short"));
    assert_eq!(field(&line, "exchanges"), Some("0"));
}

#[test]
fn a_kept_alive_connection_outlives_short_idle_timeout_and_closes_after_long() {
    let daemon = daemon();
    let mut stream = connect(daemon.addr());
    assert_eq!(exchange(&mut stream, b"ping", PATIENCE), Outcome::Echoed);
    // Three short timeouts of silence: a long connection must still be open.
    assert!(!closed_within(&mut stream, SHORT * 3), "a long connection was closed as short");
    // Taken before the exchange: the server's last activity is later still, so a stall of
    // this thread after the echo cannot make the wait look shorter than it was.
    let last = Instant::now();
    assert_eq!(exchange(&mut stream, b"again", PATIENCE), Outcome::Echoed);
    assert!(closed_within(&mut stream, PATIENCE), "an idle long connection must be closed");
    let waited = last.elapsed();
    assert!(waited >= LONG, "closed after {waited:?}, before long_idle_timeout");
    let line = daemon.wait_for_log("idle-long access line", |l| l.contains("reason=idle-long"));
    assert_eq!(field(&line, "exchanges"), Some("2"));
}
