//! One backend address's active check: a non-blocking probe (connect, send, read the
//! reply) and the verdict rules (`rise`, `fall`) that turn probes into health.
//!
//! Runs in the health checker process. The probe never blocks: the checker's loop drives it
//! on readiness and on its deadline ([`Probe::step`]). Pure apart from the socket it holds.

use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant};

use crate::net::{self, Address, Stream};
use crate::scoreboard::{BackendScore, Health};
use crate::upstream::{Expect, HealthCheck};

/// Most reply bytes read for `expect` (a prefix is decided sooner).
pub const MAX_REPLY: usize = 4096;

/// Where a probe under way is.
#[derive(Debug)]
enum Phase {
    /// connect(2) in flight.
    Connecting,
    /// Sending `send`, this many bytes written.
    Sending(usize),
    /// Reading the reply, what came so far.
    Reading(Vec<u8>),
}

/// A probe under way.
#[derive(Debug)]
pub struct Probe {
    stream: Stream,
    phase: Phase,
    /// When it started.
    pub started: Instant,
    /// When it fails as timed out.
    pub deadline: Instant,
}

/// What the loop should wait for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// The socket writable (connect, send).
    Write,
    /// The socket readable (the reply).
    Read,
}

/// How a probe ended: passed, or why it failed (the reason `status` shows).
pub type Outcome = Result<(), String>;

impl Probe {
    /// Starts a probe of `address` at `now` with `check`'s timeout; `Err` with the reason
    /// when the connect fails at once.
    ///
    /// # Errors
    /// The reason, as `status` shows it (`connect: Connection refused`).
    pub fn start(address: &Address, check: &HealthCheck, now: Instant) -> Result<Probe, String> {
        let stream = net::connect(address, None).map_err(|e| format!("connect: {e}"))?;
        Ok(Probe { stream, phase: Phase::Connecting, started: now, deadline: now + check.timeout })
    }

    /// The socket, for the poller.
    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    /// What to wait for.
    pub fn wait(&self) -> Wait {
        match self.phase {
            Phase::Connecting | Phase::Sending(_) => Wait::Write,
            Phase::Reading(_) => Wait::Read,
        }
    }

    /// Moves the probe on after readiness (or at `now` past its deadline): `None` while it
    /// goes on, else how it ended.
    pub fn step(&mut self, check: &HealthCheck, now: Instant) -> Option<Outcome> {
        if now >= self.deadline {
            let what = match self.phase {
                Phase::Connecting => "connect",
                Phase::Sending(_) => "send",
                Phase::Reading(_) => "reply",
            };
            return Some(Err(format!("{what}: timed out after {:?}", check.timeout)));
        }
        loop {
            match &mut self.phase {
                Phase::Connecting => match self.stream.take_error() {
                    Ok(Some(error)) | Err(error) => return Some(Err(format!("connect: {error}"))),
                    Ok(None) => match self.stream.peer_addr() {
                        Ok(_) => self.phase = Phase::Sending(0),
                        Err(e) if e.raw_os_error() == Some(nix::libc::ENOTCONN) => return None,
                        Err(error) => return Some(Err(format!("connect: {error}"))),
                    },
                },
                Phase::Sending(sent) => {
                    if *sent == check.send.len() {
                        if check.expect == Expect::Nothing {
                            return Some(Ok(()));
                        }
                        self.phase = Phase::Reading(Vec::new());
                        continue;
                    }
                    match (&self.stream).write(&check.send[*sent..]) {
                        Ok(n) => *sent += n,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(error) => return Some(Err(format!("send: {error}"))),
                    }
                }
                Phase::Reading(reply) => {
                    let mut chunk = [0u8; 1024];
                    let room = (MAX_REPLY - reply.len()).min(chunk.len());
                    let eof = match (&self.stream).read(&mut chunk[..room]) {
                        Ok(0) => true,
                        Ok(n) => {
                            reply.extend_from_slice(&chunk[..n]);
                            false
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(error) => return Some(Err(format!("reply: {error}"))),
                    };
                    if let Some(outcome) =
                        judge(&check.expect, reply, eof || reply.len() >= MAX_REPLY)
                    {
                        return Some(outcome);
                    }
                }
            }
        }
    }
}

/// Whether `reply` (complete when `complete`) passes `expect`: `None` while more could
/// decide it.
pub fn judge(expect: &Expect, reply: &[u8], complete: bool) -> Option<Outcome> {
    let shown = || format!("{:?}", String::from_utf8_lossy(&reply[..reply.len().min(40)]));
    match expect {
        Expect::Nothing => Some(Ok(())),
        Expect::Prefix(prefix) => {
            let n = reply.len().min(prefix.len());
            if reply[..n] != prefix[..n] {
                let wanted = String::from_utf8_lossy(prefix);
                return Some(Err(format!("expected {wanted:?}, got {}", shown())));
            }
            if n == prefix.len() {
                return Some(Ok(()));
            }
            complete.then(|| {
                let wanted = String::from_utf8_lossy(prefix);
                Err(if reply.is_empty() {
                    format!("expected {wanted:?}, got nothing")
                } else {
                    format!("expected {wanted:?}, got {}", shown())
                })
            })
        }
        Expect::Pattern(regex) => {
            if regex.is_match(reply) {
                return Some(Ok(()));
            }
            complete.then(|| Err(format!("expected /{}/, got {}", regex.as_str(), shown())))
        }
    }
}

/// A change of health to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// It is up now.
    Up,
    /// It is down now, for this reason.
    Down(String),
}

/// Applies a probe's `outcome` to `row` by `check`'s `rise` and `fall` (the first verdict
/// of a pending backend decides at once); returns the change to log, once, if any.
pub fn apply(
    row: &BackendScore,
    check: &HealthCheck,
    outcome: &Outcome,
    took: Duration,
) -> Option<Change> {
    use std::sync::atomic::Ordering;
    let passed = outcome.is_ok();
    row.checked(
        crate::clock::unix_ms(),
        u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
        passed,
    );
    if let Err(reason) = outcome
        && row.health() != Health::Up
    {
        row.set_reason(reason);
    }
    let against = match (row.health(), passed) {
        (Health::Pending | Health::Unchecked, true) => {
            row.streak.store(0, Ordering::Relaxed);
            row.set_reason("");
            row.set_health(Health::Up);
            return Some(Change::Up);
        }
        (Health::Pending | Health::Unchecked, false) => {
            row.streak.store(0, Ordering::Relaxed);
            row.set_health(Health::Down);
            return Some(Change::Down(outcome.clone().err().unwrap_or_default()));
        }
        (Health::Up, true) | (Health::Down, false) => {
            row.streak.store(0, Ordering::Relaxed);
            return None;
        }
        (Health::Up, false) => check.fall,
        (Health::Down, true) => check.rise,
    };
    let streak = row.streak.fetch_add(1, Ordering::Relaxed) + 1;
    if streak < against {
        return None;
    }
    row.streak.store(0, Ordering::Relaxed);
    if passed {
        row.set_reason("");
        row.set_health(Health::Up);
        Some(Change::Up)
    } else {
        let reason = outcome.clone().err().unwrap_or_default();
        row.set_reason(&reason);
        row.set_health(Health::Down);
        Some(Change::Down(reason))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scoreboard::{RowSettings, Scoreboard};

    fn check(expect: Expect) -> HealthCheck {
        HealthCheck {
            interval: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            timeout: Duration::from_millis(500),
            send: b"PING\r\n".to_vec(),
            expect,
        }
    }

    #[test]
    fn replies_are_judged_by_prefix_or_pattern_as_soon_as_they_can_be() {
        let pong = Expect::Prefix(b"+PONG".to_vec());
        assert_eq!(judge(&pong, b"+PO", false), None, "wait for more");
        assert_eq!(judge(&pong, b"+PONG\r\n", false), Some(Ok(())));
        assert!(judge(&pong, b"-ERR", false).unwrap().unwrap_err().contains("got \"-ERR\""));
        assert!(judge(&pong, b"", true).unwrap().unwrap_err().contains("got nothing"));
        let smtp = Expect::Pattern(regex::bytes::Regex::new(r"^220 .*ESMTP").unwrap());
        assert_eq!(judge(&smtp, b"220 mail", false), None);
        assert_eq!(judge(&smtp, b"220 mail.example ESMTP Postfix\r\n", false), Some(Ok(())));
        assert!(judge(&smtp, b"554 go away\r\n", true).unwrap().is_err());
    }

    #[test]
    fn the_first_verdict_decides_then_rise_and_fall_count() {
        let board = Scoreboard::create(None, 1).unwrap();
        let table = board.backends();
        let settings = RowSettings {
            listener: 0,
            name: "127.0.0.1:1".into(),
            weight: 1,
            backup: false,
            max_connections: 0,
            checked: true,
            address: "127.0.0.1:1".parse().ok(),
            slot: 0,
        };
        let row = table.row(table.assign(1, &settings).unwrap());
        let check = check(Expect::Nothing);
        let t = Duration::from_millis(1);
        let bad: Outcome = Err("connect: Connection refused".into());
        assert_eq!(
            apply(row, &check, &bad, t),
            Some(Change::Down("connect: Connection refused".into()))
        );
        assert_eq!(apply(row, &check, &Ok(()), t), None, "one good probe of rise 2");
        assert_eq!(apply(row, &check, &bad, t), None, "a bad one starts over");
        assert_eq!(apply(row, &check, &Ok(()), t), None);
        assert_eq!(apply(row, &check, &Ok(()), t), Some(Change::Up), "rise 2");
        assert!(row.usable(1));
        assert_eq!(apply(row, &check, &bad, t), None);
        assert_eq!(apply(row, &check, &bad, t), None);
        assert!(row.usable(1), "still up after 2 of fall 3");
        assert!(matches!(apply(row, &check, &bad, t), Some(Change::Down(_))));
        assert!(!row.usable(1));
        let view = &table.views()[0];
        assert_eq!(view.reason, "check failed: connect: Connection refused");
        assert_eq!(view.checks_failed, 5);
    }

    #[test]
    fn a_probe_sends_and_reads_the_reply_without_blocking() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = Address::Ip(listener.local_addr().unwrap());
        let check = check(Expect::Prefix(b"+PONG".to_vec()));
        let now = Instant::now();
        let mut probe = Probe::start(&address, &check, now).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let deadline = now + Duration::from_secs(5);
        let mut outcome = None;
        let mut answered = false;
        while outcome.is_none() {
            assert!(Instant::now() < deadline, "the probe never ended");
            outcome = probe.step(&check, Instant::now());
            if probe.wait() == Wait::Read && !answered {
                let mut got = [0u8; 6];
                server.read_exact(&mut got).unwrap();
                assert_eq!(&got, b"PING\r\n");
                server.write_all(b"+PONG\r\n").unwrap();
                answered = true;
            }
        }
        assert_eq!(outcome, Some(Ok(())));
        let mut late = Probe::start(&address, &check, now).unwrap();
        let outcome = late.step(&check, now + check.timeout);
        assert!(outcome.unwrap().unwrap_err().contains("timed out"));
    }
}
