//! Every connection survives a reload and a binary upgrade (issue 21): a relay's connections
//! are handed to the serving generation at any point of their life; exec children, TFTP
//! transfers and sessions without the hand-off hook are drained by the old worker, with no
//! deadline unless `reload_drain_timeout` sets one. Each daemon here has
//! `graceful_timeout = "2s"`, so a cut at the graceful stop's deadline would show.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::harness::*;
use crate::status::status_json;

/// `graceful_timeout` of every daemon here.
const GRACEFUL: &str = "2s";

/// How the relay moves bytes (each relay test runs with both).
#[derive(Debug, Clone, Copy)]
enum Pump {
    ReadWrite,
    Splice,
}

/// The pattern byte at stream offset `at` of a stream seeded `seed`.
fn pattern_byte(seed: u8, at: u64) -> u8 {
    (at.wrapping_mul(31).wrapping_add(u64::from(seed)) % 251) as u8
}

fn pattern(seed: u8, from: u64, len: usize) -> Vec<u8> {
    (from..from + len as u64).map(|at| pattern_byte(seed, at)).collect()
}

/// How a client read ended.
fn failure(what: &str, error: &std::io::Error) -> String {
    let kind = match error.kind() {
        ErrorKind::UnexpectedEof => "EOF",
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => "reset",
        _ => "error",
    };
    format!("{what}: {kind}: {error}")
}

/// The relay's backend: echoes every byte; after a client's FIN it sends what the test
/// hands it on `tail` (one chunk per message) until told to end (`None`), then closes.
/// Every accepted connection is counted.
struct EchoBackend {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

impl EchoBackend {
    fn start(tail: Option<Receiver<Option<Vec<u8>>>>) -> EchoBackend {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a backend");
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        let tail = Arc::new(Mutex::new(tail));
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                let tail = Arc::clone(&tail);
                thread::spawn(move || {
                    let mut buffer = vec![0; 64 * 1024];
                    loop {
                        match stream.read(&mut buffer) {
                            Ok(0) => break,
                            Ok(n) => {
                                if stream.write_all(&buffer[..n]).is_err() {
                                    return;
                                }
                            }
                            Err(_) => return,
                        }
                    }
                    // The client's FIN: the tail, if this backend has one (once).
                    if let Some(tail) = tail.lock().unwrap().take() {
                        while let Ok(Some(chunk)) = tail.recv_timeout(PATIENCE * 3) {
                            if stream.write_all(&chunk).is_err() {
                                return;
                            }
                        }
                    }
                    let _ = stream.shutdown(Shutdown::Write);
                });
            }
        });
        EchoBackend { addr, accepted }
    }
}

/// A relay daemon's configuration: two workers, one relay listener with `backends`,
/// `least-connections`, five connections per client of which two kept alive as long (the
/// others are over the long quota: a relay never rests, so they stay open, and must move
/// too). Over the quota, a connection keeps short_idle_timeout: 5 minutes, like the long one,
/// so that a test held up on a loaded machine does not see its quiet connections cut.
fn relay_config(pump: Pump, backends: &[SocketAddr]) -> String {
    let quoted: Vec<String> = backends.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "[daemon]\nworkers = 2\ngraceful_timeout = \"{GRACEFUL}\"\nallow_root_workers = true\n\
         pid_file = \"@DIR@/preforkd.pid\"\n[log]\nlevel = \"debug\"\naccess_log = true\n\
         [[listener]]\nname = \"relay\"\naddress = \"127.0.0.1:0\"\nservice = \"relay\"\n\
         max_connections_per_client = 5\nmax_long_connections_per_client = 2\n\
         short_idle_timeout = \"5m\"\nlong_idle_timeout = \"5m\"\n[listener.options]\nbackends = [{}]\n\
         balance = \"least-connections\"\nsplice = {}\n",
        quoted.join(", "),
        matches!(pump, Pump::Splice)
    )
}

/// Streams a pattern up without pause until stopped, reading the echo back and checking
/// every byte; then half-closes and reads to the end. Returns the bytes echoed and any
/// failure.
fn streamer(mut stream: TcpStream, stop: Arc<AtomicBool>) -> JoinHandle<(u64, Vec<String>)> {
    thread::spawn(move || {
        let mut reader = stream.try_clone().unwrap();
        reader.set_read_timeout(Some(PATIENCE)).unwrap();
        let checker = thread::spawn(move || {
            let mut at = 0u64;
            let mut buffer = vec![0; 64 * 1024];
            loop {
                match reader.read(&mut buffer) {
                    Ok(0) => return (at, Vec::new()),
                    Ok(n) => {
                        if buffer[..n] != pattern(1, at, n)[..] {
                            return (at, vec![format!("streamer: wrong bytes at {at}")]);
                        }
                        at += n as u64;
                    }
                    Err(e) => return (at, vec![failure("streamer", &e)]),
                }
            }
        });
        let mut sent = 0u64;
        let mut failures = Vec::new();
        // Bounded: at most 4 GiB, whatever the test does.
        while !stop.load(Ordering::SeqCst) && sent < 1 << 32 {
            let chunk = pattern(1, sent, 16 * 1024);
            if let Err(e) = stream.write_all(&chunk) {
                failures.push(failure("streamer write", &e));
                break;
            }
            sent += chunk.len() as u64;
        }
        let _ = stream.shutdown(Shutdown::Write);
        let (echoed, mut read_failures) = checker.join().unwrap();
        failures.append(&mut read_failures);
        if failures.is_empty() && echoed != sent {
            failures.push(format!("streamer: sent {sent}, {echoed} came back"));
        }
        (echoed, failures)
    })
}

/// Sends `total` bytes up at once and reads the echo back `step` bytes per token from
/// `tokens` (so that the transfer is in flight, its buffers full, across every reload),
/// then the rest. Returns any failure.
fn bulk(
    mut stream: TcpStream,
    total: usize,
    step: usize,
    tokens: Receiver<()>,
) -> JoinHandle<Vec<String>> {
    thread::spawn(move || {
        let mut writer = stream.try_clone().unwrap();
        let sender = thread::spawn(move || {
            let result = writer.write_all(&pattern(2, 0, total));
            let _ = writer.shutdown(Shutdown::Write);
            result.err().map(|e| failure("bulk write", &e))
        });
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut failures = Vec::new();
        let mut at = 0usize;
        let mut buffer = vec![0; step];
        while at < total {
            let want = step.min(total - at);
            // One step per token; once the test sends no more, the rest at once.
            let _ = tokens.recv();
            match stream.read_exact(&mut buffer[..want]) {
                Ok(()) if buffer[..want] == pattern(2, at as u64, want)[..] => at += want,
                Ok(()) => {
                    failures.push(format!("bulk: wrong bytes at {at}"));
                    break;
                }
                Err(e) => {
                    failures.push(failure(&format!("bulk read at {at}"), &e));
                    break;
                }
            }
        }
        if failures.is_empty() {
            match stream.read(&mut buffer) {
                Ok(0) => {}
                Ok(n) => failures.push(format!("bulk: {n} bytes too many")),
                Err(e) => failures.push(failure("bulk end", &e)),
            }
        }
        failures.extend(sender.join().unwrap());
        failures
    })
}

/// Sends a line, half-closes, then reads the echo and every tail chunk the backend sends
/// (`expected`, in order) until the end. Returns any failure.
fn half_closed(mut stream: TcpStream, expected: Receiver<Vec<u8>>) -> JoinHandle<Vec<String>> {
    thread::spawn(move || {
        stream.set_read_timeout(Some(PATIENCE * 2)).unwrap();
        let hello = b"hello, half-closed\n";
        if let Err(e) = stream.write_all(hello).and_then(|()| stream.shutdown(Shutdown::Write)) {
            return vec![failure("half-closed write", &e)];
        }
        let mut failures = Vec::new();
        let mut want = hello.to_vec();
        loop {
            let mut got = vec![0; want.len()];
            match stream.read_exact(&mut got) {
                Ok(()) if got == want => {}
                Ok(()) => {
                    failures.push("half-closed: wrong bytes".into());
                    break;
                }
                Err(e) => {
                    failures.push(failure("half-closed read", &e));
                    break;
                }
            }
            match expected.recv() {
                Ok(next) => want = next,
                Err(_) => break,
            }
        }
        if failures.is_empty() {
            let mut rest = Vec::new();
            match stream.read_to_end(&mut rest) {
                Ok(_) if rest.is_empty() => {}
                Ok(_) => failures.push(format!("half-closed: {} bytes too many", rest.len())),
                Err(e) => failures.push(failure("half-closed end", &e)),
            }
        }
        failures
    })
}

/// The sum of `open` over the workers of `status --json`, and whether every worker is of
/// `generation` and ready.
fn open_in(daemon: &Daemon, generation: u64) -> (u64, bool) {
    let document = status_json(daemon);
    let workers = document["workers"].as_array().cloned().unwrap_or_default();
    let open = workers.iter().map(|w| w["open"].as_u64().unwrap_or(0)).sum();
    let newest = !workers.is_empty()
        && workers.iter().all(|w| w["generation"] == generation && w["state"] == "ready");
    (open, newest)
}

/// Opens a probe connection from `client` and returns which backend took it (by the
/// backends' accept counts).
fn probe(addr: SocketAddr, client: Ipv4Addr, backends: &[&EchoBackend]) -> (TcpStream, usize) {
    let before: Vec<usize> = backends.iter().map(|b| b.accepted.load(Ordering::SeqCst)).collect();
    let mut stream = connect_from(client, addr);
    assert_eq!(exchange(&mut stream, b"probe", PATIENCE), Outcome::Echoed);
    let after: Vec<usize> = backends.iter().map(|b| b.accepted.load(Ordering::SeqCst)).collect();
    let took: Vec<usize> = (0..backends.len()).filter(|&i| after[i] > before[i]).collect();
    assert_eq!(took.len(), 1, "exactly one backend took the probe: {before:?} -> {after:?}");
    (stream, took[0])
}

fn relay_connections_survive_20_reloads_and_an_upgrade(pump: Pump) {
    let (tail_tx, tail_rx) = mpsc::channel();
    let a = EchoBackend::start(Some(tail_rx));
    let b = EchoBackend::start(None);
    // All five long clients reach backend A; the first reload adds B, so least-connections
    // must count A's five, moved into every generation's table, exactly.
    let mut daemon = Daemon::start(&relay_config(pump, &[a.addr]));
    let addr = daemon.addr();
    let client = Ipv4Addr::new(127, 0, 0, 2);
    let stop = Arc::new(AtomicBool::new(false));
    let streaming = streamer(connect_from(client, addr), Arc::clone(&stop));
    let (token_tx, token_rx) = mpsc::channel();
    const BULK: usize = 10 << 20;
    const RELOADS: usize = 20;
    let bulk = bulk(connect_from(client, addr), BULK, BULK / RELOADS, token_rx);
    let (expect_tx, expect_rx) = mpsc::channel();
    let half = half_closed(connect_from(client, addr), expect_rx);
    let mut steady = connect_from(client, addr);
    let mut idle = connect_from(client, addr);
    assert_eq!(exchange(&mut idle, b"before", PATIENCE), Outcome::Echoed);
    assert_eq!(exchange(&mut steady, b"before", PATIENCE), Outcome::Echoed);
    let mut sixth = connect_from(client, addr);
    assert_eq!(exchange(&mut sixth, b"6th", PATIENCE), Outcome::Closed, "five per client");
    eventually("the five reach backend A", || a.accepted.load(Ordering::SeqCst) == 5);
    daemon.rewrite_config(&relay_config(pump, &[a.addr, b.addr]));
    let mut tails = 0u64;
    for reload in 0..RELOADS {
        let (status, stdout, stderr) = daemon.control("reload");
        assert_eq!(code(status), 0, "reload {reload}: {stdout}{stderr}");
        assert_eq!(exchange(&mut steady, b"steady", PATIENCE), Outcome::Echoed, "reload {reload}");
        token_tx.send(()).unwrap();
        let chunk = pattern(3, tails, 4096);
        tails += chunk.len() as u64;
        tail_tx.send(Some(chunk.clone())).unwrap();
        expect_tx.send(chunk).unwrap();
    }
    eventually("only generation 21 serves, holding the five", || open_in(&daemon, 21) == (5, true));
    // The binary upgrade: USR2, then WINCH and QUIT to the old master.
    let old = daemon.pid();
    let (status, stdout, stderr) = daemon.control("upgrade");
    assert_eq!(code(status), 0, "{stdout}{stderr}");
    new_master_pid(&stdout);
    daemon.signal(Signal::SIGWINCH);
    daemon.signal(Signal::SIGQUIT);
    let exit = daemon.wait_master_exit(PATIENCE).expect("the old master exits");
    assert_eq!(code(exit), 0);
    assert!(!is_running(old.as_raw()));
    eventually("the new master's workers hold the five", || open_in(&daemon, 1) == (5, true));
    assert_eq!(exchange(&mut steady, b"after", PATIENCE), Outcome::Echoed);
    assert_eq!(exchange(&mut idle, b"after", PATIENCE), Outcome::Echoed);
    let mut sixth = connect_from(client, addr);
    assert_eq!(exchange(&mut sixth, b"6th", PATIENCE), Outcome::Closed, "still five per client");
    // least-connections, as the new master's table counts: A holds five, so five new
    // clients go to B ...
    let other = Ipv4Addr::new(127, 0, 0, 3);
    let mut probes = Vec::new();
    for i in 0..5 {
        let (stream, backend) = probe(addr, other, &[&a, &b]);
        assert_eq!(backend, 1, "probe {i} went to A: A's count is too low");
        probes.push(stream);
    }
    // ... and once the five end, each decremented once, the next five go to A.
    stop.store(true, Ordering::SeqCst);
    token_tx.send(()).unwrap();
    drop(token_tx);
    tail_tx.send(None).unwrap();
    drop(expect_tx);
    let (streamed, mut failures) = streaming.join().unwrap();
    failures.extend(bulk.join().unwrap());
    failures.extend(half.join().unwrap());
    for stream in [&mut steady, &mut idle] {
        stream.shutdown(Shutdown::Write).unwrap();
        if !closed_within(stream, PATIENCE) {
            failures.push("a keep-alive client was not closed after its FIN".into());
        }
    }
    assert!(failures.is_empty(), "{} failures: {failures:#?}", failures.len());
    assert!(streamed > 0, "the streamer moved nothing");
    eventually("the five long connections are closed", || open_in(&daemon, 1).0 == 5);
    for i in 0..5 {
        let (stream, backend) = probe(addr, client, &[&a, &b]);
        assert_eq!(backend, 0, "probe {i} went to B: A's count was not released exactly once");
        probes.push(stream);
    }
    let mut sixth = connect_from(client, addr);
    assert_eq!(exchange(&mut sixth, b"6th", PATIENCE), Outcome::Closed, "the quota is exact");
    let third = Ipv4Addr::new(127, 0, 0, 4);
    let ends: Vec<usize> = (0..2).map(|_| probe(addr, third, &[&a, &b]).1).collect();
    assert!(ends.contains(&0) && ends.contains(&1), "five and five: one each, {ends:?}");
    eprintln!(
        "relay ({pump:?}): 20 reloads and an upgrade; streamed {streamed} bytes, 10 MiB bulk, \
         half-closed with {tails} tail bytes: 0 EOF, 0 reset, every byte intact"
    );
}

#[test]
fn relay_connections_survive_20_reloads_and_an_upgrade_read_write() {
    relay_connections_survive_20_reloads_and_an_upgrade(Pump::ReadWrite);
}

#[test]
fn relay_connections_survive_20_reloads_and_an_upgrade_splice() {
    relay_connections_survive_20_reloads_and_an_upgrade(Pump::Splice);
}

/// The serving generation of `status --json`.
fn generation(daemon: &Daemon) -> u64 {
    status_json(daemon)["master"]["generation"].as_u64().unwrap_or(0)
}

/// Sends HUP (the control command would check the file without the test-only services) and
/// waits until generation `next` serves.
fn reload_to(daemon: &Daemon, next: u64) {
    daemon.signal(Signal::SIGHUP);
    eventually(&format!("generation {next} serves"), || generation(daemon) == next);
}

#[test]
fn a_session_without_the_hook_is_drained_until_reload_drain_timeout_cuts_it() {
    const DRAIN: Duration = Duration::from_secs(12);
    let config = format!(
        "[daemon]\nworkers = 1\ngraceful_timeout = \"{GRACEFUL}\"\nreload_drain_timeout = \"{}s\"\n\
         allow_root_workers = true\npid_file = \"@DIR@/preforkd.pid\"\n\
         [log]\nlevel = \"debug\"\naccess_log = true\n\
         [[listener]]\nname = \"sticky\"\naddress = \"127.0.0.1:0\"\nservice = \"test-sticky\"\n\
         max_connections_per_client = 0\nlong_idle_timeout = \"5m\"\n",
        DRAIN.as_secs()
    );
    let daemon = Daemon::launch(&config, None, &[("PREFORKD_TEST_SERVICES", "1")]);
    let mut sticky = connect(daemon.addr());
    assert_eq!(exchange(&mut sticky, b"line\n", PATIENCE), Outcome::Echoed);
    let old = daemon.worker_pids()[0];
    let retired = Instant::now();
    for next in 2..=4 {
        reload_to(&daemon, next);
    }
    // Drained: the old worker serves it on, past graceful_timeout, for 10 s.
    let mut exchanges = 0;
    while retired.elapsed() < Duration::from_secs(10) {
        assert_eq!(exchange(&mut sticky, b"still\n", PATIENCE), Outcome::Echoed, "{exchanges}");
        exchanges += 1;
        assert!(is_running(old), "the old worker drains");
        thread::sleep(Duration::from_millis(500)); // the client's own pace
    }
    let document = status_json(&daemon);
    let draining: Vec<_> = document["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["state"] == "draining")
        .map(|w| (w["pid"].as_i64().unwrap(), w["generation"].as_u64().unwrap(), w["open"].clone()))
        .collect();
    assert_eq!(draining, [(i64::from(old), 1, serde_json::json!(1))], "{document}");
    // reload_drain_timeout cuts it, and nothing earlier did.
    assert!(closed_within(&mut sticky, PATIENCE), "cut at reload_drain_timeout");
    let cut = retired.elapsed();
    assert!(cut >= DRAIN - Duration::from_millis(500), "cut after {cut:?}, before {DRAIN:?}");
    eventually("the old worker is gone", || !is_running(old));
    daemon.wait_for_log("the kill", |l| l.contains(&format!("pid {old}")) && l.contains("SIGKILL"));
    eprintln!(
        "a session without hand-off: {exchanges} exchanges over 3 reloads, cut after {cut:?}"
    );
}

/// Pids of the zombies whose parent is one of `parents`, from /proc.
fn zombies_of(parents: &[i32]) -> Vec<i32> {
    let mut zombies = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let mut fields = stat.rsplit(')').next().unwrap().split_whitespace();
        let (state, parent) = (fields.next(), fields.next().and_then(|p| p.parse().ok()));
        if state == Some("Z") && parent.is_some_and(|p| parents.contains(&p)) {
            zombies.push(pid);
        }
    }
    zombies
}

/// Reads the ticker's lines now waiting (each its child's pid) and checks them all.
fn ticks(ticker: &mut TcpStream, child: &str, what: &str) {
    let mut buffer = [0u8; 4096];
    let n = ticker.read(&mut buffer).unwrap_or_else(|e| panic!("{what}: the ticker: {e}"));
    assert!(n > 0, "{what}: the ticker's connection ended");
    let text = String::from_utf8_lossy(&buffer[..n]);
    for line in text.split_terminator('\n').filter(|l| !l.is_empty()) {
        assert!(child.starts_with(line), "{what}: another child says {line:?}, not {child}");
    }
}

#[test]
fn exec_children_survive_5_reloads_and_an_upgrade_then_a_graceful_stop_ends_them() {
    let config = format!(
        "[daemon]\nworkers = 2\ngraceful_timeout = \"{GRACEFUL}\"\nallow_root_workers = true\n\
         pid_file = \"@DIR@/preforkd.pid\"\n[log]\nlevel = \"debug\"\naccess_log = true\n\
         [[listener]]\nname = \"cat\"\naddress = \"127.0.0.1:0\"\nservice = \"exec\"\n\
         max_connections_per_client = 0\n[listener.options]\nprogram = \"/bin/cat\"\n\
         user = \"nobody\"\nmax_instances = 2\n\
         [[listener]]\nname = \"ticker\"\naddress = \"127.0.0.1:0\"\nservice = \"exec\"\n\
         max_connections_per_client = 0\n[listener.options]\nprogram = \"/bin/sh\"\n\
         args = [\"-c\", \"while echo $$; do sleep 0.1; done\"]\nuser = \"nobody\"\n\
         max_instances = 1\n"
    );
    let mut daemon = Daemon::start(&config);
    let (cat, ticker_addr) = (daemon.addrs[0], daemon.addrs[1]);
    let mut cats: Vec<TcpStream> = (0..2).map(|_| connect(cat)).collect();
    for stream in &mut cats {
        assert_eq!(exchange(stream, b"meow\n", PATIENCE), Outcome::Echoed);
    }
    let mut over = connect(cat);
    assert_eq!(exchange(&mut over, b"meow\n", PATIENCE), Outcome::Closed, "max_instances 2");
    let mut ticker = connect(ticker_addr);
    ticker.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut first = String::new();
    let mut byte = [0u8; 1];
    while !first.ends_with('\n') {
        ticker.read_exact(&mut byte).unwrap();
        first.push(byte[0] as char);
    }
    let child = first.trim().to_owned();
    let child_pid: i32 = child.parse().unwrap();
    let master = daemon.pid();
    for reload in 0..5 {
        let (status, stdout, stderr) = daemon.control("reload");
        assert_eq!(code(status), 0, "reload {reload}: {stdout}{stderr}");
        for stream in &mut cats {
            assert_eq!(exchange(stream, b"meow\n", PATIENCE), Outcome::Echoed, "{reload}");
        }
        ticks(&mut ticker, &child, &format!("reload {reload}"));
    }
    // The generation-1 workers keep their children, and say so.
    let document = status_json(&daemon);
    let kept: Vec<(u64, String, u64)> = document["workers"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|w| {
            let generation = w["generation"].as_u64().unwrap();
            w["children"].as_array().unwrap().iter().map(move |c| {
                (generation, c["listener"].as_str().unwrap().to_owned(), c["pid"].as_u64().unwrap())
            })
        })
        .collect();
    assert_eq!(kept.len(), 3, "two cats and the ticker: {document}");
    assert!(kept.contains(&(1, "ticker".into(), child_pid as u64)), "{document}");
    assert!(kept.iter().all(|k| k.0 == 1), "kept by generation 1: {document}");
    let supervisors: Vec<i32> = document["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["children_total"].as_u64() > Some(0))
        .map(|w| w["pid"].as_i64().unwrap() as i32)
        .collect();
    let (_, text, _) = daemon.control("status");
    assert!(text.contains(&format!("child {child_pid} on ticker")), "{text}");
    // The upgrade: the old master retires its workers, which keep the children.
    let (status, stdout, stderr) = daemon.control("upgrade");
    assert_eq!(code(status), 0, "{stdout}{stderr}");
    let new_master = new_master_pid(&stdout);
    daemon.signal(Signal::SIGWINCH);
    daemon.signal(Signal::SIGQUIT);
    let retired = Instant::now();
    // Past graceful_timeout and more, everything still runs.
    let mut round = 0;
    while retired.elapsed() < Duration::from_secs(3) {
        for stream in &mut cats {
            assert_eq!(exchange(stream, b"meow\n", PATIENCE), Outcome::Echoed, "{round}");
        }
        ticks(&mut ticker, &child, &format!("after the upgrade, round {round}"));
        let mut over = connect(cat);
        assert_eq!(exchange(&mut over, b"x\n", PATIENCE), Outcome::Closed, "still 2 at most");
        round += 1;
        thread::sleep(Duration::from_millis(500)); // the clients' own pace
    }
    assert!(is_running(master.as_raw()) && is_running(child_pid), "the old master supervises");
    // status (the new master's) shows the old master's workers and the children they keep.
    let document = status_json(&daemon);
    let old_children: Vec<u64> = document["old_master"]["workers"]
        .as_array()
        .unwrap_or_else(|| panic!("no old master in {document}"))
        .iter()
        .flat_map(|w| w["children"].as_array().unwrap().iter().map(|c| c["pid"].as_u64().unwrap()))
        .collect();
    assert!(old_children.contains(&(child_pid as u64)), "{document}");
    assert_eq!(document["old_master"]["master"]["pid"], master.as_raw());
    let (_, text, _) = daemon.control("status");
    assert!(text.contains("the old master of a binary upgrade still runs"), "{text}");
    assert!(text.contains(&format!("child {child_pid} on ticker")), "{text}");
    // Both masters, their workers and exec spawners (the children's parents).
    let family = || {
        let mut family = vec![master.as_raw(), new_master];
        family.extend(crate::exec::children_of(master.as_raw()));
        family.extend(crate::exec::children_of(new_master));
        family
    };
    let parents = family();
    assert!(supervisors.iter().all(|pid| parents.contains(pid)), "the supervisors still run");
    assert_eq!(zombies_of(&parents), Vec::<i32>::new(), "no zombie");
    // One cat ends: its max_instances slot comes back once, to a child of the new master.
    let mut ended = cats.remove(0);
    ended.shutdown(Shutdown::Write).unwrap();
    assert!(closed_within(&mut ended, PATIENCE));
    let mut again = Vec::new();
    eventually("the slot comes back", || {
        let mut stream = connect(cat);
        let ok = exchange(&mut stream, b"again\n", PATIENCE) == Outcome::Echoed;
        if ok {
            again.push(stream);
        }
        ok
    });
    let mut over = connect(cat);
    assert_eq!(exchange(&mut over, b"x\n", PATIENCE), Outcome::Closed, "never 3");
    // The old children end: the old master's workers, then the old master, exit.
    drop(cats);
    drop(ticker);
    let exit = daemon.wait_master_exit(PATIENCE).expect("the old master exits");
    assert_eq!(code(exit), 0);
    eventually("the ticker child is gone", || !is_running(child_pid));
    assert_eq!(zombies_of(&family()), Vec::<i32>::new(), "no zombie");
    // A graceful stop still ends a running child, at graceful_timeout, as documented.
    let mut ticker = connect(ticker_addr);
    ticker.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut line = String::new();
    while !line.ends_with('\n') {
        ticker.read_exact(&mut byte).unwrap();
        line.push(byte[0] as char);
    }
    let last: i32 = line.trim().parse().unwrap();
    let stopping = Instant::now();
    let (status, stdout, stderr) = daemon.control("quit");
    assert_eq!(code(status), 0, "{stdout}{stderr}");
    assert!(!is_running(last), "the child ended with the stop");
    assert!(stopping.elapsed() >= Duration::from_millis(1900), "at graceful_timeout");
    eprintln!(
        "exec: 3 children kept over 5 reloads and an upgrade, {round} rounds after QUIT; the stop took {:?}",
        stopping.elapsed()
    );
}

#[test]
fn a_30_mb_tftp_download_survives_a_reload_byte_exact() {
    const SIZE: usize = 30_000_000;
    let root = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let served = random_bytes(SIZE, 21);
    std::fs::write(root.path().join("big"), &served).unwrap();
    let config = format!(
        "[daemon]\nworkers = 1\ngraceful_timeout = \"{GRACEFUL}\"\nallow_root_workers = true\n\
         pid_file = \"@DIR@/preforkd.pid\"\n[log]\nlevel = \"info\"\naccess_log = true\n\
         [[listener]]\nname = \"tftp\"\naddress = \"127.0.0.1:0\"\nservice = \"tftp\"\n\
         transport = \"udp\"\n[listener.options]\nroot = \"{}\"\nretries = 10\n",
        root.path().display()
    );
    let daemon = Daemon::start(&config);
    let old = daemon.worker_pids()[0];
    let local = out.path().join("big");
    let port = daemon.addr().port().to_string();
    let args = ["-m", "binary", "127.0.0.1", &port, "-c", "get", "big", local.to_str().unwrap()];
    let mut client = std::process::Command::new("tftp")
        .args(args)
        .current_dir(out.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("tftp-hpa's tftp is needed for this test (.ci/run installs it)");
    let size = || std::fs::metadata(&local).map_or(0, |m| m.len());
    eventually("the download is under way", || size() >= 1 << 20);
    let (status, stdout, stderr) = daemon.control("reload");
    assert_eq!(code(status), 0, "{stdout}{stderr}");
    let reloaded = Instant::now();
    let at = size();
    assert!(at < SIZE as u64, "the reload came in the middle: {at} bytes were there");
    // The client stalls past graceful_timeout (the server retransmits meanwhile): the old
    // worker, draining, keeps the transfer.
    let client_pid = nix::unistd::Pid::from_raw(client.id() as i32);
    nix::sys::signal::kill(client_pid, Signal::SIGSTOP).unwrap();
    thread::sleep(Duration::from_millis(2500)); // past graceful_timeout: what is under test
    let document = status_json(&daemon);
    let worker = document["workers"].as_array().unwrap().iter().find(|w| w["pid"] == old);
    let worker = worker.unwrap_or_else(|| panic!("the old worker is gone: {document}"));
    assert_eq!((&worker["state"], &worker["open"]), (&"draining".into(), &1.into()), "{document}");
    nix::sys::signal::kill(client_pid, Signal::SIGCONT).unwrap();
    // The old worker finishes the transfer.
    let deadline = Instant::now() + PATIENCE * 2;
    let status = loop {
        if let Some(status) = client.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "tftp did not finish");
        thread::sleep(Duration::from_millis(20));
    };
    let drained = reloaded.elapsed();
    assert!(status.success(), "tftp: {status:?}");
    let got = std::fs::read(&local).unwrap();
    assert!(got == served, "{} bytes arrived, {} differ", got.len(), SIZE);
    let line = daemon.wait_for_log("the transfer's access line", |l| {
        l.contains("access listener=tftp") && l.contains("big")
    });
    assert_eq!(pid_of(&line), old, "finished by the worker that began it: {line}");
    assert_eq!(field(&line, "result"), Some("complete"), "{line}");
    eventually("the old worker exits once done", || !is_running(old));
    eprintln!(
        "tftp: 30 MB, reload at {at} bytes, the client stalled 2.5 s; the old worker served \
         the rest for {drained:?} (graceful_timeout {GRACEFUL})"
    );
}

/// A redis-server of the test's own: on a free port, in a temporary directory, persisting
/// nothing; killed (by pid) when dropped.
struct Redis {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Redis {
    fn start() -> Redis {
        let dir = tempfile::tempdir().unwrap();
        for _ in 0..10 {
            // A port the kernel says is free now; another process could take it before
            // redis binds it, so a failed start tries another.
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let mut child = std::process::Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
                .args(["--appendonly", "no", "--dir", dir.path().to_str().unwrap()])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("redis-server is needed for this test (.ci/run installs it)");
            let deadline = Instant::now() + PATIENCE;
            while Instant::now() < deadline && child.try_wait().unwrap().is_none() {
                let ping = std::process::Command::new("redis-cli")
                    .args(["-p", &port.to_string(), "ping"])
                    .output()
                    .expect("redis-cli");
                if String::from_utf8_lossy(&ping.stdout).trim() == "PONG" {
                    return Redis { child, port, _dir: dir };
                }
                thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("redis-server did not start");
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn redis_benchmark_through_the_relay_sees_no_error_across_10_reloads() {
    let redis = Redis::start();
    let backend: SocketAddr = format!("127.0.0.1:{}", redis.port).parse().unwrap();
    let mut config = relay_config(Pump::ReadWrite, &[backend]);
    config = config.replace("max_connections_per_client = 5", "max_connections_per_client = 0");
    let daemon = Daemon::start(&config);
    let port = daemon.addr().port().to_string();
    let mut benchmark = std::process::Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port, "-c", "20", "-n", "200000", "-t", "set,get"])
        .arg("--csv")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("redis-benchmark is needed for this test (.ci/run installs it)");
    let started = Instant::now();
    eventually("the benchmark's 20 clients are connected", || open_in(&daemon, 1).0 >= 20);
    let mut reloads = 0;
    for reload in 0..10 {
        let (status, stdout, stderr) = daemon.control("reload");
        assert_eq!(code(status), 0, "reload {reload}: {stdout}{stderr}");
        reloads += 1;
    }
    let during = started.elapsed();
    assert!(benchmark.try_wait().unwrap().is_none(), "the reloads came while the benchmark ran");
    let output = benchmark.wait_with_output().unwrap();
    let (stdout, stderr) =
        (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "redis-benchmark failed: {stdout}{stderr}");
    let everything = format!("{stdout}{stderr}").to_lowercase();
    for bad in ["error", "reset", "closed", "refused"] {
        assert!(!everything.contains(bad), "{bad:?} in redis-benchmark's output: {stdout}{stderr}");
    }
    let rows: Vec<&str> =
        stdout.lines().filter(|l| l.starts_with("\"SET\"") || l.starts_with("\"GET\"")).collect();
    assert_eq!(rows.len(), 2, "both tests ran to the end: {stdout}");
    let took = started.elapsed();
    let lines = daemon.matching(|l| l.contains("handed off (Adopted)"));
    assert!(lines.len() >= 20, "the benchmark's connections moved: {} hand-offs", lines.len());
    eprintln!(
        "redis: {reloads} reloads in {during:?} during a {took:?} redis-benchmark -c 20 -n 200000 -t set,get: \
         0 errors, {} hand-offs\n{stdout}",
        lines.len()
    );
}
