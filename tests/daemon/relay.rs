//! The relay service against real backends on loopback: preforkd's own echo listener (in a
//! second daemon) and small test servers in this process (threads).
//!
//! How the unreachable backends are made, with loopback only:
//! - *refused*: a socket bound to a port but not listening (the kernel answers RST);
//! - *never accepts*: a listener with backlog 0 whose accept queue the test fills first, so
//!   the kernel drops further SYNs and a connect hangs until the relay's `connect_timeout`;
//! - *never answers*: a listener whose thread accepts and then holds the connection silently.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};

use crate::harness::*;

/// How the relay moves bytes: each test that relays runs once with each (see
/// [`for_both_pumps`]).
#[derive(Debug, Clone, Copy)]
enum Pump {
    /// `splice = false`: read(2) and write(2) through a 16 KiB buffer per direction.
    ReadWrite,
    /// `splice = true`: splice(2) through a pipe per direction.
    Splice,
}

/// Runs each named test function (taking a [`Pump`]) once per pump, as
/// `read_write::NAME` and `splice::NAME`.
macro_rules! for_both_pumps {
    ($($name:ident),* $(,)?) => {
        mod read_write {
            $(#[test] fn $name() { super::$name(super::Pump::ReadWrite) })*
        }
        mod splice {
            $(#[test] fn $name() { super::$name(super::Pump::Splice) })*
        }
    };
}

for_both_pumps!(
    relays_1_mib_each_way_for_100_concurrent_clients_through_preforkd_echo,
    fails_over_skips_a_down_backend_and_uses_it_again_after_down_time,
    all_backends_down_closes_the_client_promptly_with_the_reason_logged,
    a_backend_that_never_accepts_times_out_and_the_next_serves,
    a_backend_that_never_answers_leaves_the_idle_timeout_in_charge,
    half_close_passes_both_ways,
    a_reset_on_one_side_resets_the_other,
    proxy_protocol_v1_and_v2_headers_are_byte_exact_for_ipv4_and_ipv6,
    source_hash_sticks_and_least_connections_spreads_evenly_over_workers,
    a_reload_that_changes_backends_applies_to_new_connections_only,
);

/// A config with `workers` workers and relay listeners, each `(name, address, options)`:
/// `options` are the lines of its `[listener.options]` (`splice` is added for `pump`);
/// `policy` lines go in every listener.
fn relay_config(
    pump: Pump,
    workers: usize,
    policy: &str,
    listeners: &[(&str, &str, &str)],
) -> String {
    let mut config = format!(
        "[daemon]\nworkers = {workers}\nallow_root_workers = true\npid_file = \"@DIR@/preforkd.pid\"\n\
         [log]\nlevel = \"debug\"\naccess_log = true\n"
    );
    for (name, address, options) in listeners {
        config.push_str(&format!(
            "[[listener]]\nname = \"{name}\"\naddress = \"{address}\"\nservice = \"relay\"\n{policy}\n\
             [listener.options]\n{options}\nsplice = {}\n",
            matches!(pump, Pump::Splice)
        ));
    }
    config
}

fn backends(addresses: &[SocketAddr]) -> String {
    let quoted: Vec<String> = addresses.iter().map(|a| format!("\"{a}\"")).collect();
    format!("backends = [{}]\n", quoted.join(", "))
}

/// A test backend: every accepted connection is served by `serve` in a thread of its own.
struct Backend {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

impl Backend {
    fn start(serve: impl Fn(TcpStream) + Send + Sync + 'static) -> Backend {
        Backend::on(TcpListener::bind("127.0.0.1:0").expect("bind a backend"), serve)
    }

    fn on(listener: TcpListener, serve: impl Fn(TcpStream) + Send + Sync + 'static) -> Backend {
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        let serve = Arc::new(serve);
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                stream.set_read_timeout(Some(PATIENCE)).unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                let serve = Arc::clone(&serve);
                thread::spawn(move || serve(stream));
            }
        });
        Backend { addr, accepted }
    }

    /// A backend that says `name` on every connection, then holds it until the client closes.
    fn named(name: &'static str) -> Backend {
        Backend::start(move |mut stream| {
            let _ = stream.write_all(name.as_bytes());
            let _ = stream.read_to_end(&mut Vec::new());
        })
    }
}

/// A port that refuses connections: bound, not listening. Keep the socket until the end.
fn refusing() -> (Socket, SocketAddr) {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into()).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    (socket, addr)
}

/// Reads what the backend named itself.
fn served_by(stream: &mut TcpStream, len: usize) -> String {
    let mut name = vec![0; len];
    stream.read_exact(&mut name).expect("the backend's name");
    String::from_utf8(name).unwrap()
}

fn access_lines(daemon: &Daemon, reason: &str, count: usize) -> Vec<String> {
    let wanted = format!("reason={reason}");
    daemon.wait_for_lines(&format!("{count} access line(s) with {wanted}"), count, |l| {
        l.contains("access listener=") && l.contains(&wanted)
    })
}

fn relays_1_mib_each_way_for_100_concurrent_clients_through_preforkd_echo(pump: Pump) {
    // All relayed connections come from 127.0.0.1, as do all the test's clients.
    let quotas = "max_connections_per_client = 200\nmax_long_connections_per_client = 200\n";
    let echo = Daemon::start(&echo_config(2, "", quotas));
    let relay = Daemon::start(&relay_config(
        pump,
        2,
        quotas,
        &[("relay", "127.0.0.1:0", &backends(&[echo.addr()]))],
    ));
    let addr = relay.addr();
    eventually("both relay workers started", || relay.worker_pids().len() == 2);
    let workers = relay.worker_pids();
    let pipes_before = pipe_ends(&workers);
    const CLIENTS: usize = 100;
    const SIZE: usize = 1 << 20;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            thread::spawn(move || {
                let data = random_bytes(SIZE, i as u64 + 1);
                let mut stream = connect(addr);
                let mut writer = stream.try_clone().unwrap();
                let sent = data.clone();
                let sender = thread::spawn(move || {
                    writer.write_all(&sent).unwrap();
                    writer.shutdown(Shutdown::Write).unwrap();
                });
                let mut back = Vec::with_capacity(SIZE);
                stream.read_to_end(&mut back).expect("read the echo until the relay's FIN");
                sender.join().unwrap();
                back == data
            })
        })
        .collect();
    let intact = clients.into_iter().map(|c| c.join().unwrap()).filter(|&ok| ok);
    assert_eq!(intact.count(), CLIENTS, "every client got its 1 MiB back intact");
    let lines = access_lines(&relay, "client-close", CLIENTS);
    for line in &lines {
        assert_eq!(field(line, "in"), Some("1048576"), "{line}");
        assert_eq!(field(line, "out"), Some("1048576"), "{line}");
        assert_eq!(field(line, "backend"), Some(echo.addr().to_string().as_str()), "{line}");
        assert!(field(line, "connect").is_some_and(|c| c.ends_with('s')), "{line}");
    }
    // The splice pump keeps drained pipes in a pool; the read/write pump makes none.
    let pipes_after = pipe_ends(&workers);
    match pump {
        Pump::Splice => {
            assert!(pipes_after > pipes_before, "splice(2) pipes: {pipes_before} -> {pipes_after}")
        }
        Pump::ReadWrite => assert_eq!(pipes_after, pipes_before, "no pipe made for read/write"),
    }
}

/// Pipe ends the processes `pids` have open (from /proc/PID/fd).
fn pipe_ends(pids: &[i32]) -> usize {
    pids.iter()
        .flat_map(|pid| std::fs::read_dir(format!("/proc/{pid}/fd")).expect("a worker's fds"))
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("pipe:"))
        .count()
}

fn fails_over_skips_a_down_backend_and_uses_it_again_after_down_time(pump: Pump) {
    let (socket, first) = refusing();
    let second = Backend::named("second");
    let options = format!(
        "{}balance = \"first\"\nfail_threshold = 1\ndown_time = \"500ms\"\n",
        backends(&[first, second.addr])
    );
    let relay = Daemon::start(&relay_config(pump, 2, "", &[("relay", "127.0.0.1:0", &options)]));

    let t0 = Instant::now();
    let mut client = connect(relay.addr());
    assert_eq!(served_by(&mut client, 6), "second", "the first refuses: the second serves");
    drop(client);
    let line = access_lines(&relay, "client-close", 1).remove(0);
    assert_eq!(field(&line, "tries"), Some("2"), "{line}");
    relay.wait_for_log("the first backend marked down", |l| {
        l.contains(&format!("relay backend {first} is down"))
    });
    // While it is down the first backend is not even tried.
    let mut client = connect(relay.addr());
    assert_eq!(served_by(&mut client, 6), "second");
    drop(client);
    let line = access_lines(&relay, "client-close", 2).remove(1);
    assert!(
        t0.elapsed() >= Duration::from_millis(500) || field(&line, "tries") == Some("1"),
        "{line}"
    );

    // The first backend comes back: listening on the same socket.
    socket.listen(16).unwrap();
    let first_back = Backend::on(socket.into(), |mut stream| {
        let _ = stream.write_all(b"first!");
        let _ = stream.read_to_end(&mut Vec::new());
    });
    let mut closed = 2;
    let served_at = loop {
        let mut client = connect(relay.addr());
        if served_by(&mut client, 6) == "first!" {
            break Instant::now();
        }
        assert!(t0.elapsed() < PATIENCE, "the first backend is never used again");
        // Not yet: down_time has not passed. One connection at a time.
        drop(client);
        closed += 1;
        access_lines(&relay, "client-close", closed);
    };
    assert!(served_at - t0 >= Duration::from_millis(500), "used again only after down_time");
    assert_eq!(first_back.accepted.load(Ordering::SeqCst), 1);
    relay.wait_for_log("the first backend back up", |l| {
        l.contains(&format!("relay backend {first} is up again"))
    });
}

fn all_backends_down_closes_the_client_promptly_with_the_reason_logged(pump: Pump) {
    let (_a, first) = refusing();
    let (_b, second) = refusing();
    let options = format!("{}retries = 5\n", backends(&[first, second]));
    let relay = Daemon::start(&relay_config(pump, 1, "", &[("relay", "127.0.0.1:0", &options)]));
    let started = Instant::now();
    let mut client = connect(relay.addr());
    assert!(closed_within(&mut client, Duration::from_secs(2)), "closed, not left hanging");
    assert!(started.elapsed() < Duration::from_secs(2));
    drop(client);
    let line = access_lines(&relay, "backend-unavailable", 1).remove(0);
    assert_eq!(field(&line, "backend"), Some("-"), "{line}");
    // Marked down after 3 failures each (the default fail_threshold): fewer than 6 tries.
    assert_eq!(field(&line, "tries"), Some("6"), "{line}");
    relay.wait_for_lines("both backends marked down", 2, |l| l.contains("is down: 3 failed"));
    let mut client = connect(relay.addr());
    assert!(closed_within(&mut client, Duration::from_secs(2)));
    drop(client);
    let line = access_lines(&relay, "backend-unavailable", 2).remove(1);
    assert_eq!(field(&line, "tries"), Some("0"), "every backend is down: none is tried");
}

fn a_backend_that_never_accepts_times_out_and_the_next_serves(pump: Pump) {
    // Backlog 0: the accept queue holds one connection; fill it, then SYNs are dropped.
    let silent = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    silent.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into()).unwrap();
    silent.listen(0).unwrap();
    let silent_addr = silent.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    let full = (0..16).any(|_| {
        let filler = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        let connected = filler.connect_timeout(&silent_addr.into(), Duration::from_millis(200));
        fillers.push(filler);
        connected.is_err()
    });
    assert!(full, "could not fill the backlog of the silent backend");
    let second = Backend::named("second");
    let options = format!(
        "{}balance = \"first\"\nconnect_timeout = \"300ms\"\n",
        backends(&[silent_addr, second.addr])
    );
    let relay = Daemon::start(&relay_config(pump, 1, "", &[("relay", "127.0.0.1:0", &options)]));
    let started = Instant::now();
    let mut client = connect(relay.addr());
    assert_eq!(served_by(&mut client, 6), "second");
    assert!(started.elapsed() >= Duration::from_millis(300), "after the connect timeout");
    drop(client);
    let line = access_lines(&relay, "client-close", 1).remove(0);
    assert_eq!(field(&line, "tries"), Some("2"), "{line}");
    relay.wait_for_log("the timeout", |l| l.contains("connect timed out"));
}

fn a_backend_that_never_answers_leaves_the_idle_timeout_in_charge(pump: Pump) {
    let (hold, held) = mpsc::channel::<TcpStream>();
    let held = Arc::new(Mutex::new(held));
    let mute = Backend::start(move |stream| hold.send(stream).unwrap());
    let options = backends(&[mute.addr]);
    let relay = Daemon::start(&relay_config(
        pump,
        1,
        "short_idle_timeout = \"500ms\"",
        &[("relay", "127.0.0.1:0", &options)],
    ));
    let mut client = connect(relay.addr());
    client.write_all(b"hello?").unwrap();
    let mut backend = held.lock().unwrap().recv_timeout(PATIENCE).expect("the backend accepts");
    let mut got = [0; 6];
    backend.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello?");
    assert!(closed_within(&mut client, PATIENCE), "closed as idle");
    let line = access_lines(&relay, "idle-short", 1).remove(0);
    assert_eq!(field(&line, "in"), Some("6"), "{line}");
    assert_eq!(field(&line, "backend"), Some(mute.addr.to_string().as_str()), "{line}");
    // The backend connection was closed with the client's.
    assert_eq!(backend.read(&mut got).unwrap(), 0, "the backend sees FIN");
}

fn half_close_passes_both_ways(pump: Pump) {
    // Client FIN first: the backend reads to EOF, then answers, then closes.
    let answering = Backend::start(|mut stream| {
        let mut request = Vec::new();
        stream.read_to_end(&mut request).unwrap();
        let mut answer = b"got ".to_vec();
        answer.extend(&request);
        stream.write_all(&answer).unwrap();
    });
    // Backend FIN first: it greets and shuts its write side, then reads to EOF and reports.
    let (report, reports) = mpsc::channel::<Vec<u8>>();
    let report = Mutex::new(report);
    let greeting = Backend::start(move |mut stream| {
        stream.write_all(b"hello").unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).unwrap();
        report.lock().unwrap().send(rest).unwrap();
    });
    let relay = Daemon::start(&relay_config(
        pump,
        1,
        "",
        &[
            ("answering", "127.0.0.1:0", &backends(&[answering.addr])),
            ("greeting", "127.0.0.1:0", &backends(&[greeting.addr])),
        ],
    ));

    let mut client = connect(relay.addrs[0]);
    client.write_all(b"question").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let mut answer = Vec::new();
    client.read_to_end(&mut answer).unwrap();
    assert_eq!(answer, b"got question", "the answer came after the client's FIN");
    access_lines(&relay, "client-close", 1);

    let mut client = connect(relay.addrs[1]);
    let mut greeting = Vec::new();
    client.read_to_end(&mut greeting).unwrap();
    assert_eq!(greeting, b"hello", "the backend's FIN reached the client");
    client.write_all(b"still talking").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let rest = reports.recv_timeout(PATIENCE).unwrap();
    assert_eq!(rest, b"still talking", "the client could still send after the backend's FIN");
    let line = access_lines(&relay, "backend-close", 1).remove(0);
    assert_eq!((field(&line, "in"), field(&line, "out")), (Some("13"), Some("5")), "{line}");
}

fn a_reset_on_one_side_resets_the_other(pump: Pump) {
    // The backend resets after the first bytes.
    let resetting = Backend::start(|mut stream| {
        let mut byte = [0; 1];
        stream.read_exact(&mut byte).unwrap();
        SockRefExt::reset(stream);
    });
    // The backend reports how its connection ended after the client reset.
    let (report, reports) = mpsc::channel::<std::io::Result<usize>>();
    let report = Mutex::new(report);
    let reporting = Backend::start(move |mut stream| {
        let mut byte = [0; 1];
        stream.read_exact(&mut byte).unwrap();
        stream.write_all(b"!").unwrap();
        let outcome = stream.read(&mut byte);
        report.lock().unwrap().send(outcome).unwrap();
    });
    let relay = Daemon::start(&relay_config(
        pump,
        1,
        "",
        &[
            ("resetting", "127.0.0.1:0", &backends(&[resetting.addr])),
            ("reporting", "127.0.0.1:0", &backends(&[reporting.addr])),
        ],
    ));

    let mut client = connect(relay.addrs[0]);
    client.write_all(b"x").unwrap();
    let error = client.read(&mut [0; 1]).expect_err("the backend's reset reaches the client");
    assert_eq!(error.kind(), ErrorKind::ConnectionReset, "{error}");
    access_lines(&relay, "backend-reset", 1);

    let mut client = connect(relay.addrs[1]);
    client.write_all(b"x").unwrap();
    client.read_exact(&mut [0; 1]).unwrap();
    SockRefExt::reset(client);
    let outcome = reports.recv_timeout(PATIENCE).unwrap();
    let error = outcome.expect_err("the client's reset reaches the backend");
    assert_eq!(error.kind(), ErrorKind::ConnectionReset, "{error}");
    access_lines(&relay, "client-reset", 1);
}

/// Closing with `SO_LINGER` 0 sends RST.
struct SockRefExt;

impl SockRefExt {
    fn reset(stream: TcpStream) {
        socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO)).unwrap();
        drop(stream);
    }
}

/// Reads a PROXY header, v1 (a line) or v2 (signature, length, addresses), byte for byte.
fn read_proxy_header(stream: &mut TcpStream) -> Vec<u8> {
    let mut header = vec![0; 16];
    stream.read_exact(&mut header).unwrap();
    if header.starts_with(b"PROXY ") {
        while !header.ends_with(b"\r\n") {
            let mut byte = [0; 1];
            stream.read_exact(&mut byte).unwrap();
            header.push(byte[0]);
            assert!(header.len() <= 107, "a v1 header is at most 107 bytes");
        }
    } else {
        assert_eq!(&header[..12], b"\r\n\r\n\0\r\nQUIT\n", "v2 signature");
        let length = u16::from_be_bytes([header[14], header[15]]) as usize;
        let mut rest = vec![0; length];
        stream.read_exact(&mut rest).unwrap();
        header.extend(rest);
    }
    header
}

fn proxy_v2(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let mut expected = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    match (client, local) {
        (SocketAddr::V4(c), SocketAddr::V4(l)) => {
            expected.extend([0x21, 0x11, 0, 12]);
            expected.extend(c.ip().octets());
            expected.extend(l.ip().octets());
        }
        (SocketAddr::V6(c), SocketAddr::V6(l)) => {
            expected.extend([0x21, 0x21, 0, 36]);
            expected.extend(c.ip().octets());
            expected.extend(l.ip().octets());
        }
        _ => unreachable!(),
    }
    expected.extend(client.port().to_be_bytes());
    expected.extend(local.port().to_be_bytes());
    expected
}

fn proxy_protocol_v1_and_v2_headers_are_byte_exact_for_ipv4_and_ipv6(pump: Pump) {
    // The backend answers with the header it read, then echoes the rest.
    let parsing = Backend::start(|mut stream| {
        let header = read_proxy_header(&mut stream);
        stream.write_all(&header).unwrap();
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
        let _ = stream.write_all(&rest);
    });
    let v1 = format!("{}send_proxy_protocol = \"v1\"\n", backends(&[parsing.addr]));
    let v2 = format!("{}send_proxy_protocol = \"v2\"\n", backends(&[parsing.addr]));
    let relay = Daemon::start(&relay_config(
        pump,
        1,
        "",
        &[
            ("v1-ipv4", "127.0.0.1:0", &v1),
            ("v1-ipv6", "[::1]:0", &v1),
            ("v2-ipv4", "127.0.0.1:0", &v2),
            ("v2-ipv6", "[::1]:0", &v2),
        ],
    ));
    for (index, v2) in [(0, false), (1, false), (2, true), (3, true)] {
        let local = relay.addrs[index];
        let mut client = if local.is_ipv4() {
            connect_from(Ipv4Addr::new(127, 0, 0, 2), local)
        } else {
            let client = TcpStream::connect_timeout(&local, PATIENCE).unwrap();
            client.set_read_timeout(Some(PATIENCE)).unwrap();
            client
        };
        let me = client.local_addr().unwrap();
        let expected = if v2 {
            proxy_v2(me, local)
        } else {
            let family = if me.is_ipv4() { "TCP4" } else { "TCP6" };
            format!("PROXY {family} {} {} {} {}\r\n", me.ip(), local.ip(), me.port(), local.port())
                .into_bytes()
        };
        let mut got = vec![0; expected.len()];
        client.read_exact(&mut got).unwrap();
        assert_eq!(got, expected, "listener {index}: header as the backend parsed it");
        client.write_all(b"payload").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"payload", "the payload follows the header unchanged");
    }
    let lines = access_lines(&relay, "client-close", 4);
    for line in lines {
        assert_eq!(field(&line, "in"), Some("7"), "the header is not counted: {line}");
    }
    assert!(Ipv6Addr::LOCALHOST.is_loopback());
}

fn source_hash_sticks_and_least_connections_spreads_evenly_over_workers(pump: Pump) {
    let a = Backend::named("a");
    let b = Backend::named("b");
    let sticky = format!("{}balance = \"source-hash\"\n", backends(&[a.addr, b.addr]));
    let least = format!("{}balance = \"least-connections\"\n", backends(&[a.addr, b.addr]));
    let relay = Daemon::start(&relay_config(
        pump,
        2,
        "",
        &[("sticky", "127.0.0.1:0", &sticky), ("least", "127.0.0.1:0", &least)],
    ));
    let mut seen = std::collections::HashSet::new();
    for _ in 0..8 {
        let mut client = connect_from(Ipv4Addr::new(127, 0, 0, 2), relay.addrs[0]);
        seen.insert(served_by(&mut client, 1));
    }
    assert_eq!(seen.len(), 1, "one client, one backend: {seen:?}");
    let mut spread = std::collections::HashSet::new();
    for host in 2..34 {
        let mut client = connect_from(Ipv4Addr::new(127, 0, 0, host), relay.addrs[0]);
        spread.insert(served_by(&mut client, 1));
    }
    assert_eq!(spread.len(), 2, "different clients reach both backends");

    // Six connections held open at once, accepted by either worker: 3 and 3.
    let before = (a.accepted.load(Ordering::SeqCst), b.accepted.load(Ordering::SeqCst));
    let mut held = Vec::new();
    let mut counts = std::collections::HashMap::new();
    for _ in 0..6 {
        let mut client = connect(relay.addrs[1]);
        *counts.entry(served_by(&mut client, 1)).or_insert(0) += 1;
        held.push(client);
    }
    assert_eq!((counts.get("a"), counts.get("b")), (Some(&3), Some(&3)), "{counts:?}");
    assert_eq!(a.accepted.load(Ordering::SeqCst) - before.0, 3);
    assert_eq!(b.accepted.load(Ordering::SeqCst) - before.1, 3);
}

fn a_reload_that_changes_backends_applies_to_new_connections_only(pump: Pump) {
    let echo_backend = || {
        Backend::start(|mut stream| {
            let mut buffer = [0; 1024];
            while let Ok(n) = stream.read(&mut buffer) {
                if n == 0 || stream.write_all(&buffer[..n]).is_err() {
                    break;
                }
            }
        })
    };
    let old = echo_backend();
    let new = echo_backend();
    let config = |backend: SocketAddr| {
        relay_config(pump, 2, "", &[("relay", "127.0.0.1:0", &backends(&[backend]))])
    };
    let relay = Daemon::start(&config(old.addr));
    let mut before = connect(relay.addr());
    assert_eq!(exchange(&mut before, b"one", PATIENCE), Outcome::Echoed);

    relay.rewrite_config(&config(new.addr));
    let (status, stdout, stderr) = relay.control("reload");
    assert_eq!(code(status), 0, "{stdout}{stderr}");
    let mut after = connect(relay.addr());
    assert_eq!(exchange(&mut after, b"two", PATIENCE), Outcome::Echoed);
    assert_eq!(new.accepted.load(Ordering::SeqCst), 1, "a new connection goes to the new backend");
    assert_eq!(exchange(&mut before, b"three", PATIENCE), Outcome::Echoed, "the old one goes on");
    assert_eq!(old.accepted.load(Ordering::SeqCst), 1);
    before.shutdown(Shutdown::Write).unwrap();
    assert!(closed_within(&mut before, PATIENCE));
    let lines = access_lines(&relay, "client-close", 1);
    assert_eq!(field(&lines[0], "backend"), Some(old.addr.to_string().as_str()), "{}", lines[0]);
}

#[test]
fn check_reports_every_bad_relay_option_with_its_position() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("preforkd.toml");
    std::fs::write(
        &path,
        "[[listener]]\nname = \"relay\"\naddress = \"127.0.0.1:0\"\nservice = \"relay\"\n\
         [listener.options]\nbackends = [\"127.0.0.1:0\", \"nowhere\"]\nbalance = \"random\"\n\
         connect_timeout = \"0s\"\ncolour = 1\n",
    )
    .unwrap();
    let (status, stdout, stderr) = run_cli(&["check", "-c", path.to_str().unwrap()]);
    assert_ne!(code(status), 0, "{stdout}");
    for expected in [
        ":6:", // backends, with its line
        "listener[0].options.backends: \"127.0.0.1:0\": the port must not be 0",
        "\"nowhere\" is not IP:PORT",
        "listener[0].options.balance",
        "listener[0].options.colour",
    ] {
        assert!(stderr.contains(expected), "{expected:?} missing from:\n{stderr}");
    }
}
