//! UDP listeners: echo, daytime and time answer datagrams (also to a Python client); a flood from one address is held
//! to its datagram rate exactly, across workers; chargen and discard over UDP are refused
//! by `check` with the reason.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::harness::*;

fn udp_config(workers: usize, listeners: &[(&str, &str)]) -> String {
    let mut config = format!(
        "[daemon]\nworkers = {workers}\nallow_root_workers = true\n[log]\nlevel = \"debug\"\n"
    );
    for (service, extra) in listeners {
        config.push_str(&format!(
            "[[listener]]\nname = \"{service}-udp\"\naddress = \"127.0.0.1:0\"\nservice = \"{service}\"\ntransport = \"udp\"\n{extra}\n"
        ));
    }
    config
}

/// A UDP socket on loopback address `source` (127.0.0.x stands for client x).
fn client_from(source: Ipv4Addr) -> UdpSocket {
    let socket = UdpSocket::bind(SocketAddrV4::new(source, 0)).expect("bind a client socket");
    socket.set_read_timeout(Some(PATIENCE)).unwrap();
    socket
}

/// `recv_from`, again when a signal interrupts it ([`uninterrupted`]).
fn receive(socket: &UdpSocket, buffer: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
    uninterrupted(|| socket.recv_from(buffer))
}

/// Sends `request` and returns the one reply, checking where it came from.
fn ask(socket: &UdpSocket, server: SocketAddr, request: &[u8]) -> Vec<u8> {
    socket.send_to(request, server).unwrap();
    let mut buffer = [0u8; 2048];
    let (n, from) = receive(socket, &mut buffer).expect("a reply within the patience");
    assert_eq!(from, server, "the reply comes from the listener's address");
    buffer[..n].to_vec()
}

/// [`ask`] for an idempotent request beside a flood: UDP may drop either datagram (a receive
/// buffer full of the flood does), so the request is sent again every 250 ms until a reply
/// comes or the patience runs out. A late duplicate reply is the same bytes.
fn ask_until_answered(socket: &UdpSocket, server: SocketAddr, request: &[u8]) -> Vec<u8> {
    let deadline = Instant::now() + PATIENCE;
    let mut buffer = [0u8; 2048];
    socket.set_read_timeout(Some(Duration::from_millis(250))).unwrap();
    loop {
        socket.send_to(request, server).unwrap();
        match receive(socket, &mut buffer) {
            Ok((n, from)) => {
                assert_eq!(from, server, "the reply comes from the listener's address");
                socket.set_read_timeout(Some(PATIENCE)).unwrap();
                return buffer[..n].to_vec();
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                assert!(Instant::now() < deadline, "no reply within the patience");
            }
            Err(e) => panic!("receiving a reply: {e}"),
        }
    }
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

#[test]
fn echo_daytime_and_time_answer_each_datagram() {
    let daemon = Daemon::start(&udp_config(2, &[("echo", ""), ("daytime", ""), ("time", "")]));
    let [echo, daytime, time] = daemon.addrs[..] else { panic!("3 listeners") };
    let client = client_from(Ipv4Addr::LOCALHOST);

    let payload = random_bytes(1400, 13);
    assert_eq!(ask(&client, echo, &payload), payload, "echo sends the datagram back as it came");
    assert_eq!(ask(&client, echo, b""), b"", "an empty datagram gets an empty one");

    let before = now_unix();
    let line = String::from_utf8(ask(&client, daytime, b"")).unwrap();
    let stamp = line.strip_suffix("\r\n").expect("CR LF");
    let at = humantime::parse_rfc3339(stamp).unwrap().duration_since(UNIX_EPOCH).unwrap();
    assert!((before..=now_unix()).contains(&at.as_secs()), "{stamp} is not now");

    let before = now_unix();
    let answer = ask(&client, time, b"");
    let seconds = u32::from_be_bytes(answer.try_into().expect("4 bytes")) as u64;
    let unix = seconds.wrapping_sub(2_208_988_800) & 0xffff_ffff;
    assert!((before..=now_unix()).contains(&unix), "{unix} is not now ({before})");
}

/// The same services asked by a Python client (the documents this project grew from teach
/// UDP clients in Python): echo, daytime (RFC 867) and time (RFC 868).
const PYTHON_CLIENT: &str = r#"
import socket, struct, sys, time
echo, daytime, stamp = (int(p) for p in sys.argv[1:4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(float(sys.argv[4]))
def ask(port, data):
    s.sendto(data, ("127.0.0.1", port))
    reply, peer = s.recvfrom(2048)
    assert peer == ("127.0.0.1", port), peer
    return reply
assert ask(echo, b"hello from python") == b"hello from python"
line = ask(daytime, b"").decode()
assert line.endswith("\r\n"), repr(line)
(seconds,) = struct.unpack("!I", ask(stamp, b""))
print("daytime", line.strip())
print("time", seconds - 2208988800)
print("now", int(time.time()))
"#;

#[test]
fn a_python_client_gets_echo_daytime_and_time() {
    let daemon = Daemon::start(&udp_config(2, &[("echo", ""), ("daytime", ""), ("time", "")]));
    let [echo, daytime, time] = daemon.addrs[..] else { panic!("3 listeners") };
    let before = now_unix();
    let output = std::process::Command::new("python3")
        .args(["-c", PYTHON_CLIENT])
        .args([echo, daytime, time].map(|a| a.port().to_string()))
        .arg(PATIENCE.as_secs_f64().to_string())
        .output()
        .expect("python3 runs");
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    let value = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key).map(str::trim))
            .unwrap_or_else(|| panic!("{key}: {text}"))
    };
    let stamp = humantime::parse_rfc3339(value("daytime ")).unwrap();
    let at = stamp.duration_since(UNIX_EPOCH).unwrap().as_secs();
    let unix: u64 = value("time ").parse().unwrap();
    let now: u64 = value("now ").parse().unwrap();
    assert!((before..=now).contains(&at), "daytime {at} is not between {before} and {now}");
    assert!((before..=now).contains(&unix), "time {unix} is not between {before} and {now}");
}

#[test]
fn a_flood_from_one_address_is_held_to_its_rate_exactly_across_workers() {
    // 100 per hour: the bucket refills by less than one datagram during the test, so the
    // flood gets exactly the burst, whichever worker takes each datagram.
    let rate = "max_datagram_rate_per_client = \"100/h\"";
    let daemon = Daemon::start(&udp_config(2, &[("echo", rate)]));
    let echo = daemon.addr();
    let flooder = client_from(Ipv4Addr::new(127, 0, 0, 2));
    flooder.set_nonblocking(true).unwrap();
    let mut answered = 0;
    let drain = |answered: &mut usize| {
        let mut buffer = [0u8; 64];
        while flooder.recv_from(&mut buffer).is_ok() {
            *answered += 1;
        }
    };
    for i in 0..10_000u32 {
        // A full socket buffer on either side drops datagrams, as the network may: the
        // rate is what is checked, not delivery.
        let _ = flooder.send_to(&i.to_be_bytes(), echo);
        if i % 256 == 0 {
            drain(&mut answered);
        }
    }
    // Every reply the daemon sends is queued at the flooder at once (loopback); a probe from
    // another client, answered after the flood was taken from the queue, bounds the wait.
    let prober = client_from(Ipv4Addr::new(127, 0, 0, 3));
    let deadline = Instant::now() + PATIENCE;
    loop {
        assert_eq!(
            ask_until_answered(&prober, echo, b"probe"),
            b"probe",
            "another client is not limited"
        );
        drain(&mut answered);
        if answered >= 100 || Instant::now() >= deadline {
            break;
        }
    }
    // One more round trip from the prober: no reply beyond the burst may arrive.
    assert_eq!(ask_until_answered(&prober, echo, b"probe"), b"probe");
    drain(&mut answered);
    assert_eq!(answered, 100, "exactly the burst of 100 is answered, out of 10,000");
    daemon.wait_for_log("the refusals, logged", |l| {
        l.contains("dropped datagrams from 127.0.0.2") && l.contains("max_datagram_rate_per_client")
    });
}

#[test]
fn chargen_and_discard_over_udp_are_refused_by_check_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    for (service, reason) in [("chargen", "amplifier"), ("discard", "nothing to serve")] {
        let path = dir.path().join(format!("{service}.toml"));
        std::fs::write(&path, udp_config(1, &[(service, "")])).unwrap();
        let (status, _, stderr) = run_cli(&["check", "-c", path.to_str().unwrap()]);
        assert_eq!(code(status), 78, "{stderr}");
        let expected = format!("listener[0].transport: service \"{service}\" cannot serve UDP");
        assert!(stderr.contains(&expected), "{stderr}");
        assert!(stderr.contains(reason), "{stderr}");
    }
}

#[test]
fn a_udp_socket_is_kept_across_reload_and_handed_to_an_upgraded_master() {
    // A TCP and a UDP echo listener; the reload must keep each its own socket.
    let config = |rate: &str| {
        format!(
            "{}[[listener]]\nname = \"echo-udp\"\naddress = \"127.0.0.1:0\"\nservice = \"echo\"\ntransport = \"udp\"\nmax_datagram_rate_per_client = \"{rate}\"\n",
            controlled_config(2, "", "")
        )
    };
    let daemon = Daemon::start(&config("100/s"));
    let udp = daemon.addrs[1];
    let client = client_from(Ipv4Addr::LOCALHOST);
    assert_eq!(ask(&client, udp, b"before"), b"before");

    // A reload that lowers the rate to 1 per hour: the same socket, the new policy. The
    // bucket is per listener and client, kept across generations, and now refills slowly.
    daemon.rewrite_config(&config("1/h"));
    let (status, _, stderr) = daemon.control("reload");
    assert_eq!(code(status), 0, "{stderr}");
    eventually("generation 2 serves", || {
        let (_, status, _) = daemon.control("status");
        status.lines().filter(|l| l.contains(" ready ")).count() == 2
            && status
                .lines()
                .all(|l| !l.contains(" ready ") || l.split_whitespace().nth(2) == Some("2"))
    });
    let fresh = client_from(Ipv4Addr::new(127, 0, 0, 4));
    assert_eq!(ask(&fresh, udp, b"after"), b"after", "the reloaded listener answers");
    // Its second datagram is over "1/h": a probe from another client is answered after it
    // was taken from the queue, and no answer to it has arrived.
    fresh.send_to(b"over", udp).unwrap();
    let probe = client_from(Ipv4Addr::new(127, 0, 0, 6));
    assert_eq!(ask(&probe, udp, b"probe"), b"probe");
    fresh.set_nonblocking(true).unwrap();
    let mut buffer = [0u8; 16];
    let over = fresh.recv_from(&mut buffer).unwrap_err();
    assert_eq!(over.kind(), std::io::ErrorKind::WouldBlock, "the new rate applies");
    let mut stream = connect(daemon.addr());
    assert_eq!(exchange(&mut stream, b"tcp", PATIENCE), Outcome::Echoed, "TCP kept its own");

    // Binary upgrade: the new master adopts the UDP socket by name, on the same port.
    let (status, stdout, stderr) = daemon.control("upgrade");
    assert_eq!(code(status), 0, "{stderr}");
    let new = new_master_pid(&stdout);
    daemon.wait_for_log("the new master adopts the UDP socket", |l| {
        l.contains(&format!("pid={new}"))
            && l.contains(&format!("echo-udp (echo) listening on {udp}, udp (inherited"))
    });
    let third = client_from(Ipv4Addr::new(127, 0, 0, 5));
    assert_eq!(ask(&third, udp, b"upgraded"), b"upgraded");
}

/// Loopback address number `n` of a flood of forged sources: 127.1.0.1 onwards, skipping
/// the .0 and .255 of each /24 (never a 127.0.0.x client of the tests).
fn forged_source(n: u32) -> Ipv4Addr {
    let (block, host) = (n / 254, n % 254 + 1);
    Ipv4Addr::from(0x7f01_0000 + block * 256 + host)
}

/// Sends one datagram to `server` from each of the forged sources `first..first + count`,
/// `FLOOD_WINDOW` sources at a time, each waiting for its answer; returns how many were
/// answered. A window whose answers are not all in within the patience ends the flood (the
/// count then falls short). `between` runs after each window (another client's attempts
/// during the flood).
fn flood_from_distinct_sources(
    server: SocketAddr,
    first: u32,
    count: u32,
    mut between: impl FnMut(),
) -> u32 {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    const FLOOD_WINDOW: u32 = 128;
    let mut answered = 0;
    let mut next = first;
    while next < first + count {
        let window: Vec<UdpSocket> = (next..(next + FLOOD_WINDOW).min(first + count))
            .map(|n| {
                let socket = UdpSocket::bind(SocketAddrV4::new(forged_source(n), 0)).unwrap();
                socket.set_nonblocking(true).unwrap();
                socket.send_to(b"forged", server).unwrap();
                socket
            })
            .collect();
        next += window.len() as u32;
        let mut waiting: Vec<&UdpSocket> = window.iter().collect();
        // Not a short wait: on a loaded machine the one worker may take a while to get
        // through a window, and an answer it sends late is no less an answer.
        let deadline = Instant::now() + PATIENCE;
        while !waiting.is_empty() && Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut fds: Vec<PollFd> =
                waiting.iter().map(|s| PollFd::new(s.as_fd(), PollFlags::POLLIN)).collect();
            let timeout = PollTimeout::try_from(left.as_millis().max(1) as u64).unwrap();
            match poll(&mut fds, timeout) {
                Ok(0) => break,
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => panic!("poll: {e}"),
            }
            let ready: Vec<bool> =
                fds.iter().map(|f| f.revents().is_some_and(|r| !r.is_empty())).collect();
            let mut buffer = [0u8; 64];
            let mut still = Vec::with_capacity(waiting.len());
            for (socket, ready) in waiting.into_iter().zip(ready) {
                if ready && socket.recv_from(&mut buffer).is_ok() {
                    answered += 1;
                } else {
                    still.push(socket);
                }
            }
            waiting = still;
        }
        if !waiting.is_empty() {
            break;
        }
        between();
    }
    answered
}

/// Whether `socket` gets an answer to `request` from `server`: sent, then a probe from a
/// fresh address on the same listener is answered (one worker reads one socket in order), so
/// an answer to the request would be queued by then.
fn answered_before_a_probe(socket: &UdpSocket, server: SocketAddr, probe: Ipv4Addr) -> bool {
    socket.send_to(b"again", server).unwrap();
    let prober = client_from(probe);
    assert_eq!(ask(&prober, server, b"probe"), b"probe", "a new client is answered");
    socket.set_nonblocking(true).unwrap();
    let mut buffer = [0u8; 64];
    let answered = socket.recv_from(&mut buffer).is_ok();
    socket.set_nonblocking(false).unwrap();
    answered
}

#[test]
fn forged_floods_neither_reset_a_slow_listeners_buckets_nor_lock_new_clients_out() {
    // Issue 22, item 4. One worker (so that one socket is read in order, for the probes), a
    // slow listener at 1/m and a fast one at 100/s, each with its own bucket per client in
    // the one shared table of 16,384 places.
    let listener = |name: &str, rate: &str| {
        format!(
            "[[listener]]\nname = \"{name}\"\naddress = \"127.0.0.1:0\"\nservice = \"echo\"\ntransport = \"udp\"\nmax_datagram_rate_per_client = \"{rate}\"\n"
        )
    };
    let config = format!(
        "[daemon]\nworkers = 1\nallow_root_workers = true\n[log]\nlevel = \"info\"\n{}{}",
        listener("slow", "1/m"),
        listener("fast", "100/s")
    );
    let daemon = Daemon::start(&config);
    let [slow, fast] = daemon.addrs[..] else { panic!("2 listeners") };
    let client = client_from(Ipv4Addr::new(127, 0, 0, 2));
    assert_eq!(ask(&client, slow, b"first"), b"first", "the first datagram is within 1/m");

    // 20,000 forged sources on the fast listener: each within its rate, each answered. A
    // bucket is full, and its place free, by its own rate only: the client's spent 1/m
    // bucket is not taken, so it gets nothing more this minute.
    let answered = flood_from_distinct_sources(fast, 0, 20_000, || {});
    assert_eq!(answered, 20_000, "every forged source is within its own rate");
    let mut extra = 0;
    for probe in 10..13 {
        extra +=
            usize::from(answered_before_a_probe(&client, slow, Ipv4Addr::new(127, 0, 0, probe)));
    }
    eprintln!("slow listener's client after a fast flood: {extra} answers of 3 (1/m)");
    assert_eq!(extra, 0, "the 1/m client got more than its rate");

    // 30,000 forged sources on the slow listener, more than the table holds: every one is
    // answered (each is within its rate), and so is every new client after them. The
    // client over its rate keeps trying during the flood: taking over the fullest bucket
    // when the table is crowded gives it a token again at most once per about 16,384 new
    // sources.
    client.set_nonblocking(true).unwrap();
    let answered = flood_from_distinct_sources(slow, 20_000, 30_000, || {
        let _ = client.send_to(b"abuse", slow);
    });
    let mut buffer = [0u8; 64];
    // Each newcomer waits the whole patience for its answer: a loaded machine may be slow,
    // and a missing answer fails the test either way.
    let served = (20..23)
        .filter(|&n| {
            let newcomer = client_from(Ipv4Addr::new(127, 0, 0, n));
            newcomer.send_to(b"new", slow).unwrap();
            receive(&newcomer, &mut buffer).is_ok()
        })
        .count();
    // Counted after the newcomers' answers: the one worker reads the slow listener's socket
    // in order, so every answer to the abuser's earlier datagrams is queued by then.
    let abuser = std::iter::from_fn(|| receive(&client, &mut buffer).ok()).count();
    eprintln!(
        "after 30,000 forged sources on the 1/m listener: {answered} of them answered; new clients served: {served} of 3; the client over its rate got {abuser} answers in 235 tries"
    );
    assert_eq!(answered, 30_000, "no source within its rate is refused for want of room");
    assert_eq!(served, 3, "new clients are served after the flood");
    assert!(abuser <= 3, "{abuser}: at most about one token per 16,384 new sources");
}
