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
    let mut stream = kept_past_short_idle(&daemon);
    // Taken before the exchange: the server's last activity is later still, so a stall of
    // this thread after the echo cannot make the wait look shorter than it was.
    let last = Instant::now();
    assert_eq!(exchange(&mut stream, b"again", PATIENCE), Outcome::Echoed);
    assert!(closed_within(&mut stream, PATIENCE), "an idle long connection must be closed");
    let waited = last.elapsed();
    assert!(waited >= LONG, "closed after {waited:?}, before long_idle_timeout");
    // Its own line (a connection given up by `kept_past_short_idle` has one too).
    let peer = format!("peer={} ", stream.local_addr().unwrap());
    let line = daemon.wait_for_log("idle-long access line", |l| {
        l.contains(&peer) && l.contains("reason=idle-long")
    });
    assert_eq!(field(&line, "exchanges"), Some("2"));
}

/// A connection that made one exchange and then stayed open through three short idle
/// timeouts of silence, as a long one must.
///
/// The server's last activity is between `sent` and the echo, so a close seen less than
/// LONG after `sent` is the short timeout applied to a long connection: a failure. A close
/// seen later proves nothing either way (this thread was held up past the long timeout,
/// which may be what closed it, on a loaded machine): then the check is made again on a new
/// connection.
fn kept_past_short_idle(daemon: &Daemon) -> std::net::TcpStream {
    const ATTEMPTS: usize = 5;
    for _ in 0..ATTEMPTS {
        let mut stream = connect(daemon.addr());
        let sent = Instant::now();
        assert_eq!(exchange(&mut stream, b"ping", PATIENCE), Outcome::Echoed);
        if !closed_within(&mut stream, SHORT * 3) {
            return stream;
        }
        let seen = sent.elapsed();
        assert!(seen >= LONG, "a long connection was closed as short, {seen:?} after its exchange");
    }
    panic!("{ATTEMPTS} times, this thread was held up past long_idle_timeout: nothing was checked");
}
