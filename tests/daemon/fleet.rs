//! A fleet of preforkd instances behind a real HAProxy: `balance source`, `hash-type
//! consistent`, `send-proxy-v2` and health checks, as README.md's recipe sets it up. Each
//! client lands on one instance, so its per-client limit holds fleet-wide; the checks are
//! quiet in the access log.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use crate::harness::*;

const QUICK: Duration = Duration::from_secs(10);

/// HAProxy in front of `instances`, on a frontend socket of its own (passed as fd 3).
struct HaProxy {
    child: std::process::Child,
    _dir: tempfile::TempDir,
    front: SocketAddr,
}

impl HaProxy {
    fn start(instances: &[SocketAddr]) -> HaProxy {
        let program = ["/usr/sbin/haproxy", "/usr/bin/haproxy"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("haproxy is needed by this test: apt-get install haproxy (.ci/run does)");
        let front = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let servers: String = instances
            .iter()
            .enumerate()
            .map(|(i, addr)| {
                format!(
                    "  server preforkd{i} {addr} send-proxy-v2 check check-send-proxy inter 200ms\n"
                )
            })
            .collect();
        // The recipe of README.md ("A fleet behind HAProxy").
        let config = format!(
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend echo\n  bind fd@3\n  default_backend fleet\n\
             backend fleet\n  balance source\n  hash-type consistent\n{servers}"
        );
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, config).unwrap();
        let fd = front.as_raw_fd();
        let mut command = std::process::Command::new(program);
        command.arg("-db").arg("-f").arg(&path).stdin(std::process::Stdio::null());
        command.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
        // SAFETY: only fcntl(2) and dup2(2), async-signal-safe, between fork and exec.
        unsafe {
            command.pre_exec(move || {
                let high = nix::libc::fcntl(fd, nix::libc::F_DUPFD, 10);
                if high < 0 || nix::libc::dup2(high, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("start haproxy");
        HaProxy { child, _dir: dir, front: front.local_addr().unwrap() }
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn instance() -> Daemon {
    Daemon::start(&echo_config(
        2,
        "",
        "accept_proxy_protocol = true\ntrusted_proxies = [\"127.0.0.1\"]\n\
         max_connections_per_client = 4\nmax_long_connections_per_client = 0",
    ))
}

/// Client `n` (127.0.1.n) opens `count` connections through HAProxy and keeps them;
/// returns how many were served (echoed).
fn served(front: SocketAddr, n: u8, count: usize) -> (usize, Vec<std::net::TcpStream>) {
    let mut kept = Vec::new();
    for i in 0..count {
        let mut stream = connect_from(Ipv4Addr::new(127, 0, 1, n), front);
        if exchange(&mut stream, format!("client {n} #{i}").as_bytes(), QUICK) == Outcome::Echoed {
            kept.push(stream);
        }
    }
    (kept.len(), kept)
}

#[test]
fn a_client_limit_of_four_holds_across_a_fleet_behind_haproxy_balance_source() {
    let (a, b) = (instance(), instance());
    let haproxy = HaProxy::start(&[a.addr(), b.addr()]);
    // HAProxy's checks reach both (LOCAL headers, then a close): wait for a few.
    let quiet = |d: &Daemon| d.matching(|l| l.contains(" reason=empty")).len();
    let deadline = Instant::now() + PATIENCE;
    while quiet(&a) < 2 || quiet(&b) < 2 {
        assert!(Instant::now() < deadline, "no health check reached both instances");
        std::thread::sleep(Duration::from_millis(50));
    }
    for daemon in [&a, &b] {
        let errors = daemon.matching(|l| l.contains("access ") && l.contains("reason=error"));
        assert!(errors.is_empty(), "health checks are not errors: {errors:?}");
        let probe = daemon.matching(|l| l.contains(" reason=empty")).remove(0);
        assert!(probe.contains("DEBUG"), "logged at debug: {probe}");
    }

    // 8 tries from one client: 4 served, whichever instance it hashes to.
    let (count, kept) = served(haproxy.front, 1, 8);
    assert_eq!(count, 4, "the limit holds fleet-wide");
    let served_by = |d: &Daemon| d.matching(|l| l.contains("peer=127.0.1.1:")).len();
    let refusals =
        |d: &Daemon| d.matching(|l| l.contains("from 127.0.1.1 ") && l.contains("(limit)")).len();
    drop(kept);
    eventually("the four served connections are logged", || served_by(&a) + served_by(&b) == 4);
    assert!(served_by(&a) == 0 || served_by(&b) == 0, "one instance serves a client");
    assert!(refusals(&a) + refusals(&b) >= 1, "the other four were refused (limit)");

    // Clients spread over both instances.
    let mut on_a = 0;
    for n in 10..40 {
        let mut stream = connect_from(Ipv4Addr::new(127, 0, 1, n), haproxy.front);
        assert_eq!(exchange(&mut stream, b"spread", QUICK), Outcome::Echoed);
        drop(stream);
        let needle = format!("peer=127.0.1.{n}:");
        eventually("the client's access line", || {
            !a.matching(|l| l.contains(&needle)).is_empty()
                || !b.matching(|l| l.contains(&needle)).is_empty()
        });
        if !a.matching(|l| l.contains(&needle)).is_empty() {
            on_a += 1;
        }
    }
    assert!((1..30).contains(&on_a), "30 clients spread over both instances: {on_a} on one");
}
