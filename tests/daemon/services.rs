//! The inetd internal services over TCP, byte-exact and with the real clients operators use
//! (`rdate`, OpenBSD `nc -N`), which CI installs.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::harness::*;

/// One listener per built-in, in this order: echo, discard, chargen, daytime, time.
fn inetd_config() -> String {
    let mut config = String::from(
        "[daemon]\nworkers = 2\nallow_root_workers = true\npid_file = \"@DIR@/preforkd.pid\"\n\
         [log]\nlevel = \"debug\"\n",
    );
    for service in ["echo", "discard", "chargen", "daytime", "time"] {
        config.push_str(&format!(
            "[[listener]]\nname = \"{service}\"\naddress = \"127.0.0.1:0\"\nservice = \"{service}\"\n"
        ));
    }
    config
}

/// Everything the server sends until it closes.
fn read_to_close(addr: SocketAddr) -> Vec<u8> {
    let mut stream = connect(addr);
    let mut got = Vec::new();
    stream.read_to_end(&mut got).expect("read until the server closes");
    got
}

/// Runs `program` (a real client) with `stdin`, with a deadline; its stdout.
fn client(program: &str, args: &[&str], stdin: &[u8]) -> String {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program} is needed for this test (.ci/run installs it): {e}"));
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let pid = child.id() as i32;
    let watchdog = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + PATIENCE;
        while std::time::Instant::now() < deadline && is_running(pid) {
            std::thread::park_timeout(Duration::from_millis(50));
        }
    });
    let output = child.wait_with_output().unwrap();
    watchdog.join().unwrap();
    assert!(output.status.success(), "{program} {args:?}: {output:?}");
    String::from_utf8(output.stdout).unwrap()
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

#[test]
fn the_inetd_services_answer_byte_exact() {
    let daemon = Daemon::start(&inetd_config());
    let [echo, discard, chargen, daytime, time] = daemon.addrs[..] else { panic!("5 listeners") };

    // time (RFC 868): 4 bytes, seconds since 1900, then the server closes.
    let before = now_unix();
    let answer = read_to_close(time);
    assert_eq!(answer.len(), 4, "{answer:?}");
    let seconds = u32::from_be_bytes(answer.try_into().unwrap()) as u64;
    let unix = seconds.wrapping_sub(2_208_988_800) & 0xffff_ffff;
    assert!((before..=now_unix()).contains(&unix), "{unix} is not now ({before})");

    // daytime (RFC 867): one RFC 3339 UTC line, then the server closes.
    let before = now_unix();
    let line = String::from_utf8(read_to_close(daytime)).unwrap();
    let stamp = line.strip_suffix("\r\n").expect("CR LF");
    assert_eq!(stamp.len(), "2026-11-22T03:04:05Z".len(), "{line:?}");
    let at = humantime::parse_rfc3339(stamp).unwrap().duration_since(UNIX_EPOCH).unwrap();
    assert!((before..=now_unix()).contains(&at.as_secs()), "{stamp} is not now");

    // discard (RFC 863): 1 MiB in, nothing out, closed after the client's FIN.
    let mut stream = connect(discard);
    stream.write_all(&random_bytes(1 << 20, 3)).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = Vec::new();
    stream.read_to_end(&mut got).unwrap();
    assert!(got.is_empty(), "discard sent {} bytes", got.len());
    let line = daemon.wait_for_log("discard's access line", |l| {
        l.contains("access listener=discard") && l.contains("in=1048576")
    });
    assert_eq!(field(&line, "out"), Some("0"), "{line}");
    assert_eq!(field(&line, "reason"), Some("client-close"), "{line}");

    // chargen (RFC 864): the rotating lines, input thrown away.
    let mut stream = connect(chargen);
    stream.write_all(b"ignored\r\n").unwrap();
    let mut got = vec![0u8; 74 * 100];
    stream.read_exact(&mut got).unwrap();
    let expected: Vec<u8> = (0..100)
        .flat_map(|line| {
            let chars = (0..72).map(move |column| b' ' + ((line + column) % 95) as u8);
            chars.chain(*b"\r\n")
        })
        .collect();
    assert_eq!(got, expected);
    drop(stream);

    // echo, still RFC 862.
    let mut stream = connect(echo);
    assert_eq!(exchange(&mut stream, b"still echo", PATIENCE), Outcome::Echoed);
}

#[test]
fn a_chargen_client_that_never_reads_costs_no_cpu() {
    let daemon = Daemon::start(&inetd_config().replace("workers = 2", "workers = 1"));
    let chargen = daemon.addrs[2];
    let worker = daemon.worker_pids()[0];
    let stream = connect(chargen);
    // The socket buffers fill at once; from then on the worker must wait for writability,
    // not spin.
    eventually("the worker reports bytes sent", || {
        let (_, status, _) = daemon.control("status");
        status.lines().any(|l| {
            let columns: Vec<&str> = l.split_whitespace().collect();
            columns.get(1) == Some(&worker.to_string().as_str())
                && columns.get(7).is_some_and(|out| *out != "0")
        })
    });
    let start = cpu_ticks(worker);
    let window = std::time::Instant::now();
    while window.elapsed() < Duration::from_secs(1) {
        std::thread::park_timeout(Duration::from_millis(100));
    }
    let spent = cpu_ticks(worker) - start;
    assert!(spent < 20, "the worker spent {spent} ticks in 1 s on a client that never reads");
    drop(stream);
}

#[test]
fn real_clients_rdate_and_nc() {
    let daemon = Daemon::start(&inetd_config());
    let [echo, discard, chargen, daytime, time] = daemon.addrs[..] else { panic!("5 listeners") };
    let port = |addr: SocketAddr| addr.port().to_string();

    // rdate -p: print the remote time, as ctime(3) in the local time zone.
    let today = |format: &str| {
        let out = Command::new("date").arg(format).output().unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let (day_before, year) = (today("+%a %b %e"), today("+%Y"));
    let printed = client("rdate", &["-p", "-o", &port(time), "127.0.0.1"], b"");
    let day_after = today("+%a %b %e");
    assert!(
        (printed.contains(&day_before) || printed.contains(&day_after)) && printed.contains(&year),
        "rdate printed {printed:?}, not today ({day_before} {year})"
    );

    // nc -N: send stdin, shut down the write side at its end, print what comes back.
    let nc =
        |addr: SocketAddr, input: &[u8]| client("nc", &["-N", "127.0.0.1", &port(addr)], input);
    assert_eq!(nc(echo, b"hello\nworld\n"), "hello\nworld\n");
    assert_eq!(nc(discard, b"into the void\n"), "");
    let line = nc(daytime, b"");
    assert!(humantime::parse_rfc3339(line.trim_end()).is_ok(), "{line:?}");
    // chargen never ends by itself: take two lines and hang up.
    let mut child = Command::new("nc")
        .args(["-N", "127.0.0.1", &port(chargen)])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut two = vec![0u8; 148];
    child.stdout.as_mut().unwrap().read_exact(&mut two).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(two.starts_with(b" !\"#$%&'()*+,-./0123456789"), "{:?}", String::from_utf8_lossy(&two));
    assert_eq!(&two[72..76], b"\r\n!\"");
}

#[test]
fn a_session_can_watch_a_descriptor_set_a_timer_and_name_its_close() {
    let config = "[daemon]\nworkers = 1\nallow_root_workers = true\n\
                  [log]\nlevel = \"debug\"\n\
                  [[listener]]\nname = \"probe\"\naddress = \"127.0.0.1:0\"\nservice = \"test-probe\"\n";
    let daemon = Daemon::launch(config, None, &[("PREFORKD_TEST_SERVICES", "1")]);
    let worker = daemon.worker_pids()[0];
    let before = open_fds(worker);
    for round in 0..20 {
        let mut stream = connect(daemon.addr());
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, "probe: pipe, timer\n", "round {round}");
    }
    let lines =
        daemon.wait_for_lines("20 access lines", 20, |l| l.contains("access listener=probe"));
    for line in &lines {
        assert_eq!(field(line, "reason"), Some("probe-done"), "{line}");
        assert_eq!(field(line, "in"), Some("1"), "the pipe's byte counts as input: {line}");
    }
    eventually("every descriptor is closed again", || open_fds(worker) == before);
}
